"""The review console in a real headless browser: the system's Chromium, driven by Playwright.

The console is served by uvicorn (in a thread) and publishes, as the admin tool's AMQP user,
to the session's real worker pools. The admin logs in, approves one request, rejects one
with a reason and bulk-approves two by a filter; the test then reads the database (statuses,
and decisions applied in that admin's name) and the SMTP sink. Screenshots at a laptop's and
a phone's width are saved under ``tests/e2e/screenshots/`` (printed).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import uvicorn

from domain.model import Status
from infra.bootstrap import Services, build
from infra.cli.producer import AmqpWire
from infra.console import auth
from infra.console.app import CONTENT_SECURITY_POLICY, Console, create_app
from infra.db import orm
from infra.messaging.topology import Topology
from infra.settings import Settings
from tests import services as svc
from tests.conftest import Boundary, Parties
from tests.e2e.conftest import PortalClient, request_payload, wait_for_status

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).parent / "screenshots"
PASSWORD = "a long console password"
LAPTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def console_url(settings: Settings, boundary: Boundary, parties: Parties, tmp_path: Path) -> Iterator[str]:
    """The console, served by uvicorn in a thread, reading the run's database and publishing as the admin tool."""
    admins_file = tmp_path / "console-admins.json"
    admins_file.write_text(
        json.dumps(
            [
                {
                    "admin_id": parties.admin_id,
                    "password_hash": auth.hash_password(PASSWORD),
                    "key_file": str(parties.admin_key_file),
                    "key_id": parties.admin_key_id,
                }
            ]
        )
    )
    reads = build(settings)
    app = create_app(
        Console(
            reads=reads.uow,
            wire=AmqpWire(boundary.url(boundary.accounts.admin_tool), Topology(settings.queue_prefix)),
            admins=auth.read_admins(admins_file),
            audience=settings.queue_prefix,
        ),
        session_secret="console-test-session-secret-0123456789",
        secure_cookie=False,
    )
    port = svc.free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, name="console", daemon=True)
    thread.start()
    try:
        svc.wait_until(lambda: server.started, timeout=20, what="the console to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        reads.close()


def decisions_of(services: Services, request_id: str) -> list[sa.Row[tuple[object, ...]]]:
    with services.engine.connect() as connection:
        return list(
            connection.execute(sa.select(orm.decisions).where(orm.decisions.c.request_id == request_id))
        )


class TestTheConsoleInABrowser:
    def test_an_admin_approves_rejects_and_bulk_approves_and_the_workers_apply_it(
        self,
        worker_pools: Path,
        portal: PortalClient,
        other_portal: PortalClient,
        console_url: str,
        services: Services,
        smtp: svc.SmtpSink,
        parties: Parties,
    ) -> None:
        if not CHROMIUM.exists():
            svc.unavailable(f"no {CHROMIUM}: apt-get install chromium (scripts/ensure-services.sh does)")
        sync_api = pytest.importorskip("playwright.sync_api")

        # Given four requests parked for review: two of Acme's, two of Globex's
        approve_me = portal.submit(request_payload(plan_id="partner", justification="launch <next week>"))
        reject_me = portal.submit(request_payload(plan_id="partner", justification="just looking"))
        globex = {"id": "globex", "email": "api@globex.example", "name": "Globex API Team"}
        bulk = [
            other_portal.submit(
                request_payload(plan_id="partner", consumer=globex, app_id="globex-backoffice")
            )
            for _ in range(2)
        ]
        for request_id in [approve_me, reject_me, *bulk]:
            wait_for_status(services, request_id, Status.PENDING_REVIEW)

        SCREENSHOTS.mkdir(exist_ok=True)
        refused: list[str] = []
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
            )
            try:
                page = browser.new_context(viewport=LAPTOP).new_page()
                # A CSP violation (an inline script or style slipping in) is reported on the console.
                page.on("console", lambda m: refused.append(m.text) if "Content Security" in m.text else None)

                # When the admin logs in
                response = page.goto(f"{console_url}/login")
                assert response is not None
                assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
                page.fill("input[name=admin_id]", parties.admin_id)
                page.fill("input[name=password]", PASSWORD)
                page.click("button:has-text('Log in')")
                page.wait_for_url(f"{console_url}/queue")
                for request_id in [approve_me, reject_me, *bulk]:
                    assert page.locator(f"a[href='/requests/{request_id}']").count() == 1
                assert "launch <next week>" in page.inner_text("table.queue")
                page.screenshot(path=str(SCREENSHOTS / "queue-laptop.png"), full_page=True)
                page.set_viewport_size(PHONE)
                page.screenshot(path=str(SCREENSHOTS / "queue-phone.png"), full_page=True)
                page.set_viewport_size(LAPTOP)

                # And approves one request from its page
                page.click(f"a[href='/requests/{approve_me}']")
                page.screenshot(path=str(SCREENSHOTS / "pending-request-laptop.png"), full_page=True)
                page.set_viewport_size(PHONE)
                page.screenshot(path=str(SCREENSHOTS / "pending-request-phone.png"), full_page=True)
                page.set_viewport_size(LAPTOP)
                page.fill("form[action$='/approve'] input[name=reason]", "launch approved")
                page.click("button.approve")
                assert "Your approval of" in page.inner_text(".flash")

                # And rejects one with a reason
                page.goto(f"{console_url}/requests/{reject_me}")
                page.fill("form[action$='/reject'] input[name=reason]", "Partner plan is <contracted> only")
                page.click("button.reject")
                assert "Your rejection of" in page.inner_text(".flash")

                # And bulk-approves Globex's two by a filter
                page.goto(f"{console_url}/queue")
                page.fill("input[name=consumer_id]", "globex")
                page.fill("input[name=plan_id]", "partner")
                page.click("button:has-text('Filter')")
                page.fill("form.bulk input[name=reason]", "globex backlog")
                page.click("form.bulk button.approve")
                assert "approvals were published" in page.inner_text(".flash")

                # Then the workers apply each decision, in the admin's name
                wait_for_status(services, approve_me, Status.PROVISIONED)
                wait_for_status(services, reject_me, Status.REJECTED)
                for request_id in bulk:
                    wait_for_status(services, request_id, Status.PROVISIONED)

                page.goto(f"{console_url}/requests/{approve_me}")
                page.wait_for_selector("text=provisioned")
                page.screenshot(path=str(SCREENSHOTS / "request-laptop.png"), full_page=True)
                page.goto(f"{console_url}/requests/{reject_me}")
                page.set_viewport_size(PHONE)
                page.screenshot(path=str(SCREENSHOTS / "request-phone.png"), full_page=True)
            finally:
                browser.close()
        print(f"\nconsole screenshots: {SCREENSHOTS}")

        for request_id, approve, reason in [
            (approve_me, True, "launch approved"),
            (reject_me, False, "Partner plan is <contracted> only"),
            *[(request_id, True, "globex backlog") for request_id in bulk],
        ]:
            [decision] = decisions_of(services, request_id)
            assert (decision.approve, decision.reason) == (approve, reason)
            assert decision.admin_id == parties.admin_id and decision.key_id == parties.admin_key_id
            assert decision.outcome == "applied"

        # And the consumers got their emails: the rejection with its reason
        def emails_with(request_id: str, word: str) -> list[object]:
            return [m for m in smtp.about(request_id) if word in m["Subject"]]

        svc.wait_until(lambda: emails_with(reject_me, "declined"), what="the rejection email")
        [declined] = emails_with(reject_me, "declined")
        assert declined["To"] == "dev@acme.example"  # type: ignore[index]
        assert "Partner plan is <contracted> only" in declined.get_body(("plain",)).get_content()  # type: ignore[attr-defined]
        for request_id in [approve_me, *bulk]:
            svc.wait_until(
                lambda r=request_id: emails_with(r, "approved"), what=f"the approval email of {request_id}"
            )
        assert refused == [], f"the browser refused content under the CSP: {refused}"
