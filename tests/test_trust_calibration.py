"""Trust: temperature scaling on real model logits, fit_trust/TrustState round trip, refer rule, TTA views."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _ham import ham_reference
from dermlens.infer.calibration import mean_softmax, softmax
from dermlens.infer.refer import refer_codes
from dermlens.infer.state import TrustState
from dermlens.infer.tta import VIEWS, average_probs, tta_views
from dermlens.metrics import aurc, ece, risk_coverage
from dermlens.trust.calibration import fit_temperature, fit_temperature_tta, nll
from dermlens.trust.outputs import coarse_from_fine, fit_trust


@pytest.fixture(scope="module")
def real_logits() -> dict[str, np.ndarray]:
    """Logits of real HAM images from ImageNet lite0 features + a logistic head fitted on other lesions.

    Three disjoint lesion sets: head fit (15/class), temperature fit (10/class), evaluation (10/class).
    """
    from sklearn.linear_model import LogisticRegression

    out = {}
    for name, (k, skip) in {"head": (15, 0), "fit": (10, 15), "eval": (10, 25)}.items():
        ref = ham_reference(k, skip)
        out[name + "_emb"], out[name + "_y"] = ref["embedding"], ref["labels"]
    head = LogisticRegression(C=1.0, max_iter=3000).fit(out["head_emb"], out["head_y"])
    for name in ("fit", "eval"):
        out[name] = head.decision_function(out[name + "_emb"])
    return out


def test_softmax_rows_sum_to_one_and_temperature_flattens() -> None:
    z = np.array([[2.0, 0.0, -1.0], [1000.0, 0.0, 0.0]])
    p1, p3 = softmax(z), softmax(z, 3.0)
    assert np.allclose(p1.sum(1), 1) and np.isfinite(p1).all()
    assert p3[0].max() < p1[0].max()


def test_fit_temperature_recovers_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, size=(4000, 7))
    labels = np.array([rng.choice(7, p=p) for p in softmax(logits, 2.5)])
    assert abs(fit_temperature(logits, labels) - 2.5) < 0.25


@pytest.mark.slow
def test_temperature_lowers_nll_and_ece_on_real_logits(real_logits: dict[str, np.ndarray]) -> None:
    fit, fy, ev, ey = real_logits["fit"], real_logits["fit_y"], real_logits["eval"], real_logits["eval_y"]
    t = fit_temperature(fit, fy)
    assert t != 1.0
    assert nll(fit, fy, t) < nll(fit, fy)
    # held-out lesions: calibrated probabilities are better on both counts
    assert nll(ev, ey, t) < nll(ev, ey)
    assert ece(softmax(ev, t), ey) < ece(softmax(ev), ey)


def test_tta_temperature_calibrates_view_averages(real_logits: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    views = np.stack([real_logits["fit"] + rng.normal(0, 0.5, real_logits["fit"].shape) for _ in range(4)])
    y = real_logits["fit_y"]
    t = fit_temperature_tta(views, y)
    nll_tta = -np.log(mean_softmax(views, t)[np.arange(len(y)), y]).mean()
    assert nll_tta < -np.log(mean_softmax(views, 1.0)[np.arange(len(y)), y]).mean()
    state = TrustState(temperature_fine=9.0, temperature_fine_tta=t)
    assert np.allclose(state.tta_probs(views), mean_softmax(views, t))


@pytest.mark.slow
def test_fit_trust_state_round_trip_and_card(real_logits: dict[str, np.ndarray], tmp_path) -> None:
    fine, y = real_logits["fit"], real_logits["fit_y"]
    coarse_y = coarse_from_fine(y, 7)
    coarse = np.stack([-fine[:, [0, 2, 3]].max(1), fine[:, [0, 2, 3]].max(1)], axis=1)
    val = {"fine_logits": fine, "coarse_logits": coarse, "embedding": real_logits["fit_emb"], "labels": y}
    cam_w = np.ones((7, real_logits["fit_emb"].shape[1]), np.float32)
    state = fit_trust(val, real_logits["head_emb"], real_logits["head_y"], cam_weight=cam_w)
    assert state.ood_method == "mahalanobis" and state.val_keep_rate >= 0.95
    assert set(state.thresholds) == {"msp", "energy", "mahalanobis", "knn"}
    assert state.temperature_coarse > 0 and coarse_y.max() == 1
    path = state.save(tmp_path / "trust.npz")
    back = TrustState.load(path)
    assert back.temperature_fine == state.temperature_fine and back.ood_threshold == state.ood_threshold
    assert np.allclose(back.inv_covariance, state.inv_covariance, rtol=1e-4, atol=1e-3)
    assert np.array_equal(back.inv_covariance, back.inv_covariance.T)
    assert back.cam_weight.shape == (7, cam_w.shape[1])
    ev = back.decide(real_logits["eval"], real_logits["eval_emb"])
    assert ev["probs"].shape == (len(real_logits["eval"]), 7) and ev["refer"].dtype == bool
    card = state.card_fields()
    assert {"method", "threshold", "val_keep_rate"} <= set(card)
    json.dumps(state.card_sections())  # card.json-serializable


def test_risk_coverage_and_refer_rule() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 1])
    cov, risk = risk_coverage(probs, labels)
    assert np.allclose(cov, [0.25, 0.5, 0.75, 1.0])
    assert np.allclose(risk, [0.0, 0.5, 1 / 3, 0.5])
    assert aurc(probs, labels) == pytest.approx(np.mean([0.0, 0.5, 1 / 3, 0.5]))
    state = TrustState(ood_threshold=1.0, min_confidence=0.58)  # answers 3 of the 4 on confidence
    ood_score = np.array([0.0, 2.0, 0.0, 0.0])
    flags = {"ood": ood_score > state.ood_threshold, "low_confidence": probs.max(1) < state.min_confidence}
    assert (flags["ood"] | flags["low_confidence"]).tolist() == [False, True, False, True]
    assert refer_codes(flags) == [[], ["ood"], [], ["low_confidence"]]


def test_tta_views_keep_shape_and_invert() -> None:
    x = np.random.default_rng(0).integers(0, 255, size=(2, 150, 200, 3), dtype=np.uint8)
    views = tta_views(x)
    assert len(views) == len(VIEWS) == 4
    assert all(v.shape == x.shape and v.flags.c_contiguous for v in views)
    assert np.array_equal(views[0], x)
    assert np.array_equal(views[3][:, ::-1, ::-1], x)
    assert np.array_equal(tta_views(x[0])[1][:, ::-1], x[0])
    assert np.allclose(average_probs([np.eye(2), np.eye(2)[::-1]]), 0.5)
