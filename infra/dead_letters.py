"""Looking into the dead-letter queues, and replaying what is there.

Every accessflow queue ``Q`` dead-letters into ``Q.XQ``. The message stays in RabbitMQ;
why it is there is in the ``dead_letters`` table (for messages that failed their
retries or kept killing their worker) or in RabbitMQ's ``x-death`` header (for
bodies that were not even a message). Replaying moves a message back to ``Q`` with
its original id and fresh retries; consumers are idempotent, so a replay of
something already applied changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pika
import sqlalchemy as sa
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy.orm import Session, sessionmaker

from domain.model import utcnow
from infra import orm
from infra.broker import amqp_url_with_timeouts
from infra.delivery import forget


@dataclass(frozen=True)
class DeadLetter:
    queue_name: str
    message_id: str | None
    actor_name: str | None
    reason: str
    dead_lettered_at: datetime | None
    body_excerpt: str


def _decode(body: bytes) -> dict[str, Any] | None:
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    return decoded if isinstance(decoded, dict) and "message_id" in decoded else None


def _x_death_reason(properties: pika.BasicProperties) -> str:
    deaths = (properties.headers or {}).get("x-death") or []
    if not deaths:
        return "unknown"
    first = deaths[0]
    reason = first.get("reason", b"")
    reason = reason.decode() if isinstance(reason, bytes) else str(reason)
    return f"rejected by the broker ({reason})" if reason else "unknown"


@contextmanager
def _channel(broker_url: str) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url_with_timeouts(broker_url)))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def depth(broker_url: str, queue_name: str) -> int:
    with _channel(broker_url) as channel:
        try:
            return int(channel.queue_declare(queue=queue_name, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker:
            return 0  # never declared: nothing was ever dead-lettered there


def _reasons(
    session_factory: sessionmaker[Session], message_ids: list[str]
) -> dict[str, tuple[str, datetime]]:
    if not message_ids:
        return {}
    with session_factory() as session:
        rows = session.execute(
            sa.select(
                orm.dead_letters.c.message_id, orm.dead_letters.c.reason, orm.dead_letters.c.dead_lettered_at
            )
            .where(orm.dead_letters.c.message_id.in_(message_ids))
            .order_by(orm.dead_letters.c.id)
        )
        return {message_id: (reason, at) for message_id, reason, at in rows}  # the latest wins


def peek(broker_url: str, session_factory: sessionmaker[Session], xq_name: str) -> list[DeadLetter]:
    """Every message in ``xq_name``, with its reason; the queue is left as it was."""
    count = depth(broker_url, xq_name)
    if count == 0:
        return []
    found: list[tuple[bytes, pika.BasicProperties]] = []
    with _channel(broker_url) as channel:
        for _ in range(count):
            method, properties, body = channel.basic_get(xq_name, auto_ack=False)
            if method is None:
                break
            found.append((body, properties))
        # Closing the channel without acknowledging puts every message back, in order.
    decoded = [(_decode(body), body, properties) for body, properties in found]
    reasons = _reasons(session_factory, [m["message_id"] for m, _, _ in decoded if m is not None])
    letters = []
    for message, body, properties in decoded:
        message_id = message["message_id"] if message else None
        reason, at = reasons.get(message_id or "", (_x_death_reason(properties), None))
        letters.append(
            DeadLetter(
                queue_name=xq_name,
                message_id=message_id,
                actor_name=message.get("actor_name") if message else None,
                reason=reason,
                dead_lettered_at=at,
                body_excerpt=body[:200].decode("utf-8", errors="replace"),
            )
        )
    return letters


@dataclass
class ReplayResult:
    replayed: int = 0
    kept: int = 0  # not a message at all: left in the XQ for a human


def replay(
    broker_url: str,
    session_factory: sessionmaker[Session],
    xq_name: str,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    on_each: Callable[[], None] = lambda: None,
) -> ReplayResult:
    """Move up to ``limit`` messages from ``xq_name`` back to their queue.

    Each is published with publisher confirms before it is acknowledged in the XQ, so a
    crash mid-replay duplicates at most one message, never loses one.
    """
    result = ReplayResult()
    target = xq_name.removesuffix(".XQ")
    total = min(depth(broker_url, xq_name), limit if limit is not None else 10**9)
    with _channel(broker_url) as source, _channel(broker_url) as sink:
        sink.confirm_delivery()
        unreplayable: list[int] = []
        for _ in range(total):
            method, _properties, body = source.basic_get(xq_name, auto_ack=False)
            if method is None:
                break
            message = _decode(body)
            if message is None or dry_run:
                unreplayable.append(method.delivery_tag)
                result.kept += message is None
                result.replayed += message is not None
                on_each()
                continue
            # Fresh retries; nothing a producer or an earlier failure put in options survives.
            message["options"] = {}
            message["queue_name"] = target
            sink.basic_publish(
                exchange="",
                routing_key=target,
                body=json.dumps(message).encode(),
                properties=pika.BasicProperties(delivery_mode=2, content_type="application/json"),
                mandatory=True,
            )
            forget(session_factory, message["message_id"])
            _mark_replayed(session_factory, message["message_id"])
            source.basic_ack(method.delivery_tag)
            result.replayed += 1
            on_each()
        for tag in unreplayable:
            source.basic_nack(tag, requeue=True)
    return result


def _mark_replayed(session_factory: sessionmaker[Session], message_id: str) -> None:
    with session_factory() as session, session.begin():
        session.execute(
            orm.dead_letters.update()
            .where(orm.dead_letters.c.message_id == message_id, orm.dead_letters.c.replayed_at.is_(None))
            .values(replayed_at=utcnow())
        )
