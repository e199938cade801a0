"""``accessflow keys rotate`` re-seals every sealed secret with the newest seal key, on real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from infra.cli.main import main
from infra.credentials.sealing import FernetSealer, SealKeyMissing, generate_seal_key
from infra.db import migrate, orm
from infra.db.engine import create_engine
from infra.settings import Settings
from tests import rows
from tests import services as svc

pytestmark = pytest.mark.integration


@pytest.fixture
def database(postgres_server: str) -> Iterator[str]:
    """A database of this test's own: rotation touches every row, the session's included."""
    with svc.fresh_database(postgres_server) as url:
        migrate.upgrade(url)
        yield url


def sealed_secrets(url: str) -> dict[str, bytes]:
    engine = create_engine(Settings(database_url=url))
    try:
        with engine.connect() as connection:
            found = connection.execute(
                sa.select(orm.credentials.c.id, orm.credentials.c.sealed_secret).where(
                    orm.credentials.c.sealed_secret.is_not(None)
                )
            )
            return {credential_id: bytes(sealed) for credential_id, sealed in found}
    finally:
        engine.dispose()


def seed(url: str, sealer: FernetSealer, count: int) -> dict[str, str]:
    """``count`` v1 credentials whose secrets ``sealer`` sealed; their secrets by credential id."""
    engine = create_engine(Settings(database_url=url))
    secrets: dict[str, str] = {}
    try:
        with engine.begin() as connection:
            for n in range(count):
                secret = f"af_0000000{n % 10}_{'s' * 40}{n:03d}"
                request_id = rows.insert_request(connection)
                secrets[rows.insert_credential(connection, request_id, sealed_secret=sealer.seal(secret))] = (
                    secret
                )
            # A revealed credential keeps no sealed secret: nothing to re-seal.
            rows.insert_credential(connection, rows.insert_request(connection), sealed_secret=None)
    finally:
        engine.dispose()
    return secrets


def rotate(url: str, seal_key: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        main,
        ["keys", "rotate", *args],
        env={
            "ACCESSFLOW_DATABASE_URL": url,
            "ACCESSFLOW_SEAL_KEY": seal_key,
            "ACCESSFLOW_LOG_FORMAT": "json",
        },
    )
    return result.exit_code, result.output


class TestKeysRotate:
    def test_reseals_with_the_newest_key_in_batches_so_that_it_alone_opens_them(self, database: str) -> None:
        # Given secrets sealed with the old key, more than one batch of them
        old, new = generate_seal_key(), generate_seal_key()
        secrets = seed(database, FernetSealer([old]), count=7)

        # When the new key is put first and the secrets are rotated, 3 per transaction
        code, output = rotate(database, f"{new},{old}", "--batch-size", "3")

        # Then each was re-sealed, and the new key alone opens it
        assert code == 0, output
        assert "re-sealed 7 secret(s) with the newest seal key; 0 already were" in output
        stored = sealed_secrets(database)
        assert {i: FernetSealer([new]).unseal(sealed) for i, sealed in stored.items()} == secrets
        with pytest.raises(SealKeyMissing):
            FernetSealer([old]).unseal(next(iter(stored.values())))

    def test_run_again_changes_nothing(self, database: str) -> None:
        old, new = generate_seal_key(), generate_seal_key()
        seed(database, FernetSealer([old]), count=2)
        assert rotate(database, f"{new},{old}")[0] == 0
        before = sealed_secrets(database)

        code, output = rotate(database, f"{new},{old}")

        assert code == 0 and "re-sealed 0 secret(s) with the newest seal key; 2 already were" in output
        assert sealed_secrets(database) == before

    def test_a_secret_no_key_opens_is_reported_and_left_as_it_is(self, database: str) -> None:
        lost, old, new = generate_seal_key(), generate_seal_key(), generate_seal_key()
        seed(database, FernetSealer([old]), count=1)
        [orphan] = seed(database, FernetSealer([lost]), count=1)
        before = sealed_secrets(database)[orphan]

        code, output = rotate(database, f"{new},{old}")

        assert code == 1
        assert "re-sealed 1 secret(s)" in output and "open with none of the configured keys" in output
        assert orphan in output and sealed_secrets(database)[orphan] == before
