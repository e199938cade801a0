"""The product, end to end: real worker processes, RabbitMQ, PostgreSQL and an SMTP sink."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from nacl.exceptions import CryptoError

from domain.handlers import derived_id
from domain.model import Plan, Status
from infra.bootstrap import Services
from infra.db import orm
from infra.settings import Settings
from messages.routes import SUBMIT
from tests import services as svc
from tests.conftest import ADMIN, ADMIN_ID, Boundary
from tests.e2e.conftest import (
    PortalClient,
    cli,
    outbox_drained,
    publish_decision,
    request_payload,
    status_of,
    wait_for_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("worker_pools")]


def submit_file(portal: PortalClient, tmp_path: Path, payload: dict[str, object]) -> str:
    """Submit with the CLI, as the portal's AMQP user."""
    path = tmp_path / f"{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(payload))
    return cli(portal.env, "submit", "--portal", portal.party.id, str(path)).stdout.strip()


def credentials_of(services: Services, request_id: str) -> list[sa.Row[tuple[object, ...]]]:
    with services.engine.connect() as connection:
        return list(
            connection.execute(sa.select(orm.credentials).where(orm.credentials.c.request_id == request_id))
        )


def audit_of(services: Services, request_id: str) -> list[tuple[str | None, str]]:
    with services.uow() as uow:
        request = uow.requests.get(request_id)
        assert request is not None
        return [(e.from_status and e.from_status.value, e.to_status.value) for e in request.history]


def wait_for_email(smtp: svc.SmtpSink, request_id: str, subject_part: str) -> None:
    svc.wait_until(
        lambda: any(subject_part in m["Subject"] for m in smtp.about(request_id)),
        what=f"an email '{subject_part}' about {request_id}",
    )


class TestAutoApprovePlan:
    def test_gives_credentials_and_exactly_one_approve_email(
        self, portal: PortalClient, services: Services, smtp: svc.SmtpSink, tmp_path: Path
    ) -> None:
        # Given a request for the auto-approve Starter plan, submitted with the CLI by Acme's portal
        request_id = submit_file(portal, tmp_path, request_payload(product_ids=["payments", "ledger"]))

        # When the workers have handled it
        wait_for_status(services, request_id, Status.PROVISIONED)
        wait_for_email(smtp, request_id, "approved")
        svc.wait_until(lambda: outbox_drained(services), what="the outbox to drain")

        # Then one API key carries both products and the plan's limits
        [credential] = credentials_of(services, request_id)
        assert credential.kind == "api_key"
        assert sorted(credential.product_ids) == ["ledger", "payments"]
        assert (credential.rate_limit_per_minute, credential.monthly_quota) == (60, 10000)
        assert credential.secret_hash.startswith("sha256:")
        # And exactly one email went to the consumer, with no secret in it
        [mail] = smtp.about(request_id)
        assert mail["To"] == "dev@acme.example"
        text = mail.get_body(("plain",)).get_content()
        assert credential.public_id in text
        # ... which sends the consumer to their portal for the key, not to an operator
        assert "Acme Portal" in text and "https://acme-portal.example" in text
        assert "administrator" not in text
        assert mail["Message-ID"] == f"<approve.{request_id}@accessflow.local>"
        # And the audit trail has every step, with the system as actor
        assert audit_of(services, request_id) == [
            (None, "submitted"),
            ("submitted", "approved"),
            ("approved", "provisioned"),
        ]


