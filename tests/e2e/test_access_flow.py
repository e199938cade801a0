"""The product, end to end: real worker processes, RabbitMQ, PostgreSQL and an SMTP sink."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from domain.model import Status
from infra import orm
from infra.bootstrap import Services
from infra.settings import Settings
from messages.routes import DECIDE, SUBMIT
from tests import services as svc
from tests.conftest import ADMIN
from tests.e2e.conftest import (
    cli,
    outbox_drained,
    publish_raw,
    request_payload,
    status_of,
    wait_for_status,
)
from tests.services import envelope

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("worker_pools")]


def submit_file(env: dict[str, str], tmp_path: Path, payload: dict[str, object]) -> str:
    path = tmp_path / f"{uuid.uuid4().hex}.json"
    path.write_text(json.dumps(payload))
    return cli(env, "submit", str(path)).stdout.strip()


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
        self, env: dict[str, str], services: Services, smtp: svc.SmtpSink, tmp_path: Path
    ) -> None:
        # Given a request for the auto-approve Starter plan, submitted with the CLI
        request_id = submit_file(env, tmp_path, request_payload(product_ids=["payments", "ledger"]))

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
        assert credential.public_id in mail.get_body(("plain",)).get_content()
        assert mail["Message-ID"] == f"<approve.{request_id}@accessflow.local>"
        # And the audit trail has every step, with the system as actor
        assert audit_of(services, request_id) == [
            (None, "submitted"),
            ("submitted", "approved"),
            ("approved", "provisioned"),
        ]


class TestManualPlan:
    def test_is_parked_and_the_admins_get_a_review_email(
        self, env: dict[str, str], services: Services, smtp: svc.SmtpSink, tmp_path: Path
    ) -> None:
        request_id = submit_file(env, tmp_path, request_payload(plan_id="partner"))

        wait_for_status(services, request_id, Status.PENDING_REVIEW)
        wait_for_email(smtp, request_id, "awaits review")

        [review] = smtp.about(request_id)
        assert review["To"] == ADMIN
        assert credentials_of(services, request_id) == []

    def test_approved_by_an_admin_gives_credentials_and_one_email(
        self, env: dict[str, str], services: Services, smtp: svc.SmtpSink, tmp_path: Path
    ) -> None:
        # Given a pending request for an OAuth2 product and a new app
        payload = request_payload(
            plan_id="partner", product_ids=["identity"], app_id=None, new_app={"name": "Acme SSO"}
        )
        request_id = submit_file(env, tmp_path, payload)
        wait_for_status(services, request_id, Status.PENDING_REVIEW)

        # When an admin approves it with the CLI
        cli(env, "decide", request_id, "approve", "--reason", "contract signed", "--admin", ADMIN)

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
        self, env: dict[str, str], services: Services, smtp: svc.SmtpSink, tmp_path: Path
    ) -> None:
        request_id = submit_file(env, tmp_path, request_payload(plan_id="partner"))
        wait_for_status(services, request_id, Status.PENDING_REVIEW)

        cli(
            env,
            "decide",
            request_id,
            "reject",
            "--reason",
            "Partner plan is <contracted> only",
            "--admin",
            ADMIN,
        )

        wait_for_status(services, request_id, Status.REJECTED)
        wait_for_email(smtp, request_id, "declined")
        [reject] = [m for m in smtp.about(request_id) if "declined" in m["Subject"]]
        assert reject["To"] == "dev@acme.example"
        assert "Partner plan is <contracted> only" in reject.get_body(("plain",)).get_content()
        assert "Partner plan is &lt;contracted&gt; only" in reject.get_body(("html",)).get_content()
        assert credentials_of(services, request_id) == []
        shown = json.loads(cli(env, "requests", "show", request_id, "--json").stdout)
        assert shown["audit"][-1]["actor"] == f"admin:{ADMIN}"
        assert shown["audit"][-1]["reason"] == "Partner plan is <contracted> only"


RULE_VIOLATIONS = {
    "mixed auth methods": ({"product_ids": ["payments", "identity"]}, "one authentication method"),
    "unknown plan": ({"plan_id": "platinum"}, "unknown plan 'platinum'"),
    "unknown product": ({"product_ids": ["payments", "teleport"]}, "unknown product(s): teleport"),
    "product not under plan": ({"product_ids": ["reports"]}, "not offered under plan 'starter'"),
    "app of another consumer": ({"app_id": "globex-backoffice"}, "does not belong to consumer 'acme'"),
    "unknown app": ({"app_id": "no-such-app"}, "unknown app 'no-such-app'"),
    "unknown consumer": (
        {"consumer": {"id": "initech", "email": "x@initech.example", "name": "Initech"}},
        "unknown consumer 'initech'",
    ),
}


class TestRuleViolations:
    @pytest.mark.parametrize("case", list(RULE_VIOLATIONS))
    def test_make_the_request_invalid_with_its_reason_and_no_credentials(
        self, case: str, settings: Settings, services: Services, smtp: svc.SmtpSink
    ) -> None:
        # Given a request that breaks one rule, published as raw bytes with pika
        overrides, reason = RULE_VIOLATIONS[case]
        payload = request_payload(**overrides)
        queue = SUBMIT.queue_name(settings.queue_prefix)
        publish_raw(settings.broker_url, queue, envelope(queue, SUBMIT.actor_name, payload))

        # Then it is kept as invalid, with a reason naming the rule
        wait_for_status(services, payload["request_id"], Status.INVALID)
        with services.uow() as uow:
            request = uow.requests.get(payload["request_id"])
            assert request is not None
            assert reason in request.status_reason
            assert [e.to_status for e in request.history] == [Status.SUBMITTED, Status.INVALID]
        assert credentials_of(services, payload["request_id"]) == []
        assert smtp.about(payload["request_id"]) == []


class TestDuplicates:
    def test_a_submission_published_three_times_is_handled_once(
        self, settings: Settings, services: Services, smtp: svc.SmtpSink
    ) -> None:
        payload = request_payload()
        queue = SUBMIT.queue_name(settings.queue_prefix)
        for _ in range(3):  # three different deliveries of one request
            publish_raw(settings.broker_url, queue, envelope(queue, SUBMIT.actor_name, payload))

        wait_for_status(services, payload["request_id"], Status.PROVISIONED)
        wait_for_email(smtp, payload["request_id"], "approved")
        svc.wait_until(lambda: outbox_drained(services), what="the outbox to drain")

        assert len(credentials_of(services, payload["request_id"])) == 1
        assert len(smtp.about(payload["request_id"])) == 1
        assert len(audit_of(services, payload["request_id"])) == 3

    def test_a_repeated_or_second_decision_changes_nothing(
        self, env: dict[str, str], settings: Settings, services: Services, smtp: svc.SmtpSink, tmp_path: Path
    ) -> None:
        # Given a request an admin has rejected
        request_id = submit_file(env, tmp_path, request_payload(plan_id="partner"))
        wait_for_status(services, request_id, Status.PENDING_REVIEW)
        decision = json.loads(
            cli(env, "decide", request_id, "reject", "--reason", "no", "--admin", ADMIN, "--json").stdout
        )
        wait_for_status(services, request_id, Status.REJECTED)

        # When the same decision message arrives again, and then a contrary one
        queue = DECIDE.queue_name(settings.queue_prefix)
        publish_raw(settings.broker_url, queue, envelope(queue, DECIDE.actor_name, decision))
        cli(env, "decide", request_id, "approve", "--reason", "changed my mind", "--admin", ADMIN)

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
    def test_neither_crash_nor_stall_the_workers(
        self, env: dict[str, str], settings: Settings, services: Services
    ) -> None:
        # Given garbage, a message with wrong fields, and a request for an unknown plan, in that order
        queue = SUBMIT.queue_name(settings.queue_prefix)
        wrong_fields_id = str(uuid.uuid4())
        publish_raw(settings.broker_url, queue, b"\x00this is not json{")
        publish_raw(
            settings.broker_url,
            queue,
            envelope(queue, SUBMIT.actor_name, {"request_id": "nope", "plan": 3}, message_id=wrong_fields_id),
        )
        unknown_plan = request_payload(plan_id="ghost")
        publish_raw(settings.broker_url, queue, envelope(queue, SUBMIT.actor_name, unknown_plan))
        # And a good request behind them
        good = request_payload()
        publish_raw(settings.broker_url, queue, envelope(queue, SUBMIT.actor_name, good))

        # Then the good one is still provisioned, the unknown plan is invalid with its reason
        wait_for_status(services, good["request_id"], Status.PROVISIONED)
        wait_for_status(services, unknown_plan["request_id"], Status.INVALID)
        # And the wrong fields are recorded with a reason naming them
        with services.engine.connect() as connection:
            reason = connection.execute(
                sa.select(orm.malformed_messages.c.reason).where(
                    orm.malformed_messages.c.message_id == wrong_fields_id
                )
            ).scalar_one()
        assert "request_id" in reason and "consumer: Field required" in reason
        # And the bytes that are not JSON were dead-lettered where an operator can see them
        svc.wait_until(lambda: svc.queue_depth(settings.broker_url, f"{queue}.XQ") >= 1, what="the XQ")
        letters = json.loads(cli(env, "dlq", "list", "--queue", "requests", "--json").stdout)
        garbage = [letter for letter in letters if letter["message_id"] is None]
        assert garbage and "rejected" in garbage[0]["reason"]
        # And a replay leaves what is not a message where a human can look at it
        replayed = cli(env, "dlq", "replay", "--queue", "requests")
        assert "kept" in replayed.stdout
        assert svc.queue_depth(settings.broker_url, f"{queue}.XQ") >= 1


class TestCredentials:
    def test_are_revealed_once_then_only_the_hash_remains(
        self, env: dict[str, str], services: Services, tmp_path: Path
    ) -> None:
        # Given a provisioned request for a new app
        payload = request_payload(app_id=None, new_app={"name": "Reveal Once"})
        request_id = submit_file(env, tmp_path, payload)
        wait_for_status(services, request_id, Status.PROVISIONED)
        with services.uow() as uow:
            request = uow.requests.get(request_id)
            assert request is not None and request.app_id is not None
            app_id = request.app_id

        # When the consumer's side fetches the credentials twice
        first = json.loads(cli(env, "credentials", "show", app_id, "--json").stdout)
        second = json.loads(cli(env, "credentials", "show", app_id, "--json").stdout)

        # Then the secret is there the first time only, and a gateway can still check it
        secret = first[0]["secret"]
        assert secret and secret.startswith(first[0]["public_id"] + "_")
        assert second[0]["secret"] is None
        [row] = credentials_of(services, request_id)
        assert row.sealed_secret is None and secret not in row.secret_hash
        assert cli(env, "credentials", "verify", stdin=secret + "\n").stdout.strip() == "valid"
        assert cli(env, "credentials", "verify", stdin=secret[:-2] + "xx\n", check=False).returncode == 1


class TestWorkerLogs:
    def test_are_json_with_ids_bound_and_no_secret(
        self, env: dict[str, str], services: Services, worker_pools: Path, tmp_path: Path
    ) -> None:
        # Given a provisioned request whose secret has been revealed
        request_id = submit_file(env, tmp_path, request_payload(app_id=None, new_app={"name": "Log Check"}))
        wait_for_status(services, request_id, Status.PROVISIONED)
        with services.uow() as uow:
            request = uow.requests.get(request_id)
            assert request is not None and request.app_id is not None
        [shown] = json.loads(cli(env, "credentials", "show", request.app_id, "--json").stdout)
        secret = shown["secret"]

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
