"""Integration tests publish to queues of their own, which no worker consumes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from infra.bootstrap import Services, build, declare_topology
from infra.messaging.broker import QuorumRabbitmqBroker, make_broker
from infra.settings import Settings
from messages.routes import NOTIFY
from tests import services as svc


@pytest.fixture(scope="session")
def integration_settings(settings: Settings) -> Settings:
    # The end-to-end worker pools may be running in this session; they must not act on our rows.
    # Under the run's prefix, where the workers' AMQP user may declare (the vhost goes at the end).
    return settings.model_copy(update={"queue_prefix": f"{settings.queue_prefix}.integration"})


@pytest.fixture
def services(integration_settings: Settings) -> Iterator[Services]:
    built = build(integration_settings)
    declare_topology(built)  # the events exchange, for the relay's events to portals
    try:
        yield built
    finally:
        built.broker.close()
        built.close()


@pytest.fixture
def prefix(settings: Settings, broker_url: str) -> Iterator[str]:
    """A queue prefix of this test's own, so that no worker consumes what it publishes."""
    name = f"{settings.queue_prefix}.own-{uuid.uuid4().hex[:6]}"
    yield name
    svc.delete_queues(broker_url, name, [NOTIFY.queue])


@pytest.fixture
def broker(settings: Settings) -> Iterator[QuorumRabbitmqBroker]:
    built = make_broker(settings)
    assert isinstance(built, QuorumRabbitmqBroker)
    try:
        yield built
    finally:
        built.close()
