"""Every series accessflow exports to Prometheus, by name, and where each is counted.

Two sources, two kinds of process:

- **Message series**, counted in each worker process as dramatiq hands it messages
  (:class:`MessageSeries`, filled by :class:`infra.messaging.message_metrics.MessageMetrics`).
  A pool forks processes, so they are kept in prometheus_client's multiprocess files
  (``PROMETHEUS_MULTIPROC_DIR``, one directory per pool) and the pool's endpoint sums them.
  They say what this pool did since it started: Prometheus' ``rate()`` and ``increase()``
  read them across restarts.
- **State series**, read from the database and the broker (:class:`StateCollector`): request
  states, the completion histogram, the pending review, the outbox, emails, credentials,
  refused messages, queue depths and consumers. They are the same whoever reads them, so
  only one process does: ``accessflow metrics``, the collector (one replica, like a
  ``kube-state-metrics``), and at most once per ``ACCESSFLOW_METRICS_REFRESH_SECONDS``
  however often it is scraped. N worker replicas never scan the tables. Every query is one
  aggregate over an indexed column or a small table; the completion histogram reads every
  final request, one pass for all buckets.

Names follow Prometheus' conventions: the ``accessflow_`` prefix, base units (seconds),
``_total`` on counters. A state series that is a count of rows that are never deleted
(credentials, refused messages) is a counter; one that can go down is a gauge.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import pika
import pika.exceptions
import sqlalchemy as sa
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from domain.model import FINAL_STATUSES, DecisionOutcome, Status
from infra.db import orm
from infra.messaging.queue_depths import queue_depths
from messages.routes import QUEUE_ROUTES

log = structlog.get_logger()

#: Labels of every message series: the queue (never its delay queue) and the actor.
MESSAGE_LABELS = ("queue_name", "actor_name")
#: Buckets of a message's run, in seconds: from a cached lookup to the actor time limit.
MESSAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Buckets of the time from submission to a final state, in seconds: an auto-approval takes
#: well under a second, a review takes hours.
COMPLETION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 604800.0)
#: The refusal recorded for a decision that is not shown to come from an admin.
REFUSED_DECISION = "refused_decision"
#: The refusal recorded for a credential operation that is not shown to come from an admin.
REFUSED_OPERATION = "refused_operation"
#: The refusal recorded for a bulk decision that is not shown to come from an admin.
REFUSED_BULK_DECISION = "refused_bulk_decision"


@dataclass(frozen=True)
class MessageSeries:
    """What a worker process counts per queue and actor, as dramatiq's own Prometheus middleware does."""

    processed: Counter
    errors: Counter
    retries: Counter
    dead_lettered: Counter
    in_progress: Gauge
    duration: Histogram


def message_series(registry: CollectorRegistry | None = None) -> MessageSeries:
    """The message series, registered in ``registry`` (a private one by default).

    Under ``PROMETHEUS_MULTIPROC_DIR`` their values live in that directory's files, whatever
    the registry, and the pool's endpoint reads them there.
    """
    registry = registry or CollectorRegistry()
    return MessageSeries(
        processed=Counter(
            "accessflow_messages",
            "Messages processed, whatever their outcome.",
            MESSAGE_LABELS,
            registry=registry,
        ),
        errors=Counter(
            "accessflow_message_errors",
            "Messages whose run raised (each retry counts).",
            MESSAGE_LABELS,
            registry=registry,
        ),
        retries=Counter(
            "accessflow_message_retries",
            "Messages sent back for a retry with backoff.",
            MESSAGE_LABELS,
            registry=registry,
        ),
        dead_lettered=Counter(
            "accessflow_message_dead_letters",
            "Messages moved to their dead-letter queue.",
            MESSAGE_LABELS,
            registry=registry,
        ),
        in_progress=Gauge(
            "accessflow_messages_in_progress",
            "Messages being processed now.",
            MESSAGE_LABELS,
            registry=registry,
            multiprocess_mode="livesum",
        ),
        duration=Histogram(
            "accessflow_message_duration_seconds",
            "Time a worker thread spent on a message.",
            MESSAGE_LABELS,
            buckets=MESSAGE_BUCKETS,
            registry=registry,
        ),
    )


