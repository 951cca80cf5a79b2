"""Prediction records: one durable row per API prediction (SQLAlchemy 2.0; SQLite by default).

A record holds the image's SHA-256 (the bytes only when `store_images` is on), the inputs, the outputs,
the model version and the UTC time. `RecordStore.add` commits before it returns, so a prediction the API
has acknowledged survives a crash; SQLite runs in WAL mode with synchronous=FULL. The schema is managed by
Alembic (serve/migrations), upgraded when a store opens. Files are private (0600 in 0700 folders); the
client's file name is kept only when `store_filename` is on. Rows are committed by one writer thread
(serve/commits.py) with a deadline: a locked, unreachable or hung database raises RecordsUnavailable (the
API answers 503) and a row whose caller gave up is never left stored.
"""

from __future__ import annotations

import csv
import json
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Boolean, DateTime, Float, Integer, String, Text, create_engine, event, func, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from dermlens.errors import RecordsConfigError, RecordsUnavailable  # noqa: F401 (re-exported)
from dermlens.extras import install_hint
from dermlens.infer.prediction import Prediction
from dermlens.serve.commits import CommitWriter, first_line


class Base(DeclarativeBase):
    pass


class PredictionRecord(Base):
    """One prediction served by the API."""

    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_bytes: Mapped[int] = mapped_column(Integer)
    image_width: Mapped[int | None] = mapped_column(Integer)
    image_height: Mapped[int | None] = mapped_column(Integer)
    image_path: Mapped[str | None] = mapped_column(Text)
    filename: Mapped[str | None] = mapped_column(Text)
    age: Mapped[float | None] = mapped_column(Float)
    sex: Mapped[str | None] = mapped_column(String(16))
    site: Mapped[str | None] = mapped_column(String(32))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    fine_probs: Mapped[str] = mapped_column(Text)  # JSON {code: probability}
    coarse_probs: Mapped[str] = mapped_column(Text)  # JSON {benign: p, malignant: p}
    top_class: Mapped[str] = mapped_column(String(16))
    confidence: Mapped[float] = mapped_column(Float)
    ood_score: Mapped[float | None] = mapped_column(Float)
    ood: Mapped[bool] = mapped_column(Boolean)
    refer: Mapped[bool] = mapped_column(Boolean)
    refer_reason: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    prediction: Mapped[str | None] = mapped_column(Text)  # JSON: the whole Prediction the client was sent


# The request's own columns; `records export` follows them with every field of the stored Prediction.
ENVELOPE_COLUMNS: tuple[str, ...] = (
    "id",
    "created_at",
    "image_sha256",
    "image_bytes",
    "image_path",
    "filename",
    "age",
    "sex",
    "site",
    "latency_ms",
)


@dataclass
class NewRecord:
    """What the API hands to the store for one answered prediction: the request and its Prediction."""

    image_sha256: str
    image_bytes: int
    filename: str | None
    age: float | None
    sex: str | None
    site: str | None
    prediction: Prediction
    latency_ms: float | None = None


def user_data_dir() -> Path:
    """Per-user data folder: $XDG_DATA_HOME (or %LOCALAPPDATA%)/dermlens, else ~/.local/share/dermlens."""
    base = os.environ.get("XDG_DATA_HOME") or os.environ.get("LOCALAPPDATA")
    return (Path(base) if base else Path.home() / ".local" / "share") / "dermlens"


def default_url() -> str:
    """SQLite file in the user data dir."""
    return f"sqlite:///{user_data_dir() / 'records.db'}"


DRIVER_EXTRAS = {"postgresql": "postgres"}
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


