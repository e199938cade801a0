"""Emails rendered from the templates and delivered to a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import uuid

import pytest

from domain.errors import PermanentDeliveryError, TransientError
from domain.model import NotificationKind
from domain.notifications import ApproveContext, ProductLine, RejectContext
from domain.ports import Email
from infra.email import EmailRenderer, SmtpMailer
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