@dataclass
class Snapshot:
    """What one look at the database and the broker found; empty until the first one."""

    #: Whether the database, and the broker, answered this look.
    database_up: bool = False
    broker_up: bool = False
    requests: dict[str, int] = field(default_factory=dict)
    #: Per final status: cumulative bucket counts (one per COMPLETION_BUCKETS, then +Inf), and the sum.
    completion: dict[str, tuple[list[int], float]] = field(default_factory=dict)
    pending_review: int = 0
    pending_review_oldest_seconds: float = 0.0
    outbox_backlog: int = 0
    outbox_oldest_seconds: float = 0.0
    outbox_parked: int = 0
    #: (kind, status) -> emails.
    emails: dict[tuple[str, str], int] = field(default_factory=dict)
    credentials: dict[str, int] = field(default_factory=dict)
    #: status -> credentials in it now (active, suspended, revoked, expired).
    credential_states: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    #: queue -> (messages ready, consumers), for each work queue and each dead-letter queue.
    queues: dict[str, tuple[int, int]] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)
    duration_seconds: float = 0.0


def _seconds(column: sa.ColumnElement[object]) -> sa.ColumnElement[float]:
    """Seconds from ``column`` to the database's now, never negative (clocks of other hosts)."""
    return sa.func.greatest(sa.extract("epoch", sa.func.now() - column), 0.0)


def read_database(engine: Engine, snapshot: Snapshot) -> None:
    """Fill ``snapshot``'s database series: a handful of aggregate statements in one transaction."""
    requests, outbox, notifications = orm.access_requests, orm.outbox, orm.notifications
    final = [status.value for status in sorted(FINAL_STATUSES)]
    with engine.connect() as connection, connection.begin():
        snapshot.requests = {
            str(status): count
            for status, count in connection.execute(
                sa.select(requests.c.status, sa.func.count()).group_by(requests.c.status)
            )
        }
        took = sa.func.greatest(sa.extract("epoch", requests.c.updated_at - requests.c.submitted_at), 0.0)
        buckets = [sa.func.count().filter(took <= bound) for bound in COMPLETION_BUCKETS]
        snapshot.completion = {
            # row: status, one count per bucket, the count of all (+Inf), the sum
            str(row[0]): ([int(n) for n in row[1:-1]], float(row[-1] or 0.0))
            for row in connection.execute(
                sa.select(requests.c.status, *buckets, sa.func.count(), sa.func.sum(took))
                .where(requests.c.status.in_(final))
                .group_by(requests.c.status)
            )
        }
        pending = connection.execute(
            sa.select(sa.func.count(), sa.func.min(requests.c.updated_at)).where(
                requests.c.status == Status.PENDING_REVIEW.value
            )
        ).one()
        snapshot.pending_review = int(pending[0])
        snapshot.pending_review_oldest_seconds = float(
            connection.execute(
                sa.select(sa.func.coalesce(_seconds(sa.func.min(requests.c.updated_at)), 0.0)).where(
                    requests.c.status == Status.PENDING_REVIEW.value
                )
            ).scalar_one()
        )
        unsent = sa.and_(outbox.c.sent_at.is_(None), outbox.c.parked_at.is_(None))  # ix_outbox_unsent
        backlog = connection.execute(
            sa.select(
                sa.func.count(), sa.func.coalesce(_seconds(sa.func.min(outbox.c.created_at)), 0.0)
            ).where(unsent)
        ).one()
        snapshot.outbox_backlog, snapshot.outbox_oldest_seconds = int(backlog[0]), float(backlog[1])
        snapshot.outbox_parked = int(
            connection.execute(
                sa.select(sa.func.count()).select_from(outbox).where(outbox.c.parked_at.is_not(None))
            ).scalar_one()
        )
        snapshot.emails = {
            (str(kind), str(status)): count
            for kind, status, count in connection.execute(
                sa.select(notifications.c.kind, notifications.c.status, sa.func.count()).group_by(
                    notifications.c.kind, notifications.c.status
                )
            )
        }
        snapshot.credentials = {
            str(kind): count
            for kind, count in connection.execute(
                sa.select(orm.credentials.c.kind, sa.func.count()).group_by(orm.credentials.c.kind)
            )
        }
        snapshot.credential_states = {
            str(status): count
            for status, count in connection.execute(
                sa.select(orm.credentials.c.status, sa.func.count()).group_by(orm.credentials.c.status)
            )
        }
        refused = {
            str(kind): count
            for kind, count in connection.execute(
                sa.select(orm.malformed_messages.c.kind, sa.func.count()).group_by(
                    orm.malformed_messages.c.kind
                )
            )
        }
        refused[REFUSED_DECISION] = int(
            connection.execute(
                sa.select(sa.func.count())
                .select_from(orm.decisions)
                .where(orm.decisions.c.outcome == DecisionOutcome.REFUSED.value)
            ).scalar_one()
        )
        refused[REFUSED_OPERATION] = int(
            connection.execute(
                sa.select(sa.func.count())
                .select_from(orm.credential_operations)
                .where(orm.credential_operations.c.outcome == DecisionOutcome.REFUSED.value)
            ).scalar_one()
        )
        refused[REFUSED_BULK_DECISION] = int(
            connection.execute(
                sa.select(sa.func.count())
                .select_from(orm.bulk_decisions)
                .where(orm.bulk_decisions.c.outcome == DecisionOutcome.REFUSED.value)
            ).scalar_one()
        )
        snapshot.refused = refused
    snapshot.database_up = True


