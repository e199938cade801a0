"""Do psycopg's prepared statements survive PgBouncer in transaction mode? Run it and see.

Starts a private PgBouncer (the ``pgbouncer`` binary on PATH, run as ``postgres`` when we
are root) on a free port, in transaction pooling mode with fewer server connections than
clients, in front of a PostgreSQL server (default the local one, 127.0.0.1:5432, trust).
Then CLIENTS threads, each with its own connection, run TRANSACTIONS short transactions
each, with the settings of :func:`infra.db.engine.create_engine` (``prepare_threshold=1``),
and again with ``prepare_threshold=None`` (no server-side prepared statements), and print
the errors each way. PgBouncer before 1.21 does not track protocol-level prepared
statements: a statement prepared on one server connection is missing on the next.

    .venv/bin/python scripts/pgbouncer_prepared.py [--host 127.0.0.1 --port 5432 --user postgres]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg

CLIENTS = 8
SERVER_CONNECTIONS = 2
TRANSACTIONS = 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_pgbouncer(
    workdir: Path, host: str, port: int, user: str, version: tuple[int, ...]
) -> tuple[subprocess.Popen[bytes], int]:
    listen = free_port()
    (workdir / "users.txt").write_text(f'"{user}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={host} port={port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {workdir / 'users.txt'}\n"
        f"pool_mode = transaction\ndefault_pool_size = {SERVER_CONNECTIONS}\nmax_client_conn = 100\n"
        # 1.21+ tracks protocol-level prepared statements when this is set; older versions refuse the key.
        + ("max_prepared_statements = 100\n" if version >= (1, 21) else "")
        + f"logfile = {workdir / 'pgbouncer.log'}\n"
    )
    argv = ["pgbouncer", str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        shutil.chown(workdir, "postgres", "postgres")
        for child in workdir.iterdir():
            shutil.chown(child, "postgres", "postgres")
        argv = ["runuser", "-u", "postgres", "--", *argv]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", listen), timeout=1).close()
            return process, listen
        except OSError:
            if process.poll() is not None:
                raise RuntimeError((workdir / "pgbouncer.log").read_text()) from None
            time.sleep(0.1)  # polled against the deadline above
    raise TimeoutError("pgbouncer did not listen within 20 s")


def hammer(conninfo: str, prepare_threshold: int | None) -> Counter[str]:
    """Run the clients; count each outcome (``ok`` or the error's first line)."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def client(n: int) -> None:
        with psycopg.connect(conninfo, prepare_threshold=prepare_threshold, autocommit=False) as conn:
            for i in range(TRANSACTIONS):
                try:
                    with conn.transaction():
                        conn.execute("SELECT %s::int + %s::int", (n, i)).fetchone()
                        conn.execute("SELECT count(*) FROM pg_class WHERE relpages > %s", (i,)).fetchone()
                    outcome = "ok"
                except psycopg.Error as error:
                    outcome = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                    outcome = outcome.replace(outcome.split('"')[1], "_pg3_N") if '"' in outcome else outcome
                with lock:
                    outcomes[outcome] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5432)
    parser.add_argument("--user", default="postgres")
    args = parser.parse_args()
    banner = subprocess.run(["pgbouncer", "--version"], capture_output=True, text=True, check=True)
    first_line = banner.stdout.splitlines()[0]  # "PgBouncer 1.18.0"
    version = tuple(int(part) for part in first_line.split()[1].split(".")[:2])
    print(
        first_line,
        "(max_prepared_statements = 100)" if version >= (1, 21) else "(no prepared-statement support)",
    )
    workdir = Path(tempfile.mkdtemp(prefix="accessflow-pgbouncer-"))
    process, listen = start_pgbouncer(workdir, args.host, args.port, args.user, version)
    try:
        conninfo = f"host=127.0.0.1 port={listen} user={args.user} dbname=postgres connect_timeout=5"
        print(
            f"transaction pooling, {CLIENTS} clients over {SERVER_CONNECTIONS} server connections, "
            f"{TRANSACTIONS} transactions of 2 statements each"
        )
        for threshold in (1, None):
            outcomes = hammer(conninfo, threshold)
            print(f"prepare_threshold={threshold}: {dict(outcomes)}")
    finally:
        process.terminate()
        process.wait(timeout=20)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
