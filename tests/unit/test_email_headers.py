"""Names that would inject email headers are refused at the catalogue file, and the renderer's own
two layers (neutralised header values, a check of the serialised bytes) hold without any validator.

The delivery of hostile contexts to a real SMTP server is in tests/integration/test_header_injection.py.
"""

from __future__ import annotations

import base64
import re
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from domain.errors import PermanentDeliveryError
from domain.model import NotificationKind
from domain.notifications import ProductLine, RejectContext
from domain.ports import Email
from infra.cli.main import main
from infra.db import catalogue_file
from infra.mail.render import EXPECTED_HEADERS, EmailRenderer, check_header_block, header_text, mailbox
from infra.mail.transports import FileMailer
from infra.settings import Settings

#: Every way a name has tried to add a ``Bcc: evil@x`` line to an email.
INJECTIONS = {
    "crlf": "\r\nBcc: evil@x",
    "crlf-inside": "Shop\r\nBcc: evil@x",
    "q-encoded-word": "=?utf-8?q?x=0D=0ABcc:_evil@x?=",
    "b-encoded-word": "=?UTF-8?B?" + base64.b64encode(b"x\r\nBcc: evil@x").decode("ascii") + "?=",
}


# --- the catalogue file ------------------------------------------------------------------------------


def _catalogue(**names: str) -> dict[str, object]:
    return {
        "products": [
            {"id": "payments", "name": names.get("product", "Payments API"), "auth_method": "api_key"}
        ],
        "plans": [
            {
                "id": "starter",
                "name": names.get("plan", "Starter"),
                "auto_approve": True,
                "rate_limit_per_minute": 60,
                "products": ["payments"],
            }
        ],
        "consumers": [{"id": "acme", "email": "dev@acme.example", "name": names.get("consumer", "Acme")}],
        "apps": [{"id": "acme-checkout", "consumer": "acme", "name": names.get("app", "Checkout")}],
    }


#: Which entry of the file the hostile name is given to, and where pydantic reports it.
ENTRIES = {
    "product": "products.0.name",
    "plan": "plans.0.name",
    "consumer": "consumers.0.name",
    "app": "apps.0.name",
}


class TestTheCatalogueFile:
    def test_accepts_plain_names(self, tmp_path: Path) -> None:
        path = tmp_path / "catalog.yaml"
        path.write_text(yaml.safe_dump(_catalogue()))
        assert catalogue_file.read(path).apps[0].name == "Checkout"

    @pytest.mark.parametrize("value", INJECTIONS.values(), ids=INJECTIONS.keys())
    @pytest.mark.parametrize("entry", ENTRIES)
    def test_refuses_a_header_injection_in_any_name_and_says_where(
        self, tmp_path: Path, entry: str, value: str
    ) -> None:
        path = tmp_path / "catalog.yaml"
        path.write_text(yaml.safe_dump(_catalogue(**{entry: value})))

        with pytest.raises(catalogue_file.CatalogueFileError) as refused:
            catalogue_file.read(path)

        assert ENTRIES[entry] in str(refused.value)
        expected = "encoded word" if value.startswith("=?") else "control characters or line breaks"
        assert expected in str(refused.value)

    def test_catalog_load_refuses_it_before_touching_the_database(self, tmp_path: Path) -> None:
        path = tmp_path / "catalog.yaml"
        path.write_text(yaml.safe_dump(_catalogue(app=INJECTIONS["q-encoded-word"])))

        result = CliRunner().invoke(main, ["catalog", "load", str(path)])

        assert result.exit_code == 1
        assert "is not a valid catalogue" in result.output
        assert "apps.0.name" in result.output
        assert "must not contain '=?'" in result.output and "RFC 2047 encoded word" in result.output


# --- header values -----------------------------------------------------------------------------------


class TestHeaderText:
    @pytest.mark.parametrize("value", INJECTIONS.values(), ids=INJECTIONS.keys())
    def test_leaves_no_line_break_and_no_encoded_word(self, value: str) -> None:
        text = header_text(value)
        assert "=?" not in text
        assert not any(character in text for character in "\r\n\x00\x85\u2028\u2029")

    @pytest.mark.parametrize("value", ["==??", "=\r?", "=\x00?", "= ?=??="])
    def test_a_broken_up_encoded_word_cannot_form_again(self, value: str) -> None:
        assert "=?" not in header_text(value)

    def test_keeps_an_ordinary_name_as_it_is(self) -> None:
        assert header_text("Zoë's Shop & Co. <Devs> (beta) = 1?") == "Zoë's Shop & Co. <Devs> (beta) = 1?"


