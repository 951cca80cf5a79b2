"""Trust fitting of a freshly exported bundle, on the precision that will be served: temperatures (single
view and TTA), OOD statistics and thresholds, the refer threshold and CAM weights into trust.npz and the
card; then (optionally) the shift-aware parts (dermlens.trust.shift)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dermlens.bundle import read_card, write_card
from dermlens.export.stage import Exported
from dermlens.infer.session import PRECISIONS, OnnxModel, default_precision
from dermlens.infer.tta import view_logits
from dermlens.metrics import classification_metrics
from dermlens.trust.outputs import fit_trust, trust_config
from dermlens.trust.shift import refit_bundle, save_into_bundle


def fit_exported(
    exported: Exported,
    cfg: dict[str, Any],
    log: Callable[[str], None] = print,
    external: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fit trust.npz for `exported` with the graph its card serves (cfg: export.yaml); returns the card."""
    bundle, val, train = exported.bundle, exported.val, exported.train
    card = read_card(bundle)
    precision = default_precision(card.extra.get("default_precision"), bundle)
    model, prep, bs = (
        OnnxModel(bundle / PRECISIONS[precision]),
        card.preprocessing,
        int(cfg.get("batch_size", 32)),
    )
    val_out = exported.val_outputs[precision]
    train_emb = model.run_images(train.images, prep, train.meta, bs)["embedding"]
    log(f"embedded {len(train.labels)} train images for the OOD statistics ({precision})")
    tta = trust_config().get("tta", {})
    views = tuple(tta.get("views") or ("identity",))
    fine_v, coarse_v = view_logits(
        lambda v: model.run_images(v, prep, val.meta, bs), val.images, views, val_out
    )
    log(f"scored the {len(views)} TTA views of the val images ({precision})")
    val_dict = {**val_out, "labels": val.labels, "fine_logits_views": fine_v, "coarse_logits_views": coarse_v}
    state = fit_trust(val_dict, train_emb, train.labels, cam_weight=exported.cam_weight)
    state.info["precision"] = precision
    log(
        f"fitted trust on {precision}: T_fine={state.temperature_fine:.3f}, OOD {state.ood_method} threshold "
        f"{state.ood_threshold:.4g}, min_confidence {state.min_confidence:.3f}"
    )
    card.tta, card.extra["tta_views"] = bool(tta.get("enabled", False)), list(views)
    metrics = card.extra.setdefault("metrics", {}).setdefault("val", {})
    for name, out in exported.val_outputs.items():
        scores = state.ood_score(out["fine_logits"], out["embedding"])
        metrics.setdefault(name, {})["ood_keep_rate"] = float((scores <= state.ood_threshold).mean())
    n = len(card.classes)
    metrics[precision]["bal_acc_tta"] = classification_metrics(state.tta_probs(fine_v), val.labels, n)[
        "bal_acc"
    ]
    write_card(bundle, card)
    save_into_bundle(bundle, state)
    t = cfg.get("trust") or {}
    if t.get("shift_fit", True) and data_dir is not None:
        refit_bundle(bundle, data_dir, external or t.get("external_manifest"), log=log)
    return read_card(bundle).to_dict()


__all__ = ["fit_exported"]
