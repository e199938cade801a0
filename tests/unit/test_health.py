"""Liveness and readiness, judged from worker processes' heartbeat reports (no process needed)."""

from __future__ import annotations

from pathlib import Path

from infra.observability import health
from infra.observability.health import ProcessReport

NOW = 1_000_000.0


def report(**changes: object) -> ProcessReport:
    values: dict[str, object] = {
        "pid": 42,
        "written_at": NOW - 1,
        "threads_expected": 4,
        "threads_alive": 4,
        "busy_since": [NOW - 2],
        "consumers": {"af.requests": True, "af.requests.DQ": True},
        "database": True,
    }
    values.update(changes)
    return ProcessReport(**values)  # type: ignore[arg-type]


def live(*reports: ProcessReport) -> health.Verdict:
    return health.liveness(reports, now=NOW, stuck_after=300)


def ready(*reports: ProcessReport, expected: int = 1) -> health.Verdict:
    return health.readiness(reports, now=NOW, expected=expected, stuck_after=300)


class TestLiveness:
    def test_a_fresh_report_with_every_thread_alive_is_live(self) -> None:
        assert live(report()).ok

    def test_no_report_yet_is_not_live(self) -> None:
        assert not live().ok

    def test_a_stale_report_a_dead_thread_or_a_stuck_one_is_not_live(self) -> None:
        assert "last reported" in live(report(written_at=NOW - 31)).reasons[0]
        assert "died" in live(report(threads_alive=3)).reasons[0]
        assert "on one message" in live(report(busy_since=[NOW - 301, NOW - 1])).reasons[0]

    def test_a_detached_consumer_or_an_unreachable_database_does_not_make_it_dead(self) -> None:
        # a restart would not bring the broker back: that is readiness' business
        assert live(report(database=False, consumers={"af.requests": False})).ok


class TestReadiness:
    def test_attached_consumers_and_a_reachable_database_are_ready(self) -> None:
        assert ready(report()).ok

    def test_a_detached_consumer_is_not_ready(self) -> None:
        verdict = ready(report(consumers={"af.requests": False, "af.requests.DQ": True}))
        assert not verdict.ok
        assert verdict.reasons == ["process 42: not attached to af.requests"]

    def test_an_unreachable_database_is_not_ready(self) -> None:
        verdict = ready(report(database=False, database_error="OperationalError"))
        assert verdict.reasons == ["process 42: database unreachable (OperationalError)"]

    def test_a_missing_process_or_no_consumer_is_not_ready(self) -> None:
        assert not ready(report(), expected=2).ok
        assert not ready(report(consumers={})).ok


class TestThePoolDirectory:
    def test_reports_round_trip_and_a_new_start_clears_what_the_last_run_left(self, tmp_path: Path) -> None:
        health.write_report(tmp_path, report(pid=1))
        health.write_report(tmp_path, report(pid=2))
        (tmp_path / "counter_1.db").write_bytes(b"old")
        (tmp_path / "keep.txt").write_text("not ours")
        assert [r.pid for r in health.read_reports(tmp_path)] == [1, 2]

        health.prepare_pool_dir(tmp_path, processes=3, queues=["af.requests"])

        assert health.read_reports(tmp_path) == []
        assert not (tmp_path / "counter_1.db").exists()
        assert (tmp_path / "keep.txt").exists()
        assert health.expected_processes(tmp_path) == 3
