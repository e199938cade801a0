"""Rendering emails from Jinja2 templates into checked bytes: every header built here, none injected.

No value from a context, a setting or a template can add a header (issue 6, point 6). Python
3.11.7's email package decodes an RFC 2047 encoded word in any header value it is given and
writes a CR LF inside it out as a real line break (cpython #121650), so a check for literal
control characters is not enough. Two layers, each sufficient on its own:

1. We build every header value. Text goes through :func:`header_text`: control characters and
   line breaks become spaces and every ``=?`` is broken up, so no reader finds an encoded word
   we did not write. Addresses go through :func:`mailbox`; a recipient that is not one plain
   addr-spec is refused. We then write the header lines ourselves (issue 7): printable ASCII text
   as it is, folded at its spaces; anything else as RFC 2047 ``Q`` encoded words that we encode.
   The email package's header registry is not on this path (it was 10% of a worker's CPU).
2. We check the bytes that will be sent with :func:`check_header_block`: exactly
   :data:`EXPECTED_HEADERS`, each once, a To header that names exactly the envelope recipients,
   and no encoded word that decodes to a control character. The mailers send and write those
   very bytes. A refusal is a :class:`PermanentDeliveryError`: the same input fails again.
"""

from __future__ import annotations

import binascii
import dataclasses
import email as email_package
import re
import secrets
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.headerregistry import Address, AddressHeader, BaseHeader
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import format_datetime
from typing import Any, NoReturn

import structlog
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from domain.errors import PermanentDeliveryError
from domain.model import NotificationKind
from domain.ports import Email
from infra.settings import Settings

log = structlog.get_logger()

#: The header fields at the top of every email, each exactly once: the six we set, and the two
#: MIME fields of a multipart/alternative message.
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
#: MAIL FROM options when an address is not ASCII, as smtplib's send_message would give them.
SMTPUTF8_OPTIONS = ("SMTPUTF8", "BODY=8BITMIME")

# --- writing the bytes -----------------------------------------------------------------------------

#: RFC 5322 2.1.1: a line SHOULD have at most 78 characters and MUST have at most 998.
_FOLD_AT = 78
_LINE_LIMIT = 998
#: A display name written as it is: RFC 5322 atoms, one space between them.
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
#: RFC 2047 5 (3): the only characters a "Q" encoded word may carry as themselves in every position
#: (a phrase is the strictest); "_" stands for a space and every other octet is written =XX.
_Q_LITERAL = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_Q_OCTET = tuple(
    chr(octet) if octet in _Q_LITERAL else "_" if octet == 0x20 else f"={octet:02X}" for octet in range(256)
)
_EW_OPEN, _EW_CLOSE = "=?utf-8?q?", "?="
#: RFC 2047 2: an encoded word has at most 75 characters, delimiters included.
_EW_LIMIT = 75
#: The largest encoded character: four UTF-8 octets, =XX each.
_EW_LONGEST_CHARACTER = 12
#: The MIME header lines of the top of the message, after ours; the boundary is filled in.
_MULTIPART = 'MIME-Version: 1.0\r\nContent-Type: multipart/alternative;\r\n boundary="{}"\r\n\r\n'
#: The header block of each part, by subtype and transfer encoding; its blank line included.
_PART_HEADERS = {
    (subtype, cte): (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    ).encode("ascii")
    for subtype in ("plain", "html")
    for cte in ("7bit", "quoted-printable")
}


def _encoded_words(text: str, room: int) -> list[str]:
    """``text`` as RFC 2047 ``Q`` encoded words in UTF-8, each holding whole characters.

    Parameters:
      text: any text without lone surrogates.
      room: characters left on the first line; each later word goes on a line of its own
        after one space.

    Returns:
      The words, in order; a reader joins adjacent encoded words without the white space between.
    """
    words: list[str] = []
    budget = max(min(room, _EW_LIMIT), _EW_LONGEST_CHARACTER + 12) - len(_EW_OPEN) - len(_EW_CLOSE)
    pieces: list[str] = []
    size = 0
    for character in text:
        code = ord(character)
        piece = _Q_OCTET[code] if code < 0x80 else "".join(_Q_OCTET[o] for o in character.encode("utf-8"))
        if pieces and size + len(piece) > budget:
            words.append(_EW_OPEN + "".join(pieces) + _EW_CLOSE)
            pieces, size = [], 0
            budget = _EW_LIMIT - len(_EW_OPEN) - len(_EW_CLOSE)
        pieces.append(piece)
        size += len(piece)
    words.append(_EW_OPEN + "".join(pieces) + _EW_CLOSE)
    return words


def _plain(text: str) -> bool:
    """Whether ``text`` can be written as it is: printable ASCII (the space included), nothing else."""
    return text.isascii() and text.isprintable()


