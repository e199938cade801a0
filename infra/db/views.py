"""Read models: what the CLI and the demo show of requests and credentials, as plain dicts.

Shared so that the command line and the demo print the same thing without importing each
other; each takes a unit of work, so it reads what one transaction saw.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from domain.model import AccessRequest, DeliveryStatus, Status
from infra.db import orm
from infra.db.unit_of_work import SqlUnitOfWork


def request_summary(request: AccessRequest) -> dict[str, Any]:
    """A request's row in ``requests list``."""
    return {
        "id": request.id,
        "status": request.status.value,
        "kind": request.kind.value,
        "credential_id": request.credential_id,
        "reason": request.status_reason,
        "routed_by": request.routed_by,
        "consumer_id": request.consumer_id,
        "app_id": request.app_id,
        "plan_id": request.plan_id,
        "product_ids": list(request.product_ids),
        "auth_method": request.auth_method.value if request.auth_method else None,
        "submitted_at": request.submitted_at.isoformat(),
        "updated_at": request.updated_at.isoformat(),
    }


def request_details(uow: SqlUnitOfWork, request_id: str) -> dict[str, Any] | None:
    """One request with its audit trail, decisions, emails and credential (never its secret)."""
    with uow:
        request = uow.requests.get(request_id)
        if request is None:
            return None
        # A plan change's credential is the one it changes; an access request's, the one it was issued.
        credential = (
            uow.credentials.get(request.credential_id)
            if request.credential_id
            else uow.credentials.for_request(request_id)
        )
        return {
            **request_summary(request),
            "justification": request.justification,
            "review_deadline_at": request.review_deadline_at.isoformat()
            if request.review_deadline_at
            else None,
            "review_notices": [n for n in request.review_notices.split(",") if n],
            "audit": [
                {
                    "at": e.at.isoformat(),
                    "from": e.from_status.value if e.from_status else None,
                    "to": e.to_status.value,
                    "actor": f"{e.actor_kind.value}:{e.actor_id}",
                    "reason": e.reason,
                }
                for e in request.history
            ],
            "decisions": [
                {
                    "id": d.id,
                    "decision": "approve" if d.approve else "reject",
                    "admin": d.admin_email,
                    "reason": d.reason,
                    "outcome": d.outcome.value,
                    "outcome_reason": d.outcome_reason,
                }
                for d in uow.decisions.for_request(request_id)
            ],
            "notifications": [
                {
                    "kind": n.kind.value,
                    "status": n.status.value,
                    "attempts": n.attempts,
                    "message_id": n.message_id,
                }
                for n in uow.notifications.for_request(request_id)
            ],
            "credential": None
            if credential is None
            else {
                "id": credential.id,
                "kind": credential.kind.value,
                "public_id": credential.public_id,
                "status": credential.status.value,
                "plan_id": credential.plan_id,
                "expires_at": credential.expires_at.isoformat() if credential.expires_at else None,
            },
        }


def app_of_request(uow: SqlUnitOfWork, request_id: str) -> str | None:
    """The app a request is for: the one it named, or the one its approval created; None if neither."""
    with uow:
        request = uow.requests.get(request_id)
        return request.app_id if request is not None else None


def bulk_results(uow: SqlUnitOfWork, bulk_id: str) -> dict[str, Any] | None:
    """A recorded bulk decision and its result per request, each with the request's status now; None until recorded."""
    with uow:
        bulk = uow.bulk_decisions.get(bulk_id)
        if bulk is None:
            return None
        items = []
        for request_id, result in bulk.results.items():
            request = uow.requests.get(request_id)
            items.append(
                {
                    "request_id": request_id,
                    "result": result,
                    "status": request.status.value if request is not None else None,
                }
            )
    return {
        "bulk_id": bulk.id,
        "decision": "approve" if bulk.approve else "reject",
        "admin_id": bulk.admin_id,
        "selection": bulk.selection,
        "outcome": bulk.outcome.value,
        "outcome_reason": bulk.outcome_reason,
        "items": items,
    }


