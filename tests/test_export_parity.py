"""ONNX export: PyTorch parity on real val images, int8 accuracy, the bundle contract, end-to-end export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bundles import bundle_dir  # tests/bundles.py
from dermlens.bundle import CARD, ONNX_FP32, ONNX_INT8, TORCH_WEIGHTS, TRUST, read_card
from dermlens.data.taxonomy import HAM_CLASSES
from dermlens.export.checkpoint import load_checkpoint
from dermlens.export.graph import SamePadConv, export_onnx, torch_outputs
from dermlens.infer.calibration import softmax
from dermlens.infer.session import OUTPUTS, OnnxModel
from dermlens.metadata import META_DIM, encode_rows
from dermlens.metrics import classification_metrics
from dermlens.preprocess import Preprocessing, load_rgb

# Every bundle file stays under GitHub's 50 MB warning size (the packaged bundle is committed); the
# two-member release ensemble's fp32 graph is 31.3 MiB.
MAX_FILE_BYTES = 48 * 1024 * 1024


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def val_split(ham_manifest: pd.DataFrame) -> dict[str, np.ndarray]:
    """The whole validation split (~1,500 images), decoded from the JPEGs at the model size, shuffled."""
    prep = read_card(bundle_dir()).preprocessing
    rows = ham_manifest[ham_manifest["split"] == "val"].sample(frac=1.0, random_state=0)
    return {
        "images": np.stack([prep.resize(load_rgb(p)) for p in rows["image_path"]]),
        "labels": np.array([HAM_CLASSES.index(d) for d in rows["diagnosis"]]),
        "meta": encode_rows(rows["age"].tolist(), rows["sex"].tolist(), rows["site"].tolist()),
        "originals": rows["image_path"].to_numpy(),
    }


@pytest.fixture(scope="module")
def reexported(tmp_path_factory: pytest.TempPathFactory):
    """The bundle's model.pt loaded into PyTorch and exported again with the export code under test."""
    loaded = load_checkpoint(bundle_dir() / TORCH_WEIGHTS)
    path = export_onnx(loaded.net, tmp_path_factory.mktemp("onnx") / "model.onnx", loaded.prep)
    return loaded, OnnxModel(path, threads=1)


@pytest.mark.parametrize("size", [(150, 200), (75, 101), (224, 224)])
def test_same_pad_conv_matches_timm(size: tuple[int, int]) -> None:
    from timm.layers.conv2d_same import Conv2dSame

    for k in (3, 5):
        conv = Conv2dSame(4, 6, k, stride=2, groups=2)
        x = torch.randn(2, 4, *size)
        torch.testing.assert_close(SamePadConv(conv)(x), conv(x), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_fp32_parity_with_pytorch(reexported, val_split) -> None:
    loaded, onnx = reexported
    imgs, meta = val_split["images"][:48], val_split["meta"][:48]
    ref = torch_outputs(loaded.net, imgs, meta, loaded.prep)
    got = onnx.run_images(imgs, loaded.prep, meta, batch_size=16, feature_map=True)
    assert np.abs(softmax(ref["fine_logits"]) - softmax(got["fine_logits"])).max() <= 1e-4
    assert np.abs(softmax(ref["coarse_logits"]) - softmax(got["coarse_logits"])).max() <= 1e-4
    np.testing.assert_allclose(got["embedding"], ref["embedding"], atol=1e-3)
    np.testing.assert_allclose(got["feature_map"], ref["feature_map"], atol=1e-3)
    single = onnx.run_images(imgs[:1], loaded.prep, meta[:1], batch_size=1)  # dynamic batch
    np.testing.assert_allclose(single["fine_logits"], got["fine_logits"][:1], atol=1e-4)


@pytest.mark.slow
def test_dynamic_height_width(reexported, val_split) -> None:
    """Another input size (odd dimensions change TF 'same' padding) still matches PyTorch."""
    loaded, onnx = reexported
    prep = Preprocessing.from_dict({**loaded.prep.to_dict(), "height": 225, "width": 301})
    imgs = np.stack([prep.resize(load_rgb(p)) for p in val_split["originals"][:8]])
    ref = torch_outputs(loaded.net, imgs, val_split["meta"][:8], prep)
    got = onnx.run_images(imgs, prep, val_split["meta"][:8], feature_map=True)
    assert np.abs(softmax(ref["fine_logits"]) - softmax(got["fine_logits"])).max() <= 1e-4
    assert got["feature_map"].shape == ref["feature_map"].shape == (8, ref["feature_map"].shape[1], 8, 10)


@pytest.mark.release
def test_int8_balanced_accuracy_within_one_point(val_split) -> None:
    """On the whole validation split: |bal_acc(int8) - bal_acc(fp32)| <= 0.01 (one point)."""
    from dermlens.infer.session import int8_exact

    if not int8_exact():
        pytest.skip("x86 CPU without VNNI: int8 saturates here, so the runtime serves fp32")
    prep = read_card(bundle_dir()).preprocessing
    imgs, meta, labels = val_split["images"], val_split["meta"], val_split["labels"]
    bal = {
        name: classification_metrics(
            softmax(OnnxModel(bundle_dir() / name, threads=2).run_images(imgs, prep, meta)["fine_logits"]),
            labels,
            len(HAM_CLASSES),
        )["bal_acc"]
        for name in (ONNX_FP32, ONNX_INT8)
    }
    print(f"val n={len(labels)}: balanced accuracy fp32 {bal[ONNX_FP32]:.4f}, int8 {bal[ONNX_INT8]:.4f}")
    assert abs(bal[ONNX_INT8] - bal[ONNX_FP32]) <= 0.01


def test_bundle_contract() -> None:
    """Files, sizes, ONNX I/O and the card fields inference needs; export measurements recorded."""
    import onnx

    b = bundle_dir()
    for name in (CARD, ONNX_FP32, ONNX_INT8, TRUST, TORCH_WEIGHTS):
        assert (b / name).is_file(), name
        assert (b / name).stat().st_size <= MAX_FILE_BYTES, f"{name} is over 48 MiB"
    for name in (ONNX_FP32, ONNX_INT8):
        graph = onnx.load(str(b / name)).graph
        assert [i.name for i in graph.input] == ["image", "meta"]
        assert [o.name for o in graph.output] == list(OUTPUTS)
        dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch", 3, "height", "width"]
        assert graph.input[1].type.tensor_type.shape.dim[1].dim_value == META_DIM
    card = json.loads((b / CARD).read_text())
    for key in ("classes", "preprocessing", "version", "uses_metadata", "temperature", "ood", "refer", "tta"):
        assert key in card
    assert card["ood"]["method"] and np.isfinite(card["ood"]["threshold"])
    assert 0 <= card["refer"]["min_confidence"] <= 1
    val = card["metrics"]["val"]
    assert val["fp32"]["n"] == val["int8"]["n"] >= 1000  # the full validation split
    assert abs(val["int8"]["bal_acc"] - val["fp32"]["bal_acc"]) <= 0.01
    assert card["export"]["parity_fp32_vs_torch"]["max_abs_prob_diff"] <= 1e-4


def _fake_training_checkpoint(path: Path, metadata: bool) -> Path:
    """A checkpoint shaped like `dermlens train`'s (Lightning state_dict under `net.` + hyper_parameters)."""
    from dermlens.model.network import build_network

    cfg = {
        "model": {
            "arch": "tf_efficientnet_lite0",
            "init": "imagenet",
            "metadata": metadata,
            "meta_hidden": 32,
            "dropout": 0.2,
            "drop_path": 0.0,
        },
        "seed": 0,
    }
    torch.manual_seed(0)
    net = build_network(cfg["model"], len(HAM_CLASSES))
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "epoch": 1,
            "global_step": 5,
            "hyper_parameters": {
                "cfg": cfg,
                "classes": list(HAM_CLASSES),
                "counts": [1] * 7,
                "prep": Preprocessing.default().to_dict(),
            },
        },
        path,
    )
    return path