class TestManualPlan:
    def test_is_parked_and_the_admins_get_a_review_email(
        self, portal: PortalClient, services: Services, smtp: svc.SmtpSink, tmp_path: Path
    ) -> None:
        request_id = submit_file(portal, tmp_path, request_payload(plan_id="partner"))

        wait_for_status(services, request_id, Status.PENDING_REVIEW)
        wait_for_email(smtp, request_id, "awaits review")

        [review] = smtp.about(request_id)
        assert review["To"] == ADMIN
        assert credentials_of(services, request_id) == []

    def test_approved_by_an_admin_gives_credentials_and_one_email(
        self,
        portal: PortalClient,
        admin_env: dict[str, str],
        services: Services,
        smtp: svc.SmtpSink,
        tmp_path: Path,
    ) -> None:
        # Given a pending request for an OAuth2 product and a new app
        payload = request_payload(
            plan_id="partner", product_ids=["identity"], app_id=None, new_app={"name": "Acme SSO"}
        )
        request_id = submit_file(portal, tmp_path, payload)
        wait_for_status(services, request_id, Status.PENDING_REVIEW)

        # When an admin approves it with the CLI, which signs with the admin's key
        cli(admin_env, "decide", request_id, "approve", "--reason", "contract signed", "--admin", ADMIN_ID)

        # Then OAuth2 client credentials are issued with the plan's limits
        wait_for_status(services, request_id, Status.PROVISIONED)
        wait_for_email(smtp, request_id, "approved")
        [credential] = credentials_of(services, request_id)
        assert credential.kind == "oauth2_client_credentials"
        assert (credential.rate_limit_per_minute, credential.monthly_quota) == (600, None)
        # And the consumer got exactly one approve email, the admins one review email
        subjects = sorted(m["Subject"] for m in smtp.about(request_id))
        assert len(subjects) == 2 and "approved" in subjects[1] and "review" in subjects[0]
        assert audit_of(services, request_id) == [
            (None, "submitted"),
            ("submitted", "pending_review"),
            ("pending_review", "approved"),
            ("approved", "provisioned"),
        ]

    def test_rejected_by_an_admin_gives_one_email_with_the_reason(
        self,
        env: dict[str, str],
        portal: PortalClient,
        admin_env: dict[str, str],
        services: Services,
        smtp: svc.SmtpSink,
        tmp_path: Path,
    ) -> None:
        request_id = submit_file(portal, tmp_path, request_payload(plan_id="partner"))
        wait_for_status(services, request_id, Status.PENDING_REVIEW)

        cli(
            admin_env,
            "decide",
            request_id,
            "reject",
            "--reason",
            "Partner plan is <contracted> only",
            "--admin",
            ADMIN_ID,
        )

        wait_for_status(services, request_id, Status.REJECTED)
        wait_for_email(smtp, request_id, "declined")
        [reject] = [m for m in smtp.about(request_id) if "declined" in m["Subject"]]
        assert reject["To"] == "dev@acme.example"
        assert "Partner plan is <contracted> only" in reject.get_body(("plain",)).get_content()
        assert "Partner plan is &lt;contracted&gt; only" in reject.get_body(("html",)).get_content()
        assert credentials_of(services, request_id) == []
        shown = json.loads(cli(env, "requests", "show", request_id, "--json").stdout)
        assert shown["audit"][-1]["actor"] == f"admin:{ADMIN_ID}"
        assert shown["decisions"][0]["admin"] == ADMIN
        assert shown["audit"][-1]["reason"] == "Partner plan is <contracted> only"


RULE_VIOLATIONS = {
    "mixed auth methods": ({"product_ids": ["payments", "identity"]}, "one authentication method"),
    "unknown plan": ({"plan_id": "platinum"}, "unknown plan 'platinum'"),
    "unknown product": ({"product_ids": ["payments", "teleport"]}, "unknown product(s): teleport"),
    "product not under plan": ({"product_ids": ["reports"]}, "not offered under plan 'starter'"),
    "app of another consumer": ({"app_id": "globex-backoffice"}, "does not belong to consumer 'acme'"),
    "unknown app": ({"app_id": "no-such-app"}, "unknown app 'no-such-app'"),
}


class TestRuleViolations:
    @pytest.mark.parametrize("case", list(RULE_VIOLATIONS))
    def test_make_the_request_invalid_with_its_reason_and_no_credentials(
        self, case: str, portal: PortalClient, services: Services, smtp: svc.SmtpSink
    ) -> None:
        # Given a request that breaks one rule, published as raw bytes with pika by the portal
        overrides, reason = RULE_VIOLATIONS[case]
        payload = request_payload(**overrides)
        portal.submit(payload)

        # Then it is kept as invalid, with a reason naming the rule
        wait_for_status(services, payload["request_id"], Status.INVALID)
        with services.uow() as uow:
            request = uow.requests.get(payload["request_id"])
            assert request is not None
            assert reason in request.status_reason
            assert [e.to_status for e in request.history] == [Status.SUBMITTED, Status.INVALID]
        assert credentials_of(services, payload["request_id"]) == []
        assert smtp.about(payload["request_id"]) == []
        # And the portal hears it was invalid, and why
        [*_, invalid] = portal.wait_for_events(payload["request_id"], "access_request.invalid")
        assert reason in invalid["reason"]


