"""Training -> export -> runtime: a checkpoint `dermlens train` really wrote exports to a bundle whose
torch-free graph gives the trained module's own outputs, with trust fitted on the served precision; and
training's normalisation equals the runtime's on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dermlens.bundle import release_dir
from dermlens.preprocess import Preprocessing, load_rgb


def run_cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from dermlens.cli.main import app

    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output


def test_training_normalisation_equals_the_runtime(ham_root: Path) -> None:
    """TorchNormalize (what DermModule feeds the network) == Preprocessing.normalize (what the runtime
    feeds ONNX) on real HAM images, for the default and the packaged model's preprocessing."""
    from dermlens.bundle import read_card
    from dermlens.train.augment import TorchNormalize, to_chw

    paths = sorted((ham_root / "images").glob("*.jpg"))[:6]
    for prep in (Preprocessing.default(), read_card(release_dir()).preprocessing):
        batch = np.stack([prep.resize(load_rgb(p)) for p in paths])
        runtime = prep.normalize(batch)
        with torch.no_grad():
            train = TorchNormalize(prep)(torch.stack([to_chw(im) for im in batch])).numpy()
        assert train.shape == runtime.shape and train.dtype == runtime.dtype == np.float32
        assert np.abs(train - runtime).max() <= 1e-6
        assert runtime.std() > 0.1  # real pixels, not a constant image


@pytest.mark.slow
def test_export_of_a_checkpoint_train_wrote(tiny_dir: Path, tmp_path: Path) -> None:
    """`dermlens train` (1 epoch, 2 batches) -> `dermlens bundle export --run` -> Predictor: fp32 ONNX outputs
    equal the trained module's (its own normalisation and EMA weights) on val images; trust fitted on int8."""
    from dermlens.bundle import read_card
    from dermlens.data.cache import open_cache
    from dermlens.data.manifest import read_manifest
    from dermlens.infer.predictor import Predictor
    from dermlens.infer.session import OnnxModel, default_precision
    from dermlens.metadata import encode_rows
    from dermlens.train.module import DermModule

    run = tmp_path / "run"
    code, out = run_cli(
        "train",
        f"data.dir={tiny_dir}",
        f"trainer.run_dir={run}",
        "preprocess.height=64",
        "preprocess.width=80",
        "data.batch_size=16",
        "trainer.threads=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.patience=0",
        "augment.color_jitter=0",
        "model.metadata=true",
    )
    assert code == 0, out
    cfg = tmp_path / "fast.yaml"
    cfg.write_text(
        "int8: {calibration_images: 32, fallbacks: []}\ntrust: {train_images: 96, shift_fit: false}\n"
        "parity: {images: 8}\n"
    )
    bundle = tmp_path / "bundle"
    code, out = run_cli(
        "export", "--run", str(run), "--manifest", str(tiny_dir), "--out", str(bundle), "-c", str(cfg)
    )
    assert code == 0, out

    module = DermModule.load_from_checkpoint(run / "checkpoints" / "best.ckpt", map_location="cpu")
    module.eval()
    card = read_card(bundle)
    assert card.preprocessing.to_dict() == module.hparams["prep"]  # the runtime reads what training used
    from dermlens.bundle import SCHEMA_VERSION, verify_bundle

    assert card.schema_version == SCHEMA_VERSION and f"schema {SCHEMA_VERSION}" in verify_bundle(bundle)
    assert card.extra["license"] == "CC-BY-NC-SA-4.0"  # configs/export.yaml's default for the weights
    df = read_manifest(tiny_dir)
    rows = np.flatnonzero(df["split"].to_numpy() == "val")[:12]
    images = np.asarray(open_cache(tiny_dir, card.preprocessing)[rows])
    meta = encode_rows(*(df.iloc[rows][c].tolist() for c in ("age", "sex", "site")))
    with torch.no_grad():
        x = module.prepare(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
        ref = module.eval_net()(x, torch.from_numpy(meta))[0].numpy()
    onnx = OnnxModel(bundle / "model.onnx").run_images(images, card.preprocessing, meta)["fine_logits"]
    assert np.abs(onnx - ref).max() <= 1e-3  # a normalisation or format skew moves logits by far more

    trust_info = card.extra["metrics"]["trust"]
    assert card.extra["default_precision"] == "int8"  # trust: fitted on what this CPU serves (fp32 w/o VNNI)
    assert trust_info["precision"] == default_precision("int8")
    served = card.extra["metrics"]["val"][trust_info["precision"]]
    assert served["ood_keep_rate"] == pytest.approx(card.ood["val_keep_rate"])  # fitted on what is served
    pred = Predictor.load(bundle, threads=1)
    r = pred.predict_arrays(images, prepared=True)
    assert r["probs"].shape == (len(rows), len(card.classes)) and np.allclose(r["probs"].sum(1), 1.0)


class _NotWeights:
    """An object only the unsafe unpickler would rebuild."""


def test_export_refuses_a_file_that_needs_code(tmp_path: Path) -> None:
    from dermlens.export.checkpoint import ExportError, load_checkpoint

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _NotWeights()}, path)
    with pytest.raises(ExportError, match="safe loader") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
