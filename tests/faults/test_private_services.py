"""The private-service harness does what fault tests will rely on.

Each test starts its own RabbitMQ node or PostgreSQL cluster, does violence to it, and
checks what survives. Around every test a fixture checks that the shared services on
5432 and 5672 are exactly as up as they were before: the harness must never touch them.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pika.exceptions
import pytest
import sqlalchemy as sa

from tests.faults.private_services import (
    OWNER_FILE,
    POSTGRES_BIN,
    RABBITMQ_DIR_PREFIX,
    PrivatePostgres,
    PrivateRabbitMQ,
    _is_stale,
    _make_workdir,
    epmd_names,
    pid_alive,
    reap_stale_services,
    run_command,
)
from tests.services import IN_CI

pytestmark = [pytest.mark.faults]

# Skipped on a laptop without the server binaries; with CI=true they run, and fail, instead.
needs_rabbitmq = pytest.mark.skipif(
    PrivateRabbitMQ.available() is not None and not IN_CI,
    reason=f"no private RabbitMQ: {PrivateRabbitMQ.available()}",
)
needs_postgres = pytest.mark.skipif(
    PrivatePostgres.available() is not None and not IN_CI,
    reason=f"no private PostgreSQL: {PrivatePostgres.available()}",
)

SHARED_POSTGRES_PORT = 5432
SHARED_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


# --------------------------------------------------------------------------------------
# The shared services must come out of every test as they went in


def shared_postgres_up() -> bool:
    argv = [str(POSTGRES_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(SHARED_POSTGRES_PORT), "-t", "5"]
    return run_command(argv, timeout=15.0).returncode == 0


def shared_rabbitmq_up() -> bool:
    parameters = pika.URLParameters(SHARED_RABBITMQ_URL)
    parameters.socket_timeout = 5
    parameters.connection_attempts = 1
    try:
        pika.BlockingConnection(parameters).close()
    except (pika.exceptions.AMQPError, OSError):
        return False
    return True


def shared_node_registered() -> bool:
    return "rabbit" in epmd_names()


@pytest.fixture(autouse=True)
def shared_services_untouched() -> Iterator[None]:
    """Fail the test if a shared service that was up before it is down after it.

    A service that was already down (a machine without them) has nothing to lose.
    """
    checks = {
        "PostgreSQL on 127.0.0.1:5432": shared_postgres_up,
        "RabbitMQ on 127.0.0.1:5672": shared_rabbitmq_up,
        "rabbit@localhost registered with epmd": shared_node_registered,
    }
    before = {name: check() for name, check in checks.items()}
    yield
    lost = [name for name, check in checks.items() if before[name] and not check()]
    assert not lost, f"the test took down shared services: {lost}"


# --------------------------------------------------------------------------------------
# RabbitMQ


def declare_durable_queue(url: str, queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_declare(queue=queue, durable=True)
    finally:
        connection.close()


def publish_persistent(url: str, queue: str, body: bytes) -> None:
    """Publish with publisher confirms: when this returns, the broker has the message on disk."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue=queue, durable=True)
        channel.basic_publish(
            exchange="",
            routing_key=queue,
            body=body,
            properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
            mandatory=True,
        )
    finally:
        connection.close()


def get_all(url: str, queue: str) -> list[bytes]:
    """Take every message from ``queue`` (which must exist: passive declare)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue=queue, durable=True, passive=True)
        bodies: list[bytes] = []
        while True:
            method, _properties, body = channel.basic_get(queue=queue, auto_ack=True)
            if method is None:
                return bodies
            bodies.append(body)
    finally:
        connection.close()


def wait_for_broker_close(connection: pika.BlockingConnection, timeout: float = 30.0) -> None:
    """Pump the connection's I/O until the broker's close (or the lost socket) surfaces.

    Raises what pika raises; returns only if nothing happened within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.2)


@needs_rabbitmq
def test_a_persistent_message_survives_kill9_of_the_node() -> None:
    with PrivateRabbitMQ() as rabbit:
        declare_durable_queue(rabbit.url, "fault.durable")
        # Without this the queue itself is lost in about 1 kill of 10 (see sync_metadata).
        rabbit.sync_metadata()
        publish_persistent(rabbit.url, "fault.durable", b"survives kill -9")
        old_pid = rabbit.pid

        rabbit.kill9()
        assert old_pid is not None
        assert not pid_alive(old_pid)
        assert not rabbit.amqp_ok()
        assert rabbit.short_name not in epmd_names()

        rabbit.start()  # same mnesia directory, same node name and ports
        assert rabbit.pid != old_pid
        assert get_all(rabbit.url, "fault.durable") == [b"survives kill -9"]


@needs_rabbitmq
def test_close_all_connections_drops_a_client_and_new_ones_work() -> None:
    with PrivateRabbitMQ() as rabbit:
        connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
        try:
            connection.channel().queue_declare(queue="fault.connections", durable=True)

            rabbit.close_all_connections("fault test")

            with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
                wait_for_broker_close(connection)
            assert closed.value.reply_code == 320  # CONNECTION_FORCED
            assert "fault test" in closed.value.reply_text
            assert not connection.is_open
        finally:
            if connection.is_open:
                connection.close()

        assert rabbit.amqp_ok()


