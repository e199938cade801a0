"""Keeps a dramatiq worker pool running: restarts it when it dies, stops it cleanly on SIGTERM.

When one dramatiq worker process dies (a crash, the OOM killer, a poison message), the
dramatiq main process stops all the others and exits (RELIABILITY.md, pitfall 6).
``accessflow workers`` therefore runs it as a child and starts it again, with a
growing pause between quick successive failures. On SIGTERM or SIGINT the signal is
passed on: dramatiq stops taking messages, finishes those in flight within the
shutdown timeout, and RabbitMQ requeues whatever was not acknowledged by then.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from types import FrameType

import structlog

log = structlog.get_logger()

#: A run shorter than this counts as a quick failure, and doubles the pause before the next start.
HEALTHY_RUN_SECONDS = 30.0


def supervise(argv: Sequence[str], *, shutdown_timeout: float, max_pause: float = 30.0) -> int:
    """Run ``argv`` until asked to stop; return its last exit status.

    Parameters:
      argv: the command that runs the pool.
      shutdown_timeout: seconds the pool gets to stop after a signal before it is killed.
      max_pause: the longest pause, in seconds, between restarts of a pool that keeps dying.
    """
    stopping = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _: FrameType | None) -> None:
        stopping.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    pause = min(0.5, max_pause)  # doubled before the first restart
    try:
        while True:
            started = time.monotonic()
            child = subprocess.Popen(list(argv))
            code = _wait(child, stopping, shutdown_timeout)
            if stopping.is_set():
                log.info("workers.stopped", exit_code=code)
                return code
            ran = time.monotonic() - started
            pause = min(1.0, max_pause) if ran > HEALTHY_RUN_SECONDS else min(pause * 2, max_pause)
            log.warning("workers.died", exit_code=code, ran_seconds=round(ran, 1), restart_in_seconds=pause)
            if stopping.wait(pause):
                return code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait(child: subprocess.Popen[bytes], stopping: threading.Event, shutdown_timeout: float) -> int:
    while True:
        try:
            return child.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if stopping.is_set():
                try:
                    return child.wait(timeout=shutdown_timeout)
                except subprocess.TimeoutExpired:
                    log.error("workers.shutdown_timeout", seconds=shutdown_timeout)
                    child.kill()
                    return child.wait()
