"""``accessflow relay`` as real processes: rows a crashed worker left are published while no pool runs.

The relays get a database and a queue prefix of this module's own, so that no worker pool of
the session sweeps these rows: what is published here, only the relays published.
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pika
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from domain import commands
from domain.model import NotificationKind, utcnow
from infra.db import migrate, orm
from infra.db.engine import create_engine
from infra.db.unit_of_work import SqlUnitOfWork
from infra.settings import Settings
from messages.routes import NOTIFY
from tests import services as svc
from tests.e2e.conftest import ACCESSFLOW

pytestmark = pytest.mark.e2e

ROWS = 1000


@pytest.fixture
def relay_env(env: dict[str, str], postgres_server: str, broker_url: str) -> Iterator[dict[str, str]]:
    prefix = f"{env['ACCESSFLOW_QUEUE_PREFIX']}.relay-{uuid.uuid4().hex[:6]}"
    with svc.fresh_database(postgres_server) as url:
        migrate.upgrade(url)
        yield {
            **env,
            "ACCESSFLOW_DATABASE_URL": url,
            "ACCESSFLOW_QUEUE_PREFIX": prefix,
            "ACCESSFLOW_OUTBOX_SWEEP_SECONDS": "0.5",
            "ACCESSFLOW_OUTBOX_RETAIN_HOURS": "24",
        }
        svc.delete_queues(broker_url, prefix, [NOTIFY.queue])


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


def log_events(path: Path) -> list[dict[str, object]]:
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line of a library that is not ours
    return events


class TestTheRelayService:
    def test_two_replicas_publish_a_crashed_workers_rows_once_prune_old_ones_and_stop_cleanly(
        self, relay_env: dict[str, str], broker_url: str, tmp_path: Path
    ) -> None:
        # Given rows a worker committed and died before publishing (no pool runs for them), and
        # rows sent two days ago
        settings = Settings(database_url=relay_env["ACCESSFLOW_DATABASE_URL"], broker_url="stub://")
        orm.start_mappers()
        engine = create_engine(settings)
        factory = sessionmaker(engine, expire_on_commit=False)
        prefix = relay_env["ACCESSFLOW_QUEUE_PREFIX"]
        uow = SqlUnitOfWork(factory, queue_prefix=prefix, relay=None)
        with uow:
            for _ in range(ROWS + 3):
                uow.outbox.put(commands.SendNotification(str(uuid.uuid4()), NotificationKind.APPROVE))
            ids = [m.message_id for m in uow.outbox.added]
            uow.commit()
        crashed, old = ids[:ROWS], ids[ROWS:]
        c = orm.outbox.c
        with engine.begin() as connection:
            connection.execute(
                orm.outbox.update().where(c.id.in_(old)).values(sent_at=utcnow() - timedelta(days=2))
            )

        # When two relays run
        logs = [tmp_path / "relay-1.log", tmp_path / "relay-2.log"]
        relays = []
        for log in logs:
            with log.open("w") as out:
                relays.append(
                    subprocess.Popen(
                        [ACCESSFLOW, "relay"], env=relay_env, stdout=out, stderr=subprocess.STDOUT
                    )
                )
        try:
            # Then they publish every row and mark it sent, and prune the old ones
            def unsent() -> int:
                with engine.connect() as connection:
                    return int(
                        connection.execute(
                            sa.select(sa.func.count()).select_from(orm.outbox).where(c.sent_at.is_(None))
                        ).scalar_one()
                    )

            svc.wait_until(lambda: unsent() == 0, timeout=90, what="the relays to publish every row")

            def remaining_old() -> int:
                with engine.connect() as connection:
                    return len(connection.execute(sa.select(c.id).where(c.id.in_(old))).all())

            svc.wait_until(lambda: remaining_old() == 0, timeout=30, what="the old rows to be pruned")
            # One relay may have done it all while the other was still importing, before its
            # handlers were installed: a signal then would kill it, not stop it.
            svc.wait_until(
                lambda: all('"relay.started"' in log.read_text(encoding="utf-8") for log in logs),
                timeout=60,
                what="both relays to start",
            )
        finally:
            # And stop cleanly on SIGINT and SIGTERM
            relays[0].send_signal(signal.SIGINT)
            relays[1].send_signal(signal.SIGTERM)
            codes = []
            for relay in relays:
                try:
                    codes.append(relay.wait(timeout=60))
                except subprocess.TimeoutExpired:
                    relay.kill()
                    codes.append(None)
            engine.dispose()
        assert codes == [0, 0], [log.read_text(encoding="utf-8")[-3000:] for log in logs]

        # Each row reached its queue exactly once: no two relays published one within a claim
        on_queue = Counter(message_ids_on(broker_url, NOTIFY.queue_name(prefix)))
        assert set(on_queue) == set(crashed)
        assert max(on_queue.values()) == 1
        events = [log_events(log) for log in logs]
        swept = sum(int(e.get("published", 0)) for evs in events for e in evs if e["event"] == "relay.swept")
        assert swept == ROWS
        assert all(any(e["event"] == "relay.stopped" for e in evs) for evs in events)
