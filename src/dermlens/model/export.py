"""Export a trained DermNet to a self-contained bundle: ONNX fp32 + int8, trust.npz, model.pt, card.json.

Needs torch, onnx and onnxruntime.quantization (the `train` extra). The bundle it writes runs with
onnxruntime + numpy + Pillow only (dermlens.serve.runtime).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn import functional as F

from dermlens import DISCLAIMER, __version__
from dermlens.bundle import CARD, ONNX_FP32, ONNX_INT8, TORCH_WEIGHTS, TRUST, ModelCard, read_card, write_card
from dermlens.data.taxonomy import COARSE_CLASSES, UNKNOWN, coarse_label
from dermlens.metadata import META_DIM, META_FIELDS, encode_rows, missing_vector
from dermlens.model.network import DermNet, build_network
from dermlens.preprocess import Preprocessing
from dermlens.serve.runtime import OUTPUTS, OnnxModel

INPUTS: tuple[str, ...] = ("image", "meta")


class ExportError(RuntimeError):
    """A checkpoint, run folder or prepared data set that cannot be exported (one-line message)."""


def export_config(path: str | Path | None = None) -> dict[str, Any]:
    """configs/export.yaml, with a user YAML's sections merged over it."""
    cfg = yaml.safe_load(resources.files("dermlens.configs").joinpath("export.yaml").read_text())
    if path is not None:
        for key, value in (yaml.safe_load(Path(path).read_text()) or {}).items():
            cfg[key] = (
                {**cfg[key], **value} if isinstance(cfg.get(key), dict) and isinstance(value, dict) else value
            )
    return cfg


# ---- checkpoints ---------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A trained network with what it was trained on."""

    net: DermNet
    classes: tuple[str, ...]
    prep: Preprocessing
    model_cfg: dict[str, Any]
    source: Path
    info: dict[str, Any]


def find_checkpoint(run_dir: str | Path) -> Path:
    """A run folder's checkpoints/best.ckpt (else last.ckpt)."""
    run_dir = Path(run_dir)
    for name in ("best.ckpt", "last.ckpt"):
        if (run_dir / "checkpoints" / name).is_file():
            return run_dir / "checkpoints" / name
    raise ExportError(
        f"no checkpoints/best.ckpt or last.ckpt in {run_dir}: is it a `dermlens train` run folder?"
    )


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - Lightning hparams may hold objects the safe loader refuses
        return torch.load(path, map_location="cpu", weights_only=False)


def _eval_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The evaluation network's weights from a LightningModule state dict (the EMA copy when present)."""
    for prefix in ("ema.module.", "net."):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    return state


