"""Rendering emails from Jinja2 templates, and delivering them by SMTP or to .eml files.

No value from a context, a setting or a template can add a header (issue 6, point 6). Python
3.11.7's email package decodes an RFC 2047 encoded word in any header value it is given and
writes a CR LF inside it out as a real line break (cpython #121650), so a check for literal
control characters is not enough. Two layers, each sufficient on its own:

1. We build every header value. Text goes through :func:`header_text`: control characters and
   line breaks become spaces and every ``=?`` is broken up, so the email package finds no
   encoded word to decode. Addresses go through :func:`mailbox` and are set as ``Address``
   objects; a recipient that is not one plain addr-spec is refused.
2. We check the bytes that will be sent with :func:`check_header_block`: exactly
   :data:`EXPECTED_HEADERS`, each once, a To header that names exactly the envelope recipients,
   and no encoded word that decodes to a control character. The mailers send and write those
   very bytes. A refusal is a :class:`PermanentDeliveryError`: the same input fails again.
"""

from __future__ import annotations

import dataclasses
import io
import re
import smtplib
import ssl
from collections import Counter
from collections.abc import Sequence
from email.errors import HeaderParseError
from email.generator import BytesGenerator
from email.header import decode_header, make_header
from email.headerregistry import Address, AddressHeader, BaseHeader
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import formatdate
from pathlib import Path
from typing import Any, NoReturn

import structlog
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from domain.errors import PermanentDeliveryError, TransientError
from domain.model import NotificationKind
from domain.ports import Email
from infra.settings import Settings

log = structlog.get_logger()

#: The header fields at the top of every email, each exactly once: the six we set, and the two
#: MIME fields the email package adds to a multipart/alternative message.
EXPECTED_HEADERS = frozenset(
    {"from", "to", "subject", "message-id", "date", "x-accessflow-request-id", "mime-version", "content-type"}
)
#: Header fields that name recipients (RFC 5322 3.6.3 and 3.6.6, and one that some servers honour).
#: We set To and nothing else.
RECIPIENT_HEADERS = frozenset({"to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc", "apparently-to"})

#: C0 and C1 controls, DEL and the Unicode line and paragraph separators: str.splitlines() breaks on
#: several of them, and a mail client may too.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: The same without the tab, which may stand in folding white space.
_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
#: Where an RFC 2047 encoded word would start. Broken up wherever it appears, without asking
#: whether the rest would parse: the email package has been more lenient than the RFC before.
_ENCODED_WORD_START = "=?"
#: A CR not followed by LF, or an LF not preceded by CR: a lenient reader ends a line there.
_BARE_CR_OR_LF = re.compile(r"\r(?!\n)|(?<!\r)\n")
#: One header line: an RFC 5322 field name (printable ASCII but the colon), a colon, the value.
_FIELD = re.compile(r"([!-9;-~]+):(.*)")
#: RFC 5322 atext, plus any non-ASCII character (RFC 6532); controls and white space are refused first.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f]"
_DOT_ATOM = re.compile(rf"(?:{_ATEXT})+(?:\.(?:{_ATEXT})+)*")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9-]|[^\x00-\x7f])+(?:\.(?:[A-Za-z0-9-]|[^\x00-\x7f])+)*")
#: Our Message-IDs are <kind.request-id@domain>: nothing in one needs quoting or decoding.
_MESSAGE_ID = re.compile(r"<[A-Za-z0-9._+-]+@[A-Za-z0-9._-]+>")
#: How a message goes on the wire: the default policy (which EmailMessage uses), CR LF line ends.
_WIRE = default_policy.clone(linesep="\r\n")
#: The same for SMTPUTF8: headers in raw UTF-8, as a non-ASCII address must be written.
_WIRE_UTF8 = default_policy.clone(linesep="\r\n", utf8=True)
#: MAIL FROM options when an address is not ASCII, as smtplib's send_message would give them.
_SMTPUTF8_OPTIONS = ("SMTPUTF8", "BODY=8BITMIME")


