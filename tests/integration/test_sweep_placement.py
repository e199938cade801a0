"""Which worker pool runs which periodic task: each sweep where its work is done, the outbox's everywhere.

A sweep runs in every pool that consumes the queue whose work it re-drives or contends with
(the emails where they are sent, the credentials where they are issued, the review deadlines
where decisions are applied), so that it runs wherever that work runs, and nowhere else. The
pools are booted on SQLite and dramatiq's stub broker: no message flows, only the tasks start.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

from infra.bootstrap import Services, build
from infra.messaging.lifecycle import WorkerLifecycle
from infra.settings import Settings
from messages.routes import QUEUES

#: Every pool runs these: the outbox is everyone's.
EVERYWHERE = {"outbox-sweep", "outbox-marks", "outbox-prune"}
#: The sweeps a pool runs, by the queue it consumes.
BY_QUEUE = {
    "requests": set(),
    "decisions": {"review-deadline-sweep"},
    "credentials": {"provisioning-sweep", "expiry-sweep"},
    "notifications": {"notification-sweep"},
    "gateway": set(),
}


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    settings = Settings(database_url=f"sqlite:///{tmp_path}/db.sqlite", broker_url="stub://")
    built = build(settings, broker=StubBroker())
    try:
        yield built
    finally:
        built.close()


def tasks_of(services: Services, queues: set[str] | None) -> set[str]:
    """The names of the periodic tasks a pool consuming ``queues`` (None: every queue) starts."""
    broker = services.broker
    worker = dramatiq.Worker(
        broker, queues={f"{services.settings.queue_prefix}.{q}" for q in queues} if queues else None
    )
    lifecycle = WorkerLifecycle(services)
    lifecycle.after_worker_boot(broker, worker)
    try:
        return {task.name for task in lifecycle.tasks}
    finally:
        lifecycle.before_worker_shutdown(broker, worker)


def test_every_queue_is_named_here() -> None:
    assert set(BY_QUEUE) == set(QUEUES)


@pytest.mark.parametrize("queue", sorted(BY_QUEUE))
def test_a_pool_of_one_queue_runs_the_outbox_tasks_and_that_queues_sweeps(
    services: Services, queue: str
) -> None:
    assert tasks_of(services, {queue}) == EVERYWHERE | BY_QUEUE[queue]


def test_a_pool_of_every_queue_runs_every_sweep(services: Services) -> None:
    assert tasks_of(services, None) == EVERYWHERE.union(*BY_QUEUE.values())


def test_a_pool_of_two_queues_runs_the_sweeps_of_both(services: Services) -> None:
    assert tasks_of(services, {"decisions", "notifications"}) == EVERYWHERE | {
        "review-deadline-sweep",
        "notification-sweep",
    }
