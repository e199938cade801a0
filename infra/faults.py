"""Fault injection for the fault suite; installed by the composition root only when ``ACCESSFLOW_FAULTS`` is set.

Production never sets it, and then nothing here is on any path: the points are held by
wrappers that :mod:`infra.bootstrap` puts around the real parts, not by
calls inside them. The fault suite sets it in the environment of the worker processes it
starts, to crash them at the exact points where at-least-once delivery bites: after a
commit and before the ack (and before the commit's messages are published), and between a
publisher confirm and the outbox mark. The format is comma-separated ``name=value`` pairs::

    ACCESSFLOW_FAULTS="after_commit=0.01,relay_after_publish=0.05,kill_request=<uuid>,raise_request=<uuid>"

``hang_request=<uuid>`` (with ``hang_seconds=N``, 10 by default) holds the worker thread on
that request for N seconds, as a call that never returns would: liveness must see it.

A probability is per pass through the point; a crash is ``os._exit``, as abrupt as ``kill -9``.
"""

from __future__ import annotations

import functools
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from infra.db.unit_of_work import SqlUnitOfWork
from infra.messaging.publisher import ExplainingPublisher, Outgoing, Publisher, PublishOutcome

#: Exit status of an injected crash, so a test can tell it from a real one.
CRASH_EXIT_CODE = 86


class InjectedFault(RuntimeError):
    """Raised on purpose by a poison message in the fault suite."""


@functools.cache
def _configured() -> dict[str, str]:
    pairs = (item.split("=", 1) for item in os.environ.get("ACCESSFLOW_FAULTS", "").split(",") if "=" in item)
    return {name.strip(): value.strip() for name, value in pairs}


def configured() -> bool:
    """Whether this process runs under the fault suite."""
    return bool(_configured())


def crash_point(name: str) -> None:
    """Crash the process here with the configured probability."""
    probability = _configured().get(name)
    if probability and random.random() < float(probability):  # noqa: S311 - not for security
        os._exit(CRASH_EXIT_CODE)


def poison_check(request_id: str | None) -> None:
    """Kill the process, raise, or hang, for a request the fault suite marked as poison."""
    if request_id is None or not _configured():
        return
    if request_id in _configured().get("kill_request", "").split("|"):
        os._exit(CRASH_EXIT_CODE)
    if request_id in _configured().get("raise_request", "").split("|"):
        raise InjectedFault(f"poison request {request_id}")
    if request_id in _configured().get("hang_request", "").split("|"):
        time.sleep(float(_configured().get("hang_seconds", "10")))


class CrashingUnitOfWork(SqlUnitOfWork):
    """Crashes between a commit and the publishing of its messages: the outbox sweep must send them."""

    def _publish_committed(self) -> None:
        crash_point("after_commit")
        super()._publish_committed()


def poisoning(fn: Callable[[Any, Any, str | None], None]) -> Callable[[Any, Any, str | None], None]:
    """The actor function ``fn``, killing the process or raising first on a poison request's message.

    Wraps the function, after its message is decoded, where a poison message of real life
    fails: the delivery guard has counted the delivery, and the retries follow.
    """

    def poisoned(message: Any, services: Any, sender: str | None) -> None:
        request_id = getattr(message, "request_id", None)
        poison_check(request_id if isinstance(request_id, str) else None)
        fn(message, services, sender)

    poisoned.__name__ = poisoned.__qualname__ = fn.__name__
    return poisoned


class _CrashingPublisher:
    """Crashes after the broker confirmed a batch and before the relay marks its rows sent."""

    def __init__(self, inner: Publisher) -> None:
        self.inner = inner

    def publish(self, *args: Any, **kwargs: Any) -> None:
        self.inner.publish(*args, **kwargs)

    def publish_batch(self, messages: Sequence[Outgoing]) -> set[str]:
        confirmed = self.inner.publish_batch(messages)
        crash_point("relay_after_publish")
        return confirmed

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _CrashingExplainingPublisher(_CrashingPublisher):
    inner: Any

    def publish_explained(self, messages: Sequence[Outgoing]) -> PublishOutcome:
        outcome: PublishOutcome = self.inner.publish_explained(messages)
        crash_point("relay_after_publish")
        return outcome


def crashing_publisher(inner: Publisher) -> Publisher:
    """``inner``, crashing at ``relay_after_publish``; it explains its outcomes if ``inner`` does."""
    if isinstance(inner, ExplainingPublisher):
        return _CrashingExplainingPublisher(inner)
    return _CrashingPublisher(inner)
