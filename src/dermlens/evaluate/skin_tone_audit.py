"""The skin-tone audit: ITA band per image (dermlens.evaluate.skin_tone) next to sex / age band / site, and
balanced accuracy, melanoma sensitivity, ECE and refer rate per group with lesion-level CIs and Holm
correction (dermlens.evaluate.audit), for the packaged model on a manifest split without metadata."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dermlens.evaluate import EvaluateConfig
from dermlens.evaluate.audit import subgroup_audit, subgroup_labels
from dermlens.evaluate.skin_tone import MASK, RING, UNKNOWN, ItaSettings, band, image_itas
from dermlens.evaluate.sources import external_rows, predict_rows


def band_counts(bands: np.ndarray, truth: np.ndarray, names: list[str], mel: int | None) -> dict[str, dict]:
    """Images and melanomas per band, every configured band listed (zeros included)."""
    out = {}
    for name in names:
        sel = bands == name
        out[name] = {
            "n_images": int(sel.sum()),
            "n_melanoma": int((truth[sel] == mel).sum()) if mel is not None else 0,
        }
    return out


def audit_set(
    predictor: Any, rows: Any, mask_dir: Path | None, ita: ItaSettings, cfg: EvaluateConfig
) -> dict:
    """ITA per image, the model's outputs without metadata, and the audit of one labelled set."""
    classes = tuple(predictor.classes)
    itas = image_itas(rows, mask_dir, ita)
    bands = np.array([band(x.ita, ita.bands) for x in itas], dtype=object)
    arr = predict_rows(predictor, rows, cfg.batch_size, use_metadata=False)
    truth = np.array([classes.index(c) for c in rows["diagnosis"]])
    group_col = "group_id" if "group_id" in rows.columns else "lesion_id"
    groups = rows[group_col].tolist() if group_col in rows.columns else None
    labels = {**subgroup_labels(rows, cfg.subgroup_age_edges), "skin_tone": bands}
    audit = subgroup_audit(rows, arr["probs"], truth, classes, arr["refer"], groups, cfg, labels=labels)
    values = np.array([x.ita for x in itas if x.ita is not None], np.float64)
    mel = classes.index("mel") if "mel" in classes else None
    names = [n for n, _ in ita.bands] + [UNKNOWN]
    return {
        "n_images": int(len(rows)),
        "band_counts": band_counts(bands, truth, names, mel),
        "ita_method_counts": dict(Counter(x.method for x in itas)),
        "blue_or_grey_cast": int(sum(x.cast for x in itas)),
        "ita_percentiles": {
            str(q): float(np.percentile(values, q)) if len(values) else None for q in (5, 25, 50, 75, 95)
        },
        "audit": audit,
    }


def _labelled(manifest: Path, split: str, classes: tuple[str, ...]):
    """Labelled rows of a split, reset index (raises EvaluationInputError when none)."""
    return external_rows(manifest, split, classes)


def skin_tone_audit(
    manifests: list[tuple[Path, str]],
    model: Path | None = None,
    config: Path | None = None,
    n_resamples: int | None = None,
    limit: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The audit of each (prepared manifest, split) with the bundle at `model` (None: the packaged one)."""
    from dermlens.infer.predictor import Predictor
    from dermlens.settings import cpu_name, data_root

    cfg = EvaluateConfig.load(None, n_resamples=n_resamples)
    ita = ItaSettings.load(config)
    predictor = Predictor.load(model)
    mask_dir = data_root() / ita.mask_dir
    sets: dict[str, dict] = {}
    for manifest, split in manifests:
        rows = _labelled(Path(manifest), split, tuple(predictor.classes))
        if limit is not None and len(rows) > limit:
            rows = rows.sample(n=limit, random_state=0).reset_index(drop=True)
        name = f"{rows['dataset'].iloc[0] if 'dataset' in rows.columns else Path(manifest).name}/{split}"
        log(f"{name}: measuring ITA and scoring {len(rows)} images without metadata")
        sets[name] = audit_set(predictor, rows, mask_dir if mask_dir.is_dir() else None, ita, cfg)
    return {
        "model_version": predictor.card.version,
        "precision": predictor.precision,
        "refer_min_confidence": float(predictor.trust.min_confidence),
        "cpu": cpu_name(),
        "metadata": "withheld (images only)",
        "ita": {
            "definition": "ITA = arctan((L* - 50) / b*) in degrees on the CIELAB medians (D65, scikit-image "
            "rgb2lab) of the skin pixels; beyond +-90 degrees when the median b* <= 0 (blue or grey cast)",
            "skin_pixels": f"'{MASK}': outside the lesion mask dilated by {ita.lesion_margin:.0%} of the "
            f"longest side; '{RING}': the outer {ita.ring_width:.0%} of the shorter side (no mask); both "
            f"without pixels of L* < {ita.vignette_l:g} (dermoscope vignette)",
            "bands": {n: lo for n, lo in ita.bands},
            "caveat": "ITA from dermoscopy photographs is a proxy for skin tone, shifted by lighting and "
            "colour casts; it is not a Fitzpatrick type",
        },
        "bootstrap": {"n_resamples": cfg.n_resamples, "seed": cfg.seed, "ci_level": cfg.ci_level},
        "sets": sets,
    }


__all__ = ["audit_set", "band_counts", "skin_tone_audit"]