def reveal_credentials(
    uow: SqlUnitOfWork, unseal: Callable[[bytes], str], app_id: str
) -> list[dict[str, Any]]:
    """The app's credentials; each secret is returned on its first reveal only, then forgotten."""
    with uow:
        shown = []
        for credential in uow.credentials.for_app(app_id, for_update=True):
            secret = credential.reveal(unseal)
            request = uow.requests.get(credential.request_id)
            shown.append(
                {
                    "id": credential.id,
                    "request_id": credential.request_id,
                    "kind": credential.kind.value,
                    "public_id": credential.public_id,
                    "status": credential.status.value,
                    "plan_id": credential.plan_id,
                    "expires_at": credential.expires_at.isoformat() if credential.expires_at else None,
                    "revision": credential.revision,
                    "secret": secret,
                    "products": list(credential.product_ids),
                    "rate_limit_per_minute": credential.rate_limit_per_minute,
                    "monthly_quota": credential.monthly_quota,
                    "revealed_at": credential.revealed_at.isoformat() if credential.revealed_at else None,
                    # A portal's request kept no copy: its secret went, sealed, to the portal only.
                    "delivered_to_portal": request.portal_id if request else None,
                }
            )
        uow.commit()
    return shown


def _age_seconds(now: datetime, then: datetime | None) -> float | None:
    if then is None:
        return None
    if then.tzinfo is None:  # SQLite hands back naive UTC
        then = then.replace(tzinfo=now.tzinfo)
    return round(max((now - then).total_seconds(), 0.0), 1)


def backlog(
    uow: SqlUnitOfWork,
    *,
    now: datetime,
    pending_before: datetime,
    approved_before: datetime,
    outbox_before: datetime,
    sending_before: datetime,
    deadline_before: datetime | None = None,
) -> dict[str, dict[str, Any]]:
    """What waits in the database, for ``accessflow status``: three statements, one transaction.

    Parameters:
      now: the moment ages are measured from.
      pending_before: a request in ``pending_review`` since before this counts as overdue.
      approved_before: a request ``approved`` since before this, and not provisioned, counts as stuck.
      outbox_before: an unsent (not parked) outbox row created before this counts as overdue.
      sending_before: an email still ``sending`` whose lease ran out (or, never leased, that was
        created) before this counts as stuck: the sweep should have sent it again by then.
      deadline_before: a request pending review whose review deadline is before this (``now``
        if not given) counts as past it: the sweep should have expired it by then.

    Returns:
      ``requests``, ``outbox`` and ``emails``, each a dict of counts and ages in seconds
      (None where there is nothing to be old).
    """
    r, o, n = orm.access_requests.c, orm.outbox.c, orm.notifications.c
    pending = r.status == Status.PENDING_REVIEW
    approved = r.status == Status.APPROVED
    unsent = o.parked_at.is_(None)
    sending = n.status == DeliveryStatus.SENDING
    count = sa.func.count
    with uow:
        connection = uow.session.connection()
        requests = connection.execute(
            sa.select(
                count().filter(pending),
                sa.func.min(r.updated_at).filter(pending),
                count().filter(pending, r.updated_at < pending_before),
                count().filter(approved),
                sa.func.min(r.updated_at).filter(approved),
                count().filter(approved, r.updated_at < approved_before),
                count().filter(r.status == Status.PROVISIONING_FAILED),
                count().filter(pending, r.review_deadline_at < (deadline_before or now)),
            ).where(r.status.in_([Status.PENDING_REVIEW, Status.APPROVED, Status.PROVISIONING_FAILED]))
        ).one()
        outbox = connection.execute(
            sa.select(
                count().filter(unsent),
                sa.func.min(o.created_at).filter(unsent),
                count().filter(unsent, o.created_at < outbox_before),
                count().filter(o.parked_at.is_not(None)),
            ).where(o.sent_at.is_(None))
        ).one()
        emails = connection.execute(
            sa.select(
                count().filter(sending),
                count().filter(sending, sa.func.coalesce(n.lease_expires_at, n.created_at) < sending_before),
                count().filter(n.status == DeliveryStatus.FAILED),
                count().filter(n.status == DeliveryStatus.PARTIAL),
            ).where(n.status.in_([DeliveryStatus.SENDING, DeliveryStatus.FAILED, DeliveryStatus.PARTIAL]))
        ).one()
    return {
        "requests": {
            "pending_review": requests[0],
            "oldest_pending_review_seconds": _age_seconds(now, requests[1]),
            "pending_review_overdue": requests[2],
            "approved": requests[3],
            "oldest_approved_seconds": _age_seconds(now, requests[4]),
            "approved_stuck": requests[5],
            "provisioning_failed": requests[6],
            "past_review_deadline": requests[7],
        },
        "outbox": {
            "unsent": outbox[0],
            "oldest_unsent_seconds": _age_seconds(now, outbox[1]),
            "unsent_overdue": outbox[2],
            "parked": outbox[3],
        },
        "emails": {
            "sending": emails[0],
            "stuck_sending": emails[1],
            "failed": emails[2],
            "partial": emails[3],
        },
    }


