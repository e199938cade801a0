"""Integration tests publish to queues of their own, which no worker consumes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.bootstrap import Services, build
from infra.settings import Settings
from messages.routes import ROUTES
from tests import services as svc


@pytest.fixture(scope="session")
def integration_settings(settings: Settings) -> Iterator[Settings]:
    # The end-to-end worker pools may be running in this session; they must not act on our rows.
    prefix = f"{settings.queue_prefix}-integration"
    yield settings.model_copy(update={"queue_prefix": prefix})
    svc.delete_queues(settings.broker_url, prefix, [route.queue for route in ROUTES])


@pytest.fixture
def services(integration_settings: Settings) -> Iterator[Services]:
    built = build(integration_settings)
    try:
        yield built
    finally:
        built.broker.close()
        built.close()
