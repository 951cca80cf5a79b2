"""The export stage: checkpoint + prepared data -> bundle folder (model.onnx, model.int8.onnx, model.pt and
card.json with the val metrics of both precisions, parity and lineage). Trust statistics come next, from
dermlens.trust.exported on the precision that will be served; dermlens.pipeline.bundle runs both."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from dermlens import DISCLAIMER, __version__
from dermlens.bundle import CARD, ONNX_FP32, ONNX_INT8, TORCH_WEIGHTS, ModelCard, write_card
from dermlens.data.taxonomy import COARSE_CLASSES, coarse_label
from dermlens.export.checkpoint import LoadedModel, fp16_state_dict, load_checkpoint
from dermlens.export.graph import export_onnx, torch_outputs
from dermlens.export.lineage import extra_sources, lineage
from dermlens.export.quantize import quantize_checked
from dermlens.export.splits import SplitImages, load_split
from dermlens.infer.calibration import softmax
from dermlens.infer.session import OUTPUTS, OnnxModel
from dermlens.metadata import META_DIM, META_FIELDS, missing_vector
from dermlens.metrics import classification_metrics


def export_config(path: str | Path | None = None) -> dict[str, Any]:
    """configs/export.yaml, with a user YAML's sections merged over it."""
    cfg = yaml.safe_load(resources.files("dermlens.configs").joinpath("export.yaml").read_text())
    if path is not None:
        for key, value in (yaml.safe_load(Path(path).read_text()) or {}).items():
            cfg[key] = (
                {**cfg[key], **value} if isinstance(cfg.get(key), dict) and isinstance(value, dict) else value
            )
    return cfg


@dataclass
class Exported:
    """What the export stage hands to trust fitting: the bundle, the splits it scored, the val outputs of
    each precision and the fine head's image weights (for CAM)."""

    bundle: Path
    val: SplitImages
    train: SplitImages
    val_outputs: dict[str, dict[str, np.ndarray]]  # precision -> ONNX outputs on val
    cam_weight: np.ndarray
    card: dict[str, Any]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- bundle ---------------------------------------------------------------------------------------------


def _parity(net: Any, val: SplitImages, val_out: dict[str, np.ndarray], prep: Any, n: int) -> dict[str, Any]:
    """Max |probability| and |logit| difference of the fp32 graph against PyTorch eager on n val images."""
    ref = torch_outputs(net, val.images[:n], val.meta[:n], prep)
    return {
        "images": n,
        "max_abs_prob_diff": float(
            np.abs(softmax(ref["fine_logits"]) - softmax(val_out["fine_logits"][:n])).max()
        ),
        "max_abs_logit_diff": float(np.abs(ref["fine_logits"] - val_out["fine_logits"][:n]).max()),
    }


