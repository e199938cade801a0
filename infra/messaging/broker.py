"""The dramatiq broker accessflow runs on, and the consumer that reads every delivery first.

Only the middleware we want is installed: no Callbacks, Pipelines or GroupCallbacks,
because their options would let a producer on the wire enqueue arbitrary follow-up
messages (RELIABILITY.md, pitfall 9). Every delivery is read by :mod:`infra.messaging.envelope`
in the consumer, before dramatiq sees it: options are cleaned there, where they
arrive, because dramatiq's consumer thread acts on ``eta`` before any middleware runs
(pitfall 11). A body that cannot be processed is recorded and acknowledged there too,
so it never reaches an actor nor stops a pool. Every publish of ours carries the AMQP
``user_id``, which RabbitMQ validates, so consumers can tell our messages from others'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import dramatiq
import pika
import pika.exceptions
import pika.spec
import structlog
from dramatiq.brokers.rabbitmq import (
    MAX_ENQUEUE_ATTEMPTS,
    RabbitmqBroker,
    _RabbitmqConsumer,
    _RabbitmqMessage,
)
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import current_millis, dq_name, q_name, xq_name
from dramatiq.middleware import (
    CurrentMessage,
    Middleware,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from infra.messaging.amqp import amqp_url_with_timeouts, broker_user, connection_closed
from infra.messaging.envelope import Accepted, Refused, body_id, excerpt, read_envelope
from infra.settings import Settings
from messages.routes import ROUTES

log = structlog.get_logger()

#: Options accessflow itself puts on the wire: retry count, delay-queue eta, first publisher.
#: Retries also writes ``traceback`` and ``requeue_timestamp``; they stay in the process.
WIRE_OPTIONS = ("retries", "eta", "origin")
#: Actors outside parties publish to; every other queue, and every delay queue, is internal.
EXTERNAL_ACTORS = frozenset(route.actor_name for route in ROUTES if route.external)
#: Milliseconds added to the longest backoff before an eta is clamped: clocks of two workers differ.
ETA_MARGIN_MS = 5_000

#: Headers of a copy of a message that accessflow itself put into ``<queue>.XQ`` (a dead letter
#: moved to the tail of its XQ, or a refusal nobody could record), read by :mod:`infra.messaging.dead_letters`
#: on copies published by an internal user only: who first published it ("" for a publisher
#: that set no user_id), RabbitMQ's reason and queue of its first dead-lettering ("" if unknown),
#: and why the consumer refused it.
PUBLISHER_HEADER = "accessflow-publisher"
DEATH_REASON_HEADER = "accessflow-death-reason"
DEATH_QUEUE_HEADER = "accessflow-death-queue"
REFUSAL_HEADER = "accessflow-refusal"

#: Records a refused delivery: (queue it came on, the refusal, its AMQP user_id or None).
RefusalRecorder = Callable[[str, Refused, str | None], None]


def middleware_for(settings: Settings) -> list[Middleware]:
    # No middleware cleans options: EnvelopeConsumer does, as each delivery arrives, which is
    # the only point early enough for eta. The in-memory broker gets no message from a wire.
    return [
        TimeLimit(time_limit=settings.actor_time_limit_ms),
        ShutdownNotifications(),
        Retries(
            max_retries=settings.max_retries,
            min_backoff=settings.min_backoff_ms,
            max_backoff=settings.max_backoff_ms,
        ),
        CurrentMessage(),
    ]


class QuorumRabbitmqBroker(RabbitmqBroker):
    """dramatiq's RabbitMQ broker, declaring quorum queues.

    Why quorum and not classic: a quorum queue replicates every confirmed message to a
    majority of nodes, and counts redeliveries, dead-lettering a message after
    ``x-delivery-limit`` of them, so even a message that kills every worker it reaches
    cannot loop forever. Dead-lettering is at-least-once, so nothing is lost on the way
    to ``<queue>.XQ``. A queue's type cannot change once declared, hence this choice on
    day one. The delivery limit here is a backstop: :mod:`infra.messaging.delivery` bounds deliveries
    more tightly, and more precisely, in the database.
    """

    def __init__(
        self,
        *,
        delivery_limit: int,
        dead_letter_ttl_ms: int | None,
        internal_senders: Iterable[str] | None = None,
        external_queues: Iterable[str] | None = None,
        max_delay_ms: int = 60_000 + ETA_MARGIN_MS,
        **kwargs: Any,
    ) -> None:
        """Parameters beyond dramatiq's:

        delivery_limit: the quorum queues' ``x-delivery-limit``.
        dead_letter_ttl_ms: how long ``.XQ`` keeps a dead letter; None keeps it.
        internal_senders: AMQP users whose messages are accessflow's own; default the URL's user.
        external_queues: queues outside parties publish to; default those of the external
            routes' actors (submit, decide), as registered when a consumer starts.
        max_delay_ms: the longest a message may wait in a delay queue, in milliseconds.
        """
        super().__init__(**kwargs)
        self.delivery_limit = delivery_limit
        self.dead_letter_ttl_ms = dead_letter_ttl_ms
        #: The user_id every publish of ours carries; RabbitMQ refuses it from any other user.
        self.user_id = broker_user(self.parameters)
        self.internal_senders = frozenset(internal_senders or {self.user_id})
        self.external_queues = frozenset(external_queues) if external_queues is not None else None
        self.max_delay_ms = max_delay_ms
        #: Set by the composition root in worker processes; without it a refusal is dead-lettered.
        self.on_refused: RefusalRecorder | None = None

    @property
    def consumer_class(self) -> type[EnvelopeConsumer]:
        return EnvelopeConsumer

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 5000) -> EnvelopeConsumer:
        """dramatiq's consume, without leaving the calling thread a connection it never uses again.

        dramatiq declares the queue on the consumer thread's own connection, then consumes on
        another. The first would idle for the pool's life, and an idle BlockingConnection
        answers no heartbeats: RabbitMQ drops it two heartbeats later, and closing it at
        shutdown logs an ERROR (16 of them after each long ``make bench`` burst: one per
        consumer thread, a queue and its delay queue per work queue, per process). A later
        enqueue on that thread (a delayed message coming due) opens a fresh one.
        """
        try:
            consumer = super().consume(queue_name, prefetch, timeout)
            assert isinstance(consumer, EnvelopeConsumer), "consumer_class makes them"
            return consumer
        finally:
            del self.connection

    def external_queues_among(self, actors: Mapping[str, str]) -> frozenset[str]:
        if self.external_queues is not None:
            return self.external_queues
        return frozenset(queue for name, queue in actors.items() if name in EXTERNAL_ACTORS)

    def record_refusal(self, queue_name: str, refused: Refused, sender: str | None) -> None:
        if self.on_refused is None:
            raise RuntimeError("nothing records refused messages in this process")
        self.on_refused(queue_name, refused, sender)

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        """dramatiq's enqueue, publishing with our ``user_id`` and only our own options.

        ``delay`` sends the message to the delay queue with an ``eta``; the consumer thread
        re-enqueues it onto its canonical queue when that time comes. Retries' ``traceback``
        never leaves the process: it may hold values (pitfall 10), and the consumer drops it.
        """
        canonical_queue_name = message.queue_name
        queue_name = canonical_queue_name
        if delay is not None:
            queue_name = dq_name(queue_name)
            message = message.copy(queue_name=queue_name, options={"eta": current_millis() + delay})
        # Built field by field: Retries hands over a MessageProxy, which dataclasses.replace refuses.
        wire: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue_name,
            actor_name=message.actor_name,
            args=message.args,
            kwargs=message.kwargs,
            options={k: message.options[k] for k in WIRE_OPTIONS if k in message.options},
            message_id=message.message_id,
            message_timestamp=message.message_timestamp,
        )
        attempts = 0
        while True:
            try:
                self.declare_queue(canonical_queue_name, ensure=True)
                self.emit_before("enqueue", message, delay)
                self.channel.basic_publish(
                    exchange="",
                    routing_key=queue_name,
                    body=wire.encode(),
                    properties=pika.BasicProperties(
                        delivery_mode=2,
                        content_type="application/json",
                        message_id=message.message_id,
                        user_id=self.user_id,
                    ),
                    # With confirms on, mandatory makes an unroutable message an error, not a loss.
                    mandatory=self.confirm_delivery,
                )
                self.emit_after("enqueue", message, delay)
                return message
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as error:
                del self.connection  # the next attempt opens a fresh connection and channel
                if isinstance(error, pika.exceptions.UnroutableError):
                    self.queues_pending.add(q_name(queue_name))  # redeclared on the next attempt
                attempts += 1
                if attempts >= MAX_ENQUEUE_ATTEMPTS:
                    raise connection_closed(error) from None

    def _build_queue_arguments(self, queue_name: str) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": xq_name(queue_name),
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",  # required by at-least-once dead-lettering
        }

    def _declare_xq_queue(self, queue_name: str) -> Any:
        # dramatiq's dead-letter queue drops messages after 7 days, silently; ours keeps them
        # until an operator replays or purges them, unless ACCESSFLOW_DEAD_LETTER_TTL_DAYS says otherwise.
        arguments: dict[str, Any] = {"x-queue-type": "quorum"}
        if self.dead_letter_ttl_ms:
            arguments["x-message-ttl"] = self.dead_letter_ttl_ms
        return self.channel.queue_declare(queue=xq_name(queue_name), durable=True, arguments=arguments)


class EnvelopeConsumer(_RabbitmqConsumer):
    """dramatiq's RabbitMQ consumer, reading each delivery with :func:`infra.messaging.envelope.read_envelope`.

    An accepted delivery goes on to dramatiq as before, with a message built only from
    checked fields and cleaned options. A refused one is recorded through the broker's
    ``on_refused`` and acknowledged here. If recording fails, its body is published to
    ``<queue>.XQ`` with the reason in an ``accessflow-refusal`` header (publisher confirms,
    on a channel of the consumer's own connection) and then acknowledged; only if that
    fails too is it nacked without requeue, for RabbitMQ to dead-letter it with no reason.
    Either way dramatiq never sees it.
    Acking here is safe: ``__next__`` runs on the consumer thread, which owns the channel.
    """

    broker: QuorumRabbitmqBroker

    def __init__(self, broker: QuorumRabbitmqBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        # Actors are registered before a worker starts consuming; a consumer restart reads them again.
        self.actors = {name: actor.queue_name for name, actor in broker.actors.items()}
        self.external_queues = broker.external_queues_among(self.actors)
        #: A channel in confirm mode on this consumer's connection, for refusals it dead-letters itself.
        self.refusals: Any = None

    def __next__(self) -> _RabbitmqMessage | None:
        try:
            method, properties, body = next(self.iterator)
            if method is None:
                return None
        except (
            AssertionError,
            pika.exceptions.AMQPConnectionError,
            pika.exceptions.AMQPChannelError,
        ) as error:
            if getattr(error, "reply_code", None) == 404:  # the queue is gone: redeclare on restart
                self.broker.queues_pending.add(q_name(self.queue_name))
            raise connection_closed(error) from None
        # pika hands a property that is not UTF-8 over as bytes: such a user_id is nobody we trust.
        user_id = properties.user_id if isinstance(properties.user_id, str) else None
        verdict = self._read(body, user_id, properties.message_id)
        if isinstance(verdict, Accepted):
            self.known_tags.add(method.delivery_tag)
            message = _RabbitmqMessage(method.redelivered, method.delivery_tag, verdict.message)  # type: ignore[no-untyped-call]
            # A quorum queue's count of earlier deliveries: with ``redelivered``, it tells
            # infra.messaging.delivery a first delivery, which it need not count. Absent on a first one.
            # Read only on a redelivery: on a first delivery the header can only be the producer's,
            # and a portal must not make its messages run one at a time by setting it.
            headers = properties.headers or {}
            message.delivery_count = headers.get("x-delivery-count") if method.redelivered else None  # type: ignore[attr-defined]
            return message
        self._refuse(method.delivery_tag, verdict, user_id, body, properties)
        return None

    def _read(self, body: bytes, user_id: str | None, amqp_message_id: object) -> Accepted | Refused:
        try:
            return read_envelope(
                body,
                delivered_on=self.queue_name,
                actors=self.actors,
                user_id=user_id,
                internal_senders=self.broker.internal_senders,
                external_queues=self.external_queues,
                now_ms=current_millis(),
                max_delay_ms=self.broker.max_delay_ms,
                amqp_message_id=amqp_message_id if isinstance(amqp_message_id, str) else None,
            )
        except Exception as error:  # a bug in reading must cost one message, not the consumer
            log.error("message.unreadable", queue=self.queue_name, error=type(error).__name__)
            return Refused(
                message_id=body_id(body),
                actor_name="",
                reason=f"could not be read ({type(error).__name__})",
                kind="malformed",
                body_excerpt=excerpt(body),
            )

    def _refuse(
        self, tag: int, refused: Refused, sender: str | None, body: bytes, properties: pika.BasicProperties
    ) -> None:
        log.warning(
            "message.refused",
            queue=self.queue_name,
            message_id=refused.message_id,
            kind=refused.kind,
            sender=sender,
            reason=refused.reason,
        )
        try:
            self.broker.record_refusal(self.queue_name, refused, sender)
            recorded = True
        except Exception as error:
            # One line, no traceback: its frames would hold the body's values.
            log.warning(
                "message.refusal_unrecorded",
                queue=self.queue_name,
                message_id=refused.message_id,
                error=type(error).__name__,
            )
            recorded = False
        try:
            if recorded or self._dead_letter(refused, sender, body, properties):
                self.channel.basic_ack(tag)
            else:
                self.channel.basic_nack(tag, requeue=False)  # RabbitMQ moves it to <queue>.XQ
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as error:
            raise connection_closed(error) from None

    def _dead_letter(
        self, refused: Refused, sender: str | None, body: bytes, properties: pika.BasicProperties
    ) -> bool:
        """Put a refusal nobody could record into ``<queue>.XQ`` with its reason; True once confirmed.

        The copy is published by accessflow's own user, so :mod:`infra.messaging.dead_letters` believes
        its ``accessflow-*`` headers: who first published it, the queue, and the reason.
        """
        try:
            if self.refusals is None or not self.refusals.is_open:
                self.refusals = self.connection.channel()
                self.refusals.confirm_delivery()
            message_id = properties.message_id
            self.refusals.basic_publish(
                exchange="",
                routing_key=xq_name(q_name(self.queue_name)),
                body=body,
                properties=pika.BasicProperties(
                    delivery_mode=2,
                    content_type=properties.content_type
                    if isinstance(properties.content_type, str)
                    else None,
                    message_id=message_id if isinstance(message_id, str) else None,
                    user_id=self.broker.user_id,
                    headers={
                        REFUSAL_HEADER: refused.reason[:500],
                        PUBLISHER_HEADER: sender or "",
                        DEATH_REASON_HEADER: "rejected",
                        DEATH_QUEUE_HEADER: self.queue_name,
                    },
                ),
                mandatory=True,
            )
            return True
        except (pika.exceptions.AMQPError, OSError) as error:  # the nack dead-letters it without a reason
            log.warning(
                "message.refusal_not_dead_lettered",
                queue=self.queue_name,
                message_id=refused.message_id,
                error=type(error).__name__,
            )
            if isinstance(error, pika.exceptions.AMQPConnectionError):
                raise
            return False


def queue_declarer(broker: RabbitmqBroker) -> Callable[[str], None]:
    """A ``declare`` for :class:`BatchConfirmPublisher`: declares the queue on ``broker`` every time.

    dramatiq's broker declares a queue once per process and then trusts its memory; the
    publisher asks again only for a queue it found missing (deleted at runtime), which
    must then really be declared again, with its delay and dead-letter queues.
    """

    def declare(queue_name: str) -> None:
        try:
            broker.declare_queue(queue_name)  # registers a queue new to the broker, as dramatiq does
            broker.queues_pending.add(q_name(queue_name))
            broker.declare_queue(queue_name, ensure=True)
        finally:
            # The calling thread's connection was opened for this declare alone (a thread declares
            # a queue once), and an idle BlockingConnection answers no heartbeats: RabbitMQ would
            # drop it two heartbeats later, and its close at shutdown would log an ERROR.
            del broker.connection

    return declare


def record_refusals_with(broker: dramatiq.Broker, record_malformed: Callable[..., None]) -> None:
    """Have ``broker``'s consumers record refused deliveries with ``Services.record_malformed``."""
    if isinstance(broker, QuorumRabbitmqBroker):
        broker.on_refused = lambda queue_name, refused, sender: record_malformed(
            message_id=refused.message_id,
            queue_name=queue_name,
            actor_name=refused.actor_name,
            reason=refused.reason,
            body=refused.body_excerpt,
            sender=sender,
            kind=refused.kind,
        )


def make_broker(settings: Settings) -> dramatiq.Broker:
    """Build the broker ``settings.broker_url`` names: RabbitMQ, or ``stub://`` in memory.

    Several comma-separated URLs give dramatiq the list of a cluster's nodes: each
    connection, and each reconnect of a consumer or a publisher, goes to the first that answers.
    """
    broker: dramatiq.Broker
    if settings.broker_url.startswith("stub://"):
        broker = StubBroker(middleware=middleware_for(settings))
        broker.emit_after("process_boot")
    else:
        ttl_days = settings.dead_letter_ttl_days
        urls = [amqp_url_with_timeouts(url) for url in settings.broker_urls()]
        broker = QuorumRabbitmqBroker(
            url=urls[0] if len(urls) == 1 else urls,  # one URL: exactly as before there were several
            confirm_delivery=True,
            middleware=middleware_for(settings),
            delivery_limit=settings.max_deliveries * 4,
            dead_letter_ttl_ms=ttl_days * 86_400_000 if ttl_days else None,
            internal_senders=settings.internal_users(),
            external_queues=[route.queue_name(settings.queue_prefix) for route in ROUTES if route.external],
            max_delay_ms=settings.max_backoff_ms + ETA_MARGIN_MS,
        )
    return broker
