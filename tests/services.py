"""Finding the real services the tests need, and making each run its own database and queues.

Order of preference for each service: the URL in ``ACCESSFLOW_TEST_*``; the local
service on its standard port; a testcontainers container where a Docker engine
exists. With ``CI=true`` a service that cannot be had fails the run; elsewhere the
tests that need it are skipped with the reason.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, TypeVar

import pika
import pytest
import sqlalchemy as sa

from domain.model import Plan
from domain.rules import parse_rules
from infra.settings import split_broker_urls
from messages import routes

if TYPE_CHECKING:
    from infra.bootstrap import Services

LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
LOCAL_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/%2F"
T = TypeVar("T")

IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(reason)


def _postgres_reachable(url: str) -> bool:
    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


def _rabbitmq_reachable(url: str) -> bool:
    try:
        parameters = pika.URLParameters(url)
        parameters.socket_timeout = 3
        pika.BlockingConnection(parameters).close()
        return True
    except pika.exceptions.AMQPError:
        return False


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        return True
    except Exception:
        return False


@contextmanager
def postgres_server() -> Iterator[str]:
    """A URL of a PostgreSQL server where we may create databases."""
    explicit = os.environ.get("ACCESSFLOW_TEST_DATABASE_URL")
    if explicit:
        if not _postgres_reachable(explicit):
            unavailable(f"ACCESSFLOW_TEST_DATABASE_URL={explicit} is not reachable")
        yield explicit
    elif _postgres_reachable(LOCAL_POSTGRES):
        yield LOCAL_POSTGRES
    elif _docker_available():
        from testcontainers.postgres import PostgresContainer  # type: ignore[import-untyped]

        with PostgresContainer("postgres:16", driver="psycopg") as container:
            yield container.get_connection_url()
    else:
        unavailable(
            "no PostgreSQL: set ACCESSFLOW_TEST_DATABASE_URL, start one on 127.0.0.1:5432, or run Docker"
        )
        yield ""  # unreachable: unavailable() raises


@contextmanager
def rabbitmq_server() -> Iterator[str]:
    explicit = os.environ.get("ACCESSFLOW_TEST_BROKER_URL")
    if explicit:
        if not _rabbitmq_reachable(explicit):
            unavailable(f"ACCESSFLOW_TEST_BROKER_URL={explicit} is not reachable")
        yield explicit
    elif _rabbitmq_reachable(LOCAL_RABBITMQ):
        yield LOCAL_RABBITMQ
    elif _docker_available():
        from testcontainers.rabbitmq import RabbitMqContainer  # type: ignore[import-untyped]

        with RabbitMqContainer("rabbitmq:3.13") as container:
            p = container.get_connection_params()
            yield f"amqp://guest:guest@{p.host}:{p.port}/%2F"
    else:
        unavailable("no RabbitMQ: set ACCESSFLOW_TEST_BROKER_URL, start one on 127.0.0.1:5672, or run Docker")
        yield ""


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """Create a database of our own on the server, and drop it afterwards."""
    name = f"accessflow_test_{uuid.uuid4().hex[:12]}"
    # No pool: the fault suite restarts the server in between, which would break a pooled connection.
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def amqp_parameters(broker_url: str) -> list[pika.URLParameters]:
    """pika's parameters for ``broker_url``: one node's URL, or a cluster's, comma-separated."""
    return [pika.URLParameters(url) for url in split_broker_urls(broker_url)]


def delete_queues(broker_url: str, prefix: str, queues: list[str]) -> None:
    connection = pika.BlockingConnection(amqp_parameters(broker_url))
    try:
        channel = connection.channel()
        for queue in queues:
            for name in (f"{prefix}.{queue}", f"{prefix}.{queue}.DQ", f"{prefix}.{queue}.XQ"):
                channel.queue_delete(queue=name)
    finally:
        connection.close()