def export_bundle(
    checkpoint: str | Path | None,
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    loaded: LoadedModel | None = None,
) -> Exported:
    """Checkpoint (or an already `loaded` model, e.g. an ensemble) + prepared data -> model.onnx,
    model.int8.onnx, model.pt and card.json in `out_dir` (no trust.npz yet)."""
    import onnxruntime as ort

    from dermlens.model.ensemble_net import describe, is_ensemble

    cfg = cfg or export_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = loaded or load_checkpoint(checkpoint)
    net, classes, prep = loaded.net, loaded.classes, loaded.prep
    log(
        f"loaded {loaded.source} ({loaded.model_cfg.get('arch')}, {len(classes)} classes, "
        f"metadata={net.uses_metadata})"
    )
    export_onnx(net, out / ONNX_FP32, prep, int(cfg["opset"]))
    log(f"wrote {out / ONNX_FP32}")
    bs = int(cfg.get("batch_size", 32))
    val = load_split(data_dir, "val", classes, prep)
    val_out = OnnxModel(out / ONNX_FP32).run_images(val.images, prep, val.meta, bs)
    log(f"scored {len(val.labels)} val images with the fp32 graph")
    parity = _parity(net, val, val_out, prep, min(int(cfg["parity"]["images"]), len(val.labels)))
    log(
        f"fp32 parity vs PyTorch on {parity['images']} val images: "
        f"max |dp| = {parity['max_abs_prob_diff']:.2e}"
    )

    t, q = cfg["trust"], cfg["int8"]
    train = load_split(data_dir, "train", classes, prep, t.get("train_images"), int(t.get("seed", 0)))
    rng = np.random.default_rng(int(q.get("seed", 0)))
    pick = np.sort(
        rng.choice(len(train.labels), min(int(q["calibration_images"]), len(train.labels)), replace=False)
    )
    n = len(classes)
    m32 = classification_metrics(softmax(val_out["fine_logits"]), val.labels, n)
    int8_out, q_info = quantize_checked(
        out / ONNX_FP32,
        out / ONNX_INT8,
        (train.images[pick], train.meta[pick]),
        val,
        prep,
        q,
        m32["bal_acc"],
        log,
    )
    log(f"wrote {out / ONNX_INT8} (calibrated on {len(pick)} train images)")
    m8 = classification_metrics(softmax(int8_out["fine_logits"]), val.labels, n)
    m8 |= {
        "top1_agreement_with_fp32": float(
            (int8_out["fine_logits"].argmax(1) == val_out["fine_logits"].argmax(1)).mean()
        ),
        "max_abs_prob_diff_vs_fp32": float(
            np.abs(softmax(int8_out["fine_logits"]) - softmax(val_out["fine_logits"])).max()
        ),
    }
    no_meta = np.repeat(missing_vector()[None], len(val.labels), axis=0)
    int8_nm = OnnxModel(out / ONNX_INT8).run_images(val.images, prep, no_meta, bs)["fine_logits"]
    m8_nm = classification_metrics(softmax(int8_nm), val.labels, n)
    log(f"val balanced accuracy with metadata withheld: int8 {m8_nm['bal_acc']:.4f}")
    log(f"val balanced accuracy: fp32 {m32['bal_acc']:.4f}, int8 {m8['bal_acc']:.4f}")

    torch.save(fp16_state_dict(net), out / TORCH_WEIGHTS)
    card = ModelCard(
        name=str(cfg["name"]),
        version=f"{__version__}+{_sha256(out / ONNX_FP32)[:10]}",
        architecture=(
            describe(loaded.model_cfg) if is_ensemble(loaded.model_cfg) else str(loaded.model_cfg.get("arch"))
        ),
        classes=classes,
        preprocessing=prep,
        uses_metadata=bool(net.uses_metadata),
        coarse_classes=COARSE_CLASSES,
        extra={},
    )
    card.extra = {
        "default_precision": str(cfg.get("default_precision", "int8")),
        "malignant_classes": [c for c in classes if coarse_label(c) == "malignant"],
        "metrics": {"val": {"fp32": m32, "int8": m8, "int8_no_metadata": m8_nm}},
        "training": {"model": loaded.model_cfg, "checkpoint": loaded.source.name, **loaded.info},
        "lineage": {
            "evaluated_on": lineage([data_dir]),
            "extra_training_data": lineage(extra_sources(loaded.info)),
            "licences": dict(cfg.get("licences") or {}),
        },
        "metadata_encoding": {"fields": list(META_FIELDS), "dim": META_DIM, "age_scale": "years / 100"},
        "export": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "dermlens": __version__,
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "opset": int(cfg["opset"]),
            "inputs": {"image": ["batch", 3, "height", "width"], "meta": ["batch", META_DIM]},
            "outputs": list(OUTPUTS),
            "int8": {**q, **q_info, "calibration_images": int(len(pick)), "calibration_split": "train"},
            "parity_fp32_vs_torch": parity,
        },
        "intended_use": str(cfg.get("intended_use", "")).strip(),
        "limitations": list(cfg.get("limitations") or []),
        "disclaimer": DISCLAIMER,
        "license": cfg.get("license"),
    }
    write_card(out, card)  # seals the bundle: MANIFEST.sha256 lists every file's sha256
    log(f"wrote {out / CARD}")
    return Exported(
        out,
        val,
        train,
        {"fp32": val_out, "int8": int8_out},
        net.cam_weight().detach().numpy(),
        card.to_dict(),
    )
