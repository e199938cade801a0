"""``accessflow workers`` as real processes, against the run's own database, queues and SMTP sink."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import sqlalchemy as sa

from domain.model import Status
from infra.bootstrap import Services
from infra.credentials.sealing import open_sealed_secret
from infra.db import orm
from infra.messaging.topology import Topology
from infra.settings import Settings
from messages.routes import DECIDE, QUEUE_ROUTES, SUBMIT, Route
from tests import services as svc
from tests.conftest import Boundary, Parties, PortalParty
from tests.gateway import GatewayServer, gateway_server, new_secret
from tests.services import consumers_on

ACCESSFLOW = str(Path(sys.executable).with_name("accessflow"))


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process see ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCESSFLOW_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, list):
            value = ",".join(value)
        env[f"ACCESSFLOW_{name.upper()}"] = str(value)
    env["ACCESSFLOW_LOG_FORMAT"] = "json"
    return env


@pytest.fixture(scope="session")
def gateway() -> Iterator[GatewayServer]:
    """The API gateway the session's pools push every credential change to: a real HTTP server."""
    with gateway_server() as server:
        yield server


@pytest.fixture(scope="session")
def gateway_secret() -> str:
    return new_secret()


@pytest.fixture(scope="session")
def env(settings: Settings, gateway: GatewayServer, gateway_secret: str) -> dict[str, str]:
    # With a gateway configured, as a deployment that has one: every credential issued is pushed.
    return {
        **settings_env(settings),
        "ACCESSFLOW_GATEWAY_WEBHOOK_URL": gateway.url,
        "ACCESSFLOW_GATEWAY_WEBHOOK_SECRET": gateway_secret,
    }


#: The session's pools, as ops would run them: one for routing and decisions, one for credentials, email and the gateway.
POOLS = [("requests", "decisions"), ("credentials", "notifications", "gateway")]


@pytest.fixture(scope="session")
def pool_ports() -> dict[tuple[str, ...], int]:
    """The metrics and health port of each of the session's pools (ACCESSFLOW_METRICS_PORT)."""
    return {queues: svc.free_port() for queues in POOLS}


@pytest.fixture(scope="session")
def worker_pools(
    env: dict[str, str],
    settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
    portal: PortalClient,
    other_portal: PortalClient,
    pool_ports: dict[tuple[str, ...], int],
) -> Iterator[Path]:
    """Two pools, as ops would run them: one for routing and decisions, one for credentials and email."""
    logs = tmp_path_factory.mktemp("worker-logs")
    processes = []
    for queues in POOLS:
        argv = [ACCESSFLOW, "workers", "--processes", "1", "--threads", "4"]
        for q in queues:
            argv += ["--queues", q]
        log_file = (logs / f"{'-'.join(queues)}.log").open("w")
        pool_env = {**env, "ACCESSFLOW_METRICS_PORT": str(pool_ports[queues])}
        processes.append(
            (subprocess.Popen(argv, env=pool_env, stdout=log_file, stderr=subprocess.STDOUT), log_file)
        )
    try:
        for route in QUEUE_ROUTES:
            name = route.queue_name(settings.queue_prefix)
            svc.wait_until(
                lambda n=name: consumers_on(settings.broker_url, n) > 0,
                timeout=60,
                what=f"a consumer on {name}",
            )
        yield logs
    finally:
        for process, _ in processes:
            process.send_signal(signal.SIGTERM)
        for process, log_file in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            log_file.close()


def env_as(env: dict[str, str], broker_url: str, **extra: str) -> dict[str, str]:
    """The same environment, speaking to RabbitMQ as another AMQP user."""
    return {**env, "ACCESSFLOW_BROKER_URL": broker_url, **extra}


@pytest.fixture(scope="session")
def admin_env(env: dict[str, str], boundary: Boundary, parties: Parties) -> dict[str, str]:
    """The admin tool: its own AMQP user (it may publish decisions only) and the admin's signing key."""
    return env_as(
        env,
        boundary.url(boundary.accounts.admin_tool),
        ACCESSFLOW_ADMIN_KEY_FILE=str(parties.admin_key_file),
        ACCESSFLOW_ADMIN_KEY_ID=parties.admin_key_id,
    )


@pytest.fixture(scope="session")
def ops_env(env: dict[str, str], boundary: Boundary) -> dict[str, str]:
    """An operator's CLI: the ops AMQP user, which may read the dead-letter queues and replay them."""
    return env_as(env, boundary.url(boundary.accounts.ops))


