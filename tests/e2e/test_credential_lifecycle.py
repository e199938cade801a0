"""A credential's life after issue, end to end: real workers, RabbitMQ, PostgreSQL and SMTP sink.

Admins operate on credentials with the CLI, which signs and publishes ``credentials.operate``
as ``accessflow decide`` publishes decisions; the portal hears each change as an event; the
gateway's question, ``accessflow credentials verify``, answers from the stored state. Expiry
runs the sweep the workers run, with the clock injected: nothing here waits for time to pass.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest

from domain import handlers
from domain.model import Credential, CredentialStatus, Status
from infra.bootstrap import Services
from infra.credentials.issuing import api_key_public_id, verify
from tests import services as svc
from tests.conftest import Parties
from tests.e2e.conftest import PortalClient, cli, request_payload, wait_for_status
from tests.gateway import GatewayServer

pytestmark = pytest.mark.usefixtures("worker_pools")


def issued(portal: PortalClient, services: Services, *, plan_id: str = "starter") -> tuple[str, str, str]:
    """A provisioned request of the portal's consumer: its id, its credential's id and the opened secret."""
    request_id = portal.submit(request_payload(plan_id=plan_id))
    wait_for_status(services, request_id, Status.PROVISIONED)
    [event] = [
        e
        for e in portal.wait_for_events(request_id, "credentials.issued")
        if e["event"] == "credentials.issued"
    ]
    return request_id, event["credential"]["id"], portal.open(event["sealed_secret"]["value"])


def verify_cli(env: dict[str, str], secret: str) -> dict[str, Any]:
    """What a gateway hears back: ``{"valid": ...}`` and, when valid, the app, products and limits."""
    result = cli(env, "credentials", "verify", "--json", stdin=secret + "\n", check=False)
    assert result.returncode == (0 if json.loads(result.stdout)["valid"] else 1), result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def operate(admin_env: dict[str, str], parties: Parties, *args: str) -> dict[str, Any]:
    """Sign and publish an operation as the admin, with the CLI; the published message."""
    result = cli(admin_env, "credentials", *args, "--admin", parties.admin_id, "--json")
    published: dict[str, Any] = json.loads(result.stdout)
    return published


def operation_results(services: Services, operation_id: str) -> dict[str, Any]:
    """The operation as recorded, once a worker has applied it."""

    def recorded() -> dict[str, Any] | None:
        with services.uow() as uow:
            found = uow.credential_operations.get(operation_id)
        return None if found is None else {"outcome": found.outcome.value, "results": found.results}

    result: dict[str, Any] = svc.wait_until(recorded, what=f"operation {operation_id} to be recorded")
    return result


def stored(services: Services, credential_id: str) -> Credential:
    with services.uow() as uow:
        credential = uow.credentials.get(credential_id)
    assert credential is not None
    return credential


def pushed(gateway: GatewayServer, secret: str, credential_id: str, *changes: str) -> list[dict[str, Any]]:
    """The verified pushes the gateway received for the credential, once ``changes`` have all arrived."""

    def arrived() -> list[dict[str, Any]] | None:
        bodies = [r.verified(secret)["data"] for r in gateway.about(credential_id)]
        return bodies if set(changes) <= {b["change"] for b in bodies} else None

    found: list[dict[str, Any]] = svc.wait_until(arrived, what=f"pushes {changes} of {credential_id}")
    return found


def trail(services: Services, credential_id: str) -> list[tuple[str, str, str]]:
    with services.uow() as uow:
        return [
            (str(e["change"]), str(e["to_status"]), str(e["actor_id"]))
            for e in uow.credentials.trail(credential_id)
        ]


class TestRotation:
    def test_with_a_grace_period_both_secrets_verify_until_it_ends_then_only_the_new_one(
        self,
        portal: PortalClient,
        services: Services,
        admin_env: dict[str, str],
        env: dict[str, str],
        parties: Parties,
        gateway: GatewayServer,
        gateway_secret: str,
    ) -> None:
        # Given an issued API key that verifies
        request_id, credential_id, old_secret = issued(portal, services)
        assert verify_cli(env, old_secret)["valid"] is True

        # When an admin rotates it with an hour's grace
        published = operate(
            admin_env,
            parties,
            "rotate",
            credential_id,
            "--grace",
            "3600",
            "--reason",
            "key leaked in CI logs",
        )
        assert operation_results(services, published["operation_id"])["results"] == {credential_id: "applied"}

        # Then the portal receives the new secret sealed to its key, as it received the first one
        [rotated] = [
            e
            for e in portal.wait_for_events(request_id, "credentials.rotated")
            if e["event"] == "credentials.rotated"
        ]
        new_secret = portal.open(rotated["sealed_secret"]["value"])
        assert new_secret != old_secret
        assert rotated["credential"]["public_id"] == api_key_public_id(new_secret)
        assert rotated["credential"]["previous_public_id"] == api_key_public_id(old_secret)
        assert rotated["credential"]["revision"] == 2
        # And both verify now, as the same credential with the same limits
        new_answer, old_answer = verify_cli(env, new_secret), verify_cli(env, old_secret)
        assert new_answer["valid"] and old_answer["valid"]
        assert new_answer["credential_id"] == old_answer["credential_id"] == credential_id
        assert new_answer["rate_limit_per_minute"] == 60 and new_answer["product_ids"] == ["payments"]

        # And around the end of the grace period (the gateway's check, with the clock injected):
        credential = stored(services, credential_id)
        grace_ends = credential.previous_valid_until
        assert grace_ends is not None
        old_id, new_id = api_key_public_id(old_secret) or "", api_key_public_id(new_secret) or ""
        just_before, at_the_end = grace_ends - timedelta(milliseconds=1), grace_ends
        assert verify(old_secret, old_id, credential, just_before) is True
        assert verify(old_secret, old_id, credential, at_the_end) is False
        assert verify(new_secret, new_id, credential, at_the_end + timedelta(days=1)) is True
        # And the trail says who rotated it and why
        assert trail(services, credential_id) == [
            ("issued", "active", "issuer"),
            ("rotated", "active", parties.admin_id),
        ]
        # And the gateway was told, signed: the new hash, and the old one with the end of its grace
        [rotation] = [
            p for p in pushed(gateway, gateway_secret, credential_id, "rotated") if p["change"] == "rotated"
        ]
        assert (rotation["revision"], rotation["secret_hash"]) == (2, credential.secret_hash)
        assert rotation["previous_public_id"] == old_id
        assert rotation["previous_secret_hash"] == credential.previous_secret_hash
        assert rotation["previous_valid_until"] is not None
        assert old_secret not in str(rotation) and new_secret not in str(rotation)

    def test_without_grace_the_old_secret_stops_verifying_at_once(
        self,
        portal: PortalClient,
        services: Services,
        admin_env: dict[str, str],
        env: dict[str, str],
        parties: Parties,
    ) -> None:
        request_id, credential_id, old_secret = issued(portal, services)
        published = operate(admin_env, parties, "rotate", credential_id, "--reason", "routine")
        operation_results(services, published["operation_id"])
        [rotated] = [
            e
            for e in portal.wait_for_events(request_id, "credentials.rotated")
            if e["event"] == "credentials.rotated"
        ]
        assert verify_cli(env, old_secret) == {"valid": False}
        assert verify_cli(env, portal.open(rotated["sealed_secret"]["value"]))["valid"] is True


class TestSuspendResumeRevoke:
    def test_suspend_by_app_stops_verifying_resume_restores_and_revoke_ends_it_for_good(
        self,
        portal: PortalClient,
        services: Services,
        admin_env: dict[str, str],
        env: dict[str, str],
        parties: Parties,
        gateway: GatewayServer,
        gateway_secret: str,
    ) -> None:
        # Given an issued credential of app acme-checkout
        request_id, credential_id, secret = issued(portal, services)

        # When an admin suspends every credential of the app
        suspended = operate(
            admin_env, parties, "suspend", "--app", "acme-checkout", "--reason", "unpaid invoice"
        )
        assert operation_results(services, suspended["operation_id"])["results"][credential_id] == "applied"
        # Then it fails verification at once, and the portal is told
        assert verify_cli(env, secret) == {"valid": False}
        portal.wait_for_events(request_id, "credentials.suspended")

        # When resumed, it verifies again
        resumed = operate(admin_env, parties, "resume", "--credential", credential_id, "--reason", "paid")
        assert operation_results(services, resumed["operation_id"])["results"] == {credential_id: "applied"}
        assert verify_cli(env, secret)["valid"] is True

        # When revoked, it fails, and no resume brings it back
        revoked = operate(admin_env, parties, "revoke", "--credential", credential_id, "--reason", "abuse")
        assert operation_results(services, revoked["operation_id"])["results"] == {credential_id: "applied"}
        assert verify_cli(env, secret) == {"valid": False}
        again = operate(admin_env, parties, "resume", "--credential", credential_id, "--reason", "oops")
        refused = operation_results(services, again["operation_id"])
        assert refused["outcome"] == "ignored"
        assert refused["results"] == {
            credential_id: f"credential {credential_id} is revoked: it cannot be resumed"
        }
        assert verify_cli(env, secret) == {"valid": False}
        # And the portal heard each change, in order, in the request's sequence
        events = portal.wait_for_events(request_id, "credentials.revoked")
        names = [
            e["event"]
            for e in sorted(events, key=lambda e: e["sequence"])
            if e["event"].startswith("credentials.")
        ]
        assert names == [
            "credentials.issued",
            "credentials.suspended",
            "credentials.resumed",
            "credentials.revoked",
        ]
        assert [e["status"] for e in events if e["event"] == "credentials.revoked"] == ["revoked"]
        assert [change for change, _, _ in trail(services, credential_id)] == [
            "issued",
            "suspended",
            "resumed",
            "revoked",
        ]
        # And the gateway heard each change at its revision, the last one revoked
        bodies = pushed(gateway, gateway_secret, credential_id, "issued", "suspended", "resumed", "revoked")
        assert sorted((b["revision"], b["change"], b["status"]) for b in bodies) == [
            (1, "issued", "active"),
            (2, "suspended", "suspended"),
            (3, "resumed", "active"),
            (4, "revoked", "revoked"),
        ]
        # And operators find it among the app's revoked credentials, at its fourth revision
        listed = json.loads(
            cli(env, "credentials", "list", "--app", "acme-checkout", "--status", "revoked", "--json").stdout
        )
        assert {(c["id"], c["revision"]) for c in listed} >= {(credential_id, 4)}
        assert {c["status"] for c in listed} == {"revoked"}


class TestExpiry:
    def test_notices_at_each_point_then_expiry_by_the_sweep_with_an_injected_clock(
        self, portal: PortalClient, services: Services, env: dict[str, str], smtp: svc.SmtpSink
    ) -> None:
        # Given a credential of the trial plan, whose credentials live 30 days
        request_id, credential_id, secret = issued(portal, services, plan_id="trial")
        expires_at = stored(services, credential_id).expires_at
        assert expires_at is not None
        points = [timedelta(days=14), timedelta(days=3)]

        def sweep_at(moment: datetime) -> tuple[int, int]:
            # The sweep the credentials pool runs every ACCESSFLOW_EXPIRY_SWEEP_SECONDS, at a chosen time.
            # Other tests' credentials expire too when the clock is far ahead: count only this one's changes.
            return handlers.expire_credentials(uow=services.uow(), notice_points=points, now=lambda: moment)

        def notices() -> list[str]:
            return sorted(m["Subject"] for m in smtp.about(request_id) if "expire" in m["Subject"])

        # When the sweep runs 20 days before the end: nothing is due
        sweep_at(expires_at - timedelta(days=20))
        assert stored(services, credential_id).expiry_notices == ""
        # When it runs 13 days before: the 14-day notice, by email and event; the secret still verifies
        sweep_at(expires_at - timedelta(days=13))
        svc.wait_until(lambda: len(notices()) == 1, what="the 14-day notice")
        expiring = portal.wait_for_events(request_id, "credentials.expiring")
        assert "(14d notice)" in next(e for e in expiring if e["event"] == "credentials.expiring")["reason"]
        assert verify_cli(env, secret)["valid"] is True
        # When it runs again at the same point: nothing new (the notice is recorded)
        sweep_at(expires_at - timedelta(days=13))
        # When it runs 2 days before: the 3-day notice
        sweep_at(expires_at - timedelta(days=2))
        svc.wait_until(lambda: len(notices()) == 2, what="the 3-day notice")
        assert stored(services, credential_id).expiry_notices == "14d,3d"
        # But the sweep is not what stops it: at expires_at the gateway's check fails by itself
        credential = stored(services, credential_id)
        public_id = api_key_public_id(secret) or ""
        assert verify(secret, public_id, credential, expires_at - timedelta(microseconds=1)) is True
        assert verify(secret, public_id, credential, expires_at) is False

        # When the sweep runs after the end: expired, with the email and the event
        sweep_at(expires_at + timedelta(seconds=1))
        assert stored(services, credential_id).status is CredentialStatus.EXPIRED
        svc.wait_until(
            lambda: any("has expired" in m["Subject"] for m in smtp.about(request_id)),
            what="the expired email",
        )
        portal.wait_for_events(request_id, "credentials.expired")
        # And it fails verification now, whatever the clock says
        assert verify_cli(env, secret) == {"valid": False}
        expiring_mails = [m for m in smtp.about(request_id) if "expires on" in m["Subject"]]
        assert len(expiring_mails) == 2 and len({m["Message-ID"] for m in expiring_mails}) == 2
        assert [change for change, _, _ in trail(services, credential_id)] == [
            "issued",
            "expiring",
            "expiring",
            "expired",
        ]


class TestPlanChange:
    def test_to_an_auto_approve_plan_applies_at_once_and_keeps_the_key(
        self,
        portal: PortalClient,
        services: Services,
        admin_env: dict[str, str],
        env: dict[str, str],
        parties: Parties,
    ) -> None:
        request_id, credential_id, secret = issued(portal, services)
        published = operate(admin_env, parties, "change-plan", credential_id, "gold", "--reason", "upgraded")
        result = operation_results(services, published["operation_id"])
        [(_, opened)] = result["results"].items()
        change_id = opened.split()[3].rstrip(":")
        # Then the plan-change request was routed as an access request is, and provisioned
        wait_for_status(services, change_id, Status.PROVISIONED)
        portal.wait_for_events(request_id, "credentials.plan_changed")
        answer = verify_cli(env, secret)
        assert answer["valid"] and answer["plan_id"] == "gold"
        assert (answer["rate_limit_per_minute"], answer["monthly_quota"]) == (1200, 500000)
        assert answer["credential_id"] == credential_id  # the same key, the same credential

    def test_asked_by_the_portal_is_routed_the_same_way(
        self, portal: PortalClient, services: Services, env: dict[str, str]
    ) -> None:
        request_id, credential_id, secret = issued(portal, services)
        change_id = portal.submit(request_payload(plan_id="gold", credential_id=credential_id))
        wait_for_status(services, change_id, Status.PROVISIONED)
        assert verify_cli(env, secret)["plan_id"] == "gold"
        # The portal hears the change request's own story, and the credential's change on the first
        assert "access_request.provisioned" in {
            e["event"] for e in portal.wait_for_events(change_id, "access_request.provisioned")
        }
        portal.wait_for_events(request_id, "credentials.plan_changed")

    def test_to_a_manual_plan_waits_for_an_admin_then_applies(
        self,
        portal: PortalClient,
        services: Services,
        admin_env: dict[str, str],
        env: dict[str, str],
        parties: Parties,
        smtp: svc.SmtpSink,
    ) -> None:
        request_id, credential_id, secret = issued(portal, services)
        published = operate(
            admin_env, parties, "change-plan", credential_id, "partner", "--reason", "needs more"
        )
        [(_, opened)] = operation_results(services, published["operation_id"])["results"].items()
        change_id = opened.split()[3].rstrip(":")
        # Then it is parked, and the admins are asked, as for any request under that plan
        wait_for_status(services, change_id, Status.PENDING_REVIEW)
        svc.wait_until(
            lambda: any("awaits review" in m["Subject"] for m in smtp.about(change_id)), what="review email"
        )
        assert verify_cli(env, secret)["plan_id"] == "starter"  # nothing changed yet
        # When an admin approves it
        cli(
            admin_env,
            "decide",
            change_id,
            "approve",
            "--reason",
            "contract signed",
            "--admin",
            parties.admin_id,
        )
        wait_for_status(services, change_id, Status.PROVISIONED)
        # Then the same key carries the new plan's limits
        answer = verify_cli(env, secret)
        assert (answer["plan_id"], answer["rate_limit_per_minute"], answer["monthly_quota"]) == (
            "partner",
            600,
            None,
        )
        changed = portal.wait_for_events(request_id, "credentials.plan_changed")
        assert [e["credential"]["plan_id"] for e in changed if e["event"] == "credentials.plan_changed"] == [
            "partner"
        ]

    def test_to_the_plan_it_is_on_is_invalid_with_the_reason(
        self, portal: PortalClient, services: Services, admin_env: dict[str, str], parties: Parties
    ) -> None:
        _, credential_id, _ = issued(portal, services)
        published = operate(admin_env, parties, "change-plan", credential_id, "starter", "--reason", "same")
        result = operation_results(services, published["operation_id"])
        assert result["outcome"] == "ignored"
        [(_, opened)] = result["results"].items()
        change_id = opened.split()[3].rstrip(":")
        wait_for_status(services, change_id, Status.INVALID)
        with services.uow() as uow:
            request = uow.requests.get(change_id)
        assert (
            request is not None
            and request.status_reason == f"credential {credential_id!r} is on plan 'starter' already"
        )
