"""The portal boundary, end to end: who may say what, checked by RabbitMQ and by the workers.

Every forged message here goes through the real broker to the real worker pools, changes
nothing, and leaves a record: a refused decision, or a forged message with its reason.
"""

from __future__ import annotations

import base64
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika.exceptions
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from domain.model import Status
from infra.bootstrap import Services
from infra.cli import producer
from infra.db import orm
from infra.messaging.topology import Topology
from infra.settings import Settings
from messages import routes
from messages.canonical import canonical_bytes
from tests import services as svc
from tests.conftest import ADMIN_ID, Boundary, Parties
from tests.e2e.conftest import (
    PortalClient,
    cli,
    publish_decision,
    publish_internal,
    request_payload,
    status_of,
    wait_for_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("worker_pools")]


def pending(portal: PortalClient, services: Services) -> str:
    request_id = portal.submit(request_payload(plan_id="partner"))
    wait_for_status(services, request_id, Status.PENDING_REVIEW)
    return request_id


def signed(
    parties: Parties,
    settings: Settings,
    request_id: str,
    *,
    key: Ed25519PrivateKey | None = None,
    key_id: str | None = None,
    decided_at: datetime | None = None,
    approve: bool = True,
) -> dict[str, Any]:
    decision = producer.signed_decision(
        request_id=request_id,
        approve=approve,
        admin_id=parties.admin_id,
        reason="signed by the test",
        audience=settings.queue_prefix,
        key_id=key_id or parties.admin_key_id,
        private_key=key or parties.admin_key,
        decided_at=decided_at,
    )
    return decision.model_dump(mode="json")


def decision_outcome(services: Services, decision_id: str) -> tuple[str, str]:
    def recorded() -> tuple[str, str] | None:
        with services.engine.connect() as connection:
            row = connection.execute(
                sa.select(orm.decisions.c.outcome, orm.decisions.c.outcome_reason).where(
                    orm.decisions.c.id == decision_id
                )
            ).first()
        return (str(row.outcome), str(row.outcome_reason)) if row else None

    found: tuple[str, str] = svc.wait_until(recorded, what=f"decision {decision_id} to be recorded")
    return found


def refusal(services: Services, **where: str) -> sa.Row[tuple[Any, ...]]:
    """The one malformed_messages row matching ``where``, once it is recorded."""

    def rows() -> list[sa.Row[tuple[Any, ...]]]:
        query = sa.select(orm.malformed_messages)
        for column, value in where.items():
            query = query.where(orm.malformed_messages.c[column] == value)
        with services.engine.connect() as connection:
            return list(connection.execute(query))

    [row] = svc.wait_until(rows, what=f"a refusal with {where}")
    return row


