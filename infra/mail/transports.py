"""Delivering rendered emails: by SMTP, with one kept connection per thread and a deadline per send, or to .eml files.

:class:`SmtpMailer` keeps one SMTP connection per thread between sends (issue 7), checks it with
``NOOP`` after it has been idle, and opens a new one when the server has dropped it.

Each send has a deadline (``ACCESSFLOW_SMTP_SEND_DEADLINE_SECONDS``) over all its steps: connect,
TLS, login, EHLO, the ``NOOP`` check of a kept connection, MAIL, RCPT and DATA. A socket timeout
alone bounds one wait, and a slow server that answers every command just in time could keep a
send going past the lease that stops a redelivery from sending a second copy (issue 8). So before
each wait the socket's timeout is set to the time left (:class:`_DeadlineSMTP`), and a send that
runs out stops with a :class:`TransientError`. The lease is longer than the deadline (settings).
"""

from __future__ import annotations

import dataclasses
import io
import re
import smtplib
import socket
import ssl
import threading
import time
import weakref
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog

from domain.errors import PermanentDeliveryError, TransientError
from domain.ports import Email, Sent
from infra.mail.render import SMTPUTF8_OPTIONS, EmailRenderer, Outgoing
from infra.settings import Settings

log = structlog.get_logger()

#: A kept connection unused for this long is asked NOOP before its next message: a server may have
#: closed it meanwhile (RFC 5321 4.5.3.2.7 lets it after 5 minutes; some do sooner).
NOOP_AFTER_IDLE_SECONDS = 10.0
#: A connection is retired (QUIT) once this old, as Postfix's smtp_connection_reuse_time_limit does,
#: so that no state a server keeps per session, such as a rate limit, outlives a few minutes.
REUSE_SECONDS = 300.0
#: The longest a QUIT may wait at shutdown, per connection: the server has the messages already.
QUIT_TIMEOUT_SECONDS = 2.0


class SendDeadlinePassed(TimeoutError):
    """The send's deadline passed before its SMTP exchange ended."""


class _Deadline:
    """When one send must be over, and the socket timeout each of its waits gets."""

    def __init__(self, seconds: float, per_operation: float) -> None:
        self.seconds = seconds
        self.per_operation = per_operation
        self.at = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def timeout(self) -> float:
        """The time left, but no more than one operation's timeout, in seconds.

        Raises:
          SendDeadlinePassed: no time is left.
        """
        left = self.at - time.monotonic()
        if left <= 0:
            raise SendDeadlinePassed(f"the send's deadline of {self.seconds:g}s passed")
        return min(left, self.per_operation)


class _DeadlineReader(io.RawIOBase):
    """The reading side of an SMTP connection, each read armed with the time its send has left.

    smtplib reads replies through ``sock.makefile()``, whose reads all wait with the one timeout
    set before the reply: a server that trickles a reply out could stretch it without end.
    """

    def __init__(self, smtp: _DeadlineSMTP) -> None:
        super().__init__()
        self.smtp = smtp

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        sock = self.smtp.sock
        if sock is None:
            raise smtplib.SMTPServerDisconnected("the connection is closed")
        self.smtp.arm()
        return sock.recv_into(buffer)


class _DeadlineSMTP(smtplib.SMTP):
    """smtplib's client, with every wait on the server bounded by its current send's deadline.

    ``deadline`` is the send under way; ``None`` (a QUIT at shutdown) leaves the socket's timeout
    as it was set. Connecting, each command written (``send``) and each reply line read go
    through :meth:`arm`. A TLS handshake's waits get the time left when its command was answered.
    """

    def __init__(self, host: str, port: int, *, deadline: _Deadline, **kwargs: Any) -> None:
        self.deadline: _Deadline | None = deadline
        super().__init__(host, port, timeout=deadline.per_operation, **kwargs)

    def arm(self) -> None:
        """Set the socket's timeout to the time the send has left; raise if none is left."""
        if self.deadline is not None and self.sock is not None:
            self.sock.settimeout(self.deadline.timeout())

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        if self.deadline is not None:
            timeout = self.deadline.timeout()
        connected: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        return connected

    def send(self, s: Any) -> None:
        self.arm()
        super().send(s)

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            self.file = io.BufferedReader(_DeadlineReader(self))
        return super().getreply()


