"""A pool's readiness follows its broker: it fails while a private RabbitMQ node is stopped, and passes once it is back.

The pool is a real ``accessflow workers`` on a private node (never the shared one) and the
session's database; its liveness stays up throughout, since no worker thread is stuck.
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.credentials.sealing import generate_seal_key
from messages.routes import SUBMIT
from tests import services as svc
from tests.e2e.conftest import ACCESSFLOW, publish_raw, request_payload
from tests.e2e.test_metrics import get
from tests.faults.private_services import PrivateRabbitMQ

pytestmark = [pytest.mark.faults]


@pytest.fixture
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    reason = PrivateRabbitMQ.available()
    if reason is not None:
        svc.unavailable(f"no private RabbitMQ: {reason}")
    with PrivateRabbitMQ() as rabbit:
        yield rabbit


#: A request the stuck-thread test's pool holds its worker thread on.
HANGING_REQUEST = str(uuid.uuid4())
#: How long it is held there, in seconds, and after how long liveness calls a thread stuck.
HANG_SECONDS, STUCK_SECONDS = 12, 2


@pytest.fixture
def pool_env(private_rabbitmq: PrivateRabbitMQ, database_url: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "ACCESSFLOW_DATABASE_URL": database_url,
        "ACCESSFLOW_BROKER_URL": private_rabbitmq.url,
        "ACCESSFLOW_QUEUE_PREFIX": f"aftest-ready-{uuid.uuid4().hex[:8]}",
        "ACCESSFLOW_SEAL_KEY": generate_seal_key(),
        "ACCESSFLOW_METRICS_PORT": str(svc.free_port()),
        "ACCESSFLOW_LOG_FORMAT": "json",
        "ACCESSFLOW_SHUTDOWN_TIMEOUT_SECONDS": "5",
        "ACCESSFLOW_ACCEPT_V1_SUBMISSIONS": "true",
        "ACCESSFLOW_HEALTH_STUCK_SECONDS": str(STUCK_SECONDS),
        "ACCESSFLOW_FAULTS": f"hang_request={HANGING_REQUEST},hang_seconds={HANG_SECONDS}",
    }


@pytest.fixture
def pool(pool_env: dict[str, str], tmp_path: Path) -> Iterator[int]:
    """``accessflow workers`` for the requests queue on the private node; yields its health port."""
    env = pool_env
    port = int(env["ACCESSFLOW_METRICS_PORT"])
    log_path = tmp_path / "pool.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [ACCESSFLOW, "workers", "--queues", "requests", "--threads", "2"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            yield port
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for(port: int, path: str, status: int, timeout: float) -> dict[str, object]:
    """Wait until ``path`` answers ``status``; return its JSON body."""
    answer = svc.wait_until(
        lambda: (got := get(port, path))[0] == status and got,
        timeout=timeout,
        what=f"{path} to answer {status}",
    )
    body: dict[str, object] = json.loads(answer[1])
    return body


class TestReadinessFollowsTheBroker:
    def test_ready_fails_while_the_broker_is_stopped_and_passes_once_it_is_back(
        self, private_rabbitmq: PrivateRabbitMQ, pool: int
    ) -> None:
        # Given a pool that is ready on its broker
        wait_for(pool, "/healthz/ready", 200, timeout=60)
        assert get(pool, "/healthz/live")[0] == 200

        # When the broker stops, the pool is not ready, because its consumer is detached
        private_rabbitmq.stop()
        body = wait_for(pool, "/healthz/ready", 503, timeout=30)
        assert any("not attached" in str(reason) for reason in body["reasons"]), body  # type: ignore[union-attr]
        # ... and it is still alive: nothing is stuck, a restart would not help
        assert get(pool, "/healthz/live")[0] == 200

        # Then, once the broker is back, the consumers reattach and the pool is ready again
        private_rabbitmq.start()
        wait_for(pool, "/healthz/ready", 200, timeout=60)
        assert get(pool, "/healthz/live")[0] == 200


class TestLivenessSeesAStuckThread:
    def test_live_fails_while_a_thread_is_held_on_one_message_and_passes_once_it_is_free(
        self, private_rabbitmq: PrivateRabbitMQ, pool_env: dict[str, str], pool: int
    ) -> None:
        # Given a live pool, whose threads count as stuck after 2 s on one message
        wait_for(pool, "/healthz/ready", 200, timeout=60)

        # When a message holds a worker thread for 12 s (a call that does not return)
        queue = SUBMIT.queue_name(pool_env["ACCESSFLOW_QUEUE_PREFIX"])
        body = svc.envelope(queue, SUBMIT.actor_name, request_payload(request_id=HANGING_REQUEST))
        publish_raw(private_rabbitmq.url, body, exchange="", routing_key=queue)

        # Then the pool is neither live nor ready while the thread is held
        body_live = wait_for(pool, "/healthz/live", 503, timeout=HANG_SECONDS)
        assert any("on one message" in str(reason) for reason in body_live["reasons"]), body_live  # type: ignore[union-attr]
        assert get(pool, "/healthz/ready")[0] == 503

        # And it is live and ready again once the thread is free
        wait_for(pool, "/healthz/live", 200, timeout=HANG_SECONDS + 30)
        wait_for(pool, "/healthz/ready", 200, timeout=30)
