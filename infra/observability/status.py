"""``accessflow status``: what waits where, and whether something needs a human.

It reads two sources and changes nothing in either:

- the broker, with a passive declare per queue (:mod:`infra.messaging.queue_depths`): every
  work queue, its ``.DQ`` (messages waiting out a retry's backoff) and its ``.XQ`` (dead
  letters), each registered portal's events queue, and the events no portal queue took;
- the database (:func:`infra.db.views.backlog`): requests waiting for review or for their
  credential, the outbox's unsent and parked rows, and emails stuck in ``sending``.

:func:`report` turns them into one JSON-able dict whose ``needs_a_human`` lists, one
sentence each, what an operator must look at; it is empty when all is well. The rules:

- a dead letter in any ``.XQ`` (they wait for ``accessflow dlq replay``, and nothing expires);
- a parked outbox row (it waits for ``accessflow outbox retry``);
- an unsent outbox row older than ``ACCESSFLOW_STATUS_OUTBOX_MAX_AGE_SECONDS``: no relay or
  worker is sweeping, or the broker refuses it;
- a request in ``pending_review`` longer than ``ACCESSFLOW_STATUS_PENDING_REVIEW_MAX_SECONDS``,
  or still pending two review sweeps past its review deadline (no pool sweeps the decisions queue);
- a request ``approved`` longer than ``ACCESSFLOW_STATUS_APPROVED_MAX_SECONDS`` without its
  credential, or any in ``provisioning_failed`` (it waits for ``accessflow requests retry``);
- an email still ``sending`` ``ACCESSFLOW_NOTIFICATION_STALE_SECONDS`` plus a sweep interval
  after its lease ran out: the sweep that sends it again is not running;
- a queue with messages and no consumer (dead-letter queues aside, which no one consumes),
  events no portal queue took included;
- a broker or database that cannot be read.

Failed and partial emails are counted but not flagged: they are final, and stay so, so a
flag would never clear; ``accessflow notifications list --status failed`` shows them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import pika.exceptions
import sqlalchemy as sa
from dramatiq.common import dq_name, xq_name

from domain.model import utcnow
from infra.db import views
from infra.db.unit_of_work import SqlUnitOfWork
from infra.messaging.queue_depths import QueueDepth, queue_depths
from infra.messaging.topology import WORK_QUEUES, Topology
from infra.settings import Settings
from messages.routes import PUSH

#: The queue of gateway pushes, which only a deployment with a gateway uses.
GATEWAY_QUEUE = PUSH.queue

#: What each watched queue is, as ``report`` names it in ``queues[].kind``.
WORK, DELAYED, DEAD_LETTER, PORTAL_EVENTS, UNROUTED = (
    "work",
    "delayed",
    "dead_letter",
    "portal_events",
    "unrouted",
)


@dataclass(frozen=True)
class Thresholds:
    """How old each kind of waiting may get before it needs a human, in seconds (from settings)."""

    pending_review_seconds: float
    approved_seconds: float
    outbox_seconds: float
    email_seconds: float
    #: How long past its review deadline a request may stay pending: the sweep expires it sooner.
    review_deadline_seconds: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(
            pending_review_seconds=settings.status_pending_review_max_seconds,
            approved_seconds=settings.status_approved_max_seconds,
            outbox_seconds=settings.status_outbox_max_age_seconds,
            # The sweep re-drives an email this stale; give it one sweep interval to do so.
            email_seconds=settings.notification_stale_seconds + settings.notification_sweep_seconds,
            # The decisions pools' sweep expires a request at its deadline; give it two intervals.
            review_deadline_seconds=2 * settings.review_sweep_seconds,
        )


def watched_queues(prefix: str, portal_ids: list[str]) -> list[tuple[str, str]]:
    """(queue name, kind) of every queue ``status`` reads, in the order it prints them."""
    topology = Topology(prefix)
    watched = []
    for work_queue in WORK_QUEUES:
        name = topology.queue(work_queue)
        watched += [(name, WORK), (dq_name(name), DELAYED), (xq_name(name), DEAD_LETTER)]
    watched += [(topology.portal_events_queue(p), PORTAL_EVENTS) for p in sorted(portal_ids)]
    watched.append((topology.unrouted_queue, UNROUTED))
    return watched


def duration(seconds: float) -> str:
    """``seconds`` as a person reads it: 45s, 12m, 3h 20m, 2d 4h."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m"
    if whole < 86_400:
        hours, minutes = divmod(whole // 60, 60)
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(whole // 3600, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _read_queues(broker_url: str, watched: list[tuple[str, str]]) -> list[QueueDepth]:
    if broker_url.startswith("stub://"):
        return [QueueDepth(name, None, None, "in-memory broker") for name, _ in watched]
    return queue_depths(broker_url, [name for name, _ in watched])


def _queue_problems(queues: list[dict[str, Any]]) -> list[str]:
    problems = []
    for q in queues:
        messages, consumers = q["messages"], q["consumers"]
        if not messages:
            continue
        if q["kind"] == DEAD_LETTER:
            problems.append(
                f"{messages} dead letter(s) in {q['name']}: see `accessflow dlq list`, "
                "then `accessflow dlq replay` once the cause is fixed"
            )
        elif q["kind"] == UNROUTED:
            problems.append(
                f"{messages} event(s) in {q['name']}: no portal queue took them "
                "(a portal not registered when they were sent)"
            )
        elif consumers == 0:
            problems.append(f"{messages} message(s) in {q['name']} and no consumer")
    return problems


def _database_problems(backlog: dict[str, dict[str, Any]], t: Thresholds) -> list[str]:
    requests, outbox, emails = backlog["requests"], backlog["outbox"], backlog["emails"]
    problems = []
    if requests["pending_review_overdue"]:
        problems.append(
            f"{requests['pending_review_overdue']} request(s) pending review for more than "
            f"{duration(t.pending_review_seconds)} (oldest {duration(requests['oldest_pending_review_seconds'])}): "
            "`accessflow requests list --status pending_review`"
        )
    if requests["past_review_deadline"]:
        problems.append(
            f"{requests['past_review_deadline']} request(s) still pending review more than "
            f"{duration(t.review_deadline_seconds)} past their review deadline: is a pool consuming the "
            "decisions queue running? Its sweep expires them"
        )
    if requests["approved_stuck"]:
        problems.append(
            f"{requests['approved_stuck']} request(s) approved more than {duration(t.approved_seconds)} ago "
            "and still without a credential: are the credentials workers running?"
        )
    if requests["provisioning_failed"]:
        problems.append(
            f"{requests['provisioning_failed']} request(s) in provisioning_failed: fix the cause, then "
            "`accessflow requests retry ID` (`accessflow requests list --status provisioning_failed`)"
        )
    if outbox["parked"]:
        problems.append(
            f"{outbox['parked']} parked outbox row(s): `accessflow outbox list --parked`, then "
            "`accessflow outbox retry` once the cause is fixed"
        )
    if outbox["unsent_overdue"]:
        problems.append(
            f"{outbox['unsent_overdue']} outbox row(s) unsent for more than {duration(t.outbox_seconds)} "
            f"(oldest {duration(outbox['oldest_unsent_seconds'])}): is a relay or a worker pool running, "
            "and the broker reachable? `accessflow outbox list`"
        )
    if emails["stuck_sending"]:
        problems.append(
            f"{emails['stuck_sending']} email(s) stuck in sending for more than {duration(t.email_seconds)} "
            "after their lease: is a pool consuming the notifications queue running?"
        )
    return problems


def report(
    settings: Settings,
    uow: Callable[[], SqlUnitOfWork],
    *,
    now: Callable[[], datetime] = utcnow,
) -> dict[str, Any]:
    """Everything ``accessflow status`` shows, as a JSON-able dict; reads, and changes nothing.

    Parameters:
      settings: where the broker is, the queue prefix, and the thresholds.
      uow: makes a unit of work on the database (``Services.uow``).
      now: the clock ages are measured with.

    Returns:
      ``checked_at``, ``ok`` (no entry in ``needs_a_human``), ``needs_a_human`` (sentences),
      ``queues`` (name, kind, messages, consumers, note: messages and consumers are None
      for a queue that could not be read), ``dead_letters`` (their total, None if the
      broker could not be read), ``requests``, ``outbox`` and ``emails`` (counts and ages
      in seconds, None if the database could not be read), and ``thresholds``.
    """
    thresholds = Thresholds.from_settings(settings)
    moment = now()
    problems: list[str] = []
    backlog: dict[str, dict[str, Any]] | None = None
    portal_ids: list[str] = []
    try:
        with uow() as reading:
            portal_ids = [portal.id for portal in reading.portals.list()]
        backlog = views.backlog(
            uow(),
            now=moment,
            pending_before=moment - timedelta(seconds=thresholds.pending_review_seconds),
            approved_before=moment - timedelta(seconds=thresholds.approved_seconds),
            outbox_before=moment - timedelta(seconds=thresholds.outbox_seconds),
            sending_before=moment - timedelta(seconds=thresholds.email_seconds),
            deadline_before=moment - timedelta(seconds=thresholds.review_deadline_seconds),
        )
    except sa.exc.SQLAlchemyError as error:
        problems.append(f"cannot read the database: {_first_line(error)}")

    watched = watched_queues(settings.queue_prefix, portal_ids)
    kinds = dict(watched)
    try:
        depths = _read_queues(settings.broker_url, watched)
    except (pika.exceptions.AMQPError, OSError) as error:
        problems.append(f"cannot read the broker: {_first_line(error) or type(error).__name__}")
        depths = [QueueDepth(name, None, None, "broker unreachable") for name, _ in watched]
    queues = [
        {
            "name": d.name,
            "kind": kinds[d.name],
            "messages": d.messages,
            "consumers": d.consumers,
            "note": d.note,
        }
        for d in depths
    ]
    problems += _queue_problems(queues)
    if backlog is not None:
        problems += _database_problems(backlog, thresholds)
    readable_xqs = [q["messages"] for q in queues if q["kind"] == DEAD_LETTER and q["messages"] is not None]
    return {
        "checked_at": moment.isoformat(),
        "ok": not problems,
        "needs_a_human": problems,
        "queues": queues,
        "dead_letters": sum(readable_xqs) if readable_xqs else None,
        "requests": backlog["requests"] if backlog else None,
        "outbox": backlog["outbox"] if backlog else None,
        "emails": backlog["emails"] if backlog else None,
        "thresholds": asdict(thresholds),
    }


def wait_for_consumers(
    settings: Settings,
    timeout_seconds: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Wait up to ``timeout_seconds`` until every work queue in use has a consumer.

    The gateway queue is in use only with a gateway configured: without one nothing is
    queued there, and a deployment need not run its pool.

    For scripts that start worker pools and then publish: the pools declare the exchanges
    and bindings a submission needs as they start. An unreachable broker counts as not yet.

    Returns:
      The work queues still without a consumer at the end; empty when all have one.
    """
    if settings.broker_url.startswith("stub://"):
        return []  # the in-memory broker lives in one process: no pool of another can consume it
    in_use = [q for q in WORK_QUEUES if q != GATEWAY_QUEUE or settings.gateway_webhook_url is not None]
    names = [Topology(settings.queue_prefix).queue(q) for q in in_use]
    deadline = clock() + timeout_seconds
    while True:
        try:
            missing = [d.name for d in queue_depths(settings.broker_url, names) if not d.consumers]
        except (pika.exceptions.AMQPError, OSError):
            missing = names
        if not missing or clock() >= deadline:
            return missing
        sleep(0.5)
