"""Keeps a dramatiq worker pool running: restarts it when it dies, stops it cleanly on a signal.

When one dramatiq worker process dies (a crash, the OOM killer, a poison message), the
dramatiq main process stops all the others and exits (RELIABILITY.md, pitfall 6).
``accessflow workers`` therefore runs it as a child and starts it again, with a
growing pause between quick successive failures.

Stopping: SIGTERM, SIGINT (Ctrl-C) and SIGHUP (the terminal closed) all ask the pool to
stop, and the pool gets exactly one SIGTERM, dramatiq's graceful stop: it stops taking
messages, finishes those in flight within the shutdown timeout, and RabbitMQ requeues
whatever was not acknowledged by then. Exactly one, because dramatiq's main process
turns every SIGINT it receives into a SIGTERM to its workers, and a worker that gets a
second SIGTERM exits at once, abandoning its messages mid-run. Hence:

* the pool runs in a session of its own, so a Ctrl-C, which the terminal sends to the
  whole foreground process group, reaches only the supervisor and not the pool as well;
* whatever the signal, and however many arrive, the pool gets one SIGTERM; later
  signals are logged and change nothing (the shutdown timeout still bounds the stop);
* the signal handler only records the signal. The supervisor's loop acts on it, so a
  signal that lands while the pool is being restarted (during the pause, or while the
  new child is being started) stops the restart, or reaches the new child, and never
  falls between two children.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType

import structlog

log = structlog.get_logger()

#: A run shorter than this counts as a quick failure, and doubles the pause before the next start.
HEALTHY_RUN_SECONDS = 30.0
#: Seconds between looks at the pool and at the signals received; how late a stop may begin.
POLL_SECONDS = 0.1
#: The signals that ask the pool to stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _Signals:
    """The stop signals received so far, in order.

    The handler only appends: it runs between any two bytecodes of the loop, so it must
    take no lock (a ``threading.Event`` the loop is inside would deadlock it) and write
    no log line (a print it interrupts would be re-entered).
    """

    def __init__(self) -> None:
        self.received: list[int] = []

    def handle(self, signum: int, _: FrameType | None) -> None:
        self.received.append(signum)


def supervise(
    argv: Sequence[str],
    *,
    shutdown_timeout: float,
    max_pause: float = 30.0,
    env: Mapping[str, str] | None = None,
    before_start: Callable[[], None] | None = None,
) -> int:
    """Run ``argv`` until asked to stop; return its last exit status (0 if it never ran).

    Parameters:
      argv: the command that runs the pool.
      shutdown_timeout: seconds the pool gets to stop after a signal before it is killed.
      max_pause: the longest pause, in seconds, between restarts of a pool that keeps dying.
      env: the pool's environment; None: this process's.
      before_start: called before each start of the pool (it empties the pool's metrics directory).
    """
    signals = _Signals()
    previous = {s: signal.signal(s, signals.handle) for s in STOP_SIGNALS}
    pause = min(0.5, max_pause)  # doubled before the first restart
    code = 0
    try:
        # Checked before every start: a signal during the pause, or before the first start,
        # starts nothing. One that comes after this check is seen by _run, for the new child.
        while not signals.received:
            started = time.monotonic()
            if before_start is not None:
                before_start()
            # Its own session: no signal from the terminal reaches the pool directly (docstring).
            child = subprocess.Popen(
                list(argv), start_new_session=True, env=None if env is None else dict(env)
            )
            code = _run(child, signals, shutdown_timeout)
            if signals.received:
                break
            ran = time.monotonic() - started
            pause = min(1.0, max_pause) if ran > HEALTHY_RUN_SECONDS else min(pause * 2, max_pause)
            log.warning("workers.died", exit_code=code, ran_seconds=round(ran, 1), restart_in_seconds=pause)
            _pause(pause, signals)
        log.info("workers.stopped", exit_code=code)
        return code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(child: subprocess.Popen[bytes], signals: _Signals, shutdown_timeout: float) -> int:
    """Wait for ``child`` to exit; on the first stop signal send it one SIGTERM, kill it after the timeout."""
    logged = 0
    deadline: float | None = None
    while True:
        try:
            return child.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        for signum in signals.received[logged:]:
            name = signal.Signals(signum).name
            if deadline is None:
                child.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + shutdown_timeout
                log.info("workers.stopping", signal=name, sent="SIGTERM", timeout_seconds=shutdown_timeout)
            else:
                # A second SIGTERM would make dramatiq's workers exit mid-message: the timeout bounds the stop.
                log.info("workers.already_stopping", signal=name)
            logged += 1
        if deadline is not None and time.monotonic() >= deadline:
            log.error("workers.shutdown_timeout", seconds=shutdown_timeout)
            child.kill()
            return child.wait()


def _pause(seconds: float, signals: _Signals) -> None:
    """Sleep ``seconds``, or less if a stop signal arrives."""
    deadline = time.monotonic() + seconds
    while not signals.received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(POLL_SECONDS, remaining))