class TestDuplicates:
    def test_a_submission_published_three_times_is_handled_once(
        self, portal: PortalClient, services: Services, smtp: svc.SmtpSink
    ) -> None:
        payload = request_payload()
        for _ in range(3):  # three different deliveries of one request
            portal.submit(payload)

        wait_for_status(services, payload["request_id"], Status.PROVISIONED)
        wait_for_email(smtp, payload["request_id"], "approved")
        svc.wait_until(lambda: outbox_drained(services), what="the outbox to drain")

        assert len(credentials_of(services, payload["request_id"])) == 1
        assert len(smtp.about(payload["request_id"])) == 1
        assert len(audit_of(services, payload["request_id"])) == 3

    def test_a_repeated_or_second_decision_changes_nothing(
        self,
        env: dict[str, str],
        admin_env: dict[str, str],
        portal: PortalClient,
        boundary: Boundary,
        settings: Settings,
        services: Services,
        smtp: svc.SmtpSink,
        tmp_path: Path,
    ) -> None:
        # Given a request an admin has rejected
        request_id = submit_file(portal, tmp_path, request_payload(plan_id="partner"))
        wait_for_status(services, request_id, Status.PENDING_REVIEW)
        decision = json.loads(
            cli(
                admin_env, "decide", request_id, "reject", "--reason", "no", "--admin", ADMIN_ID, "--json"
            ).stdout
        )
        wait_for_status(services, request_id, Status.REJECTED)

        # When the same signed decision message arrives again, and then a contrary one
        publish_decision(boundary, settings.queue_prefix, decision)
        cli(admin_env, "decide", request_id, "approve", "--reason", "changed my mind", "--admin", ADMIN_ID)

        # Then the second decision is recorded as ignored, and nothing else changed
        def decisions() -> list[dict[str, str]]:
            shown = json.loads(cli(env, "requests", "show", request_id, "--json").stdout)
            return list(shown["decisions"])

        recorded = svc.wait_until(lambda: len(d := decisions()) == 2 and d, what="the second decision")
        assert [d["outcome"] for d in recorded] == ["applied", "ignored"]
        assert "not pending review" in recorded[1]["outcome_reason"]
        assert status_of(services, request_id) is Status.REJECTED
        assert credentials_of(services, request_id) == []
        wait_for_email(smtp, request_id, "declined")
        assert len([m for m in smtp.about(request_id) if "declined" in m["Subject"]]) == 1


class TestMalformedMessages:
    def test_neither_crash_nor_stall_the_workers(self, portal: PortalClient, services: Services) -> None:
        # Given garbage, a message with wrong fields, and a request for an unknown plan, in that order
        garbage_id, wrong_fields_id = str(uuid.uuid4()), str(uuid.uuid4())
        portal.publish(b"\x00this is not json{", message_id=garbage_id)
        portal.publish(
            svc.envelope(
                SUBMIT.queue_name(portal.prefix),
                SUBMIT.actor_name,
                {"version": 2, "request_id": "nope", "plan": 3},
                message_id=wrong_fields_id,
            ),
            message_id=wrong_fields_id,
        )
        unknown_plan = request_payload(plan_id="ghost")
        portal.submit(unknown_plan)
        # And a good request behind them
        good = request_payload()
        portal.submit(good)

        # Then the good one is still provisioned, the unknown plan is invalid with its reason
        wait_for_status(services, good["request_id"], Status.PROVISIONED)
        wait_for_status(services, unknown_plan["request_id"], Status.INVALID)
        # And the garbage and the wrong fields are recorded with a reason, and who sent them
        refused = malformed(services, garbage_id, wrong_fields_id)
        assert "JSON" in refused[garbage_id].reason
        assert "request_id" in refused[wrong_fields_id].reason
        assert "consumer: Field required" in refused[wrong_fields_id].reason
        assert {row.sender for row in refused.values()} == {portal.user}


def malformed(services: Services, *message_ids: str) -> dict[str, sa.Row[tuple[object, ...]]]:
    """The malformed_messages rows of these messages, once all are recorded."""

    def rows() -> dict[str, sa.Row[tuple[object, ...]]]:
        with services.engine.connect() as connection:
            found = connection.execute(
                sa.select(orm.malformed_messages).where(orm.malformed_messages.c.message_id.in_(message_ids))
            ).all()
        return {str(row.message_id): row for row in found} if len(found) == len(message_ids) else {}

    recorded: dict[str, sa.Row[tuple[object, ...]]] = svc.wait_until(rows, what=f"records of {message_ids}")
    return recorded


