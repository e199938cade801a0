"""The outbox relay against real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pytest
import sqlalchemy as sa

from domain import commands
from domain.model import NotificationKind
from infra.bootstrap import Services
from infra.db import orm
from infra.messaging.broker import make_broker
from infra.messaging.broker_admin import BrokerAdminError, Rabbitmqctl
from infra.messaging.publisher import DramatiqPublisher
from infra.messaging.relay import OutboxRelay
from infra.settings import Settings
from messages.routes import NOTIFY
from tests import services as svc

pytestmark = pytest.mark.integration


def unsent(services: Services, row_ids: list[str]) -> int:
    with services.engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(sa.func.count())
                .select_from(orm.outbox)
                .where(orm.outbox.c.id.in_(row_ids), orm.outbox.c.sent_at.is_(None))
            ).scalar_one()
        )


def take_all(broker_url: str, queue_name: str) -> list[dict[str, object]]:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        bodies = []
        while True:
            method, _, body = channel.basic_get(queue_name, auto_ack=True)
            if method is None:
                return bodies
            bodies.append(json.loads(body))
    finally:
        connection.close()


def close_broker_side(peer_port: int) -> None:
    """Have RabbitMQ close the client connection whose port is ``peer_port``."""
    ctl = Rabbitmqctl()
    try:
        listing = ctl.run("list_connections", "pid", "peer_port", "--no-table-headers", "-q")
    except BrokerAdminError as error:
        svc.unavailable(f"cannot list the broker's connections with rabbitmqctl: {error}")
    [pid] = [line.split()[0] for line in listing.splitlines() if line.split()[1:] == [str(peer_port)]]
    ctl.run("close_connection", pid, "closed by the test")


@pytest.fixture
def private_queue(settings: Settings, broker_url: str):  # type: ignore[no-untyped-def]
    """A queue prefix of this test's own, so that no worker consumes what it publishes."""
    prefix = f"{settings.queue_prefix}.outbox-{uuid.uuid4().hex[:6]}"
    yield prefix
    svc.delete_queues(broker_url, prefix, [NOTIFY.queue])


class TestTheRelay:
    def test_publishes_committed_rows_with_confirms_and_marks_them_sent(
        self, settings: Settings, private_queue: str
    ) -> None:
        # Given a unit of work whose relay publishes to RabbitMQ (built without the usual auto-publish)
        from infra.bootstrap import build

        services = build(settings.model_copy(update={"queue_prefix": private_queue}))
        try:
            request_id = str(uuid.uuid4())
            uow = services.uow()
            with uow:
                uow.outbox.put(commands.SendNotification(request_id, NotificationKind.REVIEW))
                row_ids = [message.message_id for message in uow.outbox.added]
                uow.commit()  # publishes right after the commit

            # Then the row is marked sent and the message sits on its queue, in dramatiq's envelope
            assert unsent(services, row_ids) == 0
            [message] = take_all(settings.broker_url, NOTIFY.queue_name(private_queue))
            assert message["message_id"] == row_ids[0]
            assert message["actor_name"] == NOTIFY.actor_name
            assert message["args"] == [
                {"version": 1, "type": "notification.send", "request_id": request_id, "kind": "review"}
            ]
        finally:
            services.broker.close()
            services.close()

    def test_publishes_nothing_for_a_rolled_back_transaction(self, services: Services) -> None:
        with services.uow() as uow:
            uow.outbox.put(commands.IssueCredentials(str(uuid.uuid4())))
            row_ids = [message.message_id for message in uow.outbox.added]
            # no commit

        with services.engine.connect() as connection:
            found = connection.execute(sa.select(orm.outbox.c.id).where(orm.outbox.c.id.in_(row_ids))).all()
        assert found == []

    def test_leaves_rows_unsent_while_the_broker_is_down_and_sends_them_later(
        self, settings: Settings, private_queue: str
    ) -> None:
        from infra.bootstrap import build

        # Given a relay whose broker cannot be reached
        down = settings.model_copy(
            update={
                "queue_prefix": private_queue,
                "broker_url": f"amqp://guest:guest@127.0.0.1:{svc.free_port()}/%2F",
            }
        )
        services = build(down)
        try:
            with services.uow() as uow:
                uow.outbox.put(commands.SendNotification(str(uuid.uuid4()), NotificationKind.APPROVE))
                row_ids = [message.message_id for message in uow.outbox.added]
                uow.commit()  # the publish fails quietly; the commit stands

            assert unsent(services, row_ids) == 1

            # When a relay with a working broker sweeps
            broker = make_broker(settings)
            try:
                OutboxRelay(services.session_factory, DramatiqPublisher(broker)).publish(row_ids)
            finally:
                broker.close()

            # Then the row is sent, once
            assert unsent(services, row_ids) == 0
            assert len(take_all(settings.broker_url, NOTIFY.queue_name(private_queue))) == 1
        finally:
            services.close()


