"""Private RabbitMQ and PostgreSQL instances that fault tests may kill, stop and restart.

The shared services (PostgreSQL on 127.0.0.1:5432, RabbitMQ ``rabbit@localhost`` on
127.0.0.1:5672) serve every other test and whoever works on this machine, so a fault test
must never stop them. The classes here start throwaway instances instead, each on ports
of its own and in a temporary directory of its own, and act only on processes they can
prove are theirs (by the data directory in the process's environment or command line).

Why each piece is the way it is:

* RabbitMQ runs as the ``rabbitmq`` user (when we are root) with ``HOME`` in the temporary
  directory, so it has a private Erlang cookie. Our ``rabbitmqctl`` calls use that cookie
  and ``-n <our node>``; even a typo cannot make them act on the shared node, which
  would refuse the cookie.
* ``RABBITMQ_CONF_ENV_FILE`` points at an empty file, so ``/etc/rabbitmq/rabbitmq-env.conf``
  (``NODENAME=rabbit@localhost``) is not read at all, and ``RABBITMQ_CONFIG_FILE`` at a
  file of our own, so ``/etc/rabbitmq/rabbitmq.conf`` (``listeners.tcp.local = 127.0.0.1:5672``)
  is not read either. The few settings we want from the shared env file (epmd and
  distribution on loopback) are set explicitly.
* Both services write their output to files, never to pipes: a daemon that inherited a
  pipe would keep it open, and ``subprocess.run`` would wait for EOF until its timeout.
* Waits poll a check against a deadline; there are no fixed sleeps.
* A test process that crashed leaves its services running. Each temporary directory holds
  the PID of the Python process that made it; ``reap_stale_services`` (run before every
  fresh start) kills services whose owner is gone and removes their directories, so a
  node name or port used by a crashed run does not block the next one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import pika
import pika.exceptions

from tests.services import poll_until

log = logging.getLogger(__name__)


RABBITMQ_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
SHARED_RABBITMQ_NODE = "rabbit@localhost"
EPMD_PORT = 4369
RABBITMQ_CLI_DIST_PORTS = range(35672, 35683)  # RABBITMQ_CTL_DIST_PORT_MIN..MAX defaults
RABBITMQ_DIR_PREFIX = "accessflow-fault-rabbitmq-"
POSTGRES_DIR_PREFIX = "accessflow-fault-postgres-"
OWNER_FILE = "owner.pid"
#: Held while a service reaps what crashed runs left and makes its own directory.
_REAP_AND_PREPARE = threading.Lock()
# A directory without an owner file is either being made right now or was half made by a
# crashed run; only the second kind is old.
OWNERLESS_GRACE_SECONDS = 60.0


class ServiceError(RuntimeError):
    """A private service did not do what it was asked; the message carries its output and log tail."""


# --------------------------------------------------------------------------------------
# Small helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    The kernel chooses it, so concurrent callers do not collide; another process could
    still take it before the service binds it, which the start methods detect. Ports that
    every ``rabbitmqctl`` call briefly listens on (35672-35682) are skipped: a node given
    one of them would fail to start whenever a CLI call happened to hold it.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in RABBITMQ_CLI_DIST_PORTS:
            return port


def port_is_listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``.

    Connecting, rather than trying to bind, is not fooled by sockets in TIME_WAIT.
    """
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    output: str

    def check(self) -> CommandResult:
        if self.returncode != 0:
            raise ServiceError(
                f"{shlex.join(self.argv)} exited with {self.returncode}:\n{self.output.strip()}"
            )
        return self


