"""A slow SMTP server cannot stretch a send past its lease (issue 8, point 4).

The socket timeout bounds one wait; a server that answers each command just in time kept a
send going for as long as it liked. The lease that keeps a redelivery from sending a second
copy ran out meanwhile, and the redelivery sent one. Each send now has a deadline over all its
steps, and the lease is longer than the deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from domain import commands, handlers
from domain.errors import TransientError
from domain.model import DeliveryStatus, NotificationKind, utcnow
from infra.bootstrap import Services
from infra.mail import transports as infra_email
from infra.mail.render import EmailRenderer
from infra.mail.transports import SmtpMailer
from infra.settings import Settings
from tests import services as svc
from tests.conftest import ADMIN
from tests.integration.test_persistence import routed
from tests.integration.test_smtp_connections import an_email

pytestmark = pytest.mark.integration


@dataclass
class SlowSmtpServer:
    """A real SMTP server on loopback that waits ``delay`` seconds before each reply on its first
    ``slow_connections`` connections, and answers the later ones at once.

    It keeps a message once it has read all of it (the final dot), as a real server does: from
    then on, a client that gives up cannot take it back.
    """

    delay: float
    slow_connections: int = 1
    host: str = "127.0.0.1"
    port: int = 0
    messages: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopped: threading.Event = field(default_factory=threading.Event)
    connections: int = 0
    #: Slow on every connection from now on, the ones already open included.
    everything_slow: bool = False

    def serve(self, listener: socket.socket) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # the listener was closed: the test is over
            with self.lock:
                self.connections += 1
                slow = self.connections <= self.slow_connections
            threading.Thread(target=self._session, args=(connection, slow), daemon=True).start()

    def _session(self, connection: socket.socket, slow: bool) -> None:
        with connection, connection.makefile("rb") as lines:

            def reply(text: str) -> None:
                if slow or self.everything_slow:
                    self.stopped.wait(self.delay)  # the server's slowness, not a wait of the test
                connection.sendall(text.encode() + b"\r\n")

            try:
                reply("220 slow.example ESMTP")
                while line := lines.readline():
                    verb = line.split(b" ", 1)[0].strip().upper()
                    if verb in (b"EHLO", b"HELO"):
                        reply("250 slow.example")
                    elif verb == b"DATA":
                        reply("354 go ahead")
                        body = b""
                        while (chunk := lines.readline()) not in (b".\r\n", b""):
                            body += chunk
                        with self.lock:
                            self.messages.append(body)
                        reply("250 2.0.0 queued")
                    elif verb == b"QUIT":
                        reply("221 bye")
                        return
                    else:  # MAIL, RCPT, NOOP, RSET
                        reply("250 ok")
            except OSError:
                return  # the client hung up

    def copies(self, message_id: str) -> int:
        with self.lock:
            return sum(1 for body in self.messages if f"Message-ID: {message_id}".encode() in body)


@pytest.fixture
def slow_server() -> Iterator[SlowSmtpServer]:
    # 1.5 s before each reply: every wait is well inside the 5 s socket timeout, but the six
    # replies of one send (greeting, EHLO, MAIL, RCPT, DATA, the final dot) take 9 s.
    server = SlowSmtpServer(delay=1.5)
    with socket.socket() as listener:
        listener.bind((server.host, 0))
        listener.listen(8)
        server.port = listener.getsockname()[1]
        thread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
        thread.start()
        try:
            yield server
        finally:
            server.stopped.set()
            listener.close()
    thread.join(timeout=10)


def deadline_settings(settings: Settings, server: SlowSmtpServer) -> Settings:
    return Settings(
        smtp_host=server.host,
        smtp_port=server.port,
        smtp_timeout_seconds=5,
        smtp_send_deadline_seconds=2,
        email_lease_seconds=7.0,
        database_url=settings.database_url,
    )


class TestASlowSmtpServer:
    def test_cannot_keep_a_send_past_its_lease_so_a_redelivery_sends_no_second_copy(
        self, services: Services, settings: Settings, slow_server: SlowSmtpServer
    ) -> None:
        # Given a review email, and a worker that starts sending it to a server that is slow on
        # its first connection: slower, in all, than the email's lease
        configured = deadline_settings(settings, slow_server)
        lease = 7.0  # the configured lease, which the mailer carries (a literal, to compare with)
        request_id = routed(services)
        command = commands.SendNotification(request_id, NotificationKind.REVIEW)
        message_id = handlers.email_message_id(request_id, NotificationKind.REVIEW, "accessflow.local")

        def send(mailer: SmtpMailer) -> DeliveryStatus | None:
            return handlers.send_notification(
                command,
                uow=services.uow(),
                mailer=mailer,
                admin_emails=(ADMIN,),
                message_id_domain="accessflow.local",
            )

        first: list[BaseException | DeliveryStatus | None] = []
        took: list[float] = []

        def first_worker() -> None:
            started = time.monotonic()
            try:
                first.append(send(SmtpMailer(configured, EmailRenderer(configured))))
            except Exception as failure:  # reported by the test thread
                first.append(failure)
            took.append(time.monotonic() - started)

        worker = threading.Thread(target=first_worker)
        worker.start()

        # When a redelivery of the same command comes once the first worker's lease is over (the
        # broker redelivers when a connection drops), on another worker, whose connection is fast
        def lease_over() -> bool:
            with services.uow() as uow:
                notification = uow.notifications.get(request_id, NotificationKind.REVIEW)
            return notification is not None and not notification.leased_by_another(utcnow())

        svc.wait_until(lease_over, timeout=60, what="the first worker's lease to end")
        second = send(SmtpMailer(configured, EmailRenderer(configured)))
        worker.join(timeout=60)

        # Then the first send stopped at its deadline, before its lease ran out, as a transient
        # error to retry; and the server got one copy, the redelivery's
        [outcome] = first
        assert isinstance(outcome, TransientError), outcome
        assert "deadline" in str(outcome)
        assert took[0] < lease
        assert second is DeliveryStatus.SENT
        assert slow_server.copies(message_id) == 1
        with services.uow() as uow:
            notification = uow.notifications.get(request_id, NotificationKind.REVIEW)
        assert notification is not None
        assert (notification.status, notification.attempts) == (DeliveryStatus.SENT, 2)


class TestTheDeadline:
    def test_bounds_a_kept_connection_whose_server_turned_slow_from_its_noop_check_on(
        self, settings: Settings, slow_server: SlowSmtpServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given a connection kept from a fast send, checked with NOOP before the next one
        slow_server.slow_connections = 0
        configured = deadline_settings(settings, slow_server)
        mailer = SmtpMailer(configured, EmailRenderer(configured))
        monkeypatch.setattr(infra_email, "NOOP_AFTER_IDLE_SECONDS", 0.0)
        try:
            mailer.send(an_email())

            # When the server turns slow: NOOP, MAIL, RCPT, DATA and the dot would take 7.5 s
            slow_server.everything_slow = True
            later = an_email()
            started = time.monotonic()
            with pytest.raises(TransientError, match="deadline"):
                mailer.send(later)
            took = time.monotonic() - started
        finally:
            mailer.close()

        # Then the send stopped at its deadline, inside the lease, and the server has no copy
        assert took < configured.email_lease_seconds
        assert slow_server.copies(later.message_id) == 0

    def test_the_smtp_mailer_carries_the_configured_lease(self, settings: Settings) -> None:
        configured = settings.model_copy(update={"email_lease_seconds": 42.0})

        assert SmtpMailer(configured, EmailRenderer(configured)).lease == timedelta(seconds=42)

    def test_a_lease_not_longer_than_the_deadline_is_refused_at_start(self) -> None:
        with pytest.raises(ValueError, match="ACCESSFLOW_EMAIL_LEASE_SECONDS"):
            Settings(smtp_send_deadline_seconds=30, email_lease_seconds=30)
        assert Settings(smtp_send_deadline_seconds=30, email_lease_seconds=35).email_lease_seconds == 35
