"""``accessflow status``'s read model and rules, on SQLite and the in-memory broker (no service).

The same against real PostgreSQL and RabbitMQ, through the command: tests/e2e/operator/test_status.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from domain.model import DeliveryStatus, NotificationKind, Status, utcnow
from infra.bootstrap import Services, build
from infra.db import migrate, orm
from infra.observability import status
from infra.settings import Settings

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=utcnow().tzinfo)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'status.db'}",
        broker_url="stub://",
        queue_prefix="st",
        status_pending_review_max_seconds=3600,
        status_approved_max_seconds=600,
        status_outbox_max_age_seconds=300,
        notification_stale_seconds=900,
        notification_sweep_seconds=60,
    )
    migrate.upgrade(settings.database_url)
    built = build(settings)
    try:
        yield built
    finally:
        built.close()


def add_request(services: Services, state: Status, *, ago: timedelta) -> str:
    request_id = str(uuid.uuid4())
    at = NOW - ago
    with services.engine.begin() as connection:
        connection.execute(
            orm.access_requests.insert().values(
                id=request_id,
                consumer_id="acme",
                plan_id="starter",
                product_ids=["payments"],
                submitted_at=at,
                received_at=at,
                status=state,
                updated_at=at,
            )
        )
    return request_id


def report(services: Services) -> dict:
    return status.report(services.settings, services.uow, now=lambda: NOW)


class TestNothingWaiting:
    def test_is_ok_and_shows_every_queue_it_watches(self, services: Services) -> None:
        shown = report(services)

        assert shown["ok"] is True and shown["needs_a_human"] == []
        names = [q["name"] for q in shown["queues"]]
        assert names[:3] == ["st.requests", "st.requests.DQ", "st.requests.XQ"]
        assert names[-1] == "st.events.unrouted"
        assert {q["note"] for q in shown["queues"]} == {"in-memory broker"}
        assert shown["dead_letters"] is None  # the in-memory broker has none to count
        assert shown["requests"]["pending_review"] == 0


class TestThresholds:
    def test_a_review_is_overdue_only_past_its_threshold(self, services: Services) -> None:
        add_request(services, Status.PENDING_REVIEW, ago=timedelta(minutes=59))
        assert report(services)["ok"] is True

        add_request(services, Status.PENDING_REVIEW, ago=timedelta(hours=3))
        shown = report(services)

        assert shown["requests"]["pending_review"] == 2
        assert shown["requests"]["pending_review_overdue"] == 1
        assert shown["requests"]["oldest_pending_review_seconds"] == 3 * 3600
        assert shown["needs_a_human"] == [
            "1 request(s) pending review for more than 1h (oldest 3h): "
            "`accessflow requests list --status pending_review`"
        ]

    def test_a_request_is_past_its_review_deadline_only_two_sweeps_after_it(self, services: Services) -> None:
        # Given requests pending review (recently: not overdue as reviews), one a minute past its
        # deadline (the sweep runs every 60 s: it has time yet), one ten minutes past
        for past in (timedelta(minutes=1), timedelta(minutes=10)):
            request_id = add_request(services, Status.PENDING_REVIEW, ago=timedelta(minutes=5))
            with services.engine.begin() as connection:
                connection.execute(
                    orm.access_requests.update()
                    .where(orm.access_requests.c.id == request_id)
                    .values(review_deadline_at=NOW - past)
                )

        shown = report(services)

        assert shown["requests"]["past_review_deadline"] == 1
        assert shown["needs_a_human"] == [
            "1 request(s) still pending review more than 2m past their review deadline: is a pool "
            "consuming the decisions queue running? Its sweep expires them"
        ]

    def test_an_email_is_stuck_only_a_sweep_after_it_went_stale(self, services: Services) -> None:
        request_id = add_request(services, Status.PROVISIONED, ago=timedelta(hours=1))
        with services.engine.begin() as connection:
            for kind, lease_ran_out in (
                (NotificationKind.APPROVE, timedelta(seconds=900 + 30)),  # stale; the sweep has a minute
                (NotificationKind.REVIEW, timedelta(seconds=900 + 90)),  # stale a sweep ago: stuck
            ):
                connection.execute(
                    orm.notifications.insert().values(
                        request_id=request_id,
                        kind=kind,
                        message_id=f"<{uuid.uuid4()}@accessflow.local>",
                        status=DeliveryStatus.SENDING,
                        attempts=1,
                        created_at=NOW - timedelta(hours=1),
                        lease_expires_at=NOW - lease_ran_out,
                    )
                )

        shown = report(services)

        assert shown["emails"] == {"sending": 2, "stuck_sending": 1, "failed": 0, "partial": 0}
        [problem] = shown["needs_a_human"]
        assert problem.startswith("1 email(s) stuck in sending for more than 16m after their lease")


class TestDuration:
    @pytest.mark.parametrize(
        ("seconds", "said"),
        [
            (0, "0s"),
            (59.9, "59s"),
            (60, "1m"),
            (3599, "59m"),
            (3600, "1h"),
            (5400, "1h 30m"),
            (90_000, "1d 1h"),
        ],
    )
    def test_reads_as_a_person_says_it(self, seconds: float, said: str) -> None:
        assert status.duration(seconds) == said


class TestQueueRules:
    def test_dead_letters_unrouted_events_and_unconsumed_messages_need_a_human(self) -> None:
        queues = [
            {"name": "p.requests", "kind": "work", "messages": 3, "consumers": 0},
            {"name": "p.decisions", "kind": "work", "messages": 3, "consumers": 1},
            {"name": "p.requests.XQ", "kind": "dead_letter", "messages": 2, "consumers": 0},
            {"name": "p.credentials.XQ", "kind": "dead_letter", "messages": 0, "consumers": 0},
            {"name": "p.events.unrouted", "kind": "unrouted", "messages": 1, "consumers": 0},
            {"name": "p.notifications", "kind": "work", "messages": None, "consumers": None},
        ]

        problems = status._queue_problems(queues)

        assert [p.split(":")[0] for p in problems] == [
            "3 message(s) in p.requests and no consumer",
            "2 dead letter(s) in p.requests.XQ",
            "1 event(s) in p.events.unrouted",
        ]
