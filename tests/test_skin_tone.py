"""Skin tone from real HAM10000 images: ITA of the skin outside the lesion mask (or a border ring), its
band, and the `dermlens evaluate skin-tone` audit per band without metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dermlens.cli.main import app
from dermlens.evaluate.skin_tone import MASK, RING, ItaSettings, band, load_image, load_mask, skin_ita

IMAGE = "ISIC_0024306"


@pytest.fixture(scope="module")
def cfg() -> ItaSettings:
    return ItaSettings.load()


def test_ita_from_the_mask_is_plausible_and_falls_for_a_darker_copy(ham_root: Path, cfg: ItaSettings):
    rgb = load_image(ham_root / "images" / f"{IMAGE}.jpg", 600)
    mask = load_mask(ham_root / "masks", IMAGE)
    assert mask is not None and 0.05 < mask.mean() < 0.8
    light = skin_ita(rgb, mask, cfg)
    assert light.method == MASK and light.n_pixels > 1000
    assert 28 < light.ita < 90, light  # HAM10000 is mostly light skin: an intermediate-to-very-light band
    assert band(light.ita, cfg.bands) in ("very_light", "light", "intermediate")
    darker = skin_ita((rgb * 0.55).astype(np.uint8), mask, cfg)
    assert darker.ita < light.ita - 20, (light, darker)
    names = [n for n, _ in cfg.bands]
    assert names.index(band(darker.ita, cfg.bands)) > names.index(band(light.ita, cfg.bands))
    ring = skin_ita(rgb, None, cfg)
    assert ring.method == RING and abs(ring.ita - light.ita) < 10


def test_bands_follow_the_del_bino_edges(cfg: ItaSettings) -> None:
    got = [band(x, cfg.bands) for x in (60, 50, 30, 20, 0, -40, None)]
    assert got == ["very_light", "light", "intermediate", "tan", "brown", "dark", "unknown"]


def test_skin_tone_audit_counts_every_band(ham_prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "skin.json"
    res = CliRunner().invoke(
        app,
        ["evaluate", "skin-tone", "--manifest", str(ham_prepared), "--out", str(out), "--limit", "40"]
        + ["--n-bootstrap", "20"],
    )
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    s = result["sets"]["ham10000/test"]
    counts = s["band_counts"]
    assert list(counts) == ["very_light", "light", "intermediate", "tan", "brown", "dark", "unknown"]
    assert sum(c["n_images"] for c in counts.values()) == s["n_images"] == 40
    assert s["ita_method_counts"] == {"mask": 40}
    attrs = {r["attribute"] for r in s["audit"]["rows"]}
    assert attrs == {"sex", "age_band", "site", "skin_tone"}
    row = next(r for r in s["audit"]["rows"] if r["attribute"] == "skin_tone")
    assert set(row["metrics"]) == {"balanced_accuracy", "mel_sensitivity", "ece", "refer_rate"}
    assert result["model_version"] and result["cpu"] and result["metadata"].startswith("withheld")