class _DeadlineSMTPSSL(_DeadlineSMTP, smtplib.SMTP_SSL):
    """:class:`_DeadlineSMTP` over implicit TLS (``ACCESSFLOW_SMTP_TLS=ssl``)."""


@dataclasses.dataclass(eq=False)
class _Connection:
    smtp: _DeadlineSMTP
    #: time.monotonic() when it was opened, and when a transaction on it last ended.
    opened_at: float
    used_at: float


class _PerThread:
    """One kept SMTP connection per thread, and a way to close all of them from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_thread: dict[int, _Connection] = {}

    def get(self) -> _Connection | None:
        return self._by_thread.get(threading.get_ident())

    def keep(self, connection: _Connection) -> None:
        with self._lock:
            self._by_thread[threading.get_ident()] = connection

    def drop(self, connection: _Connection, *, quit: bool, deadline: _Deadline | None = None) -> None:
        """Forget this thread's ``connection`` and close it, saying QUIT first if ``quit``.

        Within a send, ``deadline`` bounds the QUIT's wait too.
        """
        with self._lock:
            if self._by_thread.get(threading.get_ident()) is connection:
                del self._by_thread[threading.get_ident()]
        _close(connection.smtp, quit=quit, deadline=deadline)

    def close_all(self, *, quit: bool) -> None:
        with self._lock:
            connections = list(self._by_thread.values())
            self._by_thread.clear()
        for connection in connections:
            _close(connection.smtp, quit=quit)


def _close(smtp: _DeadlineSMTP, *, quit: bool, deadline: _Deadline | None = None) -> None:
    smtp.deadline = None  # a QUIT has its own timeout, not what the connection's last send had left
    try:
        if quit and smtp.sock is not None:
            timeout = (
                QUIT_TIMEOUT_SECONDS if deadline is None else min(QUIT_TIMEOUT_SECONDS, deadline.timeout())
            )
            smtp.sock.settimeout(timeout)
            smtp.quit()
    except (smtplib.SMTPException, OSError):
        pass  # the server went first: nothing is left to say to it
    finally:
        smtp.close()


def _closing(failure: BaseException) -> bool:
    """Whether ``failure`` is the server's 421: it is closing the connection (RFC 5321 3.8)."""
    if isinstance(failure, smtplib.SMTPRecipientsRefused):
        return any(code == 421 for code, _ in failure.recipients.values())
    return isinstance(failure, smtplib.SMTPResponseException) and failure.smtp_code == 421


def _dropped(failure: OSError) -> bool:
    """Whether the server is gone from this connection: it closed or reset it, or said 421.

    A timeout is not a drop: a server that does not answer is not asked again here.
    """
    if isinstance(failure, smtplib.SMTPServerDisconnected):
        return True
    if isinstance(failure, smtplib.SMTPException):  # a reply: only a 421 closes the connection
        return _closing(failure)
    return not isinstance(failure, TimeoutError)