def run_command(
    argv: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> CommandResult:
    """Run ``argv`` with a timeout, stdout and stderr together.

    Output goes to a temporary file, not a pipe, because the commands we run start daemons
    (``rabbitmq-server -detached``, ``pg_ctl start``) that could inherit a pipe and hold it
    open long after the command itself has returned.
    """
    with tempfile.TemporaryFile() as out:
        try:
            completed = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            out.seek(0)
            text = out.read().decode(errors="replace")
            raise ServiceError(f"{shlex.join(argv)} timed out after {timeout:.0f}s:\n{text.strip()}") from exc
        out.seek(0)
        return CommandResult(tuple(argv), completed.returncode, out.read().decode(errors="replace"))


def _is_root() -> bool:
    return os.geteuid() == 0


def _as_user(user: str, argv: Sequence[str], overrides: Mapping[str, str]) -> list[str]:
    """``argv`` run as ``user`` (via runuser when we are root) with ``overrides`` in its environment.

    The overrides go through ``env`` after ``runuser``, because runuser resets HOME.
    """
    assignments = [f"{key}={value}" for key, value in overrides.items()]
    prefix = ["runuser", "-u", user, "--"] if _is_root() else []
    return [*prefix, "env", *assignments, *argv]


def _chown_tree(path: Path, user: str) -> None:
    """Give ``path`` and everything under it to ``user``, when we are root and may."""
    if not _is_root():
        return
    for root, dirs, files in os.walk(path):
        shutil.chown(root, user, user)
        for name in [*dirs, *files]:
            shutil.chown(os.path.join(root, name), user, user)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------
# Processes, found through /proc


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie.

    ``os.kill(pid, 0)`` succeeds on a zombie, and a killed daemon stays one until its
    parent (here the machine's init) reaps it, so it cannot tell a dead process from a live one.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return bool(fields) and fields[0] not in ("Z", "X")


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or another user's process while we are not root
        return {}
    env: dict[str, str] = {}
    for part in raw.split(b"\0"):
        key, sep, value = part.decode(errors="replace").partition("=")
        if sep:
            env[key] = value
    return env


def _ppid(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]) if len(fields) > 1 else None


def _children(pid: int) -> list[int]:
    return [child for child in _all_pids() if _ppid(child) == pid]


def _is_rabbitmq_server(pid: int) -> bool:
    """A RabbitMQ server VM, not a ``rabbitmqctl`` (which is a beam.smp too, running an escript)."""
    argv = _cmdline(pid)
    return bool(argv) and Path(argv[0]).name.startswith("beam") and "-escript" not in argv


def _rabbitmq_workdir(pid: int) -> Path | None:
    """The temporary directory of one of our RabbitMQ nodes, if ``pid`` is such a node."""
    if not _is_rabbitmq_server(pid):
        return None
    base = _environ(pid).get("RABBITMQ_MNESIA_BASE")
    if not base:
        return None
    workdir = Path(base).parent
    return workdir if workdir.name.startswith(RABBITMQ_DIR_PREFIX) else None


def _postgres_workdir(pid: int) -> Path | None:
    """The temporary directory of one of our clusters, if ``pid`` is its postmaster.

    Found by the postmaster's working directory, which is always its data directory:
    the command line does not do, because after ``pg_ctl restart`` it carries no ``-D``
    (pg_ctl passes PGDATA in the environment instead). Backends rewrite their command
    line (``postgres: checkpointer``), so they do not match; they exit on their own once
    their postmaster is gone.
    """
    argv = _cmdline(pid)
    if not argv or Path(argv[0]).name not in ("postgres", "postmaster"):
        return None
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    workdir = Path(cwd.removesuffix(" (deleted)")).parent  # "(deleted)": its directory was removed
    return workdir if workdir.name.startswith(POSTGRES_DIR_PREFIX) else None


def kill_and_wait(pids: Sequence[int], *, timeout: float = 30.0) -> None:
    """SIGKILL ``pids`` and wait until none of them is alive."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        poll_until(
            lambda: not any(pid_alive(pid) for pid in pids),
            timeout=timeout,
            interval=0.1,
            what=f"processes {list(pids)} to die",
        )


# --------------------------------------------------------------------------------------
# Temporary directories and what crashed runs leave behind


def _make_workdir(prefix: str) -> Path:
    """A fresh temporary directory that records which process owns it.

    The owner file appears whole (written aside, then renamed): a reaper in another thread
    that read it half-written would see no valid owner, call the directory stale, and
    remove it under the service being prepared in it.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    partial = path / f"{OWNER_FILE}.partial"
    partial.write_text(f"{os.getpid()}\n")
    partial.rename(path / OWNER_FILE)
    return path


def _is_stale(workdir: Path) -> bool:
    """Whether ``workdir`` belongs to no live test process (so its services may be killed)."""
    try:
        owner = int((workdir / OWNER_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        # No owner yet, or one being written: a directory this young may be another
        # thread's, mid-way through _make_workdir.
        try:
            age = time.time() - workdir.stat().st_mtime
        except FileNotFoundError:
            return True  # the directory itself is gone: its service is an orphan
        return age > OWNERLESS_GRACE_SECONDS
    except OSError:
        return True
    return not pid_alive(owner)


def reap_stale_services(timeout: float = 30.0) -> list[int]:
    """Kill private services left by a test process that is gone, and remove their directories.

    Only processes whose data lives in a temporary directory with one of our prefixes and
    a dead owner are touched; the shared services keep their data elsewhere and are
    never candidates. Returns the PIDs killed.
    """
    victims: list[int] = []
    for pid in _all_pids():
        workdir = _rabbitmq_workdir(pid) or _postgres_workdir(pid)
        if workdir is not None and _is_stale(workdir):
            victims.append(pid)
    if victims:
        log.warning("killing private services left by a crashed test run: %s", victims)
    kill_and_wait(victims, timeout=timeout)
    tmp = Path(tempfile.gettempdir())
    for pattern in (f"{RABBITMQ_DIR_PREFIX}*", f"{POSTGRES_DIR_PREFIX}*"):
        for workdir in tmp.glob(pattern):
            if workdir.is_dir() and _is_stale(workdir):
                shutil.rmtree(workdir, ignore_errors=True)
    return victims


def epmd_names(port: int = EPMD_PORT) -> dict[str, int]:
    """The node names registered with the local epmd, and their distribution ports.

    Asked over epmd's own protocol (NAMES_REQ), read-only: epmd is shared with the shared
    node, so we never ask it to kill or unregister anything. No epmd means no names.
    """
    chunks: list[bytes] = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            sock.sendall(b"\x00\x01n")
            while chunk := sock.recv(4096):
                chunks.append(chunk)
    except OSError:
        return {}
    names: dict[str, int] = {}
    for line in b"".join(chunks)[4:].decode(errors="replace").splitlines():
        parts = line.split()  # "name rabbit at port 25672"
        if len(parts) == 5 and parts[0] == "name" and parts[4].isdigit():
            names[parts[1]] = int(parts[4])
    return names


# --------------------------------------------------------------------------------------
# RabbitMQ


class _PrivateService:
    """Started on entering a ``with`` block, closed (stopped and removed) on leaving it."""

    def start(self, timeout: float | None = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class PrivateRabbitMQ(_PrivateService):
    """A RabbitMQ node of our own that tests may kill, stop and restart.

    Its data (mnesia, message store) lives in a temporary directory that survives
    ``kill9``/``stop``; ``start`` again brings back durable queues and persistent messages.
    The directory goes in ``close`` (or on leaving the ``with`` block).
    """

    user = "rabbitmq"

    def __init__(
        self,
        port: int | None = None,
        name: str | None = None,
        *,
        start_timeout: float = 90.0,
        stop_timeout: float = 60.0,
        cookie: str | None = None,
    ) -> None:
        """``cookie``: the Erlang cookie, shared by the nodes of one cluster; default a fresh one."""
        self.port = port or free_port()
        self.cookie = cookie or secrets.token_hex(20).upper()
        # Set explicitly: the default (AMQP port + 20000) is not a valid port above 45535.
        self.dist_port = free_port()
        node = name or f"accessflow-fault-{secrets.token_hex(4)}"
        self.node = node if "@" in node else f"{node}@localhost"
        self.short_name = self.node.partition("@")[0]
        if self.node == SHARED_RABBITMQ_NODE or self.short_name == "rabbit":
            raise ValueError(f"{self.node!r} is the shared node's name; choose another")
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.workdir: Path | None = None
        self.pid: int | None = None

    # ---- public API

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @staticmethod
    def available() -> str | None:
        """Why this machine cannot run a private node, or None when it can."""
        for script in ("rabbitmq-server", "rabbitmqctl"):
            if not (RABBITMQ_SCRIPTS / script).exists():
                return f"{RABBITMQ_SCRIPTS / script} not found"
        if _is_root() and shutil.which("runuser") is None:
            return "runuser not found"
        return None

    def start(self, timeout: float | None = None) -> None:
        """Start the node (first time: in a fresh directory; later: on the same data) and wait for it."""
        timeout = timeout or self.start_timeout
        if self.workdir is None:
            with _REAP_AND_PREPARE:  # a cluster's nodes start side by side: one reaper at a time
                reap_stale_services()
                self._prepare()
        elif self._find_pid() is not None:
            raise ServiceError(f"{self.node} is already running")
        self._wait_name_free(timeout=15.0)
        for port in (self.port, self.dist_port):
            if port_is_listening(port):
                raise ServiceError(f"port {port} on 127.0.0.1 is taken; cannot start {self.node}")
        started = time.monotonic()
        # Start output goes to a file of its own: -detached discards the VM's, and a failed
        # boot before logging starts shows up only here.
        result = run_command(
            _as_user(self.user, [str(RABBITMQ_SCRIPTS / "rabbitmq-server"), "-detached"], self._server_env()),
            timeout=60.0,
            env=self._base_env(),
            cwd=self._dir,
        )
        with (self._dir / "server-start.out").open("a") as out:
            out.write(result.output)
        result.check()
        try:
            self.pid = poll_until(
                self._find_pid, timeout=min(30.0, timeout), interval=0.1, what=f"the VM of {self.node}"
            )
        except TimeoutError as exc:
            raise ServiceError(f"{self.node} did not start:\n{self._diagnostics()}") from exc
        self.wait_ready(max(1.0, timeout - (time.monotonic() - started)))
        log.info("%s ready on port %d in %.1fs", self.node, self.port, time.monotonic() - started)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the node has booted (``await_startup``) and accepts guest over AMQP."""
        timeout = timeout or self.start_timeout
        deadline = time.monotonic() + timeout

        def ready() -> bool:
            pid = self._find_pid()
            if pid is None:
                raise ServiceError(f"{self.node} is not running:\n{self._diagnostics()}")
            remaining = max(1, int(deadline - time.monotonic()))
            # await_startup fails at once while the node is not yet registered with epmd,
            # and waits (up to --timeout) once it is.
            result = self.ctl("await_startup", "--timeout", str(remaining), timeout=remaining + 30.0)
            return result.returncode == 0 and self.amqp_ok()

        try:
            poll_until(ready, timeout=timeout, interval=0.5, what=f"{self.node} to accept AMQP")
        except TimeoutError as exc:
            raise ServiceError(f"{exc}\n{self._diagnostics()}") from exc
        self.pid = self._find_pid()
        # RabbitMQ 3.10 does not write RABBITMQ_PID_FILE itself; we keep it for people and tools.
        if self.pid is not None:
            self._pid_file.write_text(f"{self.pid}\n")

    def amqp_ok(self) -> bool:
        """Whether guest can open (and close) an AMQP connection right now."""
        parameters = pika.URLParameters(self.url)
        parameters.socket_timeout = 3
        parameters.connection_attempts = 1
        try:
            connection = pika.BlockingConnection(parameters)
        except (pika.exceptions.AMQPError, OSError):
            return False
        with contextlib.suppress(pika.exceptions.AMQPError, OSError):
            connection.close()
        return True

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the node's VM and its children (erl_child_setup) have used so far.

        Read from ``/proc/<pid>/stat``; 0.0 while the node is not running.
        """
        pid = self._find_pid()
        if pid is None:
            return 0.0
        total = 0
        for process in [pid, *_children(pid)]:
            try:
                fields = Path(f"/proc/{process}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float | None = None) -> None:
        """Stop the node cleanly (``rabbitmqctl stop``) and wait until the VM is gone.

        Falls back to SIGTERM, then SIGKILL, if the node does not go.
        """
        timeout = timeout or self.stop_timeout
        pid = self._find_pid()
        if pid is None:
            return
        result = self.ctl("stop", timeout=timeout)
        if result.returncode != 0:
            log.warning("rabbitmqctl stop failed, sending SIGTERM: %s", result.output.strip())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            poll_until(lambda: not pid_alive(pid), timeout=timeout, interval=0.1, what=f"{self.node} to stop")
        except TimeoutError:
            log.warning("%s did not stop in %.0fs; killing it", self.node, timeout)
        self._reap(pid)

    def kill9(self, timeout: float = 30.0) -> None:
        """SIGKILL this node's VM (only this one: found by its own data directory) and wait it out.

        Also waits until epmd has dropped the name and the ports are free, because a start
        while epmd still lists the name, or the old ports are held, fails at boot.
        """
        pid = self._find_pid()
        if pid is None:
            raise ServiceError(f"{self.node} is not running")
        self._reap(pid, timeout=timeout)

    def stop_app(self, timeout: float | None = None) -> None:
        """Stop the RabbitMQ application but keep the VM: the listeners close, clients are cut off."""
        self.ctl("stop_app", timeout=timeout or self.stop_timeout).check()

    def start_app(self, timeout: float | None = None) -> None:
        """Start the RabbitMQ application again in the running VM and wait until it serves AMQP."""
        timeout = timeout or self.start_timeout
        self.ctl("start_app", timeout=timeout).check()
        self.wait_ready(timeout)

    def sync_metadata(self) -> None:
        """Make the node write its metadata (queues, exchanges, bindings) to disk now.

        Mnesia does not write its transaction log at once: a durable queue declared a few
        milliseconds before a ``kill9`` was missing after the restart in 2 of 20 tries here,
        although ``queue.declare-ok`` had come back, and even a publisher confirm for a
        persistent message on it (with this call in between: 0 of 30). A test about
        message durability calls this between declaring and killing, so that it tests
        what it means to test.
        """
        self.ctl("eval", "mnesia:sync_log().", timeout=60.0).check()

    def close_all_connections(self, reason: str = "fault test") -> None:
        """Have the broker close every client connection, as an operator or a network blip would."""
        self.ctl("close_all_connections", reason, timeout=60.0).check()

    def ctl(self, *args: str, timeout: float = 60.0) -> CommandResult:
        """``rabbitmqctl -n <this node> ARGS``, with this node's private cookie.

        Returns the result whatever the exit status (``.check()`` it to insist); raises only
        on timeout.
        """
        argv = [str(RABBITMQ_SCRIPTS / "rabbitmqctl"), "-n", self.node, *args]
        return run_command(
            _as_user(self.user, argv, self._ctl_env()), timeout=timeout, env=self._base_env(), cwd=self._dir
        )

    def close(self) -> None:
        """Stop the node (killing it if need be) and remove its directory."""
        if self.workdir is None:
            return
        try:
            self.stop()
        except (ServiceError, TimeoutError):
            log.exception("stopping %s failed; killing it", self.node)
            pid = self._find_pid()
            if pid is not None:
                kill_and_wait([pid])
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
            self.pid = None

    # ---- internals

    @property
    def _dir(self) -> Path:
        if self.workdir is None:
            raise ServiceError(f"{self.node} has no directory: start() it first")
        return self.workdir

    @property
    def _pid_file(self) -> Path:
        return self._dir / "rabbitmq.pid"

    @property
    def _log_file(self) -> Path:
        return self._dir / "log" / f"{self.node}.log"

    def _prepare(self) -> None:
        workdir = _make_workdir(RABBITMQ_DIR_PREFIX)
        self.workdir = workdir
        for sub in ("home", "mnesia", "log", "conf.d"):
            (workdir / sub).mkdir()
        cookie = workdir / "home" / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        (workdir / "rabbitmq-env.conf").write_text("# empty: keeps /etc/rabbitmq/rabbitmq-env.conf out\n")
        (workdir / "enabled_plugins").write_text("[].\n")  # no management plugin: no port 15672
        (workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "loopback_users.guest = true\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        _chown_tree(workdir, self.user)

    def _base_env(self) -> dict[str, str]:
        """Our environment without RABBITMQ_*/ERL_* settings that could point a child elsewhere."""
        return {key: value for key, value in os.environ.items() if not key.startswith(("RABBITMQ_", "ERL_"))}

    def _common_env(self) -> dict[str, str]:
        workdir = self._dir
        return {
            "HOME": str(workdir / "home"),  # the private Erlang cookie
            "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
            # What the shared rabbitmq-env.conf would have given: epmd and distribution on loopback.
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _server_env(self) -> dict[str, str]:
        workdir = self._dir
        return {
            **self._common_env(),
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
            "RABBITMQ_CONFIG_FILES": str(workdir / "conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(workdir / "advanced.config"),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_PID_FILE": str(workdir / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
        }

    def _ctl_env(self) -> dict[str, str]:
        # Not the server's RABBITMQ_MNESIA_BASE: a rabbitmqctl VM must not look like our node in /proc.
        return self._common_env()

    def _find_pid(self) -> int | None:
        """The OS PID of this node's VM, found by its data directory in the process environment."""
        if self.workdir is None:
            return None
        for pid in _all_pids():
            if (
                _rabbitmq_workdir(pid) == self.workdir
                and pid_alive(pid)
                and _environ(pid).get("RABBITMQ_NODENAME") == self.node
            ):
                return pid
        return None

    def _reap(self, pid: int, timeout: float = 30.0) -> None:
        """Make sure ``pid`` (our VM) is dead, then wait for epmd and the ports to let go."""
        kill_and_wait([pid], timeout=timeout)
        self.pid = None
        with contextlib.suppress(FileNotFoundError):
            self._pid_file.unlink()
        self._wait_name_free(timeout=timeout)
        poll_until(
            lambda: not (port_is_listening(self.port) or port_is_listening(self.dist_port)),
            timeout=timeout,
            interval=0.1,
            what=f"ports {self.port}/{self.dist_port} to close",
        )

    def _wait_name_free(self, timeout: float) -> None:
        """Wait until epmd no longer lists our name (it drops it when the VM's socket closes)."""
        try:
            poll_until(
                lambda: self.short_name not in epmd_names(),
                timeout=timeout,
                interval=0.1,
                what=f"epmd to drop {self.short_name}",
            )
        except TimeoutError as exc:
            raise ServiceError(
                f"epmd still lists the node name {self.short_name} after {timeout:.0f}s: if no VM of "
                f"ours holds it, another node does (not ours to kill); choose another name"
            ) from exc

    def _diagnostics(self) -> str:
        if self.workdir is None:
            return "(no directory)"
        return (
            f"--- {self._dir / 'server-start.out'}\n{_tail(self._dir / 'server-start.out')}\n"
            f"--- {self._log_file}\n{_tail(self._log_file)}"
        )


class PrivateRabbitMQCluster(_PrivateService):
    """Several :class:`PrivateRabbitMQ` nodes joined into one cluster, each on ports of its own.

    The nodes share one Erlang cookie (in each node's private ``HOME``), which no other
    node on the machine has. The first node starts the cluster; each other one is reset and
    joined to it (``stop_app``, ``reset``, ``join_cluster``, ``start_app``), so every
    queue declared afterwards can have members on all of them: a quorum queue's initial
    group size defaults to every node of the cluster. A node killed with ``kill9`` comes
    back with ``start`` on its own data and rejoins by itself.
    """

    def __init__(self, size: int = 3, *, start_timeout: float = 180.0) -> None:
        if size < 1:
            raise ValueError("a cluster needs a node")
        cookie = secrets.token_hex(20).upper()
        stem = f"accessflow-fault-{secrets.token_hex(3)}"
        self.nodes = [
            PrivateRabbitMQ(name=f"{stem}-{i + 1}", cookie=cookie, start_timeout=start_timeout)
            for i in range(size)
        ]
        self.start_timeout = start_timeout

    @property
    def url(self) -> str:
        """Every node's AMQP URL, comma-separated, as ``ACCESSFLOW_BROKER_URL`` takes them."""
        return ",".join(node.url for node in self.nodes)

    @staticmethod
    def available() -> str | None:
        """Why this machine cannot run a private cluster, or None when it can."""
        return PrivateRabbitMQ.available()

    def start(self, timeout: float | None = None) -> None:
        """Start every node, then join the others to the first; wait until all run as one cluster."""
        timeout = timeout or self.start_timeout
        first, *others = self.nodes
        # The nodes boot side by side (each VM's boot is mostly waiting); they join one at a time.
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for started in [pool.submit(node.start, timeout) for node in self.nodes]:
                started.result()
        for node in others:
            node.stop_app()
            node.ctl("reset", timeout=60.0).check()
            node.ctl("join_cluster", first.node, timeout=120.0).check()
            node.start_app(timeout)
        self.wait_running(self.nodes, timeout)

    def running_nodes(self, via: PrivateRabbitMQ | None = None) -> set[str]:
        """The names of the nodes that ``via`` (default: any live node) sees running in its cluster."""
        for node in [via] if via is not None else self.live_nodes():
            result = node.ctl("cluster_status", "--formatter", "json", timeout=60.0)
            if result.returncode == 0:
                status = json.loads(result.output[result.output.index("{") :])
                return set(status.get("running_nodes", []))
        return set()

    def wait_running(self, nodes: Sequence[PrivateRabbitMQ], timeout: float) -> None:
        """Wait until every node of ``nodes`` is running in the cluster, as the others see it."""
        want = {node.node for node in nodes}
        poll_until(
            lambda: want <= self.running_nodes(),
            timeout=timeout,
            interval=0.5,
            what=f"{sorted(want)} to run as one cluster",
        )

    def live_nodes(self) -> list[PrivateRabbitMQ]:
        return [node for node in self.nodes if node._find_pid() is not None]

    def node(self, name: str) -> PrivateRabbitMQ:
        """The node called ``name`` (``short@host``)."""
        for node in self.nodes:
            if node.node == name:
                return node
        raise KeyError(name)

    def quorum_queues(self, vhost: str = "/") -> dict[str, QueueReplicas]:
        """Each quorum queue of ``vhost``: its leader, its members and which of them are online.

        Asked of a live node with ``rabbitmqctl list_queues``; empty if none answers.
        """
        for node in self.live_nodes():
            result = node.ctl(
                "list_queues", "-p", vhost, "name", "type", "leader", "members", "online",
                "--formatter", "json", timeout=60.0,
            )  # fmt: skip
            if result.returncode != 0:
                continue
            rows = json.loads(result.output[result.output.index("[") :])
            return {
                row["name"]: QueueReplicas(
                    leader=str(row.get("leader", "")),
                    members=tuple(str(m) for m in row.get("members") or ()),
                    online=tuple(str(m) for m in row.get("online") or ()),
                )
                for row in rows
                if row.get("type") == "quorum"
            }
        return {}

    def close(self) -> None:
        """Stop and remove every node, the joined ones first."""
        for node in reversed(self.nodes):
            node.close()


@dataclass(frozen=True)
class QueueReplicas:
    """Where a quorum queue lives: its leader node, its member nodes, and the members online."""

    leader: str
    members: tuple[str, ...]
    online: tuple[str, ...]


# --------------------------------------------------------------------------------------
# PostgreSQL


class PrivatePostgres(_PrivateService):
    """A PostgreSQL 15 cluster of our own that tests may crash and restart.

    ``initdb`` and ``pg_ctl`` refuse to run as root, so they run as ``postgres`` and the
    directory belongs to ``postgres``. Authentication is ``trust``; the server listens on
    127.0.0.1 only and keeps its unix socket inside the directory, away from
    /var/run/postgresql where the shared server's socket is. fsync stays on, so a
    crash (``restart_immediate``, ``kill9``) loses nothing that was committed.
    """

    user = "postgres"

    def __init__(
        self,
        port: int | None = None,
        *,
        start_timeout: float = 60.0,
        stop_timeout: float = 60.0,
    ) -> None:
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.workdir: Path | None = None

    # ---- public API

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def conninfo(self) -> str:
        """libpq connection string, for psycopg directly."""
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=5"

    @staticmethod
    def available() -> str | None:
        """Why this machine cannot run a private cluster, or None when it can."""
        for tool in ("initdb", "pg_ctl", "pg_isready", "postgres"):
            if not (POSTGRES_BIN / tool).exists():
                return f"{POSTGRES_BIN / tool} not found"
        if _is_root() and shutil.which("runuser") is None:
            return "runuser not found"
        return None

    @property
    def data_dir(self) -> Path:
        return self._dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self._dir / "sock"

    @property
    def log_file(self) -> Path:
        return self._dir / "postgres.log"

    def start(self, timeout: float | None = None) -> None:
        """Start the cluster (``initdb`` first the first time) and wait until it accepts connections."""
        timeout = timeout or self.start_timeout
        if self.workdir is None:
            with _REAP_AND_PREPARE:
                reap_stale_services()
                self._prepare()
        elif self.postmaster_pid() is not None:
            raise ServiceError(f"the cluster on port {self.port} is already running")
        else:
            self._clear_after_crash(timeout)
        if port_is_listening(self.port):
            raise ServiceError(f"port {self.port} on 127.0.0.1 is taken; cannot start PostgreSQL")
        self._pg_ctl("start", timeout=timeout)
        self.wait_ready(timeout)

    def restart_immediate(self, timeout: float | None = None) -> None:
        """Crash and restart: ``pg_ctl restart -m immediate``, so the server recovers from WAL.

        Every open connection is cut off without a goodbye.
        """
        timeout = timeout or self.start_timeout
        self._pg_ctl("restart", "-m", "immediate", timeout=timeout)
        self.wait_ready(timeout)

    def stop(self, mode: str = "fast", timeout: float | None = None) -> None:
        """``pg_ctl stop -m fast|immediate|smart`` and wait until the server is down."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"unknown shutdown mode {mode!r}")
        if self.postmaster_pid() is None:
            return
        self._pg_ctl("stop", "-m", mode, timeout=timeout or self.stop_timeout)

    def kill9(self, timeout: float = 30.0) -> None:
        """SIGKILL the postmaster and wait for its children to go.

        The children notice the postmaster's death and exit by themselves; those that do
        not within ``timeout`` are killed too, since a backend still attached to the old
        shared memory would make the next start refuse to run.
        """
        pid = self.postmaster_pid()
        if pid is None:
            raise ServiceError(f"the cluster on port {self.port} is not running")
        children = _children(pid)
        kill_and_wait([pid], timeout=timeout)
        try:
            poll_until(
                lambda: not any(pid_alive(child) for child in children),
                timeout=timeout,
                interval=0.1,
                what="the postmaster's children to exit",
            )
        except TimeoutError:
            kill_and_wait(children, timeout=timeout)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll ``pg_isready`` until the server accepts connections."""
        timeout = timeout or self.start_timeout
        argv = [str(POSTGRES_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]
        argv += ["-d", "postgres", "-t", "2"]

        def ready() -> bool:
            return run_command(argv, timeout=10.0, env=self._base_env()).returncode == 0

        try:
            poll_until(ready, timeout=timeout, interval=0.1, what=f"PostgreSQL on port {self.port}")
        except TimeoutError as exc:
            raise ServiceError(f"{exc}\n--- {self.log_file}\n{_tail(self.log_file)}") from exc

    def postmaster_pid(self) -> int | None:
        """The running postmaster's PID (from ``postmaster.pid``, checked against /proc), or None."""
        if self.workdir is None:
            return None
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        # After a kill -9 the file stays behind and its PID may be reused: check it is ours.
        return pid if pid_alive(pid) and _postgres_workdir(pid) == self.workdir else None

    def close(self) -> None:
        """Stop the cluster (killing it if need be) and remove its directory."""
        if self.workdir is None:
            return
        try:
            self.stop("fast")
        except (ServiceError, TimeoutError):
            log.exception("stopping PostgreSQL on port %d failed; killing it", self.port)
            if self.postmaster_pid() is not None:
                self.kill9()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    # ---- internals

    @property
    def _dir(self) -> Path:
        if self.workdir is None:
            raise ServiceError("the cluster has no directory: start() it first")
        return self.workdir

    def _base_env(self) -> dict[str, str]:
        """Our environment without PG* settings (PGHOST, PGPORT, ...) that would redirect the tools."""
        return {key: value for key, value in os.environ.items() if not key.startswith("PG")}

    def _prepare(self) -> None:
        workdir = _make_workdir(POSTGRES_DIR_PREFIX)
        self.workdir = workdir
        (workdir / "sock").mkdir()
        _chown_tree(workdir, self.user)
        argv = [str(POSTGRES_BIN / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust"]
        # --no-sync: only initdb's own files skip fsync; the server keeps fsync on.
        argv += ["-E", "UTF8", "--locale=C", "--no-sync"]
        run_command(_as_user(self.user, argv, {}), timeout=120.0, env=self._base_env(), cwd=workdir).check()

    def _processes_in_data_dir(self) -> list[int]:
        """Live processes (postmaster and backends) whose working directory is our data directory."""
        found = []
        for pid in _all_pids():
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            if Path(cwd.removesuffix(" (deleted)")) == self.data_dir and pid_alive(pid):
                found.append(pid)
        return found

    def _clear_after_crash(self, timeout: float) -> None:
        """Get a killed cluster ready to start: its processes gone, its stale lock file removed.

        After a SIGKILL the postmaster stays a zombie until init reaps it (about 2 s on this
        machine's init), and PostgreSQL, which probes the PID in ``postmaster.pid`` and in the
        socket's lock file with ``kill(pid, 0)``, takes a zombie for a running server and
        refuses to start. Once no process of ours is alive in the data directory, those
        files are stale for certain.
        """
        lock = self.data_dir / "postmaster.pid"
        if not lock.exists():
            return
        poll_until(
            lambda: not self._processes_in_data_dir(),
            timeout=timeout,
            interval=0.1,
            what="the killed cluster's processes to exit",
        )
        # The socket's lock file names the dead PID too, and is checked the same way.
        socket_file = self.socket_dir / f".s.PGSQL.{self.port}"
        for stale in (lock, socket_file.with_name(f"{socket_file.name}.lock"), socket_file):
            if stale.exists():
                log.info("removing %s left by a killed postmaster", stale)
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()

    def _pg_ctl(self, action: str, *args: str, timeout: float) -> None:
        # -l on every action that starts a server: without it the postmaster writes to our stdout.
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
        argv = [str(POSTGRES_BIN / "pg_ctl"), action, "-D", str(self.data_dir), "-l", str(self.log_file)]
        argv += ["-w", "-t", str(max(1, int(timeout))), "-o", options, *args]
        result = run_command(
            _as_user(self.user, argv, {}), timeout=timeout + 30.0, env=self._base_env(), cwd=self._dir
        )
        if result.returncode != 0:
            raise ServiceError(
                f"{shlex.join(result.argv)} exited with {result.returncode}:\n{result.output.strip()}\n"
                f"--- {self.log_file}\n{_tail(self.log_file)}"
            )
