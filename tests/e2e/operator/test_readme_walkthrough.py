"""The README's walkthrough ("One request end to end, on local services"), run as it is written.

The block is taken from the README and run by bash, from a directory laid out as the
repository's root is (``.venv`` and ``examples``), against the local PostgreSQL and
RabbitMQ it names. Two names are made this run's own, so that nothing else is touched: the
database (``accessflow_try``) and the prefix ``try`` (the queue prefix, which the block
also uses as its vhost and its users' names). The test drops the database, the vhost and
the users afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from infra.messaging.broker_admin import Rabbitmqctl
from tests import services as svc
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

SECTION = "### One request end to end, on local services"
#: What a new user's shell has: no virtualenv, no ACCESSFLOW_* setting.
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
#: The block's own names, which the test replaces with names of this run.
DATABASE, PREFIX = "accessflow_try", "try"
ROLES = ("workers", "admin", "ops", "acme-portal")


def walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"```sh\n(.*?)```", readme[readme.index(SECTION) :], re.S)
    assert found, f"no sh block under {SECTION!r}"
    return found.group(1)


@dataclass(frozen=True)
class Run:
    directory: Path
    database: str
    prefix: str


@pytest.fixture
def run(postgres_server: str, amqp_server: str, tmp_path: Path) -> Iterator[Run]:
    """Names of this run's own, a directory laid out as the repository's root; all removed afterwards."""
    server = sa.make_url(postgres_server)
    if (server.host, server.port or 5432) != ("127.0.0.1", 5432) or "@127.0.0.1:5672/" not in amqp_server:
        svc.unavailable("the README's walkthrough names the local PostgreSQL and RabbitMQ")
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "activate").exists():
        svc.unavailable(f"no virtualenv to activate at {venv}")
    tag = uuid.uuid4().hex[:8]
    run = Run(tmp_path, f"afwalk_{tag}", f"afwalk{tag}")
    (tmp_path / ".venv").symlink_to(venv)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    admin = sa.create_engine(postgres_server, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        yield run
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{run.database}" WITH (FORCE)'))
        admin.dispose()
        ctl = Rabbitmqctl()
        ctl.delete_vhost(run.prefix)
        for role in ROLES:
            ctl.delete_user(f"{run.prefix}-{role}")


def _stop_group(pgid: int, *, grace: float) -> None:
    """Wait up to ``grace`` seconds for every process of the group to end, then kill what is left."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, signum)
        except ProcessLookupError:
            return
        time.sleep(5)


def test_the_walkthrough_runs_a_request_end_to_end(run: Run) -> None:
    # Given the README's block, with this run's database and prefix
    block = walkthrough()
    assert block.count(DATABASE) == 4, (
        "the block names its database four times: three URLs (one per role) and createdb"
    )
    block = re.sub(rf"\b{PREFIX}\b", run.prefix, block.replace(DATABASE, run.database))
    assert f"export ACCESSFLOW_QUEUE_PREFIX={run.prefix}" in block

    # When it runs in bash, in a shell as a new user has it
    env = {"PATH": SYSTEM_PATH, "HOME": str(run.directory), "LANG": "C.UTF-8"}
    log = run.directory / "walkthrough.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["bash", "-e", "-c", block],
            cwd=run.directory,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its background pools too, to stop them whatever happens
        )
        try:
            code = process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            # The block stops its pools itself; give them their graceful shutdown, then make sure.
            _stop_group(process.pid, grace=0 if code is None else 90)
    output = log.read_text()

    # Then every step succeeded
    assert code == 0, f"the walkthrough exited {code}:\n{output[-6000:]}"
    # And db upgrade said one line per migration, not Alembic's log lines
    assert "applied 0001: initial schema" in output
    assert '"logger": "alembic' not in output
    # And the pools were up before the request was submitted
    assert "all clear: nothing needs a human" in output
    # And the request was approved by the admin and provisioned, its secret sealed to the portal
    assert re.search(r"^request [0-9a-f-]{36}: provisioned", output, re.M), output[-4000:]
    assert re.search(r"pending_review\s+approved\s+admin:dana\s+contract signed", output)
    assert "secret delivered, sealed to its key, to portal acme-portal only" in output
    # And both emails were written as files, with no SMTP server
    emails = sorted(
        p.name.split(".")[0] for p in (run.directory / "var" / f"{run.prefix}-mail").glob("*.eml")
    )
    assert emails == ["approve", "review"]

    # And, as the README says next, status now exits 2: nobody reads the portal's events
    status = subprocess.run(
        [str(run.directory / ".venv" / "bin" / "accessflow"), "status", "--json"],
        env={
            **env,
            "ACCESSFLOW_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{run.database}",
            "ACCESSFLOW_QUEUE_PREFIX": run.prefix,
            "ACCESSFLOW_BROKER_URL": f"amqp://{run.prefix}-workers:workers-pw@127.0.0.1:5672/{run.prefix}",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode == 2, status.stderr
    shown = json.loads(status.stdout)
    events_queue = f"{run.prefix}.portal.acme-portal.events"
    assert [p for p in shown["needs_a_human"] if events_queue in p and "no consumer" in p], shown
    assert shown["requests"]["pending_review"] == 0 and shown["dead_letters"] == 0
