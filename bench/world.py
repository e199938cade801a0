"""What a bench run stands on: a private PostgreSQL, vhosts on the shared RabbitMQ, an SMTP sink, pools.

Everything here is made for the run and removed by it: the PostgreSQL cluster (with
``pg_stat_statements`` preloaded, which the shared server does not do), one vhost per
deployment (the floor's and accessflow's) with a user per role, applied as ``accessflow
broker setup`` does, the SMTP sink process, and the worker pools. The shared PostgreSQL
and RabbitMQ are never reconfigured or restarted; on RabbitMQ the bench only adds and
deletes its own vhosts and users, and reads ``rabbitmqctl status``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import pika
import pika.exceptions
import psycopg
from pydantic import SecretStr

from bench import procfs
from bench.tracking import HarnessError
from infra.messaging.broker_admin import Rabbitmqctl, apply_definitions
from infra.messaging.topology import Accounts, QueueArguments, Topology, definitions
from infra.settings import Settings
from tests.faults.private_services import PrivatePostgres

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ACCESSFLOW = str(BIN / "accessflow")
DRAMATIQ = str(BIN / "dramatiq")
CATALOGUE = Path(__file__).resolve().parent / "catalog.yaml"
PORTAL_ID = "bench-portal"
CONSUMER = {"id": "acme", "email": "dev@acme.example", "name": "Acme Developers"}
APP_ID = "acme-checkout"
ADMIN_ID = "bench-admin"
ADMIN_EMAIL = "admin@bench.example"
ADMIN_KEY_ID = "bench-admin-1"
DATABASE = "accessflow_bench"
#: Seconds a pool gets to stop on SIGTERM before its whole tree is killed.
STOP_TIMEOUT = 90.0


# --------------------------------------------------------------------------------------
# Child processes


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the bench process dies, so nothing is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(argv: Sequence[str], *, env: Mapping[str, str], log: IO[bytes] | None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        list(argv),
        env=dict(env),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent,  # only prctl; pools start from the main thread
    )


def stop_tree(process: subprocess.Popen[bytes], timeout: float, *, signalled: bool = False) -> None:
    """SIGTERM ``process`` (unless ``signalled`` already) and wait up to ``timeout``; then SIGKILL its tree.

    One SIGTERM only: dramatiq takes a second one as "kill the workers now".
    """
    if process.poll() is None:
        if not signalled:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    below = procfs.tree([process.pid], procfs.all_stats()) if process.poll() is None else []
    for pid in [*below, process.pid]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def wait_until(check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; :class:`HarnessError` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)  # the poll interval of a wait with a deadline


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------
# PostgreSQL


class BenchPostgres(PrivatePostgres):
    """The fault suite's private cluster, with ``pg_stat_statements`` preloaded."""

    def _prepare(self) -> None:
        super()._prepare()
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# accessflow bench: statement counts per request\n"
                "shared_preload_libraries = 'pg_stat_statements'\n"
                "pg_stat_statements.track = top\n"
                "pg_stat_statements.max = 10000\n"
            )


@dataclass(frozen=True)
class StatementStat:
    calls: int
    query: str


class Database:
    """The bench database on the private cluster, and its counters."""

    def __init__(self, server: BenchPostgres) -> None:
        self.server = server
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/{DATABASE}"

    def _admin(self) -> psycopg.Connection[Any]:
        # The counters are read from the postgres database, so these reads are not the bench database's.
        return psycopg.connect(self.server.conninfo, autocommit=True)

    def create(self) -> None:
        with self._admin() as connection:
            connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            connection.execute(f'CREATE DATABASE "{DATABASE}"')

    def server_version(self) -> str:
        with self._admin() as connection:
            row = connection.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"

    def transactions(self) -> int:
        """Commits and rollbacks of the bench database so far (``pg_stat_database``)."""
        with self._admin() as connection:
            row = connection.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (DATABASE,)
            ).fetchone()
        return int(row[0]) if row else 0

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Wait until no session is connected to the bench database.

        A backend adds its transactions to ``pg_stat_database`` when it flushes its pending
        statistics: at the latest when it exits, up to 10 s later while it idles. Reading the
        counter once every session has gone counts every transaction they ran.
        """

        def idle() -> bool:
            with self._admin() as connection:
                row = connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (DATABASE,)
                ).fetchone()
            return row is not None and int(row[0]) == 0

        wait_until(idle, timeout=timeout, what=f"every session of {DATABASE} to end", interval=0.1)

    def reset_statements(self) -> None:
        with self._admin() as connection:
            connection.execute("SELECT pg_stat_statements_reset()")

    def statements(self) -> list[StatementStat]:
        """Every statement run in the bench database since the last reset, most called first."""
        with self._admin() as connection:
            rows = connection.execute(
                "SELECT s.calls, s.query FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                "WHERE d.datname = %s ORDER BY s.calls DESC",
                (DATABASE,),
            ).fetchall()
        return [StatementStat(int(calls), str(query)) for calls, query in rows]

    def connect(self) -> psycopg.Connection[Any]:
        """A connection to the bench database itself (for checks after a measured window)."""
        return psycopg.connect(f"{self.server.conninfo.replace('dbname=postgres', f'dbname={DATABASE}')}")


# --------------------------------------------------------------------------------------
# RabbitMQ


@dataclass(frozen=True)
class Vhost:
    """One deployment's vhost on the shared node, with a user per role (``accessflow broker setup``)."""

    prefix: str
    accounts: Accounts
    passwords: Mapping[str, str] = field(repr=False)
    host: str
    port: int

    @property
    def topology(self) -> Topology:
        return Topology(self.prefix)

    @property
    def portal_user(self) -> str:
        return self.accounts.portals[PORTAL_ID]

    def url(self, user: str) -> str:
        password = self.passwords[user]
        vhost = quote(self.prefix, safe="")
        return f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/{vhost}"

    def users(self) -> list[str]:
        return self.accounts.users()


