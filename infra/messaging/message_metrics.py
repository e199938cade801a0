"""Counts each message a worker process handles, per queue and actor, for Prometheus.

The same series as dramatiq's own ``dramatiq.middleware.prometheus.Prometheus`` (messages,
errors, retries, dead letters, in progress, durations), under accessflow's names and in
seconds. That middleware is not used as it is: it picks its directory and port from its
own ``dramatiq_prom_*`` variables when imported, never clears its files, and measures in
milliseconds. Here the pool's directory and port come from the settings
(``accessflow workers`` prepares the directory), and the series are defined, by name, in
:mod:`infra.observability.metrics`.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq
from dramatiq.common import q_name
from dramatiq.middleware import Middleware
from prometheus_client import multiprocess

from infra.observability.metrics import MessageSeries, message_series


class MessageMetrics(Middleware):
    """Counts messages processed, errors, retries, dead letters and durations; gauges those in progress."""

    def __init__(self, series: MessageSeries | None = None) -> None:
        self.series = series or message_series()
        #: message id -> monotonic start of its run, for the messages in progress in this process.
        self.started: dict[str, float] = {}

    @staticmethod
    def _labels(message: dramatiq.Message[Any] | dramatiq.MessageProxy) -> tuple[str, str]:
        # A retry is enqueued on the delay queue: count it under the queue it belongs to.
        return q_name(message.queue_name), message.actor_name

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        self.series.in_progress.labels(*self._labels(message)).inc()
        self.started[message.message_id] = time.monotonic()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        labels = self._labels(message)
        started = self.started.pop(message.message_id, None)
        if started is not None:
            self.series.duration.labels(*labels).observe(time.monotonic() - started)
            self.series.in_progress.labels(*labels).dec()
        self.series.processed.labels(*labels).inc()
        if exception is not None:
            self.series.errors.labels(*labels).inc()

    after_skip_message = after_process_message

    def after_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> None:
        if "retries" in message.options:
            self.series.retries.labels(*self._labels(message)).inc()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # Its in-progress gauge ("livesum") no longer counts; its counters still do.
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            multiprocess.mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]

    def after_nack(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        self.series.dead_lettered.labels(*self._labels(message)).inc()
