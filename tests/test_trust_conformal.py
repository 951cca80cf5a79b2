"""Conformal sets, calibration per condition, the subgroup audit and the refer reasons, on real HAM10000
images scored by the packaged bundle (torch-free Predictor). The test split is held out from every fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bundles import bundle_dir
from dermlens.evaluate import EvaluateConfig
from dermlens.evaluate.audit import age_band, holm, subgroup_audit
from dermlens.preprocess import load_rgb
from dermlens.trust import conformal

ALPHA_TOL_Z = 3.0
pytestmark = pytest.mark.slow  # scores ~560 real test images twice (~1 min on 2 cores)


@pytest.fixture(scope="module", autouse=True)
def _conformal(predictor):
    if not predictor.trust.conformal_thresholds:
        pytest.skip("this bundle has no conformal thresholds yet (run `dermlens trust fit`)")


@pytest.fixture(scope="module")
def photo_paths(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Real smartphone photos (not dermoscopy) of held-out PAD-UFES-20 test patients."""
    from dermlens.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("pad")
    opts = PrepareOptions(
        "pad_ufes20", data_root / "pad_ufes20", out, folds=0, build=False, check_images=False
    )
    df = pd.read_csv(prepare(opts, show=lambda _: None).manifest)
    return df[df["split"] == "test"]["image_path"].head(40).tolist()


@pytest.fixture(scope="module")
def test_rows(ham_manifest: pd.DataFrame) -> pd.DataFrame:
    """Held-out test split: every melanoma, bcc and bkl image plus 150 random nevi (seeded)."""
    test = ham_manifest[ham_manifest["split"] == "test"]
    nv = test[test["diagnosis"] == "nv"].sample(150, random_state=0)
    keep = test[test["diagnosis"].isin(["mel", "bcc", "bkl"])]
    return pd.concat([keep, nv]).sort_index().reset_index(drop=True)


def _meta(rows: pd.DataFrame) -> list[dict]:
    def clean(v):
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else v

    return [{"age": clean(r.age), "sex": clean(r.sex), "site": clean(r.site)} for r in rows.itertuples()]


@pytest.fixture(scope="module")
def scored(predictor, test_rows: pd.DataFrame) -> dict:
    """Predictor outputs for the rows with their metadata and with none."""
    images = [load_rgb(p) for p in test_rows["image_path"]]
    return {
        "meta": predictor.predict_arrays(images, _meta(test_rows)),
        "no_meta": predictor.predict_arrays(images, None),
        "truth": np.array([predictor.classes.index(d) for d in test_rows["diagnosis"]]),
    }


def test_class_coverage_on_held_out_test_within_derived_tolerance(predictor, scored) -> None:
    """Per class and condition: coverage >= 1 - alpha - tol(n_cal, n_test) (Beta + binomial spread)."""
    alpha = predictor.trust.conformal_alpha
    n_cal = predictor.trust.info["shift"]["conformal"]["n_cal_per_class"]
    truth = scored["truth"]
    for cond in ("meta", "no_meta"):
        sets = scored[cond]["prediction_sets"]
        assert sets.shape == scored[cond]["probs"].shape and sets.any(axis=1).all()
        covered = sets[np.arange(len(truth)), truth]
        for c in ("mel", "bcc", "bkl", "nv"):
            sel = truth == predictor.classes.index(c)
            tol = conformal.coverage_tolerance(n_cal[c], alpha, int(sel.sum()), ALPHA_TOL_Z)
            assert covered[sel].mean() >= 1 - alpha - tol, (cond, c, covered[sel].mean(), tol)
        assert sets.sum(axis=1).mean() < 3.5  # informative, not 'every class'


def test_tolerance_shrinks_with_more_calibration_images() -> None:
    assert conformal.coverage_tolerance(10_000, 0.1, 10_000) < conformal.coverage_tolerance(100, 0.1, 100)
    assert conformal.coverage_tolerance(5, 0.1, 50) == 1.0  # q = inf: every set holds the class
    assert conformal.expected_coverage(167, 0.1) == pytest.approx(152 / 168)


