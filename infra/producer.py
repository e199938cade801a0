"""Publishing requests and decisions the way a portal does; used by the CLI and the demo."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from infra.broker import Publisher
from messages import routes, v1
from workers.registry import explain


class InvalidMessage(ValueError):
    """A request or decision that would be refused by the workers; refused here first."""


def read_request_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise InvalidMessage(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise InvalidMessage(f"{path} must hold one JSON object")
    return data


def submit(publisher: Publisher, queue_prefix: str, payload: dict[str, Any]) -> v1.AccessRequestSubmitted:
    """Validate and publish an access request; fill in request_id and submitted_at if missing."""
    payload = {"request_id": str(uuid.uuid4()), "submitted_at": datetime.now(UTC).isoformat(), **payload}
    try:
        message = v1.AccessRequestSubmitted.model_validate(payload)
    except ValidationError as error:
        raise InvalidMessage(explain(error)) from None
    _publish(publisher, queue_prefix, routes.SUBMIT, message)
    return message


def decide(
    publisher: Publisher,
    queue_prefix: str,
    *,
    request_id: str,
    approve: bool,
    admin_email: str,
    admin_id: str | None,
    reason: str,
) -> v1.AdminDecision:
    try:
        message = v1.AdminDecision(
            request_id=request_id,
            decision="approve" if approve else "reject",
            admin=v1.AdminRef(id=admin_id or admin_email.split("@")[0], email=admin_email),
            reason=reason,
            decided_at=datetime.now(UTC),
        )
    except ValidationError as error:
        raise InvalidMessage(explain(error)) from None
    _publish(publisher, queue_prefix, routes.DECIDE, message)
    return message


def _publish(publisher: Publisher, queue_prefix: str, route: routes.Route, message: Any) -> None:
    publisher.publish(
        queue_name=route.queue_name(queue_prefix),
        actor_name=route.actor_name,
        payload=message.model_dump(mode="json"),
        message_id=str(uuid.uuid4()),
    )
