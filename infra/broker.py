"""The dramatiq broker accessflow runs on, and the publisher that writes to it.

Only the middleware we want is installed: no Callbacks, Pipelines or GroupCallbacks,
because their options would let a producer on the wire enqueue arbitrary follow-up
messages (RELIABILITY.md, pitfall 9). Options a producer sets are stripped too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import dramatiq
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


class Publisher(Protocol):
    def publish(
        self, *, queue_name: str, actor_name: str, payload: Mapping[str, Any], message_id: str
    ) -> None:
        """Hand one message to the broker; return only once the broker has accepted it."""
        ...


class DramatiqPublisher:
    """Publishes contract payloads in dramatiq's envelope, on the broker given.

    On RabbitMQ the broker is built with publisher confirms and ``mandatory``, so
    :meth:`publish` returns only once the message is on a queue.
    """

    def __init__(self, broker: dramatiq.Broker) -> None:
        self.broker = broker

    def publish(
        self, *, queue_name: str, actor_name: str, payload: Mapping[str, Any], message_id: str
    ) -> None:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue_name,
            actor_name=actor_name,
            args=(dict(payload),),
            kwargs={},
            options={},
            message_id=message_id,
            message_timestamp=int(time.time() * 1000),
        )
        self.broker.enqueue(message)


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
