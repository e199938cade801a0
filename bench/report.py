"""The bench's table: every figure of accessflow beside the floor's, with their ratio."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.stats import ratio

CPU_KINDS = (("all", "all charged processes"), ("workers", "workers"), ("rabbitmq", "RabbitMQ"),
             ("postgresql", "PostgreSQL"), ("smtp", "SMTP sink"))  # fmt: skip


#: (shown name, key in the result's versions)
VERSIONS = (
    ("Python", "python"),
    ("dramatiq", "dramatiq"),
    ("pika", "pika"),
    ("SQLAlchemy", "SQLAlchemy"),
    ("psycopg", "psycopg"),
    ("PostgreSQL", "postgresql"),
    ("RabbitMQ", "rabbitmq"),
)


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


class Table:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def title(self, text: str) -> None:
        self.lines.append("")
        self.lines.append(text)

    def row(
        self,
        label: str,
        value: float | None,
        floor: float | None = None,
        *,
        digits: int = 1,
        compare: bool = True,
    ) -> None:
        shown = _ratio(ratio(value, floor)) if compare else "-"
        self.lines.append(f"  {label:<46}{_num(value, digits):>12}{_num(floor, digits):>12}{shown:>10}")

    def text(self, text: str) -> None:
        self.lines.append(f"  {text}")


def render(result: Mapping[str, Any]) -> str:
    """The human-readable report of a bench result (the JSON document)."""
    t = Table()
    machine = result.get("machine", {})
    git = result.get("git", {})
    versions = result.get("versions", {})
    options = result.get("options", {})
    load_start = " ".join(f"{x:.2f}" for x in machine.get("load_average_start", []))
    load_end = " ".join(f"{x:.2f}" for x in machine.get("load_average_end", []))
    commit = (git.get("commit") or "?")[:12]
    dirty = f" + {len(git.get('changed', []))} changed files" if git.get("dirty") else ""
    t.lines.append(
        f"accessflow bench {result.get('started_at', '')}  commit {commit}{dirty}  "
        f"{result.get('duration_seconds', '?')}s"
    )
    t.lines.append(
        f"{machine.get('cores')} cores ({machine.get('cpu_model') or '?'}), load average {load_start} -> {load_end}, "
        f"shared RabbitMQ node at {machine.get('rabbitmq_background_cpu_percent', '?')}% of a core before the run"
    )
    t.lines.append("  ".join(f"{name} {versions.get(key) or '?'}" for name, key in VERSIONS))
    t.lines.append(f"pools: {'; '.join(options.get('pools', []))}   floor: {options.get('floor_pool')}")
    t.lines.append("")
    t.lines.append(f"  {'':<46}{'accessflow':>12}{'floor':>12}{'ratio':>10}")

    floor: Mapping[str, Any] = result.get("floor") or {}
    burst: Mapping[str, Any] = result.get("burst") or {}
    if floor or burst:
        n = burst.get("requests") or floor.get("requests")
        t.title(
            f"burst of {n} requests ({burst.get('auto', '?')} auto-approve, {burst.get('manual', '?')} manual)"
        )
        t.row("throughput, requests/s", burst.get("requests_per_s"), floor.get("requests_per_s"))
        t.row("floor messages/s (3 hops per request)", None, floor.get("msg_per_s"))
        for key, label in CPU_KINDS:
            t.row(
                f"CPU ms/request, {label}",
                burst.get("cpu_ms_per_request", {}).get(key),
                floor.get("cpu_ms_per_request", {}).get(key),
                digits=2,
            )
        t.row(
            "harness CPU ms/request (not charged)",
            burst.get("harness_cpu_ms_per_request"),
            floor.get("harness_cpu_ms_per_request"),
            digits=2,
            compare=False,
        )
        t.row("transactions/request", burst.get("transactions_per_request"), None, digits=2)
        t.row("statements/request", burst.get("statements_per_request"), None, digits=2)
        t.row(
            "  without BEGIN/COMMIT/ROLLBACK",
            burst.get("statements_per_request_without_begin_commit"),
            None,
            digits=2,
        )
        t.row(
            "peak RSS MiB, largest pool process",
            burst.get("peak_rss_mib", {}).get("max_process"),
            floor.get("peak_rss_mib", {}).get("max_process"),
        )
        t.row(
            "peak RSS MiB, all pool processes",
            burst.get("peak_rss_mib", {}).get("sum"),
            floor.get("peak_rss_mib", {}).get("sum"),
        )
    for run in result.get("latency") or []:
        fl = run.get("floor") or {}
        t.title(
            f"latency, open loop at {run['rate']:.1f} requests/s ({run.get('share_of_burst', 0):.0%} of the burst), "
            f"{run['requests']} requests: publish -> approve email, ms"
        )
        for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms"):
            t.row(key.removesuffix("_ms"), run.get(key), fl.get(key), digits=1)
        t.row(
            "publisher behind schedule, ms (max)",
            run.get("publisher_late_ms_max"),
            fl.get("publisher_late_ms_max"),
        )
        review = run.get("manual_to_review_email")
        if review:
            t.text(
                f"manual requests, publish -> review email: p50 {review['p50_ms']:.1f}, "
                f"p99 {review['p99_ms']:.1f} ms"
            )
    scaling = result.get("scaling") or []
    if scaling:
        t.title(f"scaling: one pool on every queue, {scaling[0]['requests']} requests per point, requests/s")
        floor_rate = floor.get("requests_per_s")
        by_shape = {(s["processes"], s["threads"]): s["requests_per_s"] for s in scaling}
        for s in scaling:
            t.row(f"{s['processes']} process(es) x {s['threads']} thread(s)", s["requests_per_s"], floor_rate)
        for (p, th), (p0, th0) in (((2, 8), (1, 8)), ((1, 4), (1, 1)), ((1, 8), (1, 1))):
            if (p, th) in by_shape and (p0, th0) in by_shape:
                t.text(f"{p}x{th} / {p0}x{th0}: {by_shape[(p, th)] / by_shape[(p0, th0)]:.2f}x")
    soak = result.get("soak")
    if soak:
        t.title(f"soak: {soak['requests']} requests")
        t.row("RSS growth MiB, all pool processes", soak.get("growth_mib_sum"))
        t.row("RSS growth MiB, largest process", soak.get("growth_mib_max_process"))
    top = burst.get("top_statements") or []
    if top:
        t.title("top statements in the burst, calls per request")
        for s in top[:10]:
            t.text(f"{s['calls_per_request']:6.2f}  {s['query'][:100]}")
    logs = result.get("worker_logs") or {}
    t.title(f"worker logs: {logs.get('errors', 0)} errors, {logs.get('warnings', 0)} warnings")
    for event, count in list((logs.get("error_events") or {}).items())[:5]:
        t.text(f"error {count:6d}  {event}")
    for cause, count in list((logs.get("error_causes") or {}).items())[:5]:
        t.text(f"cause {count:6d}  {cause[:150]}")
    for event, count in list((logs.get("warning_events") or {}).items())[:5]:
        t.text(f"warning {count:4d}  {event}")
    floor_logs = result.get("floor_logs") or {}
    if floor_logs.get("errors") or floor_logs.get("warnings"):
        t.text(
            f"floor pool logs: {floor_logs.get('errors', 0)} errors, {floor_logs.get('warnings', 0)} warnings"
        )
    for problem in result.get("problems") or []:
        t.text(f"PROBLEM: {problem}")
    if result.get("error"):
        t.title(f"BENCH FAILED: {result['error']}")
    if result.get("workdir"):
        t.text(f"logs kept in {result['workdir']}")
    return "\n".join(t.lines) + "\n"
