"""credential lifecycle: status, expiry, rotation grace, plan changes, and their audit trail

A credential is no longer issued and forgotten: it is rotated (the previous secret may verify
for a grace period), suspended and resumed, revoked, expired at the end of its lifetime (a
plan may give one), and moved to another plan through a request of kind ``plan_change``.
Every change is a row of ``credential_audit``, append-only like ``audit_log``; every admin
operation is a row of ``credential_operations``, whose id makes a replay change nothing.
Expiry notices are emails like the others, one per (request, kind, topic): the topic tells
the 14-day notice from the 3-day one.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-27 13:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from infra.db.roles import make_append_only

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime(timezone=True)
LIVE = "status IN ('active', 'suspended') AND expires_at IS NOT NULL"


def upgrade() -> None:
    op.add_column("plans", sa.Column("credential_lifetime_days", sa.Integer, nullable=True))
    op.add_column(
        "access_requests", sa.Column("kind", sa.String(40), nullable=False, server_default="access")
    )
    op.add_column("access_requests", sa.Column("credential_id", sa.String(36), nullable=True))

    with op.batch_alter_table("credentials") as credentials:
        credentials.add_column(sa.Column("status", sa.String(40), nullable=False, server_default="active"))
        credentials.add_column(sa.Column("plan_id", sa.String(64), nullable=False, server_default=""))
        credentials.add_column(sa.Column("consumer_id", sa.String(64), nullable=False, server_default=""))
        credentials.add_column(sa.Column("expires_at", Timestamp, nullable=True))
        credentials.add_column(sa.Column("previous_public_id", sa.String(64), nullable=True))
        credentials.add_column(sa.Column("previous_secret_hash", sa.String(128), nullable=True))
        credentials.add_column(sa.Column("previous_valid_until", Timestamp, nullable=True))
        credentials.add_column(sa.Column("revision", sa.Integer, nullable=False, server_default="1"))
        credentials.add_column(sa.Column("updated_at", Timestamp, nullable=True))
        credentials.add_column(sa.Column("expiry_notices", sa.String(200), nullable=False, server_default=""))
    # What existing credentials already were: revoked ones stay revoked; plan and consumer from their request.
    op.execute("UPDATE credentials SET status = 'revoked' WHERE revoked_at IS NOT NULL")
    op.execute(
        "UPDATE credentials SET plan_id = (SELECT r.plan_id FROM access_requests r WHERE r.id = credentials.request_id), "
        "consumer_id = (SELECT r.consumer_id FROM access_requests r WHERE r.id = credentials.request_id)"
    )
    op.create_index("ix_credentials_consumer_id", "credentials", ["consumer_id"])
    op.create_index("ix_credentials_previous_public_id", "credentials", ["previous_public_id"])
    # The expiry sweep reads only live credentials that expire, soonest first.
    op.create_index(
        "ix_credentials_expiring",
        "credentials",
        ["expires_at"],
        postgresql_where=sa.text(LIVE),
        sqlite_where=sa.text(LIVE),
    )

    with op.batch_alter_table("notifications") as notifications:
        notifications.add_column(sa.Column("topic", sa.String(80), nullable=False, server_default=""))
        notifications.drop_constraint("uq_notifications_request_kind", type_="unique")
        notifications.create_unique_constraint(
            "uq_notifications_request_kind_topic", ["request_id", "kind", "topic"]
        )

    op.create_table(
        "credential_audit",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column(
            "credential_id", sa.String(36), sa.ForeignKey("credentials.id"), nullable=False, index=True
        ),
        sa.Column("change", sa.String(40), nullable=False),
        sa.Column("from_status", sa.String(40), nullable=False),
        sa.Column("to_status", sa.String(40), nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("actor_kind", sa.String(40), nullable=False),
        sa.Column("actor_id", sa.String(254), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("cause_id", sa.String(36), nullable=True),
        sa.Column("at", Timestamp, nullable=False),
    )
    op.create_table(
        "credential_operations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("operation", sa.String(40), nullable=False),
        sa.Column("target", sa.String(40), nullable=False),
        sa.Column("target_id", sa.String(64), nullable=False),
        sa.Column("admin_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("issued_at", Timestamp, nullable=False),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.Column("outcome", sa.String(40), nullable=False),
        sa.Column("outcome_reason", sa.Text, nullable=False, server_default=""),
        sa.Column("results", sa.JSON, nullable=False),
        sa.Column("key_id", sa.String(64), nullable=True),
    )
    # Append-only, as audit_log is: no UPDATE, DELETE or TRUNCATE, for the runtime role above all.
    make_append_only("credential_audit")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS credential_audit_no_truncate ON credential_audit")
        op.execute("DROP TRIGGER IF EXISTS credential_audit_append_only ON credential_audit")
    op.drop_table("credential_operations")
    op.drop_table("credential_audit")
    with op.batch_alter_table("notifications") as notifications:
        notifications.drop_constraint("uq_notifications_request_kind_topic", type_="unique")
        notifications.create_unique_constraint("uq_notifications_request_kind", ["request_id", "kind"])
        notifications.drop_column("topic")
    op.drop_index("ix_credentials_expiring", table_name="credentials")
    op.drop_index("ix_credentials_previous_public_id", table_name="credentials")
    op.drop_index("ix_credentials_consumer_id", table_name="credentials")
    with op.batch_alter_table("credentials") as credentials:
        for column in (
            "expiry_notices",
            "updated_at",
            "revision",
            "previous_valid_until",
            "previous_secret_hash",
            "previous_public_id",
            "expires_at",
            "consumer_id",
            "plan_id",
            "status",
        ):
            credentials.drop_column(column)
    op.drop_column("access_requests", "credential_id")
    op.drop_column("access_requests", "kind")
    op.drop_column("plans", "credential_lifetime_days")
