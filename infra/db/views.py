"""Read models: what the CLI and the demo show of requests and credentials, as plain dicts.

Shared so that the command line and the demo print the same thing without importing each
other; each takes a unit of work, so it reads what one transaction saw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from domain.model import AccessRequest
from infra.db.unit_of_work import SqlUnitOfWork


def request_summary(request: AccessRequest) -> dict[str, Any]:
    """A request's row in ``requests list``."""
    return {
        "id": request.id,
        "status": request.status.value,
        "reason": request.status_reason,
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
        credential = uow.credentials.for_request(request_id)
        return {
            **request_summary(request),
            "justification": request.justification,
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
            else {"id": credential.id, "kind": credential.kind.value, "public_id": credential.public_id},
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