class TestDecisionsNotSignedByAnActiveAdminKey:
    """Each is published by the admin tool's own AMQP user, so only the signature can stop it."""

    def test_an_unsigned_v1_decision(
        self, portal: PortalClient, boundary: Boundary, settings: Settings, services: Services
    ) -> None:
        request_id = pending(portal, services)
        decision_id = str(uuid.uuid4())
        unsigned = {
            "decision_id": decision_id,
            "request_id": request_id,
            "decision": "approve",
            "admin": {"id": ADMIN_ID, "email": "admin@accessflow.example"},
            "reason": "trust me",
            "decided_at": datetime.now(UTC).isoformat(),
        }
        publish_decision(boundary, settings.queue_prefix, unsigned)

        outcome, reason = decision_outcome(services, decision_id)
        assert outcome == "refused" and reason.startswith("rejected_auth: missing signature")
        assert status_of(services, request_id) is Status.PENDING_REVIEW

    def test_a_tampered_decision_has_a_bad_signature(
        self,
        portal: PortalClient,
        boundary: Boundary,
        parties: Parties,
        settings: Settings,
        services: Services,
    ) -> None:
        request_id = pending(portal, services)
        decision = signed(parties, settings, request_id, approve=False)
        decision["decision"] = "approve"  # the signature stays the admin's
        publish_decision(boundary, settings.queue_prefix, decision)

        assert decision_outcome(services, decision["decision_id"]) == (
            "refused",
            "rejected_auth: bad signature",
        )
        assert status_of(services, request_id) is Status.PENDING_REVIEW

    def test_a_stale_decision(
        self,
        portal: PortalClient,
        boundary: Boundary,
        parties: Parties,
        settings: Settings,
        services: Services,
    ) -> None:
        request_id = pending(portal, services)
        old = datetime.now(UTC) - timedelta(seconds=settings.decision_max_skew_seconds + 60)
        decision = signed(parties, settings, request_id, decided_at=old)
        publish_decision(boundary, settings.queue_prefix, decision)

        outcome, reason = decision_outcome(services, decision["decision_id"])
        assert outcome == "refused" and reason.startswith("rejected_auth: stale decision")
        assert status_of(services, request_id) is Status.PENDING_REVIEW

    def test_a_replayed_decision_id(
        self,
        portal: PortalClient,
        boundary: Boundary,
        parties: Parties,
        settings: Settings,
        services: Services,
    ) -> None:
        # Given a rejection that was applied
        request_id = pending(portal, services)
        rejection = signed(parties, settings, request_id, approve=False)
        publish_decision(boundary, settings.queue_prefix, rejection)
        wait_for_status(services, request_id, Status.REJECTED)
        # When another request's fresh approval is sent under the same decision id
        other = pending(portal, services)
        replay = signed(parties, settings, other)
        replay["decision_id"] = rejection["decision_id"]
        publish_decision(boundary, settings.queue_prefix, replay)
        # And a marker decision behind it, so we know the replay was processed
        marker = signed(parties, settings, other, approve=False)
        publish_decision(boundary, settings.queue_prefix, marker)

        # Then the replay changed nothing: the other request was decided by the marker alone
        wait_for_status(services, other, Status.REJECTED)
        assert decision_outcome(services, rejection["decision_id"]) == ("applied", "")

    def test_an_unknown_key(
        self,
        portal: PortalClient,
        boundary: Boundary,
        parties: Parties,
        settings: Settings,
        services: Services,
    ) -> None:
        request_id = pending(portal, services)
        decision = signed(parties, settings, request_id, key=Ed25519PrivateKey.generate(), key_id="ghost-key")
        publish_decision(boundary, settings.queue_prefix, decision)

        assert decision_outcome(services, decision["decision_id"]) == (
            "refused",
            "rejected_auth: unknown key 'ghost-key'",
        )

    def test_a_revoked_key_and_then_a_rotated_one(
        self,
        env: dict[str, str],
        portal: PortalClient,
        boundary: Boundary,
        parties: Parties,
        settings: Settings,
        services: Services,
        tmp_path: Path,
    ) -> None:
        # Given a second key of the admin, registered and then revoked with the CLI
        key_file = tmp_path / "rotated.pem"
        cli(env, "keys", "admin-generate", str(key_file))
        public = Path(f"{key_file}.pub").read_text().strip()
        key_id = f"rotated-{uuid.uuid4().hex[:6]}"
        cli(env, "admins", "keys", "add", ADMIN_ID, "--key-id", key_id, "--public-key", public)
        cli(env, "admins", "keys", "revoke", key_id)
        from infra.credentials.signing import load_private_key

        key = load_private_key(key_file)
        request_id = pending(portal, services)

        # When a decision signed with it arrives, it is refused
        revoked = signed(parties, settings, request_id, key=key, key_id=key_id)
        publish_decision(boundary, settings.queue_prefix, revoked)
        assert decision_outcome(services, revoked["decision_id"]) == (
            "refused",
            f"rejected_auth: key {key_id!r} was revoked",
        )
        # And a new key, registered beside the first, is accepted at once (rotation)
        new_file = tmp_path / "new.pem"
        cli(env, "keys", "admin-generate", str(new_file))
        new_id = f"new-{uuid.uuid4().hex[:6]}"
        cli(env, "admins", "keys", "add", ADMIN_ID, "--key-id", new_id, "--public-key", f"@{new_file}.pub")
        accepted = signed(parties, settings, request_id, key=load_private_key(new_file), key_id=new_id)
        publish_decision(boundary, settings.queue_prefix, accepted)
        assert decision_outcome(services, accepted["decision_id"]) == ("applied", "")


