"""The supervisor restarts a pool that dies and stops it cleanly on SIGTERM (real processes)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.services import wait_until

# A stand-in for a dramatiq pool: it records each start, dies on its first two starts, then runs
# until a signal arrives, and exits 0 on SIGTERM as dramatiq does after a graceful stop.
POOL = """
import pathlib, signal, sys, threading
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
starts = pathlib.Path(sys.argv[1])
starts.write_text(starts.read_text() + "x" if starts.exists() else "x")
if len(starts.read_text()) < 3:
    sys.exit(3)
stop.wait()
"""

SUPERVISOR = """
import sys
from infra.messaging.supervisor import supervise
sys.exit(supervise([sys.executable, "-c", sys.argv[1], sys.argv[2]], shutdown_timeout=10, max_pause=0.2))
"""


class TestTheSupervisor:
    def test_restarts_a_dying_pool_and_passes_sigterm_on(self, tmp_path: Path) -> None:
        # Given a supervised pool that dies twice before it stays up
        starts = tmp_path / "starts"
        supervisor = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, POOL, str(starts)], cwd=Path(__file__).resolve().parents[2]
        )
        try:
            # When it has been started a third time
            wait_until(
                lambda: starts.exists() and len(starts.read_text()) == 3, timeout=30, what="three starts"
            )
            supervisor.send_signal(signal.SIGTERM)

            # Then SIGTERM stops it for good, with the pool's own exit status
            assert supervisor.wait(timeout=30) == 0
            assert len(starts.read_text()) == 3
        finally:
            if supervisor.poll() is None:
                supervisor.kill()
