"""``accessflow workers`` as real processes, against the run's own database, queues and SMTP sink."""

from __future__ import annotations

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
import pytest
import sqlalchemy as sa

from domain.model import Status
from infra import orm
from infra.bootstrap import Services
from infra.settings import Settings
from messages.routes import ROUTES
from tests import services as svc
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
def env(settings: Settings) -> dict[str, str]:
    return settings_env(settings)


@pytest.fixture(scope="session")
def worker_pools(
    env: dict[str, str], settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """Two pools, as ops would run them: one for routing and decisions, one for credentials and email."""
    logs = tmp_path_factory.mktemp("worker-logs")
    pools = [("requests", "decisions"), ("credentials", "notifications")]
    processes = []
    for queues in pools:
        argv = [ACCESSFLOW, "workers", "--processes", "1", "--threads", "4"]
        for q in queues:
            argv += ["--queues", q]
        log_file = (logs / f"{'-'.join(queues)}.log").open("w")
        processes.append(
            (subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT), log_file)
        )
    try:
        for route in ROUTES:
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


def publish_raw(broker_url: str, queue_name: str, body: bytes) -> None:
    """Publish bytes with plain pika: no dramatiq on this side."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange="",
            routing_key=queue_name,
            body=body,
            properties=pika.BasicProperties(content_type="application/json", delivery_mode=2),
            mandatory=True,
        )
    finally:
        connection.close()


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
