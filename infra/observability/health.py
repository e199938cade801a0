"""Heartbeat reports of a pool's worker processes, and the liveness and readiness drawn from them.

A pool is several processes: dramatiq's worker processes, and the one that serves HTTP.
Each worker process writes a :class:`ProcessReport` about itself into the pool's directory
every :data:`REPORT_SECONDS` (:class:`infra.messaging.heartbeats.Heartbeats`); the HTTP
process reads them all and judges:

- **live**: every worker process reported lately (a hung or dead one stops), all its
  worker threads are alive, and none has been on one message longer than
  ``ACCESSFLOW_HEALTH_STUCK_SECONDS`` (a thread stuck in a call the time limit cannot
  interrupt). A failing liveness asks the orchestrator to restart the pool.
- **ready**: live, every expected process reported, each reached the database on its last
  look, and each consumer is attached to the broker (its thread runs and its connection
  and channel are open). A pool that is not ready takes no messages, and says so.

The reports are small JSON files replaced atomically, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: How often a worker process writes its report, in seconds.
REPORT_SECONDS = 1.0
#: A report older than this means its process hung or died, in seconds.
STALE_SECONDS = 30.0
#: Where, in a pool's directory, the reports are kept (apart from the multiprocess files).
REPORTS_DIR = "health"
#: The file in a pool's directory that says how many worker processes it runs.
POOL_FILE = "pool.json"


@dataclass
class ProcessReport:
    """What one worker process says of itself."""

    pid: int
    #: Wall-clock time (time.time()) of this report.
    written_at: float
    threads_expected: int
    threads_alive: int
    #: Wall-clock start of every message a thread is on now.
    busy_since: list[float] = field(default_factory=list)
    #: Queue (and delay queue) -> whether its consumer is attached to the broker.
    consumers: dict[str, bool] = field(default_factory=dict)
    database: bool = False
    #: Why the database check failed, if it did: an exception's type name.
    database_error: str = ""


@dataclass
class Verdict:
    ok: bool
    reasons: list[str]
    processes: int

    def as_json(self) -> bytes:
        return json.dumps({"ok": self.ok, "reasons": self.reasons, "processes": self.processes}).encode()


def reports_dir(pool_dir: Path) -> Path:
    return pool_dir / REPORTS_DIR


def write_report(pool_dir: Path, report: ProcessReport) -> None:
    """Replace this process's report, atomically."""
    directory = reports_dir(pool_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{report.pid}.json"
    temporary = directory / f".{report.pid}.json.tmp"
    temporary.write_text(json.dumps(asdict(report)), encoding="utf-8")
    os.replace(temporary, target)


def remove_report(pool_dir: Path, pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        (reports_dir(pool_dir) / f"{pid}.json").unlink()


def read_reports(pool_dir: Path) -> list[ProcessReport]:
    """Every report in the pool's directory; one that cannot be read is skipped."""
    reports = []
    for path in sorted(reports_dir(pool_dir).glob("*.json")):
        try:
            reports.append(ProcessReport(**json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue  # removed meanwhile, or not ours
    return reports


def prepare_pool_dir(pool_dir: Path, *, processes: int, queues: Sequence[str]) -> None:
    """Empty a pool's directory of what an earlier run left, and say how many processes it runs.

    Only files of ours go: multiprocess files (``*.db``), reports and the pool file, so a
    directory shared with anything else loses nothing else. Run before each start of the
    pool: a dead process's counters would otherwise be summed with the new ones' forever.
    """
    pool_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*pool_dir.glob("*.db"), *reports_dir(pool_dir).glob("*.json"), pool_dir / POOL_FILE]:
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    (pool_dir / POOL_FILE).write_text(json.dumps({"processes": processes, "queues": list(queues)}))


def expected_processes(pool_dir: Path) -> int:
    """How many worker processes the pool runs, or 1 if it does not say."""
    try:
        return int(json.loads((pool_dir / POOL_FILE).read_text())["processes"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def liveness(
    reports: Sequence[ProcessReport], *, now: float, stuck_after: float, stale_after: float = STALE_SECONDS
) -> Verdict:
    """Whether the pool's worker processes are alive and none of their threads is stuck."""
    reasons = []
    if not reports:
        reasons.append("no worker process has reported yet")
    for report in reports:
        age = now - report.written_at
        if age > stale_after:
            reasons.append(f"process {report.pid} last reported {age:.0f}s ago")
        if report.threads_alive < report.threads_expected:
            reasons.append(
                f"process {report.pid}: {report.threads_expected - report.threads_alive} worker threads died"
            )
        stuck = [since for since in report.busy_since if now - since > stuck_after]
        if stuck:
            reasons.append(
                f"process {report.pid}: {len(stuck)} worker threads on one message for over {stuck_after:g}s"
            )
    return Verdict(not reasons, reasons, len(reports))


def readiness(
    reports: Sequence[ProcessReport],
    *,
    now: float,
    expected: int,
    stuck_after: float,
    stale_after: float = STALE_SECONDS,
) -> Verdict:
    """Whether the pool can take messages: live, every process up, the database and the broker reached."""
    verdict = liveness(reports, now=now, stuck_after=stuck_after, stale_after=stale_after)
    reasons = list(verdict.reasons)
    if reports and len(reports) < expected:
        reasons.append(f"{len(reports)} of {expected} worker processes reported")
    for report in reports:
        if not report.database:
            reasons.append(f"process {report.pid}: database unreachable ({report.database_error})")
        if not report.consumers:
            reasons.append(f"process {report.pid}: no consumer")
        detached = sorted(queue for queue, attached in report.consumers.items() if not attached)
        if detached:
            reasons.append(f"process {report.pid}: not attached to {', '.join(detached)}")
    return Verdict(not reasons, reasons, len(reports))
