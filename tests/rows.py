"""Rows written straight into a freshly migrated database, for tests that need a few and no catalogue."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa

from domain.model import ActorKind, AuthMethod, Status
from infra.db import orm


def insert_request(connection: sa.Connection) -> str:
    """A consumer, its app and one provisioned request of it; the request's id."""
    now = datetime.now(UTC)
    consumer_id, app_id, request_id = (
        f"c-{uuid.uuid4().hex[:8]}",
        f"a-{uuid.uuid4().hex[:8]}",
        str(uuid.uuid4()),
    )
    connection.execute(orm.consumers.insert().values(id=consumer_id, email="dev@example.org", name="Dev"))
    connection.execute(orm.apps.insert().values(id=app_id, consumer_id=consumer_id, name="App"))
    connection.execute(
        orm.access_requests.insert().values(
            id=request_id,
            consumer_id=consumer_id,
            plan_id="starter",
            product_ids=["payments"],
            app_id=app_id,
            submitted_at=now,
            received_at=now,
            status=Status.PROVISIONED,
            updated_at=now,
        )
    )
    return request_id


def insert_audit_row(connection: sa.Connection, request_id: str, reason: str = "test") -> None:
    connection.execute(
        orm.audit_log.insert().values(
            request_id=request_id,
            to_status=Status.PROVISIONED,
            actor_kind=ActorKind.SYSTEM,
            actor_id="test",
            reason=reason,
            at=datetime.now(UTC),
        )
    )


def insert_credential(connection: sa.Connection, request_id: str, *, sealed_secret: bytes | None) -> str:
    """A v1 credential of the request, holding ``sealed_secret`` until its reveal; its id."""
    app_id = connection.execute(
        sa.select(orm.access_requests.c.app_id).where(orm.access_requests.c.id == request_id)
    ).scalar_one()
    credential_id = str(uuid.uuid4())
    connection.execute(
        orm.credentials.insert().values(
            id=credential_id,
            request_id=request_id,
            app_id=app_id,
            kind=AuthMethod.API_KEY,
            public_id=f"af_{uuid.uuid4().hex[:8]}",
            secret_hash="sha256:" + "0" * 64,
            sealed_secret=sealed_secret,
            product_ids=["payments"],
            rate_limit_per_minute=60,
            monthly_quota=None,
            created_at=datetime.now(UTC),
        )
    )
    return credential_id
