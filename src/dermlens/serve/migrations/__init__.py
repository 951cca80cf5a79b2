"""Alembic migrations of the prediction-records schema, applied when a RecordStore opens.

A database created before migrations existed (the `predictions` table, no `alembic_version`) is stamped at
the baseline revision, then upgraded like any other. Servers starting together upgrade one at a time: a
PostgreSQL advisory lock (or, for SQLite, a lock file beside the database) is held around the upgrade.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

BASELINE = "0001"
LOCK_KEY = 0x6465726D  # "derm": the advisory lock id of records schema upgrades
HERE = Path(__file__).resolve().parent


def alembic_config(engine: Engine):
    """An Alembic Config for this package's scripts, bound to `engine` (no alembic.ini needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["engine"] = engine
    return cfg


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision (None: no alembic_version table)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(HERE)).get_current_head()


@contextmanager
def upgrade_lock(engine: Engine) -> Iterator[None]:
    """Hold the schema-upgrade lock of this database (PostgreSQL advisory lock, SQLite lock file)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SET lock_timeout = 0"))  # wait for the other server's upgrade
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                conn.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    from filelock import FileLock

    with FileLock(str(Path(database).expanduser()) + ".upgrade.lock", mode=0o600):
        yield


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the records schema to `revision` (one server at a time); returns the revision it had before."""
    with upgrade_lock(engine):
        return _upgrade(engine, revision)


def _upgrade(engine: Engine, revision: str) -> str | None:
    from alembic import command

    before = current_revision(engine)
    if before == head_revision() and revision == "head":
        return before
    cfg = alembic_config(engine)
    if before is None and inspect(engine).has_table("predictions"):
        command.stamp(cfg, BASELINE)  # made by dermlens <= 0.1 (create_all): the baseline layout
    command.upgrade(cfg, revision)
    return before
