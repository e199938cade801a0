"""The mapping, the constraints and the audit table, on real PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from domain import commands, handlers
from domain.model import (
    AccessRequest,
    AuthMethod,
    Credential,
    Decision,
    DecisionOutcome,
    Status,
)
from domain.model import (
    DecisionOutcome as Outcome,
)
from infra.bootstrap import Services
from infra.cli import producer
from infra.db import orm
from tests.conftest import PORTAL_ID, Parties

pytestmark = pytest.mark.integration

#: The deployment the test admin signs its decisions for, and the handler checks them against.
AUDIENCE = "accessflow-integration"


def routed(services: Services, plan_id: str = "partner") -> str:
    """A request from Acme's portal, routed by the real handler; its id."""
    request_id = str(uuid.uuid4())
    with services.uow() as uow:
        portal = uow.portals.get(PORTAL_ID)
        assert portal is not None
    handlers.route_request(
        commands.RouteRequest(
            request_id=request_id,
            consumer_id="acme",
            consumer_email="dev@acme.example",
            consumer_name="Acme",
            plan_id=plan_id,
            product_ids=("payments",),
            app_id="acme-checkout",
            new_app_name=None,
            new_app_description=None,
            justification=None,
            submitted_at=datetime.now(UTC),
            portal_id=PORTAL_ID,
            sender=portal.broker_user,
        ),
        uow=services.uow(),
    )
    return request_id


def decision(parties: Parties, request_id: str, *, approve: bool) -> commands.DecideRequest:
    """A decision signed with the test admin's real Ed25519 key, as the admin tool signs it."""
    return producer.signed_decision(
        request_id=request_id,
        approve=approve,
        admin_id=parties.admin_id,
        reason="because",
        audience=AUDIENCE,
        key_id=parties.admin_key_id,
        private_key=parties.admin_key,
    ).to_command()


def decide(services: Services, command: commands.DecideRequest) -> Outcome:
    return handlers.decide(command, uow=services.uow(), verify=services.verify_signature, audience=AUDIENCE)


class TestTheMapping:
    def test_round_trips_a_request_with_its_history(self, services: Services) -> None:
        request_id = routed(services)

        with services.uow() as uow:
            loaded = uow.requests.get(request_id)

        assert isinstance(loaded, AccessRequest)
        assert loaded.status is Status.PENDING_REVIEW
        assert loaded.product_ids == ["payments"]
        assert loaded.auth_method is AuthMethod.API_KEY
        assert [e.to_status for e in loaded.history] == [Status.SUBMITTED, Status.PENDING_REVIEW]
        assert loaded.events == []  # restored on load, so a loaded aggregate can record again

    def test_rolls_back_what_was_not_committed(self, services: Services) -> None:
        request_id = str(uuid.uuid4())
        with services.uow() as uow:
            uow.requests.add(
                AccessRequest(
                    id=request_id,
                    consumer_id="acme",
                    plan_id="starter",
                    product_ids=["payments"],
                    app_id="acme-checkout",
                    submitted_at=datetime.now(UTC),
                )
            )
            # no commit

        with services.uow() as uow:
            assert uow.requests.get(request_id) is None


class TestTheAuditLog:
    def test_refuses_updates_and_deletes(self, services: Services) -> None:
        request_id = routed(services)

        for statement in (
            orm.audit_log.update().where(orm.audit_log.c.request_id == request_id).values(reason="edited"),
            orm.audit_log.delete().where(orm.audit_log.c.request_id == request_id),
        ):
            with (
                services.engine.connect() as connection,
                pytest.raises(sa.exc.DBAPIError, match="append-only"),
            ):
                connection.execute(statement)


class TestTheConstraints:
    def test_forbid_a_second_credential_for_a_request(self, services: Services) -> None:
        request_id = routed(services, plan_id="starter")
        handlers.issue_credentials(
            commands.IssueCredentials(request_id),
            uow=services.uow(),
            issuer=services.issuer,
            sealer=services.sealer(),
            portal_sealer=services.portal_sealer,
        )

        with services.uow() as uow, pytest.raises(sa.exc.IntegrityError):
            uow.credentials.add(
                Credential(
                    id=str(uuid.uuid4()),
                    request_id=request_id,
                    app_id="acme-checkout",
                    kind=AuthMethod.API_KEY,
                    public_id="af_deadbeef",
                    secret_hash="x",
                    sealed_secret=None,
                    product_ids=["payments"],
                    rate_limit_per_minute=1,
                    monthly_quota=None,
                )
            )
            uow.commit()

    def test_forbid_a_second_applied_decision(self, services: Services, parties: Parties) -> None:
        request_id = routed(services)
        assert decide(services, decision(parties, request_id, approve=False)) is Outcome.APPLIED

        with services.uow() as uow, pytest.raises(sa.exc.IntegrityError):
            uow.decisions.add(
                Decision(
                    id=str(uuid.uuid4()),
                    request_id=request_id,
                    approve=True,
                    admin_id="a",
                    admin_email="a@accessflow.example",
                    reason="r",
                    decided_at=datetime.now(UTC),
                    outcome=DecisionOutcome.APPLIED,
                )
            )
            uow.commit()


class TestRacingDecisions:
    def test_exactly_one_of_approve_and_reject_applies(self, services: Services, parties: Parties) -> None:
        # Given pending requests, and for each an approve and a reject arriving at once
        request_ids = [routed(services) for _ in range(10)]
        outcomes: list[tuple[str, bool, Outcome]] = []
        barrier = threading.Barrier(2)

        def decide_all(approve: bool) -> None:
            barrier.wait()
            for request_id in request_ids:
                outcome = decide(services, decision(parties, request_id, approve=approve))
                outcomes.append((request_id, approve, outcome))

        threads = [threading.Thread(target=decide_all, args=(approve,)) for approve in (True, False)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)

        # Then each request has one applied decision, and its state matches that decision
        for request_id in request_ids:
            applied = [approve for rid, approve, o in outcomes if rid == request_id and o is Outcome.APPLIED]
            assert len(applied) == 1
            with services.uow() as uow:
                request = uow.requests.get(request_id)
                assert request is not None
                assert request.status is (Status.APPROVED if applied[0] else Status.REJECTED)