class TestMailbox:
    @pytest.mark.parametrize(
        "address", ["dev@acme.example", "a.b+tag@x.example", "zoë@exämple.example", "root@localhost"]
    )
    def test_accepts_a_plain_address(self, address: str) -> None:
        assert mailbox(address).addr_spec == address

    @pytest.mark.parametrize(
        "address",
        [
            "dev@acme.example\r\nBcc: evil@x",
            "=?utf-8?q?x?=@acme.example",
            "dev@acme.example, evil@x",
            "Dev <dev@acme.example>",
            '"dev x"@acme.example',
            "dev@[127.0.0.1]",
            "dev",
            "dev@",
        ],
    )
    def test_refuses_anything_the_email_package_would_parse(self, address: str) -> None:
        with pytest.raises(ValueError):
            mailbox(address)


# --- the check of the serialised bytes -----------------------------------------------------------------

_HEAD = [
    b"From: accessflow <no-reply@accessflow.local>",
    b"To: dev@acme.example",
    b"Subject: Your access request for Shop was declined",
    b"Message-ID: <reject.1@accessflow.local>",
    b"Date: Thu, 26 Nov 2026 10:00:00 GMT",
    b"X-Accessflow-Request-Id: 1",
    b"Content-Type: multipart/alternative;",
    b' boundary="===============1=="',
    b"MIME-Version: 1.0",
]


def _message(head: list[bytes]) -> bytes:
    return b"\r\n".join(head) + b"\r\n\r\nbody\r\n"


class TestTheHeaderCheck:
    def test_passes_the_header_block_we_build(self) -> None:
        check_header_block(_message(_HEAD), recipients=["dev@acme.example"])

    @pytest.mark.parametrize(
        ("head", "reason"),
        [
            (
                [*_HEAD[:2], b"Subject: Declined: x", b"Bcc: evil@x", *_HEAD[3:]],
                "recipients we did not set, in bcc",
            ),
            ([*_HEAD, b"Cc: evil@x"], "recipients we did not set, in cc"),
            ([*_HEAD, b"Resent-To: evil@x"], "recipients we did not set"),
            ([*_HEAD, b"X-Evil: 1"], "extra ['x-evil']"),
            ([*_HEAD, _HEAD[2]], "repeated ['subject']"),
            ([h for h in _HEAD if not h.startswith(b"Date")], "missing ['date']"),
            ([*_HEAD[:2], b"Subject: Declined: x\nBcc: evil@x", *_HEAD[3:]], "bare CR or LF"),
            ([*_HEAD[:2], b"Subject: Declined: x\rBcc: evil@x", *_HEAD[3:]], "bare CR or LF"),
            (
                # How a Python with the fix for cpython #121650 writes the decoded value back out.
                [*_HEAD[:2], b"Subject: Declined: =?utf-8?q?x=0D=0ABcc=3A_evil=40x?=", *_HEAD[3:]],
                "hides a line break",
            ),
            (
                [*_HEAD[:2], b"Subject: =?UTF-8?B?eA0KQmNjOiBldmlsQHg=?=", *_HEAD[3:]],
                "hides a line break",
            ),
            ([*_HEAD[:2], b"Subject: =?no-such-charset?q?x?=", *_HEAD[3:]], "does not decode"),
            ([_HEAD[0], b"To: dev@acme.example, evil@x", *_HEAD[2:]], "exactly the envelope recipients"),
            ([b" folded: first", *_HEAD], "no field name"),
            ([*_HEAD[:2], b"Subject: Zo\xc3\xab", *_HEAD[3:]], "not ASCII"),
        ],
        ids=[
            "bcc",
            "cc",
            "resent-to",
            "unknown",
            "twice",
            "missing",
            "bare-lf",
            "bare-cr",
            "q-encoded-crlf",
            "b-encoded-crlf",
            "bad-charset",
            "to-differs",
            "leading-fold",
            "8bit",
        ],
    )
    def test_refuses_anything_else_for_good(self, head: list[bytes], reason: str) -> None:
        with pytest.raises(PermanentDeliveryError, match="refused to send") as refused:
            check_header_block(_message(head), recipients=["dev@acme.example"])
        assert reason in str(refused.value)

    def test_refuses_a_message_without_a_blank_line(self) -> None:
        with pytest.raises(PermanentDeliveryError, match="no blank line"):
            check_header_block(b"\r\n".join(_HEAD), recipients=["dev@acme.example"])

    def test_expects_our_six_headers_and_the_two_mime_ones(self) -> None:
        assert sorted(EXPECTED_HEADERS) == sorted(
            [
                "from",
                "to",
                "subject",
                "message-id",
                "date",
                "x-accessflow-request-id",
                "mime-version",
                "content-type",
            ]
        )


