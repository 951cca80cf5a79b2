"""Ensembles: train k members on the manifest's grouped folds (and/or several architectures), combine them
by averaging or by a stacked logistic regression fitted on out-of-fold predictions (exported as ONE bundle
by dermlens.pipeline.ensemble_bundle).

Every member is an ordinary `dermlens train` run (resumes from last.ckpt; a finished member, marked by
the engine's finished.json, is never retrained). The combined network is model.ensemble.EnsembleNet,
exported by the ordinary export step, so `predict`, `serve` and `evaluate` take the bundle like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermlens import config as configuration
from dermlens.errors import EnsembleError  # noqa: F401 (re-exported)
from dermlens.extras import require
from dermlens.train.config import ConfigError, load_config
from dermlens.train.runs import finished, train_run, val_metrics

Log = Callable[[str], None]


def load_recipe(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """configs/ensemble.yaml <- a recipe file <- overrides (a dict of sections), via the one loader."""
    layers = [("command-line options", overrides or {})]
    return configuration.load("ensemble", path, layers=layers, what="ensemble recipe")


# ---- members -------------------------------------------------------------------------------------------


@dataclass
class Member:
    """One member run: its name, combination group (architecture), fold and full training config."""

    name: str
    group: int
    fold: int | None
    cfg: dict[str, Any] = field(repr=False)
    given: bool = False  # an already-trained run named by `run:` in the recipe: used as it is, never trained

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg["trainer"]["run_dir"])


def plan_members(recipe: dict[str, Any]) -> list[Member]:
    """Members = recipe architectures x folds (folds 0: one member per architecture, on train/val)."""
    out = Path(recipe["out"])
    folds = int(recipe.get("folds") or 0)
    specs = recipe.get("members") or [{"name": "m", "overrides": []}]
    members = []
    for g, spec in enumerate(specs):
        if "name" not in spec:
            raise ConfigError(f"ensemble member {g} has no name")
        if spec.get("run"):
            if folds > 0:
                raise ConfigError(
                    f"ensemble member {spec['name']} names a run; a `run:` member needs folds: 0"
                )
            members.append(given_member(str(spec["name"]), g, Path(spec["run"])))
            continue
        for fold in range(folds) if folds > 0 else [None]:
            name = str(spec["name"]) + (f"-fold{fold}" if fold is not None else "")
            over = [*recipe.get("overrides", []), *spec.get("overrides", [])]
            if fold is not None:
                over += [f"data.val_fold={fold}", f"data.fold_pool={recipe.get('fold_pool', 'train')}"]
            over += [f"trainer.run_dir={out / 'members' / name}", f"trainer.name={name}"]
            members.append(Member(name, g, fold, load_config(recipe.get("base_config"), over)))
    return members


def given_member(name: str, group: int, run_dir: Path) -> Member:
    """A member taken from an already-trained run folder (its config.yaml, best checkpoint, val outputs)."""
    needed = [run_dir / "config.yaml", run_dir / "metrics_val.json", run_dir / "val_outputs.npz"]
    missing = [str(f) for f in needed if not f.is_file()]
    if missing:
        raise EnsembleError(f"ensemble member {name}: {missing[0]} not found (is {run_dir} a finished run?)")
    cfg = load_config(run_dir / "config.yaml")
    cfg["trainer"]["run_dir"] = str(run_dir)
    return Member(name, group, None, cfg, given=True)


def member_summary(m: Member) -> dict[str, Any]:
    """finished()'s summary of a member; a given run without the engine's marker reports its val metrics."""
    done = finished(m.run_dir)
    if done is not None or not m.given:
        return done or {}
    return {"config_hash": None, "reason": "given run", "metrics": val_metrics(m.run_dir)}


def train_members(recipe: dict[str, Any], log: Log = print) -> list[Member]:
    """Train (or skip, or resume) every member of the recipe; returns the member plan."""
    members = plan_members(recipe)
    for i, m in enumerate(members, 1):
        log(f"member {i}/{len(members)}: {m.name}")
        if m.given:
            log(f"{m.run_dir}: a given run, used as it is")
            continue
        train_run(m.cfg, log)
    return members


# ---- out-of-fold predictions and stacking --------------------------------------------------------------


@dataclass
class OOF:
    """Out-of-fold log-probabilities per group, aligned by image: features [N, G*C] for fine and coarse."""

    image_ids: np.ndarray
    fine_labels: np.ndarray
    coarse_labels: np.ndarray
    fine: np.ndarray
    coarse: np.ndarray
    classes: tuple[str, ...]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _group_logp(parts: list[dict[str, np.ndarray]], ids: np.ndarray, key: str) -> np.ndarray:
    """log mean probability over the members of one group that predicted each id."""
    acc, cnt = None, np.zeros(len(ids))
    pos = {i: n for n, i in enumerate(ids)}
    for p in parts:
        prob = np.exp(_log_softmax(p[key]))
        idx = np.array([pos.get(i, -1) for i in p["image_ids"]])
        ok = idx >= 0
        if acc is None:
            acc = np.zeros((len(ids), prob.shape[1]))
        np.add.at(acc, idx[ok], prob[ok])
        np.add.at(cnt, idx[ok], 1)
    return np.log(np.clip(acc / cnt[:, None], 1e-12, None))


def out_of_fold(members: list[Member]) -> OOF:
    """Each member's val_outputs.npz (its held-out fold) joined into per-group features on common images."""
    groups: dict[int, list[dict[str, np.ndarray]]] = {}
    labels: dict[str, tuple[int, int]] = {}
    classes = None
    for m in members:
        path = m.run_dir / "val_outputs.npz"
        if not path.is_file():
            raise EnsembleError(f"member {m.name} has no {path}: train it first")
        with np.load(path) as z:
            part = {k: np.array(z[k]) for k in ("fine_logits", "coarse_logits", "image_ids")}
            labels.update(
                zip(z["image_ids"], zip(z["fine_labels"], z["coarse_labels"], strict=True), strict=True)
            )
            c = tuple(str(x) for x in z["classes"])
        if classes is not None and c != classes:
            raise EnsembleError(f"member {m.name} has classes {c}, others {classes}")
        classes = c
        groups.setdefault(m.group, []).append(part)
    common = set.intersection(*[{i for p in parts for i in p["image_ids"]} for parts in groups.values()])
    ids = np.array(sorted(common))
    if len(ids) == 0:
        raise EnsembleError("the members' validation images do not overlap across architectures")
    order = sorted(groups)
    fine = np.concatenate([_group_logp(groups[g], ids, "fine_logits") for g in order], axis=1)
    coarse = np.concatenate([_group_logp(groups[g], ids, "coarse_logits") for g in order], axis=1)
    lab = np.array([labels[i] for i in ids])
    return OOF(ids, lab[:, 0], lab[:, 1], fine, coarse, classes or ())


