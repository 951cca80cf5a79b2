"""ISIC Archive ingest on a folder in the Archive's current schema (real HAM10000 images and labels
rewritten as an isic-cli download), and `dermlens data fetch` without the network."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from dermlens.data import taxonomy as tx

# HAM10000 dx -> a real path of isic-metadata's DiagnosisEnum (diagnosis_1..diagnosis_4)
HIERARCHY = {
    "nv": ("Benign", "Benign melanocytic proliferations", "Nevus", "Nevus, NOS, Compound"),
    "mel": ("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive", None),
    "bcc": (
        "Malignant",
        "Malignant adnexal epithelial proliferations - Follicular",
        "Basal cell carcinoma",
        None,
    ),
    "akiec": ("Indeterminate", "Indeterminate epidermal proliferations", "Solar or actinic keratosis", None),
    "bkl": ("Benign", "Benign epidermal proliferations", "Seborrheic keratosis", None),
    "df": ("Benign", "Benign soft tissue proliferations - Fibro-histiocytic", "Dermatofibroma", None),
    "vasc": ("Benign", "Benign soft tissue proliferations - Vascular", "Hemangioma", None),
}
UNMAPPED = ("Benign", "Inflammatory or infectious diseases", "Verruca", None)
N_UNMAPPED, N_CLINICAL = 3, 4


def archive_folder(ham_root: Path, out: Path, lesions_per_class: int = 8) -> tuple[Path, pd.DataFrame]:
    """An isic-cli-style download: ISIC_*.jpg symlinks + metadata.csv in the Archive's current schema."""
    ham = pd.read_csv(ham_root / "HAM10000_metadata.csv")
    lesions = ham.drop_duplicates("lesion_id").groupby("dx").head(lesions_per_class)["lesion_id"]
    rows = ham[ham["lesion_id"].isin(lesions)].sort_values(["lesion_id", "image_id"]).reset_index(drop=True)
    patient = {les: f"IP_{i // 2:07d}" for i, les in enumerate(sorted(rows["lesion_id"].unique()))}
    levels = [HIERARCHY[d] for d in rows["dx"]]
    kind = ["dermoscopic"] * len(rows)
    extra = ham[~ham["lesion_id"].isin(lesions)].drop_duplicates("lesion_id").head(N_UNMAPPED + N_CLINICAL)
    meta = pd.DataFrame(
        {
            "isic_id": list(rows["image_id"]) + list(extra["image_id"]),
            "attribution": "ViDIR Group, Medical University of Vienna",
            "copyright_license": "CC-BY-NC",
            "age_approx": list(rows["age"]) + list(extra["age"]),
            "anatom_site_general": [
                tx.site_general(s) for s in list(rows["localization"]) + list(extra["localization"])
            ],
            "diagnosis_confirm_type": "histopathology",
            "image_type": kind + ["dermoscopic"] * N_UNMAPPED + ["clinical: close-up"] * N_CLINICAL,
            "lesion_id": list(rows["lesion_id"]) + list(extra["lesion_id"]),
            "patient_id": [patient[x] for x in rows["lesion_id"]]
            + [f"IP_9{i:06d}" for i in range(len(extra))],
            "sex": list(rows["sex"]) + list(extra["sex"]),
        }
    )
    extra_levels = [UNMAPPED] * N_UNMAPPED + [HIERARCHY[d] for d in extra["dx"].iloc[N_UNMAPPED:]]
    for k in range(5):
        meta[f"diagnosis_{k + 1}"] = [lv[k] if k < len(lv) else None for lv in levels + extra_levels]
    out.mkdir(parents=True, exist_ok=True)
    meta.to_csv(out / "metadata.csv", index=False)
    for image_id in meta["isic_id"]:
        os.symlink(ham_root / "images" / f"{image_id}.jpg", out / f"{image_id}.jpg")
    (out / "attribution.txt").write_text("ViDIR Group, Medical University of Vienna\n")
    return out, meta.assign(dx=list(rows["dx"]) + list(extra["dx"]))


