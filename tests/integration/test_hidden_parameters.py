"""A failed statement's error text, as raised and as logged, carries none of the values it wrote."""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
import structlog

from domain.model import AuthMethod
from infra.bootstrap import Services
from infra.credentials.issuing import LocalCredentialIssuer
from infra.credentials.sealing import FernetSealer, generate_seal_key
from infra.db import orm
from infra.logs import configure

pytestmark = pytest.mark.integration


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    configure("INFO", "json")
    yield capsys
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


class TestAFailedCredentialsInsert:
    @pytest.mark.parametrize("violation", ["not_null", "foreign_key"])
    def test_shows_neither_the_secret_hash_nor_the_sealed_secret(
        self, services: Services, json_logs: pytest.CaptureFixture[str], violation: str
    ) -> None:
        # Given a credential's row, with its hash and sealed secret, that the database refuses
        issued = LocalCredentialIssuer().issue(AuthMethod.API_KEY)
        sealed = FernetSealer([generate_seal_key()]).seal(issued.secret)
        row = {
            "id": str(uuid.uuid4()),
            "request_id": str(uuid.uuid4()),  # no such request: a foreign key violation
            "app_id": "no-such-app",
            "kind": AuthMethod.API_KEY.value,
            "public_id": issued.public_id,
            "secret_hash": issued.secret_hash,
            "sealed_secret": sealed,
            "product_ids": ["payments"],
            "rate_limit_per_minute": 60,
            "monthly_quota": None,
            "created_at": datetime.now(UTC),
        }
        if violation == "not_null":
            # PostgreSQL's DETAIL for this one lists every value of the row
            row["kind"] = None

        # When the INSERT fails, and the failure is logged with its traceback
        with pytest.raises(sa.exc.IntegrityError) as raised, services.engine.begin() as connection:
            try:
                connection.execute(orm.credentials.insert().values(**row))
            except sa.exc.IntegrityError:
                structlog.get_logger().exception("credentials.insert_failed")
                raise

        # Then neither the raised error, its traceback, nor the log line holds a value written
        text = "".join(traceback.format_exception(raised.value)) + json_logs.readouterr().err
        assert "parameters hidden" in text
        for value in (
            issued.secret,
            issued.secret_hash,
            issued.secret_hash[7:],
            sealed.decode(),
            sealed.hex(),
        ):
            assert value not in text
        if violation == "not_null":
            assert "Failing row contains (values hidden)" in text
