"""When each request was done, read from the line files the SMTP sink and the floor's workers append to.

Each line is ``<monotonic time> <kind> <request id>``: kind ``approve``/``review``/``reject``
for an email the sink received, ``done`` for a request the floor's last hop handled.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path


class HarnessError(RuntimeError):
    """The bench itself cannot go on: requests that never complete, a process that died, a refusal."""


def parse_line(line: bytes) -> tuple[float, str, str] | None:
    """(time, kind, request id) of one line; None for a line that is not one."""
    parts = line.split()
    if len(parts) != 3:
        return None
    try:
        at = float(parts[0])
    except ValueError:
        return None
    return at, parts[1].decode(errors="replace"), parts[2].decode(errors="replace")


@dataclass
class Arrivals:
    """Reads a line file as it grows; keeps the first time each (kind, request id) was seen."""

    path: Path
    offset: int = 0
    partial: bytes = b""
    first: dict[str, dict[str, float]] = field(default_factory=dict)
    #: How many lines of each kind (duplicates included: an email sent twice counts twice).
    lines: dict[str, int] = field(default_factory=dict)
    listeners: list[Callable[[str, str, float], None]] = field(default_factory=list)

    def poll(self) -> int:
        """Read what was appended since the last call; return how many new lines."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        if not data:
            return 0
        self.offset += len(data)
        data = self.partial + data
        complete, _, self.partial = data.rpartition(b"\n")
        count = 0
        for line in complete.split(b"\n"):
            parsed = parse_line(line)
            if parsed is None:
                continue
            at, kind, request_id = parsed
            count += 1
            self.lines[kind] = self.lines.get(kind, 0) + 1
            seen = self.first.setdefault(kind, {})
            if request_id not in seen:
                seen[request_id] = at
                for listener in self.listeners:
                    listener(kind, request_id, at)
        return count

    def times(self, kind: str) -> dict[str, float]:
        return self.first.get(kind, {})


def wait_for(
    arrivals: Arrivals,
    kind: str,
    ids: Collection[str],
    *,
    what: str,
    stall_timeout: float,
    deadline: float,
    interval: float = 0.2,
    progress_every: float = 15.0,
    check: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Wait until every id in ``ids`` has a line of ``kind``; return their times.

    Gives up (:class:`HarnessError`) when nothing new arrives for ``stall_timeout`` seconds or
    when the monotonic clock passes ``deadline``. ``check`` is called each round and may
    raise (a worker pool that died). Progress goes to stderr every ``progress_every`` s.
    """
    remaining = set(ids) - set(arrivals.times(kind))
    total = len(ids)
    started = last_progress = last_report = time.monotonic()
    while remaining:
        arrivals.poll()
        seen = arrivals.times(kind)
        before = len(remaining)
        remaining = {request_id for request_id in remaining if request_id not in seen}
        now = time.monotonic()
        if len(remaining) < before:
            last_progress = now
        if not remaining:
            break
        if check is not None:
            check()
        if now - last_progress > stall_timeout:
            raise HarnessError(
                f"{what}: {total - len(remaining)} of {total} done, and none more for {stall_timeout:.0f}s"
            )
        if now > deadline:
            raise HarnessError(
                f"{what}: {total - len(remaining)} of {total} done when the deadline passed "
                f"({now - started:.0f}s after the wait began)"
            )
        if now - last_report >= progress_every:
            done = total - len(remaining)
            print(f"  {what}: {done}/{total} done after {now - started:.0f}s", file=sys.stderr, flush=True)
            last_report = now
        time.sleep(interval)  # the poll interval of a wait with a deadline
    seen = arrivals.times(kind)
    return {request_id: seen[request_id] for request_id in ids}


def first_seen(arrivals: Arrivals, kinds: Iterable[str]) -> dict[str, float]:
    """The earliest line of any of ``kinds`` per request id."""
    result: dict[str, float] = {}
    for kind in kinds:
        for request_id, at in arrivals.times(kind).items():
            if request_id not in result or at < result[request_id]:
                result[request_id] = at
    return result