class TestADecisionSignedByAnotherImplementation:
    def test_from_openssl_is_applied_by_the_workers(
        self,
        env: dict[str, str],
        portal: PortalClient,
        boundary: Boundary,
        parties: Parties,
        settings: Settings,
        services: Services,
        tmp_path: Path,
    ) -> None:
        # Given a key made by openssl, its public half registered for the admin with the CLI
        key, public = tmp_path / "openssl.pem", tmp_path / "openssl.pub.pem"
        openssl(tmp_path, "genpkey", "-algorithm", "ed25519", "-out", str(key))
        openssl(tmp_path, "pkey", "-in", str(key), "-pubout", "-out", str(public))
        key_id = f"openssl-{uuid.uuid4().hex[:6]}"
        cli(env, "admins", "keys", "add", ADMIN_ID, "--key-id", key_id, "--public-key", f"@{public}")
        request_id = pending(portal, services)

        # When an admin tool signs the canonical bytes with openssl, and publishes the decision
        decision: dict[str, Any] = {
            "version": 2,
            "type": "access_request.decided",
            "decision_id": str(uuid.uuid4()),
            "request_id": request_id,
            "decision": "approve",
            "admin_id": ADMIN_ID,
            "reason": "signed with openssl: déjà vu",
            "decided_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "audience": settings.queue_prefix,
        }
        data = tmp_path / "canonical.json"
        data.write_bytes(canonical_bytes(decision))
        signature = openssl(tmp_path, "pkeyutl", "-sign", "-rawin", "-inkey", str(key), "-in", str(data))
        decision["signature"] = {
            "key_id": key_id,
            "algorithm": "ed25519",
            "value": base64.b64encode(signature).decode(),
        }
        publish_decision(boundary, settings.queue_prefix, decision)

        # Then the workers apply it
        assert decision_outcome(services, decision["decision_id"]) == ("applied", "")
        wait_for_status(services, request_id, Status.PROVISIONED)


def openssl(cwd: Path, *args: str) -> bytes:
    try:
        done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=30, check=True)
    except FileNotFoundError:
        svc.unavailable("openssl is not installed")
    return done.stdout