def private_dir(path: Path) -> Path:
    """Create `path` and missing parents readable by this user only; existing folders stay as they are."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        os.chmod(folder, PRIVATE_DIR)  # mkdir's mode is filtered by the umask
    return path


def _private_sqlite_file(path: Path) -> None:
    """Create the database file 0600 before SQLite does (its -wal and -shm files copy that mode)."""
    private_dir(path.parent)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE))


def _sqlite_pragmas(lock_timeout_s: float):
    def apply(dbapi_conn: Any, _record: Any) -> None:
        """Durable SQLite: WAL journal, fsync on every commit, wait (bounded) for locks."""
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={int(lock_timeout_s * 1000)}")
        cur.close()

    return apply


def _postgres_args(lock_timeout_s: float) -> dict[str, Any]:
    """libpq options: a lock wait time-out, a connect time-out and TCP keepalives (a dead peer is noticed
    instead of hanging a connection for ever)."""
    return {
        "options": f"-c lock_timeout={int(lock_timeout_s * 1000)}",
        "connect_timeout": max(2, math.ceil(lock_timeout_s)),
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
    }


def _write_limits(engine: Engine, lock_timeout_s: float) -> list[str]:
    """PostgreSQL statements that bound each records transaction on the server: a statement running, or a
    transaction left idle by a client that gave up, past the deadline is cancelled and rolled back."""
    if engine.dialect.name != "postgresql":
        return []
    ms = int(lock_timeout_s * 1000)
    return [f"SET LOCAL statement_timeout = {ms}", f"SET LOCAL idle_in_transaction_session_timeout = {ms}"]


def make_engine(url: str | None = None, lock_timeout_s: float = 2.0) -> Engine:
    """An engine for `url` (default: the private user-data SQLite file); RecordsConfigError if unusable."""
    url = url or default_url()
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                _private_sqlite_file(Path(parsed.database).expanduser())
            args = {"check_same_thread": False, "timeout": lock_timeout_s}
            engine = create_engine(url, connect_args=args)
            event.listen(engine, "connect", _sqlite_pragmas(lock_timeout_s))
            return engine
        args = _postgres_args(lock_timeout_s) if parsed.get_backend_name() == "postgresql" else {}
        return create_engine(url, pool_pre_ping=True, pool_timeout=lock_timeout_s, connect_args=args)
    except ArgumentError as e:
        raise RecordsConfigError(f"records URL {url!r} is not a valid SQLAlchemy URL") from e
    except ImportError as e:
        extra = DRIVER_EXTRAS.get(parsed.get_backend_name())
        hint = install_hint(extra) if extra else f"install the database driver ({e.name})"
        raise RecordsConfigError(
            f"records database {parsed.get_backend_name()} needs a driver that is not installed: {hint}"
        ) from e


def _default_image_dir(url: str) -> Path:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return Path(parsed.database).expanduser().resolve().parent / "images"
    return Path("dermlens_images").resolve()


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
    (b"GIF8", "gif"),
)


def image_suffix(data: bytes) -> str:
    """File extension from an image's magic bytes ("bin" if unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "bin")


