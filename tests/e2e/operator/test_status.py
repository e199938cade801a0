"""``accessflow status`` against a known state on the real PostgreSQL and RabbitMQ.

The state is this module's own: a fresh database and queues under a prefix of its own on
the broker's default vhost, so that nothing another test leaves behind shows up here.
Each test starts from the clean state and adds one kind of trouble.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pika
import pytest
import sqlalchemy as sa

from domain.model import DeliveryStatus, NotificationKind, Status, utcnow
from infra.db import migrate, orm
from infra.messaging.topology import WORK_QUEUES, QueueArguments, Topology
from infra.observability import metrics
from infra.settings import Settings
from tests import services as svc
from tests.e2e.conftest import cli, settings_env

pytestmark = pytest.mark.e2e

HOUR = timedelta(hours=1)


@dataclass
class Deployment:
    env: dict[str, str]
    engine: sa.Engine
    broker_url: str
    topology: Topology

    def status(self, *args: str) -> tuple[int, Any]:
        result = cli(self.env, "status", "--json", *args, check=False)
        assert result.returncode in (0, 2), result.stderr
        return result.returncode, json.loads(result.stdout)

    def publish(self, queue: str, body: bytes = b"{}") -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.broker_url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)
        finally:
            connection.close()

    def collected(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """What ``accessflow metrics`` would export now: its series, read as it reads them."""
        snapshot = metrics.Snapshot()
        metrics.read_database(self.engine, snapshot)
        metrics.read_broker(self.broker_url, self.topology.prefix, snapshot)
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in metrics.state_families(snapshot, self.topology.prefix)
            for sample in family.samples
        }

    def add_request(self, status: Status, *, since: datetime) -> str:
        request_id = str(uuid.uuid4())
        with self.engine.begin() as connection:
            connection.execute(
                orm.access_requests.insert().values(
                    id=request_id,
                    consumer_id="acme",
                    plan_id="starter",
                    product_ids=["payments"],
                    app_id="acme-checkout",
                    submitted_at=since,
                    received_at=since,
                    status=status,
                    updated_at=since,
                )
            )
        return request_id

    def add_outbox_row(self, *, created_at: datetime, parked: bool = False) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                orm.outbox.insert().values(
                    id=str(uuid.uuid4()),
                    queue_name=self.topology.queue("notifications"),
                    actor_name="notifications.send",
                    payload={},
                    created_at=created_at,
                    attempts=10 if parked else 0,
                    last_error="unroutable: 312 NO_ROUTE" if parked else None,
                    parked_at=created_at if parked else None,
                )
            )


@pytest.fixture(scope="module")
def deployment(postgres_server: str, amqp_server: str) -> Iterator[Deployment]:
    prefix = f"afstatus-{uuid.uuid4().hex[:8]}"
    topology = Topology(prefix)
    with svc.fresh_database(postgres_server) as url:
        migrate.upgrade(url)
        settings = Settings(
            database_url=url,
            broker_url=amqp_server,
            queue_prefix=prefix,
            status_pending_review_max_seconds=3600,
            status_approved_max_seconds=600,
            status_outbox_max_age_seconds=300,
        )
        # The queues as the workers declare them, with nobody consuming.
        arguments = QueueArguments.from_settings(settings)
        connection = pika.BlockingConnection(pika.URLParameters(amqp_server))
        channel = connection.channel()
        queues = []
        for work_queue in WORK_QUEUES:
            name = topology.queue(work_queue)
            channel.queue_declare(name, durable=True, arguments=dict(arguments.work(name)))
            channel.queue_declare(f"{name}.XQ", durable=True, arguments=dict(arguments.dead_letter(name)))
            queues += [name, f"{name}.XQ"]
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            yield Deployment(settings_env(settings), engine, amqp_server, topology)
        finally:
            engine.dispose()
            for name in queues:
                channel.queue_delete(name)
            connection.close()


@pytest.fixture
def clean(deployment: Deployment) -> Iterator[Deployment]:
    """The deployment with nothing waiting, before and after the test."""

    def empty() -> None:
        with deployment.engine.begin() as connection:
            for table in (orm.notifications, orm.outbox, orm.access_requests):
                connection.execute(table.delete())
        connection = pika.BlockingConnection(pika.URLParameters(deployment.broker_url))
        try:
            channel = connection.channel()
            for work_queue in WORK_QUEUES:
                name = deployment.topology.queue(work_queue)
                channel.queue_purge(name)
                channel.queue_purge(f"{name}.XQ")
        finally:
            connection.close()

    empty()
    yield deployment
    empty()


class TestACleanState:
    def test_exits_0_and_shows_every_queue_empty(self, clean: Deployment) -> None:
        # Given declared queues, and a request whose review has just begun (within its threshold)
        clean.add_request(Status.PENDING_REVIEW, since=utcnow())

        # When status is asked
        code, shown = clean.status()

        # Then nothing needs a human
        assert code == 0, shown["needs_a_human"]
        assert shown["ok"] is True and shown["needs_a_human"] == []
        assert shown["dead_letters"] == 0
        assert shown["requests"]["pending_review"] == 1
        assert shown["requests"]["pending_review_overdue"] == 0
        assert shown["outbox"] == {
            "unsent": 0,
            "oldest_unsent_seconds": None,
            "unsent_overdue": 0,
            "parked": 0,
        }
        work = {q["name"]: q for q in shown["queues"] if q["kind"] == "work"}
        assert set(work) == {clean.topology.queue(q) for q in WORK_QUEUES}
        assert all(q["messages"] == 0 and q["consumers"] == 0 for q in work.values())

    def test_the_table_says_all_clear(self, clean: Deployment) -> None:
        result = cli(clean.env, "status")
        assert "all clear" in result.stdout
        assert clean.topology.queue("requests") in result.stdout


class TestWhatNeedsAHuman:
    def test_a_request_pending_review_too_long(self, clean: Deployment) -> None:
        # Given a request parked for review two hours ago, past its one-hour threshold
        clean.add_request(Status.PENDING_REVIEW, since=utcnow() - 2 * HOUR)

        code, shown = clean.status()

        assert code == 2
        assert shown["requests"]["pending_review"] == 1
        assert shown["requests"]["pending_review_overdue"] == 1
        assert shown["requests"]["oldest_pending_review_seconds"] >= 7200
        [problem] = shown["needs_a_human"]
        assert "1 request(s) pending review for more than 1h (oldest 2h)" in problem

    def test_an_unsent_outbox_row(self, clean: Deployment) -> None:
        # Given an outbox row committed ten minutes ago that no sweep published
        clean.add_outbox_row(created_at=utcnow() - timedelta(minutes=10))

        code, shown = clean.status()

        assert code == 2
        assert shown["outbox"]["unsent"] == 1 and shown["outbox"]["unsent_overdue"] == 1
        assert shown["outbox"]["oldest_unsent_seconds"] >= 600
        [problem] = shown["needs_a_human"]
        assert problem.startswith("1 outbox row(s) unsent for more than 5m")
        # And the metrics collector exports the same backlog and its age
        series = clean.collected()
        assert series[("accessflow_outbox_backlog_rows", frozenset())] == 1
        assert 600 <= series[("accessflow_outbox_oldest_age_seconds", frozenset())] < 900

    def test_a_dead_letter(self, clean: Deployment) -> None:
        # Given a message dead-lettered from the requests queue
        xq = f"{clean.topology.queue('requests')}.XQ"
        clean.publish(xq, svc.envelope(clean.topology.queue("requests"), "access_request.route", {}))

        code, shown = clean.status()

        assert code == 2
        assert shown["dead_letters"] == 1
        [row] = [q for q in shown["queues"] if q["name"] == xq]
        assert (row["kind"], row["messages"]) == ("dead_letter", 1)
        [problem] = shown["needs_a_human"]
        assert problem.startswith(f"1 dead letter(s) in {xq}")
        # And the metrics collector counts it on the requests queue, and none on the others
        series = clean.collected()
        for work_queue in WORK_QUEUES:
            queue = clean.topology.queue(work_queue)
            expected = 1 if work_queue == "requests" else 0
            assert series[("accessflow_dead_letter_messages", frozenset({("queue", queue)}))] == expected, (
                queue
            )

    def test_a_parked_outbox_row(self, clean: Deployment) -> None:
        clean.add_outbox_row(created_at=utcnow(), parked=True)

        code, shown = clean.status()

        assert code == 2
        assert shown["outbox"]["parked"] == 1 and shown["outbox"]["unsent"] == 0
        series = clean.collected()
        assert series[("accessflow_outbox_parked_rows", frozenset())] == 1
        assert series[("accessflow_outbox_backlog_rows", frozenset())] == 0
        assert series[("accessflow_outbox_oldest_age_seconds", frozenset())] == 0
        [problem] = shown["needs_a_human"]
        assert problem.startswith("1 parked outbox row(s)")

    def test_messages_on_a_queue_nobody_consumes(self, clean: Deployment) -> None:
        queue = clean.topology.queue("notifications")
        clean.publish(queue)

        code, shown = clean.status()

        assert code == 2
        [problem] = shown["needs_a_human"]
        assert problem == f"1 message(s) in {queue} and no consumer"

    def test_stuck_requests(self, clean: Deployment) -> None:
        # Given one request approved an hour ago without its credential, one whose provisioning failed,
        # and one approved a moment ago (within its threshold)
        clean.add_request(Status.APPROVED, since=utcnow() - HOUR)
        clean.add_request(Status.PROVISIONING_FAILED, since=utcnow())
        clean.add_request(Status.APPROVED, since=utcnow())

        code, shown = clean.status()

        assert code == 2
        requests = shown["requests"]
        assert (requests["approved"], requests["approved_stuck"], requests["provisioning_failed"]) == (
            2,
            1,
            1,
        )
        approved, failed = shown["needs_a_human"]
        assert approved.startswith("1 request(s) approved more than 10m ago")
        assert failed.startswith("1 request(s) in provisioning_failed")

    def test_an_email_stuck_in_sending(self, clean: Deployment) -> None:
        # Given an email whose lease ran out an hour ago, past the stale threshold and a sweep, and
        # a failed one (final: counted, not flagged)
        request_id = clean.add_request(Status.PROVISIONED, since=utcnow() - 2 * HOUR)
        with clean.engine.begin() as connection:
            for kind, status, lease in (
                (NotificationKind.APPROVE, DeliveryStatus.SENDING, utcnow() - HOUR),
                (NotificationKind.REVIEW, DeliveryStatus.FAILED, None),
            ):
                connection.execute(
                    orm.notifications.insert().values(
                        request_id=request_id,
                        kind=kind,
                        message_id=f"<{uuid.uuid4()}@accessflow.local>",
                        status=status,
                        attempts=1,
                        created_at=utcnow() - 2 * HOUR,
                        lease_expires_at=lease,
                    )
                )

        code, shown = clean.status()

        assert code == 2
        assert shown["emails"] == {"sending": 1, "stuck_sending": 1, "failed": 1, "partial": 0}
        [problem] = shown["needs_a_human"]
        assert problem.startswith("1 email(s) stuck in sending")

    def test_the_table_lists_why_and_exits_2(self, clean: Deployment) -> None:
        clean.add_outbox_row(created_at=utcnow(), parked=True)
        clean.publish(f"{clean.topology.queue('credentials')}.XQ")

        result = cli(clean.env, "status", check=False)

        assert result.returncode == 2, result.stderr
        assert "needs a human:" in result.stdout
        assert f"1 dead letter(s) in {clean.topology.queue('credentials')}.XQ" in result.stdout
        assert "1 parked outbox row(s)" in result.stdout


class TestAnUnreachableBroker:
    def test_is_reported_with_the_database_still_read(self, clean: Deployment) -> None:
        env = {**clean.env, "ACCESSFLOW_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{svc.free_port()}/%2F"}

        result = cli(env, "status", "--json", check=False)

        assert result.returncode == 2, result.stderr
        shown = json.loads(result.stdout)
        assert shown["needs_a_human"][0].startswith("cannot read the broker")
        assert shown["requests"]["pending_review"] == 0
        assert all(q["messages"] is None for q in shown["queues"])
