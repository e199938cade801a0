"""outbox parking and pruning: why a row was not confirmed, when it was parked, sent rows by age

A row the broker keeps refusing is parked after ACCESSFLOW_OUTBOX_MAX_ATTEMPTS tries, with
the reason of its last one, instead of being swept for ever. Sent rows are pruned by age,
which needs an index on ``sent_at``.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27 08:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: adding them rewrites no row.
    op.add_column("outbox", sa.Column("last_error", sa.Text, nullable=True))
    op.add_column("outbox", sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True))
    # The sweep's index leaves parked rows out: they are not its business any more. It holds
    # only unsent rows, so rebuilding it is quick.
    op.drop_index("ix_outbox_unsent", table_name="outbox")
    op.create_index(
        "ix_outbox_unsent",
        "outbox",
        ["created_at"],
        postgresql_where=sa.text("sent_at IS NULL AND parked_at IS NULL"),
    )
    # Not CONCURRENTLY: that waits for every other transaction, the one of a second migration
    # run waiting for the migration lock included, and so deadlocks with it until a timeout.
    # Every row ever sent is still there when this runs: on a large outbox, run it while the
    # workers are stopped, or create the index CONCURRENTLY by hand first (the name is the same).
    op.create_index(
        "ix_outbox_sent",
        "outbox",
        ["sent_at"],
        postgresql_where=sa.text("sent_at IS NOT NULL"),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_sent", table_name="outbox")
    op.drop_index("ix_outbox_unsent", table_name="outbox")
    op.create_index("ix_outbox_unsent", "outbox", ["created_at"], postgresql_where=sa.text("sent_at IS NULL"))
    op.drop_column("outbox", "parked_at")
    op.drop_column("outbox", "last_error")
