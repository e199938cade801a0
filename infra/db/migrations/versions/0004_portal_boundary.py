"""portal boundary: portals, admins and their signing keys, portal events, refusals

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "portals",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("broker_user", sa.String(200), nullable=False, unique=True),
        sa.Column("public_key", sa.String(100), nullable=False),
        sa.Column("url", sa.String(500), nullable=False, server_default=""),
    )
    op.create_table(
        "portal_consumers",
        sa.Column("portal_id", sa.String(64), sa.ForeignKey("portals.id"), primary_key=True),
        sa.Column("consumer_id", sa.String(64), sa.ForeignKey("consumers.id"), primary_key=True),
    )
    op.create_table(
        "admins",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("email", sa.String(254), nullable=False),
    )
    op.create_table(
        "admin_keys",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("admin_id", sa.String(64), sa.ForeignKey("admins.id"), nullable=False, index=True),
        sa.Column("public_key", sa.String(100), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("revoked_at", Timestamp, nullable=True),
    )
    op.add_column("access_requests", sa.Column("portal_id", sa.String(64), nullable=True))
    op.add_column("access_requests", sa.Column("event_seq", sa.Integer, nullable=False, server_default="0"))
    op.add_column("decisions", sa.Column("key_id", sa.String(64), nullable=True))
    op.add_column("outbox", sa.Column("exchange", sa.String(200), nullable=False, server_default=""))
    op.add_column("outbox", sa.Column("routing_key", sa.String(200), nullable=True))
    op.add_column("malformed_messages", sa.Column("sender", sa.String(200), nullable=True))
    op.add_column(
        "malformed_messages",
        sa.Column("kind", sa.String(20), nullable=False, server_default="malformed"),
    )


def downgrade() -> None:
    op.drop_column("malformed_messages", "kind")
    op.drop_column("malformed_messages", "sender")
    op.drop_column("outbox", "routing_key")
    op.drop_column("outbox", "exchange")
    op.drop_column("decisions", "key_id")
    op.drop_column("access_requests", "event_seq")
    op.drop_column("access_requests", "portal_id")
    op.drop_table("admin_keys")
    op.drop_table("admins")
    op.drop_table("portal_consumers")
    op.drop_table("portals")
