"""The renderer writes every byte itself (issue 7): what it writes reads back, through the email
package's default policy, as exactly the values it was given, for any text.

The header-injection properties of the same bytes are in test_email_headers.py and
tests/integration/test_header_injection.py; the delivery of them in tests/integration/test_email.py.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re
import secrets
import uuid
from email.header import decode_header, make_header
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.errors import PermanentDeliveryError
from domain.model import NotificationKind
from domain.notifications import ApproveContext, ProductLine, RejectContext, ReviewContext
from domain.ports import Email
from infra.mail.render import EmailRenderer, Outgoing, _decoded, _mailbox_field, _template_values, header_text
from infra.settings import Settings

#: Any text a row could hold: every code point but lone surrogates, which PostgreSQL refuses.
TEXT = st.text(st.characters(codec="utf-8"), max_size=300)
#: Long runs of one word, and many short words: the two ways a header line grows too long.
LONG = st.one_of(
    TEXT,
    st.text(st.characters(codec="utf-8"), min_size=70, max_size=1500),
    st.lists(st.sampled_from(["Zoë", "API", "für", "x" * 40, "=", "?", '"', "(", "\\"]), max_size=80).map(
        " ".join
    ),
)
ADDRESS = st.from_regex(r"[a-z0-9][a-z0-9.+-]{0,20}@[a-z0-9]{1,10}\.example", fullmatch=True).filter(
    lambda a: ".." not in a and not a.split("@")[0].endswith(".")
)


def _reject(**fields: Any) -> Email:
    request_id = fields.pop("request_id", str(uuid.uuid4()))
    to = fields.pop("to", ("dev@acme.example",))
    values: dict[str, Any] = {
        "request_id": request_id,
        "consumer_name": "Acme",
        "app_name": "Shop",
        "plan_name": "Partner",
        "products": (ProductLine("payments", "Payments API"),),
        "reason": "Not now.",
        **fields,
    }
    return Email(
        kind=NotificationKind.REJECT,
        to=to,
        message_id=f"<reject.{uuid.uuid4()}@accessflow.local>",
        context=RejectContext(**values),
    )


def _parsed(outgoing: Outgoing) -> EmailMessage:
    parsed = email.message_from_bytes(outgoing.data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert not parsed.defects
    return parsed


def _lines(text: str) -> list[str]:
    """Text split where a MIME body ends a line: CR LF, CR or LF (the body is sent with CR LF)."""
    return re.split(r"\r\n|\r|\n", text.removesuffix("\n").removesuffix("\r"))


RENDERER = EmailRenderer(Settings(subject_reject="{{ app_name }}"))


class TestTheSubject:
    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(LONG)
    def test_reads_back_as_the_text_it_was_given(self, value: str) -> None:
        # Given any app name, in a subject that is only the app name
        outgoing = RENDERER.encode(_reject(app_name=value))

        # When a mail client parses the bytes
        parsed = _parsed(outgoing)

        # Then it shows the neutralised text, exactly, and the bytes are 7-bit with short lines
        assert str(parsed["Subject"]) == header_text(value)
        assert outgoing.data.isascii()
        head = outgoing.data.partition(b"\r\n\r\n")[0]
        assert all(len(line) <= 78 for line in head.split(b"\r\n"))

    def test_writes_printable_ascii_as_it_is(self) -> None:
        outgoing = RENDERER.encode(_reject(app_name="Shop & Co. (beta) = 1?"))
        assert b"\r\nSubject: Shop & Co. (beta) = 1?\r\n" in outgoing.data

    def test_writes_other_text_as_q_encoded_words(self) -> None:
        outgoing = RENDERER.encode(_reject(app_name="Zoë"))
        assert b"\r\nSubject: =?utf-8?q?Zo=C3=AB?=\r\n" in outgoing.data


class TestTheRequestIdHeader:
    @settings(max_examples=100)
    @given(TEXT)
    def test_reads_back_as_the_text_it_was_given(self, value: str) -> None:
        parsed = _parsed(RENDERER.encode(_reject(request_id=value)))
        assert str(parsed["X-Accessflow-Request-Id"]) == header_text(value)


class TestTheFromHeader:
    @settings(max_examples=300)
    @given(LONG)
    def test_reads_back_as_the_display_name_and_address(self, value: str) -> None:
        # Given any display name, neutralised as the renderer does with the setting's
        name = header_text(value)
        line = _mailbox_field("From", name, "no-reply@accessflow.local")

        # Then lines fit, and a mail client reads back the name and the address
        assert line.isascii() and all(len(part) <= 78 for part in line.split("\r\n"))
        unfolded = line.removeprefix("From: ").removesuffix("\r\n").replace("\r\n", "")
        if "=?" in unfolded:
            # Encoded words, read as RFC 2047 6.2 says (email.header does; Python 3.11's address
            # parser keeps the white space between adjacent encoded words, see _mailbox_field).
            assert str(make_header(decode_header(unfolded))) == f"{name} <no-reply@accessflow.local>"
        else:
            parsed = email.message_from_bytes(
                line.encode("ascii") + b"\r\nx\r\n", policy=email.policy.default
            )
            [address] = parsed["From"].addresses
            assert (address.display_name, address.addr_spec) == (name or "", "no-reply@accessflow.local")
            assert not parsed["From"].defects

    @pytest.mark.parametrize(
        ("setting", "line"),
        [
            ("accessflow <no-reply@accessflow.local>", b"From: accessflow <no-reply@accessflow.local>\r\n"),
            ("no-reply@accessflow.local", b"From: no-reply@accessflow.local\r\n"),
            ('"Acme, Inc." <no-reply@acme.example>', b'From: "Acme, Inc." <no-reply@acme.example>\r\n'),
            ("Zoë <no-reply@acme.example>", b"From: =?utf-8?q?Zo=C3=AB?= <no-reply@acme.example>\r\n"),
        ],
    )
    def test_from_the_setting(self, setting: str, line: bytes) -> None:
        outgoing = EmailRenderer(Settings(mail_from=setting)).encode(_reject())
        assert outgoing.data.startswith(line)


class TestTheToHeader:
    @settings(max_examples=100)
    @given(st.lists(ADDRESS, min_size=1, max_size=30))
    def test_names_every_recipient_in_order_on_lines_that_fit(self, addresses: list[str]) -> None:
        outgoing = RENDERER.encode(_reject(to=tuple(addresses)))

        parsed = _parsed(outgoing)

        assert [a.addr_spec for a in parsed["To"].addresses] == addresses
        assert outgoing.recipients == tuple(addresses)
        head = outgoing.data.partition(b"\r\n\r\n")[0]
        assert all(len(line) <= 78 for line in head.split(b"\r\n"))

    def test_a_line_longer_than_998_octets_is_refused(self) -> None:
        # RFC 5322 2.1.1: a server may cut such a line, or refuse the message; an address cannot fold.
        with pytest.raises(PermanentDeliveryError, match="998"):
            RENDERER.encode(_reject(to=("x" * 1000 + "@acme.example",)))


class TestTheBody:
    @settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
    @given(LONG)
    def test_both_parts_read_back_as_the_rendered_templates(self, reason: str) -> None:
        # Given any reason, which both templates show
        sent = _reject(reason=reason)
        values = _template_values(sent.context)

        parsed = _parsed(RENDERER.encode(sent))

        # Then each part decodes to what its template rendered, line for line
        text_part, html_part = parsed.get_body(("plain",)), parsed.get_body(("html",))
        assert text_part is not None and html_part is not None
        text = RENDERER.text.get_template("reject.txt.j2").render(values)
        html = RENDERER.html.get_template("reject.html.j2").render(values)
        assert _lines(text_part.get_content()) == _lines(text)
        assert _lines(html_part.get_content()) == _lines(html)
        assert parsed.get_content_type() == "multipart/alternative"
        assert [part.get_content_charset() for part in parsed.iter_parts()] == ["utf-8", "utf-8"]

    def test_plain_ascii_with_short_lines_goes_as_7bit_and_anything_else_as_quoted_printable(self) -> None:
        parsed = _parsed(RENDERER.encode(_reject(reason="Nicht jetzt, später.")))
        text_part, html_part = parsed.get_body(("plain",)), parsed.get_body(("html",))
        assert text_part is not None and html_part is not None
        assert text_part["Content-Transfer-Encoding"] == "quoted-printable"  # "später"
        plain = _parsed(RENDERER.encode(_reject())).get_body(("plain",))
        assert plain is not None and plain["Content-Transfer-Encoding"] == "7bit"

    def test_the_boundary_is_one_that_no_part_holds(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Given a reason that holds the first boundary the renderer will draw
        drawn = iter(["0" * 32, "1" * 32])
        monkeypatch.setattr(secrets, "token_hex", lambda _: next(drawn))
        sent = _reject(reason="--=_af_" + "0" * 32 + "--")

        outgoing = RENDERER.encode(sent)

        # Then it draws another, and the message still has exactly two parts
        assert b'boundary="=_af_' + b"1" * 32 + b'"' in outgoing.data
        assert len(list(_parsed(outgoing).iter_parts())) == 2


class TestTheDateHeader:
    def test_is_an_rfc_5322_date_in_utc(self) -> None:
        parsed = _parsed(RENDERER.encode(_reject()))
        assert parsed["Date"].datetime.utcoffset().total_seconds() == 0


class TestTheTemplateValues:
    @pytest.mark.parametrize(
        "context",
        [
            RejectContext(
                "r", "Acme", "Shop", "Partner", (ProductLine("p", "P"), ProductLine("q", "Q")), "No."
            ),
            ReviewContext("r", "acme", "Acme", "dev@acme.example", "Shop", "Partner", (), "Card payments."),
            ApproveContext(
                "r", "Acme", "shop", "Shop", "Starter", (ProductLine("p", "P"),), 60, None, "api_key", "af_1"
            ),
        ],
        ids=["reject", "review", "approve"],
    )
    def test_are_what_dataclasses_asdict_gives(self, context: object) -> None:
        assert _template_values(context) == dataclasses.asdict(context)  # type: ignore[call-overload]


class TestTheHeaderCheckWithoutEncodedWords:
    @settings(max_examples=500)
    @given(TEXT.filter(lambda value: "=?" not in value))
    def test_decoding_a_value_without_an_encoded_word_changes_nothing(self, value: str) -> None:
        # Why check_header_block may skip the decoding of such a value: it is the identity on it.
        assert _decoded(value) == value