class TestTheBatchPublisher:
    def test_confirms_a_whole_batch_and_nothing_that_could_not_be_routed(
        self, settings: Settings, private_queue: str
    ) -> None:
        from infra.messaging.publisher import BatchConfirmPublisher, Outgoing

        # Given a publisher whose queue exists, and a second queue that does not
        broker = make_broker(settings)
        routed = NOTIFY.queue_name(private_queue)
        nowhere = f"{private_queue}.nowhere"
        declared: list[str] = []

        def declare(queue: str) -> None:
            declared.append(queue)
            if queue == routed:
                broker.declare_queue(queue, ensure=True)

        publisher = BatchConfirmPublisher(settings.broker_url, declare=declare)
        try:
            batch = [Outgoing(routed, NOTIFY.actor_name, {"n": i}, str(uuid.uuid4())) for i in range(50)]
            lost = Outgoing(nowhere, NOTIFY.actor_name, {"n": -1}, str(uuid.uuid4()))

            # When both go out in one batch
            confirmed = publisher.publish_batch([*batch, lost])

            # Then exactly the routable ones are confirmed, and they are on the queue in order
            assert confirmed == {m.message_id for m in batch}
            assert [m["message_id"] for m in take_all(settings.broker_url, routed)] == [
                m.message_id for m in batch
            ]
            assert sorted(declared) == sorted({routed, nowhere})
        finally:
            publisher.close()
            broker.close()

    def test_returns_when_the_confirms_arrive_not_when_a_timer_runs_out(
        self, settings: Settings, private_queue: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from infra.messaging import publisher as broker_module
        from infra.messaging.broker import queue_declarer
        from infra.messaging.publisher import BatchConfirmPublisher, Outgoing

        # Given a publisher whose connection is open (its first batch opened it)
        broker = make_broker(settings)
        queue = NOTIFY.queue_name(private_queue)
        publisher = BatchConfirmPublisher(settings.broker_url, declare=queue_declarer(broker))
        try:
            assert publisher.publish_batch([Outgoing(queue, NOTIFY.actor_name, {"n": -1}, "warm-up")])
            assert publisher.io is not None
            ioloop = publisher.io.ioloop
            # and, watched from the test: each batch the caller waits for (its wait loop counts
            # its passes), and each timer of the publisher's ioloop that fires
            waited: list[Any] = []
            fired: list[float] = []
            wait = broker_module._Batch.wait
            call_later = ioloop.call_later

            def watched_wait(batch: Any, grace: float) -> bool:
                waited.append(batch)
                return wait(batch, grace)

            def watched_timer(delay: float, callback: Callable[[], None]) -> object:
                def fire() -> None:
                    fired.append(delay)
                    callback()

                return call_later(delay, fire)

            monkeypatch.setattr(broker_module._Batch, "wait", watched_wait)
            monkeypatch.setattr(ioloop, "call_later", watched_timer)

            # When a batch of 100 goes out
            batch = [Outgoing(queue, NOTIFY.actor_name, {"n": i}, str(uuid.uuid4())) for i in range(100)]
            confirmed = publisher.publish_batch(batch)

            # Then all are confirmed, the caller's wait slept once at most (an event, set by the
            # batch's last confirm, wakes it: it never wakes for nothing), and no timer with a
            # delay ran out (the batch's deadline timer was cancelled by that confirm).
            assert confirmed == {m.message_id for m in batch}
            [mine] = waited
            assert mine.passes <= 1
            assert [delay for delay in fired if delay > 0] == []
        finally:
            publisher.close()
            broker.close()

    def test_replaces_a_connection_the_broker_closed_while_it_sat_idle(
        self, settings: Settings, private_queue: str
    ) -> None:
        from infra.messaging.broker import queue_declarer
        from infra.messaging.publisher import BatchConfirmPublisher, Outgoing

        # Given a publisher whose connection is open (its first batch opened it)
        broker = make_broker(settings)
        queue = NOTIFY.queue_name(private_queue)
        publisher = BatchConfirmPublisher(settings.broker_url, declare=queue_declarer(broker))
        try:
            assert publisher.publish_batch([Outgoing(queue, NOTIFY.actor_name, {"n": -1}, "warm-up")])
            io = publisher.io
            assert io is not None
            connection = io.connection
            # and a broker that hangs up on it between two batches, as after a node restart
            close_broker_side(connection._transport._sock.getsockname()[1])
            # (the publisher's I/O thread reads the close as it comes, the connection being idle)
            svc.wait_until(lambda: not connection.is_open, what="the publisher to see the close")

            # When the next batch goes out
            batch = [Outgoing(queue, NOTIFY.actor_name, {"n": i}, str(uuid.uuid4())) for i in range(3)]
            confirmed = publisher.publish_batch(batch)

            # Then it went out on a new connection, confirmed, instead of failing to the sweep;
            # the publisher holds that one connection and nothing of the old one
            assert confirmed == {m.message_id for m in batch}
            assert io.connection is not connection and io.connection.is_open
            assert io.closing == {}
            assert io.connects == 2
        finally:
            publisher.close()
            broker.close()
