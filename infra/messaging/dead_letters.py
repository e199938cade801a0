"""Looking into the dead-letter queues, and replaying what is there.

Every accessflow queue ``Q`` dead-letters into ``Q.XQ``. The message stays in RabbitMQ;
why it is there is in the ``dead_letters`` table (for messages that failed their
retries or kept killing their worker) or in RabbitMQ's ``x-death`` header (for
deliveries the consumer refused but could not record). Replaying moves a message back
to ``Q`` with its original id and fresh retries; consumers are idempotent, so a replay
of something already applied changes nothing.

Any body may sit in an XQ, so both read it the way the consumer does
(:func:`infra.messaging.envelope.parse_json`: bounded in size and depth), and never let it raise.

Looking counts no delivery. A quorum queue counts every return of a message to it (a
nack with requeue, or a channel closed with the message unacknowledged) in
``x-delivery-count``, and RabbitMQ 4.0 drops a message past a default ``delivery-limit``
of 20 even where the queue sets none; an XQ has no dead-letter queue of its own, so the
message is gone. Which returns count has changed between versions (4.3 counts a closed
channel but not a nack), so no return is safe. ``dlq list``, a dry run, and the letters a
replay keeps therefore never return a message: each is *moved*, published again to the
tail of its XQ (with publisher confirms) and only then acknowledged. Moving a queue's
whole depth leaves it in its order; a crash mid-way can duplicate one letter, never
lose one. A stream or a classic XQ would need no moving, but a queue's type cannot
change once declared, and a stream cannot give up one message when it is replayed.
A move restarts the XQ's message TTL (``ACCESSFLOW_DEAD_LETTER_TTL_DAYS``) for what it
moves: a listing may keep a letter longer, never shorter.

A moved copy is published by the operator's user, so RabbitMQ's validated ``user_id``
no longer names the first publisher, and ``x-`` headers belong to the broker (from 4.0
it no longer reads an ``x-death`` a client sets). The copy therefore carries who first published
it and why it was dead-lettered in ``accessflow-*`` headers, which are believed only on
a message whose validated ``user_id`` is an internal user's: any other publisher, a
portal included, may set any header it likes.

A refusal the consumer could not record (its database was down) is published into the
XQ by the consumer itself, with its reason in an ``accessflow-refusal`` header. Should that
fail too, it is nacked into the XQ with nothing but RabbitMQ's ``rejected``; the listing
then reads the body again with :func:`infra.messaging.envelope.read_envelope`, the consumer's own
pure function, and shows its reason: an unknown actor, a body that is not JSON.

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
from dramatiq.common import current_millis
from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy.orm import Session, sessionmaker

from domain.model import utcnow
from infra.db import orm
from infra.messaging.amqp import broker_user, connection_parameters
from infra.messaging.broker import DEATH_QUEUE_HEADER, DEATH_REASON_HEADER, PUBLISHER_HEADER, REFUSAL_HEADER
from infra.messaging.delivery import forget
from infra.messaging.envelope import (
    DELAY_SUFFIX,
    MAX_ORIGIN_CHARS,
    Refused,
    Unreadable,
    excerpt,
    is_message_id,
    parse_json,
    read_envelope,
    safe_text,
)
from infra.messaging.queue_depths import quiet_channel_closes
from messages.routes import ROUTES

#: What each reason RabbitMQ gives in ``x-death`` means here.
BROKER_REASONS = {
    "delivery_limit": "delivered more times than the queue's delivery limit: it kept dying mid-run, "
    "or its deliveries could not be counted",
    "expired": "expired in its queue (message TTL) before it was processed",
    "maxlen": "dropped from the head of a full queue (max length)",
    "rejected": "rejected by a worker, which recorded no reason",
}


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


@dataclass(frozen=True)
class _Provenance:
    """Who first published a dead letter, and RabbitMQ's reason and queue when it dead-lettered it."""

    publisher: str | None
    death_reason: str | None
    death_queue: str | None
    #: Why the consumer refused it, when it put the refusal here itself (it could not record it).
    refusal: str | None = None


def _header_text(value: object, limit: int) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="backslashreplace")
    if not isinstance(value, str) or not value:
        return None
    return safe_text(" ".join(value.split()))[:limit] or None


def _provenance(properties: pika.BasicProperties, trusted: frozenset[str]) -> _Provenance:
    """Where a letter came from: from our headers on a copy a trusted user moved, else from RabbitMQ's.

    A publisher can set any header, ``x-death`` and ours included: both are read as
    untrusted data, and ours are believed only when the validated ``user_id`` is ``trusted``.
    """
    sender = _sender(properties)
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    if sender is not None and sender in trusted and isinstance(headers.get(PUBLISHER_HEADER), str):
        return _Provenance(
            publisher=_header_text(headers.get(PUBLISHER_HEADER), 255),
            death_reason=_header_text(headers.get(DEATH_REASON_HEADER), 100),
            death_queue=_header_text(headers.get(DEATH_QUEUE_HEADER), 255),
            refusal=_header_text(headers.get(REFUSAL_HEADER), 500),
        )
    deaths = headers.get("x-death")
    first = deaths[0] if isinstance(deaths, list) and deaths else None
    first = first if isinstance(first, dict) else {}
    return _Provenance(
        publisher=sender,
        death_reason=_header_text(first.get("reason"), 100),
        death_queue=_header_text(first.get("queue"), 255),
    )


