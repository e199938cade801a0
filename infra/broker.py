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

import dramatiq
import structlog
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.stub import StubBroker
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


def make_broker(settings: Settings) -> dramatiq.Broker:
    """Build the broker ``settings.broker_url`` names: RabbitMQ, or ``stub://`` in memory."""
    broker: dramatiq.Broker
    if settings.broker_url.startswith("stub://"):
        broker = StubBroker(middleware=middleware_for(settings))
        broker.emit_after("process_boot")
    else:
        broker = RabbitmqBroker(
            url=settings.broker_url, confirm_delivery=True, middleware=middleware_for(settings)
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
