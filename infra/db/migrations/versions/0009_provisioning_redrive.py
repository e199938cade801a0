"""provision attempts: how many times the sweep issued a request stuck in approved again

A request stays ``approved`` until its credential is issued. When its IssueCredentials
command is lost or dead-lettered, a sweep queues it again through the outbox, counting
each re-drive here, and after ACCESSFLOW_PROVISIONING_MAX_ATTEMPTS it ends the request in
``provisioning_failed``. The sweep reads only approved requests, by age: a partial index.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 10:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: PostgreSQL (11 and later) rewrites no row to add it.
    op.add_column(
        "access_requests",
        sa.Column("provision_attempts", sa.Integer, nullable=False, server_default="0"),
    )
    # Few requests are approved at any time, the rest have moved on: the index holds only those.
    op.create_index(
        "ix_access_requests_approved",
        "access_requests",
        ["updated_at"],
        postgresql_where=sa.text("status = 'approved'"),
        sqlite_where=sa.text("status = 'approved'"),
    )


def downgrade() -> None:
    op.drop_index("ix_access_requests_approved", table_name="access_requests")
    op.drop_column("access_requests", "provision_attempts")
