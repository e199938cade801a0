"""Approval rules and throttles end to end: real worker pools (several threads), RabbitMQ, PostgreSQL, SMTP."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from domain.model import AdminKey, Status, utcnow
from infra.bootstrap import Services
from infra.cli import producer
from infra.credentials import signing
from infra.settings import Settings
from tests import services as svc
from tests.conftest import Boundary, Parties
from tests.e2e.conftest import (
    PortalClient,
    cli,
    publish_decision,
    request_payload,
    status_of,
    wait_for_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("worker_pools")]


def shown(env: dict[str, str], request_id: str) -> dict[str, Any]:
    return dict(json.loads(cli(env, "requests", "show", request_id, "--json").stdout))


class TestThrottleUnderConcurrentSubmissions:
    def test_ten_at_once_against_a_limit_of_three(
        self, portal: PortalClient, services: Services, env: dict[str, str]
    ) -> None:
        # Given a manual plan allowing a consumer 3 open requests
        plan_id = svc.plan_with(services, max_open=3)

        # When Acme's portal publishes 10 submissions at once, routed by a pool of several threads
        ids = [portal.submit(request_payload(plan_id=plan_id)) for _ in range(10)]
        statuses = {
            request_id: wait_for_status(services, request_id, Status.PENDING_REVIEW, Status.INVALID)
            for request_id in ids
        }

        # Then exactly 3 wait for review, and 7 are invalid, each with the reason, none dropped
        assert Counter(statuses.values()) == {Status.PENDING_REVIEW: 3, Status.INVALID: 7}
        for request_id in (r for r, s in statuses.items() if s is Status.INVALID):
            details = shown(env, request_id)
            assert details["reason"] == (
                f"throttled: consumer 'acme' has 3 open request(s) on plan {plan_id!r}, the most allowed is 3"
            )
            assert details["routed_by"] == details["reason"]
            # ... and the portal is told, with the reason
            events = portal.wait_for_events(request_id, "access_request.invalid")
            [invalid] = [e for e in events if e["event"] == "access_request.invalid"]
            assert invalid["reason"] == details["reason"]


class TestRulesRouteAndSayWhich:
    def test_a_trusted_domain_is_approved_and_provisioned(
        self, portal: PortalClient, services: Services, env: dict[str, str]
    ) -> None:
        # Given a manual plan trusting acme.example
        plan_id = svc.plan_with(services, rules=[{"kind": "trusted_domain", "domains": ["acme.example"]}])

        # When Acme asks
        request_id = portal.submit(request_payload(plan_id=plan_id))

        # Then its credential is issued without review, and `requests show` names the rule
        wait_for_status(services, request_id, Status.PROVISIONED)
        details = shown(env, request_id)
        assert details["routed_by"] == "rule 1: email domain acme.example is trusted"
        assert details["audit"][1]["reason"] == "rule 1: email domain acme.example is trusted"
        assert (
            "routed by: rule 1: email domain acme.example is trusted"
            in cli(env, "requests", "show", request_id).stdout
        )

    def test_a_refused_domain_is_rejected_and_told_why(
        self, other_portal: PortalClient, services: Services, smtp: svc.SmtpSink, env: dict[str, str]
    ) -> None:
        # Given an auto-approve plan refusing globex.example
        plan_id = svc.plan_with(
            services,
            auto_approve=True,
            rules=[
                {"kind": "rejected_domain", "domains": ["globex.example"], "reason": "Not for resellers."}
            ],
        )

        # When Globex asks through its portal
        request_id = other_portal.submit(
            request_payload(
                plan_id=plan_id,
                consumer={"id": "globex", "email": "api@globex.example", "name": "Globex API Team"},
                app_id="globex-backoffice",
            )
        )

        # Then it is rejected, and the consumer's reject email carries the rule's reason
        wait_for_status(services, request_id, Status.REJECTED)
        svc.wait_until(lambda: smtp.about(request_id), what="the reject email")
        [mail] = smtp.about(request_id)
        assert mail["To"] == "api@globex.example"
        assert "Not for resellers." in mail.get_body(("plain",)).get_content()
        assert shown(env, request_id)["routed_by"] == (
            "rule 1: email domain globex.example is refused: Not for resellers."
        )


class TestTwoApprovers:
    def test_the_request_is_approved_by_the_second_distinct_admin(
        self,
        portal: PortalClient,
        services: Services,
        env: dict[str, str],
        boundary: Boundary,
        settings: Settings,
        parties: Parties,
        tmp_path: Path,
    ) -> None:
        # Given a second admin with a key of their own, registered as the first one is
        erin, erin_key_id = f"erin-{uuid.uuid4().hex[:8]}", f"erin-key-{uuid.uuid4().hex[:8]}"
        signing.generate_keypair(tmp_path / "erin.pem")
        erin_key = signing.load_private_key(tmp_path / "erin.pem")
        with services.uow() as uow:
            uow.admin_keys.upsert_admin(erin, f"{erin}@accessflow.example")
            uow.admin_keys.add_key(
                AdminKey(erin_key_id, erin, signing.public_key_text(erin_key.public_key()), utcnow())
            )
            uow.commit()
        # And a plan needing both admins' approvals, with a request parked on it
        plan_id = svc.plan_with(
            services, rules=[{"kind": "approvers", "required": 2, "admins": [parties.admin_id, erin]}]
        )
        request_id = portal.submit(request_payload(plan_id=plan_id))
        wait_for_status(services, request_id, Status.PENDING_REVIEW)

        def approve(admin_id: str, key_id: str, key: Any) -> None:
            decision = producer.signed_decision(
                request_id=request_id,
                approve=True,
                admin_id=admin_id,
                reason=f"{admin_id} agrees",
                audience=settings.queue_prefix,
                key_id=key_id,
                private_key=key,
            )
            publish_decision(boundary, settings.queue_prefix, decision.model_dump(mode="json"))

        def decisions() -> list[str]:
            return sorted(d["outcome"] for d in shown(env, request_id)["decisions"])

        # When the first admin approves / Then the approval is counted and the request still waits
        approve(parties.admin_id, parties.admin_key_id, parties.admin_key)
        svc.wait_until(lambda: decisions() == ["counted"], what="the first approval to be counted")
        assert status_of(services, request_id) is Status.PENDING_REVIEW

        # When the second admin approves / Then it is approved, and its credential issued
        approve(erin, erin_key_id, erin_key)
        wait_for_status(services, request_id, Status.PROVISIONED)
        assert decisions() == ["applied", "counted"]
        reasons = [a["reason"] for a in shown(env, request_id)["audit"]]
        assert f"approval 1 of 2: {parties.admin_id} agrees" in reasons
        assert f"approval 2 of 2: {erin} agrees" in reasons
