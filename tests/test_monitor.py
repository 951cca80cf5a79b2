"""Drift monitoring on a real shift: HAM10000 test-split images, then ISIC 2017 images (other clinics),
served through the real API into a real SQLite record store; `dermlens monitor` and /monitor on both."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from bundles import bundle_dir  # tests/bundles.py
from dermlens import DISCLAIMER

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from monitor_shift import ham_test, isic2017, record  # noqa: E402  (the measurement script's own helpers)

N = 120  # images per window
pytestmark = pytest.mark.slow  # serves 240 real images through the API
TOKEN = "monitor-test-token"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A record store holding N HAM10000 test predictions, then N ISIC 2017 predictions; the boundaries."""
    from dermlens.infer.predictor import Predictor
    from dermlens.serve.api import create_app
    from dermlens.serve.settings import load_settings

    url = f"sqlite:///{tmp_path_factory.mktemp('monitor') / 'records.db'}"
    settings = load_settings(records={"url": url}, api_token=TOKEN)
    predictor = Predictor.load(bundle_dir(), threads=1)
    with TestClient(create_app(settings, predictor=predictor), base_url="http://localhost") as client:
        client.headers["Authorization"] = f"Bearer {TOKEN}"
        t0 = datetime.now(UTC)
        record(client, ham_test(N))
        t1 = datetime.now(UTC)
        record(client, isic2017(N))
        yield client, url, t0, t1


def run_monitor(url: str, *args: str):
    from dermlens.cli.main import app

    return CliRunner().invoke(app, ["monitor", "--records-url", url, "--model", str(bundle_dir()), *args])


def test_alerts_fire_on_the_shifted_window_only(served, tmp_path: Path) -> None:
    _, url, t0, t1 = served
    ham = run_monitor(
        url, "--since", t0.isoformat(), "--until", t1.isoformat(), "--json", str(tmp_path / "a.json")
    )
    assert ham.exit_code == 0, ham.output
    assert "no alert" in ham.output
    summary = json.loads((tmp_path / "a.json").read_text())
    assert summary["n_window"] == N and not summary["alert"]
    assert {r["signal"] for r in summary["results"]} == {"class_mix", "confidence", "ood_score", "refer_rate"}

    report = tmp_path / "report.html"
    other = run_monitor(
        url, "--since", t1.isoformat(), "--out", str(report), "--json", str(tmp_path / "b.json")
    )
    assert other.exit_code == 1, other.output  # a cron job sees the alert in the exit status
    shifted = json.loads((tmp_path / "b.json").read_text())
    assert shifted["n_window"] == N and shifted["alert"]
    assert {"ood_score", "class_mix"} <= set(shifted["alerts"])
    ood = next(r for r in shifted["results"] if r["signal"] == "ood_score")
    assert ood["p_value"] < 1e-6 and ood["effect"] > 0.5
    page = report.read_text()
    assert "ALERT" in page and DISCLAIMER in page and page.count("data:image/png;base64,") == 2


def test_windows_and_bad_arguments(served) -> None:
    _, url, t0, _ = served
    whole = run_monitor(url, "--last", str(2 * N))
    assert whole.exit_code == 1, whole.output
    early = run_monitor(url, "--until", t0.isoformat())
    assert early.exit_code == 0 and "nothing tested" in early.output
    bad = run_monitor(url, "--since", "yesterday-ish")
    assert bad.exit_code == 2 and "neither ISO 8601" in bad.output


def test_monitor_page_behind_the_token(served) -> None:
    client, _, _, t1 = served
    anonymous = client.get("/monitor", headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    page = client.get("/monitor", params={"since": t1.isoformat()})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "ALERT" in page.text and DISCLAIMER in page.text
    data = client.get("/monitor", params={"since": t1.isoformat(), "format": "json"}).json()
    assert data["alert"] and data["n_window"] == N
    cli = run_monitor(served[1], "--since", t1.isoformat())
    assert cli.exit_code == 1
    assert client.get("/monitor", params={"since": "soon"}).status_code == 400


def test_psi_and_tests_on_known_samples() -> None:
    from dermlens.monitor.drift import psi, refer_rate

    rng = np.random.default_rng(0)
    ref = rng.normal(size=5000)
    assert psi(rng.normal(size=2000), ref) < 0.02
    assert psi(rng.normal(1.0, size=2000), ref) > 0.5
    same = refer_rate(rng.random(400) < 0.17, rng.random(1500) < 0.17, 0.05, 0.01)
    assert not same.alert and same.p_value > 0.01
    more = refer_rate(rng.random(400) < 0.30, rng.random(1500) < 0.17, 0.05, 0.01)
    assert more.alert and more.effect > 0.1
