"""The bench harness's pure parts: percentiles, schedules, /proc parsing, the sink's and the publisher's bookkeeping."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pika.spec
import pytest

from bench import procfs, stats
from bench.harness import event_key, is_transaction_control, scan_logs
from bench.parties import manual_flags
from bench.publisher import ConfirmingPublisher, Message, _Run
from bench.report import render
from bench.smtp_sink import identify, record_line
from bench.tracking import Arrivals, parse_line
from bench.world import PoolSpec


class TestPercentile:
    def test_is_the_nearest_rank_a_value_that_was_seen(self) -> None:
        values = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unordered on purpose
        assert stats.percentile(values, 0.50) == 50.0
        assert stats.percentile(values, 0.95) == 95.0
        assert stats.percentile(values, 0.99) == 99.0
        assert stats.percentile(values, 1.0) == 100.0
        assert stats.percentile(values, 0.0) == 1.0

    def test_of_a_small_sample_is_its_worst_value_at_the_tail(self) -> None:
        assert stats.percentile([5.0, 1.0, 9.0], 0.99) == 9.0
        assert stats.percentile([5.0, 1.0, 9.0], 0.5) == 5.0

    def test_refuses_an_empty_sample_or_a_share_out_of_range(self) -> None:
        with pytest.raises(ValueError):
            stats.percentile([], 0.5)
        with pytest.raises(ValueError):
            stats.percentile([1.0], 99)

    def test_summary_is_in_milliseconds(self) -> None:
        summary = stats.summarize_ms([0.010, 0.020, 0.030, 0.040])
        assert (summary.p50_ms, summary.max_ms, summary.mean_ms) == pytest.approx((20.0, 40.0, 25.0))


class TestOpenLoopSchedule:
    def test_spaces_sends_evenly_from_the_start_whatever_happens_later(self) -> None:
        schedule = stats.open_loop_schedule(rate=200.0, count=5, start=10.0)
        assert schedule == pytest.approx([10.0, 10.005, 10.010, 10.015, 10.020])

    def test_of_n_requests_at_rate_r_lasts_n_over_r(self) -> None:
        schedule = stats.open_loop_schedule(rate=50.0, count=1001)
        assert schedule[-1] - schedule[0] == pytest.approx(20.0)

    def test_refuses_a_rate_that_is_not_positive(self) -> None:
        for rate in (0.0, -1.0, float("inf")):
            with pytest.raises(ValueError):
                stats.open_loop_schedule(rate, 10)

    def test_count_is_the_duration_at_the_rate_within_bounds(self) -> None:
        assert stats.latency_count(16.5, 20, max_requests=1000) == 330
        assert stats.latency_count(300.0, 20, max_requests=1000) == 1000
        assert stats.latency_count(0.1, 20, max_requests=1000) == 20


class TestRates:
    def test_throughput_is_requests_over_first_publish_to_last_done(self) -> None:
        assert stats.throughput(100, first_publish=5.0, last_done=7.0) == 50.0
        with pytest.raises(ValueError):
            stats.throughput(100, first_publish=5.0, last_done=5.0)

    def test_ratio_is_missing_without_a_floor(self) -> None:
        assert stats.ratio(33.0, 1700.0) == pytest.approx(0.0194, rel=1e-2)
        assert stats.ratio(33.0, 0.0) is None
        assert stats.ratio(None, 1.0) is None


STAT_LINE = (
    "4242 (dramatiq: (worker) 1) S 4200 4242 4200 0 -1 4194560 1000 0 0 0 "
    "1234 567 8 9 20 0 9 0 987654 400000000 25000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
)


class TestProcStat:
    def test_reads_cpu_parent_and_start_even_when_the_name_holds_spaces_and_parens(self) -> None:
        stat = procfs.parse_stat(STAT_LINE)
        assert (stat.pid, stat.comm, stat.state, stat.ppid) == (4242, "dramatiq: (worker) 1", "S", 4200)
        assert (stat.utime, stat.stime, stat.cpu_ticks) == (1234, 567, 1801)
        assert stat.starttime == 987654

    def test_refuses_what_is_not_a_stat_line(self) -> None:
        with pytest.raises(ValueError):
            procfs.parse_stat("not a stat line")

    def test_reads_this_process_as_it_is(self) -> None:
        stat = procfs.read_stat(os.getpid())
        assert stat is not None and stat.pid == os.getpid() and stat.ppid == os.getppid()

    def test_status_values_are_kib_and_missing_ones_none(self) -> None:
        status = "Name:\tpython\nVmHWM:\t   90432 kB\nVmRSS:\t   88000 kB\n"
        assert procfs.parse_status_kib(status, "VmHWM") == 90432
        assert procfs.parse_status_kib(status, "VmSwap") is None

    def test_a_tree_is_the_root_and_every_descendant_and_nothing_else(self) -> None:
        def stat(pid: int, ppid: int) -> procfs.ProcStat:
            return procfs.ProcStat(pid, "x", "S", ppid, 0, 0, 0)

        stats_by_pid = {p.pid: p for p in [stat(1, 0), stat(10, 1), stat(11, 10), stat(12, 11), stat(20, 1)]}
        assert sorted(procfs.tree([10], stats_by_pid)) == [10, 11, 12]
        assert procfs.tree([99], stats_by_pid) == []

    def test_the_meter_charges_the_cpu_a_process_used_inside_the_window(self) -> None:
        meter = procfs.CpuMeter({"me": lambda: [os.getpid()], "nobody": lambda: []}, interval=0.05)
        meter.start()
        spin_until = time.process_time() + 0.3
        while time.process_time() < spin_until:  # busy, so the CPU is really used
            pass
        used = meter.stop()
        assert used["nobody"] == 0
        assert 0.2 <= used["me"] <= 5.0


class TestTheSmtpSink:
    def test_reads_kind_and_request_id_from_the_message_id(self) -> None:
        raw = (
            b"From: accessflow <no-reply@accessflow.local>\r\n"
            b"Message-ID: <approve.8154226e-41c2-4afa-88c8-1cfc66df99cd@accessflow.local>\r\n"
            b"Subject: approved\r\n\r\nMessage-ID: <review.x@y>\r\n"
        )
        assert identify(raw) == ("approve", "8154226e-41c2-4afa-88c8-1cfc66df99cd")

    def test_falls_back_to_the_request_id_header_then_to_nothing(self) -> None:
        assert identify(b"X-Accessflow-Request-Id: abc-1\r\n\r\nbody") == ("unknown", "abc-1")
        assert identify(b"Subject: hi\r\n\r\nMessage-ID: <approve.abc@x>") == ("unknown", "-")

    def test_writes_lines_the_harness_reads_back(self) -> None:
        assert parse_line(record_line(12.5, "review", "abc").rstrip(b"\n")) == (12.5, "review", "abc")
        assert parse_line(b"garbage") is None


class TestArrivals:
    def test_keeps_the_first_time_of_each_request_across_partial_writes(self, tmp_path: Path) -> None:
        path = tmp_path / "lines"
        arrivals = Arrivals(path)
        assert arrivals.poll() == 0  # no file yet
        with path.open("ab") as f:
            f.write(b"1.0 approve a\n2.0 appr")
        assert arrivals.poll() == 1
        with path.open("ab") as f:
            f.write(b"ove b\n3.0 approve a\n")
        assert arrivals.poll() == 2
        assert arrivals.times("approve") == {"a": 1.0, "b": 2.0}
        assert arrivals.lines["approve"] == 3  # the duplicate is counted, not timed


class TestTheRequestMix:
    def test_has_the_asked_share_of_manual_requests_spread_evenly(self) -> None:
        flags = manual_flags(10_000, 0.2)
        assert sum(flags) == 2000
        assert flags[:10] == [False, False, False, False, True] * 2
        assert not any(manual_flags(100, 0.0))
        assert all(manual_flags(7, 1.0))


class TestPoolSpec:
    def test_parses_queues_processes_and_threads(self) -> None:
        assert PoolSpec.parse("requests,decisions:1x4") == PoolSpec(("requests", "decisions"), 1, 4)

    def test_refuses_a_pool_without_shape_or_with_none_of_something(self) -> None:
        for text in ("requests", "requests:2", "requests:0x4", ":1x1"):
            with pytest.raises(ValueError):
                PoolSpec.parse(text)


def confirm(tag: int, *, multiple: bool = False, nack: bool = False) -> SimpleNamespace:
    method = (pika.spec.Basic.Nack if nack else pika.spec.Basic.Ack)(delivery_tag=tag, multiple=multiple)
    return SimpleNamespace(method=method)


class TestPublisherConfirms:
    def run_of(self, count: int) -> _Run:
        publisher = ConfirmingPublisher(
            "amqp://u:p@127.0.0.1:1/v", exchange="x", routing_key="k", user_id="u"
        )
        run = _Run(publisher, [Message(b"{}") for _ in range(count)], None, None, 10.0)
        run.next = count
        run.outstanding.extend(range(1, count + 1))  # as if all were published
        return run

    def test_counts_each_message_once_however_the_broker_acks(self) -> None:
        run = self.run_of(6)
        run._on_confirm(confirm(2))  # out of order, single
        run._on_confirm(confirm(3, multiple=True))  # 1 and 3; 2 is already counted
        assert run.confirmed == 3 and list(run.outstanding) == [4, 5, 6]
        run._on_confirm(confirm(4))
        run._on_confirm(confirm(6, multiple=True))
        assert run.confirmed == 6 and not run.outstanding and run.finished

    def test_a_nack_is_a_failure(self) -> None:
        run = self.run_of(2)
        run._on_confirm(confirm(1, nack=True))
        assert run.failures and run.finished


class TestReports:
    def test_transaction_control_is_told_from_queries(self) -> None:
        assert is_transaction_control("BEGIN ISOLATION LEVEL READ COMMITTED")
        assert is_transaction_control("commit")
        assert not is_transaction_control("SELECT 1")

    def test_log_scan_counts_errors_and_warnings_by_event(self, tmp_path: Path) -> None:
        log = tmp_path / "pool.log"
        log.write_text(
            '{"event": "publish.failed", "level": "warning"}\n'
            '{"event": "actor.crashed", "level": "error"}\n'
            '{"event": "email.sent", "level": "info"}\n'
            "Traceback (most recent call last):\n"
        )
        scanned = scan_logs([log, tmp_path / "missing.log"])
        assert (scanned["errors"], scanned["warnings"]) == (2, 1)
        assert scanned["error_events"]["actor.crashed"] == 1

    def test_log_events_are_counted_without_the_arguments_of_each_message(self) -> None:
        assert event_key("Failed to process message access_request.route({'request_id': 'x'})") == (
            "Failed to process message access_request.route"
        )
        assert event_key("connection_lost: StreamLostError: ('lost',)") == "connection_lost: StreamLostError"
        assert event_key("email.sent") == "email.sent"

    def test_the_table_shows_a_partial_run_and_its_failure(self) -> None:
        table = render(
            {
                "floor": {"requests": 10, "requests_per_s": 600.0, "msg_per_s": 1800.0},
                "error": "accessflow burst: 3 of 10 done, and none more for 120s",
            }
        )
        assert "600.0" in table and "1,800" in table
        assert "BENCH FAILED: accessflow burst: 3 of 10 done" in table