def _fit_lr(
    x: np.ndarray, y: np.ndarray, n_classes: int, cfg: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression -> (weight [n_classes, F], bias [n_classes]); absent classes ~ p=0."""
    LogisticRegression = require("sklearn.linear_model", "train").LogisticRegression

    lr = LogisticRegression(C=float(cfg.get("C", 1.0)), max_iter=int(cfg.get("max_iter", 2000)))
    lr.fit(x, y)
    w, b = np.zeros((n_classes, x.shape[1])), np.full(n_classes, -30.0)
    if len(lr.classes_) == 2 and lr.coef_.shape[0] == 1:  # binary: logits (0, z)
        w[lr.classes_[1]], b[lr.classes_[1]] = lr.coef_[0], lr.intercept_[0]
        b[lr.classes_[0]] = 0.0
    else:
        w[lr.classes_], b[lr.classes_] = lr.coef_, lr.intercept_
    return w, b


def _cv_probs(x: np.ndarray, y: np.ndarray, groups: np.ndarray, n: int, cfg: dict[str, Any]) -> np.ndarray:
    """Cross-validated stacker probabilities (folds grouped by lesion) for an honest OOF figure."""
    GroupKFold = require("sklearn.model_selection", "train").GroupKFold

    k = min(int(cfg.get("cv_folds", 5)), len(set(groups)))
    probs = np.zeros((len(y), n))
    for tr, te in GroupKFold(n_splits=k).split(x, y, groups):
        w, b = _fit_lr(x[tr], y[tr], n, cfg)
        probs[te] = np.exp(_log_softmax(x[te] @ w.T + b))
    return probs


@dataclass
class Stacker:
    """Fitted meta-learner weights for the fine and coarse heads, plus how it scored out of fold."""

    fine_w: np.ndarray
    fine_b: np.ndarray
    coarse_w: np.ndarray
    coarse_b: np.ndarray
    info: dict[str, Any]


def fit_stacker(oof: OOF, cfg: dict[str, Any], lesion_groups: np.ndarray | None = None) -> Stacker:
    """Logistic regression on the OOF log-probabilities; reports OOF balanced accuracy of stacking (cross-
    validated by lesion) against plain probability averaging on the same images."""
    balanced_accuracy_score = require("sklearn.metrics", "train").balanced_accuracy_score

    n, nc = len(oof.classes), 2
    fw, fb = _fit_lr(oof.fine, oof.fine_labels, n, cfg)
    cw, cb = _fit_lr(oof.coarse, oof.coarse_labels, nc, cfg)
    g = oof.fine.shape[1] // n
    mean = np.log(np.exp(oof.fine.reshape(len(oof.fine), g, n)).mean(axis=1))
    groups = lesion_groups if lesion_groups is not None else oof.image_ids
    cv = _cv_probs(oof.fine, oof.fine_labels, groups, n, cfg)
    info = {
        "n_oof": int(len(oof.image_ids)),
        "features": int(oof.fine.shape[1]),
        "C": float(cfg.get("C", 1.0)),
        "oof_bal_acc_mean_prob": float(balanced_accuracy_score(oof.fine_labels, mean.argmax(1))),
        "oof_bal_acc_stack_cv": float(balanced_accuracy_score(oof.fine_labels, cv.argmax(1))),
    }
    return Stacker(fw, fb, cw, cb, info)


def lesion_groups(data_dir: str | Path, image_ids: np.ndarray) -> np.ndarray:
    """group_id of each image id from the prepared manifest (lesion-grouped CV for the stacker)."""
    from dermlens.data.manifest import read_manifest

    df = read_manifest(data_dir).set_index("image_id")
    return df.loc[list(image_ids), "group_id"].astype(str).to_numpy()
