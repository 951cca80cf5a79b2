"""Figures of a bundle's trust on each source's held-out splits: the not-dermoscopy refusal (PAD-UFES-20
photos refused, dermoscopy images falsely refused, per Fitzpatrick skin type, the synthetic-views
comparison) and calibration / conformal coverage per dermoscopy source. Rates carry Wilson intervals and
grouped (patient / lesion) bootstrap intervals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermlens.bundle import TRUST
from dermlens.errors import RefitError
from dermlens.evaluate.bootstrap import bootstrap
from dermlens.infer.state import TrustState
from dermlens.settings import cpu_name
from dermlens.trust import not_dermoscopy as nd
from dermlens.trust.outputs import trust_settings
from dermlens.trust.per_source import Data, Log, cache_dir, load_data
from dermlens.trust.shift import Runner
from dermlens.trust.sources import Scored

Z95 = 1.959963984540054


def wilson(k: int, n: int) -> tuple[float | None, float | None]:
    """95% Wilson score interval of k successes in n."""
    if n == 0:
        return None, None
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * np.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return float(centre - half), float(centre + half)


def rate(flags: np.ndarray, groups: np.ndarray, resamples: int, seed: int = 0) -> dict[str, Any]:
    """Share of True with its Wilson interval and its grouped bootstrap percentile interval."""
    flags = np.asarray(flags, bool)
    k, n = int(flags.sum()), len(flags)
    res = bootstrap(lambda w: {"r": (w @ flags) / w.sum(axis=1)}, n, groups, n_resamples=resamples, seed=seed)
    lo, hi = wilson(k, n)
    return {
        "n": n,
        "n_groups": int(res.n_groups),
        "refused": k,
        "rate": k / n if n else None,
        "wilson_95": [lo, hi],
        "grouped_bootstrap_95": [float(res.low["r"]), float(res.high["r"])],
    }


def fitzpatrick_table(refused: np.ndarray, types: pd.Series) -> dict[str, Any]:
    """Refusal per Fitzpatrick type (counts), a chi-square test over the known types and Fisher's exact test
    of types I-II against III-VI (both: does refusal depend on skin type?)."""
    from scipy.stats import chi2_contingency, fisher_exact

    t = pd.to_numeric(types, errors="coerce").to_numpy()
    table: dict[str, Any] = {}
    rows = []
    for v in sorted(set(t[~np.isnan(t)])):
        sel = t == v
        k, n = int(refused[sel].sum()), int(sel.sum())
        table[f"type_{int(v)}"] = {"n": n, "refused": k, "rate": k / n, "wilson_95": list(wilson(k, n))}
        rows.append([k, n - k])
    unknown = np.isnan(t)
    table["unknown"] = {"n": int(unknown.sum()), "refused": int(refused[unknown].sum())}
    out: dict[str, Any] = {"per_type": table}
    counts = np.array(rows).reshape(-1, 2)
    if len(rows) >= 2 and (counts.sum(axis=0) > 0).all():
        chi2, p, dof, _ = chi2_contingency(counts)
        out["chi_square"] = {"statistic": float(chi2), "dof": int(dof), "p_value": float(p)}
    else:
        out["chi_square"] = {
            "p_value": 1.0,
            "note": "no variation: every photo of a known type had one outcome",
        }
    light, dark = t <= 2, t >= 3
    two = [[int(refused[m].sum()), int((~refused[m]).sum())] for m in (light, dark)]
    out["fisher_I_II_vs_III_VI"] = {"table": two, "p_value": float(fisher_exact(two)[1])}
    return out


def _head(state: TrustState) -> nd.Head:
    if state.not_dermoscopy_weight is None:
        raise RefitError("this bundle has no not-dermoscopy head: run `dermlens trust fit-sources` first")
    rule = state.info.get("per_source", {}).get("not_dermoscopy", {}).get("rule", {})
    return nd.Head(
        state.not_dermoscopy_weight, state.not_dermoscopy_bias, state.not_dermoscopy_threshold, rule
    )


def _refusals(head: nd.Head, data: Data, role: str, resamples: int) -> dict[str, Any]:
    photos = data.photos[role]
    return {
        "pad_ufes20_refused": rate(head.refused(photos.embedding), photos.groups(), resamples),
        "dermoscopy_false_refusal": {
            k: rate(head.refused(d[role].embedding), d[role].groups(), resamples)
            for k, d in data.derm.items()
        },
    }


def _variants(run: Runner, data: Data, cfg: dict[str, Any]) -> dict[str, Any]:
    """Both head variants refitted (deterministic), their val figures and their test figures."""
    ndc = cfg["not_dermoscopy"]
    derm_train = np.concatenate([d["train"].embedding for d in data.derm.values()])
    first = next(iter(data.derm.values()))["train"]
    n_syn = min(int(ndc["synthetic_views"]) or 1000, len(first.frame))
    synthetic = nd.synthetic_views(run, first, n_syn, int(ndc["seed"]), cache_dir())
    derm_val = {k: d["val"].embedding for k, d in data.derm.items()}
    chosen, heads, info = nd.compare_variants(
        data.photos["train"].embedding, derm_train, synthetic, data.photos["val"].embedding, derm_val, ndc
    )
    derm_test = {k: d["test"].embedding for k, d in data.derm.items()}
    info["test"] = {k: nd.val_figures(h, data.photos["test"].embedding, derm_test) for k, h in heads.items()}
    return info


def _opened(bundle: str | Path, cfg: dict | None, threads: int | None) -> tuple[dict, Runner, TrustState]:
    """The trust settings, the bundle's own ONNX runner and its trust state."""
    return trust_settings(cfg), Runner(Path(bundle), threads), TrustState.load(Path(bundle) / TRUST)


def _header(run: Runner) -> dict[str, Any]:
    """What every measurement records: the bundle version, the precision served and the CPU."""
    return {"bundle_version": run.card.version, "precision": run.precision, "cpu": cpu_name()}


def measure_not_dermoscopy(
    bundle: str | Path,
    cfg: dict | None = None,
    threads: int | None = None,
    log: Log = print,
    limit: int | None = None,
) -> dict[str, Any]:
    """The not-dermoscopy figures of `bundle` (its shipped head) as a JSON-ready dict."""
    cfg, run, state = _opened(bundle, cfg, threads)
    head = _head(state)
    data = load_data(run, cfg, ("train", "val", "test"), log, limit)
    resamples = int(cfg["not_dermoscopy"]["ci_resamples"])
    photos = pd.concat([data.photos["val"].frame, data.photos["test"].frame], ignore_index=True)
    emb = np.concatenate([data.photos["val"].embedding, data.photos["test"].embedding])
    ood = {
        k: float(np.mean(state.ood_score(d["test"].logits_none, d["test"].embedding) > state.ood_threshold))
        for k, d in data.derm.items()
    }
    return {
        **_header(run),
        "threshold": head.threshold,
        "rule": head.rule,
        "val": _refusals(head, data, "val", resamples),
        "test": _refusals(head, data, "test", resamples),
        "fitzpatrick_pad_val_test": fitzpatrick_table(head.refused(emb), photos["fitzpatrick"]),
        "synthetic_views_comparison": _variants(run, data, cfg),
        "ood_refusal_test_for_reference": ood,
        "limit_per_split": limit,
    }


def _source_trust(state: TrustState, s: Scored, classes: tuple[str, ...]) -> dict[str, Any]:
    """ECE and conformal coverage with lesion-level CIs, metadata given and not, labelled rows only."""
    from dermlens.evaluate import EvaluateConfig
    from dermlens.evaluate.audit import coverage_with_ci, ece_with_ci

    ecfg = EvaluateConfig.load()
    labels = s.labels(classes)
    keep = labels >= 0
    groups = s.groups()[keep].tolist()
    out: dict[str, Any] = {"n_images": int(keep.sum()), "n_unlabelled_left_out": int((~keep).sum())}
    for cond, logits in (("meta", s.logits_meta), ("no_meta", s.logits_none)):
        has_meta = np.full(int(keep.sum()), cond == "meta")
        d = state.decide(logits[keep], s.embedding[keep], has_meta)
        out[cond] = {
            "calibration": ece_with_ci(d["probs"], labels[keep], groups, ecfg),
            "conformal": coverage_with_ci(d["sets"], labels[keep], classes, groups, ecfg),
            "refer_rate": float(d["refer"].mean()),
        }
    return out


def measure_sources(
    bundle: str | Path,
    cfg: dict | None = None,
    threads: int | None = None,
    log: Log = print,
    limit: int | None = None,
) -> dict[str, Any]:
    """Per dermoscopy source: ECE and conformal coverage on its test split (and val, for reference)."""
    cfg, run, state = _opened(bundle, cfg, threads)
    if not state.conformal_thresholds:
        raise RefitError("this bundle has no conformal thresholds: run `dermlens trust fit-sources` first")
    classes = tuple(run.card.classes)
    data = load_data(run, cfg, ("val", "test"), log, limit)
    targets = {"coverage_min": 0.87, "ece_max": 0.05, "conformal_alpha": state.conformal_alpha}
    return {
        **_header(run),
        "calibration_method": state.calibration_method,
        "targets": targets,
        "fit": state.info.get("per_source", {}).get("fit_on"),
        "test": {k: _source_trust(state, d["test"], classes) for k, d in data.derm.items()},
        "val": {k: _source_trust(state, d["val"], classes) for k, d in data.derm.items()},
        "limit_per_split": limit,
    }


__all__ = ["fitzpatrick_table", "measure_not_dermoscopy", "measure_sources", "rate", "wilson"]
