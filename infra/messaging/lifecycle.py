"""The worker lifecycle middleware: the log context per message, the periodic sweeps, a clean shutdown.

The sweeps run in every pool that holds what they sweep: the outbox in all of them, the emails
stuck in ``sending`` where the emails are sent, the requests stuck in ``approved`` and the
credentials whose lifetime ends where the credentials are issued, the review deadlines where
the decisions are applied. Each is safe in any number of processes at once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import dramatiq
import structlog
from dramatiq.middleware import Middleware

from domain import handlers
from domain.model import utcnow
from infra.messaging.periodic import PeriodicTask
from messages import routes

if TYPE_CHECKING:
    from infra.bootstrap import Services

log = structlog.get_logger()


class WorkerLifecycle(Middleware):
    """Binds ids to the log context per message; runs the outbox sweep; disposes the engine on shutdown.

    A pool that consumes the notifications queue also sweeps for emails stuck in ``sending``
    (:func:`sweep_stuck_notifications`): where the emails are sent, and so wherever they are.
    A pool that consumes the credentials queue sweeps for requests stuck in ``approved``
    (:func:`sweep_stuck_provisioning`), for the same reason.
    """

    def __init__(self, services: Services) -> None:
        self.services = services
        self.tasks: list[PeriodicTask] = []

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        settings, relay = self.services.settings, self.services.relay
        sweep = timedelta(seconds=settings.outbox_sweep_seconds)
        relay.defer_marks()
        self.tasks = [
            PeriodicTask(
                "outbox-sweep", settings.outbox_sweep_seconds, lambda: relay.publish(older_than=sweep)
            ),
            PeriodicTask("outbox-marks", settings.outbox_mark_seconds, relay.mark_deferred),
            PeriodicTask(
                "outbox-prune",
                settings.outbox_prune_seconds,
                lambda: relay.prune(timedelta(hours=settings.outbox_retain_hours)),
            ),
        ]
        if consumes(worker, routes.NOTIFY.queue_name(settings.queue_prefix)):
            self.tasks.append(
                PeriodicTask(
                    "notification-sweep",
                    settings.notification_sweep_seconds,
                    lambda: sweep_stuck_notifications(self.services),
                )
            )
        if consumes(worker, routes.ISSUE.queue_name(settings.queue_prefix)):
            self.tasks.append(
                PeriodicTask(
                    "provisioning-sweep",
                    settings.provisioning_sweep_seconds,
                    lambda: sweep_stuck_provisioning(self.services),
                )
            )
            self.tasks.append(
                PeriodicTask(
                    "expiry-sweep",
                    settings.expiry_sweep_seconds,
                    lambda: sweep_credential_expiry(self.services),
                )
            )
        if consumes(worker, routes.DECIDE.queue_name(settings.queue_prefix)):
            # Where the decisions are applied: the sweep and a decision contend for the same
            # pending rows, and each skips (or waits briefly for) what the other holds.
            self.tasks.append(
                PeriodicTask(
                    "review-deadline-sweep",
                    settings.review_sweep_seconds,
                    lambda: sweep_review_deadlines(self.services),
                )
            )
        for task in self.tasks:
            task.start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        for task in self.tasks:
            task.stop()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # The last messages' marks: owed ones left unmarked would be published again by a sweep.
        try:
            self.services.relay.mark_deferred()
        except Exception as error:  # the sweep of another process republishes them
            log.warning("outbox.marks_lost", error=type(error).__name__)
        self.services.close()

    def before_process_message(self, broker: dramatiq.Broker, message: dramatiq.MessageProxy) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(message_id=message.message_id, actor=message.actor_name)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: dramatiq.MessageProxy,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        structlog.contextvars.clear_contextvars()


def consumes(worker: dramatiq.Worker, queue_name: str) -> bool:
    """Whether ``worker`` consumes ``queue_name``: it names it, or it names no queue and takes them all."""
    whitelist = worker.consumer_whitelist
    return not whitelist or queue_name in whitelist


def sweep_stuck_notifications(services: Services) -> tuple[int, int]:
    """Re-drive the emails stuck in ``sending``, or give up on them (:func:`handlers.redrive_stuck_notifications`).

    Safe in any number of processes at once: each takes the rows no other sweep holds.

    Returns:
      How many were re-driven, and how many were marked failed.
    """
    settings = services.settings
    return handlers.redrive_stuck_notifications(
        uow=services.uow(),
        stale_after=timedelta(seconds=settings.notification_stale_seconds),
        max_attempts=settings.notification_max_attempts,
    )


def sweep_stuck_provisioning(services: Services) -> tuple[int, int]:
    """Issue again the credentials of requests stuck in ``approved``, or give up on them
    (:func:`handlers.redrive_stuck_provisioning`).

    Safe in any number of processes at once: each takes the rows no other sweep holds.

    Returns:
      How many were re-driven, and how many ended ``provisioning_failed``.
    """
    settings = services.settings
    return handlers.redrive_stuck_provisioning(
        uow=services.uow(),
        stale_after=timedelta(seconds=settings.provisioning_stale_seconds),
        max_attempts=settings.provisioning_max_attempts,
    )


def sweep_credential_expiry(services: Services, now: Callable[[], datetime] = utcnow) -> tuple[int, int]:
    """Expire the credentials whose lifetime ended, and queue the notices due
    (:func:`handlers.expire_credentials`).

    Safe in any number of processes at once: each takes the rows no other sweep holds.
    ``now`` is injected so that the demo and tests move the clock rather than wait.

    Returns:
      How many expired, and how many notices were queued.
    """
    return handlers.expire_credentials(
        uow=services.uow(),
        notice_points=services.settings.expiry_notice_points(),
        gateway_configured=services.gateway is not None,
        now=now,
    )


def sweep_review_deadlines(services: Services, now: Callable[[], datetime] = utcnow) -> tuple[int, int, int]:
    """Remind, escalate and expire the requests pending review by their deadline
    (:func:`handlers.expire_reviews`).

    Safe in any number of processes at once: each takes the rows no other sweep holds.
    ``now`` is injected so that tests move the clock rather than wait.

    Returns:
      How many expired, how many reminders and how many escalations were queued.
    """
    settings = services.settings
    return handlers.expire_reviews(
        uow=services.uow(),
        reminder_points=settings.review_reminder_points(),
        escalation_point=settings.review_escalation_point(),
        now=now,
    )
