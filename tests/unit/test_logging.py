"""Log lines are JSON off a terminal, carry bound ids, and never show a secret."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from domain.model import AuthMethod
from infra.credentials.issuing import LocalCredentialIssuer
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

    def test_mask_anything_shaped_like_our_oauth2_client_secrets(
        self, json_logs: pytest.CaptureFixture[str]
    ) -> None:
        configure("INFO", "json")
        client_secret = LocalCredentialIssuer().issue(AuthMethod.OAUTH2_CLIENT_CREDENTIALS).secret

        structlog.get_logger().info("oops", note=f"sent {client_secret} by mistake", items=[client_secret])

        [line] = lines(json_logs)
        assert client_secret not in json.dumps(line)
        assert line["note"] == "sent afs_[redacted] by mistake" and line["items"] == ["afs_[redacted]"]


#: An API key and a client secret, as they would sit in an exception's message.
API_KEY = "af_0123abcd_" + "k" * 43
CLIENT_SECRET = "afs_" + "c" * 43


def fail_holding_a_secret_in_a_local() -> None:
    """Raise with both secrets in the message, and a third only in a local variable."""
    local_only = "local-" + "v" * 30  # noqa: F841  (a renderer showing locals would print it)
    raise ValueError(f"refused {API_KEY} and {CLIENT_SECRET}")


class TestTracebacks:
    """Exceptions are text before redaction runs, and are rendered without locals."""

    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_a_secret_in_our_own_exception_is_masked(
        self, json_logs: pytest.CaptureFixture[str], fmt: str
    ) -> None:
        configure("INFO", fmt)

        try:
            fail_holding_a_secret_in_a_local()
        except ValueError:
            structlog.get_logger().exception("it.failed")

        self.assert_masked(json_logs.readouterr().err)

    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_a_secret_in_a_standard_library_records_exception_is_masked(
        self, json_logs: pytest.CaptureFixture[str], fmt: str
    ) -> None:
        configure("INFO", fmt)

        try:
            fail_holding_a_secret_in_a_local()
        except ValueError:
            # What dramatiq's worker does with an actor's failure.
            logging.getLogger("dramatiq.worker.WorkerThread").error("Failed.", exc_info=True)

        self.assert_masked(json_logs.readouterr().err)

    @pytest.mark.parametrize("fmt", ["json", "console"])
    def test_a_stack_is_masked_too(self, json_logs: pytest.CaptureFixture[str], fmt: str) -> None:
        configure("INFO", fmt)

        logging.getLogger("somewhere").warning(f"with {CLIENT_SECRET}", stack_info=True)

        err = json_logs.readouterr().err
        assert CLIENT_SECRET not in err and "afs_[redacted]" in err and "Stack (most recent call last)" in err

    @staticmethod
    def assert_masked(err: str) -> None:
        assert "Traceback (most recent call last)" in err and "fail_holding_a_secret_in_a_local" in err
        assert API_KEY not in err and CLIENT_SECRET not in err
        assert "af_0123abcd_[redacted]" in err and "afs_[redacted]" in err
        assert "v" * 30 not in err  # no locals
