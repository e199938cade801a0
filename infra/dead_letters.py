"""Looking into the dead-letter queues, and replaying what is there.

Every accessflow queue ``Q`` dead-letters into ``Q.XQ``. The message stays in RabbitMQ;
why it is there is in the ``dead_letters`` table (for messages that failed their
retries or kept killing their worker) or in RabbitMQ's ``x-death`` header (for
deliveries the consumer refused but could not record). Replaying moves a message back
to ``Q`` with its original id and fresh retries; consumers are idempotent, so a replay
of something already applied changes nothing.

Any body may sit in an XQ, so both read it the way the consumer does
(:func:`infra.envelope.parse_json`: bounded in size and depth), and never let it raise.

A replay must not launder a message. It is published by the operator's AMQP user, which
is internal, so the consumer would keep its bookkeeping options. Dead-lettering keeps
the original AMQP properties, so the original publisher is known: if it was not one of
accessflow's own users, the replay sets ``origin`` to that user (or none, if it did not
say), exactly as the consumer did on the first delivery; and such a message bound for an
internal queue, where only accessflow's own messages may go, stays in the XQ.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
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
from infra.broker import amqp_url_with_timeouts, broker_user
from infra.delivery import forget
from infra.envelope import MAX_ORIGIN_CHARS, Unreadable, excerpt, is_message_id, parse_json, safe_text
from messages.routes import ROUTES


@dataclass(frozen=True)
class DeadLetter:
    queue_name: str
    message_id: str | None
    actor_name: str | None
    reason: str
    dead_lettered_at: datetime | None
    body_excerpt: str


def _decode(body: bytes) -> dict[str, Any] | None:
    """The envelope in ``body``, if it is a JSON object with a usable message id; never raises."""
    try:
        decoded = parse_json(body)
    except Unreadable:
        return None
    if isinstance(decoded, dict) and is_message_id(decoded.get("message_id")):
        return decoded
    return None


def _sender(properties: pika.BasicProperties) -> str | None:
    user_id = properties.user_id
    return user_id if isinstance(user_id, str) else None


def _x_death_reason(properties: pika.BasicProperties) -> str:
    # A publisher can set any header, x-death included: read it as untrusted data.
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    deaths = headers.get("x-death")
    first = deaths[0] if isinstance(deaths, list) and deaths else None
    reason = first.get("reason") if isinstance(first, dict) else None
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", errors="backslashreplace")
    if not isinstance(reason, str) or not reason:
        return "unknown"
    return f"rejected by the broker ({safe_text(' '.join(reason.split()))[:100]})"


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
        if message_id is None and is_message_id(properties.message_id):
            message_id = properties.message_id  # a body we cannot read, published with an id
        actor_name = message.get("actor_name") if message else None
        reason, at = reasons.get(message_id or "", (_x_death_reason(properties), None))
        letters.append(
            DeadLetter(
                queue_name=xq_name,
                message_id=message_id,
                actor_name=safe_text(actor_name[:200]) if isinstance(actor_name, str) else None,
                reason=reason,
                dead_lettered_at=at,
                body_excerpt=excerpt(body, 200),
            )
        )
    return letters


@dataclass
class ReplayResult:
    replayed: int = 0
    kept: int = 0  # left in the XQ for a human: not a message, or an outsider's for an internal queue
    untrusted: int = 0  # of those kept: published by an outsider to an internal queue


def replay(
    broker_url: str,
    session_factory: sessionmaker[Session],
    xq_name: str,
    *,
    limit: int | None = None,
    dry_run: bool = False,
    on_each: Callable[[], None] = lambda: None,
    internal_senders: Iterable[str] | None = None,
    external_queues: Iterable[str] | None = None,
) -> ReplayResult:
    """Move up to ``limit`` messages from ``xq_name`` back to their queue.

    Each is published with publisher confirms before it is acknowledged in the XQ, so a
    crash mid-replay duplicates at most one message, never loses one.

    Parameters:
      internal_senders: AMQP users whose messages are accessflow's own
        (``Settings.internal_users()``: the workers and the operators). The default, only
        the user of ``broker_url`` (which publishes the replays), fits a deployment with one
        user; with separate users, pass them all, or a message the workers dead-lettered
        counts as an outsider's: it is replayed with ``origin`` set to the workers' user, and
        kept in the XQ if its queue is internal.
      external_queues: queues outside parties may publish to; default those of the
        external routes (requests, decisions), recognised by the last part of the name.
    """
    result = ReplayResult()
    target = xq_name.removesuffix(".XQ")
    replayer = broker_user(pika.URLParameters(broker_url))
    internal = frozenset(internal_senders or {replayer})
    if external_queues is not None:
        target_is_external = target in frozenset(external_queues)
    else:
        target_is_external = target.rsplit(".", 1)[-1] in {r.queue for r in ROUTES if r.external}
    total = min(depth(broker_url, xq_name), limit if limit is not None else 10**9)
    with _channel(broker_url) as source, _channel(broker_url) as sink:
        sink.confirm_delivery()
        unreplayable: list[int] = []
        for _ in range(total):
            method, properties, body = source.basic_get(xq_name, auto_ack=False)
            if method is None:
                break
            message = _decode(body)
            sender = _sender(properties)
            trusted = sender is not None and sender in internal
            if message is not None and not trusted and not target_is_external:
                message = None  # it was refused as forged the first time; a replay must not admit it
                result.untrusted += 1
            if message is None or dry_run:
                unreplayable.append(method.delivery_tag)
                result.kept += message is None
                result.replayed += message is not None
                on_each()
                continue
            message_id = str(message["message_id"])
            # Fresh retries; nothing a producer or an earlier failure put in options survives,
            # but who first published it does: the actor reads it from ``origin``.
            if trusted:
                options = message.get("options")
                origin = options.get("origin") if isinstance(options, dict) else None
            else:
                origin = sender
            message["options"] = (
                {"origin": origin} if isinstance(origin, str) and 0 < len(origin) <= MAX_ORIGIN_CHARS else {}
            )
            message["queue_name"] = target
            sink.basic_publish(
                exchange="",
                routing_key=target,
                body=json.dumps(message).encode(),
                properties=pika.BasicProperties(
                    delivery_mode=2,
                    content_type="application/json",
                    message_id=message_id,
                    user_id=replayer,  # validated by RabbitMQ: the operator's user, an internal one
                ),
                mandatory=True,
            )
            forget(session_factory, message_id)
            _mark_replayed(session_factory, message_id)
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
