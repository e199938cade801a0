"""bulk decisions: an admin's signed decision on many pending requests, with a result per request

Each request a bulk decision selects is decided on its own, as a row of ``decisions`` (its id
derived from the bulk's and the request's); ``bulk_decisions`` records the bulk once it is
done, whose id makes a replay change nothing, and its results per request, read by
``accessflow decide-bulk --wait``. A bulk decision is never changed once recorded.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-27 14:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from infra.db.roles import make_append_only

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "bulk_decisions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("approve", sa.Boolean, nullable=False),
        sa.Column("admin_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("decided_at", Timestamp, nullable=False),
        sa.Column("selection", sa.Text, nullable=False),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.Column("outcome", sa.String(40), nullable=False),
        sa.Column("outcome_reason", sa.Text, nullable=False, server_default=""),
        sa.Column("results", sa.JSON, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=True),
    )
    make_append_only("bulk_decisions")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS bulk_decisions_no_truncate ON bulk_decisions")
        op.execute("DROP TRIGGER IF EXISTS bulk_decisions_append_only ON bulk_decisions")
    op.drop_table("bulk_decisions")
