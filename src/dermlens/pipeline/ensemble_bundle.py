"""The ensemble's combined model exported as one bundle: members' checkpoints -> EnsembleNet (mean or
stacked) -> export + trust fitting (dermlens.pipeline.bundle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dermlens.bundle import seal
from dermlens.export.checkpoint import LoadedModel, find_checkpoint, load_checkpoint
from dermlens.export.stage import export_config
from dermlens.model.ensemble_net import EnsembleNet
from dermlens.pipeline.bundle import build_bundle
from dermlens.train.members import (
    EnsembleError,
    Log,
    Member,
    Stacker,
    fit_stacker,
    lesion_groups,
    member_summary,
    out_of_fold,
    train_members,
)

# ---- the combined model --------------------------------------------------------------------------------


def build_ensemble_model(members: list[Member], recipe: dict[str, Any], stacker: Stacker | None = None):
    """Load every member's best checkpoint into one EnsembleNet (a LoadedModel, ready for build_bundle)."""
    loaded = [load_checkpoint(find_checkpoint(m.run_dir)) for m in members]
    first = loaded[0]
    for m, lm in zip(members, loaded, strict=True):
        if lm.classes != first.classes:
            raise EnsembleError(
                f"member {m.name} has classes {lm.classes}, {members[0].name} {first.classes}"
            )
        if lm.prep.to_dict() != first.prep.to_dict():
            raise EnsembleError(
                f"member {m.name} uses preprocessing {lm.prep.to_dict()}, {members[0].name} "
                f"{first.prep.to_dict()}: ensemble members must share one input definition"
            )
        lm.net.model_cfg = dict(lm.model_cfg)
    combine = str(recipe.get("combine", "mean_prob"))
    net = EnsembleNet(
        [lm.net for lm in loaded], combine, str(recipe.get("features", "mean")), [m.group for m in members]
    )
    if combine == "stack":
        if stacker is None:
            raise EnsembleError("combine: stack needs a fitted stacker")
        net.set_stacker("fine", stacker.fine_w, stacker.fine_b)
        net.set_stacker("coarse", stacker.coarse_w, stacker.coarse_b)
    info = {
        "members": [
            {"name": m.name, "fold": m.fold, "group": m.group, "checkpoint": str(lm.source), **lm.info}
            for m, lm in zip(members, loaded, strict=True)
        ],
        "fold_pool": recipe.get("fold_pool") if recipe.get("folds") else None,
        "stacker": stacker.info if stacker is not None else None,
    }
    source = Path(recipe["out"]) / "ensemble.json"
    return LoadedModel(net.float().eval(), first.classes, first.prep, net.spec(), source, info)


def ensemble_export_config(recipe: dict[str, Any]) -> dict[str, Any]:
    """configs/export.yaml with the recipe's `export` sections; the stacker's MatMul stays fp32 in int8."""
    cfg = export_config()
    for k, v in (recipe.get("export") or {}).items():
        cfg[k] = {**cfg[k], **v} if isinstance(cfg.get(k), dict) and isinstance(v, dict) else v
    cfg["int8"] = {**cfg["int8"], "exclude": [*cfg["int8"].get("exclude", []), "MatMul"]}
    return cfg


def record_in_card(bundle: Path, info: dict[str, Any]) -> None:
    """Add an `ensemble` section (members, folds, stacker, whether val was seen) to the bundle's card.json
    and re-seal the bundle."""
    path = Path(bundle) / "card.json"
    card = json.loads(path.read_text())
    card["ensemble"] = info
    path.write_text(json.dumps(card, indent=2, default=float) + "\n")
    seal(bundle)


def data_dir_of(members: list[Member]) -> Path:
    return Path(members[0].cfg["data"]["dir"]).expanduser()


def build_ensemble(
    recipe: dict[str, Any],
    bundle: str | Path | None = None,
    log: Log = print,
    members: list[Member] | None = None,
) -> dict:
    """Members (trained, resumed or skipped; given `members` are taken as trained) -> OOF stacker -> one
    exported bundle; returns a summary (also written to OUT/ensemble.json)."""
    members = members if members is not None else train_members(recipe, log)
    out = Path(recipe["out"])
    bundle = Path(bundle) if bundle is not None else out / "bundle"
    stacker = None
    oof = out_of_fold(members)
    data_dir = data_dir_of(members)
    stacker = fit_stacker(oof, recipe.get("stack") or {}, lesion_groups(data_dir, oof.image_ids))
    log(
        f"out-of-fold ({stacker.info['n_oof']} images): balanced accuracy mean_prob "
        f"{stacker.info['oof_bal_acc_mean_prob']:.4f}, stacking (lesion-grouped CV) "
        f"{stacker.info['oof_bal_acc_stack_cv']:.4f}"
    )
    model = build_ensemble_model(members, recipe, stacker)
    external = recipe.get("external") or None
    card = build_bundle(
        None, data_dir, bundle, ensemble_export_config(recipe), log, loaded=model, external=external
    )
    seen = bool(recipe.get("folds")) and recipe.get("fold_pool") == "train+val"
    record_in_card(bundle, {**model.info, "combine": recipe.get("combine"), "val_seen_in_training": seen})
    summary = {
        "bundle": str(bundle),
        "version": card["version"],
        "architecture": card["architecture"],
        "combine": recipe.get("combine"),
        "members": {m.name: member_summary(m).get("metrics") for m in members},
        "stacker": stacker.info,
        "val": card["metrics"]["val"],
        "val_seen_in_training": seen,
    }
    (out / "ensemble.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary
