"""Validation of damaged real data: each problem is found and counted; skip drops, fail exits cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import make_ham_subset
from dermlens.cli.data import EXIT_INVALID, EXIT_USAGE, app
from dermlens.data.manifest import read_manifest
from dermlens.data.readers import read_ham10000
from dermlens.data.validate import drop_bad_rows, validate


def _damage(root: Path) -> dict[str, list[str]]:
    """Damage a HAM-layout copy in place; return the image ids expected under each problem kind."""
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    sizes = meta["lesion_id"].map(meta["lesion_id"].value_counts())
    singles = meta.loc[sizes == 1, "image_id"].tolist()
    truncated, zero, missing, unknown, dup, old, negative = singles[:7]
    images = root / "images"

    data = (images / f"{truncated}.jpg").read_bytes()
    (images / f"{truncated}.jpg").unlink()
    (images / f"{truncated}.jpg").write_bytes(data[: len(data) // 2])
    (images / f"{zero}.jpg").unlink()
    (images / f"{zero}.jpg").write_bytes(b"")
    (images / f"{missing}.jpg").unlink()

    meta.loc[meta["image_id"] == unknown, "dx"] = "banana"
    meta.loc[meta["image_id"] == old, "age"] = 150.0
    meta.loc[meta["image_id"] == negative, "age"] = -3.0
    multi = meta[sizes > 1]
    lesion = multi["lesion_id"].iloc[0]
    conflict = multi.loc[multi["lesion_id"] == lesion, "image_id"].tolist()
    first = meta.index[meta["image_id"] == conflict[0]][0]
    meta.loc[first, "dx"] = "vasc" if meta.loc[first, "dx"] != "vasc" else "df"
    meta = pd.concat([meta, meta[meta["image_id"] == dup]], ignore_index=True)
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)
    return {
        "missing_file": [missing],
        "corrupt_image": [truncated, zero],
        "unknown_label": [unknown],
        "duplicate_id": [dup],
        "conflicting_labels": conflict,
        "impossible_age": [old, negative],
    }


@pytest.fixture
def damaged(ham_root: Path, tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    root = make_ham_subset(ham_root, tmp_path / "ham", per_class=12)
    return root, _damage(root)


def _run(*args: str):
    return CliRunner().invoke(app, ["prepare", "--dataset", "ham10000", "--workers", "1", *args])


def test_validate_finds_every_problem(damaged):
    root, expected = damaged
    df = read_ham10000(root)
    report = validate(df, workers=1)
    found = {i.kind: sorted(df.loc[i.rows, "image_id"]) for i in report.issues}
    assert found == {k: sorted(v) for k, v in expected.items()}
    corrupt = next(i for i in report.issues if i.kind == "corrupt_image")
    assert any("empty" in e or "not a supported image format" in e for e in corrupt.examples)
    assert any("truncated" in e for e in corrupt.examples)
    clean = drop_bad_rows(df, report)
    assert len(clean) == len(df) - len(report.bad_rows)
    assert validate(clean, workers=1).ok


def test_skip_drops_bad_rows_and_reports(damaged, tmp_path):
    root, expected = damaged
    out = tmp_path / "out"
    result = _run("--root", str(root), "--out", str(out), "--on-error", "skip", "--folds", "2")
    assert result.exit_code == 0, result.output
    assert "Skipped" in result.output and "truncated" in result.output
    report = json.loads((out / "validation_report.json").read_text())
    counts = {i["kind"]: i["count"] for i in report["issues"]}
    assert counts == {k: len(v) for k, v in expected.items()}
    assert report["action"] == "skip" and report["n_bad_rows"] == sum(counts.values())
    df = read_manifest(out)
    bad = {i for ids in expected.values() for i in ids} - set(expected["duplicate_id"])
    assert not bad & set(df["image_id"])
    assert df["image_id"].is_unique and set(expected["duplicate_id"]) <= set(df["image_id"])
    assert (out / "cache" / "images_150x200.npy").is_file()


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("corrupt_image", "truncated"),
        ("missing_file", "image file missing"),
        ("unknown_label", "banana"),
        ("duplicate_id", "duplicate image id"),
        ("conflicting_labels", "different diagnoses"),
        ("impossible_age", "age 150"),
    ],
)
def test_fail_exits_cleanly_naming_the_problem(ham_root, tmp_path, kind, needle):
    root = make_ham_subset(ham_root, tmp_path / "ham", per_class=12)
    expected = _damage(root)
    if kind != "corrupt_image":  # isolate one problem: repair the others
        _repair(root, ham_root, keep=kind, expected=expected)
    out = tmp_path / "out"
    result = _run("--root", str(root), "--out", str(out), "--on-error", "fail")
    assert result.exit_code == EXIT_INVALID, result.output
    assert "Traceback" not in result.output
    assert "validation failed" in result.output and needle in result.output
    if kind in ("corrupt_image", "missing_file"):
        assert f"{expected[kind][0]}.jpg" in result.output  # names the file
    assert not (out / "manifest.csv").exists()
    report = json.loads((out / "validation_report.json").read_text())
    assert report["action"] == "fail" and kind in {i["kind"] for i in report["issues"]}


def _repair(root: Path, ham_root: Path, keep: str, expected: dict[str, list[str]]) -> None:
    """Undo every damage except `keep` (images re-linked, metadata restored except the kept problem)."""
    for kind in ("missing_file", "corrupt_image"):
        if kind != keep:
            for i in expected[kind]:
                (root / "images" / f"{i}.jpg").unlink(missing_ok=True)
                os.symlink(ham_root / "images" / f"{i}.jpg", root / "images" / f"{i}.jpg")
    meta = pd.read_csv(root / "HAM10000_metadata.csv")
    orig = pd.read_csv(ham_root / "HAM10000_metadata.csv").set_index("image_id")
    if keep != "duplicate_id":
        meta = meta.drop_duplicates("image_id")
    for col, kinds in (("dx", ("unknown_label", "conflicting_labels")), ("age", ("impossible_age",))):
        for kind in kinds:
            if kind != keep:
                for i in expected[kind]:
                    meta.loc[meta["image_id"] == i, col] = orig.at[i, col]
    meta.to_csv(root / "HAM10000_metadata.csv", index=False)


def test_user_errors_exit_2_with_one_line(tmp_path):
    result = _run("--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert result.exit_code == EXIT_USAGE
    assert result.output.strip().count("\n") == 0 and "does not exist" in result.output
    result = _run("--root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert result.exit_code == EXIT_USAGE and "HAM10000_metadata.csv not found" in result.output
    bad_fractions = _run("--root", str(tmp_path), "--fractions", "0.9,0.2,0.1")
    assert bad_fractions.exit_code == EXIT_USAGE and "--fractions" in bad_fractions.output
    for args, needle in (
        (["--dataset", "mnist", "--root", "."], "--dataset 'mnist' is not one of"),
        (["--root", "."], "--dataset is required"),
        (["--dataset", "csv"], "--root is required"),
        (["--dataset", "ham10000", "--root", ".", "--on-error", "maybe"], "skip|fail"),
    ):
        result = CliRunner().invoke(app, ["prepare", *args])
        assert result.exit_code == EXIT_USAGE and needle in result.output, result.output
        assert result.output.strip().count("\n") == 0


@pytest.mark.slow
def test_real_entry_point_no_traceback(tmp_path, data_root):
    """The installed command: missing CSV -> exit 2; ISIC 2019 without images -> exit 1, or CSV-only."""
    exe = Path(sys.executable).parent / "dermlens"
    base = [str(exe), "data", "prepare"]
    proc = subprocess.run(
        [*base, "--dataset", "isic2017", "--root", str(tmp_path), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == EXIT_USAGE and "Traceback" not in proc.stderr + proc.stdout
    assert "ISIC-2017_labels.csv not found" in proc.stderr

    root = tmp_path / "isic2019"  # the real CSVs, first 3000 rows (no images, as in the shared copy)
    root.mkdir()
    for name in ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"):
        pd.read_csv(data_root / "isic2019" / name, nrows=3000).to_csv(root / name, index=False)
    args = ["--dataset", "isic2019", "--root", str(root), "--out", str(tmp_path / "i19"), "--folds", "0"]
    proc = subprocess.run([*base, *args, "--on-error", "fail"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_INVALID and "Traceback" not in proc.stderr + proc.stdout
    assert "image file missing: 3000" in proc.stderr and "--no-check-images" in proc.stderr
    proc = subprocess.run([*base, *args, "--no-check-images"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    df = read_manifest(tmp_path / "i19")
    assert len(df) == 3000 and not (tmp_path / "i19" / "cache").exists()
    assert df.groupby("group_id")["split"].nunique().max() == 1
