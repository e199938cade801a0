"""Unit tests run on the plain domain classes, whatever ran before them in this process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.db import orm


@pytest.fixture(scope="module", autouse=True)
def plain_domain_classes() -> Iterator[None]:
    # The imperative mapping instruments the domain classes process-wide; an integration test
    # that ran earlier would leave them instrumented, and the fakes copy objects the ORM way then.
    orm.clear_mappers()
    yield
