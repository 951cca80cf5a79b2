"""Outcomes on SQLite and a real PostgreSQL server: confirmed diagnoses attached through the API (token
protected) and the CLI CSV import, the 0002 -> 0003 migration, field performance in `dermlens monitor` and
/monitor on real predictions of real HAM10000 images with their true labels, and the refit from records
(refused below its minimum, a new bundle above it)."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from bundles import bundle_dir  # tests/bundles.py
from dermlens.bundle import read_card, verify_bundle
from dermlens.cli.main import app as cli_app
from dermlens.serve.api import create_app
from dermlens.serve.migrations import current_revision, head_revision, upgrade
from dermlens.serve.outcomes import confirmed_cases
from dermlens.serve.records import RecordStore
from dermlens.serve.settings import load_settings
from test_records import _drop_pg_database, _pg_database

TOKEN = "outcome-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PER_CLASS = 6  # real HAM10000 images per class: 42 confirmed cases


@pytest.fixture(scope="module")
def predictor():
    from dermlens.infer.predictor import Predictor

    return Predictor.load(bundle_dir(), threads=1)


@pytest.fixture(scope="module")
def ham_cases(ham_root: Path) -> pd.DataFrame:
    """PER_CLASS images of each HAM10000 class (first by image id), with their histopathology-or-not dx."""
    meta = pd.read_csv(ham_root / "HAM10000_metadata.csv").sort_values("image_id")
    picked = meta.groupby("dx", sort=True).head(PER_CLASS).reset_index(drop=True)
    picked["path"] = [ham_root / "images" / f"{i}.jpg" for i in picked["image_id"]]
    return picked


def _url(kind: str, tmp: Path, name: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'records.db'}"
    return _pg_database(f"dermlens_outcomes_{os.getpid()}_{name}")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request, predictor, ham_cases, tmp_path_factory):
    """Real predictions of the HAM images through the API, then their true labels attached: the first half
    through POST /records/{id}/outcome, the rest through `dermlens records outcome --csv` (by sha256)."""
    tmp = tmp_path_factory.mktemp(f"outcomes_{request.param}")
    url = _url(request.param, tmp, "served")
    settings = load_settings(records={"url": url}, api_token=TOKEN)
    app = create_app(settings, predictor=predictor)
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        ids = []
        for start in range(0, len(ham_cases), 16):
            part = ham_cases["path"][start : start + 16]
            files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in part]
            resp = client.post("/predict/batch", files=files, headers=AUTH)
            assert resp.status_code == 200, resp.text
            ids += [item["result"]["record_id"] for item in resp.json()["results"]]
        half = len(ids) // 2
        api = [
            client.post(
                f"/records/{rid}/outcome",
                json={"diagnosis": dx, "method": "histopathology", "date": "2026-01-15", "source": "lab A"},
                headers=AUTH,
            )
            for rid, dx in zip(ids[:half], ham_cases["dx"][:half], strict=True)
        ]
        csv_path = tmp / "outcomes.csv"
        rest = ham_cases.iloc[half:]
        pd.DataFrame(
            {
                "image_sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in rest["path"]],
                "diagnosis": [_spelled(dx) for dx in rest["dx"]],
                "method": "follow-up",
                "date": "2026-02-20",
            }
        ).to_csv(csv_path, index=False)
        cli = CliRunner().invoke(cli_app, ["records", "outcome", "--csv", str(csv_path), "--url", url])
        monitor_json = client.get("/monitor?format=json", headers=AUTH)
    yield {"url": url, "ids": ids, "api": api, "cli": cli, "monitor": monitor_json, "tmp": tmp}
    if request.param == "postgresql":
        _drop_pg_database(url)


def _spelled(dx: str) -> str:
    """Other spellings taxonomy.fine_code maps (the CSV import accepts any of them)."""
    return {"mel": "Melanoma", "nv": "melanocytic nevus", "akiec": "AK"}.get(dx, dx)


def test_outcomes_attach_through_api_and_cli(served, ham_cases) -> None:
    assert all(r.status_code == 201 for r in served["api"]), served["api"][0].text
    first = served["api"][0].json()
    assert first["method"] == "histopathology" and first["source"] == "lab A"
    assert first["confirmed_on"] == "2026-01-15" and first["record_id"] == served["ids"][0]
    assert served["cli"].exit_code == 0, served["cli"].output
    assert f"{len(ham_cases) - len(ham_cases) // 2} outcome(s) attached" in served["cli"].output
    store = RecordStore(served["url"])
    try:
        cases = confirmed_cases(store)
    finally:
        store.close()
    assert len(cases) == len(ham_cases)
    assert cases.set_index("record_id").loc[served["ids"], "diagnosis"].tolist() == ham_cases["dx"].tolist()
    assert set(cases["method"]) == {"histopathology", "follow-up"}


def test_monitor_shows_field_performance_with_intervals(served, ham_cases) -> None:
    out = served["tmp"] / "monitor.json"
    html = served["tmp"] / "monitor.html"
    args = ["monitor", "--records-url", served["url"], "--json", str(out), "--out", str(html)]
    result = CliRunner().invoke(cli_app, [*args, "--model", str(bundle_dir())])
    assert result.exit_code in (0, 1), result.output
    assert "field performance: 42 confirmed case(s)" in result.output and "biopsied" in result.output
    field = json.loads(out.read_text())["field_performance"]
    assert field["n_confirmed"] == field["n_scored"] == len(ham_cases) and field["status"] == "ok"
    assert field["n_lesions"] == len(ham_cases) and field["methods"] == {
        "histopathology": 21,
        "follow-up": 21,
    }
    for name in ("balanced_accuracy", "mel_sensitivity", "mel_specificity", "ece", "refer_rate"):
        m = field["metrics"][name]
        assert 0.0 <= m["value"] <= 1.0 and 0.0 <= m["low"] <= m["high"] <= 1.0, (name, m)
    bal = field["metrics"]["balanced_accuracy"]
    assert bal["low"] < bal["value"] < bal["high"]
    assert "Field performance on confirmed cases" in html.read_text()
    api = served["monitor"]
    assert api.status_code == 200, api.text
    assert api.json()["field_performance"]["metrics"] == field["metrics"]


def test_refit_from_records_refuses_below_minimum_and_writes_new_bundle(served, predictor) -> None:
    out = served["tmp"] / "refit"
    url = served["url"]
    if url.startswith(
        "postgresql"
    ):  # a password in the URL (the test server trusts any) never reaches the card
        url = make_url(url).set(password="s3cret-pw").render_as_string(hide_password=False)
    base = ["trust", "refit", "--from-records", "--records-url", url, "--bundle", str(bundle_dir())]
    refused = CliRunner().invoke(cli_app, [*base, "--out", str(out)])
    assert refused.exit_code == 2 and not out.exists()
    assert "needs 200 confirmed cases" in refused.output and "there are 42" in refused.output
    low = ["from_records.min_cases=30", "from_records.min_per_class=5"]
    result = CliRunner().invoke(cli_app, [*base, "--out", str(out), *low])
    assert result.exit_code == 0, result.output
    card, source = read_card(out), read_card(bundle_dir())
    assert card.version == source.version + (".refit.1" if "+" in source.version else "+refit.1")
    refit = card.extra["refit"]
    assert refit["n_cases"] == 42 and refit["model_version"] == source.version
    assert refit["confirmed_from"] == "2026-01-15" and refit["confirmed_to"] == "2026-02-20"
    assert "s3cret-pw" not in (out / "card.json").read_text() and refit["database"].split(":")[0] in url
    assert refit["temperature_scale_fine"] > 0 and refit["conformal_refitted_classes"]
    verify_bundle(out)  # the trust.npz checksum in the card matches
    from dermlens.infer.predictor import Predictor

    refitted = Predictor.load(out, threads=1)
    assert refitted.trust.temperature_coarse == pytest.approx(
        predictor.trust.temperature_coarse * refit["temperature_scale_coarse"]
    )
    again = CliRunner().invoke(cli_app, [*base, "--out", str(out), *low])
    assert again.exit_code == 2 and "not an empty folder" in again.output


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_bad_outcomes_are_refused_and_nothing_stored(kind, predictor, ham_cases, tmp_path) -> None:
    url = _url(kind, tmp_path, "bad")
    try:
        settings = load_settings(records={"url": url}, api_token=TOKEN)
        image = ham_cases["path"][0]
        with TestClient(create_app(settings, predictor=predictor), base_url="http://localhost") as client:
            files = {"file": (image.name, image.read_bytes(), "image/jpeg")}
            rid = client.post("/predict", files=files, headers=AUTH).json()["record_id"]
            good = {"diagnosis": "mel", "method": "histopathology", "date": "2026-03-01"}
            no_token = client.post(f"/records/{rid}/outcome", json=good)
            unknown = client.post("/records/nope/outcome", json=good, headers=AUTH)
            bad = [
                client.post(f"/records/{rid}/outcome", json={**good, **change}, headers=AUTH)
                for change in (
                    {"diagnosis": "freckle"},
                    {"method": "guess"},
                    {"date": "2999-01-01"},
                    {"x": 1},
                )
            ]
        assert no_token.status_code == 401 and unknown.status_code == 404
        assert [r.status_code for r in bad] == [422] * 4 and "freckle" in bad[0].json()["error"]["message"]
        csv_path = tmp_path / "bad.csv"
        csv_path.write_text(
            f"record_id,diagnosis,method,date\n{rid},mel,histo,2026-01-01\n{rid},mel,histo,soon\n"
        )
        result = CliRunner().invoke(cli_app, ["records", "outcome", "--csv", str(csv_path), "--url", url])
        assert result.exit_code == 2 and "line 3" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
        store = RecordStore(url)
        try:
            assert confirmed_cases(store).empty  # nothing stored: neither the API's 4xx nor the bad CSV
        finally:
            store.close()
    finally:
        if kind == "postgresql":
            _drop_pg_database(url)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_database_at_0002_upgrades_to_outcomes(kind, tmp_path) -> None:
    url = _url(kind, tmp_path, "mig")
    try:
        if kind == "sqlite":
            tmp_path.mkdir(exist_ok=True)
        engine = create_engine(url)
        upgrade(engine, "0002")
        assert current_revision(engine) == "0002" and "outcomes" not in inspect(engine).get_table_names()
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO predictions (id, created_at, image_sha256, image_bytes, model_name, "
                    "model_version, fine_probs, coarse_probs, top_class, confidence, ood, refer, prediction) "
                    "VALUES ('old1', :t, :sha, 1, 'm', '0.1', :fine, :coarse, 'mel', 0.7, false, false, NULL)"
                ),
                {
                    "t": "2026-01-01 00:00:00",
                    "sha": "ab" * 32,
                    "fine": '{"mel": 0.7, "nv": 0.3}',
                    "coarse": '{"benign": 0.3, "malignant": 0.7}',
                },
            )
        engine.dispose()
        store = RecordStore(url)  # opening upgrades 0002 -> head
        try:
            assert current_revision(store.engine) == head_revision() == "0003"
            cols = {c["name"] for c in inspect(store.engine).get_columns("outcomes")}
            assert cols == {"id", "record_id", "diagnosis", "method", "source", "confirmed_on", "created_at"}
            from dermlens.serve.outcomes import Outcome, attach

            attach(store, "old1", Outcome.parse("melanoma", "histopathology", date(2026, 2, 1), "lab"))
            (case,) = confirmed_cases(store).to_dict("records")
            assert case["diagnosis"] == "mel" and case["fine"] == {"mel": 0.7, "nv": 0.3}
            assert case["confirmed_on"] == date(2026, 2, 1) and case["condition"] == "no_meta"
        finally:
            store.close()
    finally:
        if kind == "postgresql":
            _drop_pg_database(url)
