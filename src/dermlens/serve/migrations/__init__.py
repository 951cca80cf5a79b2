"""Alembic migrations of the prediction-records schema, applied when a RecordStore opens.

A database created before migrations existed (the `predictions` table, no `alembic_version`) is stamped at
the baseline revision, then upgraded like any other.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import Engine

BASELINE = "0001"
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


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the records schema to `revision`; returns the revision the database had before."""
    from alembic import command

    before = current_revision(engine)
    if before == head_revision() and revision == "head":
        return before
    cfg = alembic_config(engine)
    if before is None and inspect(engine).has_table("predictions"):
        command.stamp(cfg, BASELINE)  # made by dermlens <= 0.1 (create_all): the baseline layout
    command.upgrade(cfg, revision)
    return before