def work_queues(prefix: str) -> list[str]:
    """Every work queue's full name, in route order."""
    return [route.queue_name(prefix) for route in QUEUE_ROUTES]


def dead_letter_queue(queue_name: str) -> str:
    """dramatiq's dead-letter queue of ``queue_name``."""
    return f"{queue_name}.XQ"


def read_broker(broker_url: str, prefix: str, snapshot: Snapshot) -> None:
    """Fill ``snapshot``'s queue series: one passive declare per queue, on one connection.

    Read as ``accessflow status`` reads them (:func:`infra.messaging.queue_depths.queue_depths`);
    a queue that does not exist (no pool has declared it yet) is left out.
    """
    names = [name for queue in work_queues(prefix) for name in (queue, dead_letter_queue(queue))]
    queues = {
        depth.name: (depth.messages, depth.consumers)
        for depth in queue_depths(broker_url, names)
        if depth.messages is not None and depth.consumers is not None
    }
    snapshot.queues = queues
    snapshot.dead_letters = {
        queue: queues[dead_letter_queue(queue)][0]
        for queue in work_queues(prefix)
        if dead_letter_queue(queue) in queues
    }
    snapshot.broker_up = True


def state_families(snapshot: Snapshot, prefix: str) -> list[Metric]:
    """The state series of ``snapshot``, as Prometheus metric families."""
    up_db = GaugeMetricFamily(
        "accessflow_database_up", "Whether the collector's last look at the database worked."
    )
    up_db.add_metric([], 1.0 if snapshot.database_up else 0.0)
    up_broker = GaugeMetricFamily(
        "accessflow_broker_up", "Whether the collector's last look at the broker worked."
    )
    up_broker.add_metric([], 1.0 if snapshot.broker_up else 0.0)
    took = GaugeMetricFamily(
        "accessflow_collector_duration_seconds", "How long the collector's last look took."
    )
    took.add_metric([], snapshot.duration_seconds)
    families: list[Metric] = [up_db, up_broker, took]

    requests = GaugeMetricFamily("accessflow_requests", "Access requests, by status.", labels=["status"])
    for status in Status:
        requests.add_metric([status.value], float(snapshot.requests.get(status.value, 0)))
    completion = HistogramMetricFamily(
        "accessflow_request_completion_seconds",
        "Time from a request's submission to its final state, by final state.",
        labels=["status"],
    )
    for status in sorted(FINAL_STATUSES):
        counts, total = snapshot.completion.get(status.value, ([0] * (len(COMPLETION_BUCKETS) + 1), 0.0))
        bounds = [*(f"{bound:g}" for bound in COMPLETION_BUCKETS), "+Inf"]
        completion.add_metric([status.value], list(zip(bounds, counts, strict=True)), sum_value=total)
    pending = GaugeMetricFamily("accessflow_pending_review_requests", "Requests waiting for an admin.")
    pending.add_metric([], float(snapshot.pending_review))
    pending_age = GaugeMetricFamily(
        "accessflow_pending_review_oldest_age_seconds",
        "How long the oldest request waiting for an admin has waited; 0 when none waits.",
    )
    pending_age.add_metric([], snapshot.pending_review_oldest_seconds)
    backlog = GaugeMetricFamily(
        "accessflow_outbox_backlog_rows", "Outbox rows not yet published, parked ones aside."
    )
    backlog.add_metric([], float(snapshot.outbox_backlog))
    backlog_age = GaugeMetricFamily(
        "accessflow_outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row; 0 when none."
    )
    backlog_age.add_metric([], snapshot.outbox_oldest_seconds)
    parked = GaugeMetricFamily("accessflow_outbox_parked_rows", "Outbox rows parked for an operator.")
    parked.add_metric([], float(snapshot.outbox_parked))
    families += [requests, completion, pending, pending_age, backlog, backlog_age, parked]

    emails = GaugeMetricFamily("accessflow_emails", "Emails, by kind and outcome.", labels=["kind", "status"])
    for (kind, outcome), count in sorted(snapshot.emails.items()):
        emails.add_metric([kind, outcome], float(count))
    credentials = CounterMetricFamily(
        "accessflow_credentials_issued", "Credentials issued, by kind.", labels=["kind"]
    )
    for kind, count in sorted(snapshot.credentials.items()):
        credentials.add_metric([kind], float(count))
    states = GaugeMetricFamily(
        "accessflow_credentials",
        "Credentials by their status now: active, suspended, revoked, expired.",
        labels=["status"],
    )
    for state, count in sorted(snapshot.credential_states.items()):
        states.add_metric([state], float(count))
    families.append(states)
    refused = CounterMetricFamily(
        "accessflow_refused_messages",
        "Messages refused and recorded, by reason: malformed, forged, refused_decision, refused_operation, refused_bulk_decision.",
        labels=["reason"],
    )
    for reason, count in sorted(snapshot.refused.items()):
        refused.add_metric([reason], float(count))
    families += [emails, credentials, refused]

    depth = GaugeMetricFamily(
        "accessflow_queue_messages", "Messages ready in each work queue.", labels=["queue"]
    )
    consumers = GaugeMetricFamily(
        "accessflow_queue_consumers", "Consumers attached to each work queue.", labels=["queue"]
    )
    for queue in work_queues(prefix):
        if queue in snapshot.queues:
            ready, attached = snapshot.queues[queue]
            depth.add_metric([queue], float(ready))
            consumers.add_metric([queue], float(attached))
    dead = GaugeMetricFamily(
        "accessflow_dead_letter_messages",
        "Messages in each work queue's dead-letter queue.",
        labels=["queue"],
    )
    for queue, count in sorted(snapshot.dead_letters.items()):
        dead.add_metric([queue], float(count))
    return [*families, depth, consumers, dead]


