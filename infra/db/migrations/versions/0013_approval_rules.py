"""approval rules and throttles per plan, and which rule routed each request

A plan may carry approval rules (a JSON list, evaluated in order by ``domain.rules``) and
two throttles per consumer: open requests, and requests in the last hour; a consumer may
carry its own values of both, in place of every plan's. Each request
records which rule, flag, throttle or check decided its routing, for ``requests show``,
and, under an ``approvers`` rule, how many distinct admins must approve it and which may.
An approval that is not yet the last is a decision with the outcome ``counted``: the
partial unique index keeps allowing one ``applied`` decision per request.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-27 14:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("plans", sa.Column("rules", sa.JSON, nullable=False, server_default="[]"))
    op.add_column("plans", sa.Column("max_open_requests_per_consumer", sa.Integer, nullable=True))
    op.add_column("plans", sa.Column("max_requests_per_consumer_per_hour", sa.Integer, nullable=True))
    op.add_column("consumers", sa.Column("max_open_requests", sa.Integer, nullable=True))
    op.add_column("consumers", sa.Column("max_requests_per_hour", sa.Integer, nullable=True))
    op.add_column("access_requests", sa.Column("routed_by", sa.Text, nullable=False, server_default=""))
    op.add_column(
        "access_requests", sa.Column("approvals_required", sa.Integer, nullable=False, server_default="1")
    )
    op.add_column("access_requests", sa.Column("approvers", sa.JSON, nullable=False, server_default="[]"))


def downgrade() -> None:
    with op.batch_alter_table("access_requests") as requests:
        requests.drop_column("approvers")
        requests.drop_column("approvals_required")
        requests.drop_column("routed_by")
    with op.batch_alter_table("consumers") as consumers:
        consumers.drop_column("max_requests_per_hour")
        consumers.drop_column("max_open_requests")
    with op.batch_alter_table("plans") as plans:
        plans.drop_column("max_requests_per_consumer_per_hour")
        plans.drop_column("max_open_requests_per_consumer")
        plans.drop_column("rules")
