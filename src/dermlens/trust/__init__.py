"""Trust layer: calibrated probabilities, out-of-distribution refusal, the refer rule, TTA and CAM.

numpy (+ Pillow for CAM images) at inference; scipy only when fitting temperatures.
"""

from dermlens.trust.calibration import ece, fit_temperature, nll, softmax
from dermlens.trust.cam import heat_in_mask, overlay_png, pointing_hit, upsample
from dermlens.trust.fit import TrustState, fit_trust, trust_config
from dermlens.trust.ood import auroc, energy_score, knn_score, mahalanobis_score, msp_score
from dermlens.trust.selective import refer_decision, risk_coverage
from dermlens.trust.tta import average_probs, tta_views

__all__ = [
    "TrustState",
    "auroc",
    "average_probs",
    "ece",
    "energy_score",
    "fit_temperature",
    "fit_trust",
    "heat_in_mask",
    "knn_score",
    "mahalanobis_score",
    "msp_score",
    "nll",
    "overlay_png",
    "pointing_hit",
    "refer_decision",
    "risk_coverage",
    "softmax",
    "trust_config",
    "tta_views",
    "upsample",
]
