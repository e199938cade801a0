"""How much the outbox relay's batched confirms save, against one confirm per message.

Both publish the same rows from the same outbox to the same RabbitMQ, in the same run:
the baseline through dramatiq's broker (a confirm per message, as pika's blocking
channel does), the relay through :class:`infra.messaging.publisher.BatchConfirmPublisher`. The
report is the ratio of their throughputs, so it does not depend on the machine.

Run: ``make bench-relay`` (uses ACCESSFLOW_TEST_DATABASE_URL / ACCESSFLOW_TEST_BROKER_URL or the
local services, like the tests).
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Callable

import sqlalchemy as sa
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from sqlalchemy.orm import sessionmaker

from domain import commands
from domain.model import NotificationKind
from infra.db import migrate, orm
from infra.db.engine import create_engine
from infra.db.unit_of_work import SqlUnitOfWork
from infra.messaging.broker import make_broker
from infra.messaging.publisher import BatchConfirmPublisher, DramatiqPublisher, Publisher
from infra.messaging.relay import OutboxRelay
from infra.settings import Settings
from messages.routes import ROUTES
from tests import services as svc

ROWS = 2000
ROUNDS = 3


def fill_outbox(uow: SqlUnitOfWork, rows: int) -> None:
    with uow:
        for _ in range(rows):
            uow.outbox.put(commands.SendNotification(str(uuid.uuid4()), NotificationKind.APPROVE))
        uow.commit()


def timed(relay: OutboxRelay, uow: SqlUnitOfWork, rows: int) -> float:
    fill_outbox(uow, rows)
    started = time.perf_counter()
    published = relay.publish()
    elapsed = time.perf_counter() - started
    assert published == rows, f"published {published} of {rows}"
    return rows / elapsed


def main() -> int:
    with (
        svc.postgres_server() as server,
        svc.rabbitmq_server() as broker_url,
        svc.fresh_database(server) as url,
    ):
        migrate.upgrade(url)
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        settings = Settings(database_url=url, broker_url=broker_url, queue_prefix=prefix)
        orm.start_mappers()
        engine = create_engine(settings)
        factory = sessionmaker(engine, expire_on_commit=False)
        broker = make_broker(settings)
        assert isinstance(broker, RabbitmqBroker), "the relay is measured against a real RabbitMQ"
        uow = SqlUnitOfWork(factory, queue_prefix=prefix, relay=None)
        publishers: dict[str, Callable[[], Publisher]] = {
            "one confirm per message (dramatiq broker)": lambda: DramatiqPublisher(broker),
            "batched confirms (outbox relay)": lambda: BatchConfirmPublisher(
                broker_url, declare=lambda q: broker.declare_queue(q, ensure=True)
            ),
        }
        results: dict[str, list[float]] = {name: [] for name in publishers}
        try:
            for _ in range(ROUNDS):  # interleaved, so drift in the machine's load hits both alike
                for name, make in publishers.items():
                    publisher = make()
                    try:
                        results[name].append(timed(OutboxRelay(factory, publisher), uow, ROWS))
                    finally:
                        publisher.close()
                svc.delete_queues(broker_url, prefix, [route.queue for route in ROUTES])
                with engine.begin() as connection:
                    connection.execute(sa.delete(orm.outbox))
        finally:
            broker.close()
            engine.dispose()
            svc.delete_queues(broker_url, prefix, [route.queue for route in ROUTES])
    baseline, batched = (statistics.median(v) for v in results.values())
    print(f"outbox relay, {ROWS} rows x {ROUNDS} rounds, median messages/s:")
    for name, values in results.items():
        print(
            f"  {name:<45} {statistics.median(values):8.0f}  (rounds: {', '.join(f'{v:.0f}' for v in values)})"
        )
    print(f"  ratio batched / baseline: {batched / baseline:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
