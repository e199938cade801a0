"""A stuck dependency fails fast instead of freezing a worker: every wait has a timeout."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from domain.errors import TransientError
from infra.db.engine import create_engine
from infra.mail.render import EmailRenderer
from infra.mail.transports import SmtpMailer
from infra.settings import Settings
from tests.integration.test_email import reject_email

pytestmark = pytest.mark.integration


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and then never says a word, like a hung SMTP server."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


class TestAStuckSmtpServer:
    def test_is_a_transient_error_after_the_socket_timeout(
        self, settings: Settings, silent_server: int
    ) -> None:
        stuck = settings.model_copy(update={"smtp_port": silent_server, "smtp_timeout_seconds": 1.0})
        # Without the socket timeout this would wait for a greeting forever (pytest-timeout would end it).
        with pytest.raises(TransientError, match="unreachable"):
            SmtpMailer(stuck, EmailRenderer(stuck)).send(reject_email())


class TestASlowQuery:
    def test_is_cancelled_by_the_statement_timeout(self, settings: Settings) -> None:
        engine = create_engine(settings.model_copy(update={"db_statement_timeout_ms": 300}))
        try:
            with (
                engine.connect() as connection,
                pytest.raises(sa.exc.OperationalError, match="statement timeout"),
            ):
                connection.execute(sa.text("SELECT pg_sleep(5)"))
        finally:
            engine.dispose()
