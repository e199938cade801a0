"""Fault tests: they kill and restart private RabbitMQ and PostgreSQL instances, never the shared ones."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # Registered here as well as (eventually) in pyproject, so that --strict-markers accepts
    # it either way; registering a marker twice is harmless.
    config.addinivalue_line("markers", "faults: kills and restarts private RabbitMQ/PostgreSQL instances")
