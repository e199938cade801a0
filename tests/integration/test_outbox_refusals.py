"""The outbox relay and RabbitMQ's own refusals: one refused message costs itself, not the sweep.

The rows live in a database of this module's own, so that no worker pool of the session
sweeps them; the queues and exchanges are under a prefix of this module's own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pika
import pytest
import sqlalchemy as sa

from domain import commands
from domain.model import NotificationKind
from infra.bootstrap import Services, build
from infra.db import migrate, orm
from infra.db.unit_of_work import SqlUnitOfWork
from infra.messaging.publisher import Outgoing
from infra.messaging.relay import UnconfirmedPublish
from infra.settings import Settings
from messages.routes import NOTIFY
from tests import services as svc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_database(postgres_server: str) -> Iterator[str]:
    with svc.fresh_database(postgres_server) as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture
def relay_services(settings: Settings, broker_url: str, own_database: str) -> Iterator[Services]:
    prefix = f"{settings.queue_prefix}.refusals-{uuid.uuid4().hex[:6]}"
    services = build(settings.model_copy(update={"queue_prefix": prefix, "database_url": own_database}))
    try:
        yield services
    finally:
        services.broker.close()
        services.close()
        svc.delete_queues(broker_url, prefix, [NOTIFY.queue])


def declare_exchange(broker_url: str, name: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        connection.channel().exchange_declare(name, "direct", auto_delete=True)
    finally:
        connection.close()


def message_ids_on(broker_url: str, queue_name: str) -> list[str]:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        found = []
        while True:
            method, properties, _ = channel.basic_get(queue_name, auto_ack=True)
            if method is None:
                return found
            found.append(properties.message_id)
    finally:
        connection.close()


def event(exchange: str) -> Outgoing:
    return Outgoing(
        "", "", {"event": "test.refused"}, str(uuid.uuid4()), exchange=exchange, routing_key="nobody"
    )


class TestRefusalsFromRabbitmq:
    def test_an_unroutable_row_and_one_on_a_missing_exchange_cost_only_themselves(
        self, relay_services: Services, broker_url: str
    ) -> None:
        # Given a backlog a crash left (two batches), with an event to an exchange nothing is
        # bound to (RabbitMQ returns it) and one to an exchange that does not exist (RabbitMQ
        # closes the channel over it), both among the first batch
        prefix = relay_services.settings.queue_prefix
        declare_exchange(broker_url, f"{prefix}.unbound")
        unbound, missing = event(f"{prefix}.unbound"), event(f"{prefix}.missing")
        uow = SqlUnitOfWork(relay_services.session_factory, queue_prefix=prefix, relay=None)
        with uow:
            for _ in range(300):
                uow.outbox.put(commands.SendNotification(str(uuid.uuid4()), NotificationKind.APPROVE))
            uow.outbox.added[5:5] = [unbound]
            uow.outbox.added[90:90] = [missing]
            ids = [m.message_id for m in uow.outbox.added]
            uow.commit()

        # When one sweep runs
        with pytest.raises(UnconfirmedPublish) as raised:
            relay_services.relay.publish(ids)

        # Then every command is on its queue, and only the two refused rows are left, each with
        # RabbitMQ's reason. (A closed channel loses the confirms of messages already enqueued, so
        # some of the batch's commands arrive twice; the consumers absorb that, as after any crash.)
        commands_sent = set(ids) - {unbound.message_id, missing.message_id}
        assert set(message_ids_on(broker_url, NOTIFY.queue_name(prefix))) == commands_sent
        assert raised.value.published == 300
        c = orm.outbox.c
        with relay_services.engine.connect() as connection:
            left = dict(
                connection.execute(
                    sa.select(c.id, c.last_error).where(c.id.in_(ids), c.sent_at.is_(None))
                ).all()
            )
        assert left.keys() == {unbound.message_id, missing.message_id}
        assert left[unbound.message_id] == "unroutable: 312 NO_ROUTE"
        assert "404" in left[missing.message_id] and f"{prefix}.missing" in left[missing.message_id]