def _folded(head: str, text: str) -> str | None:
    """``head`` and printable ASCII ``text``, folded at its spaces into lines of at most 78 characters.

    Returns:
      The lines, each ending in CR LF; None when a word is too long for a line of its own.
    """
    words = text.split(" ")
    lines, line = [], head + words[0]
    for word in words[1:]:
        if word and len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line = " " + word  # folding white space: unfolding drops only the CR LF, not the space
        else:
            line += " " + word
    lines.append(line)
    if any(len(line) > _FOLD_AT for line in lines):
        return None
    return "\r\n".join(lines) + "\r\n"


def _unstructured(name: str, text: str) -> str:
    """The header field ``name: text``, folded, each line ending in CR LF.

    Printable ASCII is written as it is and folded at its spaces; anything else, or a word too long
    for a line, is written as encoded words. ``text`` has been through :func:`header_text`, so it
    holds no ``=?`` of its own; were it handed one, :func:`check_header_block` would see it.
    """
    head = f"{name}: "
    if _plain(text):
        if len(head) + len(text) <= _FOLD_AT:
            return head + text + "\r\n"
        folded = _folded(head, text)
        if folded is not None:
            return folded
    return head + "\r\n ".join(_encoded_words(text, _FOLD_AT - len(head))) + "\r\n"


def _mailbox_field(name: str, display_name: str, addr_spec: str) -> str:
    """A header field with one mailbox: ``name: display name <addr-spec>``, or the bare addr-spec.

    The display name is written as atoms, folded at its spaces if need be; else as one quoted
    string; else as encoded words. Several encoded words in a row are read as RFC 2047 6.2 says
    (the white space between them dropped) by mail clients, but Python 3.11's address parser keeps
    that space: it reads a long non-ASCII name (over about 20 characters) with a space or two
    more, as it reads what its own email package writes.
    """
    head = f"{name}: "
    angle = f"<{addr_spec}>"
    if not display_name:
        return head + addr_spec + "\r\n"
    if _ATOMS.fullmatch(display_name):
        folded = _folded(head, f"{display_name} {angle}")
        if folded is not None:
            return folded
    quoted = '"' + display_name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if _plain(display_name) and len(head) + len(quoted) + 1 + len(angle) <= _FOLD_AT:
        return head + quoted + " " + angle + "\r\n"
    words = _encoded_words(display_name, _FOLD_AT - len(head))
    last_line = (len(head) if len(words) == 1 else 1) + len(words[-1])
    last = " " if last_line + 1 + len(angle) <= _FOLD_AT else "\r\n "
    return head + "\r\n ".join(words) + last + angle + "\r\n"


def _address_list(name: str, addresses: Sequence[str]) -> str:
    """A header field listing addr-specs, folded after a comma when a line would grow too long."""
    line, lines = f"{name}: {addresses[0]}", []
    for address in addresses[1:]:
        if len(line) + 2 + len(address) + 1 > _FOLD_AT:  # room kept for the comma a fold leaves
            lines.append(line + ",")
            line = " " + address
        else:
            line += ", " + address
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def _body(text: str) -> tuple[str, bytes]:
    """A MIME text part's transfer encoding and content: 7bit if it may go as it is, else quoted-printable.

    Lines end in CR LF whichever of CR, LF or CR LF the template wrote, as the email package does.
    Quoted-printable keeps every byte of the message 7-bit clean: a server that does not offer
    8BITMIME takes it as well.
    """
    lines = text.encode("utf-8").splitlines()
    content = b"\r\n".join(lines) + b"\r\n"
    if content.isascii() and b"\x00" not in content and all(len(line) <= _FOLD_AT for line in lines):
        return "7bit", content
    return "quoted-printable", binascii.b2a_qp(content, istext=True)


def _template_values(context: object) -> dict[str, Any]:
    """The fields of a context dataclass as the templates see them: what ``dataclasses.asdict`` gives.

    Nested dataclasses (a product line) become dicts and tuples stay tuples, as with asdict, but
    nothing is deep-copied: the values are immutable (str, int, None, tuples of frozen dataclasses),
    and asdict's copying was a sixth of the renderer's time.
    """
    if not dataclasses.is_dataclass(context) or isinstance(context, type):
        raise TypeError("an email's context must be a dataclass instance")
    return {
        field.name: _template_value(getattr(context, field.name)) for field in dataclasses.fields(context)
    }