class TestPortalsSpeakOnlyForThemselves:
    def test_a_submission_for_another_portals_consumer_is_refused_and_recorded(
        self, portal: PortalClient, services: Services
    ) -> None:
        payload = request_payload(consumer={"id": "globex", "email": "api@globex.example", "name": "Globex"})
        message_id = str(uuid.uuid4())
        portal.publish(submission(portal, payload, message_id=message_id))

        row = refusal(services, message_id=message_id)
        assert row.kind == "forged" and row.sender == portal.user
        assert "may not submit for consumer 'globex'" in row.reason
        assert status_of(services, payload["request_id"]) is None

    def test_a_submission_naming_another_portal_is_refused(
        self, portal: PortalClient, other_portal: PortalClient, services: Services
    ) -> None:
        payload = request_payload(consumer={"id": "globex", "email": "api@globex.example", "name": "Globex"})
        message_id = str(uuid.uuid4())
        portal.publish(submission(portal, payload, message_id=message_id, portal_id=other_portal.party.id))

        row = refusal(services, message_id=message_id)
        assert row.kind == "forged"
        assert f"but this came from {portal.user!r}" in row.reason
        assert status_of(services, payload["request_id"]) is None

    def test_a_submission_without_a_user_id_is_refused(
        self, portal: PortalClient, services: Services
    ) -> None:
        payload = request_payload()
        message_id = str(uuid.uuid4())
        portal.publish(submission(portal, payload, message_id=message_id), user_id=None)

        row = refusal(services, message_id=message_id)
        assert row.kind == "forged" and "this came from None" in row.reason
        assert status_of(services, payload["request_id"]) is None

    def test_a_v1_submission_is_refused_while_v1_is_switched_off(
        self, portal: PortalClient, services: Services
    ) -> None:
        payload = request_payload()
        message_id = str(uuid.uuid4())
        portal.publish(
            svc.envelope(
                routes.SUBMIT.queue_name(portal.prefix), routes.SUBMIT.actor_name, payload, message_id
            )
        )

        row = refusal(services, message_id=message_id)
        assert row.kind == "forged" and "contract v1 names no portal" in row.reason
        assert status_of(services, payload["request_id"]) is None

    def test_a_spoofed_user_id_is_refused_by_the_broker(
        self, portal: PortalClient, other_portal: PortalClient, services: Services
    ) -> None:
        payload = request_payload()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            portal.publish(submission(portal, payload), user_id=other_portal.user)
        assert refused.value.reply_code == 406
        assert status_of(services, payload["request_id"]) is None

    def test_a_submission_under_another_portals_routing_key_is_refused_by_the_broker(
        self, portal: PortalClient, other_portal: PortalClient
    ) -> None:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            portal.publish(submission(portal, request_payload()), routing_key=other_portal.party.id)
        assert refused.value.reply_code == 403


class TestOnlyWorkersWriteTheInternalQueues:
    def test_a_portal_cannot_publish_a_decision_or_to_an_internal_queue(
        self, portal: PortalClient, parties: Parties, settings: Settings
    ) -> None:
        decision = signed(parties, settings, str(uuid.uuid4()))
        attempts = {
            "decisions exchange": (Topology(portal.prefix).decisions_exchange, ADMIN_ID),
            "notifications queue": ("", routes.NOTIFY.queue_name(portal.prefix)),
            "credentials queue": ("", routes.ISSUE.queue_name(portal.prefix)),
            "requests queue, directly": ("", routes.SUBMIT.queue_name(portal.prefix)),
        }
        for what, (exchange, routing_key) in attempts.items():
            body = svc.envelope(routes.DECIDE.queue_name(portal.prefix), routes.DECIDE.actor_name, decision)
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                portal.publish(body, exchange=exchange, routing_key=routing_key)
            assert refused.value.reply_code == 403, what

    def test_a_hand_made_notification_from_a_non_worker_is_refused_by_the_workers(
        self,
        portal: PortalClient,
        boundary: Boundary,
        settings: Settings,
        services: Services,
        smtp: svc.SmtpSink,
    ) -> None:
        # Given a request pending review, and a user the broker (misconfigured) lets write anywhere
        request_id = pending(portal, services)
        # When that user publishes a "reject" email order for it straight to the internal queue
        publish_internal(
            boundary,
            routes.NOTIFY,
            settings.queue_prefix,
            {"request_id": request_id, "kind": "reject"},
            user=boundary.intruder,
        )

        # Then the workers refuse it, record who sent it, and no email goes out
        row = refusal(services, sender=boundary.intruder)
        assert row.kind == "forged"
        assert "accepts only accessflow's own messages" in row.reason
        assert status_of(services, request_id) is Status.PENDING_REVIEW
        assert not [m for m in smtp.about(request_id) if "declined" in m["Subject"]]


def submission(
    portal: PortalClient,
    payload: dict[str, Any],
    *,
    message_id: str | None = None,
    portal_id: str | None = None,
) -> bytes:
    body = {"version": 2, "portal_id": portal_id or portal.party.id, **payload}
    return svc.envelope(routes.SUBMIT.queue_name(portal.prefix), routes.SUBMIT.actor_name, body, message_id)
