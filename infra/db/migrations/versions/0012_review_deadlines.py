"""review deadlines: a plan's review deadline, and a pending request's deadline and reminders

A request parked for review gets ``review_deadline_at`` from its plan's
``review_deadline_hours`` (or the deployment's ACCESSFLOW_REVIEW_DEADLINE_HOURS); the sweep
reminds the admins and escalates before it, recording each in ``review_notices``, and at it
the request ends ``expired`` (a status stored as its string: no type to alter). The sweep
reads a partial index of pending requests with a deadline.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-27 14:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)
REVIEW_DUE = "status = 'pending_review' AND review_deadline_at IS NOT NULL"


def upgrade() -> None:
    op.add_column("plans", sa.Column("review_deadline_hours", sa.Float, nullable=True))
    op.add_column("access_requests", sa.Column("review_deadline_at", Timestamp, nullable=True))
    op.add_column(
        "access_requests", sa.Column("review_notices", sa.String(200), nullable=False, server_default="")
    )
    op.create_index(
        "ix_access_requests_review_deadline",
        "access_requests",
        ["review_deadline_at"],
        postgresql_where=sa.text(REVIEW_DUE),
        sqlite_where=sa.text(REVIEW_DUE),
    )


def downgrade() -> None:
    op.drop_index("ix_access_requests_review_deadline", table_name="access_requests")
    with op.batch_alter_table("access_requests") as requests:
        requests.drop_column("review_notices")
        requests.drop_column("review_deadline_at")
    op.drop_column("plans", "review_deadline_hours")