class PortalClient:
    """A developer portal as another team would build it: plain AMQP, its own user and queue.

    It reads the events queue accessflow made for it, and keeps every event it receives.
    """

    def __init__(self, party: PortalParty, boundary: Boundary, prefix: str, env: dict[str, str]) -> None:
        self.party = party
        self.user = boundary.accounts.portals[party.id]
        self.url = boundary.url(self.user)
        self.topology = Topology(prefix)
        self.prefix = prefix
        self.env = env_as(env, self.url)
        self.queue = self.topology.portal_events_queue(party.id)
        self.received: list[dict[str, Any]] = []
        self._connect()

    def _connect(self) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(self.url))
        channel = self.connection.channel()
        # accessflow made the queue and its binding (broker setup); the portal may only read it.
        channel.queue_declare(queue=self.queue, passive=True)
        self.channel = channel

    def submit(self, payload: dict[str, Any], **publish: Any) -> str:
        """Publish a v2 submission, as this portal; return its request id."""
        body = svc.envelope(
            SUBMIT.queue_name(self.prefix),
            SUBMIT.actor_name,
            {"version": 2, "portal_id": self.party.id, **payload},
        )
        self.publish(body, **publish)
        return str(payload["request_id"])

    def publish(
        self,
        body: bytes,
        *,
        exchange: str | None = None,
        routing_key: str | None = None,
        user_id: str | bool | None = True,
        message_id: str | None = None,
        **properties: Any,
    ) -> None:
        """Publish raw bytes, by default to the submissions exchange under this portal's id and user."""
        publish_raw(
            self.url,
            body,
            exchange=self.topology.submissions_exchange if exchange is None else exchange,
            routing_key=self.party.id if routing_key is None else routing_key,
            user_id=self.user if user_id is True else (user_id or None),
            message_id=message_id,
            **properties,
        )

    def events(self, request_id: str) -> list[dict[str, Any]]:
        """Every event received so far about ``request_id``, in arrival order (after draining the queue)."""
        while True:
            try:
                method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelWrongStateError):
                # Idle between tests, pika answers no heartbeats, and RabbitMQ drops the connection
                # in a long session; the events wait in the queue, so a new one reads them.
                self._connect()
                continue
            if method is None:
                break
            event = json.loads(body)
            event["_amqp"] = {"routing_key": method.routing_key, "message_id": properties.message_id}
            self.received.append(event)
        return [e for e in self.received if e.get("request_id") == request_id]

    def wait_for_events(self, request_id: str, *names: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Wait until events with each of ``names`` arrived for the request; return them all."""

        def arrived() -> list[dict[str, Any]]:
            events = self.events(request_id)
            return events if set(names) <= {e["event"] for e in events} else []

        found: list[dict[str, Any]] = svc.wait_until(
            arrived, timeout=timeout, what=f"events {', '.join(names)} about {request_id}"
        )
        return found

    def open(self, sealed_value: str) -> str:
        """Open a sealed secret with this portal's private key."""
        return open_sealed_secret(self.party.private_key, sealed_value)

    def close(self) -> None:
        # The broker may have dropped it already: pika services heartbeats only while the
        # connection is used, and a long session leaves it idle past the heartbeat timeout.
        with contextlib.suppress(pika.exceptions.AMQPError):
            if self.connection.is_open:
                self.connection.close()


@pytest.fixture(scope="session")
def portal(
    parties: Parties, boundary: Boundary, queue_prefix: str, env: dict[str, str]
) -> Iterator[PortalClient]:
    """Acme's portal (speaks for consumer acme)."""
    client = PortalClient(parties.portal, boundary, queue_prefix, env)
    yield client
    client.close()


@pytest.fixture(scope="session")
def other_portal(
    parties: Parties, boundary: Boundary, queue_prefix: str, env: dict[str, str]
) -> Iterator[PortalClient]:
    """Globex's portal (speaks for consumer globex)."""
    client = PortalClient(parties.other_portal, boundary, queue_prefix, env)
    yield client
    client.close()


def cli(
    env: dict[str, str], *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [ACCESSFLOW, *args], env=env, capture_output=True, text=True, input=stdin, timeout=60
    )
    if check and result.returncode != 0:
        pytest.fail(f"accessflow {' '.join(args)} exited {result.returncode}: {result.stderr}", pytrace=False)
    return result


def request_payload(**overrides: Any) -> dict[str, Any]:
    """A v1-shaped request body; :meth:`PortalClient.submit` makes it v2, naming the portal."""
    payload: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "consumer": {"id": "acme", "email": "dev@acme.example", "name": "Acme Developers"},
        "app_id": "acme-checkout",
        "product_ids": ["payments"],
        "plan_id": "starter",
        "justification": "testing",
        "submitted_at": datetime.now(UTC).isoformat(),
    }
    payload.update(overrides)
    return payload


def publish_raw(
    broker_url: str,
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    user_id: str | None = None,
    message_id: str | None = None,
    **properties: Any,
) -> None:
    """Publish bytes with plain pika and publisher confirms: no dramatiq on this side.

    Raises whatever pika raises when the broker refuses (an unroutable message, a channel
    closed for a permission or a ``user_id`` that is not the connection's).
    """
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                user_id=user_id,
                message_id=message_id,
                **properties,
            ),
            mandatory=True,
        )
    finally:
        if connection.is_open:
            connection.close()


def publish_decision(
    boundary: Boundary, prefix: str, decision: dict[str, Any], *, user: str | None = None
) -> None:
    """Publish a decision payload as the admin tool does (or as ``user``), to the decisions exchange."""
    user = user or boundary.accounts.admin_tool
    body = svc.envelope(DECIDE.queue_name(prefix), DECIDE.actor_name, decision)
    publish_raw(
        boundary.url(user),
        body,
        exchange=Topology(prefix).decisions_exchange,
        routing_key=str(decision.get("admin_id", "admin")),
        user_id=user,
    )


def publish_internal(
    boundary: Boundary, route: Route, prefix: str, payload: dict[str, Any], *, user: str
) -> None:
    """Publish straight to a work queue through the default exchange, as ``user``."""
    queue = route.queue_name(prefix)
    publish_raw(
        boundary.url(user),
        svc.envelope(queue, route.actor_name, payload),
        exchange="",
        routing_key=queue,
        user_id=user,
    )


def status_of(services: Services, request_id: str) -> Status | None:
    with services.uow() as uow:
        request = uow.requests.get(request_id)
        return request.status if request else None


def wait_for_status(services: Services, request_id: str, *expected: Status, timeout: float = 30) -> Status:
    status: Status = svc.wait_until(
        lambda: (s := status_of(services, request_id)) in expected and s,
        timeout=timeout,
        what=f"request {request_id} to reach {', '.join(expected)}",
    )
    return status


def outbox_drained(services: Services) -> bool:
    with services.engine.connect() as connection:
        unsent = connection.execute(
            sa.select(sa.func.count()).select_from(orm.outbox).where(orm.outbox.c.sent_at.is_(None))
        ).scalar_one()
    return unsent == 0