#: The most pending requests one page of the review console lists.
PENDING_QUEUE_LIMIT = 500


def pending_queue(
    uow: SqlUnitOfWork,
    *,
    now: datetime,
    plan_id: str | None = None,
    consumer_id: str | None = None,
    submitted_before: datetime | None = None,
    limit: int = PENDING_QUEUE_LIMIT,
) -> list[dict[str, Any]]:
    """The requests pending review, oldest first, as the review console lists them: one statement.

    Parameters:
      now: the moment ages are measured from.
      plan_id, consumer_id: only the requests for this plan, of this consumer.
      submitted_before: only the requests submitted before this moment (an "older than" filter).
      limit: at most this many rows.

    Returns:
      One dict per request: its user (consumer id, name, email), app (id and name, or the new
      app's name), products, plan, age in seconds, justification, why it was parked (its
      rule that routed it, else its status reason) and its review deadline (ISO 8601, or None).
    """
    r, c, a = orm.access_requests.c, orm.consumers.c, orm.apps.c
    query = (
        sa.select(
            r.id,
            r.kind,
            r.consumer_id,
            c.name.label("consumer_name"),
            c.email.label("consumer_email"),
            r.app_id,
            sa.func.coalesce(a.name, r.new_app_name).label("app_name"),
            r.product_ids,
            r.plan_id,
            r.submitted_at,
            r.justification,
            r.status_reason,
            r.routed_by,
            r.review_deadline_at,
        )
        .select_from(
            orm.access_requests.outerjoin(orm.consumers, c.id == r.consumer_id).outerjoin(
                orm.apps, a.id == r.app_id
            )
        )
        .where(r.status == Status.PENDING_REVIEW)
        .order_by(r.submitted_at, r.id)
        .limit(limit)
    )
    if plan_id:
        query = query.where(r.plan_id == plan_id)
    if consumer_id:
        query = query.where(r.consumer_id == consumer_id)
    if submitted_before is not None:
        query = query.where(r.submitted_at < submitted_before)
    with uow:
        rows = uow.session.connection().execute(query).all()
    return [
        {
            "id": row.id,
            "kind": row.kind.value,
            "consumer_id": row.consumer_id,
            "consumer_name": row.consumer_name,
            "consumer_email": row.consumer_email,
            "app_id": row.app_id,
            "app_name": row.app_name,
            "product_ids": list(row.product_ids),
            "plan_id": row.plan_id,
            "age_seconds": _age_seconds(now, row.submitted_at),
            "justification": row.justification,
            # What parked it: the rule (or plan flag) that routed it, as the audit trail says.
            "reason": row.routed_by or row.status_reason,
            "review_deadline_at": row.review_deadline_at.isoformat() if row.review_deadline_at else None,
        }
        for row in rows
    ]