@pytest.mark.slow
def test_export_command_end_to_end(ham_small_prepared: Path, tmp_path: Path) -> None:
    """`dermlens bundle export --checkpoint` -> a complete bundle the torch-free Predictor loads and uses."""
    from typer.testing import CliRunner

    from dermlens.cli.main import app
    from dermlens.infer.predictor import Predictor

    ckpt = _fake_training_checkpoint(tmp_path / "best.ckpt", metadata=False)
    cfg = tmp_path / "small.yaml"
    cfg.write_text(  # max_drop -1: no candidate is accepted, so both are tried and the closer is kept
        "int8: {calibration_images: 32, max_drop: -1, fallbacks: [['/conv_stem/', '/bn1/']]}\n"
        "parity: {images: 16}\n"
    )
    out = tmp_path / "bundle"
    res = CliRunner().invoke(
        app,
        [
            "export",
            "--checkpoint",
            str(ckpt),
            "--manifest",
            str(ham_small_prepared),
            "--out",
            str(out),
            "--config",
            str(cfg),
            "--threads",
            "1",
        ],
    )
    assert res.exit_code == 0, res.output
    card = read_card(out)
    assert card.classes == HAM_CLASSES and card.uses_metadata is False
    assert card.extra["export"]["parity_fp32_vs_torch"]["max_abs_prob_diff"] <= 1e-4
    q = card.extra["export"]["int8"]
    assert q["calibration_images"] == 32 and [t["exclude"] for t in q["tried"]] == [
        ["/head/"],
        ["/head/", "/conv_stem/", "/bn1/"],
    ]
    val = card.extra["metrics"]["val"]
    closest = min(q["tried"], key=lambda t: abs(t["bal_acc"] - val["fp32"]["bal_acc"]))
    assert q["exclude"] == closest["exclude"] and val["int8"]["bal_acc"] == pytest.approx(closest["bal_acc"])
    assert card.temperature["fine"] > 0 and "threshold" in card.ood
    assert card.extra["training"]["selection"] == {"monitor": None, "select": "mean", "val_sets": ["val"]}
    from dermlens.monitor.reference import Reference

    ref = Reference.load(out)  # the drift-monitoring baseline: the bundle's outputs on val
    assert ref.model_version == card.version and ref.n == ref.source["n"] > 0
    state = torch.load(out / TORCH_WEIGHTS, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    again = load_checkpoint(out / TORCH_WEIGHTS)  # re-export source: the bundle's own model.pt
    assert again.classes == HAM_CLASSES and not again.net.uses_metadata
    img = next((ham_small_prepared.parent / "root" / "images").glob("*.jpg"))
    for precision in ("fp32", "int8"):
        res1 = Predictor.load(out, precision=precision, threads=1).predict_file(img, cam=True)
        assert res1.top_class in HAM_CLASSES and res1.cam_png
    bad = CliRunner().invoke(app, ["bundle", "export", "--run", str(tmp_path), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "best.ckpt" in bad.output
