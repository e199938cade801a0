"""The dramatiq broker accessflow runs on, and the publisher that writes to it.

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

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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
from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import (
    CurrentMessage,
    Middleware,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

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

#: Records a refused delivery: (queue it came on, the refusal, its AMQP user_id or None).
RefusalRecorder = Callable[[str, Refused, str | None], None]


@dataclass(frozen=True)
class Outgoing:
    """One message to publish: a contract payload, its queue and actor, and its id.

    With ``exchange`` set it is an event for portals instead: the payload itself, as
    JSON, goes to that exchange with ``routing_key`` (default: ``queue_name``), not a
    dramatiq envelope to a queue.
    """

    queue_name: str
    actor_name: str
    payload: Mapping[str, Any]
    message_id: str
    exchange: str = ""
    routing_key: str | None = None

    def event_properties(self, user_id: str | None) -> pika.BasicProperties:
        event = self.payload.get("event")
        return pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            message_id=self.message_id,
            user_id=user_id,
            type=event if isinstance(event, str) else None,
        )

    def event_routing_key(self) -> str:
        return self.routing_key if self.routing_key is not None else self.queue_name

    def event_body(self) -> bytes:
        return json.dumps(dict(self.payload)).encode()

    def envelope(self) -> dramatiq.Message[Any]:
        return dramatiq.Message(
            queue_name=self.queue_name,
            actor_name=self.actor_name,
            args=(dict(self.payload),),
            kwargs={},
            options={},
            message_id=self.message_id,
            message_timestamp=int(time.time() * 1000),
        )


class Publisher(Protocol):
    def publish(
        self, *, queue_name: str, actor_name: str, payload: Mapping[str, Any], message_id: str
    ) -> None:
        """Hand one message to the broker; return only once the broker has accepted it."""
        ...

    def publish_batch(self, messages: Sequence[Outgoing]) -> set[str]:
        """Hand several messages to the broker; return the ids of those it confirmed."""
        ...

    def close(self) -> None:
        """Release connections of the publisher's own."""
        ...


@dataclass(frozen=True)
class PublishOutcome:
    """What the broker said about each message of a batch, for the outbox relay to act on."""

    #: Acked, and neither returned nor nacked.
    confirmed: set[str]
    #: Refused for itself, with why: returned as unroutable (``mandatory``), or the one message of
    #: a batch on which the broker closed the channel. Sent again, it will likely be refused again.
    refused: dict[str, str] = field(default_factory=dict)
    #: Nacked: the broker could not take it just now (a full queue, an internal error).
    nacked: set[str] = field(default_factory=set)
    #: Why the rest got no answer (connection lost, confirms timed out); None if all got one.
    unanswered: str | None = None
    #: The broker itself ended the batch over one of its messages (it closed the channel: no such
    #: exchange, access refused, too large): it is up, and smaller batches tell which message.
    closed_by_broker: bool = False


@runtime_checkable
class ExplainingPublisher(Protocol):
    """A :class:`Publisher` that also says why a message was not confirmed."""

    def publish_explained(self, messages: Sequence[Outgoing]) -> PublishOutcome:
        """Hand several messages to the broker; say what became of each."""
        ...


class DramatiqPublisher:
    """Publishes through a dramatiq broker, one message at a time.

    On RabbitMQ the broker is built with publisher confirms and ``mandatory``, so
    :meth:`publish` returns only once the message is on a queue. The CLI and the
    in-memory demo use this; the workers' outbox relay uses :class:`BatchConfirmPublisher`.
    """

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker
        #: Events for portals, kept here when the broker is in memory: no portal listens there.
        self.events: list[Outgoing] = []

    def publish(
        self, *, queue_name: str, actor_name: str, payload: Mapping[str, Any], message_id: str
    ) -> None:
        self.broker.enqueue(Outgoing(queue_name, actor_name, payload, message_id).envelope())

    def publish_batch(self, messages: Sequence[Outgoing]) -> set[str]:
        confirmed: set[str] = set()
        for message in messages:
            try:
                if message.exchange:
                    self._publish_event(message)
                else:
                    self.broker.enqueue(message.envelope())
            except Exception as error:
                log.warning("publish.failed", message_id=message.message_id, error=type(error).__name__)
                break
            confirmed.add(message.message_id)
        return confirmed

    def _publish_event(self, message: Outgoing) -> None:
        if not isinstance(self.broker, RabbitmqBroker):
            # The in-memory broker has exchanges for nobody: the demo and unit tests read them here.
            self.events.append(message)
            return
        if not self.broker.confirm_delivery:
            raise RuntimeError("events are published only with publisher confirms")
        try:
            # With confirms on, pika raises if the event is nacked or returned (mandatory).
            self.broker.channel.basic_publish(
                exchange=message.exchange,
                routing_key=message.event_routing_key(),
                body=message.event_body(),
                properties=message.event_properties(getattr(self.broker, "user_id", None)),
                mandatory=True,
            )
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError):
            del self.broker.connection  # the next publish opens a fresh connection and channel
            raise

    def close(self) -> None:
        pass  # the broker, and its connections, belong to whoever built it


