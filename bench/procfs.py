"""CPU time and memory of process trees, read from /proc (Linux only).

CPU is ``utime + stime`` of ``/proc/<pid>/stat`` (fields 14 and 15, in clock ticks), for
every process of a tree: the root and all its descendants, found through their parent
ids. A :class:`CpuMeter` samples the trees in a background thread, so that a process that
starts or ends inside the measured window is counted up to its last sample; a process
is known by (pid, start time), so a reused pid is a new process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
#: Clock ticks per second, the unit of the times in /proc/<pid>/stat.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the bench reads."""

    pid: int
    comm: str
    state: str
    ppid: int
    #: User and system CPU time, in clock ticks.
    utime: int
    stime: int
    #: Start time after boot, in clock ticks: with the pid, names the process.
    starttime: int

    @property
    def cpu_ticks(self) -> int:
        return self.utime + self.stime


def parse_stat(text: str) -> ProcStat:
    """Parse one ``/proc/<pid>/stat`` line.

    The command name (field 2) is in parentheses and may itself hold spaces and ')'; the
    fields after it are found from the last ')'.

    Raises:
      ValueError: the line is not a stat line.
    """
    head, sep, tail = text.rpartition(")")
    pid_text, open_paren, comm = head.partition(" (")
    if not sep or not open_paren:
        raise ValueError(f"not a /proc stat line: {text[:80]!r}")
    fields = tail.split()
    if len(fields) < 20:
        raise ValueError(f"a /proc stat line with {len(fields)} fields after the name: {text[:80]!r}")
    # fields[0] is field 3 (state); field n is fields[n - 3].
    return ProcStat(
        pid=int(pid_text),
        comm=comm,
        state=fields[0],
        ppid=int(fields[1]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        starttime=int(fields[19]),
    )


def parse_status_kib(text: str, key: str) -> int | None:
    """A ``kB`` value of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``), in KiB; None if absent (a zombie)."""
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name == key:
            parts = value.split()
            return int(parts[0]) if parts else None
    return None


def read_stat(pid: int) -> ProcStat | None:
    try:
        return parse_stat((PROC / str(pid) / "stat").read_text())
    except (OSError, ValueError):
        return None  # gone between listing and reading


def all_stats() -> dict[int, ProcStat]:
    """Every process's stat, by pid."""
    stats: dict[int, ProcStat] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None:
                stats[stat.pid] = stat
    return stats


def tree(roots: Iterable[int], stats: Mapping[int, ProcStat]) -> list[int]:
    """The pids of ``roots`` (those alive) and of all their descendants, according to ``stats``."""
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found: list[int] = []
    todo = [root for root in roots if root in stats]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def rss_kib(pid: int, key: str = "VmRSS") -> int | None:
    """A process's resident set (``VmRSS``) or its peak (``VmHWM``), in KiB."""
    try:
        return parse_status_kib((PROC / str(pid) / "status").read_text(), key)
    except OSError:
        return None


def boot_ticks() -> int:
    """Now, in clock ticks since boot: the clock of ``starttime``."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS)


#: Each kind of process measured, and how to find its tree's roots now.
Roots = Mapping[str, Callable[[], Iterable[int]]]


class CpuMeter:
    """CPU time used by each kind of process between :meth:`start` and :meth:`stop`.

    Kinds are named by the caller (``workers``, ``rabbitmq``...), each with a function that
    returns the roots of its process trees. A background thread samples every ``interval``
    seconds; each process counts from its value at the start (or from zero, if it was born
    inside the window) to its last sample.
    """

    def __init__(self, roots: Roots, interval: float = 0.5) -> None:
        self.roots = roots
        self.interval = interval
        #: (pid, starttime) -> (kind, ticks at the start of the window, ticks at the last sample)
        self.seen: dict[tuple[int, int], tuple[str, int, int]] = {}
        self.window_start = 0
        self.started_at = 0.0
        self.stopped_at = 0.0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.window_start = boot_ticks()
        self.started_at = time.monotonic()
        self.stopping.clear()
        with self.lock:
            self.seen.clear()
            self._sample(first=True)
        self.thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self.thread.start()

    def stop(self) -> dict[str, float]:
        """End the window; return CPU seconds per kind."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        with self.lock:
            self._sample(first=False)
            self.stopped_at = time.monotonic()
            totals = dict.fromkeys(self.roots, 0)
            for kind, first, last in self.seen.values():
                totals[kind] += max(0, last - first)
        return {kind: ticks / CLOCK_TICKS for kind, ticks in totals.items()}

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            with self.lock:
                self._sample(first=False)

    def _sample(self, *, first: bool) -> None:
        stats = all_stats()
        for kind, find_roots in self.roots.items():
            try:
                roots = list(find_roots())
            except (OSError, ValueError):  # its process went away: it keeps what it was seen using
                roots = []
            for pid in tree(roots, stats):
                stat = stats[pid]
                key = (pid, stat.starttime)
                known = self.seen.get(key)
                if known is not None:
                    self.seen[key] = (known[0], known[1], stat.cpu_ticks)
                else:
                    born_inside = not first and stat.starttime >= self.window_start
                    baseline = 0 if born_inside else stat.cpu_ticks
                    self.seen[key] = (kind, baseline, stat.cpu_ticks)
