"""A thread that runs a task every few seconds: the outbox sweeps, marks and pruning, the email sweep.

The task is safe to run in any number of processes at once; each of them takes the rows no
other holds. An error is logged and the next tick tries again: a sweep must outlive a
database restart.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog

log = structlog.get_logger()


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
