"""Bulk decisions end to end: real workers, RabbitMQ, PostgreSQL and SMTP sink.

The admin tool signs one ``access_request.bulk_decided`` with ``accessflow decide-bulk`` as its
own AMQP user; the decisions pool decides each request on its own; ``--wait`` reads the results,
and ``accessflow admins events`` hears them as an event from the admins' own queue.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from domain.handlers import bulk_item_decision_id
from domain.model import BulkDecision, DecisionOutcome, Status
from infra.bootstrap import Services
from infra.cli import producer
from infra.credentials import signing
from infra.messaging.topology import Topology
from infra.observability import metrics
from messages.events import AdminEvent
from tests import services as svc
from tests.conftest import ADMIN_ID, Parties
from tests.e2e.conftest import PortalClient, cli, request_payload, wait_for_status

pytestmark = pytest.mark.usefixtures("worker_pools")


def admin_event_by_cli(admin_env: dict[str, str], bulk_id: str) -> dict[str, Any]:
    """The admins' event of ``bulk_id``, as ``accessflow admins events --json`` prints it.

    The queue is the session's: other tests' bulk decisions are in it too, so take one
    event at a time until this one comes.
    """
    seen: dict[str, dict[str, Any]] = {}

    def take_one() -> dict[str, Any] | None:
        taken = cli(admin_env, "admins", "events", "--json", "--wait", "10", "--max", "1")
        for line in taken.stdout.splitlines():
            event = json.loads(line)
            seen[event["bulk_id"]] = event
        return seen.get(bulk_id)

    found: dict[str, Any] = svc.wait_until(take_one, timeout=60, what=f"the admins' event of bulk {bulk_id}")
    return found


def admin_event(admin_env: dict[str, str], prefix: str, bulk_id: str) -> AdminEvent:
    """The admins' event of ``bulk_id``, read from their queue as the admin tool's AMQP user."""
    wire = producer.AmqpWire(admin_env["ACCESSFLOW_BROKER_URL"], Topology(prefix))
    seen: dict[str, AdminEvent] = {}

    def take() -> AdminEvent | None:
        def keep(body: bytes) -> None:
            event = AdminEvent.model_validate_json(body)
            seen[event.bulk_id] = event

        wire.take_admin_events(keep, wait=0, limit=None)
        return seen.get(bulk_id)

    found: AdminEvent = svc.wait_until(take, what=f"the admins' event of bulk {bulk_id}")
    return found


class TestABulkApprovalWithMixedResults:
    def test_applies_the_pending_reports_the_decided_and_the_unknown_and_audits_each(
        self, portal: PortalClient, admin_env: dict[str, str], services: Services
    ) -> None:
        # Given two pending requests, one already rejected, and an id that names nothing
        pending = [portal.submit(request_payload(plan_id="partner")) for _ in range(2)]
        decided = portal.submit(request_payload(plan_id="partner"))
        for request_id in (*pending, decided):
            wait_for_status(services, request_id, Status.PENDING_REVIEW)
        cli(admin_env, "decide", decided, "reject", "--reason", "no", "--admin", ADMIN_ID)
        wait_for_status(services, decided, Status.REJECTED)
        unknown = str(uuid.uuid4())

        # When the admin approves all four at once with the CLI, waiting for the results
        ids = ",".join([*pending, decided, unknown])
        result = cli(
            admin_env,
            *("decide-bulk", "approve", "--reason", "backlog cleared", "--ids", ids),
            *("--admin", ADMIN_ID, "--wait", "30", "--json"),
        )

        # Then each request has its own result
        shown = json.loads(result.stdout)
        assert shown["outcome"] == "applied"
        assert {item["request_id"]: item["result"] for item in shown["items"]} == {
            pending[0]: "applied",
            pending[1]: "applied",
            decided: "already_decided",
            unknown: "not_found",
        }
        # And the pending ones go on to be provisioned, each told to its portal as for one decision
        for request_id in pending:
            wait_for_status(services, request_id, Status.PROVISIONED)
            portal.wait_for_events(request_id, "access_request.approved")
        assert wait_for_status(services, decided, Status.REJECTED) is Status.REJECTED
        # And each item is a decision of its own, in the request's trail
        with services.uow() as uow:
            for request_id, outcome in [
                (pending[0], DecisionOutcome.APPLIED),
                (decided, DecisionOutcome.IGNORED),
                (unknown, DecisionOutcome.IGNORED),
            ]:
                decision = uow.decisions.get(bulk_item_decision_id(shown["bulk_id"], request_id))
                assert decision is not None and decision.outcome is outcome
                assert decision.admin_id == ADMIN_ID and decision.key_id is not None
            request = uow.requests.get(pending[1])
            assert request is not None
            assert any(entry.actor_id == ADMIN_ID for entry in request.history)
        # And the admins' tools hear the same results as an event, on their own queue
        event = admin_event_by_cli(admin_env, shown["bulk_id"])
        assert (event["event"], event["admin_id"], event["decision"], event["outcome"]) == (
            "access_request.bulk_decided",
            ADMIN_ID,
            "approve",
            "applied",
        )
        assert [(item["request_id"], item["result"]) for item in event["results"]] == [
            (item["request_id"], item["result"]) for item in shown["items"]
        ]

    def test_the_table_names_each_request_and_its_result(
        self, portal: PortalClient, admin_env: dict[str, str], services: Services
    ) -> None:
        # Given one pending request
        request_id = portal.submit(request_payload(plan_id="partner"))
        wait_for_status(services, request_id, Status.PENDING_REVIEW)

        # When the admin rejects it by id, waiting for the results as a table
        result = cli(
            admin_env,
            *("decide-bulk", "reject", "--reason", "closed", "--ids", request_id),
            *("--admin", ADMIN_ID, "--wait", "30"),
        )

        # Then the table shows it, rejected
        assert request_id in result.stdout and "applied" in result.stdout
        wait_for_status(services, request_id, Status.REJECTED)


class TestARefusedBulkDecision:
    def test_is_recorded_decides_nothing_and_is_counted_as_refused(
        self, portal: PortalClient, admin_env: dict[str, str], parties: Parties, services: Services
    ) -> None:
        # Given a pending request, and a bulk approval of it signed for another deployment
        request_id = portal.submit(request_payload(plan_id="partner"))
        wait_for_status(services, request_id, Status.PENDING_REVIEW)
        bulk = producer.signed_bulk_decision(
            approve=True,
            admin_id=ADMIN_ID,
            reason="not for you",
            audience="another-deployment",
            key_id=parties.admin_key_id,
            private_key=signing.load_private_key(parties.admin_key_file),
            request_ids=[request_id],
        )

        # When the admin tool publishes it
        wire = producer.AmqpWire(admin_env["ACCESSFLOW_BROKER_URL"], Topology(services.settings.queue_prefix))
        producer.decide_bulk(wire, bulk)

        # Then it is recorded as refused, and the request is still pending
        def recorded() -> BulkDecision | None:
            with services.uow() as uow:
                return uow.bulk_decisions.get(bulk.bulk_id)

        refused: BulkDecision = svc.wait_until(recorded, what=f"bulk {bulk.bulk_id} to be recorded")
        assert refused.outcome is DecisionOutcome.REFUSED
        assert refused.outcome_reason.startswith("rejected_auth: signed for 'another-deployment'")
        assert refused.results == {request_id: "refused"}
        assert wait_for_status(services, request_id, Status.PENDING_REVIEW) is Status.PENDING_REVIEW
        # And the admins hear that it was refused, and why
        event = admin_event(admin_env, services.settings.queue_prefix, bulk.bulk_id)
        assert (event.outcome, event.reason) == ("refused", refused.outcome_reason)
        assert [(item.request_id, item.result) for item in event.results] == [(request_id, "refused")]
        # And the collector counts it among the refused messages
        snapshot = metrics.Snapshot()
        metrics.read_database(services.engine, snapshot)
        assert snapshot.refused[metrics.REFUSED_BULK_DECISION] >= 1
