"""The bench's SMTP server, run in a process of its own so that its CPU is measured apart.

``python -m bench.smtp_sink --port PORT --out FILE`` accepts every message (aiosmtpd) and
appends one line per message to FILE: ``<monotonic time> <kind> <request id>``, the kind and
request id read from accessflow's ``Message-ID: <kind.request-id@domain>`` (or, failing
that, from ``X-Accessflow-Request-Id``, kind ``unknown``). ``time.monotonic()`` is
CLOCK_MONOTONIC, one clock for every process on the machine, so the harness compares
these times with its own publish times. The message itself is not kept.

It exits on SIGTERM or SIGINT, and when the process that started it is gone.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import threading
import time
from types import FrameType
from typing import Any

#: accessflow's Message-ID: <kind.request-id@domain> (infra/mail/transports.py, domain.handlers.email_message_id).
MESSAGE_ID = re.compile(rb"^message-id:[ \t]*<([a-z_]+)\.([0-9A-Za-z-]{1,64})@", re.IGNORECASE | re.MULTILINE)
REQUEST_ID_HEADER = re.compile(
    rb"^x-accessflow-request-id:[ \t]*([0-9A-Za-z-]{1,64})", re.IGNORECASE | re.MULTILINE
)


def identify(raw: bytes) -> tuple[str, str]:
    """(kind, request id) of an email, from its header block; ``("unknown", "-")`` when it names none."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    headers = raw if end < 0 else raw[:end]
    found = MESSAGE_ID.search(headers)
    if found:
        return found.group(1).decode().lower(), found.group(2).decode()
    named = REQUEST_ID_HEADER.search(headers)
    if named:
        return "unknown", named.group(1).decode()
    return "unknown", "-"


def record_line(at: float, kind: str, request_id: str) -> bytes:
    """One line of the output file."""
    return f"{at:.6f} {kind} {request_id}\n".encode()


class Recorder:
    """aiosmtpd handler: accept the message, append its line to the output file."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        at = time.monotonic()
        kind, request_id = identify(bytes(envelope.original_content or envelope.content or b""))
        os.write(self.fd, record_line(at, kind, request_id))  # one write, O_APPEND: whole lines
        return "250 OK"


def main(argv: list[str] | None = None) -> int:
    from aiosmtpd.controller import Controller

    parser = argparse.ArgumentParser(prog="python -m bench.smtp_sink", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True, help="file to append one line per message to")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()
    fd = os.open(args.out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    controller = Controller(Recorder(fd), hostname=args.host, port=args.port)
    controller.start()
    try:
        while not stop.wait(1.0):  # wakes once a second to notice an orphaned sink
            if os.getppid() != parent:
                break
    finally:
        controller.stop()
        os.close(fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
