"""Publishing requests and decisions the way a portal and an admin tool do; used by the CLI and the demo.

A portal publishes a v2 submission to the submissions exchange with its portal id as
the routing key; an admin tool publishes a signed v2 decision to the decisions
exchange. Both go over plain AMQP (:class:`AmqpWire`), stamped with the connection's
user in ``user_id``, which RabbitMQ validates. The in-memory demo has no broker to
validate anything, so :class:`StubWire` hands the sender to the workers itself.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import dramatiq
import pika
import pika.exceptions
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ValidationError

from infra.credentials import signing
from infra.messaging.amqp import broker_user, connection_parameters
from infra.messaging.publisher import Outgoing
from infra.messaging.topology import Topology
from messages import routes, v2
from messages.validation import explain


class InvalidMessage(ValueError):
    """A request or decision that would be refused by the workers; refused here first."""


class Wire(Protocol):
    def send(self, route: routes.Route, *, routing_key: str, payload: Mapping[str, Any]) -> str:
        """Publish one contract payload to the route's exchange; return the message id once accepted."""
        ...


class AmqpWire:
    """Publishes as a portal or admin tool does: to accessflow's exchanges, with confirms.

    The body is dramatiq's envelope around the payload; ``user_id`` is the connection's
    user, so RabbitMQ refuses the message if it is anyone else's. ``broker_url`` may list
    several nodes of a cluster, comma-separated: each send connects to the first that answers.
    """

    def __init__(self, broker_url: str, topology: Topology) -> None:
        self.parameters = connection_parameters(broker_url)
        self.user = broker_user(self.parameters)
        self.topology = topology

    def send(self, route: routes.Route, *, routing_key: str, payload: Mapping[str, Any]) -> str:
        exchange = _exchange_of(self.topology, route)
        message_id = str(uuid.uuid4())
        body = Outgoing(route.queue_name(self.topology.prefix), route.actor_name, payload, message_id)
        connection = pika.BlockingConnection(self.parameters)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(
                exchange=exchange,
                routing_key=routing_key,
                body=body.envelope().encode(),
                properties=pika.BasicProperties(
                    delivery_mode=2,
                    content_type="application/json",
                    message_id=message_id,
                    user_id=self.user,
                ),
                mandatory=True,
            )
        finally:
            if connection.is_open:
                connection.close()
        return message_id

    def take_admin_events(self, handle: Callable[[bytes], None], *, wait: float, limit: int | None) -> int:
        """Hand the admins' events to ``handle`` as received, oldest first, acknowledging each once handled.

        Reads ``<prefix>.admin.events`` as the admin tool's AMQP user (the only one, but the
        workers, with read on it). Takes what is there, then waits up to ``wait`` seconds
        from the start for more; stops after ``limit`` events. The bodies are handed over
        as they are (an :class:`~messages.events.AdminEvent` each, or an event of a later
        version), so a reader decides what it understands. An event that ``handle`` raises
        on is left on the queue (requeued) and the error raised: nothing is lost. Returns
        how many were handled.
        """
        deadline = time.monotonic() + wait
        handled = 0
        connection = pika.BlockingConnection(self.parameters)
        try:
            channel = connection.channel()
            while limit is None or handled < limit:
                method, _properties, body = channel.basic_get(
                    self.topology.admin_events_queue, auto_ack=False
                )
                if method is None:
                    if time.monotonic() >= deadline:
                        break
                    connection.sleep(ADMIN_EVENTS_POLL_SECONDS)  # serves the connection's I/O meanwhile
                    continue
                try:
                    handle(body)
                except BaseException:
                    channel.basic_nack(method.delivery_tag, requeue=True)
                    raise
                channel.basic_ack(method.delivery_tag)
                handled += 1
        finally:
            if connection.is_open:
                connection.close()
        return handled


#: How often :meth:`AmqpWire.take_admin_events` looks again at an empty queue while it waits.
ADMIN_EVENTS_POLL_SECONDS = 0.2


class StubWire:
    """The demo's wire: dramatiq's in-memory broker, with the sender passed as RabbitMQ would stamp it."""

    def __init__(self, broker: dramatiq.Broker, prefix: str, sender: str) -> None:
        self.broker = broker
        self.prefix = prefix
        self.sender = sender

    def send(self, route: routes.Route, *, routing_key: str, payload: Mapping[str, Any]) -> str:
        message = Outgoing(route.queue_name(self.prefix), route.actor_name, payload, str(uuid.uuid4()))
        envelope = message.envelope()
        self.broker.enqueue(envelope.copy(options={"origin": self.sender}))
        return message.message_id


def _exchange_of(topology: Topology, route: routes.Route) -> str:
    if route.queue == routes.SUBMIT.queue:
        return topology.submissions_exchange
    if route.queue == routes.DECIDE.queue:
        return topology.decisions_exchange
    raise ValueError(f"outside parties do not publish to {route.queue}")