def _nothing() -> None:
    """The callback of a wake-up timer: the timer firing is the whole point."""


class _ConfirmChannel:
    """One thread's connection, its channel in confirm mode, and the confirms of the batch in flight.

    The channel is pika's asynchronous core of a blocking channel: the blocking channel
    waits for each confirm in turn (one round trip per message), and pika has no public
    batch-confirm API. The core's callbacks run on this thread, inside
    ``process_data_events``, and nothing else uses the channel, so plain attributes suffice.
    """

    def __init__(self, connection: pika.BlockingConnection) -> None:
        self.connection = connection
        self.core: Any = connection.channel()._impl
        self.next_tag = 1
        #: Delivery tag -> message id, for every publish not yet acked or nacked.
        self.outstanding: dict[int, str] = {}
        self.acked: set[str] = set()
        self.nacked: set[str] = set()
        #: Message id -> why it was returned.
        self.returned: dict[str, str] = {}
        #: Why the broker closed the channel, if it did (not the connection: that is no verdict).
        self.closed_by_broker: str | None = None
        self.confirming = False
        self.core.add_on_return_callback(self._on_return)
        self.core.add_on_close_callback(self._on_close)

    def select_confirms(self, deadline: float) -> bool:
        """Put the channel in confirm mode; False if the broker did not answer by ``deadline``."""
        self.core.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_select_ok)
        return self.wait(lambda: self.confirming, deadline)

    def wait(self, done: Callable[[], bool], deadline: float) -> bool:
        """Run the connection's I/O until ``done()``, the channel closes, or ``deadline`` (monotonic).

        ``process_data_events`` returns early only for events of pika's blocking layer,
        and a callback on the core is not one: that is why a fixed time limit always ran
        to its end. Every callback that can end the wait calls :meth:`_wake`, so each
        pass returns as soon as that callback ran; the time limit is only the deadline.

        Returns:
          Whether ``done()`` became true.
        """
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.core.is_closed:
                return False
            self.connection.process_data_events(time_limit=remaining)
        return True

    def _wake(self) -> None:
        # A zero-delay timer of the blocking connection (public API) fires in this same I/O
        # pass and lands in the connection's ready events, which end process_data_events.
        if self.connection.is_open:
            self.connection.call_later(0, _nothing)

    def _on_select_ok(self, _frame: Any) -> None:
        self.confirming = True
        self._wake()

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        target = self.acked if isinstance(method, pika.spec.Basic.Ack) else self.nacked
        if method.multiple:  # every tag up to this one that is not answered yet
            tags = [tag for tag in self.outstanding if tag <= method.delivery_tag]
        else:
            tags = [method.delivery_tag] if method.delivery_tag in self.outstanding else []
        for tag in tags:
            target.add(self.outstanding.pop(tag))
        if not self.outstanding:  # the batch is answered: end the wait now, not at a timer
            self._wake()

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        # RabbitMQ sends a mandatory message's basic.return before its basic.ack, so it is
        # known by the time the batch's last confirm ends the wait.
        self.returned[properties.message_id] = f"unroutable: {method.reply_code} {method.reply_text}"

    def _on_close(self, _channel: Any, reason: Exception) -> None:
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self.closed_by_broker = f"{reason.reply_code} {reason.reply_text}"
        self._wake()


