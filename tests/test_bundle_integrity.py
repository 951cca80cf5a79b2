"""Tamper-evident model bundles: every edit of a copy of the shipped bundle (card, graphs, the manifest
itself) is refused in one line by `dermlens bundle verify`, `dermlens predict` and `Predictor.load`, and
the untouched copy still verifies, loads and predicts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bundles import bundle_dir  # tests/bundles.py
from dermlens.bundle import CARD, MANIFEST, ONNX_INT8, BundleError, seal, verify_bundle
from dermlens.cli.main import app
from dermlens.infer.predictor import Predictor
from dermlens.preprocess import load_rgb

Tamper = Callable[[Path], None]


def _copy(tmp_path: Path) -> Path:
    """A plain copy of the shipped bundle (files, no symlinks)."""
    out = tmp_path / "bundle"
    shutil.copytree(bundle_dir(), out, symlinks=False)
    return out


def _edit_card(bundle: Path, change: Callable[[dict], None]) -> None:
    card = json.loads((bundle / CARD).read_text())
    change(card)
    (bundle / CARD).write_text(json.dumps(card, indent=2) + "\n")


def _swap(key: str) -> Tamper:
    def tamper(bundle: Path) -> None:
        def change(card: dict) -> None:
            card[key][0], card[key][1] = card[key][1], card[key][0]

        _edit_card(bundle, change)

    return tamper


def _mean_std(bundle: Path) -> None:
    def change(card: dict) -> None:
        card["preprocessing"]["mean"] = [0.485, 0.456, 0.406]
        card["preprocessing"]["std"] = [0.229, 0.224, 0.225]

    _edit_card(bundle, change)


def _no_manifest(bundle: Path) -> None:
    (bundle / MANIFEST).unlink()


def _outside_path(bundle: Path) -> None:
    with (bundle / MANIFEST).open("a") as fh:
        fh.write(f"{'0' * 64}  ../../etc/hostname\n")


def _corrupt_onnx(bundle: Path) -> None:
    data = bytearray((bundle / ONNX_INT8).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    (bundle / ONNX_INT8).write_bytes(bytes(data))


def _onnx_symlink(bundle: Path) -> None:
    for name in ("model.onnx", ONNX_INT8):
        (bundle / name).unlink()
        os.symlink("/etc/passwd", bundle / name)


def _card_text(text: str) -> Tamper:
    def tamper(bundle: Path) -> None:
        (bundle / CARD).write_text(text)

    return tamper


TAMPERS: dict[str, Tamper] = {
    "swap_classes": _swap("classes"),
    "swap_coarse_classes": _swap("coarse_classes"),
    "edit_mean_std": _mean_std,
    "delete_hash_list": _no_manifest,
    "hash_list_names_outside_file": _outside_path,
    "corrupt_onnx": _corrupt_onnx,
    "onnx_symlink_to_etc_passwd": _onnx_symlink,
    "card_null": _card_text("null"),
    "card_list": _card_text("[]"),
    "card_deeply_nested": _card_text("[" * 200_000 + "]" * 200_000),
}


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _refused_everywhere(bundle: Path, image: Path) -> str:
    """verify and predict exit 2 with one `error:` line, no traceback; Predictor.load raises BundleError."""
    runner = CliRunner()
    verify = runner.invoke(app, ["bundle", "verify", str(bundle)])
    assert verify.exit_code == 2 and "Traceback" not in verify.output, verify.output
    assert len(_error_lines(verify.output)) == 1 and "bundle verified" not in verify.output, verify.output
    predict = runner.invoke(app, ["predict", "--model", str(bundle), str(image)])
    assert predict.exit_code == 2 and "Traceback" not in predict.output, predict.output
    assert len(_error_lines(predict.output)) == 1, predict.output
    with pytest.raises(BundleError) as err:
        Predictor.load(bundle)
    assert "\n" not in str(err.value)
    return _error_lines(verify.output)[0]


@pytest.fixture(scope="module")
def image(ham_root: Path) -> Path:
    return next(iter(sorted((ham_root / "images").glob("*.jpg"))))


def test_untouched_copy_verifies_loads_and_predicts(tmp_path: Path, image: Path) -> None:
    bundle = _copy(tmp_path)
    r = CliRunner().invoke(app, ["bundle", "verify", str(bundle)])
    assert r.exit_code == 0 and "bundle verified" in r.output and "hash ok: card.json" in r.output, r.output
    digest = next(line.split(": ", 1)[1] for line in r.output.splitlines() if "bundle digest" in line)
    assert CliRunner().invoke(app, ["bundle", "verify", str(bundle), "--expect", digest]).exit_code == 0
    wrong = CliRunner().invoke(app, ["bundle", "verify", str(bundle), "--expect", "sha256:" + "0" * 64])
    assert wrong.exit_code == 2 and len(_error_lines(wrong.output)) == 1, wrong.output
    assert Predictor.load(bundle).predict_arrays([load_rgb(image)])["probs"].shape == (1, 7)
    p = CliRunner().invoke(app, ["predict", "--model", str(bundle), str(image)])
    assert p.exit_code == 0 and f"{image}:" in p.output, p.output


@pytest.mark.parametrize("name", list(TAMPERS))
def test_tampered_bundle_is_refused_in_one_line(tmp_path: Path, image: Path, name: str) -> None:
    bundle = _copy(tmp_path)
    TAMPERS[name](bundle)
    line = _refused_everywhere(bundle, image)
    if name == "delete_hash_list":
        assert f"dermlens bundle seal {bundle}" in line
    if name == "hash_list_names_outside_file":
        assert "../../etc/hostname" in line
    if name == "onnx_symlink_to_etc_passwd":
        assert "symlink" in line and "outside the bundle" in line


@pytest.mark.parametrize("name", ["swap_classes", "onnx_symlink_to_etc_passwd", "card_deeply_nested"])
def test_server_refuses_to_start_in_one_line(tmp_path: Path, name: str) -> None:
    bundle = _copy(tmp_path)
    TAMPERS[name](bundle)
    cmd = [sys.executable, "-m", "dermlens.cli.main", "serve", "--model", str(bundle), "--port", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(_error_lines(r.stderr)) == 1 and "Uvicorn running" not in r.stderr, r.stderr


@pytest.mark.parametrize("text", ["null", "[]", "[" * 200_000 + "]" * 200_000, '{"name": 1}'])
def test_seal_refuses_a_card_that_is_not_one(tmp_path: Path, text: str) -> None:
    bundle = _copy(tmp_path)
    (bundle / CARD).write_text(text)
    r = CliRunner().invoke(app, ["bundle", "seal", str(bundle)])
    assert r.exit_code == 2 and "Traceback" not in r.output and len(_error_lines(r.output)) == 1, r.output


def test_sealed_but_broken_graphs_are_refused_by_load_and_verify_alike(tmp_path: Path, image: Path) -> None:
    """Sealing vouches for bytes, not for a graph: load runs the same graph check as verify."""
    bundle = _copy(tmp_path)
    _edit_card(bundle, lambda card: card.update(classes=card["classes"][:-1]))  # 6 classes, 7 outputs
    seal(bundle)
    assert "output shapes do not match" in _refused_everywhere(bundle, image)
    bundle = _copy(tmp_path / "corrupt")
    for name in ("model.onnx", ONNX_INT8):
        (bundle / name).write_bytes(b"not an onnx graph")
    seal(bundle)
    assert "not a usable ONNX graph" in _refused_everywhere(bundle, image)


def test_card_hash_list_is_folded_into_the_manifest(tmp_path: Path) -> None:
    """A bundle sealed the old way (hashes in card.export.files, no manifest) is refused until sealed; seal
    checks the old hashes, drops them from the card and lists every file, card included."""
    bundle = _copy(tmp_path)
    (bundle / MANIFEST).unlink()
    _edit_card(bundle, lambda card: card["export"].update(files={"trust.npz": "0" * 64}))
    with pytest.raises(BundleError, match="bundle seal"):
        verify_bundle(bundle)
    with pytest.raises(BundleError, match="recorded in the card: not sealing"):
        seal(bundle)
    _edit_card(bundle, lambda card: card["export"].pop("files"))
    seal(bundle)
    assert "files" not in json.loads((bundle / CARD).read_text())["export"]
    listed = [line.split()[1] for line in (bundle / MANIFEST).read_text().splitlines()]
    assert CARD in listed and "trust.npz" in listed
    assert any(line == "hash ok: card.json" for line in verify_bundle(bundle))


def test_writers_reseal_and_unlisted_files_are_refused(tmp_path: Path) -> None:
    """Monitor reference and metrics writers keep the bundle valid; a file dropped in is refused."""
    from dermlens.bundle import read_card, record_metrics
    from dermlens.monitor.reference import Reference

    bundle = _copy(tmp_path)
    Reference.load(bundle).save(bundle)
    record_metrics(bundle, "x", {"model_version": read_card(bundle).version, "melanoma_auc": {"value": 0.7}})
    assert verify_bundle(bundle)[-1].startswith("runs:")
    (bundle / "model.onnx").rename(bundle / "evil.onnx")
    with pytest.raises(BundleError, match="evil.onnx is not listed"):
        verify_bundle(bundle)
    with pytest.raises(BundleError, match="evil.onnx is not listed"):
        record_metrics(bundle, "y", {"model_version": "v", "melanoma_auc": {"value": 0.7}})
