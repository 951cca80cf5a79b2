"""The refer operating point: fitted on real val images into a copy of the shipped bundle, a requested refer
rate maps to a threshold that refers about that share of held-out val images; predict, serve and the
report use it."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dermlens.bundle import TRUST, read_card, release_dir, seal
from dermlens.cli.main import app
from dermlens.infer.operating_point import min_confidence_for, refer_words, val_refer_rate, with_refer_rate
from dermlens.infer.state import TrustState
from dermlens.serve.api import create_app
from dermlens.serve.settings import load_settings
from dermlens.trust.operating_point import score_split
from dermlens.trust.refer_point import fit_operating_point
from dermlens.trust.shift import Runner


@pytest.fixture(scope="module")
def op_bundle(ham_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped bundle with the operating point fitted on 60 val images by the CLI."""
    bundle = tmp_path_factory.mktemp("op") / "bundle"
    shutil.copytree(release_dir(), bundle)
    res = CliRunner().invoke(
        app,
        ["trust", "operating-point", "--bundle", str(bundle), "--manifest", str(ham_prepared)]
        + ["--limit", "60", "--threads", "1"],
    )
    assert res.exit_code == 0, res.output
    assert "min_confidence" in res.output
    return bundle


@pytest.fixture(scope="module")
def no_table_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped bundle whose trust state has no refer-rate table."""
    bundle = tmp_path_factory.mktemp("notable") / "bundle"
    shutil.copytree(release_dir(), bundle)
    state = TrustState.load(bundle / TRUST)
    dataclasses.replace(state, refer_quantiles=None).save(bundle / TRUST)
    seal(bundle)  # a bundle built this way is ours: re-seal it
    return bundle


def test_operating_point_is_written_into_the_bundle(op_bundle: Path) -> None:
    state = TrustState.load(op_bundle / TRUST)
    assert state.refer_quantiles is not None and len(state.refer_quantiles) == 101
    assert np.all(np.diff(state.refer_quantiles) >= 0)
    assert state.accept_rate == pytest.approx(0.86)
    assert 0 < state.refer_other_rate < 0.5
    assert read_card(op_bundle).refer["min_confidence"] == pytest.approx(state.min_confidence)
    assert val_refer_rate(state) == pytest.approx(0.14, abs=0.01)


@pytest.mark.slow
def test_requested_rate_refers_about_that_share_of_val(ham_prepared: Path) -> None:
    run = Runner(release_dir(), threads=1)
    val = score_split(run, ham_prepared, "val", tuple(run.card.classes), False, limit=240)
    groups = pd.Series(val.groups)
    fit_idx = groups.isin(groups.drop_duplicates().iloc[::2]).to_numpy()  # whole lesions on each side
    pick = lambda m: dataclasses.replace(  # noqa: E731
        val, **{f: getattr(val, f)[m] for f in ("logits", "embedding", "has_meta", "labels", "groups")}
    )
    fit, held = pick(fit_idx), pick(~fit_idx)
    state = TrustState.load(release_dir() / TRUST)
    fit_operating_point(state, fit, 0.86)
    thresholds = []
    for rate in (0.15, 0.3, 0.5):
        st = with_refer_rate(state, rate)
        thresholds.append(st.min_confidence)
        # on the images it was fitted on, all four flags together refer the requested share
        on_fit = st.decide(fit.logits, fit.embedding, fit.has_meta)["refer"].mean()
        assert abs(on_fit - rate) < 0.02, (rate, on_fit)
        # on held-out lesions, within sampling error (binomial sd, doubled for the fitted quantiles)
        on_held = st.decide(held.logits, held.embedding, held.has_meta)["refer"].mean()
        sd = np.sqrt(2 * rate * (1 - rate) / len(held.labels))
        assert abs(on_held - rate) < 3 * sd, (rate, on_held, len(held.labels))
    assert thresholds == sorted(thresholds)
    assert thresholds[0] == pytest.approx(min_confidence_for(state, 0.15))


def test_predict_accepts_a_refer_rate(op_bundle: Path, no_table_bundle: Path, ham_root: Path, tmp_path: Path):
    images = sorted((ham_root / "images").glob("*.jpg"))[:4]
    args = ["predict", *map(str, images), "--threads", "1", "--model", str(op_bundle)]
    res = CliRunner().invoke(app, [*args, "--refer-rate", "1.0", "--out", str(tmp_path / "all.csv")])
    assert res.exit_code == 0, res.output
    assert "refers every image like these" in res.output
    assert pd.read_csv(tmp_path / "all.csv")["refer"].all()
    res = CliRunner().invoke(app, [*args, "--refer-rate", "0.2", "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert "refers about 1 in 5 images like these" in res.output
    bad = CliRunner().invoke(app, [*args, "--refer-rate", "1.5"])
    assert bad.exit_code == 2
    old = ["predict", str(images[0]), "--model", str(no_table_bundle), "--refer-rate", "0.2"]
    res = CliRunner().invoke(app, old)
    assert res.exit_code == 2 and "no refer-rate table" in res.output


def test_serve_shows_the_refer_rate_in_words(op_bundle: Path, no_table_bundle: Path, tmp_path: Path):
    db = {"url": f"sqlite:///{tmp_path / 'r.db'}"}
    settings = load_settings(model=str(op_bundle), refer_rate=0.2, records=db)
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        info = client.get("/model").json()["refer"]
        assert info["words"] == "refers about 1 in 5 images like these"
        assert info["requested_refer_rate"] == 0.2 and info["val_refer_rate"] == pytest.approx(0.2, abs=0.01)
        assert 'id="refer-rate-note"' in client.get("/").text
    packaged = create_app(load_settings(model=str(op_bundle), records=db))
    with TestClient(packaged, base_url="http://localhost") as client:
        info = client.get("/model").json()["refer"]
        assert info["words"] == "refers about 1 in 7 images like these"  # the packaged point, 14% of val
    from dermlens.cli.serve import _start

    settings, predictor, store = _start(None, model=str(op_bundle), refer_rate=0.3, records=db)
    store.close()
    assert predictor.trust.min_confidence == pytest.approx(min_confidence_for(predictor.trust, 0.3))
    from dermlens.errors import DermlensError

    with pytest.raises(DermlensError, match="no refer-rate table"):  # one line, exit 2 (cli/main.py)
        _start(None, model=str(no_table_bundle), refer_rate=0.3, records=db)


def test_report_draws_the_refer_curve_with_the_operating_point(op_bundle: Path, ham_prepared: Path):
    from dermlens.evaluate.refer_curve import refer_curve
    from dermlens.evaluate.report import _refer_curves_html

    run = Runner(op_bundle, threads=1)
    val = score_split(run, ham_prepared, "val", tuple(run.card.classes), False, limit=60)
    state = TrustState.load(op_bundle / TRUST)
    arr = state.decide(val.logits, val.embedding, val.has_meta)
    curve = refer_curve(arr, val.labels, state.min_confidence)
    op = curve["operating_point"]
    assert op["coverage"] == pytest.approx(1 - arr["refer"].mean())
    assert max(curve["coverage"]) == pytest.approx(
        1 - np.mean(arr["ood"] | arr["not_dermoscopy"] | arr["set_too_large"])
    )
    html = _refer_curves_html({"refer_curves": {"ham10000/val/no_meta": curve}})
    assert "data:image/png;base64" in html and "ham10000/val/no_meta" in html


def test_refer_words() -> None:
    assert refer_words(0.2) == "refers about 1 in 5 images like these"
    assert refer_words(0.14) == "refers about 1 in 7 images like these"
    assert refer_words(None) is None


def test_the_packaged_card_has_one_refer_figure() -> None:
    """metrics.trust.refer is the packaged operating point; no other refer figure is left in the card."""
    trust = read_card(release_dir()).to_dict()["metrics"]["trust"]
    assert trust["refer"]["accept_rate"] == pytest.approx(TrustState.load(release_dir() / TRUST).accept_rate)
    assert "operating_point" not in trust and "refer" not in trust.get("shift", {})