# --- the renderer, with no validator in front of it -----------------------------------------------------


def _header_names(data: bytes) -> list[str]:
    """The field names of the top header block, read as a lenient server would (CR, LF or CR LF)."""
    head = re.split(rb"\r\n\r\n|\n\n", data, maxsplit=1)[0]
    lines = re.split(rb"\r\n|\r|\n", head)
    return [
        line.split(b":", 1)[0].strip().lower().decode()
        for line in lines
        if not line.startswith((b" ", b"\t"))
    ]


def _reject(
    app_name: str = "Shop", to: tuple[str, ...] = ("dev@acme.example",), message_id: str = ""
) -> Email:
    request_id = str(uuid.uuid4())
    return Email(
        kind=NotificationKind.REJECT,
        to=to,
        message_id=message_id or f"<reject.{request_id}@accessflow.local>",
        context=RejectContext(
            request_id=request_id,
            consumer_name="Acme",
            app_name=app_name,
            plan_name="Partner",
            products=(ProductLine("payments", "Payments API"),),
            reason="Not now.",
        ),
    )


class TestTheRenderer:
    @pytest.mark.parametrize("value", INJECTIONS.values(), ids=INJECTIONS.keys())
    def test_sends_exactly_the_bytes_it_checked(self, value: str) -> None:
        outgoing = EmailRenderer(Settings()).encode(_reject(app_name=value))
        check_header_block(outgoing.data, recipients=outgoing.recipients)  # the same check, again
        assert outgoing.recipients == ("dev@acme.example",)
        assert outgoing.sender == "no-reply@accessflow.local"
        assert sorted(_header_names(outgoing.data)) == sorted(EXPECTED_HEADERS)

    @pytest.mark.parametrize("message_id", ["<a@b>\r\nBcc: evil@x", "<=?utf-8?q?x?=@b>", "a@b"])
    def test_refuses_a_message_id_that_is_not_plain(self, message_id: str) -> None:
        with pytest.raises(PermanentDeliveryError, match="Message-ID"):
            EmailRenderer(Settings()).encode(_reject(message_id=message_id))

    def test_refuses_an_email_without_recipients(self) -> None:
        with pytest.raises(PermanentDeliveryError, match="no recipient"):
            EmailRenderer(Settings()).encode(_reject(to=()))

    def test_puts_a_non_ascii_address_in_raw_utf8_for_smtputf8(self) -> None:
        outgoing = EmailRenderer(Settings()).encode(_reject(to=("zoë@acme.example",)))
        assert outgoing.smtputf8
        assert "To: zoë@acme.example\r\n".encode() in outgoing.data

    @pytest.mark.parametrize(
        "mail_from",
        [
            "accessflow =?utf-8?q?x=0D=0ABcc:_evil@x?= <no-reply@accessflow.local>",
            "accessflow <no-reply@accessflow.local>\r\nBcc: evil@x",
            "a@accessflow.local, evil@x",
            "accessflow <no-reply@accessflow.local",
        ],
    )
    def test_refuses_a_from_setting_that_is_not_one_plain_address(self, mail_from: str) -> None:
        with pytest.raises(ValueError, match="ACCESSFLOW_MAIL_FROM"):
            EmailRenderer(Settings(mail_from=mail_from))

    def test_the_file_mailer_writes_the_checked_bytes(self, tmp_path: Path) -> None:
        email = _reject(app_name=INJECTIONS["q-encoded-word"])

        FileMailer(tmp_path, EmailRenderer(Settings())).send(email)

        [written] = tmp_path.glob("*.eml")
        assert sorted(_header_names(written.read_bytes())) == sorted(EXPECTED_HEADERS)