def _template_value(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _template_values(value)
    if isinstance(value, tuple | list):
        return type(value)(_template_value(item) for item in value)
    if isinstance(value, dict):
        return {key: _template_value(item) for key, item in value.items()}
    return value


def _over_long_line(head: str) -> bool:
    return any(len(line.encode("utf-8")) > _LINE_LIMIT for line in head.split("\r\n"))


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
        # Without "=?" there is no encoded word, and the value is exactly what a client shows
        # (decode_header returns it whole, make_header joins that one chunk): decoding is skipped.
        shown = _decoded(value) if _ENCODED_WORD_START in value else value
        if _CONTROL_BUT_TAB.search(shown):
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

    Every header value is built here, from :func:`header_text` and :func:`mailbox`, and written
    out as bytes by this module; the bytes pass :func:`check_header_block` before any mailer sees
    them. What does not change between emails (the From line, the templates, the MIME part headers)
    is made once per process.
    """

    def __init__(self, settings: Settings) -> None:
        self.mail_from = self._from_address(settings.mail_from)
        # auto_reload off: the templates ship with the package and do not change while a process
        # runs, so no render asks the loader (a stat of each file, the layout too) if they did.
        self.html = Environment(
            loader=PackageLoader("infra.mail", "templates"),
            autoescape=select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=True),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            auto_reload=False,
        )
        # Plain text and subjects are not HTML: escaping them would show &amp; to the reader.
        # A rendered subject is made safe for its header by header_text, whatever the template.
        self.text = Environment(
            loader=PackageLoader("infra.mail", "templates"),
            autoescape=False,  # noqa: S701 - text/plain and headers, never HTML
            undefined=StrictUndefined,
            auto_reload=False,
        )
        self.subjects = {
            NotificationKind.APPROVE: self.text.from_string(settings.subject_approve),
            NotificationKind.REJECT: self.text.from_string(settings.subject_reject),
            NotificationKind.REVIEW: self.text.from_string(settings.subject_review),
            NotificationKind.EXPIRY_NOTICE: self.text.from_string(settings.subject_expiry_notice),
            NotificationKind.EXPIRED: self.text.from_string(settings.subject_expired),
            NotificationKind.REVIEW_REMINDER: self.text.from_string(settings.subject_review_reminder),
            NotificationKind.REVIEW_ESCALATION: self.text.from_string(settings.subject_review_escalation),
            NotificationKind.REVIEW_EXPIRED: self.text.from_string(settings.subject_review_expired),
        }
        display_name, addr_spec = self.mail_from.display_name, self.mail_from.addr_spec
        self._from_line = _mailbox_field("From", display_name, addr_spec)
        if _over_long_line(self._from_line):
            raise ValueError("ACCESSFLOW_MAIL_FROM must fit on one header line of 998 octets")
        self._date: tuple[int, str] = (0, "")

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
        """The checked bytes of :meth:`encode`, parsed as a mail client reads them; not on the send path.

        Raises:
          PermanentDeliveryError: a recipient, the Message-ID or the serialised headers are refused.
        """
        parsed = email_package.message_from_bytes(self.encode(email).data, policy=default_policy)
        assert isinstance(parsed, EmailMessage)  # the default policy's message factory
        return parsed

    def encode(self, email: Email) -> Outgoing:
        """The envelope and the checked bytes to send; what the mailers deliver.

        Raises:
          PermanentDeliveryError: a recipient, the Message-ID or the serialised headers are refused.
        """
        recipients = self._recipients(email.to)
        if not _MESSAGE_ID.fullmatch(email.message_id):
            _refuse("the Message-ID is not a plain <id@domain>")
        context = _template_values(email.context)
        text_cte, text = _body(self.text.get_template(f"{email.kind.value}.txt.j2").render(context))
        html_cte, html = _body(self.html.get_template(f"{email.kind.value}.html.j2").render(context))
        addresses = tuple(address.addr_spec for address in recipients)
        # A non-ASCII address cannot be written as an encoded word: it needs SMTPUTF8 and raw UTF-8
        # headers, as smtplib's send_message would choose. Text goes as encoded words either way.
        smtputf8 = not (self.mail_from.addr_spec.isascii() and all(a.isascii() for a in addresses))
        boundary = self._boundary(text, html)
        head = "".join(
            (
                self._from_line,
                _address_list("To", addresses),
                _unstructured("Subject", self._text(self.subjects[email.kind].render(context))),
                "Message-ID: ",
                email.message_id,
                "\r\nDate: ",
                self._now(),
                "\r\n",
                _unstructured("X-Accessflow-Request-Id", self._text(str(context["request_id"]))),
                _MULTIPART.format(boundary),
            )
        )
        if _over_long_line(head):
            _refuse("a header line would be longer than 998 octets (RFC 5322 2.1.1)")
        delimiter = b"\r\n--" + boundary.encode("ascii")
        data = b"".join(
            (
                head.encode("utf-8"),
                delimiter[2:],
                b"\r\n",
                _PART_HEADERS["plain", text_cte],
                text,
                delimiter,
                b"\r\n",
                _PART_HEADERS["html", html_cte],
                html,
                delimiter,
                b"--\r\n",
            )
        )
        check_header_block(data, recipients=addresses, utf8=smtputf8)
        return Outgoing(self.mail_from.addr_spec, addresses, data, smtputf8)

    def _now(self) -> str:
        """The Date header's value (RFC 5322 3.3, in UTC), made once a second rather than per email."""
        second = int(time.time())
        cached = self._date  # one read and one write of a tuple: safe from any thread
        if cached[0] != second:
            cached = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
            self._date = cached
        return cached[1]

    @staticmethod
    def _boundary(*parts: bytes) -> str:
        """A random MIME boundary that no part holds (RFC 2046 5.1.1), so no part can end early."""
        while True:
            boundary = "=_af_" + secrets.token_hex(16)
            marker = boundary.encode("ascii")
            if not any(marker in part for part in parts):
                return boundary

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
