"""/metrics and /healthz over HTTP from real processes: the session's worker pools and ``accessflow metrics``.

After a small batch (provisioned, pending review, invalid), the pools' message series count
what they handled, and the collector's series say what the database and the broker hold.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from domain.model import FINAL_STATUSES, Status
from infra.bootstrap import Services
from infra.db import orm
from infra.settings import Settings
from messages.routes import QUEUE_ROUTES, SUBMIT
from tests import services as svc
from tests.e2e.conftest import (
    ACCESSFLOW,
    POOLS,
    PortalClient,
    outbox_drained,
    request_payload,
    wait_for_status,
)

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:port/path: the status and the body; (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError as error:
        return 0, str(error)


def scrape(port: int) -> Samples:
    status, body = get(port, "/metrics")
    assert status == 200, body
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def database_truth(services: Services) -> dict[str, Any]:
    """What the database holds, read here with plain queries, in one transaction."""
    requests, outbox = orm.access_requests, orm.outbox
    final = [status.value for status in FINAL_STATUSES]
    with services.engine.connect() as connection, connection.begin():
        by_status = dict(
            connection.execute(
                sa.select(requests.c.status, sa.func.count()).group_by(requests.c.status)
            ).all()
        )
        completion = {
            str(status): (count, total)
            for status, count, total in connection.execute(
                sa.text(
                    "SELECT status, count(*), sum(greatest(extract(epoch FROM updated_at - submitted_at), 0))"
                    " FROM access_requests WHERE status = ANY(:final) GROUP BY status"
                ),
                {"final": final},
            )
        }
        return {
            "requests": {str(k): v for k, v in by_status.items()},
            "completion": completion,
            "pending": by_status.get(Status.PENDING_REVIEW, 0),
            "backlog": connection.execute(
                sa.select(sa.func.count())
                .select_from(outbox)
                .where(outbox.c.sent_at.is_(None), outbox.c.parked_at.is_(None))
            ).scalar_one(),
            "emails": {
                (str(kind), str(status)): count
                for kind, status, count in connection.execute(
                    sa.select(orm.notifications.c.kind, orm.notifications.c.status, sa.func.count()).group_by(
                        orm.notifications.c.kind, orm.notifications.c.status
                    )
                )
            },
            "credentials": {
                str(kind): count
                for kind, count in connection.execute(
                    sa.select(orm.credentials.c.kind, sa.func.count()).group_by(orm.credentials.c.kind)
                )
            },
            "refused": {
                str(kind): count
                for kind, count in connection.execute(
                    sa.select(orm.malformed_messages.c.kind, sa.func.count()).group_by(
                        orm.malformed_messages.c.kind
                    )
                )
            },
            "refused_decisions": connection.execute(
                sa.select(sa.func.count())
                .select_from(orm.decisions)
                .where(orm.decisions.c.outcome == "refused")
            ).scalar_one(),
            "credential_states": {
                str(status): count
                for status, count in connection.execute(
                    sa.select(orm.credentials.c.status, sa.func.count()).group_by(orm.credentials.c.status)
                )
            },
        }


def differences(samples: Samples, truth: dict[str, Any]) -> list[str]:
    """Where the collector's series and the database disagree; empty when they agree."""
    found: dict[str, float] = {}
    expected: dict[str, float] = {}
    for status in Status:
        key = f"requests[{status.value}]"
        found[key] = value(samples, "accessflow_requests", status=status.value)
        expected[key] = truth["requests"].get(status.value, 0)
    for status, (count, total) in truth["completion"].items():
        found[f"completion_count[{status}]"] = value(
            samples, "accessflow_request_completion_seconds_count", status=status
        )
        expected[f"completion_count[{status}]"] = count
        found[f"completion_inf[{status}]"] = value(
            samples, "accessflow_request_completion_seconds_bucket", status=status, le="+Inf"
        )
        expected[f"completion_inf[{status}]"] = count
        found[f"completion_sum[{status}]"] = round(
            value(samples, "accessflow_request_completion_seconds_sum", status=status), 3
        )
        expected[f"completion_sum[{status}]"] = round(float(total), 3)
    found["pending"] = value(samples, "accessflow_pending_review_requests")
    expected["pending"] = truth["pending"]
    found["backlog"] = value(samples, "accessflow_outbox_backlog_rows")
    expected["backlog"] = truth["backlog"]
    for (kind, status), count in truth["emails"].items():
        found[f"emails[{kind},{status}]"] = value(samples, "accessflow_emails", kind=kind, status=status)
        expected[f"emails[{kind},{status}]"] = count
    for kind, count in truth["credentials"].items():
        found[f"credentials[{kind}]"] = value(samples, "accessflow_credentials_issued_total", kind=kind)
        expected[f"credentials[{kind}]"] = count
    for kind, count in truth["refused"].items():
        found[f"refused[{kind}]"] = value(samples, "accessflow_refused_messages_total", reason=kind)
        expected[f"refused[{kind}]"] = count
    found["refused_decisions"] = value(
        samples, "accessflow_refused_messages_total", reason="refused_decision"
    )
    expected["refused_decisions"] = truth["refused_decisions"]
    for state, count in truth["credential_states"].items():
        found[f"credential_states[{state}]"] = value(samples, "accessflow_credentials", status=state)
        expected[f"credential_states[{state}]"] = count
    return [
        f"{key}: exported {found[key]}, database {expected[key]}"
        for key in expected
        if found[key] != expected[key]
    ]