@needs_rabbitmq
def test_stop_app_cuts_clients_off_and_start_app_brings_the_broker_back() -> None:
    with PrivateRabbitMQ() as rabbit:
        publish_persistent(rabbit.url, "fault.app", b"kept over stop_app")
        connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
        try:
            rabbit.stop_app()
            with pytest.raises(pika.exceptions.AMQPConnectionError):
                wait_for_broker_close(connection)
        finally:
            if connection.is_open:
                connection.close()
        assert not rabbit.amqp_ok()
        assert rabbit.pid is not None and pid_alive(rabbit.pid)  # the VM stays up

        rabbit.start_app()
        assert get_all(rabbit.url, "fault.app") == [b"kept over stop_app"]


@needs_rabbitmq
def test_a_node_left_by_a_crashed_run_does_not_block_its_name() -> None:
    name = f"accessflow-fault-crash-{uuid.uuid4().hex[:6]}"
    orphan = PrivateRabbitMQ(name=name)
    orphan.start()
    try:
        assert orphan.workdir is not None and orphan.pid is not None
        orphan_dir, orphan_pid = orphan.workdir, orphan.pid
        # As if the test process that started it had died without cleaning up.
        (orphan_dir / OWNER_FILE).write_text(f"{dead_pid()}\n")

        with PrivateRabbitMQ(name=name) as fresh:
            assert fresh.amqp_ok()
            assert not pid_alive(orphan_pid)
            assert not orphan_dir.exists()
    finally:
        orphan.close()


def test_a_fresh_directory_whose_owner_is_half_written_is_not_stale() -> None:
    workdir = _make_workdir(RABBITMQ_DIR_PREFIX)
    try:
        (workdir / OWNER_FILE).write_text("")  # opened, truncated, not yet written
        assert not _is_stale(workdir)
        (workdir / OWNER_FILE).write_text(f"{dead_pid()}\n")
        assert _is_stale(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_reaper_running_beside_new_directories_never_removes_one() -> None:
    """A cluster's nodes prepare side by side; one node's reap must not take another's fresh directory.

    It did once (CI, fault case 10): the reaper read an owner file that was opened but not
    yet written, took the empty PID for a dead owner, and removed the directory.
    """
    made: list[Path] = []
    stop = threading.Event()

    def reap_until_stopped() -> None:
        while not stop.is_set():
            reap_stale_services()

    reaper = threading.Thread(target=reap_until_stopped)
    reaper.start()
    try:
        for _ in range(300):
            made.append(_make_workdir(RABBITMQ_DIR_PREFIX))
    finally:
        stop.set()
        reaper.join()
        survivors = [path for path in made if path.is_dir()]
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
    assert len(survivors) == len(made)


# --------------------------------------------------------------------------------------
# PostgreSQL


def make_table_with_a_row(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE fault_rows (id integer PRIMARY KEY, note text NOT NULL)"))
        connection.execute(sa.text("INSERT INTO fault_rows VALUES (1, 'committed before the crash')"))


def notes(engine: sa.Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(sa.text("SELECT note FROM fault_rows ORDER BY id")).scalars())


@needs_postgres
def test_a_committed_row_survives_an_immediate_restart_and_old_connections_fail() -> None:
    with PrivatePostgres() as postgres:
        engine = sa.create_engine(postgres.url)
        try:
            make_table_with_a_row(engine)
            stale = engine.connect()
            try:
                assert stale.execute(sa.text("SELECT 1")).scalar_one() == 1

                postgres.restart_immediate()

                with pytest.raises(sa.exc.OperationalError):
                    stale.execute(sa.text("SELECT 1"))
            finally:
                stale.close()
            assert notes(engine) == ["committed before the crash"]  # a new connection works
        finally:
            engine.dispose()


@needs_postgres
def test_a_committed_row_survives_kill9_of_the_postmaster() -> None:
    with PrivatePostgres() as postgres:
        engine = sa.create_engine(postgres.url)
        try:
            make_table_with_a_row(engine)
            engine.dispose()  # no pooled connection into the crash
            old_pid = postgres.postmaster_pid()

            postgres.kill9()
            assert old_pid is not None and not pid_alive(old_pid)
            assert postgres.postmaster_pid() is None

            postgres.start()
            assert notes(engine) == ["committed before the crash"]
        finally:
            engine.dispose()


@needs_postgres
def test_a_cluster_left_by_a_crashed_run_does_not_block_its_port() -> None:
    orphan = PrivatePostgres()
    orphan.start()
    try:
        assert orphan.workdir is not None
        orphan_dir, orphan_pid = orphan.workdir, orphan.postmaster_pid()
        assert orphan_pid is not None
        (orphan_dir / OWNER_FILE).write_text(f"{dead_pid()}\n")

        with PrivatePostgres(port=orphan.port) as fresh:
            engine = sa.create_engine(fresh.url)
            try:
                make_table_with_a_row(engine)  # a fresh cluster: the table did not exist
            finally:
                engine.dispose()
            assert not pid_alive(orphan_pid)
            assert not orphan_dir.exists()
    finally:
        orphan.close()


def dead_pid() -> int:
    """The PID of a process that has just exited (and been reaped by us)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