def _write_durable(path: Path, data: bytes) -> None:
    """Write bytes (0600) via a temporary file + fsync + rename, so a crash never leaves half an image."""
    private_dir(path.parent)
    if path.exists():
        return
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class RecordStore:
    """Append-only store of prediction records."""

    def __init__(
        self,
        url: str | None = None,
        store_images: bool = False,
        image_dir: str | Path | None = None,
        store_filename: bool = False,
        lock_timeout_s: float = 2.0,
    ):
        from dermlens.serve.migrations import upgrade

        self.url = url or default_url()
        self.engine = make_engine(self.url, lock_timeout_s)
        try:
            upgrade(self.engine)
        except (OperationalError, DBAPIError) as e:
            self.engine.dispose()
            raise RecordsConfigError(
                f"cannot open records database {self.describe()}: {first_line(e)}"
            ) from e
        self.store_filename = store_filename
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        limits = _write_limits(self.engine, lock_timeout_s)
        self.writer = CommitWriter(self._session, self._row, PredictionRecord, lock_timeout_s, limits)
        self.store_images = store_images
        self.image_dir = Path(image_dir).expanduser().resolve() if image_dir else _default_image_dir(self.url)

    def describe(self) -> str:
        """The database URL with any password hidden."""
        return make_url(self.url).render_as_string(hide_password=True)

    def add(self, new: NewRecord, image: bytes | None = None) -> PredictionRecord:
        """Store one record (and the image if configured) and commit before returning."""
        return self.add_many([(new, image)])[0]

    def add_many(self, items: list[tuple[NewRecord, bytes | None]]) -> list[PredictionRecord]:
        """Store several records in one transaction: all are committed, or none (RecordsUnavailable)."""
        return self.writer.wait(self.writer.submit(items))

    async def add_many_async(self, items: list[tuple[NewRecord, bytes | None]]) -> list[PredictionRecord]:
        """`add_many` for the event loop: waits at most the commit deadline, holding no thread."""
        return await self.writer.wait_async(self.writer.submit(items))

    def available(self) -> bool:
        """False while the database is locked, unreachable or hung (what /health reports)."""
        return self.writer.available()

    def _row(self, item: tuple[NewRecord, bytes | None]) -> PredictionRecord:
        new, image = item
        image_path = None
        if self.store_images and image is not None:
            target = self.image_dir / new.image_sha256[:2] / f"{new.image_sha256}.{image_suffix(image)}"
            _write_durable(target, image)
            image_path = str(target)
        pred = new.prediction
        return PredictionRecord(
            id=uuid.uuid4().hex,
            created_at=datetime.now(UTC),
            image_path=image_path,
            image_sha256=new.image_sha256,
            image_bytes=new.image_bytes,
            image_width=pred.image_width,
            image_height=pred.image_height,
            filename=new.filename if self.store_filename else None,
            age=new.age,
            sex=new.sex,
            site=new.site,
            model_name=pred.model_name,
            model_version=pred.model_version,
            fine_probs=json.dumps(pred.fine),
            coarse_probs=json.dumps(pred.coarse),
            top_class=pred.top_class,
            confidence=pred.confidence,
            ood_score=pred.ood_score,
            ood=pred.ood,
            refer=pred.refer,
            refer_reason=pred.refer_reason,
            latency_ms=new.latency_ms,
            prediction=json.dumps(pred.stored()),
        )

    def get(self, record_id: str) -> PredictionRecord | None:
        with self._session() as session:
            return session.get(PredictionRecord, record_id)

    def count(self) -> int:
        with self._session() as session:
            return int(session.scalar(select(func.count()).select_from(PredictionRecord)) or 0)

    def iter_records(self, batch: int = 1000) -> Iterator[PredictionRecord]:
        """All records, oldest first."""
        with Session(self.engine) as session:
            query = select(PredictionRecord).order_by(PredictionRecord.created_at, PredictionRecord.id)
            yield from session.scalars(query.execution_options(yield_per=batch))

    def close(self) -> None:
        self.writer.close()
        self.engine.dispose()


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_safe(value: Any) -> Any:
    """OWASP CSV-injection rule: a text cell starting with = + - @ or a control character gets a leading '."""
    if isinstance(value, str) and value and (value.startswith(_FORMULA_START) or ord(value[0]) < 32):
        return "'" + value
    return value


def _as_utc(value: datetime) -> datetime:
    """SQLite returns naive datetimes: they were stored in UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def stored_row(row: PredictionRecord) -> dict[str, Any]:
    """A record's flat export row: its envelope columns, then every field of its stored Prediction."""
    out: dict[str, Any] = {c: getattr(row, c) for c in ENVELOPE_COLUMNS}
    out["created_at"] = _as_utc(row.created_at).isoformat()
    if row.prediction:
        out.update(Prediction.model_validate({**json.loads(row.prediction), "timing_ms": {}}).row())
    else:  # a record written before whole predictions were stored: the columns it has
        out.update({f"p_{c}": p for c, p in json.loads(row.fine_probs).items()})
        out.update({f"coarse_{c}": p for c, p in json.loads(row.coarse_probs).items()})
        out.update({c: getattr(row, c) for c in ("top_class", "confidence", "ood_score", "ood", "refer")})
        out.update(refer_reason=row.refer_reason, model_name=row.model_name, model_version=row.model_version)
    return out


def export_csv(store: RecordStore, out: str | Path) -> int:
    """Write every record to CSV (the union of columns, in first-seen order); returns the row count."""
    rows = [stored_row(r) for r in store.iter_records()]
    columns: dict[str, None] = dict.fromkeys(ENVELOPE_COLUMNS)
    for row in rows:
        columns.update(dict.fromkeys(row))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)  # records stay private
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(columns))
        for row in rows:
            writer.writerow([csv_safe(_cell(row.get(c))) for c in columns])
    return len(rows)


def _cell(value: Any) -> Any:
    """A CSV cell: booleans lower-case, None empty."""
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else value
