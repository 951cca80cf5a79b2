"""Research tools on a real ~280-image HAM10000 subset at 64x80: fold members -> ensemble bundle ->
distilled student -> student bundle (the resumable release build), stacking on out-of-fold predictions,
and the Optuna study that resumes from SQLite."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

pytestmark = pytest.mark.slow
torch.set_num_threads(1)
TINY = [
    "preprocess.height=64",
    "preprocess.width=80",
    "data.batch_size=16",
    "trainer.threads=1",
    "trainer.patience=0",
    "trainer.log_every_n_steps=1",
    "trainer.time_budget_min=null",
    "trainer.max_time=null",
    "trainer.freeze_epochs=0",
    "augment.color_jitter=0",
]
FAST_EXPORT = {
    "int8": {"calibration_images": 32, "fallbacks": []},
    "trust": {"train_images": 96},
    "parity": {"images": 8},
}


def run_cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from dermlens.cli.main import app

    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def build(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny release build: 2 fold members (mean_prob) -> ensemble bundle -> student -> student bundle."""
    out = tmp_path_factory.mktemp("release_build")
    recipe = {
        "out": str(out),
        "data": [],  # the tiny folder is prepared already; nothing is shipped
        "holdout": {},
        "ship": {},
        "overrides": [
            f"data.dir={tiny_dir}",
            *TINY,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
        ],
        "ensemble": {
            "base_config": "train.yaml",
            "folds": 2,
            "fold_pool": "train",
            "combine": "mean_prob",
            "export": FAST_EXPORT,
        },
        "distill": {
            "config": "train.yaml",
            "overrides": ["trainer.max_epochs=3", "trainer.limit_train_batches=4", "optim.lr=3e-3"],
        },
        "export": FAST_EXPORT,
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, output = run_cli("release", "build", "--recipe", str(path))
    assert code == 0, output
    return {"out": out, "recipe": path, "data": tiny_dir, "output": output}


def test_fold_split_moves_only_the_pool(tiny_dir: Path) -> None:
    from dermlens.data.manifest import read_manifest
    from dermlens.train.folds import FoldError, fold_split

    df = read_manifest(tiny_dir)
    got = fold_split(df, 1, "train")
    was_train = df["split"] == "train"
    assert (got.loc[was_train & (df["fold"] == 1), "split"] == "val").all()
    assert (got.loc[was_train & (df["fold"] != 1), "split"] == "train").all()
    assert (got.loc[df["split"] == "val", "split"] == "heldout").all()  # the val split stays unseen
    assert (got.loc[df["split"] == "test", "split"] == "test").all()
    assert not set(got.loc[got["split"] == "val", "group_id"]) & set(
        got.loc[got["split"] == "train", "group_id"]
    )
    both = fold_split(df, 0, "train+val")
    assert set(both.loc[df["split"] == "val", "split"]) <= {"train", "val"}
    with pytest.raises(FoldError, match="fold 9"):
        fold_split(df, 9, "train")


def test_ensemble_bundle_is_the_mean_of_its_members(build: dict) -> None:
    """The ensemble bundle loads in the Predictor like any bundle; its probabilities are the members' mean."""
    import onnx

    from dermlens.data.manifest import read_manifest
    from dermlens.export.checkpoint import find_checkpoint, load_checkpoint
    from dermlens.export.graph import export_onnx
    from dermlens.infer.predictor import Predictor
    from dermlens.infer.prepare import encode_meta
    from dermlens.infer.session import OUTPUTS, OnnxModel
    from dermlens.preprocess import load_rgb

    bundle = build["out"] / "ensemble" / "bundle"
    graph = onnx.load(str(bundle / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["image", "meta"] and [o.name for o in graph.output] == list(
        OUTPUTS
    )
    pred = Predictor.load(bundle, precision="fp32", threads=1)
    assert pred.card.architecture == "ensemble(2x tf_efficientnet_lite0, mean_prob)"
    df = read_manifest(build["data"])
    rows = df[df["split"] == "val"].head(12)
    images = [load_rgb(p) for p in rows["image_path"]]
    meta = [
        {"age": a, "sex": s, "site": t}
        for a, s, t in zip(rows["age"], rows["sex"], rows["site"], strict=True)
    ]
    got = pred.predict_arrays(images, meta, cam=True)
    x = pred.prep.normalize(pred.prepare(images))
    m = encode_meta(meta, len(images))
    members = sorted((build["out"] / "ensemble" / "members").iterdir())
    assert [p.name for p in members] == ["lite0-fold0", "lite0-fold1"]
    probs = []
    for i, run in enumerate(members):
        net = load_checkpoint(find_checkpoint(run)).net
        onnx_path = export_onnx(net, build["out"] / f"member{i}.onnx", pred.prep)
        logits = OnnxModel(onnx_path, threads=1).run(x, m, feature_map=False)["fine_logits"]
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs.append(e / e.sum(1, keepdims=True))
    assert np.abs(got["probs_uncalibrated"] - np.mean(probs, axis=0)).max() <= 1e-4
    assert got["probs"].shape == (12, 7) and len(got["cam"]) == 12 and np.isfinite(got["ood_score"]).all()


def test_stacking_fits_on_out_of_fold_predictions(build: dict) -> None:
    from sklearn.linear_model import LogisticRegression

    from dermlens.data.manifest import read_manifest
    from dermlens.export.splits import load_split
    from dermlens.pipeline.ensemble_bundle import build_ensemble_model
    from dermlens.pipeline.release_build import load_build_recipe
    from dermlens.train.members import fit_stacker, out_of_fold, plan_members

    recipe = load_build_recipe(build["recipe"])["ensemble"]
    members = plan_members(recipe)
    oof = out_of_fold(members)
    df = read_manifest(build["data"])
    pool = df[(df["split"] == "train") & df["fold"].isin([0, 1])]
    assert sorted(oof.image_ids) == sorted(
        pool["image_id"]
    )  # every fold-0/1 image once, by its held-out member
    stacker = fit_stacker(
        oof, recipe["stack"], pool.set_index("image_id").loc[oof.image_ids, "group_id"].to_numpy()
    )
    assert stacker.fine_w.shape == (7, 7) and 0 <= stacker.info["oof_bal_acc_stack_cv"] <= 1
    model = build_ensemble_model(members, {**recipe, "combine": "stack"}, stacker)
    val = load_split(build["data"], "val", model.classes, model.prep)
    with torch.no_grad():
        fine = model.net.forward_all(
            torch.from_numpy(model.prep.normalize(val.images)), torch.from_numpy(val.meta)
        )[0]
        member_logits = torch.stack(
            [
                m.forward_all(torch.from_numpy(model.prep.normalize(val.images)), torch.from_numpy(val.meta))[
                    0
                ]
                for m in model.net.members
            ]
        )
        feats = model.net.group_log_probs(member_logits).numpy()
    lr = LogisticRegression(C=recipe["stack"]["C"], max_iter=recipe["stack"]["max_iter"]).fit(
        oof.fine, oof.fine_labels
    )
    ref = np.zeros((len(feats), 7))
    ref[:, lr.classes_] = lr.predict_proba(feats)
    assert np.abs(torch.softmax(fine, 1).numpy() - ref).max() <= 1e-4  # the LR is folded into the graph


def test_distilled_student_learns_and_exports(build: dict) -> None:
    from dermlens.infer.predictor import Predictor

    student = build["out"] / "student"
    log = pd.read_csv(student / "logs" / "csv" / "metrics.csv")
    per_epoch = (
        log.dropna(subset=["train/loss_epoch"]).groupby("epoch")[["train/loss_epoch", "train/kd"]].mean()
    )
    assert (
        len(per_epoch) == 3 and per_epoch["train/loss_epoch"].iloc[-1] < per_epoch["train/loss_epoch"].iloc[0]
    )
    with np.load(student / "teacher.npz") as z:
        assert z["fine_logits"].shape == (len(z["image_ids"]), 7)
        assert (
            str(z["teacher_version"])
            == json.loads((build["out"] / "ensemble" / "bundle" / "card.json").read_text())["version"]
        )
    pred = Predictor.load(build["out"] / "student_bundle", threads=1)
    assert pred.card.architecture == "tf_efficientnet_lite0"
    summary = json.loads((build["out"] / "release_build.json").read_text())
    assert summary["choice"]["default"] in ("student", "ensemble")
    assert summary["ensemble"]["size_bytes"]["model.onnx"] > summary["student"]["size_bytes"]["model.onnx"]


def test_distill_command_exports_with_external_trust(build: dict, tiny_dir: Path, tmp_path: Path) -> None:
    """`distill --export B --external D`: the student bundle's trust is fitted with the external set."""
    run_dir, bundle = tmp_path / "student", tmp_path / "bundle"
    code, output = run_cli(
        "distill",
        "--teacher",
        str(build["out"] / "ensemble" / "bundle"),
        "--config",
        "train.yaml",
        "--export",
        str(bundle),
        "--external",
        str(tiny_dir),
        f"data.dir={tiny_dir}",
        *TINY,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        f"trainer.run_dir={run_dir}",
    )
    assert code == 0, output
    card = json.loads((bundle / "card.json").read_text())
    assert card["metrics"]["trust"]["shift"]["n_external"] > 0 and "student val balanced accuracy" in output


def test_release_build_resumes_and_never_retrains(build: dict) -> None:
    members = build["out"] / "ensemble" / "members"
    ckpts = {p: p.stat().st_mtime_ns for p in build["out"].rglob("*.ckpt")}
    (members / "lite0-fold1" / "finished.json").unlink()  # as if killed after its last epoch was saved
    code, output = run_cli("release", "build", "--recipe", str(build["recipe"]))
    assert code == 0, output
    assert "lite0-fold0: finished earlier" in output and f"resuming from {members / 'lite0-fold1'}" in output
    assert "stage ensemble: finished earlier, skipped" in output
    assert "student: finished earlier" in output and "stage student_export: finished earlier" in output
    last = torch.load(
        members / "lite0-fold1" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert last["epoch"] == 0 and last["global_step"] == 3  # nothing trained again
    assert {p: p.stat().st_mtime_ns for p in build["out"].rglob("*.ckpt")} == ckpts
    assert (members / "lite0-fold1" / "finished.json").is_file()


def test_ensemble_of_given_runs_trains_nothing(build: dict, tmp_path: Path) -> None:
    """`run:` members (already-trained runs) are combined as they are: no checkpoint is written or changed."""
    from dermlens.config import ConfigError
    from dermlens.train.members import plan_members

    run = build["out"] / "ensemble" / "members" / "lite0-fold0"
    ckpts = {p: p.stat().st_mtime_ns for p in build["out"].rglob("*.ckpt")}
    recipe = {
        "out": str(tmp_path / "given"),
        "folds": 0,
        "members": [{"name": "a", "run": str(run)}, {"name": "b", "run": str(run)}],
        "export": FAST_EXPORT,
    }
    path = tmp_path / "given.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, output = run_cli("ensemble", "--recipe", str(path))
    assert code == 0, output
    assert output.count("a given run, used as it is") == 2
    summary = json.loads((tmp_path / "given" / "ensemble.json").read_text())
    assert summary["architecture"] == "ensemble(2x tf_efficientnet_lite0, mean_prob)"
    assert set(summary["members"]) == {"a", "b"} and summary["members"]["a"]["bal_acc"] is not None
    assert {p: p.stat().st_mtime_ns for p in build["out"].rglob("*.ckpt")} == ckpts
    assert not (tmp_path / "given" / "members").exists()
    with pytest.raises(ConfigError, match="needs folds: 0"):
        plan_members({**recipe, "folds": 2})
    path.write_text(yaml.safe_dump({**recipe, "members": [{"name": "a", "run": str(tmp_path / "nope")}]}))
    code, output = run_cli("ensemble", "--recipe", str(path))
    assert code == 2 and "ensemble member a:" in output and "Traceback" not in output, output


def test_tune_resumes_from_sqlite(tiny_dir: Path, tmp_path: Path) -> None:
    import optuna

    from dermlens.train.tune import load_study_config, run_study

    study = {
        "study": "tiny",
        "out": str(tmp_path / "tune"),
        "n_trials": 1,
        "base_config": "train.yaml",
        "sampler": {"type": "random", "seed": 3},
        "overrides": [
            f"data.dir={tiny_dir}",
            *TINY,
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=2",
            "model.metadata=true",
            f"data.external_val={tiny_dir}",
        ],
        "space": {
            "optim.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
            "model.dropout": {"type": "categorical", "choices": [0.2, 0.3]},
        },
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    first = run_study(load_study_config(path), print)
    assert (
        first["counts"]["COMPLETE"] == 1 and first["trials"][0]["epochs_reported"] == 2
    )  # reported per epoch
    base = first["trials"][0]  # trial 0 is train.yaml's own values: the others are judged against it
    assert base["base_recipe"] and base["param:optim.lr"] == 1e-3 and base["param:model.dropout"] == 0.2
    ran = json.loads((Path(base["run_dir"]) / "metrics_val.json").read_text())  # the run's own figures
    assert base["external_bal_acc3"] == ran["external"]["bal_acc3"] and 0 <= base["external_bal_acc3"] <= 1
    assert base["val_bal_acc_no_metadata"] == ran["no_metadata"]["bal_acc"] and first["cpu"]
    done0 = Path(first["trials"][0]["run_dir"]) / "finished.json"
    stamp = done0.stat().st_mtime_ns
    db = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tune' / 'study.db'}")
    db.enqueue_trial({"optim.lr": 1e-3, "model.dropout": 0.3}, user_attrs={"base_recipe": True})
    db.ask()  # a trial left RUNNING, as by a killed process (flagged like a base-recipe trial)
    code, output = run_cli("tune", "--study", str(path), "--n-trials", "2")
    assert code == 0, output
    assert "trial 1 was interrupted: queued again" in output
    res = json.loads((tmp_path / "tune" / "results.json").read_text())
    states = {t["trial"]: t["state"] for t in res["trials"]}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE"}
    rerun = next(t for t in res["trials"] if t["trial"] == 2)
    assert rerun["param:optim.lr"] == 1e-3 and rerun["param:model.dropout"] == 0.3
    assert rerun["base_recipe"]  # the resumed trial keeps its flag
    assert done0.stat().st_mtime_ns == stamp  # trial 0 was not trained again
    for name in ("results.csv", "results.md", "optimization_history.png", "param_importances.png"):
        assert (tmp_path / "tune" / name).is_file(), name


def test_levers_train_one_change_each_and_tabulate(build: dict, tiny_dir: Path, tmp_path: Path) -> None:
    """`release levers`: each lever is the base plus one change (or a teacher to distil from); the table
    gives both metadata conditions."""
    recipe = {
        "base_config": "train.yaml",
        "out": str(tmp_path / "levers"),
        "overrides": [
            f"data.dir={tiny_dir}",
            *TINY,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "model.metadata=true",
            f"data.external_val={tiny_dir}",
        ],
        "levers": [
            {"name": "base", "overrides": []},
            {"name": "image_only", "overrides": ["model.metadata=false"]},
            {"name": "later", "overrides": ["optim.ema=0"]},
            {"name": "distilled", "overrides": [], "teacher": str(build["out"] / "ensemble" / "bundle")},
            # a finished run trained elsewhere, compared with another lever
            {"name": "reused", "run": str(tmp_path / "levers" / "base"), "versus": "image_only"},
        ],
    }
    path = tmp_path / "levers.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "levers.json"
    code, output = run_cli(
        "release",
        "levers",
        "-r",
        str(path),
        "--only",
        "base",
        "--only",
        "image_only",
        "--only",
        "distilled",
        "--out",
        str(out),
    )
    assert code == 0, output
    table = json.loads(out.read_text())
    rows = {r["lever"]: r for r in table["levers"]}
    assert set(rows) == {"base", "image_only", "distilled", "reused"} and table["not_run"] == ["later"]
    assert not (tmp_path / "levers" / "reused").exists() and rows["reused"]["versus"] == "image_only"
    assert rows["reused"]["delta_val_bal_acc"] == pytest.approx(-rows["image_only"]["delta_val_bal_acc"])
    assert (tmp_path / "levers" / "distilled" / "distill.json").is_file()  # trained on the teacher's logits
    assert rows["distilled"]["overrides"][-1].startswith("teacher=")
    assert rows["base"]["uses_metadata"] and not rows["image_only"]["uses_metadata"]
    assert rows["base"]["delta_val_bal_acc"] == 0 and rows["base"]["delta_val_bal_acc_ci95"] == [0, 0]
    low, high = rows["image_only"]["delta_val_bal_acc_ci95"]  # paired lesion bootstrap of the difference
    assert low <= rows["image_only"]["delta_val_bal_acc"] <= high
    only = rows["image_only"]
    assert only["val_bal_acc_no_metadata"] == only["val_bal_acc"]  # an image-only model has one condition
    assert only["delta_val_bal_acc"] == pytest.approx(only["val_bal_acc"] - rows["base"]["val_bal_acc"])
    assert 0 <= rows["base"]["val_bal_acc_no_metadata"] <= 1 and rows["base"]["external_bal_acc3"] is not None
    assert "not run yet: later" in output and table["cpu"] and rows["base"]["cpu"]
    # a run no longer on this machine keeps its earlier row; a fresh row is compared with it without a CI
    (tmp_path / "levers" / "image_only").rename(tmp_path / "image_only_elsewhere")
    code, output = run_cli("release", "levers", "-r", str(path), "--no-train", "--out", str(out))
    assert code == 0, output
    again = {r["lever"]: r for r in json.loads(out.read_text())["levers"]}
    assert again["image_only"] == {**rows["image_only"], "carried": True}
    assert again["reused"]["delta_val_bal_acc_ci95"] is None and "no paired CI" in output
    assert again["reused"]["delta_val_bal_acc"] == pytest.approx(rows["reused"]["delta_val_bal_acc"])
    bad = {**recipe, "levers": [*recipe["levers"], {"name": "bad", "overrides": ["model.nope=1"]}]}
    path.write_text(yaml.safe_dump(bad))
    code, output = run_cli("release", "levers", "-r", str(path))
    assert code == 2 and "unknown config key 'model.nope'" in output and "Traceback" not in output, output
    assert not (tmp_path / "levers" / "later").exists()  # checked before any training
    versus_unknown = {"name": "x", "versus": "nope"}
    path.write_text(yaml.safe_dump({**recipe, "levers": [*recipe["levers"], versus_unknown]}))
    code, output = run_cli("release", "levers", "-r", str(path), "--no-train")
    assert code == 2 and "no lever named 'nope'" in output and "Traceback" not in output, output


def test_research_cli_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"space": {"optim.nope": {"type": "float", "low": 0, "high": 1}}}))
    for args, msg in (
        (["train", "tune", "--study", str(bad)], "unknown config key 'optim.nope'"),
        (["train", "ensemble", "--recipe", str(tmp_path / "missing.yaml")], "ensemble recipe not found"),
        (["train", "distill"], "no teacher bundle"),
        (["release", "build", "--recipe", str(bad)], "unknown config key 'space'"),
    ):
        code, output = run_cli(*args)
        assert code == 2 and msg in output and "Traceback" not in output, (args, output)


@pytest.mark.skipif(
    not os.environ.get("DERMLENS_CORE_PYTHON"), reason="needs DERMLENS_CORE_PYTHON (CI sets it)"
)
def test_core_install_predicts_with_the_ensemble(build: dict, tmp_path: Path) -> None:
    """The torch-free install predicts a folder with the ensemble bundle."""
    from dermlens.data.manifest import read_manifest

    df = read_manifest(build["data"])
    folder = tmp_path / "images"
    folder.mkdir()
    for p in df["image_path"].head(4):
        os.symlink(p, folder / Path(p).name)
    cmd = [os.environ["DERMLENS_CORE_PYTHON"], "-m", "dermlens.cli.main", "predict", str(folder)]
    cmd += ["--model", str(build["out"] / "ensemble" / "bundle"), "--out", str(tmp_path / "p.csv")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(pd.read_csv(tmp_path / "p.csv")) == 4
