"""The shipped bundle's not-dermoscopy head on real images: PAD-UFES-20 smartphone photos of held-out
patients are refused, held-out dermoscopy images of every source (84 px BCN thumbnails included) are
accepted; the measurement commands run on a tiny subset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from bundles import bundle_dir
from dermlens.bundle import TRUST
from dermlens.data.prepare import PrepareOptions, prepare
from dermlens.infer.state import TrustState
from dermlens.trust.shift import Runner
from dermlens.trust.sources import score_rows, select

N = 24  # images per source in the acceptance test


@pytest.fixture(scope="module")
def prepared(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four sources prepared with their default splits (no image check, no cache: seconds)."""
    out = {}
    for name in ("pad_ufes20", "ham10000", "isic2017", "isic2019"):
        folder = tmp_path_factory.mktemp(name)
        opts = PrepareOptions(name, data_root / name, folder, folds=0, build=False, check_images=False)
        prepare(opts, show=lambda _: None)
        out[name] = folder
    return out


def _refused(run: Runner, state: TrustState, rows: pd.DataFrame) -> np.ndarray:
    scored = score_rows(run, rows, "test", log=lambda _: None, both=False)
    return state.decide(scored.logits_meta, scored.embedding, None)["not_dermoscopy"]


def test_shipped_head_refuses_photos_and_accepts_dermoscopy(prepared: dict[str, Path]) -> None:
    bundle = bundle_dir()
    run, state = Runner(bundle, threads=2), TrustState.load(bundle / TRUST)
    photos = select(prepared["pad_ufes20"], "test", N, seed=1)
    assert _refused(run, state, photos).mean() >= 0.8
    for name in ("ham10000", "isic2017", "isic2019"):
        rows = select(prepared[name], "test", N, seed=1)
        refused = _refused(run, state, rows)
        assert refused.sum() <= 2, f"{name}: {int(refused.sum())} of {N} test images refused"
        if name == "isic2019":  # the 84 px BCN thumbnails, upsampled like any small upload
            assert {Image.open(p).size for p in rows["image_path"]} == {(84, 84)}


def test_old_names_in_trust_npz_still_load(tmp_path: Path) -> None:
    """A trust.npz written with the old clinical_* keys loads into the not_dermoscopy_* fields."""
    w = np.arange(4, dtype=np.float32)
    header = {"clinical_bias": 0.5, "clinical_threshold": 1.5, "version": 1}
    np.savez(tmp_path / "t.npz", header=np.array(json.dumps(header)), clinical_weight=w)
    state = TrustState.load(tmp_path / "t.npz")
    assert np.array_equal(state.not_dermoscopy_weight, w)
    assert (state.not_dermoscopy_bias, state.not_dermoscopy_threshold) == (0.5, 1.5)
    emb = np.eye(4, dtype=np.float32)
    assert state.decide(np.zeros((4, 7)), emb)["not_dermoscopy"].tolist() == [False, False, True, True]


def test_measure_commands_on_a_tiny_subset(prepared: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from dermlens.cli.main import app

    monkeypatch.setenv("DERMLENS_WORK", str(tmp_path / "work"))
    cfg = {
        "not_dermoscopy": {"photos": {"dir": str(prepared["pad_ufes20"])}, "ci_resamples": 50},
        "sources": {k: {"dir": str(prepared[k])} for k in ("ham10000", "isic2017", "isic2019")},
    }
    cfg["sources"]["isic2017"]["held_out"] = 0.25
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    base = ["--bundle", str(bundle_dir()), "--config", str(tmp_path / "c.yaml"), "--limit", "6"]
    res = CliRunner().invoke(
        app, ["trust", "measure-not-dermoscopy", *base, "--out", str(tmp_path / "nd.json")]
    )
    assert res.exit_code == 0, res.output
    nd = json.loads((tmp_path / "nd.json").read_text())
    assert nd["test"]["pad_ufes20_refused"]["n"] == 6 and set(nd["test"]["dermoscopy_false_refusal"]) == {
        "ham10000",
        "isic2017",
        "isic2019",
    }
    assert set(nd["synthetic_views_comparison"]["val"]) == {"real", "real+synthetic"}
    assert "per_type" in nd["fitzpatrick_pad_val_test"] and nd["cpu"]
    res = CliRunner().invoke(app, ["trust", "measure-sources", *base, "--out", str(tmp_path / "ts.json")])
    assert res.exit_code == 0, res.output
    ts = json.loads((tmp_path / "ts.json").read_text())
    assert set(ts["test"]) == {"ham10000", "isic2017", "isic2019"}
    assert 0.0 <= ts["test"]["ham10000"]["meta"]["conformal"]["coverage"]["value"] <= 1.0
    res = CliRunner().invoke(app, ["trust", "measure-sources", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "Traceback" not in res.output


@pytest.mark.slow
def test_release_compare_scores_every_source_paired(
    prepared: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """`release compare`: a bundle against itself differs by exactly 0 on every source; the figures are
    balanced accuracies over each source's own classes."""
    from typer.testing import CliRunner

    from dermlens.cli.main import app

    monkeypatch.setenv("DERMLENS_WORK", str(tmp_path / "work"))
    cfg = {"sources": {k: {"dir": str(prepared[k])} for k in ("ham10000", "isic2017", "isic2019")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cmp.json"
    args = ["--model", str(bundle_dir()), "--versus", str(bundle_dir()), "--config", str(tmp_path / "c.yaml")]
    res = CliRunner().invoke(
        app, ["release", "compare", *args, "--limit", "40", "--role", "test", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    table = json.loads(out.read_text())
    assert table["role"] == "test" and set(table["sources"]) == {"ham10000", "isic2017", "isic2019"}
    assert set(table["sources"]["isic2017"]) == {"ba_3"} and set(table["sources"]["isic2019"]) == {
        "ba_8",
        "ba_7",
    }
    for figures in table["sources"].values():
        for fig in figures.values():
            assert fig["model"] == fig["versus"] and fig["difference"] == {
                "value": 0,
                "ci_low": 0,
                "ci_high": 0,
            }
            assert 0 <= fig["model"]["ci_low"] <= fig["model"]["value"] <= fig["model"]["ci_high"] <= 1
    assert table["sources"]["isic2019"]["ba_7"]["class_counts"].get("scc") is None  # scc images left out
    res = CliRunner().invoke(
        app, ["release", "compare", "--model", str(bundle_dir()), "--role", "train", "--out", str(out)]
    )
    assert res.exit_code == 2 and "val or test" in res.output
