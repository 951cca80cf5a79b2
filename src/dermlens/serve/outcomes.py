"""Outcomes: confirmed diagnoses (histopathology, follow-up, ...) attached to stored predictions, and the
confirmed cases (prediction + latest outcome) that field performance and the refit from records read.

The table is created by migration 0003. An outcome names its record by id; the CSV import may name it by
image SHA-256 instead, and then it is attached to every stored prediction of that image.
"""

from __future__ import annotations

import csv
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import Date, DateTime, ForeignKey, String, Text, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Mapped, Session, mapped_column

from dermlens.data.taxonomy import fine_code
from dermlens.errors import OutcomeError, UnknownLabelError, UnknownRecord
from dermlens.serve.commits import first_line
from dermlens.serve.records import Base, PredictionRecord, RecordStore, RecordsUnavailable

# How a diagnosis was confirmed (spellings accepted on input -> the stored word).
METHODS: dict[str, str] = {
    "histopathology": "histopathology",
    "histo": "histopathology",
    "histology": "histopathology",
    "follow-up": "follow-up",
    "follow_up": "follow-up",
    "followup": "follow-up",
    "consensus": "consensus",
    "confocal": "confocal",
}
MAX_SOURCE = 200


class OutcomeRecord(Base):
    """One confirmed diagnosis of a stored prediction."""

    __tablename__ = "outcomes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    record_id: Mapped[str] = mapped_column(String(32), ForeignKey("predictions.id"), index=True)
    diagnosis: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(32))
    source: Mapped[str | None] = mapped_column(Text)
    confirmed_on: Mapped[date] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class Outcome:
    """A checked confirmed diagnosis: fine code, method, source, date."""

    diagnosis: str
    method: str
    source: str | None
    confirmed_on: date

    @classmethod
    def parse(cls, diagnosis: Any, method: Any, confirmed_on: Any, source: Any = None) -> Outcome:
        """Check raw values (any spelling taxonomy.fine_code maps; an ISO date not in the future)."""
        try:
            code = fine_code(diagnosis)
        except UnknownLabelError:
            raise OutcomeError(f"unknown diagnosis {str(diagnosis)[:40]!r}") from None
        m = METHODS.get(str(method or "").strip().lower())
        if m is None:
            allowed = ", ".join(sorted(set(METHODS.values())))
            raise OutcomeError(f"unknown method {str(method)[:40]!r}; one of {allowed}")
        day = _date(confirmed_on)
        text = str(source).strip() if source is not None else ""
        if len(text) > MAX_SOURCE:
            raise OutcomeError(f"source is longer than {MAX_SOURCE} characters")
        return cls(code, m, text or None, day)


def _date(value: Any) -> date:
    if isinstance(value, date):
        day = value
    else:
        try:
            day = date.fromisoformat(str(value).strip())
        except ValueError:
            raise OutcomeError(f"date {str(value)[:40]!r} is not an ISO date (YYYY-MM-DD)") from None
    if day > datetime.now(UTC).date():
        raise OutcomeError(f"date {day} is in the future")
    return day


def _row(record_id: str, outcome: Outcome) -> OutcomeRecord:
    return OutcomeRecord(
        id=uuid.uuid4().hex,
        record_id=record_id,
        diagnosis=outcome.diagnosis,
        method=outcome.method,
        source=outcome.source,
        confirmed_on=outcome.confirmed_on,
        created_at=datetime.now(UTC),
    )


def _save(store: RecordStore, rows: list[OutcomeRecord]) -> None:
    """Commit all rows in one transaction (RecordsUnavailable if the database is locked/unreachable)."""
    try:
        with Session(store.engine, expire_on_commit=False) as session, session.begin():
            session.add_all(rows)
    except (OperationalError, DBAPIError) as e:
        raise RecordsUnavailable(f"records database unavailable: {first_line(e)}") from e


def attach(store: RecordStore, record_id: str, outcome: Outcome) -> OutcomeRecord:
    """Attach one outcome to the record `record_id` (UnknownRecord if there is none)."""
    if store.get(record_id) is None:
        raise UnknownRecord(f"no stored prediction with record id {record_id[:64]!r}")
    row = _row(record_id, outcome)
    _save(store, [row])
    return row


