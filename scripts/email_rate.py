"""Emails per second from one thread: rendering alone, and rendering plus SMTP to an aiosmtpd sink.

The sink runs in its own process (``python -m aiosmtpd``, the Sink handler, which keeps nothing),
so the figures are the client's. ``--impl`` loads the mailer from another copy of infra/mail/transports.py,
to compare two versions in one run::

    git show HEAD~1:infra/mail/transports.py > /tmp/email_before.py
    .venv/bin/python scripts/email_rate.py --impl /tmp/email_before.py --impl infra/mail/transports.py

Prints one line per implementation; a figure to compare, not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType

import structlog

from domain.model import NotificationKind
from domain.notifications import ApproveContext, ProductLine, RejectContext
from domain.ports import Email
from infra.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"email_impl_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _emails(n: int) -> list[Email]:
    """Half approve, half reject, as a burst of auto-approved and declined requests gives them."""
    emails = []
    for i in range(n):
        request_id = str(uuid.uuid4())
        products = (ProductLine("payments", "Payments API"), ProductLine("ledger", "Ledger API"))
        context: object
        if i % 2:
            kind = NotificationKind.REJECT
            context = RejectContext(
                request_id, "Acme Developers", "Checkout", "Partner", products, "Not now."
            )
        else:
            kind = NotificationKind.APPROVE
            context = ApproveContext(
                request_id=request_id,
                consumer_name="Acme Developers",
                app_id="acme-checkout",
                app_name="Checkout",
                plan_name="Starter",
                products=products,
                rate_limit_per_minute=60,
                monthly_quota=10000,
                credential_kind="api_key",
                credential_public_id="af_0123abcd",
            )
        emails.append(
            Email(kind, ("dev@acme.example",), f"<{kind.value}.{request_id}@accessflow.local>", context)
        )
    return emails


def _measure(path: str, settings: Settings, n: int) -> str:
    module = _load(path)
    renderer = module.EmailRenderer(settings)
    emails = _emails(n)
    started = time.perf_counter()
    for email in emails:
        renderer.encode(email)
    render_rate = n / (time.perf_counter() - started)
    mailer = module.SmtpMailer(settings, renderer)
    mailer.send(emails[0])  # warm: imports, first connection where one is kept
    started_cpu, started = time.process_time(), time.perf_counter()
    for email in emails:
        mailer.send(email)
    seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    getattr(mailer, "close", lambda: None)()
    return (
        f"{path}: render {render_rate:,.0f}/s; send {n / seconds:,.0f} emails/s"
        f" ({1000 * seconds / n:.2f} ms wall, {1000 * cpu / n:.2f} ms client CPU per email)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", action="append", help="a copy of infra/mail/transports.py (repeatable)")
    parser.add_argument("-n", type=int, default=2000, help="emails per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per implementation; all printed")
    args = parser.parse_args()
    # The figures are the mailer's, not the console renderer's: one "email.sent" line per email otherwise.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    port = _free_port()
    sink = subprocess.Popen(
        [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}", "-c", "aiosmtpd.handlers.Sink"]
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # the sink is starting
        settings = Settings(smtp_host="127.0.0.1", smtp_port=port)
        for _ in range(args.rounds):
            for path in args.impl or [
                str(Path(__file__).resolve().parent.parent / "infra" / "mail" / "transports.py")
            ]:
                print(_measure(path, settings, args.n), flush=True)
    finally:
        sink.terminate()
        sink.wait(timeout=10)


if __name__ == "__main__":
    main()
