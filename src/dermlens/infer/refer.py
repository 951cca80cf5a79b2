"""The refer rule: which images go to a clinician, with machine-readable codes and plain-words reasons."""

from __future__ import annotations

import numpy as np

# Machine-readable refer reasons, in the order they are reported, with the plain-words explanation.
REFER_MESSAGES: dict[str, str] = {
    "ood": "the image does not look like the dermoscopic lesion images the model learned from "
    "(out of distribution)",
    "not_dermoscopy": "the image looks like an ordinary clinical or phone photo, not a dermoscopy image; "
    "the model is only meant for dermoscopy",
    "low_confidence": "the model is not confident enough in its top diagnosis (low confidence)",
    "set_too_large": "too many diagnoses remain plausible: the prediction set is too large",
}
RULE = (
    "refer if ood_score > ood.threshold, or not_dermoscopy_score > not_dermoscopy_threshold, "
    "or p_max < min_confidence, or |prediction set| >= max_set_size (max_set_size 0: never)"
)


def refer_codes(flags: dict[str, np.ndarray]) -> list[list[str]]:
    """Reason codes per image (keys of REFER_MESSAGES whose flag is set), [] when not referred."""
    n = len(next(iter(flags.values()))) if flags else 0
    out: list[list[str]] = [[] for _ in range(n)]
    for code in REFER_MESSAGES:
        if code in flags:
            for i in np.flatnonzero(np.asarray(flags[code], bool)):
                out[i].append(code)
    return out


def refer_message(codes: list[str]) -> str | None:
    """The reasons in plain words, joined; None when there is none."""
    return "; ".join(REFER_MESSAGES[c] for c in codes) or None