class TestThePortal:
    def test_hears_every_change_in_order_and_alone_can_open_the_secret(
        self,
        env: dict[str, str],
        admin_env: dict[str, str],
        portal: PortalClient,
        other_portal: PortalClient,
        services: Services,
    ) -> None:
        # Given a request of Acme's portal for a new app under the manual plan, approved by an admin
        payload = request_payload(plan_id="partner", app_id=None, new_app={"name": "Event Check"})
        request_id = portal.submit(payload)
        portal.wait_for_events(request_id, "access_request.pending_review")
        cli(admin_env, "decide", request_id, "approve", "--reason", "welcome", "--admin", ADMIN_ID)

        # When the portal reads its events queue
        events = portal.wait_for_events(request_id, "credentials.issued", "access_request.provisioned")

        # Then it got each change once, numbered in order, on its own routing keys
        assert [(e["sequence"], e["event"]) for e in events] == [
            (1, "access_request.submitted"),
            (2, "access_request.pending_review"),
            (3, "access_request.approved"),
            (4, "credentials.issued"),
            (5, "access_request.provisioned"),
        ]
        assert all(e["_amqp"]["routing_key"] == f"{portal.party.id}.{e['event']}" for e in events)
        assert len({e["event_id"] for e in events}) == 5
        assert events[2]["reason"] == "welcome"
        # And the credentials event carries the secret sealed to this portal's key
        issued = events[3]
        sealed = issued["sealed_secret"]
        assert sealed["algorithm"] == "x25519-xsalsa20-poly1305-sealedbox"
        secret = portal.open(sealed["value"])
        assert secret.startswith(issued["credential"]["public_id"] + "_")
        # Which a gateway accepts, and which no other portal can open
        assert cli(env, "credentials", "verify", stdin=secret + "\n").stdout.startswith("valid  app ")
        with pytest.raises(CryptoError):
            other_portal.open(sealed["value"])
        assert other_portal.events(request_id) == []
        # And the secret is readable nowhere in accessflow: not in its tables, not in the outbox
        with services.engine.connect() as connection:
            for table in (orm.credentials, orm.outbox, orm.malformed_messages, orm.audit_log):
                rows = connection.execute(sa.select(table)).all()
                assert secret not in repr(rows), table.name
        [row] = credentials_of(services, request_id)
        assert row.sealed_secret is None
        # And an operator cannot reveal it either: it went to the portal only
        [shown] = json.loads(cli(env, "credentials", "show", row.app_id, "--json").stdout)
        assert shown["secret"] is None and shown["delivered_to_portal"] == portal.party.id


class TestWorkerLogs:
    def test_are_json_with_ids_bound_and_no_secret(
        self, portal: PortalClient, services: Services, worker_pools: Path
    ) -> None:
        # Given a provisioned request whose secret the portal has opened
        request_id = portal.submit(request_payload(app_id=None, new_app={"name": "Log Check"}))
        events = portal.wait_for_events(request_id, "credentials.issued")
        [issued] = [e for e in events if e["event"] == "credentials.issued"]
        secret = portal.open(issued["sealed_secret"]["value"])

        # Then every pool's log is JSON lines, the lines about this request carry its id and the message id
        def lines_about_request() -> list[dict[str, object]]:
            found = []
            for log_file in worker_pools.glob("*.log"):
                for line in log_file.read_text().splitlines():
                    if line.startswith("{") and request_id in line:
                        found.append(json.loads(line))
            return found

        lines = svc.wait_until(lambda: len(found := lines_about_request()) > 0 and found, what="log lines")
        assert all(line.get("request_id") == request_id and line.get("message_id") for line in lines)
        # And the secret appears in no log
        for log_file in worker_pools.glob("*.log"):
            assert secret not in log_file.read_text()

    def test_tell_each_outcome_as_one_named_event_with_its_ids(
        self,
        portal: PortalClient,
        admin_env: dict[str, str],
        services: Services,
        smtp: svc.SmtpSink,
        tmp_path: Path,
        worker_pools: Path,
    ) -> None:
        # Given a request for a manual plan, approved by an admin, provisioned and emailed about
        request_id = submit_file(portal, tmp_path, request_payload(plan_id="partner"))
        wait_for_status(services, request_id, Status.PENDING_REVIEW)
        cli(admin_env, "decide", request_id, "approve", "--reason", "fine", "--admin", ADMIN_ID)
        wait_for_status(services, request_id, Status.PROVISIONED)
        wait_for_email(smtp, request_id, "approved")
        [credential] = credentials_of(services, request_id)
        with services.engine.connect() as connection:
            decision_id = connection.execute(
                sa.select(orm.decisions.c.id).where(orm.decisions.c.request_id == request_id)
            ).scalar_one()

        # When the pools' JSON log lines about it are read
        wanted = ("request.routed", "request.decided", "credentials.issued", "email.sent")

        def outcomes_told() -> dict[str, list[dict[str, object]]]:
            told: dict[str, list[dict[str, object]]] = {}
            for log_file in worker_pools.glob("*.log"):
                for line in log_file.read_text().splitlines():
                    if line.startswith("{") and request_id in line:
                        event = json.loads(line)
                        if event["event"] in wanted:
                            told.setdefault(str(event["event"]), []).append(event)
            return told

        told = svc.wait_until(
            lambda: len((found := outcomes_told()).get("email.sent", [])) == 2 and found,
            what="the outcomes of the request in the workers' logs",
        )

        # Then each step is one event named by what happened, with the ids it concerns and the message's
        [routed] = told["request.routed"]
        assert (routed["outcome"], routed["portal_id"], routed["level"]) == (
            "pending_review",
            portal.party.id,
            "info",
        )
        [decided] = told["request.decided"]
        assert (decided["decision_id"], decided["outcome"], decided["admin_id"], decided["status"]) == (
            decision_id,
            "applied",
            ADMIN_ID,
            "approved",
        )
        [issued] = told["credentials.issued"]
        assert (issued["credential_id"], issued["public_id"], issued["app_id"]) == (
            credential.id,
            credential.public_id,
            credential.app_id,
        )
        sent = {str(line["kind"]): line for line in told["email.sent"]}
        assert sorted(sent) == ["approve", "review"]
        assert sent["approve"]["email_message_id"] == f"<approve.{request_id}@accessflow.local>"
        assert sent["approve"]["outcome"] == "sent"
        for line in [routed, decided, issued, *sent.values()]:
            assert line["request_id"] == request_id and line["message_id"], line