class BatchConfirmPublisher:
    """Publishes a batch with publisher confirms, waiting once for all of them.

    pika's blocking channel waits for each confirm in turn, one round trip per message.
    Here the batch goes out on the channel's asynchronous core and the confirms are
    collected together (RabbitMQ acknowledges with ``multiple`` where it can), so a
    batch costs about one round trip, and the wait ends when its last confirm arrives.
    A message returned as unroutable (``mandatory``) or nacked is not confirmed. One
    connection per thread, because pika's are not thread-safe.
    """

    #: Seconds to wait for a batch's confirms before giving up on the unconfirmed ones.
    CONFIRM_TIMEOUT = 15.0

    def __init__(self, url: str, declare: Callable[[str], None]) -> None:
        self.parameters = pika.URLParameters(amqp_url_with_timeouts(url))
        self.user_id = broker_user(self.parameters)
        self.declare = declare
        self.declared: set[str] = set()
        self.local = threading.local()
        self.lock = threading.Lock()
        self.connections: list[pika.BlockingConnection] = []  # every thread's, to close at shutdown

    def publish(
        self, *, queue_name: str, actor_name: str, payload: Mapping[str, Any], message_id: str
    ) -> None:
        if message_id not in self.publish_batch([Outgoing(queue_name, actor_name, payload, message_id)]):
            raise RuntimeError(f"message {message_id} was not confirmed by the broker")

    def publish_batch(self, messages: Sequence[Outgoing]) -> set[str]:
        """Publish ``messages`` and wait for their confirms, at most :attr:`CONFIRM_TIMEOUT` seconds.

        Returns:
          The ids of the messages the broker confirmed (acked, and neither nacked nor returned).
          On a lost connection or a timeout, those confirmed before it, or none.
        """
        return self.publish_explained(messages).confirmed

    def publish_explained(self, messages: Sequence[Outgoing]) -> PublishOutcome:
        """:meth:`publish_batch`, saying why each message that was not confirmed was not."""
        for queue_name in {m.queue_name for m in messages if not m.exchange} - self.declared:
            self.declare(queue_name)  # with accessflow's queue arguments, before anything is routed there
            self.declared.add(queue_name)
        try:
            return self._publish(messages)
        except (pika.exceptions.AMQPError, OSError) as error:
            log.warning("publish.connection_lost", error=type(error).__name__)
            self._drop_connection()
            return PublishOutcome(set(), unanswered=f"connection lost ({type(error).__name__})")

    def _channel(self, deadline: float) -> _ConfirmChannel:
        state: _ConfirmChannel | None = getattr(self.local, "state", None)
        if state is not None:
            with contextlib.suppress(pika.exceptions.AMQPError, OSError):
                # One poll that does not wait: it reads what came while the connection sat idle,
                # so a broker that hung up meanwhile (a restart, heartbeats missed between
                # batches) costs a reconnect here, not a failed batch left for the sweep.
                state.connection.process_data_events(time_limit=0)
            if state.connection.is_open and state.core.is_open:
                return state
        self._drop_connection()
        connection = pika.BlockingConnection(self.parameters)
        with self.lock:  # forget closed connections, so reconnecting over months keeps none
            self.connections = [c for c in self.connections if c.is_open]
            self.connections.append(connection)
        try:
            state = _ConfirmChannel(connection)
            if not state.select_confirms(deadline):
                raise pika.exceptions.ChannelClosed(0, "the broker did not put the channel in confirm mode")
        except BaseException:
            with contextlib.suppress(Exception):
                connection.close()
            raise
        self.local.state = state
        return state

    def _publish(self, messages: Sequence[Outgoing]) -> PublishOutcome:
        deadline = time.monotonic() + self.CONFIRM_TIMEOUT
        state = self._channel(deadline)
        batch: list[str] = []
        for message in messages:
            if message.exchange:
                state.core.basic_publish(
                    exchange=message.exchange,
                    routing_key=message.event_routing_key(),
                    body=message.event_body(),
                    properties=message.event_properties(self.user_id),
                    mandatory=True,  # the events exchange has an alternate exchange: confirmed anyway
                )
            else:
                state.core.basic_publish(
                    exchange="",
                    routing_key=message.queue_name,
                    body=message.envelope().encode(),
                    properties=pika.BasicProperties(
                        delivery_mode=2,
                        content_type="application/json",
                        message_id=message.message_id,
                        user_id=self.user_id,  # validated by RabbitMQ: marks it as accessflow's own
                    ),
                    mandatory=True,
                )
            state.outstanding[state.next_tag] = message.message_id
            state.next_tag += 1
            batch.append(message.message_id)
        answered = state.wait(lambda: not state.outstanding, deadline)
        channel_closed = bool(state.core.is_closed)
        if not answered:
            log.warning(
                "publish.confirm_timeout", unconfirmed=len(state.outstanding), channel_closed=channel_closed
            )
            self._drop_connection()  # late confirms would otherwise be counted for a later batch
        refused = {mid: state.returned[mid] for mid in batch if mid in state.returned}
        nacked = {mid for mid in batch if mid in state.nacked} - refused.keys()
        confirmed = {mid for mid in batch if mid in state.acked} - nacked - refused.keys()
        closed_by_broker = state.closed_by_broker
        unanswered = None
        if not answered:
            if closed_by_broker:
                unanswered = f"the broker closed the channel: {closed_by_broker}"
            elif channel_closed:
                unanswered = "the connection was lost"
            else:
                unanswered = f"not confirmed within {self.CONFIRM_TIMEOUT:g} s"
        state.acked.clear()
        state.nacked.clear()
        state.returned.clear()
        state.outstanding.clear()
        return PublishOutcome(confirmed, refused, nacked, unanswered, closed_by_broker=bool(closed_by_broker))

    def close(self) -> None:
        with self.lock:
            connections, self.connections = self.connections, []
        for connection in connections:
            if connection.is_open:
                with contextlib.suppress(Exception):
                    connection.close()

    def _drop_connection(self) -> None:
        state: _ConfirmChannel | None = getattr(self.local, "state", None)
        self.local.state = None
        if state is not None and state.connection.is_open:
            with contextlib.suppress(Exception):
                state.connection.close()


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
                    raise _closed(error) from None

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
    ``on_refused`` and acknowledged here; if recording fails it is nacked without requeue,
    and RabbitMQ dead-letters it into ``<queue>.XQ``. Either way dramatiq never sees it.
    Acking here is safe: ``__next__`` runs on the consumer thread, which owns the channel.
    """

    broker: QuorumRabbitmqBroker

    def __init__(self, broker: QuorumRabbitmqBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        super().__init__(broker, queue_name, prefetch, timeout)  # type: ignore[no-untyped-call]
        # Actors are registered before a worker starts consuming; a consumer restart reads them again.
        self.actors = {name: actor.queue_name for name, actor in broker.actors.items()}
        self.external_queues = broker.external_queues_among(self.actors)

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
            raise _closed(error) from None
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
        self._refuse(method.delivery_tag, verdict, user_id)
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

    def _refuse(self, tag: int, refused: Refused, sender: str | None) -> None:
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
            if recorded:
                self.channel.basic_ack(tag)
            else:
                self.channel.basic_nack(tag, requeue=False)  # RabbitMQ moves it to <queue>.XQ
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError) as error:
            raise _closed(error) from None


def _closed(error: Exception) -> ConnectionClosed:
    return ConnectionClosed(error)  # type: ignore[no-untyped-call]


def broker_user(parameters: pika.connection.Parameters | Sequence[pika.connection.Parameters]) -> str:
    """The AMQP user of these connection parameters: the user_id our publishes carry."""
    first = parameters[0] if isinstance(parameters, Sequence) else parameters
    return str(first.credentials.username)


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


def amqp_url_with_timeouts(url: str) -> str:
    """Add heartbeat and timeouts to an AMQP URL that does not set them, so a dead peer is noticed."""
    defaults = {"heartbeat": "30", "blocked_connection_timeout": "60", "socket_timeout": "10"}
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    return urlunsplit(parts._replace(query=urlencode({**defaults, **query})))


def make_broker(settings: Settings) -> dramatiq.Broker:
    """Build the broker ``settings.broker_url`` names: RabbitMQ, or ``stub://`` in memory."""
    broker: dramatiq.Broker
    if settings.broker_url.startswith("stub://"):
        broker = StubBroker(middleware=middleware_for(settings))
        broker.emit_after("process_boot")
    else:
        ttl_days = settings.dead_letter_ttl_days
        broker = QuorumRabbitmqBroker(
            url=amqp_url_with_timeouts(settings.broker_url),
            confirm_delivery=True,
            middleware=middleware_for(settings),
            delivery_limit=settings.max_deliveries * 4,
            dead_letter_ttl_ms=ttl_days * 86_400_000 if ttl_days else None,
            internal_senders=settings.internal_users(),
            external_queues=[route.queue_name(settings.queue_prefix) for route in ROUTES if route.external],
            max_delay_ms=settings.max_backoff_ms + ETA_MARGIN_MS,
        )
    return broker