def _routes_of(xq_name: str) -> tuple[str, dict[str, str]]:
    """The work queue ``xq_name`` belongs to, and each actor with its queue under the same prefix."""
    target = xq_name.removesuffix(".XQ")
    prefix = target.rsplit(".", 1)[0]
    return target, {route.actor_name: route.queue_name(prefix) for route in ROUTES}


def _reason(
    body: bytes,
    provenance: _Provenance,
    xq_name: str,
    *,
    internal: frozenset[str],
    external: frozenset[str],
) -> str:
    """Why a letter with no ``dead_letters`` row is in ``xq_name``, from what RabbitMQ and the body say."""
    reason = provenance.death_reason
    if provenance.refusal is not None:
        return f"refused by the consumer, which could not record why: {provenance.refusal}"
    if reason == "rejected":
        # A worker records why before it nacks; one that did not was the consumer refusing
        # a delivery it could not record. The same pure reading gives the same refusal again.
        target, actors = _routes_of(xq_name)
        delivered_on = provenance.death_queue
        if delivered_on not in (target, target + DELAY_SUFFIX):
            delivered_on = target
        try:
            verdict = read_envelope(
                body,
                delivered_on=delivered_on,
                actors=actors,
                user_id=provenance.publisher,
                internal_senders=internal,
                external_queues=external,
                now_ms=current_millis(),
                max_delay_ms=0,  # bounds only the eta kept from a delivery, not whether it is refused
            )
        except Exception as error:  # a listing shows every letter, whatever reading it does
            return f"refused by the consumer, which could not record why (reading it again failed: {type(error).__name__})"
        if isinstance(verdict, Refused):
            return f"refused by the consumer, which could not record why: {verdict.reason}"
    if reason is None:
        return "unknown"
    return BROKER_REASONS.get(reason, f"dead-lettered by the broker ({reason})")


def _moved_properties(
    properties: pika.BasicProperties, provenance: _Provenance, mover: str
) -> pika.BasicProperties:
    """The properties of a letter's copy at the tail of its XQ: the same, but published by ``mover``."""
    headers = properties.headers if isinstance(properties.headers, dict) else {}
    # x- headers belong to the broker: a quorum queue's delivery count, x-death, and whatever a
    # publisher set under those names. What a reader needs of them travels in our own.
    kept = {
        name: value
        for name, value in headers.items()
        if isinstance(name, str) and not name.lower().startswith("x-")
    }
    kept[PUBLISHER_HEADER] = provenance.publisher or ""
    kept[DEATH_REASON_HEADER] = provenance.death_reason or ""
    kept[DEATH_QUEUE_HEADER] = provenance.death_queue or ""
    kept[REFUSAL_HEADER] = provenance.refusal or ""  # believed only from one of ours, as the rest
    return pika.BasicProperties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        headers=kept,
        delivery_mode=2,
        priority=properties.priority,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        expiration=properties.expiration,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        type=properties.type,
        user_id=mover,  # validated by RabbitMQ: the copy says truthfully who moved it
        app_id=properties.app_id,
    )


def _move_to_tail(
    source: BlockingChannel,
    sink: BlockingChannel,
    xq_name: str,
    delivery_tag: int,
    properties: pika.BasicProperties,
    body: bytes,
    *,
    mover: str,
    trusted: frozenset[str],
) -> None:
    """Put a letter taken from ``xq_name`` back at its tail, without it counting as a delivery.

    ``sink`` has publisher confirms on: the copy is in the queue before the original is
    acknowledged, so a crash in between leaves a duplicate, never a loss. ``trusted`` are
    the users whose headers the mover believes: the internal users, and the mover itself,
    which is about to vouch for the copy with its own ``user_id``.
    """
    moved = _moved_properties(properties, _provenance(properties, trusted), mover)
    sink.basic_publish(exchange="", routing_key=xq_name, body=body, properties=moved, mandatory=True)
    source.basic_ack(delivery_tag)


@contextmanager
def _channel(broker_url: str) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(connection_parameters(broker_url))  # one node, or a cluster's
    try:
        with quiet_channel_closes():  # an XQ never declared answers 404: an answer, not news
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


