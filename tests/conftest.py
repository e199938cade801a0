"""Fixtures shared by the integration and end-to-end tests: real services, isolated per run."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from infra import catalogue_file, migrate
from infra.bootstrap import Services, build
from infra.credentials import generate_seal_key
from infra.settings import Settings
from messages.routes import ROUTES
from tests import services as svc

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TEST_CATALOGUE = Path(__file__).resolve().parent / "catalog.yaml"
ADMIN = "admin@accessflow.example"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    with svc.postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def database_url(postgres_server: str) -> Iterator[str]:
    """A database of this run's own, migrated to head, with the test catalogue loaded."""
    with svc.fresh_database(postgres_server) as url:
        migrate.upgrade(url)
        services = build(Settings(database_url=url, broker_url="stub://"))
        try:
            catalogue_file.load(catalogue_file.read(TEST_CATALOGUE), services.uow())
        finally:
            services.close()
        yield url


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    with svc.rabbitmq_server() as url:
        yield url


@pytest.fixture(scope="session")
def queue_prefix(broker_url: str) -> Iterator[str]:
    """Queue names of this run's own, deleted afterwards."""
    prefix = f"aftest-{uuid.uuid4().hex[:10]}"
    yield prefix
    svc.delete_queues(broker_url, prefix, [route.queue for route in ROUTES])


@pytest.fixture(scope="session")
def smtp() -> Iterator[svc.SmtpSink]:
    with svc.smtp_sink() as sink:
        yield sink


@pytest.fixture(scope="session")
def seal_key() -> str:
    return generate_seal_key()


@pytest.fixture(scope="session")
def settings(
    database_url: str, broker_url: str, queue_prefix: str, smtp: svc.SmtpSink, seal_key: str
) -> Settings:
    return Settings(
        database_url=database_url,
        broker_url=broker_url,
        queue_prefix=queue_prefix,
        smtp_host=smtp.host,
        smtp_port=smtp.port,
        seal_key=SecretStr(seal_key),
        admin_emails=[ADMIN],
        min_backoff_ms=100,
        max_backoff_ms=1_000,
        max_retries=3,
        outbox_sweep_seconds=1.0,
    )


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    built = build(settings)
    try:
        yield built
    finally:
        built.broker.close()
        built.close()