class TestAProvisioningThatCannotSucceed:
    def test_stops_visibly_and_an_operator_retries_it_once_the_cause_is_fixed(
        self,
        portal: PortalClient,
        env: dict[str, str],
        admin_env: dict[str, str],
        services: Services,
        smtp: svc.SmtpSink,
        tmp_path: Path,
    ) -> None:
        # Given a manual plan of its own, and a request under it for a new app, waiting for review
        plan = Plan(
            id=f"pilot-{uuid.uuid4().hex[:8]}",
            name="Pilot",
            auto_approve=False,
            rate_limit_per_minute=30,
            monthly_quota=100,
            product_ids=["payments"],
        )
        with services.uow() as uow:
            uow.catalogue.upsert(plan)
            uow.commit()
        payload = request_payload(plan_id=plan.id, app_id=None, new_app={"name": "Acme Pilot"})
        request_id = submit_file(portal, tmp_path, payload)
        wait_for_status(services, request_id, Status.PENDING_REVIEW)
        app_id = derived_id("app", request_id)
        with services.uow() as uow:
            assert uow.catalogue.app(app_id) is None  # no app before an approval

        # When an operator deletes the plan, and then an admin approves the request
        with services.engine.begin() as connection:
            connection.execute(sa.delete(orm.plans).where(orm.plans.c.id == plan.id))
        cli(admin_env, "decide", request_id, "approve", "--reason", "pilot agreed", "--admin", ADMIN_ID)

        # Then it stops in provisioning_failed with the reason, listed, and its portal told
        wait_for_status(services, request_id, Status.PROVISIONING_FAILED)
        shown = json.loads(cli(env, "requests", "show", request_id, "--json").stdout)
        assert (shown["status"], shown["reason"]) == (
            "provisioning_failed",
            f"plan {plan.id!r} no longer exists",
        )
        listed = json.loads(cli(env, "requests", "list", "--status", "provisioning_failed", "--json").stdout)
        assert request_id in [r["id"] for r in listed]
        svc.wait_until(
            lambda: "access_request.provisioning_failed" in [e["event"] for e in portal.events(request_id)],
            what="the portal to hear of the failure",
        )
        assert credentials_of(services, request_id) == []

        # When the plan is back and an operator retries the request
        with services.uow() as uow:
            uow.catalogue.upsert(plan)
            uow.commit()
        retried = cli(env, "requests", "retry", request_id, "--reason", "plan restored")
        assert "approved" in retried.stdout

        # Then it is provisioned, under the app made at the approval, and the consumer gets one email
        wait_for_status(services, request_id, Status.PROVISIONED)
        wait_for_email(smtp, request_id, "approved")
        [credential] = credentials_of(services, request_id)
        assert (credential.app_id, credential.rate_limit_per_minute) == (app_id, 30)
        assert audit_of(services, request_id) == [
            (None, "submitted"),
            ("submitted", "pending_review"),
            ("pending_review", "approved"),
            ("approved", "provisioning_failed"),
            ("provisioning_failed", "approved"),
            ("approved", "provisioned"),
        ]
        with services.uow() as uow:
            request = uow.requests.get(request_id)
            assert request is not None
            retry = request.history[-2]
            assert (retry.actor_kind.value, retry.reason) == ("operator", "plan restored")
