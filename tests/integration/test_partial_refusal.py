"""A message the server took for some recipients and refused for others is recorded as partial.

smtplib goes on with the others when it refuses a recipient, and so does our mailer; it was
recorded as ``sent`` (issue 8, point 4). Against a real aiosmtpd server that refuses one
recipient, and read back with ``accessflow notifications list``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from click.testing import CliRunner

from domain import commands, handlers
from domain.model import DeliveryStatus, NotificationKind
from infra.bootstrap import Services
from infra.cli.main import main
from infra.mail.render import EmailRenderer
from infra.mail.transports import SmtpMailer
from infra.settings import Settings
from tests import services as svc
from tests.conftest import ADMIN
from tests.integration.test_persistence import routed

pytestmark = pytest.mark.integration

GONE = "gone@accessflow.example"


@dataclass
class RefusingSink(svc.SmtpSink):
    """The SMTP sink, refusing the recipients named in ``refuse`` with their reply."""

    refuse: dict[str, str] = field(default_factory=dict)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
def sink() -> Iterator[RefusingSink]:
    from aiosmtpd.controller import Controller

    refusing = RefusingSink(
        port=svc.free_port(), refuse={GONE: "550 5.1.1 <gone@accessflow.example>: no such user"}
    )
    controller = Controller(refusing, hostname=refusing.host, port=refusing.port)
    controller.start()
    try:
        yield refusing
    finally:
        controller.stop()


class TestARecipientRefusedWhileAnotherIsTaken:
    def test_is_recorded_as_partial_naming_who_was_refused_and_listed_so(
        self, services: Services, settings: Settings, sink: RefusingSink
    ) -> None:
        # Given a review email to two admins, one of whom the server does not know
        configured = settings.model_copy(update={"smtp_host": sink.host, "smtp_port": sink.port})
        request_id = routed(services)

        # When it is sent
        status = handlers.send_notification(
            commands.SendNotification(request_id, NotificationKind.REVIEW),
            uow=services.uow(),
            mailer=SmtpMailer(configured, EmailRenderer(configured)),
            admin_emails=(ADMIN, GONE),
            message_id_domain="accessflow.local",
        )

        # Then the known admin got it, and it is recorded as partial, not sent, with the refusal
        assert [recipients for _, recipients in sink.raw_about(request_id)] == [[ADMIN]]
        assert status is DeliveryStatus.PARTIAL
        with services.uow() as uow:
            notification = uow.notifications.get(request_id, NotificationKind.REVIEW)
        assert notification is not None
        assert notification.status is DeliveryStatus.PARTIAL
        assert notification.last_error == (
            f"1 of 2 recipients refused: {GONE} (550 5.1.1 <gone@accessflow.example>: no such user)"
        )

        # And an operator sees it so in the list of partial emails
        env = {"ACCESSFLOW_DATABASE_URL": settings.database_url, "ACCESSFLOW_BROKER_URL": "stub://"}
        listed = CliRunner().invoke(main, ["notifications", "list", "--status", "partial", "--json"], env=env)
        assert listed.exit_code == 0, listed.output
        [row] = [r for r in json.loads(listed.output) if r["request_id"] == request_id]
        assert (row["status"], row["last_error"]) == ("partial", notification.last_error)
        shown = CliRunner().invoke(main, ["notifications", "list", "--status", "partial"], env=env)
        [line] = [line for line in shown.output.splitlines() if request_id in line]
        assert line.split()[1:4] == ["review", "partial", "1"]
        assert f"1 of 2 recipients refused: {GONE}" in line
