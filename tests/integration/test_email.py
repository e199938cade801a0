"""Emails rendered from the templates and delivered to a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import email as email_package
import email.policy
import uuid
from email.message import EmailMessage

import pytest

from domain.errors import PermanentDeliveryError, TransientError
from domain.model import NotificationKind
from domain.notifications import ApproveContext, ProductLine, RejectContext
from domain.ports import Email
from infra.mail.render import EmailRenderer
from infra.mail.transports import SmtpMailer
from infra.settings import Settings
from tests import services as svc

pytestmark = pytest.mark.integration


def reject_email(reason: str = "Not <b>now</b> & not here") -> Email:
    request_id = str(uuid.uuid4())
    return Email(
        kind=NotificationKind.REJECT,
        to=("dev@acme.example",),
        message_id=f"<reject.{request_id}@accessflow.local>",
        context=RejectContext(
            request_id=request_id,
            consumer_name="Acme <Devs>",
            app_name="Shop",
            plan_name="Partner",
            products=(ProductLine("payments", "Payments API"),),
            reason=reason,
        ),
    )


@pytest.fixture
def mailer(settings: Settings, smtp: svc.SmtpSink) -> SmtpMailer:
    configured = settings.model_copy(update={"subject_reject": "Declined: {{ app_name }} ({{ plan_name }})"})
    return SmtpMailer(configured, EmailRenderer(configured))


class TestSmtpDelivery:
    def test_sends_a_plain_and_an_html_part_with_the_configured_subject(
        self, mailer: SmtpMailer, smtp: svc.SmtpSink
    ) -> None:
        email = reject_email()

        mailer.send(email)

        [received] = smtp.about(email.context.request_id)  # type: ignore[attr-defined]
        assert received["Subject"] == "Declined: Shop (Partner)"
        assert received["Message-ID"] == email.message_id
        text = received.get_body(("plain",)).get_content()
        html = received.get_body(("html",)).get_content()
        assert "Not <b>now</b> & not here" in text
        assert "Not &lt;b&gt;now&lt;/b&gt; &amp; not here" in html  # autoescaped
        assert "Acme &lt;Devs&gt;" in html

    def test_a_4xx_reply_is_transient(self, mailer: SmtpMailer, smtp: svc.SmtpSink) -> None:
        smtp.fail_next.append("451 4.3.0 try again later")
        with pytest.raises(TransientError, match="451"):
            mailer.send(reject_email())

    def test_a_5xx_reply_is_permanent(self, mailer: SmtpMailer, smtp: svc.SmtpSink) -> None:
        smtp.fail_next.append("554 5.7.1 rejected")
        with pytest.raises(PermanentDeliveryError, match="554"):
            mailer.send(reject_email())

    def test_an_unreachable_server_is_transient(self, settings: Settings) -> None:
        nowhere = settings.model_copy(update={"smtp_port": svc.free_port(), "smtp_timeout_seconds": 2})
        with pytest.raises(TransientError, match="unreachable"):
            SmtpMailer(nowhere, EmailRenderer(nowhere)).send(reject_email())


class TestTheApproveEmail:
    def test_names_the_credential_but_never_carries_a_secret(self, settings: Settings) -> None:
        context = ApproveContext(
            request_id=str(uuid.uuid4()),
            consumer_name="Acme",
            app_id="acme-checkout",
            app_name="Checkout",
            plan_name="Starter",
            products=(ProductLine("payments", "Payments API"),),
            rate_limit_per_minute=60,
            monthly_quota=None,
            credential_kind="api_key",
            credential_public_id="af_0123abcd",
        )
        rendered = EmailRenderer(settings).render(
            Email(
                kind=NotificationKind.APPROVE, to=("dev@acme.example",), message_id="<m@x>", context=context
            )
        )
        body = rendered.get_body(("plain",)).get_content()
        assert "af_0123abcd" in body and "unlimited" in body and "60 requests per minute" in body
        assert not hasattr(context, "secret")  # the context type has no field a secret could travel in


class TestNonAsciiNamesAndSubjects:
    def test_arrive_as_written_when_the_bytes_the_server_received_are_parsed(
        self, settings: Settings, smtp: svc.SmtpSink
    ) -> None:
        # Given a sender name, names and a subject template that are not ASCII, and a subject long
        # enough to be folded into several encoded words
        configured = settings.model_copy(
            update={
                "mail_from": "Zoë Ångström <no-reply@accessflow.local>",
                "subject_reject": "Abgelehnt: {{ app_name }} für {{ consumer_name }} · {{ plan_name }}",
            }
        )
        request_id = str(uuid.uuid4())
        sent = Email(
            kind=NotificationKind.REJECT,
            to=("dev@acme.example",),
            message_id=f"<reject.{request_id}@accessflow.local>",
            context=RejectContext(
                request_id=request_id,
                consumer_name="Müller & Söhne 株式会社",
                app_name="Zahlungsverkehr-Schnittstelle für Händler 🙂",
                plan_name="Großkunden",
                products=(ProductLine("payments", "Zahlungs-API"),),
                reason="Nicht jetzt · bitte später erneut anfragen.",
            ),
        )

        # When it is sent to a real SMTP server
        SmtpMailer(configured, EmailRenderer(configured)).send(sent)

        # Then the bytes it received were 7-bit, and parsed under the default policy they read
        # back as the values we rendered
        [(raw, recipients)] = smtp.raw_about(request_id)
        assert raw.isascii() and recipients == ["dev@acme.example"]
        parsed = email_package.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        assert str(parsed["Subject"]) == (
            "Abgelehnt: Zahlungsverkehr-Schnittstelle für Händler 🙂 für Müller & Söhne 株式会社 · Großkunden"
        )
        [sender] = parsed["From"].addresses
        assert (sender.display_name, sender.addr_spec) == ("Zoë Ångström", "no-reply@accessflow.local")
        assert parsed["X-Accessflow-Request-Id"] == request_id
        text_part, html_part = parsed.get_body(("plain",)), parsed.get_body(("html",))
        assert text_part is not None and html_part is not None
        text, html = text_part.get_content(), html_part.get_content()
        assert "Hello Müller & Söhne 株式会社," in text
        assert "Nicht jetzt · bitte später erneut anfragen." in text
        assert "Zahlungsverkehr-Schnittstelle für Händler 🙂" in text
        assert "Hello Müller &amp; Söhne 株式会社," in html  # autoescaped
        assert "<blockquote>Nicht jetzt · bitte später erneut anfragen.</blockquote>" in html