def test_mondrian_sets_match_crepes(scored) -> None:
    """The short implementation agrees with crepes' Mondrian conformal classifier (non-smoothed p-values)."""
    from crepes import ConformalClassifier

    probs, truth = scored["meta"]["probs"], scored["truth"]
    rng = np.random.default_rng(0)
    cal = rng.random(len(truth)) < 0.5
    alpha, n_classes = 0.1, probs.shape[1]
    q = conformal.class_thresholds(probs[cal], truth[cal], alpha, n_classes)
    ours = (1 - probs[~cal]) <= q[None, :] + 1e-12
    cc = ConformalClassifier().fit(1 - probs[cal][np.arange(cal.sum()), truth[cal]], bins=truth[cal])
    present = np.unique(truth[cal])
    for c in present:
        p = cc.predict_p(1 - probs[~cal], bins=np.full((~cal).sum(), c), smoothing=False)[:, c]
        np.testing.assert_array_equal(ours[:, c], p > alpha, err_msg=f"class {c}")


def test_conditions_use_their_own_calibration(predictor, scored, test_rows: pd.DataFrame) -> None:
    from dermlens.infer.prepare import encode_meta

    st = predictor.trust
    assert set(st.calibration) == {"meta", "no_meta"}
    assert scored["meta"]["has_meta"].mean() > 0.95 and not scored["no_meta"]["has_meta"].any()
    batch = predictor.prepare([load_rgb(p) for p in test_rows["image_path"][:8]])
    logits = predictor._forward(batch, encode_meta(None, 8), False)["fine_logits"]
    without = st.calibrated(logits, np.zeros(8, bool))
    np.testing.assert_allclose(without, scored["no_meta"]["probs"][:8], atol=1e-5)
    if st.calibration_method != "temperature":  # one temperature: the same parameters for both
        assert not np.allclose(without, st.calibrated(logits, np.ones(8, bool)))


def test_subgroup_table_counts(scored, test_rows: pd.DataFrame) -> None:
    cfg = EvaluateConfig.load(n_resamples=100)
    res = subgroup_audit(
        test_rows,
        scored["meta"]["probs"],
        scored["truth"],
        ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"),
        scored["meta"]["refer"],
        test_rows["group_id"].tolist(),
        cfg,
    )
    rows = pd.DataFrame(res["rows"])
    n = len(test_rows)
    for attr in ("sex", "age_band", "site"):
        part = rows[rows["attribute"] == attr]
        assert (
            part["n_images"].sum() == n
            and part["n_melanoma"].sum() == (test_rows["diagnosis"] == "mel").sum()
        )
    sex = rows[rows["attribute"] == "sex"].set_index("group")["n_images"]
    assert sex.get("male", 0) == (test_rows["sex"] == "male").sum()
    bands = test_rows["age"].map(lambda a: age_band(a, cfg.subgroup_age_edges)).value_counts()
    got = rows[rows["attribute"] == "age_band"].set_index("group")["n_images"]
    assert got.sort_index().to_dict() == bands.sort_index().to_dict()
    lesions = rows[rows["attribute"] == "sex"]["n_lesions"].sum()
    assert lesions == test_rows["group_id"].nunique()
    for r in res["rows"]:
        assert r["tested"] == (cfg.subgroup_min_images <= r["n_images"] < n)
        for m in r["metrics"].values():
            if "p_holm" in m:
                assert m["p_holm"] >= m["p_value"] - 1e-12
            if m["ci_low"] is not None:
                assert m["ci_low"] <= m["ci_high"]


def test_holm() -> None:
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, np.nan]), [0.03, 0.06, 0.06, np.nan])


def test_refer_reasons_fire_for_their_cause(predictor, scored, test_rows: pd.DataFrame, photo_paths) -> None:
    """OOD for a natural photo, not_dermoscopy for a smartphone photo, set_too_large for a wide set;
    refer is exactly 'any reason', and the plain-words text names every reason."""
    from skimage import data as skdata

    from dermlens.infer.refer import REFER_MESSAGES

    r = scored["meta"]
    assert (r["refer"] == np.array([bool(c) for c in r["refer_codes"]])).all()
    big = np.flatnonzero(r["prediction_sets"].sum(axis=1) >= predictor.trust.max_set_size)
    assert len(big) and all("set_too_large" in r["refer_codes"][i] for i in big)

    photo = predictor.predict_image(skdata.astronaut())
    assert photo.refer and "ood" in photo.refer_codes
    assert REFER_MESSAGES["ood"] in photo.refer_reason

    small = np.stack([predictor.prep.resize(load_rgb(p)) for p in test_rows["image_path"][:40]])
    res = [predictor.predict_image(load_rgb(p)) for p in photo_paths]
    flagged = np.mean(["not_dermoscopy" in x.refer_codes for x in res])
    assert flagged >= 0.9, flagged
    x = next(x for x in res if "not_dermoscopy" in x.refer_codes)
    assert x.refer and x.not_dermoscopy and REFER_MESSAGES["not_dermoscopy"] in x.refer_reason
    plain = [predictor.predict_image(im) for im in small[:40]]
    assert np.mean([p.not_dermoscopy for p in plain]) <= 0.1


