"""The supervisor gives its pool exactly one SIGTERM, however the stop is asked for (real processes).

dramatiq's main process turns every SIGINT into a SIGTERM to its workers, and a second
SIGTERM makes them exit mid-message; so the pool must get one SIGTERM, never two, and
never a SIGINT: not from a Ctrl-C that the terminal sends to the whole process group,
and not when the signal lands while the pool is being restarted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services import wait_until

ROOT = Path(__file__).resolve().parents[2]

# A stand-in for a dramatiq pool: it records its pid on each start and every signal it gets,
# dies with 3 on starts listed in argv[3], and otherwise runs until the test releases it.
POOL = """
import os, pathlib, signal, sys, time
starts, signals, release = (pathlib.Path(p) for p in sys.argv[1:4])
def record(signum, _):
    with signals.open("a") as f:
        f.write(f"{os.getpid()} {signal.Signals(signum).name}\\n")
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, record)
with starts.open("a") as f:
    f.write(f"{os.getpid()}\\n")
if str(len(starts.read_text().split())) in sys.argv[4].split(","):
    sys.exit(3)
while not release.exists():
    time.sleep(0.01)  # the stand-in's own poll for the test's go-ahead
"""

# The supervisor, as ``accessflow workers`` runs it, with a long shutdown timeout: a pool that
# never gets its SIGTERM keeps the supervisor running far past any deadline of these tests.
# With ``signal_on_start=N`` the Nth start of the pool begins with a real SIGTERM to the
# supervisor itself: the signal arrives while the new child is being started.
SUPERVISOR = """
import os, signal, subprocess, sys
from infra.messaging import supervisor
signal_on_start = int(sys.argv[1])
popen = subprocess.Popen
starts = []
def starting(*args, **kwargs):
    starts.append(1)
    if len(starts) == signal_on_start:
        os.kill(os.getpid(), signal.SIGTERM)
    return popen(*args, **kwargs)
supervisor.subprocess.Popen = starting
sys.exit(supervisor.supervise([sys.executable, "-c", *sys.argv[2:]], shutdown_timeout=600, max_pause=0.2))
"""


@dataclass
class Supervised:
    process: subprocess.Popen[bytes]
    starts: Path
    signals: Path
    release: Path
    log: Path

    def pids(self) -> list[int]:
        return [int(pid) for pid in self.starts.read_text().split()] if self.starts.exists() else []

    def received(self) -> list[tuple[int, str]]:
        if not self.signals.exists():
            return []
        return [
            (int(pid), name) for pid, name in (line.split() for line in self.signals.read_text().splitlines())
        ]

    def logged(self, event: str) -> bool:
        return event in self.log.read_text()


@contextmanager
def supervised(tmp_path: Path, *, dies_on: str = "", signal_on_start: int = 0) -> Iterator[Supervised]:
    files = [tmp_path / name for name in ("starts", "signals", "release")]
    log = tmp_path / "supervisor.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, str(signal_on_start), POOL, *map(str, files), dies_on],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            # A process group of its own, like a command in the foreground of a terminal
            start_new_session=True,
        )
    run = Supervised(process, *files, log)
    try:
        yield run
    finally:
        run.release.touch()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class TestStoppingFromATerminal:
    @pytest.mark.parametrize("pressed", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
    def test_the_pool_gets_one_sigterm_even_when_the_terminal_signals_the_whole_group(
        self, tmp_path: Path, pressed: signal.Signals
    ) -> None:
        with supervised(tmp_path) as run:
            # Given a running pool in the foreground of a terminal
            wait_until(lambda: len(run.pids()) == 1, what="the pool to start")

            # When the terminal signals the foreground process group, supervisor and pool alike
            os.killpg(run.process.pid, pressed)

            # Then the pool gets a SIGTERM from the supervisor, and nothing else
            wait_until(run.received, what="the pool to get a signal")
            assert run.received() == [(run.pids()[0], "SIGTERM")]
            wait_until(lambda: run.logged("workers.stopping"), what="the supervisor to log the stop")

            # And pressing it again sends nothing more
            os.killpg(run.process.pid, pressed)
            wait_until(lambda: run.logged("workers.already_stopping"), what="the second signal to be seen")
            run.release.touch()
            assert run.process.wait(timeout=60) == 0
            assert run.received() == [(run.pids()[0], "SIGTERM")]


#: The supervisor's exit status when the pool ended by SIGTERM: supervise returns -15, sys.exit masks it.
KILLED_BY_SIGTERM = -signal.SIGTERM & 0xFF


class TestStoppingDuringARestart:
    """A signal that lands while a pool is being started must stop that pool.

    The pool may get it before its Python has set up its handler, and then ends by it,
    as a dramatiq pool that early would: either way it got it, and the supervisor stops.
    Without the fix it gets nothing, and runs on until the shutdown timeout (600 s).
    """

    def stopped(self, run: Supervised) -> bool:
        return bool(run.received()) or run.process.poll() is not None

    def test_a_signal_that_lands_as_the_new_pool_starts_reaches_it(self, tmp_path: Path) -> None:
        # Given a pool that dies on its first start, and a SIGTERM that lands as it is started again
        with supervised(tmp_path, dies_on="1", signal_on_start=2) as run:
            # Then the new pool gets that SIGTERM, once, and the supervisor stops with the pool
            wait_until(lambda: self.stopped(run), what="the restarted pool to get the signal")
            run.release.touch()
            code = run.process.wait(timeout=60)
            assert code in (0, KILLED_BY_SIGTERM)
            if code == 0:
                assert run.received() == [(run.pids()[1], "SIGTERM")]
            assert run.logged("workers.died")
            assert len(run.pids()) <= 2

    def test_a_signal_as_the_first_pool_starts_reaches_it(self, tmp_path: Path) -> None:
        # Given a SIGTERM that lands as the very first pool is being started
        with supervised(tmp_path, signal_on_start=1) as run:
            # Then that pool gets it, once, and nothing is started again
            wait_until(lambda: self.stopped(run), what="the pool to get the signal")
            run.release.touch()
            code = run.process.wait(timeout=60)
            assert code in (0, KILLED_BY_SIGTERM)
            if code == 0:
                assert run.received() == [(run.pids()[0], "SIGTERM")]
            assert len(run.pids()) <= 1