def _parties(
    broker_url: str,
    xq_name: str,
    internal_senders: Iterable[str] | None,
    external_queues: Iterable[str] | None,
) -> tuple[str, frozenset[str], frozenset[str]]:
    """The user of ``broker_url`` (who moves and replays), the internal users, and the external queues."""
    user = broker_user(connection_parameters(broker_url))
    internal = frozenset(internal_senders or {user})
    if external_queues is None:
        target, _ = _routes_of(xq_name)
        prefix = target.rsplit(".", 1)[0]
        external_queues = (route.queue_name(prefix) for route in ROUTES if route.external)
    return user, internal, frozenset(external_queues)


def peek(
    broker_url: str,
    session_factory: sessionmaker[Session],
    xq_name: str,
    *,
    internal_senders: Iterable[str] | None = None,
    external_queues: Iterable[str] | None = None,
) -> list[DeadLetter]:
    """Every message in ``xq_name``, with its reason; the queue is left as it was, in its order.

    Each message is moved to the tail of the queue (module docstring), so that looking
    counts no delivery; once the whole depth has moved, the queue is in its old order.

    Parameters:
      internal_senders, external_queues: as for :func:`replay`; they decide whose
        ``accessflow-*`` headers are believed, and how a refusal is read again.
    """
    count = depth(broker_url, xq_name)
    if count == 0:
        return []
    mover, internal, external = _parties(broker_url, xq_name, internal_senders, external_queues)
    trusted = internal | {mover}
    found: list[tuple[bytes, pika.BasicProperties, _Provenance]] = []
    with _channel(broker_url) as source, _channel(broker_url) as sink:
        sink.confirm_delivery()
        for _ in range(count):
            method, properties, body = source.basic_get(xq_name, auto_ack=False)
            if method is None:
                break
            found.append((body, properties, _provenance(properties, trusted)))
            _move_to_tail(
                source, sink, xq_name, method.delivery_tag, properties, body, mover=mover, trusted=trusted
            )
    decoded = [(_decode(body), body, properties, provenance) for body, properties, provenance in found]
    reasons = _reasons(session_factory, [m["message_id"] for m, _, _, _ in decoded if m is not None])
    letters = []
    for message, body, properties, provenance in decoded:
        message_id = message["message_id"] if message else None
        if message_id is None and is_message_id(properties.message_id):
            message_id = properties.message_id  # a body we cannot read, published with an id
        actor_name = message.get("actor_name") if message else None
        recorded = reasons.get(message_id or "")
        reason, at = recorded or (
            _reason(body, provenance, xq_name, internal=internal, external=external),
            None,
        )
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
    crash mid-replay duplicates at most one message, never loses one. What is kept is
    moved to the tail of the XQ, not returned (module docstring), so a replay counts no
    delivery of it; with a ``limit``, the next replay therefore starts with letters this
    one did not look at. A dry run moves the queue's whole depth, so that it leaves the
    order as it was, and counts the first ``limit``: what a replay would do.

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
    replayer, internal, external = _parties(broker_url, xq_name, internal_senders, external_queues)
    trusted = internal | {replayer}
    if external_queues is not None:
        target_is_external = target in external
    else:
        target_is_external = target.rsplit(".", 1)[-1] in {r.queue for r in ROUTES if r.external}
    queued = depth(broker_url, xq_name)
    wanted = min(queued, limit if limit is not None else 10**9)
    with _channel(broker_url) as source, _channel(broker_url) as sink:
        sink.confirm_delivery()
        for position in range(queued if dry_run else wanted):
            method, properties, body = source.basic_get(xq_name, auto_ack=False)
            if method is None:
                break
            message = _decode(body)
            # Who first published it: RabbitMQ's validated user_id, or, on a copy an internal
            # user moved, the header that user wrote (module docstring).
            sender = _provenance(properties, internal).publisher
            sender_is_internal = sender is not None and sender in internal
            if message is not None and not sender_is_internal and not target_is_external:
                message = None  # it was refused as forged the first time; a replay must not admit it
                if position < wanted:
                    result.untrusted += 1
            if message is None or dry_run:
                _move_to_tail(
                    source,
                    sink,
                    xq_name,
                    method.delivery_tag,
                    properties,
                    body,
                    mover=replayer,
                    trusted=trusted,
                )
                if position < wanted:
                    result.kept += message is None
                    result.replayed += message is not None
                    on_each()
                continue
            message_id = str(message["message_id"])
            # Fresh retries; nothing a producer or an earlier failure put in options survives,
            # but who first published it does: the actor reads it from ``origin``.
            if sender_is_internal:
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
    return result


def _mark_replayed(session_factory: sessionmaker[Session], message_id: str) -> None:
    with session_factory() as session, session.begin():
        session.execute(
            orm.dead_letters.update()
            .where(orm.dead_letters.c.message_id == message_id, orm.dead_letters.c.replayed_at.is_(None))
            .values(replayed_at=utcnow())
        )