class SmtpMailer:
    """Delivers over SMTP with a socket timeout; maps the server's answer onto our errors.

    Each thread keeps its connection between sends. After a refused message (4xx or 5xx) the
    connection is RSET for the next one; after a 421, a dropped connection, a timeout or anything
    unexpected it is closed, and the next send opens a new one. :meth:`close` ends them all.
    """

    def __init__(self, settings: Settings, renderer: EmailRenderer) -> None:
        self.settings = settings
        self.renderer = renderer
        self._connections = _PerThread()
        # A mailer dropped without close() (a CLI command, a test) leaves no socket open; no QUIT
        # then, as the garbage collector may run anywhere.
        weakref.finalize(self, self._connections.close_all, quit=False)

    @property
    def lease(self) -> timedelta:
        """The lease a sender takes on an email: ``ACCESSFLOW_EMAIL_LEASE_SECONDS``, longer than the deadline."""
        return timedelta(seconds=self.settings.email_lease_seconds)

    def send(self, email: Email) -> Sent:
        # The bytes checked by the renderer are the bytes sent, with the envelope it chose: smtplib
        # derives nothing from the headers.
        outgoing = self.renderer.encode(email)
        s = self.settings
        deadline = _Deadline(s.smtp_send_deadline_seconds, s.smtp_timeout_seconds)
        try:
            refused = self._deliver(outgoing, deadline)
        except smtplib.SMTPRecipientsRefused as every:
            codes = [code for code, _ in every.recipients.values()]
            if all(500 <= code < 600 for code in codes):
                raise PermanentDeliveryError(f"all recipients refused: {sorted(set(codes))}") from None
            raise TransientError(f"recipients refused: {sorted(set(codes))}") from None
        except smtplib.SMTPResponseException as answer:
            if 500 <= answer.smtp_code < 600:
                raise PermanentDeliveryError(f"SMTP {answer.smtp_code}") from None
            raise TransientError(f"SMTP {answer.smtp_code}") from None
        except (smtplib.SMTPException, OSError) as failure:
            # smtplib reports a timed-out read as a dropped connection: the clock tells them apart.
            if isinstance(failure, SendDeadlinePassed) or deadline.passed():
                raise TransientError(
                    f"SMTP send stopped at its deadline of {deadline.seconds:g}s "
                    "(ACCESSFLOW_SMTP_SEND_DEADLINE_SECONDS)"
                ) from None
            raise TransientError(f"SMTP unreachable: {type(failure).__name__}") from None
        if refused:
            log.warning(
                "email.partly_refused",
                kind=email.kind.value,
                message_id=email.message_id,
                recipients=len(email.to),
                refused=len(refused),
                codes=sorted({code for code, _ in refused.values()}),
            )
        # A sent email is told by the handler, once its outcome is recorded: "email.sent".
        return Sent(
            refused={
                address: f"{code} {reply.decode('utf-8', 'replace')}".strip()
                for address, (code, reply) in refused.items()
            }
        )

    def close(self) -> None:
        """Say QUIT on every thread's connection and close it; for worker shutdown."""
        self._connections.close_all(quit=True)

    def _deliver(self, outgoing: Outgoing, deadline: _Deadline) -> dict[str, tuple[int, bytes]]:
        """One transaction on this thread's connection, all of it before ``deadline``.

        A connection reused from an earlier send may have been closed by the server since: if it
        fails before DATA with a dropped connection or a 421, nothing was delivered, and the
        transaction is made once more on a new connection. A failure from DATA on is never
        repeated here: the server may have the message, and the handler's lease decides. No path
        waits past ``deadline``, which the handler's lease outlasts (settings).

        Returns:
          The recipients refused while others were taken, with the server's code and reply.
        """
        connection, reused = self._checkout(deadline)
        try:
            try:
                refused = self._envelope(connection.smtp, outgoing)
            except OSError as failure:  # smtplib's errors are OSErrors too
                if not reused or not _dropped(failure) or deadline.passed():
                    raise
                self._connections.drop(connection, quit=False)
                connection = self._open(deadline)
                refused = self._envelope(connection.smtp, outgoing)
            code, reply = connection.smtp.data(outgoing.data)
            if code != 250:
                raise smtplib.SMTPDataError(code, reply)
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPResponseException) as refused:
            if _closing(refused):
                self._connections.drop(connection, quit=False)
            else:
                self._reset(connection)  # the next message starts a clean transaction
            raise
        except smtplib.SMTPNotSupportedError:
            raise  # asked before MAIL: the connection is as clean as it was
        except BaseException:
            # A dropped connection, a timeout, or an exception raised into this thread (dramatiq's
            # time limit) mid-command: what the server saw is unknown, so this connection is done.
            self._connections.drop(connection, quit=False)
            raise
        connection.used_at = time.monotonic()
        return refused

    def _checkout(self, deadline: _Deadline) -> tuple[_Connection, bool]:
        """This thread's connection, and whether it was kept from an earlier send."""
        connection = self._connections.get()
        if connection is not None:
            connection.smtp.deadline = deadline  # its NOOP check, and all that follows
            now = time.monotonic()
            if now - connection.opened_at >= REUSE_SECONDS:
                self._connections.drop(connection, quit=True, deadline=deadline)
            elif now - connection.used_at >= NOOP_AFTER_IDLE_SECONDS and not self._answers_noop(connection):
                self._connections.drop(connection, quit=False)
            else:
                return connection, True
        return self._open(deadline), False

    @staticmethod
    def _answers_noop(connection: _Connection) -> bool:
        try:
            code, _ = connection.smtp.noop()
        except SendDeadlinePassed:
            raise  # no time left to open another connection either
        except (smtplib.SMTPException, OSError):
            return False
        return code == 250

    def _open(self, deadline: _Deadline) -> _Connection:
        s = self.settings
        smtp: _DeadlineSMTP
        if s.smtp_tls == "ssl":
            smtp = _DeadlineSMTPSSL(
                s.smtp_host, s.smtp_port, deadline=deadline, context=ssl.create_default_context()
            )
        else:
            smtp = _DeadlineSMTP(s.smtp_host, s.smtp_port, deadline=deadline)
        try:
            if s.smtp_tls == "starttls":
                smtp.starttls(context=ssl.create_default_context())
            if s.smtp_username:
                password = s.smtp_password.get_secret_value() if s.smtp_password else ""
                smtp.login(s.smtp_username, password)
            smtp.ehlo_or_helo_if_needed()
        except BaseException:
            _close(smtp, quit=False)
            raise
        now = time.monotonic()
        connection = _Connection(smtp, opened_at=now, used_at=now)
        self._connections.keep(connection)
        return connection

    @staticmethod
    def _envelope(smtp: smtplib.SMTP, outgoing: Outgoing) -> dict[str, tuple[int, bytes]]:
        """MAIL FROM and RCPT TO, as smtplib's sendmail sends them; raises what it raises.

        A recipient refused while others are taken does not stop the message, as with sendmail,
        which returns them as this does.
        """
        options: list[str] = []
        if smtp.does_esmtp and smtp.has_extn("size"):
            options.append(f"size={len(outgoing.data)}")
        if outgoing.smtputf8:
            if not smtp.has_extn("smtputf8"):
                raise smtplib.SMTPNotSupportedError("a non-ASCII address needs SMTPUTF8")
            options.extend(SMTPUTF8_OPTIONS)
        code, reply = smtp.mail(outgoing.sender, options)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, reply, outgoing.sender)
        refused: dict[str, tuple[int, bytes]] = {}
        for recipient in outgoing.recipients:
            code, reply = smtp.rcpt(recipient)
            if code not in (250, 251):
                refused[recipient] = (code, reply)
            if code == 421:
                raise smtplib.SMTPRecipientsRefused(refused)
        if len(refused) == len(outgoing.recipients):
            raise smtplib.SMTPRecipientsRefused(refused)
        return refused

    def _reset(self, connection: _Connection) -> None:
        """RSET after a refused transaction; a connection that does not take it is closed."""
        try:
            code, _ = connection.smtp.rset()
        except (smtplib.SMTPException, OSError):
            code = 0
        if code == 250:
            connection.used_at = time.monotonic()
        else:
            self._connections.drop(connection, quit=False)


#: The lease of an email written to a file, unless the composition root gives the configured one.
DEFAULT_FILE_LEASE = timedelta(seconds=60)


class FileMailer:
    """Writes each email as an .eml file: for the demo and for looking at templates."""

    def __init__(
        self, directory: Path, renderer: EmailRenderer, *, lease: timedelta = DEFAULT_FILE_LEASE
    ) -> None:
        self.directory = directory
        self.renderer = renderer
        #: The lease a sender takes on an email (``ACCESSFLOW_EMAIL_LEASE_SECONDS``).
        self.lease = lease

    def send(self, email: Email) -> Sent:
        self.directory.mkdir(parents=True, exist_ok=True)
        outgoing = self.renderer.encode(email)
        safe_id = re.sub(r"[^A-Za-z0-9._@-]", "", email.message_id)
        path = self.directory / f"{safe_id}.eml"
        path.write_bytes(outgoing.data)
        log.info("email.written", kind=email.kind.value, path=str(path))
        return Sent()