@pytest.fixture
def collector(env: dict[str, str], tmp_path: Path) -> Iterator[int]:
    """``accessflow metrics`` as a real process on a port of its own; yields the port once it is ready."""
    port = svc.free_port()
    log_file = (tmp_path / "metrics.log").open("w")
    process = subprocess.Popen(
        [ACCESSFLOW, "metrics"],
        env={**env, "ACCESSFLOW_METRICS_PORT": str(port), "ACCESSFLOW_METRICS_REFRESH_SECONDS": "0.2"},
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        svc.wait_until(
            lambda: process.poll() is not None or get(port, "/healthz/ready")[0] == 200,
            timeout=30,
            what="accessflow metrics to be ready",
        )
        assert process.poll() is None, (tmp_path / "metrics.log").read_text()
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()
            log_file.close()


class TestMetricsOfRealProcesses:
    def test_pools_count_the_batch_and_the_collector_says_what_the_database_holds(
        self,
        worker_pools: Path,
        pool_ports: dict[tuple[str, ...], int],
        portal: PortalClient,
        services: Services,
        settings: Settings,
        collector: int,
    ) -> None:
        # Given the session's pools, serving their series, and the collector
        requests_pool = pool_ports[POOLS[0]]
        requests_queue = SUBMIT.queue_name(settings.queue_prefix)
        route_labels = {"queue_name": requests_queue, "actor_name": SUBMIT.actor_name}
        before = value(scrape(requests_pool), "accessflow_messages_total", **route_labels)

        # When a small batch is submitted: auto-approved, parked for review, and invalid
        auto = [portal.submit(request_payload()) for _ in range(4)]
        manual = [portal.submit(request_payload(plan_id="partner")) for _ in range(2)]
        invalid = [portal.submit(request_payload(plan_id="ghost"))]
        for request_id in auto:
            wait_for_status(services, request_id, Status.PROVISIONED)
        for request_id in manual:
            wait_for_status(services, request_id, Status.PENDING_REVIEW)
        for request_id in invalid:
            wait_for_status(services, request_id, Status.INVALID)
        svc.wait_until(lambda: outbox_drained(services), timeout=30, what="the outbox to drain")

        # Then the requests pool counted each of them, once finished, with a duration
        batch = len(auto) + len(manual) + len(invalid)
        counted = svc.wait_until(
            lambda: (
                (samples := scrape(requests_pool))
                and value(samples, "accessflow_messages_total", **route_labels) - before >= batch
                and samples
            ),
            timeout=15,
            what=f"the requests pool to count {batch} more messages",
        )
        assert value(counted, "accessflow_message_duration_seconds_count", **route_labels) >= batch
        assert value(counted, "accessflow_messages_in_progress", **route_labels) == 0

        # And the collector's series agree with the database (read again until both are still)
        mismatches: list[str] = []

        def agree() -> bool:
            mismatches[:] = differences(scrape(collector), database_truth(services))
            return not mismatches

        svc.wait_until(agree, timeout=30, what="the collector's series to match the database")
        samples = scrape(collector)
        assert value(samples, "accessflow_database_up") == 1
        assert value(samples, "accessflow_broker_up") == 1
        assert value(samples, "accessflow_pending_review_requests") >= len(manual)
        assert value(samples, "accessflow_pending_review_oldest_age_seconds") > 0
        # every work queue has its pool attached, and no dead letter came of this batch
        for route in QUEUE_ROUTES:
            queue = route.queue_name(settings.queue_prefix)
            assert value(samples, "accessflow_queue_consumers", queue=queue) >= 1, queue
            assert ("accessflow_dead_letter_messages", frozenset({("queue", queue)})) in samples

    def test_every_pool_is_live_and_ready(
        self, worker_pools: Path, pool_ports: dict[tuple[str, ...], int]
    ) -> None:
        for queues, port in pool_ports.items():
            for path in ("/healthz/live", "/healthz/ready"):
                status, body = get(port, path)
                assert status == 200, f"{queues} {path}: {body}"
                assert json.loads(body) == {"ok": True, "reasons": [], "processes": 1}
