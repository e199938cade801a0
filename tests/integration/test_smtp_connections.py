"""One SMTP connection per thread, kept between sends (issue 7), against a real aiosmtpd server.

A refused message leaves the connection clean for the next (RSET); a connection the server
dropped is replaced without losing the message, and never by sending a message twice; close()
ends them all, and the worker's shutdown calls it.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from dramatiq.brokers.stub import StubBroker

from domain.errors import PermanentDeliveryError, TransientError
from domain.model import NotificationKind
from domain.notifications import ProductLine, RejectContext
from domain.ports import Email
from infra.bootstrap import build
from infra.mail import transports as infra_email
from infra.mail.render import EmailRenderer
from infra.mail.transports import SmtpMailer
from infra.settings import Settings
from tests import services as svc

pytestmark = pytest.mark.integration


@dataclass
class CountingSink(svc.SmtpSink):
    """The SMTP sink, counting connections and commands, with replies and hang-ups on demand."""

    #: Commands received, by name: EHLO (one per connection), MAIL, NOOP, RSET, QUIT.
    commands: Counter[str] = field(default_factory=Counter)
    #: Replies queued for the next MAIL and RCPT commands; a "421" one also closes the connection.
    mail_replies: list[str] = field(default_factory=list)
    rcpt_replies: list[str] = field(default_factory=list)
    #: Take the next message, then close the connection without answering: the client cannot know.
    drop_after_next_data: bool = False
    servers: list[Any] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.commands["EHLO"] += 1
        self.servers.append(server)
        return responses

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        self.commands["MAIL"] += 1
        if self.mail_replies:
            return self._refuse(server, self.mail_replies.pop(0))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if self.rcpt_replies:
            return self._refuse(server, self.rcpt_replies.pop(0))
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        if self.drop_after_next_data:
            self.drop_after_next_data = False
            server.transport.close()
        return reply

    async def handle_NOOP(self, server: Any, session: Any, envelope: Any, arg: str) -> str:
        self.commands["NOOP"] += 1
        return "250 OK"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.commands["RSET"] += 1
        return "250 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.commands["QUIT"] += 1
        return "221 Bye"

    @staticmethod
    def _refuse(server: Any, reply: str) -> str:
        if reply.startswith("421"):
            # Closed once the reply is written: aiosmtpd writes it before it next yields to the loop.
            asyncio.get_running_loop().call_soon(server.transport.close)
        return reply

    def hang_up_on_everyone(self) -> None:
        """Close every connection from the server's side, as an idle timeout would, and wait until closed."""
        assert self.loop is not None

        async def hang_up() -> None:
            for server in self.servers:
                if server.transport is not None:
                    server.transport.close()
            await asyncio.sleep(0)  # the transports' connection_lost callbacks, queued by close(), run first

        asyncio.run_coroutine_threadsafe(hang_up(), self.loop).result(timeout=10)


@pytest.fixture
def sink() -> Iterator[CountingSink]:
    from aiosmtpd.controller import Controller

    counting = CountingSink(port=svc.free_port())
    controller = Controller(counting, hostname=counting.host, port=counting.port)
    controller.start()
    counting.loop = controller.loop
    try:
        yield counting
    finally:
        controller.stop()


@pytest.fixture
def mailer(sink: CountingSink) -> Iterator[SmtpMailer]:
    settings = Settings(smtp_host=sink.host, smtp_port=sink.port, smtp_timeout_seconds=10)
    kept = SmtpMailer(settings, EmailRenderer(settings))
    yield kept
    kept.close()


def an_email() -> Email:
    request_id = str(uuid.uuid4())
    return Email(
        kind=NotificationKind.REJECT,
        to=("dev@acme.example",),
        message_id=f"<reject.{request_id}@accessflow.local>",
        context=RejectContext(
            request_id=request_id,
            consumer_name="Acme",
            app_name="Shop",
            plan_name="Partner",
            products=(ProductLine("payments", "Payments API"),),
            reason="Not now.",
        ),
    )


def delivered(sink: CountingSink, sent: Email) -> int:
    return len(sink.about(sent.context.request_id))  # type: ignore[attr-defined]


