"""Log lines are JSON off a terminal, carry bound ids, and never show a secret."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from infra.logs import configure


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Each test calls configure() itself: pytest swaps sys.stderr between setup and call."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    yield capsys
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    structlog.contextvars.clear_contextvars()


def lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    err = capsys.readouterr().err
    return [json.loads(line) for line in err.splitlines() if line.strip()]


class TestLogLines:
    def test_carry_the_ids_bound_to_the_context(self, json_logs: pytest.CaptureFixture[str]) -> None:
        configure("INFO", "json")
        structlog.contextvars.bind_contextvars(request_id="r-1", message_id="m-1")

        structlog.get_logger().info("request.routed", status="approved")
        logging.getLogger("dramatiq").warning("from the standard library")

        routed, foreign = lines(json_logs)
        assert (
            routed["event"] == "request.routed"
            and routed["request_id"] == "r-1"
            and routed["message_id"] == "m-1"
        )
        assert foreign["event"] == "from the standard library" and foreign["request_id"] == "r-1"

    def test_mask_secret_keys_and_anything_shaped_like_our_api_keys(
        self, json_logs: pytest.CaptureFixture[str]
    ) -> None:
        configure("INFO", "json")
        api_key = "af_0123abcd_" + "x" * 43

        structlog.get_logger().info(
            "oops",
            client_secret="s3cr3t",
            smtp_password="hunter2",
            note=f"got {api_key}",
            nested={"token": "t"},
        )

        [line] = lines(json_logs)
        text = json.dumps(line)
        assert "s3cr3t" not in text and "hunter2" not in text and "x" * 43 not in text and '"t"' not in text
        assert "af_0123abcd_[redacted]" in line["note"]  # type: ignore[operator]
