"""Each worker process reports its health into the pool's directory; the pool's endpoint judges it.

Every :data:`~infra.observability.health.REPORT_SECONDS` a thread of this middleware writes
one :class:`~infra.observability.health.ProcessReport`: how many worker threads are alive,
since when each busy one has been on its message, whether each consumer is attached to the
broker, and whether the database answered a ``SELECT 1`` on the process's own pool (asked
every :data:`DATABASE_CHECK_SECONDS`, not at each report). The
pool's HTTP process (:func:`infra.observability.server.serve_pool`, which this middleware
asks dramatiq to fork) reads the reports for ``/healthz/live`` and ``/healthz/ready``. A
process that hangs, or whose report thread dies, stops reporting, and its report goes stale.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dramatiq
import sqlalchemy as sa
import structlog
from dramatiq.middleware import Middleware
from sqlalchemy.engine import Engine

from infra.observability import health
from infra.observability.server import serve_pool

log = structlog.get_logger()

#: How often a worker process asks the database whether it answers, in seconds.
DATABASE_CHECK_SECONDS = 5.0


def consumer_attached(thread: Any) -> bool:
    """Whether a dramatiq consumer thread runs and its AMQP connection and channel are open."""
    consumer = getattr(thread, "consumer", None)
    connection = getattr(consumer, "connection", None)
    channel = getattr(consumer, "channel", None)
    return bool(
        thread.is_alive()
        and connection is not None
        and connection.is_open
        and (channel is None or channel.is_open)
    )


class Heartbeats(Middleware):
    """Reports this worker process's threads, consumers and database to the pool's directory."""

    def __init__(self, engine: Engine, pool_dir: Path, *, serve: bool = True) -> None:
        self.engine = engine
        self.pool_dir = pool_dir
        self.serve = serve
        #: worker thread id -> wall-clock start of the message it is on.
        self.busy: dict[int, float] = {}
        self.worker: dramatiq.Worker | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        #: The last database check: (monotonic time, answered, why not).
        self.database: tuple[float, bool, str] | None = None

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [serve_pool] if self.serve else []

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.worker = worker
        self.thread = threading.Thread(target=self._report_until_stopped, name="heartbeats", daemon=True)
        self.thread.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        health.remove_report(self.pool_dir, os.getpid())

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        self.busy[threading.get_ident()] = time.time()

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        self.busy.pop(threading.get_ident(), None)

    after_skip_message = after_process_message

    def report(self) -> health.ProcessReport:
        """This process's health now."""
        worker = self.worker
        threads = list(worker.workers) if worker is not None else []
        consumers = dict(worker.consumers) if worker is not None else {}
        _, database, error = self.check_database()
        return health.ProcessReport(
            pid=os.getpid(),
            written_at=time.time(),
            threads_expected=len(threads),
            threads_alive=sum(1 for thread in threads if thread.is_alive()),
            busy_since=list(self.busy.values()),
            consumers={queue: consumer_attached(thread) for queue, thread in consumers.items()},
            database=database,
            database_error=error,
        )

    def check_database(self) -> tuple[float, bool, str]:
        """The last database check, made again if older than :data:`DATABASE_CHECK_SECONDS`."""
        now = time.monotonic()
        if self.database is None or now - self.database[0] >= DATABASE_CHECK_SECONDS:
            try:
                with self.engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1"))
                self.database = (now, True, "")
            except sa.exc.SQLAlchemyError as failure:
                self.database = (now, False, type(failure).__name__)
        return self.database

    def _report_until_stopped(self) -> None:
        while not self.stopping.is_set():
            try:
                health.write_report(self.pool_dir, self.report())
            except Exception as error:  # a full disk, say: the report goes stale and says so
                log.warning("heartbeats.report_failed", error=type(error).__name__)
            self.stopping.wait(health.REPORT_SECONDS)