def test_api_returns_set_and_reason_codes(predictor, test_rows: pd.DataFrame, photo_paths, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from dermlens.serve.api import create_app
    from dermlens.serve.settings import load_settings

    settings = load_settings(records={"url": f"sqlite:///{tmp_path / 'r.db'}"})
    path = test_rows["image_path"][0]
    jpg = Path(photo_paths[0])
    with TestClient(create_app(settings, predictor=predictor), base_url="http://127.0.0.1") as c:
        ok = c.post(
            "/predict", files={"file": ("a.jpg", Path(path).read_bytes(), "image/jpeg")}, data={"age": "60"}
        )
        clin = c.post("/predict", files={"file": ("v.jpg", jpg.read_bytes(), "image/jpeg")})
    assert ok.status_code == 200 and clin.status_code == 200, (ok.text, clin.text)
    body = ok.json()
    ps = body["prediction_set"]
    assert body["set_coverage"] == pytest.approx(1 - predictor.trust.conformal_alpha)
    assert body["calibration_condition"] == "meta"
    assert body["top_class"] == ps[0] and set(ps) <= set(predictor.classes)
    assert body["refer"] == bool(body["refer_codes"])
    cj = clin.json()
    assert "not_dermoscopy" in cj["refer_codes"] and cj["not_dermoscopy"]
    assert cj["calibration_condition"] == "no_meta"


def test_trust_fit_cli_refits_a_bundle_copy(ham_small_prepared, tmp_path) -> None:
    """`dermlens trust fit` on a bundle copy: trust.npz + card rewritten, checksum updated, loadable."""
    import hashlib
    import json
    import shutil

    from typer.testing import CliRunner

    from dermlens.cli.main import app
    from dermlens.infer.predictor import Predictor

    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir(), bundle, ignore=shutil.ignore_patterns("model.pt", "model.onnx"))
    out = tmp_path / "fit.json"
    res = CliRunner().invoke(
        app,
        ["trust", "fit", "--bundle", str(bundle), "--manifest", str(ham_small_prepared), "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    card = json.loads((bundle / "card.json").read_text())
    report = json.loads(out.read_text())
    assert card["conformal"]["alpha"] == report["conformal"]["alpha"] == 0.1
    assert set(card["calibration"]["conditions"]) == {"meta", "no_meta"}
    trust_hash = hashlib.sha256((bundle / "trust.npz").read_bytes()).hexdigest()
    assert f"{trust_hash}  trust.npz" in (bundle / "MANIFEST.sha256").read_text()  # re-sealed
    assert report["calibration"]["chosen"].endswith("|ham")  # no external manifest given
    assert "cpu" in report and report["bundle_version"] == card["version"]
    p = Predictor.load(bundle)
    assert (
        p.trust.not_dermoscopy_weight is not None and "refer" not in card["metrics"]["trust"]["shift"]
    )  # one refer figure: metrics.trust.refer
    assert p.trust.max_set_size == card["metrics"]["trust"]["refer"]["max_set_size"]

    bad = CliRunner().invoke(app, ["trust", "fit", "--bundle", str(tmp_path / "nope"), "--manifest", "x"])
    assert bad.exit_code == 2 and "error:" in bad.output and "Traceback" not in bad.output


def test_evaluate_report_has_trust_sections(ham_small_prepared, tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from dermlens.cli.main import app

    out = tmp_path / "eval"
    args = ["evaluate", "--manifest", str(ham_small_prepared), "--split", "test", "--n-bootstrap", "50"]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    trust = m["trust"]
    assert set(trust["calibration_conditions"]) == {"ham10000/test/meta", "ham10000/test/no_meta"}
    assert trust["conformal"]["ham10000/test/meta"]["n_images"] == m["n_images"]
    sex_rows = [r for r in trust["subgroups"]["rows"] if r["attribute"] == "sex"]
    assert sum(r["n_images"] for r in sex_rows) == m["n_images"]
    html = (out / "report.html").read_text()
    for sid in ("calibration-conditions", "conformal", "subgroups"):
        assert f'<section id="{sid}">' in html
