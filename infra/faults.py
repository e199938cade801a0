"""Fault injection points for the fault suite; inert unless ``ACCESSFLOW_FAULTS`` is set.

Production never sets it. The fault suite sets it in the environment of the worker
processes it starts, to crash them at the exact points where at-least-once delivery
bites: after a commit and before the ack, and between a publisher confirm and the
outbox mark. The format is comma-separated ``name=value`` pairs::

    ACCESSFLOW_FAULTS="after_commit=0.01,relay_after_publish=0.05,kill_request=<uuid>,raise_request=<uuid>"

A probability is per pass through the point; a crash is ``os._exit``, as abrupt as ``kill -9``.
"""

from __future__ import annotations

import functools
import os
import random

#: Exit status of an injected crash, so a test can tell it from a real one.
CRASH_EXIT_CODE = 86


class InjectedFault(RuntimeError):
    """Raised on purpose by a poison message in the fault suite."""


@functools.cache
def _configured() -> dict[str, str]:
    pairs = (item.split("=", 1) for item in os.environ.get("ACCESSFLOW_FAULTS", "").split(",") if "=" in item)
    return {name.strip(): value.strip() for name, value in pairs}


def crash_point(name: str) -> None:
    """Crash the process here with the configured probability."""
    probability = _configured().get(name)
    if probability and random.random() < float(probability):  # noqa: S311 - not for security
        os._exit(CRASH_EXIT_CODE)


def poison_check(request_id: str | None) -> None:
    """Kill the process, or raise, for a request the fault suite marked as poison."""
    if request_id is None or not _configured():
        return
    if request_id in _configured().get("kill_request", "").split("|"):
        os._exit(CRASH_EXIT_CODE)
    if request_id in _configured().get("raise_request", "").split("|"):
        raise InjectedFault(f"poison request {request_id}")