def as_dict(row: OutcomeRecord) -> dict[str, Any]:
    """An outcome as JSON-ready values (the API's answer)."""
    return {
        "id": row.id,
        "record_id": row.record_id,
        "diagnosis": row.diagnosis,
        "method": row.method,
        "source": row.source,
        "confirmed_on": row.confirmed_on.isoformat(),
        "created_at": row.created_at.isoformat(),
    }


def _record_ids(store: RecordStore, ref: str) -> list[str]:
    """The records a CSV row names: by record id, else every record of an image SHA-256."""
    with Session(store.engine, expire_on_commit=False) as session:
        if session.get(PredictionRecord, ref) is not None:
            return [ref]
        query = select(PredictionRecord.id).where(PredictionRecord.image_sha256 == ref.lower())
        return list(session.scalars(query))


def read_csv(store: RecordStore, path: Path) -> list[OutcomeRecord]:
    """Check every row of an outcomes CSV (record_id or image_sha256, diagnosis, method, date[, source]);
    any bad row is an OutcomeError naming its line, and then nothing is stored."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise OutcomeError(f"{path}: not a readable CSV ({e})") from None
    out: list[OutcomeRecord] = []
    for line, row in enumerate(rows, start=2):
        row = {str(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        ref = row.get("record_id") or row.get("image_sha256") or row.get("sha256")
        if not ref:
            raise OutcomeError(f"{path} line {line}: give record_id or image_sha256")
        try:
            outcome = Outcome.parse(
                row.get("diagnosis"), row.get("method"), row.get("date"), row.get("source")
            )
        except OutcomeError as e:
            raise OutcomeError(f"{path} line {line}: {e}") from None
        ids = _record_ids(store, ref)
        if not ids:
            raise UnknownRecord(
                f"{path} line {line}: no stored prediction with id or image sha256 {ref[:64]!r}"
            )
        out += [_row(i, outcome) for i in ids]
    if not out:
        raise OutcomeError(f"{path}: no outcome rows")
    return out


def import_csv(store: RecordStore, path: Path) -> int:
    """Attach every outcome of a CSV in one transaction (all or nothing); returns how many were stored."""
    rows = read_csv(store, path)
    _save(store, rows)
    return len(rows)


CASE_COLUMNS = (
    "record_id",
    "image_sha256",
    "created_at",
    "model_version",
    "diagnosis",
    "method",
    "confirmed_on",
    "condition",
    "refer",
    "fine",
    "p_malignant",
)


def confirmed_cases(store: RecordStore, model_version: str | None = None) -> pd.DataFrame:
    """One row per record that has an outcome (its latest by date, then by entry), oldest record first."""
    query = select(PredictionRecord, OutcomeRecord).join(
        OutcomeRecord, OutcomeRecord.record_id == PredictionRecord.id
    )
    if model_version is not None:
        query = query.where(PredictionRecord.model_version == model_version)
    latest: dict[str, tuple[PredictionRecord, OutcomeRecord]] = {}
    with Session(store.engine, expire_on_commit=False) as session:
        for rec, out in session.execute(query):
            have = latest.get(rec.id)
            if have is None or (out.confirmed_on, out.created_at) > (
                have[1].confirmed_on,
                have[1].created_at,
            ):
                latest[rec.id] = (rec, out)
    rows = [_case(rec, out) for rec, out in latest.values()]
    frame = pd.DataFrame(rows, columns=list(CASE_COLUMNS))
    return frame.sort_values(["created_at", "record_id"], kind="mergesort").reset_index(drop=True)


def _case(rec: PredictionRecord, out: OutcomeRecord) -> dict[str, Any]:
    pred = json.loads(rec.prediction) if rec.prediction else {}
    fine = pred.get("fine") or json.loads(rec.fine_probs)
    coarse = pred.get("coarse") or json.loads(rec.coarse_probs)
    has_meta = any(v is not None for v in (rec.age, rec.sex, rec.site))
    return {
        "record_id": rec.id,
        "image_sha256": rec.image_sha256,
        "created_at": rec.created_at if rec.created_at.tzinfo else rec.created_at.replace(tzinfo=UTC),
        "model_version": rec.model_version,
        "diagnosis": out.diagnosis,
        "method": out.method,
        "confirmed_on": out.confirmed_on,
        "condition": pred.get("calibration_condition") or ("meta" if has_meta else "no_meta"),
        "refer": bool(rec.refer),
        "fine": fine,
        "p_malignant": float(pred.get("p_malignant", coarse.get("malignant", float("nan")))),
    }
