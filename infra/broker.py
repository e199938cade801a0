"""The dramatiq broker accessflow runs on, and the publisher that writes to it.

Only the middleware we want is installed: no Callbacks, Pipelines or GroupCallbacks,
because their options would let a producer on the wire enqueue arbitrary follow-up
messages (RELIABILITY.md, pitfall 9). Options a producer sets are stripped too.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import dramatiq
import pika
import pika.exceptions
import pika.spec
import structlog
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.stub import StubBroker
from dramatiq.common import xq_name
from dramatiq.middleware import (
    CurrentMessage,
    Middleware,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from infra.settings import Settings

log = structlog.get_logger()

#: Options set by our own middleware; everything else a producer put in ``options`` is dropped.
TRUSTED_OPTIONS = frozenset({"retries", "traceback", "requeue_timestamp"})


@dataclass(frozen=True)
class Outgoing:
    """One message to publish: a contract payload, its queue and actor, and its id."""

    queue_name: str
    actor_name: str
    payload: Mapping[str, Any]
    message_id: str

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


class DramatiqPublisher:
    """Publishes through a dramatiq broker, one message at a time.

    On RabbitMQ the broker is built with publisher confirms and ``mandatory``, so
    :meth:`publish` returns only once the message is on a queue. The CLI and the
    in-memory demo use this; the workers' outbox relay uses :class:`BatchConfirmPublisher`.
    """

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker

    def publish(
        self, *, queue_name: str, actor_name: str, payload: Mapping[str, Any], message_id: str
    ) -> None:
        self.broker.enqueue(Outgoing(queue_name, actor_name, payload, message_id).envelope())

    def publish_batch(self, messages: Sequence[Outgoing]) -> set[str]:
        confirmed: set[str] = set()
        for message in messages:
            try:
                self.broker.enqueue(message.envelope())
            except Exception as error:
                log.warning("publish.failed", message_id=message.message_id, error=type(error).__name__)
                break
            confirmed.add(message.message_id)
        return confirmed

    def close(self) -> None:
        pass  # the broker, and its connections, belong to whoever built it


class BatchConfirmPublisher:
    """Publishes a batch with publisher confirms, waiting once for all of them.

    pika's blocking channel waits for each confirm in turn, one round trip per message.
    Here the batch goes out on the channel's asynchronous core and the confirms are
    collected together (RabbitMQ acknowledges with ``multiple`` where it can), so a
    batch costs about one round trip. A message returned as unroutable (``mandatory``)
    or nacked is not confirmed. One connection per thread, because pika's are not
    thread-safe.
    """

    #: Seconds to wait for a batch's confirms before giving up on the unconfirmed ones.
    CONFIRM_TIMEOUT = 15.0

    def __init__(self, url: str, declare: Callable[[str], None]) -> None:
        self.parameters = pika.URLParameters(amqp_url_with_timeouts(url))
        self.declare = declare
        self.declared: set[str] = set()
        self.local = threading.local()
        self.connections: list[pika.BlockingConnection] = []  # every thread's, to close at shutdown

    def publish(
        self, *, queue_name: str, actor_name: str, payload: Mapping[str, Any], message_id: str
    ) -> None:
        if message_id not in self.publish_batch([Outgoing(queue_name, actor_name, payload, message_id)]):
            raise RuntimeError(f"message {message_id} was not confirmed by the broker")

    def publish_batch(self, messages: Sequence[Outgoing]) -> set[str]:
        for queue_name in {m.queue_name for m in messages} - self.declared:
            self.declare(queue_name)  # with accessflow's queue arguments, before anything is routed there
            self.declared.add(queue_name)
        try:
            return self._publish(messages)
        except (pika.exceptions.AMQPError, OSError) as error:
            log.warning("publish.connection_lost", error=type(error).__name__)
            self._drop_connection()
            return set()

    def _channel(self) -> tuple[pika.BlockingConnection, Any]:
        state = self.local
        if getattr(state, "connection", None) is None or not state.connection.is_open:
            state.connection = pika.BlockingConnection(self.parameters)
            self.connections.append(state.connection)
            state.channel = state.connection.channel()
            # pika has no public batch-confirm API on its blocking channel: use its asynchronous core.
            state.core = state.channel._impl
            state.next_tag, state.floor = 1, 0
            state.acked, state.nacked, state.returned = set(), set(), set()
            ready: list[bool] = []
            state.core.confirm_delivery(
                ack_nack_callback=self._on_confirm, callback=lambda _: ready.append(True)
            )
            state.core.add_on_return_callback(self._on_return)
            while not ready:
                state.connection.process_data_events(time_limit=0.1)
        return state.connection, state.core

    def _on_confirm(self, frame: Any) -> None:
        state, method = self.local, frame.method
        target = state.acked if isinstance(method, pika.spec.Basic.Ack) else state.nacked
        if method.multiple:  # every tag up to this one not answered yet
            resolved = state.acked | state.nacked
            target.update(t for t in range(state.floor + 1, method.delivery_tag + 1) if t not in resolved)
            state.floor = max(state.floor, method.delivery_tag)
        else:
            target.add(method.delivery_tag)

    def _on_return(self, _channel: Any, _method: Any, properties: Any, _body: bytes) -> None:
        self.local.returned.add(properties.message_id)

    def _publish(self, messages: Sequence[Outgoing]) -> set[str]:
        connection, core = self._channel()
        state = self.local
        by_tag: dict[int, str] = {}
        for message in messages:
            core.basic_publish(
                exchange="",
                routing_key=message.queue_name,
                body=message.envelope().encode(),
                properties=pika.BasicProperties(
                    delivery_mode=2, content_type="application/json", message_id=message.message_id
                ),
                mandatory=True,
            )
            by_tag[state.next_tag] = message.message_id
            state.next_tag += 1
        deadline = time.monotonic() + self.CONFIRM_TIMEOUT
        while not all(tag in state.acked or tag in state.nacked for tag in by_tag):
            if time.monotonic() > deadline:
                log.warning("publish.confirm_timeout", unconfirmed=len(by_tag))
                self._drop_connection()
                break
            connection.process_data_events(time_limit=0.05)
        confirmed = {mid for tag, mid in by_tag.items() if tag in state.acked and tag not in state.nacked}
        confirmed -= state.returned
        for tag in by_tag:
            state.acked.discard(tag)
            state.nacked.discard(tag)
        state.returned.clear()
        return confirmed

    def close(self) -> None:
        for connection in self.connections:
            if connection.is_open:
                with contextlib.suppress(Exception):
                    connection.close()
        self.connections.clear()

    def _drop_connection(self) -> None:
        connection = getattr(self.local, "connection", None)
        self.local.connection = None
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):
                connection.close()


class StripUntrustedOptions(Middleware):
    """Drop message options a producer set, so the wire cannot raise retries or time limits."""

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        for key in [k for k in message.options if k not in TRUSTED_OPTIONS]:
            del message.options[key]


def middleware_for(settings: Settings) -> list[Middleware]:
    return [
        StripUntrustedOptions(),
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
    day one. The delivery limit here is a backstop: :mod:`infra.delivery` bounds deliveries
    more tightly, and more precisely, in the database.
    """

    def __init__(self, *, delivery_limit: int, dead_letter_ttl_ms: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delivery_limit = delivery_limit
        self.dead_letter_ttl_ms = dead_letter_ttl_ms

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
        )
    return broker


class PeriodicTask(threading.Thread):
    """Runs ``task`` every ``interval`` seconds until stopped; errors are logged, not raised."""

    def __init__(self, name: str, interval: float, task: Any) -> None:
        super().__init__(name=name, daemon=True)
        self.interval = interval
        self.task = task
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.task()
            except Exception as error:
                log.warning("periodic_task.failed", task=self.name, error=type(error).__name__)

    def stop(self) -> None:
        self.stopped.set()