def header_text(value: str) -> str:
    """``value`` as unstructured header text that the email package cannot decode into anything else.

    Control characters and line breaks become spaces, runs of white space one space, and every
    ``=?`` becomes ``= ?``, so that no RFC 2047 encoded word is left to decode (cpython #121650).

    Parameters:
      value: any text: a rendered subject, a name, an id.

    Returns:
      One line of text with no control character and no ``=?``.
    """
    text = " ".join(_CONTROL.sub(" ", value).split())
    while _ENCODED_WORD_START in text:  # "= ?" cannot form a new "=?", but be sure
        text = text.replace(_ENCODED_WORD_START, "= ?")
    return text


def mailbox(value: str) -> Address:
    """``value`` as an :class:`Address` if it is one plain addr-spec (``local@domain``).

    Refused: display names, several addresses, quoted local parts, domain literals, white space,
    control characters and ``=?``: anything the email package would parse rather than copy.

    Raises:
      ValueError: with the reason, which does not repeat the value.
    """
    if _CONTROL.search(value) or any(character.isspace() for character in value):
        raise ValueError("holds a line break, a control character or white space")
    if _ENCODED_WORD_START in value:
        raise ValueError("holds an RFC 2047 encoded word (=?)")
    local, at, domain = value.rpartition("@")
    if not at or not _DOT_ATOM.fullmatch(local) or not _DOMAIN.fullmatch(domain):
        raise ValueError("is not one plain address of the form local@domain")
    return Address(username=local, domain=domain)


def _refuse(reason: str) -> NoReturn:
    raise PermanentDeliveryError(f"refused to send: {reason}")


def _decoded(value: str) -> str:
    """The header value as a mail client would show it, with every encoded word decoded."""
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, ValueError):
        _refuse("a header holds an encoded word that does not decode")


def check_header_block(data: bytes, *, recipients: Sequence[str], utf8: bool = False) -> None:
    """Refuse serialised bytes whose top header block is not exactly the one we built.

    Parameters:
      data: the message as it goes after SMTP DATA, with CR LF line ends.
      recipients: the envelope recipients (RCPT TO), which the To header must list, in order.
      utf8: whether the message goes with SMTPUTF8, so that headers may hold UTF-8.

    Raises:
      PermanentDeliveryError: with the reason; the same input would be refused again.
    """
    head, blank_line, _ = data.partition(b"\r\n\r\n")
    if not blank_line:
        _refuse("no blank line ends the header block")
    try:
        text = head.decode("utf-8" if utf8 else "ascii")
    except UnicodeDecodeError:
        _refuse("the header block holds bytes that are not " + ("UTF-8" if utf8 else "ASCII"))
    if _BARE_CR_OR_LF.search(text):
        _refuse("the header block holds a bare CR or LF, which a lenient server reads as a new header")
    fields: list[tuple[str, str]] = []
    for line in text.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:  # folded: RFC 5322 unfolding drops only the CR LF
            name, value = fields[-1]
            fields[-1] = (name, value + line)
            continue
        match = _FIELD.fullmatch(line)
        if match is None:
            _refuse("a header line has no field name")
        fields.append((match[1].lower(), match[2]))
    counts = Counter(name for name, _ in fields)
    smuggled = sorted(set(counts) & RECIPIENT_HEADERS - {"to"})
    if smuggled:
        _refuse(f"the header block names recipients we did not set, in {', '.join(smuggled)}")
    missing, extra = sorted(EXPECTED_HEADERS - set(counts)), sorted(set(counts) - EXPECTED_HEADERS)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if missing or extra or repeated:
        _refuse(
            "the header block is not the expected one:"
            f" extra {extra or 'none'}, missing {missing or 'none'}, repeated {repeated or 'none'}"
        )
    for name, value in fields:
        if _CONTROL_BUT_TAB.search(_decoded(value)):
            _refuse(
                f"the {name} header hides a line break or control character, itself or in an encoded word"
            )
    listed = [address.strip() for address in dict(fields)["to"].split(",")]
    if listed != list(recipients):
        _refuse("the To header does not name exactly the envelope recipients")


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """An email ready for the wire: its envelope and its checked bytes."""

    #: The envelope sender (MAIL FROM): the addr-spec of the From header.
    sender: str
    #: The envelope recipients (RCPT TO), the same as the To header.
    recipients: tuple[str, ...]
    #: The message with CR LF line ends, as checked by :func:`check_header_block`.
    data: bytes
    #: Whether an address is not ASCII, so the server must offer SMTPUTF8.
    smtputf8: bool