class TestOneConnectionPerThread:
    def test_emails_in_a_row_share_one_connection(self, mailer: SmtpMailer, sink: CountingSink) -> None:
        emails = [an_email() for _ in range(3)]

        for sent in emails:
            mailer.send(sent)

        assert [delivered(sink, sent) for sent in emails] == [1, 1, 1]
        assert sink.commands["EHLO"] == 1
        assert sink.commands["QUIT"] == 0  # still open, for the next

    def test_each_thread_has_its_own_and_close_ends_them_all(
        self, mailer: SmtpMailer, sink: CountingSink
    ) -> None:
        # Given two threads that send at the same time, each twice
        together = threading.Barrier(2)
        failures: list[BaseException] = []

        def sender() -> None:
            try:
                mailer.send(an_email())
                together.wait(timeout=10)  # both threads alive, each with its connection open
                mailer.send(an_email())
            except BaseException as failure:  # reported by the test thread
                failures.append(failure)

        threads = [threading.Thread(target=sender) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

        assert failures == []
        assert (len(sink.received()), sink.commands["EHLO"]) == (4, 2)

        # When the worker shuts down, from a third thread
        mailer.close()

        # Then both connections say QUIT
        svc.wait_until(lambda: sink.commands["QUIT"] == 2, what="two QUITs")


class TestARefusedMessage:
    @pytest.mark.parametrize(
        ("reply", "error"),
        [("554 5.7.1 rejected", PermanentDeliveryError), ("451 4.3.0 try again later", TransientError)],
        ids=["5xx", "4xx"],
    )
    def test_at_data_leaves_the_connection_clean_for_the_next(
        self, mailer: SmtpMailer, sink: CountingSink, reply: str, error: type[Exception]
    ) -> None:
        mailer.send(an_email())
        sink.fail_next.append(reply)
        with pytest.raises(error, match=reply[:3]):
            mailer.send(an_email())

        after = an_email()
        mailer.send(after)

        assert delivered(sink, after) == 1
        assert (sink.commands["EHLO"], sink.commands["RSET"]) == (1, 1)

    def test_with_every_recipient_refused_is_reset_before_the_next(
        self, mailer: SmtpMailer, sink: CountingSink
    ) -> None:
        # Given a refusal after MAIL FROM was taken: without RSET, the next MAIL is a nested one (503)
        mailer.send(an_email())
        sink.rcpt_replies.append("550 5.1.1 no such user")
        with pytest.raises(PermanentDeliveryError, match="all recipients refused: \\[550\\]"):
            mailer.send(an_email())

        after = an_email()
        mailer.send(after)

        assert delivered(sink, after) == 1
        assert (sink.commands["EHLO"], sink.commands["RSET"]) == (1, 1)

    def test_a_refused_sender_is_reset_too(self, mailer: SmtpMailer, sink: CountingSink) -> None:
        sink.mail_replies.append("451 4.7.1 slow down")
        with pytest.raises(TransientError, match="SMTP 451"):
            mailer.send(an_email())

        after = an_email()
        mailer.send(after)

        assert delivered(sink, after) == 1
        assert (sink.commands["EHLO"], sink.commands["RSET"]) == (1, 1)


class TestAConnectionTheServerClosed:
    def test_while_idle_is_replaced_and_the_email_goes(self, mailer: SmtpMailer, sink: CountingSink) -> None:
        # Given a kept connection that the server has since closed (an idle timeout)
        mailer.send(an_email())
        sink.hang_up_on_everyone()

        # When the next email is sent
        after = an_email()
        mailer.send(after)

        # Then it goes, once, on a new connection, with no error for the handler to retry
        assert delivered(sink, after) == 1
        assert sink.commands["EHLO"] == 2

    def test_with_a_421_at_mail_is_replaced_and_the_email_goes(
        self, mailer: SmtpMailer, sink: CountingSink
    ) -> None:
        mailer.send(an_email())
        sink.mail_replies.append("421 4.4.2 idle too long, closing")

        after = an_email()
        mailer.send(after)

        assert delivered(sink, after) == 1
        assert (sink.commands["EHLO"], sink.commands["MAIL"]) == (2, 3)

    def test_with_a_421_at_rcpt_is_replaced_and_the_email_goes(
        self, mailer: SmtpMailer, sink: CountingSink
    ) -> None:
        mailer.send(an_email())
        sink.rcpt_replies.append("421 4.4.2 closing")

        after = an_email()
        mailer.send(after)

        assert delivered(sink, after) == 1
        assert sink.commands["EHLO"] == 2

    def test_a_new_connection_that_fails_is_not_tried_again(
        self, mailer: SmtpMailer, sink: CountingSink
    ) -> None:
        # Given a server that closes a fresh connection at MAIL: nothing was kept, so no retry here
        sink.mail_replies.append("421 4.3.2 shutting down")

        with pytest.raises(TransientError, match="SMTP 421"):
            mailer.send(an_email())

        assert (sink.commands["EHLO"], sink.commands["MAIL"]) == (1, 1)
        after = an_email()
        mailer.send(after)  # and the next send opens another
        assert delivered(sink, after) == 1

    def test_after_data_is_an_error_and_the_email_is_not_sent_again_here(
        self, mailer: SmtpMailer, sink: CountingSink
    ) -> None:
        # Given a kept connection that the server closes after it took the message, before answering
        mailer.send(an_email())
        sink.drop_after_next_data = True
        sent = an_email()

        # When it is sent, the mailer cannot know whether it went: the handler's retry decides
        with pytest.raises(TransientError, match="unreachable"):
            mailer.send(sent)

        # Then it was not sent a second time behind the handler's back
        assert delivered(sink, sent) == 1
        after = an_email()
        mailer.send(after)
        assert delivered(sink, after) == 1
        assert sink.commands["EHLO"] == 2


class TestAnIdleConnection:
    def test_is_checked_with_noop_before_it_is_used_again(
        self, mailer: SmtpMailer, sink: CountingSink, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Given every kept connection counts as idle
        monkeypatch.setattr(infra_email, "NOOP_AFTER_IDLE_SECONDS", 0.0)
        mailer.send(an_email())

        mailer.send(an_email())

        assert (sink.commands["NOOP"], sink.commands["EHLO"]) == (1, 1)

    def test_that_fails_noop_is_replaced_before_mail_is_tried_on_it(
        self, mailer: SmtpMailer, sink: CountingSink, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(infra_email, "NOOP_AFTER_IDLE_SECONDS", 0.0)
        mailer.send(an_email())
        sink.hang_up_on_everyone()
        envelopes: list[bool] = []
        envelope = SmtpMailer._envelope

        def spy(smtp: Any, outgoing: infra_email.Outgoing) -> dict[str, tuple[int, bytes]]:
            envelopes.append(smtp.sock is not None)
            return envelope(smtp, outgoing)

        monkeypatch.setattr(SmtpMailer, "_envelope", staticmethod(spy))

        after = an_email()
        mailer.send(after)

        assert delivered(sink, after) == 1
        assert envelopes == [True]  # one MAIL, on the new connection: none on the dead one
        assert sink.commands["EHLO"] == 2

    def test_is_not_checked_when_it_was_just_used(self, mailer: SmtpMailer, sink: CountingSink) -> None:
        mailer.send(an_email())
        mailer.send(an_email())
        assert sink.commands["NOOP"] == 0


class TestAnOldConnection:
    def test_is_retired_with_quit_and_replaced(
        self, mailer: SmtpMailer, sink: CountingSink, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(infra_email, "REUSE_SECONDS", 0.0)
        mailer.send(an_email())

        mailer.send(an_email())

        assert len(sink.received()) == 2
        svc.wait_until(lambda: sink.commands["QUIT"] == 1, what="the old connection's QUIT")
        assert sink.commands["EHLO"] == 2


class TestClosing:
    def test_close_says_quit_and_a_later_send_opens_a_new_connection(
        self, mailer: SmtpMailer, sink: CountingSink
    ) -> None:
        mailer.send(an_email())

        mailer.close()

        svc.wait_until(lambda: sink.commands["QUIT"] == 1, what="a QUIT")
        after = an_email()
        mailer.send(after)
        assert delivered(sink, after) == 1
        assert sink.commands["EHLO"] == 2

    def test_the_worker_shutdown_closes_the_mailer(self, sink: CountingSink, tmp_path: Any) -> None:
        # Given the services a worker process builds, with the SMTP mailer, after one email
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", smtp_host=sink.host, smtp_port=sink.port
        )
        services = build(settings, broker=StubBroker())
        services.mailer.send(an_email())

        # When WorkerLifecycle.after_worker_shutdown (infra.messaging.lifecycle) closes them
        services.close()

        # Then the kept connection said QUIT
        svc.wait_until(lambda: sink.commands["QUIT"] == 1, what="a QUIT at shutdown")

    def test_a_mailer_dropped_without_close_leaves_no_socket_open(self, sink: CountingSink) -> None:
        settings = Settings(smtp_host=sink.host, smtp_port=sink.port)
        dropped = SmtpMailer(settings, EmailRenderer(settings))
        dropped.send(an_email())
        [connection] = dropped._connections._by_thread.values()
        socket = connection.smtp.sock
        assert socket is not None

        del dropped
        gc.collect()

        assert socket.fileno() == -1
