"""Outcomes: a confirmed diagnosis (histopathology, follow-up, ...) attached to a stored prediction, with
its method, source and date, so field performance can be measured on confirmed cases.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outcomes",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column(
            "record_id",
            sa.String(32),
            sa.ForeignKey("predictions.id", name="fk_outcomes_record_id"),
            nullable=False,
        ),
        sa.Column("diagnosis", sa.String(16), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("source", sa.Text(), nullable=True),
        sa.Column("confirmed_on", sa.Date(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_outcomes_record_id", "outcomes", ["record_id"])


def downgrade() -> None:
    op.drop_index("ix_outcomes_record_id", table_name="outcomes")
    op.drop_table("outcomes")
