"""The CLI as an operator meets it: a fresh database, clear errors, non-zero exits."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from starlette.testclient import TestClient

from infra.bootstrap import build
from infra.console import auth
from infra.console.app import Console, create_app
from infra.db.migrate import alembic_config
from infra.settings import Settings
from tests import services as svc
from tests.conftest import EXAMPLES
from tests.e2e.conftest import cli, settings_env

pytestmark = pytest.mark.e2e

HEAD = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


@pytest.fixture(scope="module")
def fresh_env(postgres_server: str, settings: Settings) -> Iterator[dict[str, str]]:
    """The environment of an operator who has just created an empty database."""
    with svc.fresh_database(postgres_server) as url:
        yield settings_env(settings.model_copy(update={"database_url": url}))


class TestSettingUp:
    def test_db_upgrade_then_catalog_load_on_an_empty_database(self, fresh_env: dict[str, str]) -> None:
        upgraded = cli(fresh_env, "db", "upgrade")
        assert f"database at revision {HEAD}" in upgraded.stdout

        loaded = cli(fresh_env, "catalog", "load", str(EXAMPLES / "catalog.yaml"), "--json")

        assert json.loads(loaded.stdout) == {
            "products": 3,
            "plans": 3,
            "consumers": 2,
            "apps": 2,
            "portals": 0,
            "admins": 0,
        }
        assert json.loads(cli(fresh_env, "requests", "list", "--json").stdout) == []

    def test_upgrading_twice_changes_nothing(self, fresh_env: dict[str, str]) -> None:
        cli(fresh_env, "db", "upgrade")
        assert f"database at revision {HEAD}" in cli(fresh_env, "db", "upgrade").stdout


class TestErrors:
    def test_a_catalogue_with_a_dangling_reference_is_refused_with_the_reason(
        self, fresh_env: dict[str, str], tmp_path: Path
    ) -> None:
        bad = tmp_path / "catalog.yaml"
        bad.write_text(
            "products: []\nplans:\n  - {id: p, name: P, auto_approve: true, rate_limit_per_minute: 1, products: [ghost]}\n"
        )

        result = cli(fresh_env, "catalog", "load", str(bad), check=False)

        assert result.returncode == 1
        assert "offers products not in this file: ghost" in result.stderr

    def test_a_request_file_that_breaks_the_contract_is_not_published(
        self, fresh_env: dict[str, str], tmp_path: Path
    ) -> None:
        bad = tmp_path / "request.json"
        bad.write_text(
            json.dumps(
                {
                    "consumer": {"id": "acme", "email": "not-an-email", "name": "A"},
                    "app_id": "x",
                    "product_ids": [],
                    "plan_id": "starter",
                }
            )
        )

        result = cli(fresh_env, "submit", str(bad), check=False)

        assert result.returncode == 1
        assert "consumer.email" in result.stderr and "product_ids" in result.stderr

    def test_an_unknown_request_is_an_error(self, fresh_env: dict[str, str]) -> None:
        cli(fresh_env, "db", "upgrade")
        result = cli(fresh_env, "requests", "show", "00000000-0000-0000-0000-000000000000", check=False)
        assert result.returncode == 1 and "no request" in result.stderr

    def test_a_rejection_needs_a_reason(self, fresh_env: dict[str, str]) -> None:
        result = cli(
            fresh_env,
            "decide",
            "00000000-0000-0000-0000-000000000000",
            "reject",
            "--admin",
            "dana",
            check=False,
        )
        assert result.returncode == 2 and "--reason" in result.stderr

    def test_a_decision_needs_a_signing_key(self, fresh_env: dict[str, str]) -> None:
        result = cli(
            fresh_env,
            "decide",
            "00000000-0000-0000-0000-000000000000",
            "approve",
            "--admin",
            "dana",
            check=False,
        )
        assert result.returncode == 2 and "--key-file" in result.stderr

    def test_an_unreachable_broker_is_an_error_not_a_hang(self, fresh_env: dict[str, str]) -> None:
        env = {**fresh_env, "ACCESSFLOW_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{svc.free_port()}/%2F"}
        request = str(EXAMPLES / "requests" / "01-auto-approve.json")
        result = cli(env, "submit", "--portal", "acme-portal", request, check=False)
        assert result.returncode == 1 and "could not publish" in result.stderr


class TestTheDemo:
    def test_plays_the_four_scenarios_and_writes_the_emails(self, tmp_path: Path) -> None:
        # The demo needs no service: run it with an environment that points at none.
        result = cli(
            {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
            "demo",
            "--workdir",
            str(tmp_path / "demo"),
            "--examples",
            str(EXAMPLES),
        )

        out = result.stdout
        for expected in (
            "01-auto-approve.json",
            "provisioned",
            "02-manual-approve.json",
            "03-manual-reject.json",
            "rejected",
            "04-invalid-mixed-auth.json",
            "one authentication method",
            "refused  rejected_auth: bad signature",
            "sealed secret opened with the portal's key",
            "matches the stored hash",
            "5 emails written",
        ):
            assert expected in out, f"{expected!r} not in the demo's output:\n{out}"

    def test_shows_one_of_each_review_feature_and_where_the_console_would_serve_it(
        self, tmp_path: Path
    ) -> None:
        # Given the demo, run with an environment that points at no service
        workdir = tmp_path / "demo"
        result = cli(
            {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
            "demo", "--workdir", str(workdir), "--examples", str(EXAMPLES),
        )  # fmt: skip

        # Then each review step prints its line
        out = result.stdout
        for expected in (
            # a rule-decided request, each way, naming the rule
            "provisioned     routed by: rule 2: email domain acme.example is trusted",
            "rejected        routed by: rule 1: email domain spam.example is refused",
            "pending_review  routed by: rule 4: plan 'vetted' requires 2 approval(s)",
            # a throttled one
            "request 4: invalid         throttled: consumer 'initech' has 3 open request(s) on plan 'vetted'",
            # N of M
            "after dana approves:       pending_review",
            "after lee approves too:    provisioned",
            # a bulk approval, one signed message with a result per item
            "for 3 requests and an unknown id, results per item:",
            "applied          provisioned",
            "00000000-0000-4000-8000-000000000000  not_found        -",
            # reminders, escalation and expiry, with their emails
            "expired 0, reminded 1, escalated 0; status pending_review",
            "email to admin@accessflow.example: Reminder: access request",
            "expired 0, reminded 0, escalated 1; status pending_review",
            "email to head-of-api@accessflow.example: Escalation: access request",
            "expired 1, reminded 0, escalated 0; status expired",
            "email to dev@acme.example: Your access request for Acme Archive expired unreviewed",
            # a credential rotated, then noticed and expired by the sweep on a fast clock
            "the old secret verifies until",
            "expired 0, noticed 1; credential active",
            "email to dev@acme.example: The credential of Acme Ledger expires on",
            "expired 1, noticed 0; credential expired",
            "email to dev@acme.example: The credential of Acme Ledger has expired",
            # where the console would serve the demo's data
            "the review console would list 2 pending requests",
            "accessflow console",
            "open http://127.0.0.1:8080/ as dana, password ",
        ):
            assert expected in out, f"{expected!r} not in the demo's output:\n{out}"
        assert out.count("routed by:") == 3
        # And the console's settings are written, its admins file one the console accepts
        env = dict(
            line.split("=", 1) for line in (workdir / "console" / "console.env").read_text().splitlines()
        )
        assert env["ACCESSFLOW_DATABASE_URL"] == f"sqlite:///{(workdir / 'accessflow.db').resolve()}"
        assert len(env["ACCESSFLOW_CONSOLE_SESSION_SECRET"]) >= 32
        [admin] = json.loads(Path(env["ACCESSFLOW_CONSOLE_ADMINS_FILE"]).read_text())
        assert admin["admin_id"] == "dana" and admin["password_hash"].startswith("scrypt$")

    def test_the_console_serves_the_demos_database_with_the_settings_it_printed(self, tmp_path: Path) -> None:
        # Given the demo's run, and the console's settings it wrote
        workdir = tmp_path / "demo"
        out = cli(
            {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
            "demo", "--workdir", str(workdir), "--examples", str(EXAMPLES),
        ).stdout  # fmt: skip
        password = re.search(r"as dana, password (\S+)", out)
        assert password, out
        env = dict(
            line.split("=", 1) for line in (workdir / "console" / "console.env").read_text().splitlines()
        )
        services = build(
            Settings(database_url=env["ACCESSFLOW_DATABASE_URL"], queue_prefix=env["ACCESSFLOW_QUEUE_PREFIX"])
        )
        wire = svc.RecordingWire()
        app = create_app(
            Console(
                reads=services.uow,
                wire=wire,
                admins=auth.read_admins(Path(env["ACCESSFLOW_CONSOLE_ADMINS_FILE"])),
                audience=env["ACCESSFLOW_QUEUE_PREFIX"],
            ),
            session_secret=env["ACCESSFLOW_CONSOLE_SESSION_SECRET"],
            secure_cookie=False,
        )
        try:
            with TestClient(app) as client:
                # When dana logs in with the printed password, and bulk-approves plan 'vetted'
                token = _csrf(client.get("/login").text)
                login = client.post(
                    "/login",
                    data={"admin_id": "dana", "password": password.group(1), "csrf_token": token},
                    follow_redirects=False,
                )
                queue = client.get("/queue?plan_id=vetted").text
                shown = re.findall(r'name="request_id" value="([^"]+)"', queue)
                client.post(
                    "/bulk-approve",
                    data={"plan_id": "vetted", "request_id": shown, "csrf_token": _csrf(queue)},
                )
        finally:
            services.close()

        # Then the queue lists the two requests the demo left pending, and one bulk approval of both is signed
        assert login.status_code == 303
        assert queue.count("Tool ") == 2 and len(shown) == 2
        [bulk] = wire.bulk_decisions()
        assert sorted(bulk["request_ids"].split(",")) == sorted(shown)
        assert (bulk["admin_id"], bulk["signature"]["key_id"]) == ("dana", "dana-demo")


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, "the page has no CSRF field"
    return match.group(1)


class TestRegisteringParties:
    def test_admins_portals_and_their_keys(self, fresh_env: dict[str, str], tmp_path: Path) -> None:
        # Given a fresh database with the example catalogue
        cli(fresh_env, "db", "upgrade")
        cli(fresh_env, "catalog", "load", str(EXAMPLES / "catalog.yaml"))

        # When an admin and a key are registered, and the key revoked
        cli(fresh_env, "admins", "add", "dana", "--email", "dana@accessflow.example")
        cli(fresh_env, "keys", "admin-generate", str(tmp_path / "dana.pem"))
        cli(
            fresh_env,
            "admins",
            "keys",
            "add",
            "dana",
            "--key-id",
            "k1",
            "--public-key",
            f"@{tmp_path}/dana.pem.pub",
        )
        cli(fresh_env, "admins", "keys", "revoke", "k1")
        # And a portal, with a key made for it
        keys = dict(
            line.split(": ", 1) for line in cli(fresh_env, "keys", "portal-generate").stdout.splitlines()
        )
        public = keys["public"].strip()
        cli(
            fresh_env,
            "portals", "add", "acme-portal", "--name", "Acme Portal", "--broker-user", "acme-user",
            "--public-key", public, "--url", "https://portal.acme.example", "--consumer", "acme",
        )  # fmt: skip

        # Then both are listed as registered, the revoked key marked
        [admin] = json.loads(cli(fresh_env, "admins", "list", "--json").stdout)
        assert admin["id"] == "dana" and admin["email"] == "dana@accessflow.example"
        [key] = admin["keys"]
        assert key["key_id"] == "k1" and key["revoked_at"] is not None
        assert key["public_key"] == (tmp_path / "dana.pem.pub").read_text().strip()
        [portal] = json.loads(cli(fresh_env, "portals", "list", "--json").stdout)
        assert portal == {
            "id": "acme-portal",
            "name": "Acme Portal",
            "broker_user": "acme-user",
            "public_key": public,
            "url": "https://portal.acme.example",
            "consumers": ["acme"],
        }

    def test_bad_registrations_are_refused_with_the_reason(self, fresh_env: dict[str, str]) -> None:
        cli(fresh_env, "db", "upgrade")
        cli(fresh_env, "catalog", "load", str(EXAMPLES / "catalog.yaml"))
        cases = {
            "a key for an unknown admin": (
                ["admins", "keys", "add", "nobody", "--key-id", "k", "--public-key", "ed25519:" + "A" * 43 + "="],
                "no admin nobody",
            ),
            "(the admin the next check needs)": (
                ["admins", "add", "dana", "--email", "dana@accessflow.example"],
                "",
            ),
            "a portal key that is not 32 bytes": (
                ["portals", "add", "p", "--name", "P", "--broker-user", "u", "--public-key", "c2hvcnQ="],
                "32 bytes",
            ),
            "a portal for an unknown consumer": (
                ["portals", "add", "p", "--name", "P", "--broker-user", "u", "--public-key", "A" * 43 + "=",
                 "--consumer", "initech"],
                "unknown consumer(s): initech",
            ),
            "a portal called admins, the admins' events' routing word": (
                ["portals", "add", "admins", "--name", "A", "--broker-user", "u", "--public-key", "A" * 43 + "="],
                "reserved for the admins' events",
            ),
            "a portal id with a dot, which would widen its routing key": (
                ["portals", "add", "p.x", "--name", "P", "--broker-user", "u", "--public-key", "A" * 43 + "="],
                "letters, digits, '_' and '-' only",
            ),
            "a portal name with an encoded word": (
                ["portals", "add", "p", "--name", "=?utf-8?q?x?=", "--broker-user", "u", "--public-key", "A" * 43 + "="],
                "=?",
            ),
        }  # fmt: skip
        for case, (args, reason) in cases.items():
            result = cli(fresh_env, *args, check=False)
            if not reason:  # a step the next case needs
                assert result.returncode == 0, result.stderr
                continue
            assert result.returncode == 1, case
            assert reason in result.stderr, f"{case}: {result.stderr}"
        bad_key = cli(
            fresh_env,
            "admins",
            "keys",
            "add",
            "dana",
            "--key-id",
            "k",
            "--public-key",
            "rsa:xyz",
            check=False,
        )
        assert bad_key.returncode == 1 and "ed25519" in bad_key.stderr.lower()
        registered = {p["id"] for p in json.loads(cli(fresh_env, "portals", "list", "--json").stdout)}
        assert not registered & {"p", "admins", "p.x"}