def queue_depth(broker_url: str, queue_name: str) -> int:
    connection = pika.BlockingConnection(amqp_parameters(broker_url))
    try:
        channel = connection.channel()
        try:
            return int(channel.queue_declare(queue=queue_name, passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker:
            return 0
    finally:
        connection.close()


def consumers_on(broker_url: str, queue_name: str) -> int:
    connection = pika.BlockingConnection(amqp_parameters(broker_url))
    try:
        return int(connection.channel().queue_declare(queue=queue_name, passive=True).method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if connection.is_open:
            connection.close()


def envelope(queue_name: str, actor_name: str, payload: Any, message_id: str | None = None) -> bytes:
    """Dramatiq's envelope, built by hand the way a portal in another language would."""
    return json.dumps(
        {
            "queue_name": queue_name,
            "actor_name": actor_name,
            "args": [payload],
            "kwargs": {},
            "options": {},
            "message_id": message_id or str(uuid.uuid4()),
            "message_timestamp": int(datetime.now(UTC).timestamp() * 1000),
        }
    ).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SmtpSink:
    """A real SMTP server (aiosmtpd) on loopback that keeps what it receives.

    ``fail_next`` queues SMTP replies (such as ``"451 try later"``) for the next DATA commands.
    """

    host: str = "127.0.0.1"
    port: int = 0
    messages: list[EmailMessage] = field(default_factory=list)
    fail_next: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The bytes of each message in ``messages`` exactly as the client sent them after DATA.
    raw: list[bytes] = field(default_factory=list)
    #: The envelope's RCPT TO addresses of each message in ``messages``, in the same order.
    envelope_recipients: list[list[str]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            if self.fail_next:
                return self.fail_next.pop(0)
            parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            self.messages.append(parsed)
            # Kept beside the parsed message: what a header check must read is the bytes, not a reparse.
            self.raw.append(envelope.original_content)
            self.envelope_recipients.append(list(envelope.rcpt_tos))
        return "250 OK"

    def received(self, predicate: Callable[[EmailMessage], bool] = lambda m: True) -> list[EmailMessage]:
        with self.lock:
            return [m for m in self.messages if predicate(m)]

    def about(self, request_id: str) -> list[EmailMessage]:
        return self.received(lambda m: m["X-Accessflow-Request-Id"] == request_id)

    def raw_about(self, request_id: str) -> list[tuple[bytes, list[str]]]:
        """The raw bytes and the RCPT TO list of each message whose X-Accessflow-Request-Id is ``request_id``."""
        with self.lock:
            return [
                (raw, recipients)
                for message, raw, recipients in zip(
                    self.messages, self.raw, self.envelope_recipients, strict=True
                )
                if message["X-Accessflow-Request-Id"] == request_id
            ]


@contextmanager
def smtp_sink() -> Iterator[SmtpSink]:
    from aiosmtpd.controller import Controller

    sink = SmtpSink(port=free_port())
    controller = Controller(sink, hostname=sink.host, port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()


def poll_until(check: Callable[[], T], *, timeout: float, what: str, interval: float = 0.25) -> T:
    """Call ``check`` until it returns something truthy and return that; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)  # the poll interval of a wait with a deadline


def wait_until(
    condition: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test with ``what`` after ``timeout`` s."""
    try:
        return poll_until(condition, timeout=timeout, what=what or str(condition), interval=interval)
    except TimeoutError as timed_out:
        pytest.fail(str(timed_out), pytrace=False)


@dataclass
class RecordingWire:
    """A producer's wire that keeps every message it is given, as the broker would have received it."""

    sent: list[tuple[routes.Route, str, dict[str, Any]]] = field(default_factory=list)

    def send(self, route: routes.Route, *, routing_key: str, payload: Mapping[str, Any]) -> str:
        self.sent.append((route, routing_key, dict(payload)))
        return str(uuid.uuid4())

    def decisions(self) -> list[dict[str, Any]]:
        return [payload for route, _, payload in self.sent if route == routes.DECIDE]

    def bulk_decisions(self) -> list[dict[str, Any]]:
        return [payload for route, _, payload in self.sent if route == routes.DECIDE_BULK]


def plan_with(
    services: Services,
    *,
    auto_approve: bool = False,
    rules: list[dict[str, Any]] | None = None,
    max_open: int | None = None,
    max_per_hour: int | None = None,
) -> str:
    """A plan of the test's own, stored as a catalogue load stores one; its id.

    Its own, so that no other test's requests count against its throttles; stored through the
    catalogue, so that the workers' caches see it as they see a loaded one.
    """
    plan_id = f"p-{uuid.uuid4().hex[:12]}"
    with services.uow() as uow:
        uow.catalogue.upsert(
            Plan(
                id=plan_id,
                name="Rules under test",
                auto_approve=auto_approve,
                rate_limit_per_minute=60,
                monthly_quota=None,
                product_ids=["payments", "ledger"],
                rules=parse_rules(rules or []),
                max_open_requests_per_consumer=max_open,
                max_requests_per_consumer_per_hour=max_per_hour,
            )
        )
        uow.commit()
    return plan_id
