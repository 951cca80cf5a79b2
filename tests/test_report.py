"""`dermlens evaluate` end to end on HAM10000 labels and images: metrics.json and a self-contained report."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from dermlens import DISCLAIMER
from dermlens.cli.evaluate import evaluate
from dermlens.data.taxonomy import HAM_CLASSES
from dermlens.evaluate import EvaluateConfig, evaluate_arrays
from dermlens.evaluate.isic_csv import one_hot, write_dermlens_csv, write_isic_csv
from dermlens.evaluate.report import (
    GalleryItem,
    ReportInputs,
    read_training_log,
    render_html,
    worst_misclassifications,
)
from dermlens.settings import data_root

SECTIONS = (
    "disclaimer",
    "summary",
    "per-class",
    "confusion",
    "roc-pr",
    "calibration",
    "risk-coverage",
    "imbalance",
    "training",
    "gallery",
    "isic",
    "methods",
)


@pytest.fixture(scope="module")
def ham_run(tmp_path_factory):
    """Real HAM10000 labels, lesions and image paths; seeded Dirichlet predictions; a Lightning-style log."""
    d = tmp_path_factory.mktemp("ham_run")
    root = data_root() / "ham10000"
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    lesions = np.random.default_rng(0).permutation(meta["lesion_id"].unique())
    meta["split"] = np.where(meta["lesion_id"].isin(set(lesions[:300])), "test", "train")
    test = meta[meta["split"] == "test"]
    y = np.array([HAM_CLASSES.index(c) for c in test["dx"]])
    logits = np.log(np.random.default_rng(1).gamma(1.0 + 3.0 * np.eye(7)[y]))
    uncal = np.exp(2.0 * logits)
    uncal /= uncal.sum(axis=1, keepdims=True)
    cal = np.exp(logits)
    cal /= cal.sum(axis=1, keepdims=True)
    ids = test["image_id"].tolist()
    write_isic_csv(d / "truth.csv", ids, one_hot(ids, test["dx"].tolist()).values, HAM_CLASSES, style="2018")
    write_isic_csv(d / "pred.csv", ids, cal, HAM_CLASSES, style="2018")
    write_dermlens_csv(d / "uncal.csv", ids, uncal, HAM_CLASSES)
    pd.DataFrame(
        {
            "image_id": meta["image_id"],
            "image_path": [str(root / "images" / f"{i}.jpg") for i in meta["image_id"]],
            "lesion_id": meta["lesion_id"],
            "group_id": meta["lesion_id"],
            "diagnosis": meta["dx"],
            "split": meta["split"],
        }
    ).to_csv(d / "manifest.csv", index=False)
    rows = []
    for epoch in range(5):
        rows += [
            {"epoch": epoch, "step": 3 * epoch + k, "train_loss_step": 1.0 / (epoch + 1)} for k in range(3)
        ]
        rows.append(
            {"epoch": epoch, "step": 3 * epoch + 2, "val_loss": 1.2 / (epoch + 1), "val_bal_acc": 0.5}
        )
    pd.DataFrame(rows).to_csv(d / "metrics.csv", index=False)
    return d, test, y, cal


def _run(args: list[str]):
    app = typer.Typer()
    app.command()(evaluate)
    return CliRunner().invoke(app, args)


def test_cli_writes_self_contained_report(ham_run):
    d, test, y, cal = ham_run
    out = d / "out"
    res = _run([
        "--predictions", str(d / "pred.csv"), "--truth", str(d / "truth.csv"),
        "--groups", str(d / "manifest.csv"), "--uncalibrated", str(d / "uncal.csv"),
        "--training-log", str(d / "metrics.csv"), "--out", str(out), "--n-bootstrap", "200",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "Balanced accuracy" in res.output and "dermatologist" in res.output

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert metrics["classes"] == list(HAM_CLASSES)
    assert metrics["n_images"] == len(test) and metrics["n_lesions"] == test["lesion_id"].nunique() == 300
    assert metrics["bootstrap"] == {**metrics["bootstrap"], "n_resamples": 200, "unit": "lesion"}
    assert metrics["disclaimer"] == DISCLAIMER
    ba = metrics["overall"]["balanced_accuracy"]
    assert ba["ci_low"] <= ba["value"] <= ba["ci_high"]
    assert {"ece_uncalibrated", "brier_uncalibrated", "mel_sens_at_spec_95"} <= set(metrics["overall"])
    assert metrics["overall"]["ece_uncalibrated"]["value"] != metrics["overall"]["ece"]["value"]
    assert sum(map(sum, metrics["confusion_matrix"]["counts"])) == len(test)

    page = (out / "report.html").read_text()
    assert re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) is None  # nothing fetched
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    for sid in SECTIONS:
        assert f'id="{sid}"' in page, sid
    assert page.count(DISCLAIMER) >= 2
    assert page.index(DISCLAIMER) < page.index('id="summary"')  # the disclaimer comes first
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pngs) == 6 + 12  # six figures + twelve gallery thumbnails (gallery_size)
    for b64 in pngs:
        Image.open(io.BytesIO(base64.b64decode(b64))).verify()
    assert "Before: the model's raw softmax" in page  # two-panel reliability diagram
    assert "No training log" not in page and "were not given" not in page and "No gallery" not in page


def test_report_without_optional_inputs_says_so(ham_run):
    _, _, y, cal = ham_run
    result = evaluate_arrays(cal, y, HAM_CLASSES, config=EvaluateConfig.load(n_resamples=50))
    assert result["bootstrap"]["unit"] == "image" and result["n_lesions"] == len(y)
    page = render_html(result, ReportInputs(cal, y, HAM_CLASSES))
    for sid in SECTIONS:
        assert f'id="{sid}"' in page
    assert "No training log" in page and "were not given" in page and "No gallery" in page


def test_gallery_shows_cam_overlay_next_to_image(ham_run):
    d, test, y, cal = ham_run
    paths = [str(data_root() / "ham10000" / "images" / f"{i}.jpg") for i in test["image_id"]]
    items = worst_misclassifications(cal, y, HAM_CLASSES, test["image_id"].tolist(), paths, 3)
    conf = [it.confidence for it in items]
    assert len(items) == 3 and conf == sorted(conf, reverse=True)
    assert all(it.true != it.predicted for it in items)
    wrong = cal.argmax(axis=1) != y
    assert conf[0] == pytest.approx(cal[wrong].max(axis=1).max())
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (255, 0, 0)).save(buf, format="PNG")
    cam = GalleryItem(
        items[0].image_path, items[0].true, items[0].predicted, items[0].confidence, buf.getvalue(), "X1"
    )
    result = evaluate_arrays(cal, y, HAM_CLASSES, config=EvaluateConfig.load(n_resamples=20))
    page = render_html(result, ReportInputs(cal, y, HAM_CLASSES, gallery=[cam, *items[1:]]))
    gallery = page[page.index('id="gallery"') : page.index('id="isic"')]
    assert 'alt="explanation overlay X1"' in gallery and gallery.count("<img") == 4
    assert gallery.count("no explanation overlay") == 2


def test_training_log_is_tolerant(tmp_path):
    p = tmp_path / "metrics.csv"
    p.write_text("step,train_loss\n0,1.0\n1,0.8\n")
    log = read_training_log(p)
    assert log.index.name == "step" and log["train_loss"].tolist() == [1.0, 0.8]
    p.write_text(
        "epoch,step,val_bal_acc,val_loss,train_loss\n0,5,0.5,,\n0,5,,1.1,\n0,5,,,1.3\n1,9,0.6,0.9,1.0\n"
    )
    log = read_training_log(p)
    assert log.index.name == "epoch" and log.columns.tolist() == ["val_bal_acc", "val_loss", "train_loss"]
    assert log.loc[0].tolist() == [0.5, 1.1, 1.3] and len(log) == 2
    p.write_text("name,value\na,b\n")
    assert read_training_log(p) is None
    assert read_training_log(tmp_path / "missing.csv") is None
