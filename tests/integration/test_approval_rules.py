"""Approval rules and throttles on real PostgreSQL: stored with the plan, applied by the real router."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from domain import commands, handlers
from domain.model import AdminKey, App, Consumer, DecisionOutcome, Status, utcnow
from domain.rules import parse_rules
from infra.bootstrap import Services
from infra.cli import producer
from infra.credentials import signing
from infra.db import views
from tests import services as svc
from tests.conftest import PORTAL_ID, Parties

pytestmark = pytest.mark.integration


def route(
    services: Services, plan_id: str, *, consumer_id: str = "acme", app_id: str | None = None
) -> tuple[str, Status]:
    """A submission routed by the real handler (Acme's through its portal, others' as v1); its id and status."""
    request_id = str(uuid.uuid4())
    app_id = app_id or {"acme": "acme-checkout", "globex": "globex-backoffice"}[consumer_id]
    portal_id, sender = None, None
    if consumer_id == "acme":
        with services.uow() as uow:
            portal = uow.portals.get(PORTAL_ID)
            assert portal is not None
        portal_id, sender = PORTAL_ID, portal.broker_user
    status = handlers.route_request(
        commands.RouteRequest(
            request_id=request_id,
            consumer_id=consumer_id,
            consumer_email="",
            consumer_name="",
            plan_id=plan_id,
            product_ids=("payments",),
            app_id=app_id,
            new_app_name=None,
            new_app_description=None,
            justification=None,
            submitted_at=datetime.now(UTC),
            portal_id=portal_id,
            sender=sender,
        ),
        uow=services.uow(),
        accept_v1_submissions=True,
    )
    return request_id, status


class TestRulesAreStoredWithThePlan:
    def test_a_plan_reads_back_with_its_rules_and_throttles(self, services: Services) -> None:
        # Given a plan stored with rules and throttles
        rules = [
            {"kind": "trusted_domain", "domains": ["acme.example"]},
            {"kind": "rejected_domain", "domains": ["globex.example"], "reason": "No."},
        ]
        plan_id = svc.plan_with(services, rules=rules, max_open=2, max_per_hour=5)

        # When it is read back / Then everything is there
        with services.uow() as uow:
            plan = uow.catalogue.plan(plan_id)
        assert plan is not None
        assert plan.rules == parse_rules(rules)
        assert (plan.max_open_requests_per_consumer, plan.max_requests_per_consumer_per_hour) == (2, 5)


class TestATrustedDomainApprovesAtOnce:
    def test_the_request_is_approved_and_shows_the_rule(self, services: Services) -> None:
        # Given a manual plan that trusts acme.example
        plan_id = svc.plan_with(services, rules=[{"kind": "trusted_domain", "domains": ["acme.example"]}])

        # When Acme (dev@acme.example) submits
        request_id, status = route(services, plan_id)

        # Then it is approved, and the rule is in the trail and in `requests show`
        assert status is Status.APPROVED
        details = views.request_details(services.uow(), request_id)
        assert details is not None
        assert details["routed_by"] == "rule 1: email domain acme.example is trusted"
        assert details["audit"][-1]["reason"] == "rule 1: email domain acme.example is trusted"
        assert details["audit"][-1]["actor"] == "system:router"


class TestARejectedDomainIsRejected:
    def test_with_the_rules_reason_for_the_consumer(self, services: Services) -> None:
        # Given a plan refusing globex.example
        plan_id = svc.plan_with(
            services,
            auto_approve=True,
            rules=[
                {"kind": "rejected_domain", "domains": ["globex.example"], "reason": "Not for resellers."}
            ],
        )

        # When Globex submits
        request_id, status = route(services, plan_id, consumer_id="globex")

        # Then it is rejected with the rule's reason; the trail names the rule
        assert status is Status.REJECTED
        details = views.request_details(services.uow(), request_id)
        assert details is not None
        assert details["reason"] == "Not for resellers."
        assert details["routed_by"] == "rule 1: email domain globex.example is refused: Not for resellers."
        assert [e["to"] for e in details["audit"]] == ["submitted", "rejected"]


class TestAnActiveCredentialApproves:
    def test_a_second_request_of_a_holder_is_approved(self, services: Services) -> None:
        # Given a manual plan whose first rule approves a consumer holding an active credential on it
        plan_id = svc.plan_with(services, rules=[{"kind": "holds_active_credential"}])
        first, status = route(services, plan_id)
        assert status is Status.PENDING_REVIEW  # none held yet

        # And Acme's first request approved by hand (as decided) and issued
        with services.uow() as uow:
            request = uow.requests.get(first, for_update=True)
            assert request is not None
            request.approve(admin_id="dana", reason="ok")
            uow.commit()
        handlers.issue_credentials(
            commands.IssueCredentials(first),
            uow=services.uow(),
            issuer=services.issuer,
            sealer=services.sealer(),
            portal_sealer=services.portal_sealer,
        )

        # When Acme asks again
        second, status = route(services, plan_id)

        # Then the rule approves it
        assert status is Status.APPROVED
        details = views.request_details(services.uow(), second)
        assert details is not None
        assert (
            details["routed_by"] == f"rule 1: consumer 'acme' holds an active credential on plan {plan_id!r}"
        )


class TestThrottlesUnderConcurrentSubmissions:
    @pytest.mark.parametrize("limit", ["open", "per_hour"])
    def test_ten_at_once_against_a_limit_of_three_accept_exactly_three(
        self, services: Services, limit: str
    ) -> None:
        # Given a manual plan allowing Acme 3 open requests (or 3 an hour)
        plan_id = svc.plan_with(
            services,
            max_open=3 if limit == "open" else None,
            max_per_hour=3 if limit == "per_hour" else None,
        )
        results: list[tuple[str, Status]] = []
        barrier = threading.Barrier(10)

        def submit() -> None:
            barrier.wait()
            results.append(route(services, plan_id))

        # When 10 submissions of Acme are routed at the same moment, each in its own transaction
        threads = [threading.Thread(target=submit) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)

        # Then exactly 3 wait for review and 7 are invalid, each saying why
        assert Counter(status for _, status in results) == {Status.PENDING_REVIEW: 3, Status.INVALID: 7}
        with services.uow() as uow:
            for request_id, status in results:
                request = uow.requests.get(request_id)
                assert request is not None and request.status is status
                if status is Status.INVALID:
                    assert request.status_reason.startswith("throttled: consumer 'acme' ")
                    assert request.status_reason.endswith("the most allowed is 3")

    def test_a_consumers_own_limit_takes_the_place_of_the_plans(self, services: Services) -> None:
        # Given a plan allowing 3 open requests, and a consumer of the catalogue allowed only 1
        plan_id = svc.plan_with(services, max_open=3)
        consumer_id, app_id = f"c-{uuid.uuid4().hex[:8]}", f"a-{uuid.uuid4().hex[:8]}"
        with services.uow() as uow:
            uow.catalogue.upsert(
                Consumer(consumer_id, f"dev@{consumer_id}.example", "Noisy", max_open_requests=1)
            )
            uow.catalogue.upsert(App(app_id, consumer_id, "Noisy App"))
            uow.commit()

        # When it asks twice / Then the second is over its own limit
        statuses = [route(services, plan_id, consumer_id=consumer_id, app_id=app_id) for _ in range(2)]
        assert [s for _, s in statuses] == [Status.PENDING_REVIEW, Status.INVALID]
        with services.uow() as uow:
            request = uow.requests.get(statuses[1][0])
            assert request is not None
            assert request.status_reason.endswith("the most allowed is 1")
            consumer = uow.catalogue.consumer(consumer_id)
            assert consumer is not None and consumer.max_open_requests == 1

    def test_a_closed_request_frees_an_open_slot(self, services: Services) -> None:
        # Given a plan allowing 1 open request, and Acme's one open
        plan_id = svc.plan_with(services, max_open=1)
        first, _ = route(services, plan_id)
        assert route(services, plan_id)[1] is Status.INVALID

        # When the open one is rejected
        with services.uow() as uow:
            request = uow.requests.get(first, for_update=True)
            assert request is not None
            request.reject(admin_id="dana", reason="no")
            uow.commit()

        # Then Acme may ask again
        assert route(services, plan_id)[1] is Status.PENDING_REVIEW


# --- N of M approvers, with real signatures ------------------------------------------------------------

#: The deployment the test admins sign their decisions for, and the handler checks them against.
AUDIENCE = "accessflow-integration"


@dataclass(frozen=True)
class Admin:
    id: str
    key_id: str
    key: Ed25519PrivateKey


@pytest.fixture
def second_admin(services: Services, tmp_path: Path) -> Admin:
    """A second admin with an Ed25519 key of their own, registered as the first one is (tests/conftest.py)."""
    admin = Admin(f"erin-{uuid.uuid4().hex[:8]}", f"erin-key-{uuid.uuid4().hex[:8]}", _new_key(tmp_path))
    with services.uow() as uow:
        uow.admin_keys.upsert_admin(admin.id, f"{admin.id}@accessflow.example")
        uow.admin_keys.add_key(
            AdminKey(admin.key_id, admin.id, signing.public_key_text(admin.key.public_key()), utcnow())
        )
        uow.commit()
    return admin


def _new_key(tmp_path: Path) -> Ed25519PrivateKey:
    path = tmp_path / f"{uuid.uuid4().hex}.pem"
    signing.generate_keypair(path)
    return signing.load_private_key(path)


def decide(services: Services, admin: Admin, request_id: str, *, approve: bool = True) -> DecisionOutcome:
    command = producer.signed_decision(
        request_id=request_id,
        approve=approve,
        admin_id=admin.id,
        reason="reviewed",
        audience=AUDIENCE,
        key_id=admin.key_id,
        private_key=admin.key,
    ).to_command()
    return handlers.decide(command, uow=services.uow(), verify=services.verify_signature, audience=AUDIENCE)


def first_admin(parties: Parties) -> Admin:
    return Admin(parties.admin_id, parties.admin_key_id, parties.admin_key)


class TestTwoOfTwoApprovers:
    def test_the_request_waits_for_the_second_admin(
        self, services: Services, parties: Parties, second_admin: Admin
    ) -> None:
        # Given a plan needing the approvals of both admins, and a request parked on it
        dana = first_admin(parties)
        plan_id = svc.plan_with(
            services, rules=[{"kind": "approvers", "required": 2, "admins": [dana.id, second_admin.id]}]
        )
        request_id, status = route(services, plan_id)
        assert status is Status.PENDING_REVIEW

        # When the first admin approves, twice / Then it is counted once, and the request still waits
        assert decide(services, dana, request_id) is DecisionOutcome.COUNTED
        assert decide(services, dana, request_id) is DecisionOutcome.IGNORED
        with services.uow() as uow:
            request = uow.requests.get(request_id)
            assert request is not None and request.status is Status.PENDING_REVIEW

        # When the second approves / Then it is approved
        assert decide(services, second_admin, request_id) is DecisionOutcome.APPLIED
        details = views.request_details(services.uow(), request_id)
        assert details is not None
        assert details["status"] == "approved"
        assert details["routed_by"] == (
            f"rule 1: plan {plan_id!r} requires 2 approval(s) of admins {dana.id}, {second_admin.id}"
        )
        # And each approval is a row of the audit trail, each decision recorded with its outcome
        assert [(a["actor"], a["to"], a["reason"]) for a in details["audit"][2:]] == [
            (f"admin:{dana.id}", "pending_review", "approval 1 of 2: reviewed"),
            (f"admin:{second_admin.id}", "approved", "approval 2 of 2: reviewed"),
        ]
        assert sorted(d["outcome"] for d in details["decisions"]) == ["applied", "counted", "ignored"]

    def test_one_rejection_ends_it(self, services: Services, parties: Parties, second_admin: Admin) -> None:
        plan_id = svc.plan_with(services, rules=[{"kind": "approvers", "required": 2}])
        request_id, _ = route(services, plan_id)
        assert decide(services, first_admin(parties), request_id) is DecisionOutcome.COUNTED

        assert decide(services, second_admin, request_id, approve=False) is DecisionOutcome.APPLIED

        with services.uow() as uow:
            request = uow.requests.get(request_id)
            assert request is not None and request.status is Status.REJECTED

    def test_two_approvals_at_once_approve_exactly_once(
        self, services: Services, parties: Parties, second_admin: Admin
    ) -> None:
        # Given requests needing two approvals, and both admins approving each at the same moment
        plan_id = svc.plan_with(services, rules=[{"kind": "approvers", "required": 2}])
        request_ids = [route(services, plan_id)[0] for _ in range(5)]
        outcomes: list[tuple[str, DecisionOutcome]] = []
        barrier = threading.Barrier(2)

        def approve_all(admin: Admin) -> None:
            barrier.wait()
            for request_id in request_ids:
                outcomes.append((request_id, decide(services, admin, request_id)))

        threads = [
            threading.Thread(target=approve_all, args=(a,)) for a in (first_admin(parties), second_admin)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)

        # Then each request has one counted approval and one applied, and is approved
        for request_id in request_ids:
            assert sorted(o.value for rid, o in outcomes if rid == request_id) == ["applied", "counted"]
            with services.uow() as uow:
                request = uow.requests.get(request_id)
                assert request is not None and request.status is Status.APPROVED


@contextmanager
def statements(services: Services) -> Iterator[list[str]]:
    """Every SQL statement the services' engine sends while the block runs."""
    sent: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        sent.append(" ".join(statement.split()))

    sa.event.listen(services.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        sa.event.remove(services.engine, "before_cursor_execute", record)


class TestTheHotPath:
    def test_a_plan_without_throttles_or_credential_rule_runs_no_extra_statement(
        self, services: Services
    ) -> None:
        # Given a plan with a domain rule but no throttle, its catalogue cached by a first request
        plan_id = svc.plan_with(services, rules=[{"kind": "trusted_domain", "domains": ["example.org"]}])
        route(services, plan_id)

        # When another request is routed
        with statements(services) as sent:
            route(services, plan_id)

        # Then neither a lock nor a count nor a credential was asked for
        assert any("INSERT INTO access_requests" in s for s in sent)
        assert not [s for s in sent if "pg_advisory_xact_lock" in s or "count(" in s or "credentials" in s]

    def test_a_throttled_plan_takes_the_lock_then_counts(self, services: Services) -> None:
        plan_id = svc.plan_with(services, max_per_hour=100)
        route(services, plan_id)

        with statements(services) as sent:
            route(services, plan_id)

        locks = [i for i, s in enumerate(sent) if "pg_advisory_xact_lock" in s]
        counts = [i for i, s in enumerate(sent) if "count(*) FILTER" in s]
        assert len(locks) == 1 and len(counts) == 1 and locks[0] < counts[0]