class StateCollector(Collector):
    """The database and queue series, read at most once per ``refresh_seconds``, whatever the scrape rate.

    A look that fails (the database or the broker away) exports ``accessflow_database_up`` or
    ``accessflow_broker_up`` 0 and leaves that source's series out, rather than stale values.
    """

    def __init__(
        self,
        engine: Engine,
        broker_url: str,
        prefix: str,
        *,
        refresh_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.broker_url = broker_url
        self.prefix = prefix
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self.snapshot = Snapshot()
        self._read_at: float | None = None
        self._lock = threading.Lock()

    def refresh(self) -> Snapshot:
        """The latest snapshot, looked at again if older than ``refresh_seconds``."""
        with self._lock:
            now = self.clock()
            if self._read_at is not None and now - self._read_at < self.refresh_seconds:
                return self.snapshot
            snapshot = Snapshot()
            try:
                read_database(self.engine, snapshot)
            except sa.exc.SQLAlchemyError as error:
                log.warning("metrics.database_unreachable", error=type(error).__name__)
                snapshot = Snapshot()  # none of a half-read look
            try:
                read_broker(self.broker_url, self.prefix, snapshot)
            except (pika.exceptions.AMQPError, OSError) as error:
                log.warning("metrics.broker_unreachable", error=type(error).__name__)
            snapshot.duration_seconds = self.clock() - now
            self.snapshot, self._read_at = snapshot, now
            return snapshot

    def describe(self) -> Iterable[Metric]:
        return state_families(Snapshot(), self.prefix)

    def collect(self) -> Iterable[Metric]:
        return state_families(self.refresh(), self.prefix)


def exported_names(prefix: str = "accessflow") -> set[str]:
    """Every sample name accessflow exports (``_total``, ``_bucket``, ``_sum``, ``_count`` included).

    Read from real registries, without a database or a broker: what dashboards and alerts may name.
    """
    registry = CollectorRegistry()
    message_series(registry)
    names: set[str] = set()
    families: Sequence[Metric] = [*registry.collect(), *state_families(Snapshot(), prefix)]
    for family in families:
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count", "created")}
        else:
            names.add(family.name)
    return names