def load_checkpoint(path: str | Path) -> LoadedModel:
    """A Lightning checkpoint from `dermlens train`, or a bundle's model.pt (card.json beside it)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint not found: {path}")
    if path.suffix == ".pt" and (path.parent / CARD).is_file():
        card = json.loads((path.parent / CARD).read_text())
        model_cfg, classes = dict(card["training"]["model"]), tuple(card["classes"])
        prep, state, info = (
            Preprocessing.from_dict(card["preprocessing"]),
            _torch_load(path),
            {"from_bundle": True},
        )
    else:
        ckpt = _torch_load(path)
        hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
        if not hp or "cfg" not in hp or "state_dict" not in ckpt:
            raise ExportError(
                f"{path} is not a dermlens training checkpoint (no hyper_parameters.cfg / state_dict)"
            )
        model_cfg, classes, prep = (
            dict(hp["cfg"]["model"]),
            tuple(hp["classes"]),
            Preprocessing.from_dict(hp["prep"]),
        )
        state = _eval_state(ckpt["state_dict"])
        info = {
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
            "seed": hp["cfg"].get("seed"),
            "data": hp["cfg"].get("data", {}),
            "augment": hp["cfg"].get("augment", {}),
            "loss": hp["cfg"].get("loss", {}),
        }
    net = build_model(model_cfg, len(classes))
    net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return LoadedModel(net.float().eval(), classes, prep, model_cfg, path, info)


def build_model(model_cfg: dict[str, Any], n_fine: int) -> nn.Module:
    """An untrained DermNet, or an EnsembleNet when the config describes one (weights loaded afterwards)."""
    from dermlens.model.ensemble import build_ensemble, is_ensemble

    if is_ensemble(model_cfg):
        return build_ensemble(model_cfg, n_fine)
    return build_network({**model_cfg, "init": "random"}, n_fine)


# ---- ONNX graph ----------------------------------------------------------------------------------------


class SamePadConv(nn.Module):
    """TensorFlow 'SAME' strided conv whose padding is traced without Clip (valid when (k-1)*d+1 >= stride).

    timm's Conv2dSame computes max(pad, 0) with a Clip that shares a constant with the ReLU6 Clips after
    constant folding, which breaks onnxruntime's QOperator quantizer; here pad = (k-1)*d+1-s+(s - x%s)%s.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        for k, s, d in zip(conv.kernel_size, conv.stride, conv.dilation, strict=True):
            if (k - 1) * d + 1 < s:
                raise ValueError(f"SamePadConv needs (k-1)*d+1 >= stride, got k={k} s={s} d={d}")

    def _pad(self, size: Any, axis: int) -> tuple[Any, Any]:
        k, s, d = self.conv.kernel_size[axis], self.conv.stride[axis], self.conv.dilation[axis]
        total = (k - 1) * d + 1 - s + (s - size % s) % s
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._pad(x.shape[-2], 0)
        left, right = self._pad(x.shape[-1], 1)
        x = F.pad(x, (left, right, top, bottom))
        c = self.conv
        return F.conv2d(x, c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def _swap_same_convs(module: nn.Module) -> int:
    """Replace timm Conv2dSame children by SamePadConv in place; returns how many."""
    from timm.layers.conv2d_same import Conv2dSame

    n = 0
    for name, child in module.named_children():
        if isinstance(child, Conv2dSame):
            setattr(module, name, SamePadConv(child))
            n += 1
        else:
            n += _swap_same_convs(child)
    return n


class OnnxGraph(nn.Module):
    """(image, meta) -> (fine_logits, coarse_logits, embedding, feature_map): the bundle's ONNX contract."""

    def __init__(self, net: DermNet) -> None:
        super().__init__()
        self.net = copy.deepcopy(net).float().eval()
        _swap_same_convs(self.net)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.net.forward_all(image, meta if self.net.uses_metadata else None)


def export_onnx(net: DermNet, path: str | Path, prep: Preprocessing, opset: int = 17) -> Path:
    """Write the fp32 ONNX graph: dynamic batch, height and width; inputs image + meta."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = OnnxGraph(net).eval()
    x = torch.zeros(2, 3, prep.height, prep.width)
    meta = torch.zeros(2, META_DIM)
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "meta": {0: "batch"}}
    axes |= {o: {0: "batch"} for o in OUTPUTS[:3]} | {"feature_map": {0: "batch", 2: "fh", 3: "fw"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is chosen deliberately
        torch.onnx.export(
            graph,
            (x, meta),
            str(path),
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    if "meta" not in {
        i.name for i in model.graph.input
    }:  # unused by a model without metadata: keep the contract
        model.graph.input.append(
            onnx.helper.make_tensor_value_info("meta", onnx.TensorProto.FLOAT, ["batch", META_DIM])
        )
    model.doc_string = f"dermlens {__version__}: {DISCLAIMER}"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# ---- int8 ------------------------------------------------------------------------------------------------


def calibration_reader(images: np.ndarray, meta: np.ndarray, prep: Preprocessing, batch_size: int = 10):
    """An onnxruntime CalibrationDataReader over uint8 NxHxWx3 images (normalized like training).

    Every batch has the same size (a remainder is dropped): histogram calibrators stack batches.
    """
    from onnxruntime.quantization import CalibrationDataReader

    stop = len(images) - len(images) % batch_size if len(images) >= batch_size else len(images)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.start = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.start >= stop:
                return None
            s, self.start = self.start, min(self.start + batch_size, stop)
            return {"image": prep.normalize(np.asarray(images[s : self.start])), "meta": meta[s : self.start]}

        def rewind(self) -> None:
            self.start = 0

    return _Reader()


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    images: np.ndarray,
    meta: np.ndarray,
    prep: Preprocessing,
    cfg: dict[str, Any],
) -> Path:
    """Static int8 quantization (activations uint8, weights int8) calibrated on the given training images."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fmt = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[str(cfg.get("format", "qdq")).lower()]
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[str(cfg.get("calibrate_method", "minmax")).lower()]
    exclude = [str(e) for e in cfg.get("exclude") or []]  # op types, node names, or name prefixes ending in /
    with tempfile.TemporaryDirectory(prefix="dermlens-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        names = [n.name for n in graph.node if _excluded(n.name, n.op_type, exclude)]
        inputs = {i.name for i in graph.input}
        reader = calibration_reader(images, meta, prep)
        if "meta" not in inputs:
            reader = _DropMeta(reader)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer warns once per int64 shape tensor of the padding math
        try:
            quantize_static(
                str(pre),
                str(out_path),
                reader,
                quant_format=fmt,
                per_channel=bool(cfg.get("per_channel", True)),
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                nodes_to_exclude=names,
                extra_options={"CalibTensorRangeSymmetric": False, **(cfg.get("extra_options") or {})},
            )
        finally:
            root.setLevel(level)
    _restore_meta_input(Path(out_path), fp32_path)
    return Path(out_path)


def _excluded(name: str, op_type: str, patterns: list[str]) -> bool:
    """A node matches an op type (Gemm), its exact name, or a name prefix ending in '/' (/head/)."""
    return any(op_type == p or name == p or (p.endswith("/") and name.startswith(p)) for p in patterns)


def quantize_checked(
    fp32_path: Path,
    out_path: Path,
    calibration: tuple[np.ndarray, np.ndarray],
    val: SplitImages,
    prep: Preprocessing,
    cfg: dict[str, Any],
    fp32_bal_acc: float,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Quantize with cfg['exclude'], then with each cumulative cfg['fallbacks'] exclusion (more layers kept
    in fp32) until val balanced accuracy is within cfg['max_drop'] of fp32; keeps the first that is (else
    the closest). Returns the int8 val outputs and what was tried."""
    base = list(cfg.get("exclude") or [])
    candidates = [base]
    for extra in cfg.get("fallbacks") or []:
        candidates.append(candidates[-1] + list(extra))
    tried, best = [], None
    for exclude in candidates:
        quantize_int8(fp32_path, out_path, *calibration, prep, {**cfg, "exclude": exclude})
        outs = OnnxModel(out_path).run_images(val.images, prep, val.meta)
        bal = classification_metrics(outs["fine_logits"], val.labels, outs["fine_logits"].shape[1])["bal_acc"]
        tried.append({"exclude": exclude, "bal_acc": bal, "size_bytes": out_path.stat().st_size})
        log(f"int8 excluding {exclude}: val balanced accuracy {bal:.4f} (fp32 {fp32_bal_acc:.4f})")
        if best is None or abs(bal - fp32_bal_acc) < abs(best[1] - fp32_bal_acc):
            best = (exclude, bal, out_path.read_bytes(), outs)
        if abs(bal - fp32_bal_acc) <= float(cfg.get("max_drop", 0.01)):
            break
    assert best is not None
    if best[0] is not tried[-1]["exclude"]:  # an earlier candidate was closer: restore it
        out_path.write_bytes(best[2])
    return best[3], {"exclude": best[0], "tried": tried}


class _DropMeta:
    """Wraps a calibration reader for graphs whose optimizer removed the unused `meta` input."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = self.reader.get_next()
        return None if feed is None else {"image": feed["image"]}

    def rewind(self) -> None:
        self.reader.rewind()


def _restore_meta_input(path: Path, reference: str | Path) -> None:
    """Keep the `meta` input declared (as in the fp32 graph) if quantization dropped it."""
    import onnx

    model = onnx.load(str(path))
    if "meta" in {i.name for i in model.graph.input}:
        return
    ref = next(i for i in onnx.load(str(reference)).graph.input if i.name == "meta")
    model.graph.input.append(ref)
    onnx.save(model, str(path))


# ---- data -------------------------------------------------------------------------------------------------


@dataclass
class SplitImages:
    """One split of the prepared data: cached uint8 images, fine labels, encoded metadata."""

    images: np.ndarray
    labels: np.ndarray
    meta: np.ndarray
    image_ids: np.ndarray


def load_split(
    data_dir: str | Path,
    split: str,
    classes: tuple[str, ...],
    prep: Preprocessing,
    limit: int | None = None,
    seed: int = 0,
) -> SplitImages:
    """Rows of `split` with a known diagnosis, in manifest order (a seeded random subset if `limit`)."""
    from dermlens.data.cache import open_cache
    from dermlens.data.manifest import read_manifest

    df = read_manifest(data_dir)
    cache = open_cache(data_dir, prep)
    rows = np.flatnonzero((df["split"].to_numpy() == split) & (df["diagnosis"].to_numpy() != UNKNOWN))
    if len(rows) == 0:
        raise ExportError(f"the manifest in {data_dir} has no labelled {split!r} rows")
    if limit and len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, int(limit), replace=False))
    sub = df.iloc[rows]
    unknown = sorted(set(sub["diagnosis"]) - set(classes))
    if unknown:
        raise ExportError(
            f"{split} split has diagnoses {unknown} outside the model's classes {list(classes)}"
        )
    return SplitImages(
        images=np.asarray(cache[rows]),
        labels=np.array([classes.index(d) for d in sub["diagnosis"]], dtype=np.int64),
        meta=encode_rows(sub["age"].tolist(), sub["sex"].tolist(), sub["site"].tolist()),
        image_ids=sub["image_id"].astype(str).to_numpy(),
    )


# ---- measurements ----------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(fine_logits: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """Balanced accuracy, accuracy and macro one-vs-rest AUC of fine logits."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    p = softmax(fine_logits)
    return {
        "n": int(len(labels)),
        "bal_acc": float(balanced_accuracy_score(labels, p.argmax(1))),
        "accuracy": float((p.argmax(1) == labels).mean()),
        "macro_auc": float(
            roc_auc_score(labels, p, multi_class="ovr", average="macro", labels=list(range(n_classes)))
        ),
    }


@torch.no_grad()
def torch_outputs(
    net: DermNet, images: np.ndarray, meta: np.ndarray, prep: Preprocessing
) -> dict[str, np.ndarray]:
    """PyTorch eager fp32 outputs for uint8 NxHxWx3 images (the parity reference)."""
    x = torch.from_numpy(prep.normalize(images))
    m = torch.from_numpy(meta) if net.uses_metadata else None
    fine, coarse, emb, fmap = net.float().eval().forward_all(x, m)
    return {
        "fine_logits": fine.numpy(),
        "coarse_logits": coarse.numpy(),
        "embedding": emb.numpy(),
        "feature_map": fmap.numpy(),
    }


def view_logits(
    model: OnnxModel,
    images: np.ndarray,
    meta: np.ndarray,
    prep: Preprocessing,
    views: tuple[str, ...],
    identity: dict[str, np.ndarray],
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Fine and coarse logits [V, N, C] of the TTA views of uint8 images (identity outputs reused)."""
    from dermlens.trust.tta import tta_views

    outs = [
        identity if name == "identity" else model.run_images(v, prep, meta, batch_size)
        for name, v in zip(views, tta_views(images, views), strict=True)
    ]
    return np.stack([o["fine_logits"] for o in outs]), np.stack([o["coarse_logits"] for o in outs])


def fp16_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with floating tensors in fp16 (for model.pt)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- bundle ---------------------------------------------------------------------------------------------


def lineage(data_dirs: list[str | Path]) -> list[dict[str, Any]]:
    """What each prepared data set behind a model is: dataset, manifest and split hashes, split counts."""
    from dermlens.data.manifest import read_manifest, split_hash

    out = []
    for d in data_dirs:
        d = Path(d).expanduser()
        try:
            df = read_manifest(d)
            record = json.loads((d / "splits.json").read_text())
        except (OSError, ValueError) as e:
            out.append({"dir": str(d), "error": f"not readable here: {e}"})
            continue
        out.append(
            {
                "dir": str(d),
                "dataset": sorted(df["dataset"].astype(str).unique().tolist()),
                "split_method": record.get("method"),
                "seed": record.get("seed"),
                "manifest_hash": record.get("manifest_hash"),
                "split_hash": split_hash(df),
                "counts": record.get("counts"),
            }
        )
    return out


def export_bundle(
    checkpoint: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    loaded: LoadedModel | None = None,
    external: str | Path | None = None,
) -> dict[str, Any]:
    """Checkpoint (or an already `loaded` model, e.g. an ensemble) + prepared data -> bundle (model.onnx,
    model.int8.onnx, trust.npz, model.pt, card.json)."""
    import onnxruntime as ort

    from dermlens.model.ensemble import describe, is_ensemble
    from dermlens.trust.fit import fit_trust, trust_config

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
    fp32 = OnnxModel(out / ONNX_FP32)
    val_out = fp32.run_images(val.images, prep, val.meta, bs)
    log(f"scored {len(val.labels)} val images with the fp32 graph")

    n_par = min(int(cfg["parity"]["images"]), len(val.labels))
    ref = torch_outputs(net, val.images[:n_par], val.meta[:n_par], prep)
    parity = {
        "images": n_par,
        "max_abs_prob_diff": float(
            np.abs(softmax(ref["fine_logits"]) - softmax(val_out["fine_logits"][:n_par])).max()
        ),
        "max_abs_logit_diff": float(np.abs(ref["fine_logits"] - val_out["fine_logits"][:n_par]).max()),
    }
    log(f"fp32 parity vs PyTorch on {n_par} val images: max |dp| = {parity['max_abs_prob_diff']:.2e}")

    t = cfg["trust"]
    train = load_split(data_dir, "train", classes, prep, t.get("train_images"), int(t.get("seed", 0)))
    train_emb = fp32.run_images(train.images, prep, train.meta, bs)["embedding"]
    log(f"embedded {len(train.labels)} train images for the OOD statistics")
    views = tuple(trust_config().get("tta", {}).get("views") or ("identity",))
    fine_v, coarse_v = view_logits(fp32, val.images, val.meta, prep, views, val_out, bs)
    log(f"scored the {len(views)} TTA views of the val images")
    val_dict = {**val_out, "labels": val.labels, "fine_logits_views": fine_v, "coarse_logits_views": coarse_v}
    state = fit_trust(val_dict, train_emb, train.labels, cam_weight=net.cam_weight().detach().numpy())
    state.save(out / TRUST)
    log(
        f"fitted trust: T_fine={state.temperature_fine:.3f}, OOD {state.ood_method} threshold "
        f"{state.ood_threshold:.4g}, min_confidence {state.min_confidence:.3f}"
    )

    q = cfg["int8"]
    rng = np.random.default_rng(int(q.get("seed", 0)))
    pick = np.sort(
        rng.choice(len(train.labels), min(int(q["calibration_images"]), len(train.labels)), replace=False)
    )
    n = len(classes)
    m32 = classification_metrics(val_out["fine_logits"], val.labels, n)
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
    m8 = classification_metrics(int8_out["fine_logits"], val.labels, n)
    int8_scores = state.ood_score(int8_out["fine_logits"], int8_out["embedding"])
    m8 |= {
        "top1_agreement_with_fp32": float(
            (int8_out["fine_logits"].argmax(1) == val_out["fine_logits"].argmax(1)).mean()
        ),
        "max_abs_prob_diff_vs_fp32": float(
            np.abs(softmax(int8_out["fine_logits"]) - softmax(val_out["fine_logits"])).max()
        ),
        "ood_keep_rate": float((int8_scores <= state.ood_threshold).mean()),
    }
    m32["ood_keep_rate"] = state.val_keep_rate
    no_meta = np.repeat(missing_vector()[None], len(val.labels), axis=0)
    m8_nm = classification_metrics(
        OnnxModel(out / ONNX_INT8).run_images(val.images, prep, no_meta, bs)["fine_logits"], val.labels, n
    )
    log(f"val balanced accuracy with metadata withheld: int8 {m8_nm['bal_acc']:.4f}")
    m32["bal_acc_tta"] = classification_metrics(np.log(state.tta_probs(fine_v)), val.labels, n)["bal_acc"]
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
        tta=bool(trust_config().get("tta", {}).get("enabled", False)),
        extra={},
    )
    card_sections = state.card_sections()
    card.temperature, card.ood, card.refer = (
        card_sections["temperature"],
        card_sections["ood"],
        card_sections["refer"],
    )
    card.extra = {
        "tta_views": list(views),
        "default_precision": str(cfg.get("default_precision", "int8")),
        "malignant_classes": [c for c in classes if coarse_label(c) == "malignant"],
        "metrics": {"val": {"fp32": m32, "int8": m8, "int8_no_metadata": m8_nm}, "trust": state.info},
        "training": {"model": loaded.model_cfg, "checkpoint": loaded.source.name, **loaded.info},
        "lineage": {
            "evaluated_on": lineage([data_dir]),
            "extra_training_data": lineage(list(loaded.info.get("data", {}).get("extra_train") or [])),
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
            "files": {f: _sha256(out / f) for f in (ONNX_FP32, ONNX_INT8, TRUST, TORCH_WEIGHTS)},
        },
        "intended_use": str(cfg.get("intended_use", "")).strip(),
        "limitations": list(cfg.get("limitations") or []),
        "disclaimer": DISCLAIMER,
    }
    write_card(out, card)
    log(f"wrote {out / CARD}")
    if t.get("shift_fit", True):
        from dermlens.trust.refit import refit_bundle

        refit_bundle(out, data_dir, external or t.get("external_manifest"), log=log)
        card = read_card(out)
    return card.to_dict()
