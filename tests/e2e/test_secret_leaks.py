"""The leak search: after end-to-end flows on real services, no secret issued is anywhere but with its portal.

Flows: an API key auto-approved, an OAuth2 client approved by an admin's signed decision,
each secret opened by the portal with its private key, checked by a gateway
(``credentials verify``), looked at by an operator (``credentials show``, ``requests show``,
``status``), each credential rotated by an admin with a grace period and its new secret opened
and verified, and the seal keys rotated (``keys rotate``). Then every log line, table row,
queued and dead-lettered message, portal event and email is searched (tests/leaks.py), for
all four secrets.
"""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest

from domain.model import Status
from infra.bootstrap import Services
from infra.credentials.issuing import CLIENT_SECRET_SHAPE
from tests import services as svc
from tests.conftest import ADMIN_ID, Boundary
from tests.e2e.conftest import PortalClient, cli, outbox_drained, request_payload, wait_for_status
from tests.leaks import (
    Haystack,
    SecretsIssued,
    assert_no_secret_leaks,
    email_haystacks,
    event_haystacks,
    log_haystacks,
    queue_haystacks,
    queue_names,
    table_haystacks,
)

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("worker_pools")]


class Operator:
    """Runs CLI commands, and keeps what each printed: those are log lines too."""

    def __init__(self) -> None:
        self.outputs: list[tuple[str, str]] = []

    def run(self, env: dict[str, str], *args: str, stdin: str | None = None, check: bool = True) -> str:
        result: subprocess.CompletedProcess[str] = cli(env, *args, stdin=stdin, check=check)
        self.outputs.append((f"accessflow {' '.join(args)}", result.stdout + result.stderr))
        return result.stdout


def provisioned_secret(portal: PortalClient, request_id: str) -> tuple[str, str]:
    """The secret of a provisioned request, opened as the portal does, and its public id."""
    events = portal.wait_for_events(request_id, "credentials.issued", "access_request.provisioned")
    [issued] = [e for e in events if e["event"] == "credentials.issued"]
    return portal.open(issued["sealed_secret"]["value"]), str(issued["credential"]["public_id"])


def credential_of(portal: PortalClient, request_id: str) -> str:
    [issued] = [e for e in portal.events(request_id) if e["event"] == "credentials.issued"]
    return str(issued["credential"]["id"])


def rotated_secret(portal: PortalClient, request_id: str) -> str:
    """The secret of the credential's rotation, opened as the portal does."""
    events = portal.wait_for_events(request_id, "credentials.rotated")
    [rotated] = [e for e in events if e["event"] == "credentials.rotated"]
    return portal.open(rotated["sealed_secret"]["value"])


class TestTheLeakSearch:
    def test_finds_no_secret_in_logs_tables_queues_dead_letters_or_emails(
        self,
        portal: PortalClient,
        env: dict[str, str],
        admin_env: dict[str, str],
        services: Services,
        smtp: svc.SmtpSink,
        boundary: Boundary,
        worker_pools: Path,
    ) -> None:
        secrets = SecretsIssued()
        operator = Operator()

        # Given an API key issued at once (auto-approve plan) ...
        api_request = portal.submit(request_payload(app_id=None, new_app={"name": "Leak Search Keys"}))
        # ... and OAuth2 client credentials issued once an admin approved them
        oauth_request = portal.submit(
            request_payload(
                plan_id="partner", product_ids=["identity"], app_id=None, new_app={"name": "Leak Search SSO"}
            )
        )
        wait_for_status(services, oauth_request, Status.PENDING_REVIEW)
        operator.run(admin_env, "decide", oauth_request, "approve", "--reason", "signed", "--admin", ADMIN_ID)

        # When the portal opens both secrets, and a gateway checks them
        api_key, _ = provisioned_secret(portal, api_request)
        client_secret, client_id = provisioned_secret(portal, oauth_request)
        secrets.add("API key", api_key)
        secrets.add("OAuth2 client secret", client_secret)
        assert CLIENT_SECRET_SHAPE.match(client_secret), "an OAuth2 secret has the afs_ shape scanners know"
        assert operator.run(env, "credentials", "verify", stdin=api_key + "\n").startswith("valid  app ")
        verified = operator.run(
            env, "credentials", "verify", "--client-id", client_id, stdin=client_secret + "\n"
        )
        assert verified.startswith("valid  app ")
        # ... and an admin rotates both, with a grace period, and the portal opens the new secrets
        for request_id, name in ((api_request, "API key"), (oauth_request, "OAuth2 client secret")):
            credential_id = credential_of(portal, request_id)
            operator.run(
                admin_env,
                "credentials",
                "rotate",
                credential_id,
                "--grace",
                "600",
                "--reason",
                "leak drill",
                "--admin",
                ADMIN_ID,
            )
            rotated = rotated_secret(portal, request_id)
            secrets.add(f"rotated {name}", rotated)
            answer = operator.run(
                env,
                "credentials",
                "verify",
                *(("--client-id", client_id) if request_id == oauth_request else ()),
                stdin=rotated + "\n",
            )
            assert answer.startswith("valid  app "), answer
        operator.run(env, "credentials", "list", "--json")
        # ... and an operator looks at them, and rotates the seal keys
        for request_id in (api_request, oauth_request):
            operator.run(env, "requests", "show", request_id, "--json")
            operator.run(env, "credentials", "show", "--request", request_id, "--json")
        operator.run(env, "keys", "rotate")
        operator.run(env, "status", "--json", check=False)  # exits 2 for what other tests left behind
        # ... and everything settled: emails sent, the outbox published
        for request_id in (api_request, oauth_request):
            svc.wait_until(
                lambda r=request_id: any("approved" in m["Subject"] for m in smtp.about(r)),
                what=f"the approve email about {request_id}",
            )
        svc.wait_until(lambda: outbox_drained(services), what="the outbox to drain")

        # Then no secret is in any log line, row, queued or dead-lettered message, event or email
        with smtp.lock:
            raw_emails = list(smtp.raw)
        queues = queue_names(boundary.vhost)
        haystacks = itertools.chain(
            log_haystacks(sorted(worker_pools.glob("*.log")), operator.outputs),
            table_haystacks(services.engine),
            # The intruder may read every queue of the vhost: work queues, delay and dead-letter ones.
            queue_haystacks(boundary.url(boundary.intruder), queues),
            event_haystacks(portal.received, portal.party.id),
            email_haystacks(raw_emails),
        )
        searched = assert_no_secret_leaks(secrets, haystacks)
        # And the search looked everywhere it says: it did not pass by looking nowhere
        assert {"log", "output", "table", "event", "email"} <= set(searched), searched
        assert searched["table"] > 10 and searched["event"] >= 11 and searched["email"] >= 3, searched
        assert portal.queue in queues and any(q.endswith(".XQ") for q in queues), queues
        # And it finds a secret where there is one, even cut down to its random part
        with pytest.raises(AssertionError, match="OAuth2 client secret"):
            assert_no_secret_leaks(secrets, [Haystack("a control", f"token={client_secret[-30:]};")])
