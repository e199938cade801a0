"""dramatiq's own log lines name a message by its ids: its arguments, personal data, never appear."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import dramatiq
import pytest
import structlog
from dramatiq.brokers.stub import StubBroker

from infra.logs import configure

#: Personal data a request carries, as an actor's arguments.
EMAIL = "jane.doe.private@example.org"
NAME = "Jane Q. Private-Doe"


@pytest.fixture
def logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    yield capsys
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def broker() -> Iterator[StubBroker]:
    stub = StubBroker()
    stub.emit_after("process_boot")
    try:
        yield stub
    finally:
        stub.close()


class TestAFailingActor:
    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_is_logged_at_error_with_its_ids_and_without_its_arguments(
        self, logs: pytest.CaptureFixture[str], broker: StubBroker, fmt: str
    ) -> None:
        # Given logs configured as a worker's are, and an actor that fails on a request's data
        configure("DEBUG", fmt)

        @dramatiq.actor(broker=broker, actor_name="requests.route", queue_name="requests", max_retries=0)
        def route(email: str, name: str, plan: dict[str, str]) -> None:
            raise RuntimeError("the plan is unknown")

        # When a message with personal data in its arguments fails
        message = route.send(EMAIL, name=NAME, plan={"owner": EMAIL})
        worker = dramatiq.Worker(broker, worker_timeout=50)
        worker.start()
        try:
            broker.join("requests", fail_fast=False)
            worker.join()
        finally:
            worker.stop()

        # Then dramatiq's ERROR line names the message by its ids only, at every level it writes
        err = logs.readouterr().err
        assert EMAIL not in err and NAME not in err
        failure = (
            f"Failed to process message message {message.message_id} (actor requests.route, queue requests)"
        )
        assert failure in err
        assert "Received message message " + message.message_id in err  # the DEBUG line too
        if fmt == "json":
            [line] = [json.loads(line) for line in err.splitlines() if "Failed to process" in line]
            assert line["level"] == "error" and "RuntimeError: the plan is unknown" in line["exception"]