@pytest.fixture(scope="module")
def archive(ham_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    return archive_folder(ham_root, tmp_path_factory.mktemp("isic_archive") / "download")


def prepare(root: Path, out: Path, *extra: str):
    from dermlens.cli.data import app

    args = ["prepare", "--dataset", "isic-archive", "--root", str(root), "--out", str(out), "--no-cache"]
    return CliRunner().invoke(app, [*args, "--folds", "0", "--workers", "1", *extra])


def test_every_dermlens_class_maps_from_the_real_archive_vocabulary() -> None:
    """Map isic-metadata's own DiagnosisEnum: known paths land on the right class, the rest is reported."""
    from isic_metadata.diagnosis_hierarchical import DiagnosisEnum

    mapped = {v.value: tx.archive_fine_code(v.value.split(":")) for v in DiagnosisEnum}
    for dx, path in HIERARCHY.items():
        assert mapped[":".join(p for p in path if p)] == dx
    assert mapped["Malignant:Malignant epidermal proliferations:Squamous cell carcinoma in situ"] == "akiec"
    assert mapped["Malignant:Malignant epidermal proliferations:Squamous cell carcinoma, Invasive"] == "scc"
    assert mapped["Benign:Benign melanocytic proliferations:Nevus:Blue nevus:Blue nevus, Cellular"] == "nv"
    assert mapped["Benign:Benign epidermal proliferations:Solar lentigo"] == "bkl"
    assert mapped["Benign:Inflammatory or infectious diseases:Verruca"] is None
    assert set(mapped.values()) - {None} == set(tx.FINE_CODES)


def test_prepare_maps_filters_and_groups_by_lesion_and_patient(archive, tmp_path: Path) -> None:
    from dermlens.data.manifest import read_manifest

    root, meta = archive
    res = prepare(root, tmp_path / "out", "--fractions", "0.6,0.2,0.2")
    assert res.exit_code == 0, res.output
    assert f"left out {N_CLINICAL} other image(s)" in res.output
    assert (
        "Benign:Inflammatory or infectious diseases:Verruca" in res.output
        and "3 image(s) whose" in res.output
    )
    df = read_manifest(tmp_path / "out")
    want = meta.set_index("isic_id")
    dermoscopic_mapped = want[(want["image_type"] == "dermoscopic") & (want["diagnosis_3"] != "Verruca")]
    assert sorted(df["image_id"]) == sorted(dermoscopic_mapped.index)
    assert (df["diagnosis"].to_numpy() == dermoscopic_mapped.loc[df["image_id"], "dx"].to_numpy()).all()
    assert (
        df["site"].fillna("") == want.loc[df["image_id"], "anatom_site_general"].fillna("").to_numpy()
    ).all()
    assert df.groupby("patient_id")["split"].nunique().max() == 1  # no patient spans two splits
    assert df.groupby("lesion_id")["split"].nunique().max() == 1
    assert df.groupby("patient_id")["lesion_id"].nunique().max() == 2  # patients link two lesions
    assert set(df["split"]) == {"train", "val", "test"}

    everything = prepare(root, tmp_path / "all", "--image-types", "all", "--fractions", "0.6,0.2,0.2")
    assert everything.exit_code == 0, everything.output
    assert len(read_manifest(tmp_path / "all")) == len(df) + N_CLINICAL


def test_prepare_refuses_a_folder_without_archive_metadata(ham_root: Path, tmp_path: Path) -> None:
    res = prepare(ham_root, tmp_path / "out")
    assert res.exit_code == 2 and "metadata.csv not found" in res.output
    assert "Traceback" not in res.output


def run_fetch(*args: str):
    from dermlens.cli.data import app

    return CliRunner().invoke(app, ["fetch", *args])


def test_fetch_uses_isic_cli_syntax() -> None:
    """The options dermlens passes exist in the installed isic-cli (its own --help)."""
    from dermlens.data.fetch import client_command, download_args

    help_text = subprocess.run(
        [*client_command(), "image", "download", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "OUTDIR" in help_text
    for flag in ("--search", "--collections", "--limit"):
        assert flag in help_text and flag in download_args(Path("x"), "age_approx:50", "66", 3)


def test_fetch_without_client_or_network_is_one_line(tmp_path: Path, monkeypatch) -> None:
    missing = run_fetch("--out", str(tmp_path / "a"), "--collections", "66", "--client", "no-such-isic-cli")
    assert missing.exit_code == 2 and "pip install 'dermlens[isic]'" in missing.output
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there: no network
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    offline = run_fetch("--out", str(tmp_path / "b"), "--search", "age_approx:50", "--limit", "2")
    assert offline.exit_code == 2, offline.output
    assert "cannot reach the ISIC Archive" in offline.output and len(offline.output.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
    nothing = run_fetch("--out", str(tmp_path / "c"))
    assert nothing.exit_code == 2 and "--search" in nothing.output
