"""an index on the emails still being sent, for the sweep that re-drives stuck ones

The sweep (``redrive_stuck_notifications``) looks, about once a minute per worker process,
for emails in ``sending`` whose lease ran out. Those are few at any time and every other
email is ``sent``, ``partial`` or ``failed`` for good, so a partial index holds only them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 08:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_notifications_sending",
        "notifications",
        ["id"],
        postgresql_where=sa.text("status = 'sending'"),
        sqlite_where=sa.text("status = 'sending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_notifications_sending", table_name="notifications")