def create_vhost(ctl: Rabbitmqctl, prefix: str, settings: Settings, host: str, port: int) -> Vhost:
    """A vhost named ``prefix`` with the deployment's users, permissions, exchanges and queues."""
    topology = Topology(prefix)
    accounts = Accounts.defaults(topology, {PORTAL_ID: f"{prefix}-{PORTAL_ID}"})
    passwords = {user: secrets.token_urlsafe(16) for user in accounts.users()}
    document = definitions(
        topology,
        vhost=prefix,
        accounts=accounts,
        passwords={},
        queue_arguments=QueueArguments.from_settings(settings),
    )
    vhost = Vhost(prefix, accounts, passwords, host, port)
    try:
        apply_definitions(ctl, document, passwords=passwords)
    except BaseException:
        delete_vhost(ctl, vhost)
        raise
    return vhost


def delete_vhost(ctl: Rabbitmqctl, vhost: Vhost) -> list[str]:
    """Remove the vhost and its users; return what could not be removed."""
    failed: list[str] = []
    try:
        ctl.delete_vhost(vhost.prefix)
    except Exception as error:
        failed.append(f"vhost {vhost.prefix}: {error}")
    for user in vhost.users():
        try:
            ctl.delete_user(user)
        except Exception as error:
            failed.append(f"user {user}: {error}")
    return failed


def rabbitmq_status(ctl: Rabbitmqctl) -> dict[str, Any]:
    """The node's ``rabbitmqctl status`` (pid, versions), read-only."""
    status = json.loads(ctl.run("status", "--formatter", "json"))
    if not isinstance(status, dict):
        raise HarnessError("rabbitmqctl status did not return an object")
    return status