class EmailRenderer:
    """Turns an :class:`Email` into a MIME message with a plain-text and an HTML part.

    Every header value is built here, from :func:`header_text` and :func:`mailbox`, and the
    serialised bytes pass :func:`check_header_block` before any mailer sees them.
    """

    def __init__(self, settings: Settings) -> None:
        self.mail_from = self._from_address(settings.mail_from)
        self.html = Environment(
            loader=PackageLoader("infra", "templates"),
            autoescape=select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=True),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
        )
        # Plain text and subjects are not HTML: escaping them would show &amp; to the reader.
        # A rendered subject is made safe for its header by header_text, whatever the template.
        self.text = Environment(
            loader=PackageLoader("infra", "templates"),
            autoescape=False,  # noqa: S701 - text/plain and headers, never HTML
            undefined=StrictUndefined,
        )
        self.subjects = {
            NotificationKind.APPROVE: self.text.from_string(settings.subject_approve),
            NotificationKind.REJECT: self.text.from_string(settings.subject_reject),
            NotificationKind.REVIEW: self.text.from_string(settings.subject_review),
        }

    def _text(self, value: str) -> str:
        return header_text(value)

    def _from_address(self, setting: str) -> Address:
        """ACCESSFLOW_MAIL_FROM as one Address, parsed once per process.

        Raises:
          ValueError: the setting is not one address, or holds what the email package would decode.
        """
        if _CONTROL.search(setting) or _ENCODED_WORD_START in setting:
            raise ValueError("ACCESSFLOW_MAIL_FROM must not hold a control character or an encoded word (=?)")
        header = default_policy.header_factory("From", setting)
        if (
            not (isinstance(header, AddressHeader) and isinstance(header, BaseHeader))
            or header.defects
            or len(header.addresses) != 1
        ):
            raise ValueError(
                "ACCESSFLOW_MAIL_FROM must be one address, such as: accessflow <no-reply@example.com>"
            )
        [address] = header.addresses
        try:
            plain = mailbox(address.addr_spec)
        except ValueError as invalid:
            raise ValueError(f"the address in ACCESSFLOW_MAIL_FROM {invalid}") from None
        return Address(self._text(address.display_name), plain.username, plain.domain)

    def render(self, email: Email) -> EmailMessage:
        """The MIME message, once its serialised bytes have passed :func:`check_header_block`.

        Raises:
          PermanentDeliveryError: a recipient, the Message-ID or the serialised headers are refused.
        """
        message, _ = self._build(email)
        return message

    def encode(self, email: Email) -> Outgoing:
        """The envelope and the checked bytes to send; what the mailers deliver.

        Raises:
          PermanentDeliveryError: a recipient, the Message-ID or the serialised headers are refused.
        """
        _, outgoing = self._build(email)
        return outgoing

    def _build(self, email: Email) -> tuple[EmailMessage, Outgoing]:
        recipients = self._recipients(email.to)
        if not _MESSAGE_ID.fullmatch(email.message_id):
            _refuse("the Message-ID is not a plain <id@domain>")
        context: dict[str, Any] = dataclasses.asdict(email.context)  # type: ignore[call-overload]
        message = EmailMessage()
        # Address objects and neutralised text only: the email package is never handed a string
        # in which it could find an encoded word, a second address or a line break.
        message["From"] = self.mail_from
        message["To"] = recipients
        message["Subject"] = self._text(self.subjects[email.kind].render(context))
        message["Message-ID"] = email.message_id
        message["Date"] = formatdate(localtime=False, usegmt=True)
        message["X-Accessflow-Request-Id"] = self._text(str(context["request_id"]))
        message.set_content(self.text.get_template(f"{email.kind.value}.txt.j2").render(context))
        message.add_alternative(
            self.html.get_template(f"{email.kind.value}.html.j2").render(context), subtype="html"
        )
        # A non-ASCII address cannot be written as an encoded word: it needs SMTPUTF8 and raw UTF-8
        # headers, as smtplib's send_message would choose.
        envelope = (self.mail_from.addr_spec, *(address.addr_spec for address in recipients))
        smtputf8 = not all(address.isascii() for address in envelope)
        buffer = io.BytesIO()
        BytesGenerator(buffer, policy=_WIRE_UTF8 if smtputf8 else _WIRE).flatten(message)
        data = buffer.getvalue()
        addresses = tuple(address.addr_spec for address in recipients)
        check_header_block(data, recipients=addresses, utf8=smtputf8)
        return message, Outgoing(self.mail_from.addr_spec, addresses, data, smtputf8)

    @staticmethod
    def _recipients(to: Sequence[str]) -> tuple[Address, ...]:
        if not to:
            _refuse("the email has no recipient")
        recipients = []
        for position, value in enumerate(to, start=1):
            try:
                recipients.append(mailbox(value))
            except ValueError as invalid:
                _refuse(f"recipient {position} of {len(to)} {invalid}")
        return tuple(recipients)


