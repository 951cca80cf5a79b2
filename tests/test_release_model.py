"""The shipped bundle itself: it verifies, and through the torch-free runtime it reaches the validation
accuracy recorded in its card, with and without metadata (catches a broken model or a preprocessing skew)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score
from typer.testing import CliRunner

from bundles import bundle_dir  # tests/bundles.py
from dermlens.bundle import BundleError, read_card, record_metrics, seal, verify_bundle
from dermlens.cli.main import app


def test_bundle_verifies_and_tampering_is_caught(tmp_path: Path) -> None:
    src = bundle_dir()
    lines = verify_bundle(src)
    assert any(line.startswith("runs: model.int8.onnx") for line in lines)
    copy = tmp_path / "bundle"
    shutil.copytree(src, copy)
    with (copy / "trust.npz").open("ab") as fh:
        fh.write(b"x")
    with pytest.raises(BundleError, match="does not match the sha256"):
        verify_bundle(copy)
    r = CliRunner().invoke(app, ["bundle", "verify", str(copy)])
    assert r.exit_code == 2 and "Traceback" not in r.output and "trust.npz" in r.output


def test_card_schema_is_checked(tmp_path: Path) -> None:
    import json

    from dermlens.bundle import CARD, SCHEMA_VERSION

    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir(), copy)
    card = json.loads((copy / CARD).read_text())
    assert any(line.startswith(f"schema {card.get('schema_version', 1)}") for line in verify_bundle(copy))
    (copy / CARD).write_text(json.dumps({**card, "schema_version": SCHEMA_VERSION + 1}))
    seal(copy)  # as its maker would: the card's hash matches, its schema is still refused
    with pytest.raises(BundleError, match="newer than this dermlens"):
        verify_bundle(copy)
    del card["lineage"]
    (copy / CARD).write_text(json.dumps({**card, "schema_version": 2}))
    seal(copy)
    with pytest.raises(BundleError, match="lacks lineage"):
        verify_bundle(copy)
    r = CliRunner().invoke(app, ["bundle", "info", str(bundle_dir())])
    assert r.exit_code == 0 and "card schema" in r.output


def test_card_records_lineage_and_refuses_foreign_metrics(tmp_path: Path) -> None:
    from dermlens.export.lineage import extra_sources

    card = read_card(bundle_dir())
    lineage = card.extra.get("lineage")
    if lineage is None:
        pytest.skip("bundle exported before lineage was recorded")
    assert all(len(e["split_hash"]) == 64 for e in lineage["evaluated_on"])
    # every extra source the model (each member of an ensemble) trained on is recorded with its hashes
    assert [e["dir"] for e in lineage["extra_training_data"]] == extra_sources(card.extra["training"])
    assert all(len(e["split_hash"]) == 64 for e in lineage["extra_training_data"])
    assert card.extra["metadata_encoding"]["dim"] == 15
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir(), copy)
    with pytest.raises(ValueError, match="results are for model"):
        record_metrics(copy, "x", {"model_version": "other", "overall": {"balanced_accuracy": {"value": 1}}})
    ok = record_metrics(copy, "x", {"model_version": card.version, "melanoma_auc": {"value": 0.7}})
    assert ok == {"melanoma_auc": 0.7}
    assert json.loads((copy / "card.json").read_text())["metrics"]["x"]["summary"] == ok


def test_card_states_the_weights_licence() -> None:
    """The weights carry the training data's non-commercial licence (export default); bundle info shows it."""
    from dermlens.config import packaged

    card = read_card(bundle_dir())
    assert card.extra.get("license") == packaged("export")["license"] == "CC-BY-NC-SA-4.0"
    assert set(card.extra["lineage"]["licences"]) <= {"ham10000", "isic2017", "isic2019", "pad_ufes20"}
    r = CliRunner().invoke(app, ["bundle", "info", str(bundle_dir())])
    assert r.exit_code == 0 and "weights CC-BY-NC-SA-4.0" in r.output


@pytest.mark.release
@pytest.mark.parametrize("metadata", [True, False], ids=["with_metadata", "no_metadata"])
def test_runtime_reaches_recorded_val_accuracy(ham_manifest, metadata: bool) -> None:
    from dermlens.evaluate.sources import predict_rows
    from dermlens.infer.predictor import Predictor

    card = read_card(bundle_dir())
    predictor = Predictor.load(bundle_dir())  # int8, or fp32 on an x86 CPU without VNNI
    precision = predictor.precision if metadata else "int8"  # no-metadata val is recorded for int8 only
    recorded = card.extra["metrics"]["val"].get(precision if metadata else "int8_no_metadata")
    if recorded is None:
        pytest.skip("bundle exported before no-metadata validation was recorded")
    val = ham_manifest[ham_manifest["split"] == "val"]
    probs = predict_rows(predictor, val, 64, use_metadata=metadata)["probs"]
    truth = np.array([card.classes.index(d) for d in val["diagnosis"]])
    bal_acc = balanced_accuracy_score(truth, probs.argmax(1))
    if precision == predictor.precision:
        assert abs(bal_acc - recorded["bal_acc"]) < 0.01, (bal_acc, recorded["bal_acc"])
    else:  # fp32 here against the int8 figure: no loss (saturated int8 lost 6 points on such a CPU)
        assert bal_acc > recorded["bal_acc"] - 0.01, (bal_acc, recorded["bal_acc"])


def test_int8_is_the_default_only_where_it_is_exact(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dermlens import settings
    from dermlens.infer.predictor import Predictor

    flags = {"cpu": "x", "cores": 2, "native_bf16": False, "avx512": False, "x86": True}
    monkeypatch.setattr(settings, "machine", lambda: {**flags, "int8_vnni": False})
    chosen = Predictor.load(bundle_dir())
    assert chosen.precision == "fp32" and "VNNI" in chosen.precision_note  # AVX2 only: u8s8 int8 saturates
    int8_only = tmp_path / "bundle"
    shutil.copytree(bundle_dir(), int8_only, ignore=shutil.ignore_patterns("model.pt", "model.onnx"))
    assert Predictor.load(int8_only).precision == "int8"  # no fp32 graph to fall back to
    assert Predictor.load(bundle_dir(), precision="int8").precision == "int8"  # asked for: honoured
    monkeypatch.setattr(settings, "machine", lambda: {**flags, "int8_vnni": True})
    assert Predictor.load(bundle_dir()).precision == "int8"


def test_record_lineage_names_a_missing_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bundle record-lineage` where the extra training data is not prepared: one line, card unchanged."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir(), copy)
    before = (copy / "card.json").read_bytes()
    monkeypatch.chdir(tmp_path)  # the card's sources are relative (work/isic2017): absent here
    r = CliRunner().invoke(app, ["bundle", "record-lineage", "--bundle", str(copy)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "work/isic2017" in r.output and "not readable here" in r.output
    assert (copy / "card.json").read_bytes() == before