def consumer_count(url: str, queue: str) -> int:
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPError:
        return 0
    try:
        method = connection.channel().queue_declare(queue=queue, passive=True).method
        return int(method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if connection.is_open:
            connection.close()


def settings_env(settings: Settings) -> dict[str, str]:
    """This process's environment without ``ACCESSFLOW_*``, plus ``settings`` as ``ACCESSFLOW_*``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCESSFLOW_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, list):
            value = ",".join(value)
        env[f"ACCESSFLOW_{name.upper()}"] = str(value)
    env["ACCESSFLOW_LOG_FORMAT"] = "json"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


# --------------------------------------------------------------------------------------
# Worker pools


@dataclass(frozen=True)
class PoolSpec:
    """One pool: the queues it serves, its processes and threads per process."""

    queues: tuple[str, ...]
    processes: int
    threads: int

    @classmethod
    def parse(cls, text: str) -> PoolSpec:
        """``requests,decisions:1x4`` -> PoolSpec(("requests", "decisions"), 1, 4)."""
        queues_text, sep, shape = text.partition(":")
        processes_text, x, threads_text = shape.lower().partition("x")
        queues = tuple(q.strip() for q in queues_text.split(",") if q.strip())
        if not sep or not x or not queues:
            raise ValueError(f"a pool is QUEUE[,QUEUE...]:PROCESSESxTHREADS, not {text!r}")
        processes, threads = int(processes_text), int(threads_text)
        if processes < 1 or threads < 1:
            raise ValueError(f"a pool needs at least one process and one thread: {text!r}")
        return cls(queues, processes, threads)

    def label(self) -> str:
        return f"{','.join(self.queues)}: {self.processes}x{self.threads}"


@dataclass
class Pool:
    """A running pool: its top process (the supervisor, or dramatiq itself) and its log."""

    spec: PoolSpec
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    signalled: bool = False

    def terminate(self) -> None:
        """Send the one SIGTERM that starts a graceful shutdown."""
        if not self.signalled and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        self.signalled = True

    def pids(self) -> list[int]:
        return procfs.tree([self.process.pid], procfs.all_stats())

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise HarnessError(f"the pool {self.spec.label()} exited with {code}; see {self.log_path}")

    def stop(self) -> None:
        try:
            stop_tree(self.process, STOP_TIMEOUT, signalled=self.signalled)
        finally:
            self.log.close()


def start_pool(argv: Sequence[str], spec: PoolSpec, env: Mapping[str, str], log_path: Path) -> Pool:
    log = log_path.open("ab")
    try:
        process = spawn(argv, env=env, log=log)
    except BaseException:
        log.close()
        raise
    return Pool(spec, process, log_path, log)


def accessflow_argv(spec: PoolSpec) -> list[str]:
    argv = [ACCESSFLOW, "workers", "--processes", str(spec.processes), "--threads", str(spec.threads)]
    for queue in spec.queues:
        argv += ["--queues", queue]
    return argv


def floor_argv(spec: PoolSpec, prefix: str) -> list[str]:
    return [
        DRAMATIQ, "bench.floor_worker:boot",
        "--processes", str(spec.processes), "--threads", str(spec.threads),
        "--worker-shutdown-timeout", "30000",
        "--queues", *(f"{prefix}.{queue}" for queue in spec.queues),
    ]  # fmt: skip


def wait_ready(pools: Sequence[Pool], vhost: Vhost, *, timeout: float) -> None:
    """Wait until every queue has as many consumers as processes serve it (each process consumes each)."""
    expected: dict[str, int] = {}
    for pool in pools:
        for queue in pool.spec.queues:
            name = f"{vhost.prefix}.{queue}"
            expected[name] = expected.get(name, 0) + pool.spec.processes
    url = vhost.url(vhost.accounts.workers)

    def ready() -> bool:
        for pool in pools:
            pool.check_alive()
        return all(consumer_count(url, queue) >= count for queue, count in expected.items())

    wait_until(ready, timeout=timeout, what=f"consumers on {', '.join(sorted(expected))}", interval=0.5)


def stop_pools(pools: Iterable[Pool]) -> None:
    pools = list(pools)
    for pool in pools:  # all at once, so they shut down together
        pool.terminate()
    for pool in pools:
        pool.stop()


def peak_rss_mib(pools: Iterable[Pool]) -> dict[str, float]:
    """Peak resident memory (``VmHWM``) of the pools' processes: the largest one, and their sum, in MiB."""
    peaks = [
        kib for pool in pools for pid in pool.pids() if (kib := procfs.rss_kib(pid, "VmHWM")) is not None
    ]
    return {"max_process": max(peaks, default=0) / 1024, "sum": sum(peaks) / 1024, "processes": len(peaks)}


def current_rss_mib(pools: Iterable[Pool]) -> dict[str, float]:
    """Resident memory (``VmRSS``) now: the largest process and the sum, in MiB."""
    values = [
        kib for pool in pools for pid in pool.pids() if (kib := procfs.rss_kib(pid, "VmRSS")) is not None
    ]
    return {"max_process": max(values, default=0) / 1024, "sum": sum(values) / 1024}


# --------------------------------------------------------------------------------------
# The SMTP sink


@dataclass
class SmtpSink:
    process: subprocess.Popen[bytes]
    port: int
    out: Path
    log: IO[bytes]

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise HarnessError(f"the SMTP sink exited with {self.process.returncode}")

    def stop(self) -> None:
        try:
            stop_tree(self.process, 15.0)
        finally:
            self.log.close()


def start_smtp_sink(workdir: Path) -> SmtpSink:
    port = free_port()
    out = workdir / "smtp-received.log"
    log = (workdir / "smtp-sink.out").open("ab")
    argv = [sys.executable, "-m", "bench.smtp_sink", "--port", str(port), "--out", str(out)]
    process = spawn(argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, log=log)
    sink = SmtpSink(process, port, out, log)
    try:

        def listening() -> bool:
            sink.check_alive()
            return port_open(port)

        wait_until(listening, timeout=30, what=f"the SMTP sink on port {port}")
    except BaseException:
        sink.stop()
        raise
    return sink


# --------------------------------------------------------------------------------------
# accessflow's own setup, as an operator does it


def cli(env: Mapping[str, str], *args: str) -> str:
    """Run ``accessflow ARGS`` and return its output; :class:`HarnessError` when it fails."""
    try:
        done = subprocess.run(
            [ACCESSFLOW, *args], env=dict(env), cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        raise HarnessError(f"accessflow {args[0]} did not finish in 120s") from None
    if done.returncode != 0:
        raise HarnessError(
            f"accessflow {' '.join(args[:3])} exited {done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    return done.stdout
