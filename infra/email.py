"""Rendering emails from Jinja2 templates, and delivering them by SMTP or to .eml files."""

from __future__ import annotations

import dataclasses
import re
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

import structlog
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from domain.errors import PermanentDeliveryError, TransientError
from domain.model import NotificationKind
from domain.ports import Email
from infra.settings import Settings

log = structlog.get_logger()

_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def _header(value: str) -> str:
    # Python 3.11.7 predates the fix for cpython #121650, so never let a line break reach a header.
    return _HEADER_UNSAFE.sub(" ", value).strip()


class EmailRenderer:
    """Turns an :class:`Email` into a MIME message with a plain-text and an HTML part."""

    def __init__(self, settings: Settings) -> None:
        self.mail_from = _header(settings.mail_from)
        self.html = Environment(
            loader=PackageLoader("infra", "templates"),
            autoescape=select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=True),
            undefined=StrictUndefined,
            keep_trailing_newline=True,
        )
        # Plain text and subjects are not HTML: escaping them would show &amp; to the reader.
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

    def render(self, email: Email) -> EmailMessage:
        context: dict[str, Any] = dataclasses.asdict(email.context)  # type: ignore[call-overload]
        message = EmailMessage()
        message["From"] = self.mail_from
        message["To"] = ", ".join(_header(address) for address in email.to)
        message["Subject"] = _header(self.subjects[email.kind].render(context))
        message["Message-ID"] = email.message_id
        message["Date"] = formatdate(localtime=False, usegmt=True)
        message["X-Accessflow-Request-Id"] = context["request_id"]
        message.set_content(self.text.get_template(f"{email.kind.value}.txt.j2").render(context))
        message.add_alternative(
            self.html.get_template(f"{email.kind.value}.html.j2").render(context), subtype="html"
        )
        return message


class SmtpMailer:
    """Delivers over SMTP with a socket timeout; maps the server's answer onto our errors."""

    def __init__(self, settings: Settings, renderer: EmailRenderer) -> None:
        self.settings = settings
        self.renderer = renderer

    def send(self, email: Email) -> None:
        message = self.renderer.render(email)
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
                smtp.send_message(message)
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
        message = self.renderer.render(email)
        safe_id = re.sub(r"[^A-Za-z0-9._@-]", "", email.message_id)
        path = self.directory / f"{safe_id}.eml"
        path.write_bytes(bytes(message))
        log.info("email.written", kind=email.kind.value, path=str(path))
