"""Review deadlines end to end: real workers, RabbitMQ, PostgreSQL and the SMTP sink.

The sweep is the one the decisions pool runs every ACCESSFLOW_REVIEW_SWEEP_SECONDS, called here
with the clock injected: nothing waits for a deadline to pass.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from email.message import EmailMessage

import pytest

from domain.model import AccessRequest, Status
from infra.bootstrap import Services
from infra.messaging.lifecycle import sweep_review_deadlines
from tests import services as svc
from tests.conftest import ADMIN, ADMIN_ID, ESCALATION
from tests.e2e.conftest import PortalClient, cli, request_payload, wait_for_status

pytestmark = pytest.mark.usefixtures("worker_pools")

HOUR = timedelta(hours=1)


def stored(services: Services, request_id: str) -> AccessRequest:
    with services.uow() as uow:
        request = uow.requests.get(request_id)
    assert request is not None
    return request


class TestAReviewDeadline:
    def test_reminds_the_admins_escalates_then_expires_the_request_and_ignores_a_late_decision(
        self,
        portal: PortalClient,
        services: Services,
        env: dict[str, str],
        admin_env: dict[str, str],
        smtp: svc.SmtpSink,
    ) -> None:
        # Given a request parked for review under a plan whose requests wait 48 hours at most
        request_id = portal.submit(request_payload(plan_id="timed"))
        wait_for_status(services, request_id, Status.PENDING_REVIEW)
        deadline = stored(services, request_id).review_deadline_at
        assert deadline is not None
        shown = json.loads(cli(env, "requests", "show", request_id, "--json").stdout)
        assert datetime.fromisoformat(shown["review_deadline_at"]) == deadline

        def sweep_at(moment: datetime) -> None:
            sweep_review_deadlines(services, now=lambda: moment)

        def mails(word: str) -> list[EmailMessage]:
            return [m for m in smtp.about(request_id) if word in m["Subject"]]

        # When the sweep runs 30 hours before: nothing is due
        sweep_at(deadline - 30 * HOUR)
        assert stored(services, request_id).review_notices == ""
        # When it runs 23 hours before: the 24-hour reminder, to the admins; again at once: nothing new
        sweep_at(deadline - 23 * HOUR)
        sweep_at(deadline - 23 * HOUR)
        svc.wait_until(lambda: len(mails("Reminder")) == 1, what="the 24-hour reminder")
        # When it runs 3 hours before: the 4-hour reminder
        sweep_at(deadline - 3 * HOUR)
        svc.wait_until(lambda: len(mails("Reminder")) == 2, what="the 4-hour reminder")
        # When it runs an hour before: the escalation, to the escalation list, once
        sweep_at(deadline - HOUR)
        sweep_at(deadline - HOUR / 2)
        svc.wait_until(lambda: len(mails("Escalation")) == 1, what="the escalation")
        assert stored(services, request_id).review_notices == "24h,4h,escalated"
        assert stored(services, request_id).status is Status.PENDING_REVIEW

        # When it runs at the deadline: the request expires, the consumer is told, and the portal
        sweep_at(deadline)
        wait_for_status(services, request_id, Status.EXPIRED)
        svc.wait_until(lambda: len(mails("expired unreviewed")) == 1, what="the consumer's email")
        events = portal.wait_for_events(request_id, "access_request.expired")
        [expired] = [e for e in events if e["event"] == "access_request.expired"]
        assert expired["status"] == "expired"
        assert "no review decision by the deadline" in expired["reason"]

        # Then each email went to whom it concerns, once, with its own Message-ID
        reminders, escalation, consumer = mails("Reminder"), mails("Escalation"), mails("expired unreviewed")
        assert {m["To"] for m in reminders} == {ADMIN}
        assert [m["To"] for m in escalation] == [ESCALATION]
        assert [m["To"] for m in consumer] == ["dev@acme.example"]
        everything = [*reminders, *escalation, *consumer]
        assert len({m["Message-ID"] for m in everything}) == 4
        # And the audit trail says the sweep expired it, and why
        shown = json.loads(cli(env, "requests", "show", request_id, "--json").stdout)
        last = shown["audit"][-1]
        assert (last["from"], last["to"], last["actor"]) == (
            "pending_review",
            "expired",
            "system:review-deadline-sweep",
        )

        # When an admin approves it after the expiry
        cli(admin_env, "decide", request_id, "approve", "--reason", "sorry, late", "--admin", ADMIN_ID)

        # Then the decision is recorded as ignored, and the request stays expired
        def decisions() -> list[dict[str, str]]:
            shown = json.loads(cli(env, "requests", "show", request_id, "--json").stdout)
            return list(shown["decisions"])

        [late] = svc.wait_until(lambda: decisions(), what="the late decision to be recorded")
        assert (late["outcome"], late["outcome_reason"]) == (
            "ignored",
            "request is expired, not pending review",
        )
        assert stored(services, request_id).status is Status.EXPIRED