def read_request_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise InvalidMessage(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise InvalidMessage(f"{path} must hold one JSON object")
    return data


def _validated(contract: type[BaseModel], payload: Mapping[str, Any]) -> Any:
    try:
        return contract.model_validate(payload)
    except ValidationError as error:
        raise InvalidMessage(explain(error)) from None


M = TypeVar("M", bound=BaseModel)


def _signed(contract: type[M], fields: dict[str, Any], *, key_id: str, private_key: Ed25519PrivateKey) -> M:
    """Sign an admin's message as ``signing.sign`` does (every member but the signature), then check it."""
    try:
        fields["signature"] = signing.sign(private_key, fields, key_id=key_id)
    except ValueError as error:
        raise InvalidMessage(str(error)) from None
    signed: M = _validated(contract, fields)
    return signed


def submit(
    wire: Wire, payload: Mapping[str, Any], *, portal_id: str | None = None
) -> v2.AccessRequestSubmitted:
    """Validate and publish an access request as a v2 submission of ``portal_id``.

    request_id and submitted_at are filled in when missing, and the version set to 2.
    """
    payload = {
        "request_id": str(uuid.uuid4()),
        "submitted_at": datetime.now(UTC).isoformat(),
        **payload,
        "version": 2,
    }
    if portal_id is not None:
        payload["portal_id"] = portal_id
    message: v2.AccessRequestSubmitted = _validated(v2.AccessRequestSubmitted, payload)
    wire.send(routes.SUBMIT, routing_key=message.portal_id, payload=message.model_dump(mode="json"))
    return message


def signed_decision(
    *,
    request_id: str,
    approve: bool,
    admin_id: str,
    reason: str,
    audience: str,
    key_id: str,
    private_key: Ed25519PrivateKey,
    decided_at: datetime | None = None,
) -> v2.AdminDecision:
    """Build and sign a v2 decision, as an admin tool does."""
    fields: dict[str, Any] = {
        "version": 2,
        "type": "access_request.decided",
        "decision_id": str(uuid.uuid4()),
        "request_id": request_id.lower(),
        "decision": "approve" if approve else "reject",
        "admin_id": admin_id,
        "reason": reason,
        "decided_at": _instant(decided_at or datetime.now(UTC)),
        "audience": audience,
    }
    return _signed(v2.AdminDecision, fields, key_id=key_id, private_key=private_key)


def decide(wire: Wire, decision: v2.AdminDecision) -> v2.AdminDecision:
    """Publish a signed decision; the routing key is the admin's id."""
    wire.send(routes.DECIDE, routing_key=decision.admin_id, payload=decision.model_dump(mode="json"))
    return decision


def signed_operation(
    *,
    operation: str,
    target: str,
    target_id: str,
    admin_id: str,
    reason: str,
    audience: str,
    key_id: str,
    private_key: Ed25519PrivateKey,
    grace_seconds: int | None = None,
    plan_id: str | None = None,
    expires_at: datetime | None = None,
    issued_at: datetime | None = None,
) -> v2.CredentialOperation:
    """Build and sign a v2 credential operation, as an admin tool does; members not given are left out."""
    fields: dict[str, Any] = {
        "version": 2,
        "type": "credentials.operate",
        "operation_id": str(uuid.uuid4()),
        "operation": operation,
        "target": target,
        "target_id": target_id,
        "admin_id": admin_id,
        "reason": reason,
        "issued_at": _instant(issued_at or datetime.now(UTC)),
        "audience": audience,
    }
    fields |= _given(
        grace_seconds=grace_seconds,
        plan_id=plan_id,
        expires_at=_instant(expires_at) if expires_at is not None else None,
    )
    return _signed(v2.CredentialOperation, fields, key_id=key_id, private_key=private_key)


def operate(wire: Wire, operation: v2.CredentialOperation) -> v2.CredentialOperation:
    """Publish a signed credential operation; like a decision, to the decisions exchange under the admin's id."""
    wire.send(
        routes.OPERATE,
        routing_key=operation.admin_id,
        payload=operation.model_dump(mode="json", exclude_none=True),
    )
    return operation


def _instant(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _given(**members: object) -> dict[str, object]:
    """The optional members given: one left out is left out of the signed bytes too, not signed as null."""
    return {name: value for name, value in members.items() if value is not None}


def signed_bulk_decision(
    *,
    approve: bool,
    admin_id: str,
    reason: str,
    audience: str,
    key_id: str,
    private_key: Ed25519PrivateKey,
    request_ids: list[str] | None = None,
    plan_id: str | None = None,
    consumer_id: str | None = None,
    submitted_before: datetime | None = None,
    decided_at: datetime | None = None,
) -> v2.BulkDecision:
    """Build and sign a v2 bulk decision, as an admin tool does: by ids, or by a filter; members not given are left out."""
    fields: dict[str, Any] = {
        "version": 2,
        "type": "access_request.bulk_decided",
        "bulk_id": str(uuid.uuid4()),
        "decision": "approve" if approve else "reject",
        "admin_id": admin_id,
        "reason": reason,
        "decided_at": _instant(decided_at or datetime.now(UTC)),
        "audience": audience,
    }
    fields |= _given(
        request_ids=",".join(r.strip().lower() for r in request_ids) if request_ids else None,
        plan_id=plan_id,
        consumer_id=consumer_id,
        submitted_before=_instant(submitted_before) if submitted_before is not None else None,
    )
    return _signed(v2.BulkDecision, fields, key_id=key_id, private_key=private_key)


def decide_bulk(wire: Wire, bulk: v2.BulkDecision) -> v2.BulkDecision:
    """Publish a signed bulk decision; like a decision, to the decisions exchange under the admin's id."""
    wire.send(
        routes.DECIDE_BULK, routing_key=bulk.admin_id, payload=bulk.model_dump(mode="json", exclude_none=True)
    )
    return bulk