class SmtpMailer:
    """Delivers over SMTP with a socket timeout; maps the server's answer onto our errors."""

    def __init__(self, settings: Settings, renderer: EmailRenderer) -> None:
        self.settings = settings
        self.renderer = renderer

    def send(self, email: Email) -> None:
        # The bytes checked by the renderer are the bytes sent, with the envelope it chose: smtplib
        # derives nothing from the headers.
        outgoing = self.renderer.encode(email)
        s = self.settings
        try:
            smtp: smtplib.SMTP
            if s.smtp_tls == "ssl":
                smtp = smtplib.SMTP_SSL(
                    s.smtp_host,
                    s.smtp_port,
                    timeout=s.smtp_timeout_seconds,
                    context=ssl.create_default_context(),
                )
            else:
                smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_seconds)
            with smtp:
                if s.smtp_tls == "starttls":
                    smtp.starttls(context=ssl.create_default_context())
                if s.smtp_username:
                    password = s.smtp_password.get_secret_value() if s.smtp_password else ""
                    smtp.login(s.smtp_username, password)
                options: Sequence[str] = ()
                if outgoing.smtputf8:
                    smtp.ehlo_or_helo_if_needed()
                    if not smtp.has_extn("smtputf8"):
                        raise smtplib.SMTPNotSupportedError("a non-ASCII address needs SMTPUTF8")
                    options = _SMTPUTF8_OPTIONS
                smtp.sendmail(outgoing.sender, list(outgoing.recipients), outgoing.data, mail_options=options)
        except smtplib.SMTPRecipientsRefused as refused:
            codes = [code for code, _ in refused.recipients.values()]
            if all(500 <= code < 600 for code in codes):
                raise PermanentDeliveryError(f"all recipients refused: {sorted(set(codes))}") from None
            raise TransientError(f"recipients refused: {sorted(set(codes))}") from None
        except smtplib.SMTPResponseException as answer:
            if 500 <= answer.smtp_code < 600:
                raise PermanentDeliveryError(f"SMTP {answer.smtp_code}") from None
            raise TransientError(f"SMTP {answer.smtp_code}") from None
        except (smtplib.SMTPException, OSError) as failure:
            raise TransientError(f"SMTP unreachable: {type(failure).__name__}") from None
        log.info("email.sent", kind=email.kind.value, message_id=email.message_id, recipients=len(email.to))


class FileMailer:
    """Writes each email as an .eml file: for the demo and for looking at templates."""

    def __init__(self, directory: Path, renderer: EmailRenderer) -> None:
        self.directory = directory
        self.renderer = renderer

    def send(self, email: Email) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        outgoing = self.renderer.encode(email)
        safe_id = re.sub(r"[^A-Za-z0-9._@-]", "", email.message_id)
        path = self.directory / f"{safe_id}.eml"
        path.write_bytes(outgoing.data)
        log.info("email.written", kind=email.kind.value, path=str(path))
