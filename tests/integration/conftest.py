"""Integration tests publish to queues of their own, which no worker consumes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.bootstrap import Services, build, declare_topology
from infra.settings import Settings


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
