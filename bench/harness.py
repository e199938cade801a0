"""One bench run: the world, then each phase (floor, burst, latency, scaling, soak), then the teardown.

See bench/README.md for what each figure means and how it is measured.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr

from bench import procfs, stats
from bench.parties import DecisionStream, PortalEvents, Requests, portal_publisher, submissions
from bench.tracking import Arrivals, HarnessError, wait_for
from bench.world import (
    ADMIN_EMAIL,
    ADMIN_ID,
    ADMIN_KEY_ID,
    CATALOGUE,
    PORTAL_ID,
    ROOT,
    BenchPostgres,
    Database,
    Pool,
    PoolSpec,
    SmtpSink,
    Vhost,
    accessflow_argv,
    cli,
    create_vhost,
    current_rss_mib,
    delete_vhost,
    floor_argv,
    peak_rss_mib,
    rabbitmq_status,
    settings_env,
    start_pool,
    start_smtp_sink,
    stop_pools,
    wait_ready,
)
from infra.credentials import signing
from infra.credentials.sealing import generate_portal_keypair, generate_seal_key
from infra.messaging.broker_admin import Rabbitmqctl
from infra.settings import Settings

#: The queues accessflow's workers serve, and those of the floor's three hops.
PRODUCT_QUEUES = ("requests", "decisions", "credentials", "notifications")
FLOOR_QUEUES = ("requests", "credentials", "notifications")
#: Process kinds whose CPU is charged to the requests.
CHARGED = ("workers", "rabbitmq", "postgresql", "smtp")
#: Seconds a pool may take to have a consumer on each of its queues.
READY_TIMEOUT = 120.0
#: Unconfirmed submissions the burst publisher keeps in flight.
BURST_WINDOW = 1000
#: Requests sent through fresh pools, unmeasured, before the latency runs.
WARM_UP = 50
#: Requests per batch of the soak run.
SOAK_BATCH = 5000


@dataclass
class Options:
    requests: int = 10_000
    manual_share: float = 0.2
    pools: list[PoolSpec] = field(default_factory=lambda: [PoolSpec(PRODUCT_QUEUES, 2, 8)])
    floor_pool: PoolSpec | None = None
    latency_shares: list[float] = field(default_factory=lambda: [0.5, 0.8])
    latency_seconds: float = 20.0
    latency_max_requests: int = 1000
    scaling: list[tuple[int, int]] = field(default_factory=lambda: [(1, 8), (2, 8), (1, 1), (1, 4)])
    scaling_requests: int = 2000
    scaling_seconds: float = 30.0
    soak: int | None = None
    stall_timeout: float = 120.0
    phase_timeout: float = 3600.0
    results_dir: Path = ROOT / "bench" / "results"
    keep_logs: bool = False
    smoke: bool = False
    amqp_host: str = "127.0.0.1"
    amqp_port: int = 5672

    def floor_spec(self) -> PoolSpec:
        if self.floor_pool is not None:
            return PoolSpec(FLOOR_QUEUES, self.floor_pool.processes, self.floor_pool.threads)
        processes = sum(pool.processes for pool in self.pools)
        threads = max(pool.threads for pool in self.pools)
        return PoolSpec(FLOOR_QUEUES, processes, threads)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Bench:
    """A run. :meth:`run` returns the JSON document; the caller prints and saves it."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.started = time.monotonic()
        self.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.workdir = Path(tempfile.mkdtemp(prefix="accessflow-bench-"))
        (self.workdir / "logs").mkdir()
        self.ctl = Rabbitmqctl()
        self.tag = uuid.uuid4().hex[:8]
        self.result: dict[str, Any] = {"problems": []}
        self.pools: list[Pool] = []
        self.beam_pid = 0
        self.postgres: BenchPostgres | None = None
        self.database: Database | None = None
        self.sink: SmtpSink | None = None
        self.mail: Arrivals | None = None
        self.floor_done: Arrivals = Arrivals(self.workdir / "floor-done.log")
        self.product: Vhost | None = None
        self.floor: Vhost | None = None
        self.product_settings: Settings | None = None
        self.floor_settings: Settings | None = None
        self.admin_key: Ed25519PrivateKey | None = None
        self.events: PortalEvents | None = None
        self.decisions: DecisionStream | None = None
        self.log_files: list[Path] = []
        self.floor_log_files: list[Path] = []

    # ---- the run

    def run(self) -> dict[str, Any]:
        o = self.options
        self.result.update(self._context())
        try:
            with contextlib.ExitStack() as cleanup:
                self._set_up(cleanup)
                cleanup.callback(self._stop_pools)  # runs first: pools go before what they stand on
                self._phase("floor", self.floor_burst)
                self._phase("burst", self.product_burst)
                self._phase("latency", self.latency)
                self._phase("scaling", self.scaling)
                if o.soak:
                    self._phase("soak", self.soak)
        except HarnessError as error:
            self.result["error"] = str(error)
        except Exception as error:  # a bug of the harness: keep what was measured, and say what broke
            self.result["error"] = f"{type(error).__name__}: {error}"
            self.result["traceback"] = traceback.format_exc()
        finally:
            self.result["worker_logs"] = scan_logs(self.log_files)
            self.result["floor_logs"] = scan_logs(self.floor_log_files)
            if git_state()["fingerprint"] != self.result["git"]["fingerprint"]:
                self.result["problems"].append(
                    "the tree changed during the run (uncommitted edits): later phases ran other code"
                )
            self.result["machine"]["load_average_end"] = list(os.getloadavg())
            self.result["duration_seconds"] = round(time.monotonic() - self.started, 1)
            keep = (
                o.keep_logs
                or "error" in self.result
                or self.result["worker_logs"]["errors"]
                or self.result["floor_logs"]["errors"]
            )
            if keep:
                self.result["workdir"] = str(self.workdir)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return self.result

    def _phase(self, name: str, body: Callable[[], None]) -> None:
        log(f"{name}: start")
        self.result["machine"].setdefault("load_average_by_phase", {})[name] = list(os.getloadavg())
        started = time.monotonic()
        body()
        self.result.setdefault("phase_seconds", {})[name] = round(time.monotonic() - started, 1)
        log(f"{name}: done in {time.monotonic() - started:.0f}s")

    def _context(self) -> dict[str, Any]:
        return {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "argv": sys.argv[1:],
            "options": {
                "requests": self.options.requests,
                "manual_share": self.options.manual_share,
                "pools": [pool.label() for pool in self.options.pools],
                "floor_pool": self.options.floor_spec().label(),
                "latency_shares": self.options.latency_shares,
                "latency_seconds": self.options.latency_seconds,
                "latency_max_requests": self.options.latency_max_requests,
                "scaling": [f"{p}x{t}" for p, t in self.options.scaling],
                "scaling_requests": self.options.scaling_requests,
                "soak": self.options.soak,
                "smoke": self.options.smoke,
            },
            "machine": {
                "cores": os.cpu_count(),
                "cores_usable": len(os.sched_getaffinity(0)),
                "cpu_model": cpu_model(),
                "kernel": platform.release(),
                "load_average_start": list(os.getloadavg()),
            },
            "git": git_state(),
            "versions": {
                "python": platform.python_version(),
                **{name: package_version(name) for name in ("dramatiq", "pika", "SQLAlchemy", "psycopg")},
            },
        }

    # ---- the world

    def _set_up(self, cleanup: contextlib.ExitStack) -> None:
        log(f"work directory {self.workdir}")
        status = rabbitmq_status(self.ctl)
        self.beam_pid = int(status["pid"])
        self.result["versions"]["rabbitmq"] = status.get("rabbitmq_version")
        self.result["versions"]["erlang"] = str(status.get("erlang_version", "")).split(" [")[0]
        self.result["machine"]["rabbitmq_background_cpu_percent"] = self._rabbitmq_background()

        log("private PostgreSQL with pg_stat_statements")
        self.postgres = BenchPostgres()
        cleanup.callback(self.postgres.close)
        self.postgres.start()
        self.database = Database(self.postgres)
        self.database.create()
        self.result["versions"]["postgresql"] = self.database.server_version()

        self.sink = start_smtp_sink(self.workdir)
        cleanup.callback(self.sink.stop)
        self.mail = Arrivals(self.sink.out)

        base = Settings.model_construct()
        log("vhosts and users on RabbitMQ")
        self.floor = create_vhost(
            self.ctl, f"afbench-{self.tag}-floor", base, self.o.amqp_host, self.o.amqp_port
        )
        cleanup.callback(self._delete_vhost, self.floor)
        self.product = create_vhost(self.ctl, f"afbench-{self.tag}", base, self.o.amqp_host, self.o.amqp_port)
        cleanup.callback(self._delete_vhost, self.product)

        self.floor_settings = Settings(
            broker_url=self.floor.url(self.floor.accounts.workers),
            queue_prefix=self.floor.prefix,
            broker_internal_users=[self.floor.accounts.workers, self.floor.accounts.ops],
        )
        self.product_settings = Settings(
            database_url=self.database.url,
            broker_url=self.product.url(self.product.accounts.workers),
            queue_prefix=self.product.prefix,
            smtp_host="127.0.0.1",
            smtp_port=self.sink.port,
            seal_key=SecretStr(generate_seal_key()),
            admin_emails=[ADMIN_EMAIL],
            broker_internal_users=[self.product.accounts.workers, self.product.accounts.ops],
        )
        self._register_parties()

        pending: queue.Queue[str] = queue.Queue()
        assert self.admin_key is not None
        self.events = PortalEvents(self.product, pending)
        self.decisions = DecisionStream(self.product, self.admin_key, pending)
        self.events.start()
        self.decisions.start()
        cleanup.callback(self.decisions.stop)
        cleanup.callback(self.events.stop)

    def _rabbitmq_background(self, seconds: float = 3.0) -> float:
        """The shared node's CPU use before the bench sends anything (other users' traffic), in % of a core."""
        meter = procfs.CpuMeter({"rabbitmq": lambda: [self.beam_pid]})
        meter.start()
        time.sleep(seconds)  # the measured interval itself
        used = meter.stop()["rabbitmq"]
        return round(100 * used / (meter.stopped_at - meter.started_at), 1)

    @property
    def o(self) -> Options:
        return self.options

    def _register_parties(self) -> None:
        """Migrate, load the catalogue, register the portal and the admin: with the CLI, as an operator."""
        assert self.product_settings is not None and self.product is not None
        log("database: migrate, catalogue, portal, admin")
        env = settings_env(self.product_settings)
        cli(env, "db", "upgrade")
        cli(env, "catalog", "load", str(CATALOGUE))
        _, portal_public = generate_portal_keypair()
        cli(
            env, "portals", "add", PORTAL_ID, "--name", "Bench Portal",
            "--broker-user", self.product.portal_user, "--public-key", portal_public,
            "--url", "https://portal.bench.example", "--consumer", "acme",
        )  # fmt: skip
        key_file = self.workdir / "admin.pem"
        public = signing.generate_keypair(key_file)
        self.admin_key = signing.load_private_key(key_file)
        cli(env, "admins", "add", ADMIN_ID, "--email", ADMIN_EMAIL)
        cli(env, "admins", "keys", "add", ADMIN_ID, "--key-id", ADMIN_KEY_ID, "--public-key", public)

    def _delete_vhost(self, vhost: Vhost) -> None:
        failed = delete_vhost(self.ctl, vhost)
        if failed:
            self.result["problems"].append("cleanup: " + "; ".join(failed))

    # ---- pools

    def _start_product_pools(self, specs: Sequence[PoolSpec], phase: str) -> list[Pool]:
        assert self.product_settings is not None and self.product is not None
        env = settings_env(self.product_settings)
        cli(env, "db", "upgrade")  # as before any rollout: a no-op unless the tree gained a migration
        pools = []
        for index, spec in enumerate(specs):
            path = self.workdir / "logs" / f"{phase}-pool{index}.log"
            self.log_files.append(path)
            pools.append(start_pool(accessflow_argv(spec), spec, env, path))
            self.pools.append(pools[-1])
        wait_ready(pools, self.product, timeout=READY_TIMEOUT)
        return pools

    def _start_floor_pool(self, phase: str) -> list[Pool]:
        assert self.floor_settings is not None and self.floor is not None
        env = {**settings_env(self.floor_settings), "BENCH_DONE_FILE": str(self.floor_done.path)}
        spec = self.o.floor_spec()
        path = self.workdir / "logs" / f"{phase}-floor.log"
        self.floor_log_files.append(path)
        pool = start_pool(floor_argv(spec, self.floor.prefix), spec, env, path)
        self.pools.append(pool)
        wait_ready([pool], self.floor, timeout=READY_TIMEOUT)
        return [pool]

    def _stop_pools(self, pools: Iterable[Pool] | None = None) -> None:
        chosen = list(self.pools if pools is None else pools)
        stop_pools(chosen)
        self.pools = [pool for pool in self.pools if pool not in chosen]

    def _check(self, pools: Sequence[Pool]) -> Callable[[], None]:
        def check() -> None:
            for pool in pools:
                pool.check_alive()
            if self.sink is not None:
                self.sink.check_alive()
            for party in (self.events, self.decisions):
                if party is not None and party.error is not None:
                    raise HarnessError(f"{party.name} failed: {party.error!r}")

        return check

    def _meter(self, pools: Sequence[Pool], *, floor: bool) -> procfs.CpuMeter:
        """CPU of the pools, RabbitMQ, and (not for the floor, which uses neither) PostgreSQL and the sink."""

        def postmaster() -> list[int]:
            pid = self.postgres.postmaster_pid() if self.postgres else None
            return [pid] if pid else []

        roots: procfs.Roots = {
            "workers": lambda: [pool.process.pid for pool in pools],
            "rabbitmq": lambda: [self.beam_pid],
        }
        if not floor:
            roots = {
                **roots,
                "postgresql": postmaster,
                "smtp": lambda: [self.sink.process.pid] if self.sink else [],
            }
        return procfs.CpuMeter(roots)

    # ---- one burst, of the floor or of accessflow

    def _burst(
        self,
        vhost: Vhost,
        requests: Requests,
        pools: Sequence[Pool],
        *,
        arrivals: Arrivals,
        kind: str,
        what: str,
    ) -> dict[str, Any]:
        """Publish ``requests`` as fast as confirms allow while ``pools`` run; wait until all are done."""
        meter = self._meter(pools, floor=vhost is self.floor)
        cpu_before = time.process_time()
        meter.start()
        published = portal_publisher(vhost).publish(
            requests.messages, window=BURST_WINDOW, timeout=self.o.phase_timeout
        )
        done = wait_for(
            arrivals,
            kind,
            requests.ids,
            what=what,
            stall_timeout=self.o.stall_timeout,
            deadline=time.monotonic() + self.o.phase_timeout,
            check=self._check(pools),
        )
        cpu = meter.stop()
        harness_cpu = time.process_time() - cpu_before
        count = len(requests.ids)
        first, last = published.sent_at[0], max(done.values())
        rate = stats.throughput(count, first, last)
        cpu_ms = {name: seconds * 1000 / count for name, seconds in cpu.items()}
        cpu_ms["all"] = sum(cpu_ms.get(name, 0.0) for name in CHARGED)
        return {
            "requests": count,
            "auto": len(requests.auto_ids),
            "manual": len(requests.manual_ids),
            "seconds": round(last - first, 3),
            "requests_per_s": rate,
            "publish": {
                "mode": f"while the workers run; publisher confirms, {BURST_WINDOW} in flight",
                "seconds": round(published.seconds, 3),
            },
            "pools": [pool.spec.label() for pool in pools],
            "cpu_ms_per_request": cpu_ms,
            "harness_cpu_ms_per_request": harness_cpu * 1000 / count,
            "peak_rss_mib": peak_rss_mib(pools),
        }

    def floor_burst(self) -> None:
        assert self.floor is not None
        pools = self._start_floor_pool("floor")
        try:
            requests = submissions(self.floor.prefix, self.o.requests, 0.0)
            result = self._burst(
                self.floor, requests, pools, arrivals=self.floor_done, kind="done", what="floor burst"
            )
        finally:
            self._stop_pools(pools)
        result["msg_per_s"] = result["requests_per_s"] * 3
        self.result["floor"] = result
        log(f"floor: {result['msg_per_s']:.0f} msg/s, {result['requests_per_s']:.0f} requests/s")

    def product_burst(self) -> None:
        assert self.product is not None and self.database is not None and self.mail is not None
        self.database.wait_idle()
        xacts_before = self.database.transactions()
        pools = self._start_product_pools(self.o.pools, "burst")
        try:
            requests = submissions(self.product.prefix, self.o.requests, self.o.manual_share)
            self.database.reset_statements()
            events_before = Counter(self.events.counts) if self.events else Counter()
            result = self._burst(
                self.product, requests, pools, arrivals=self.mail, kind="approve", what="accessflow burst"
            )
            statements = self.database.statements()
        finally:
            self._stop_pools(pools)
        count = len(requests.ids)
        self.database.wait_idle()
        result["transactions_per_request"] = (self.database.transactions() - xacts_before) / count
        total_calls = sum(s.calls for s in statements)
        control = sum(s.calls for s in statements if is_transaction_control(s.query))
        result["statements_per_request"] = total_calls / count
        result["statements_per_request_without_begin_commit"] = (total_calls - control) / count
        result["top_statements"] = [
            {"calls_per_request": s.calls / count, "query": " ".join(s.query.split())[:300]}
            for s in statements[:15]
        ]
        if self.events is not None:
            events = Counter(self.events.counts)
            events.subtract(events_before)
            result["portal_events_per_request"] = {k: v / count for k, v in sorted(events.items()) if v}
        self._verify(requests, "burst")
        self.result["burst"] = result
        floor = self.result.get("floor", {}).get("requests_per_s")
        log(
            f"burst: {result['requests_per_s']:.1f} requests/s ({fmt_ratio(stats.ratio(result['requests_per_s'], floor))} of the floor)"
        )

    def _verify(self, requests: Requests, phase: str) -> None:
        """Every request has its credentials row (the emails were counted by the sink)."""
        assert self.database is not None
        with self.database.connect() as connection:
            stored = 0
            for chunk in chunks(requests.ids, 2000):
                row = connection.execute(
                    "SELECT count(*) FROM credentials WHERE request_id = ANY(%s)", (chunk,)
                ).fetchone()
                stored += int(row[0]) if row else 0
        if stored != len(requests.ids):
            self.result["problems"].append(
                f"{phase}: {len(requests.ids)} approve emails received but {stored} credentials stored"
            )

    # ---- latency

    def latency(self) -> None:
        burst = self.result.get("burst")
        if not burst:
            raise HarnessError("no burst rate to take the latency rates from")
        runs: list[dict[str, Any]] = []
        rates = [(share, burst["requests_per_s"] * share) for share in self.o.latency_shares]
        assert self.product is not None and self.floor is not None and self.mail is not None
        pools = self._start_product_pools(self.o.pools, "latency")
        try:
            self._warm_up(self.product, pools, self.mail, "approve")
            for share, rate in rates:
                count = stats.latency_count(rate, self.o.latency_seconds, self.o.latency_max_requests)
                log(
                    f"latency: accessflow at {rate:.1f} requests/s ({share:.0%} of the burst), {count} requests"
                )
                requests = submissions(self.product.prefix, count, self.o.manual_share)
                run = self._open_loop(
                    self.product, requests, pools, rate, self.mail, "approve", "accessflow latency"
                )
                run["share_of_burst"] = share
                runs.append(run)
        finally:
            self._stop_pools(pools)
        pools = self._start_floor_pool("latency")
        try:
            self._warm_up(self.floor, pools, self.floor_done, "done")
            for run in runs:
                rate = run["rate"]
                count = run["requests"]
                log(f"latency: floor at {rate:.1f} requests/s, {count} requests")
                requests = submissions(self.floor.prefix, count, 0.0)
                run["floor"] = self._open_loop(
                    self.floor, requests, pools, rate, self.floor_done, "done", "floor latency"
                )
        finally:
            self._stop_pools(pools)
        self.result["latency"] = runs

    def _warm_up(self, vhost: Vhost, pools: Sequence[Pool], arrivals: Arrivals, kind: str) -> None:
        """A few requests through fresh pools, unmeasured: connections and caches are made before the clock runs."""
        share = self.o.manual_share if vhost is self.product else 0.0
        requests = submissions(vhost.prefix, WARM_UP, share)
        portal_publisher(vhost).publish(requests.messages, window=BURST_WINDOW, timeout=self.o.phase_timeout)
        wait_for(
            arrivals,
            kind,
            requests.ids,
            what="warm-up",
            stall_timeout=self.o.stall_timeout,
            deadline=time.monotonic() + self.o.phase_timeout,
            check=self._check(pools),
        )

    def _open_loop(
        self,
        vhost: Vhost,
        requests: Requests,
        pools: Sequence[Pool],
        rate: float,
        arrivals: Arrivals,
        kind: str,
        what: str,
    ) -> dict[str, Any]:
        schedule = stats.open_loop_schedule(rate, len(requests.ids), start=time.monotonic() + 0.5)
        published = portal_publisher(vhost).publish(
            requests.messages, schedule=schedule, window=None, timeout=self.o.phase_timeout
        )
        done = wait_for(
            arrivals,
            kind,
            requests.ids,
            what=what,
            stall_timeout=self.o.stall_timeout,
            deadline=time.monotonic() + self.o.phase_timeout,
            check=self._check(pools),
        )
        due = dict(zip(requests.ids, schedule, strict=True))
        auto = stats.summarize_ms([done[i] - due[i] for i in requests.auto_ids])
        run: dict[str, Any] = {
            "rate": rate,
            "requests": len(requests.ids),
            "measured": "auto-approve requests, from their scheduled send time to the approve email"
            if kind == "approve"
            else "from the scheduled send time to the last hop",
            **{k: v for k, v in auto.__dict__.items()},
            "publisher_late_ms_max": published.lateness(schedule) * 1000,
        }
        if requests.manual_ids and self.mail is not None:
            reviews = self.mail.times("review")
            run["manual_to_review_email"] = stats.summarize_ms(
                [reviews[i] - due[i] for i in requests.manual_ids if i in reviews]
            ).__dict__
        return run

    # ---- scaling

    def scaling(self) -> None:
        burst = self.result.get("burst")
        if not burst or self.product is None or self.mail is None:
            raise HarnessError("no burst to size the scaling runs from")
        count = min(
            self.o.scaling_requests, max(200, round(burst["requests_per_s"] * self.o.scaling_seconds))
        )
        runs = []
        for processes, threads in dict.fromkeys(self.o.scaling):
            spec = PoolSpec(PRODUCT_QUEUES, processes, threads)
            log(f"scaling: {processes} process(es) x {threads} thread(s), {count} requests")
            pools = self._start_product_pools([spec], f"scaling-{processes}x{threads}")
            try:
                requests = submissions(self.product.prefix, count, self.o.manual_share)
                result = self._burst(
                    self.product,
                    requests,
                    pools,
                    arrivals=self.mail,
                    kind="approve",
                    what=f"scaling {processes}x{threads}",
                )
            finally:
                self._stop_pools(pools)
            runs.append(
                {
                    "processes": processes,
                    "threads": threads,
                    "requests": count,
                    "requests_per_s": result["requests_per_s"],
                    "cpu_ms_per_request": result["cpu_ms_per_request"]["all"],
                }
            )
            log(f"scaling: {processes}x{threads}: {result['requests_per_s']:.1f} requests/s")
        self.result["scaling"] = runs

    # ---- soak

    def soak(self) -> None:
        assert self.o.soak and self.product is not None and self.mail is not None
        pools = self._start_product_pools(self.o.pools, "soak")
        samples: list[dict[str, float]] = []
        try:
            done = 0
            while done < self.o.soak:
                size = min(SOAK_BATCH, self.o.soak - done)
                requests = submissions(self.product.prefix, size, self.o.manual_share)
                self._burst(self.product, requests, pools, arrivals=self.mail, kind="approve", what="soak")
                done += size
                samples.append({"requests_done": done, **current_rss_mib(pools)})
                log(f"soak: {done}/{self.o.soak}, worker RSS {samples[-1]['sum']:.0f} MiB")
            peak = peak_rss_mib(pools)
        finally:
            self._stop_pools(pools)
        first, last = samples[0], samples[-1]
        self.result["soak"] = {
            "requests": self.o.soak,
            "rss_samples_mib": samples,
            "growth_mib_sum": last["sum"] - first["sum"],
            "growth_mib_max_process": last["max_process"] - first["max_process"],
            "peak_rss_mib": peak,
        }


# --------------------------------------------------------------------------------------
# Helpers


def chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def is_transaction_control(query: str) -> bool:
    word = query.lstrip().split(None, 1)[0].upper() if query.strip() else ""
    return word in {"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "START"}


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}x"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return None


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout if done.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()]
    fingerprint = hashlib.sha256(git("rev-parse", "HEAD").encode() + git("diff", "HEAD").encode())
    for name in sorted(git("ls-files", "--others", "--exclude-standard").splitlines()):
        with contextlib.suppress(OSError):
            fingerprint.update(name.encode() + (ROOT / name).read_bytes())
    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "dirty": bool(changed),
        "changed": changed[:50],
        #: Of the commit, the changes and the untracked files: another at the end means the code changed mid-run.
        "fingerprint": fingerprint.hexdigest()[:16],
    }


def event_key(event: str) -> str:
    """An event name to count by: its text before the first bracket (where a message's arguments begin)."""
    head = re.split(r"[({\[]", event, maxsplit=1)[0].strip(" :")
    return (head or event)[:100]


def scan_logs(paths: Iterable[Path]) -> dict[str, Any]:
    """Errors and warnings in the pools' logs (structlog JSON lines, or dramatiq's own), by event and cause."""
    errors: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    warnings: Counter[str] = Counter()
    samples: list[str] = []
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            level, event, cause = "", "", ""
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = {}
                level, event = str(record.get("level", "")), str(record.get("event", ""))
                exception = str(record.get("exception") or "").strip()
                cause = exception.splitlines()[-1][:200] if exception else ""
            elif "Traceback" in line or "[ERROR]" in line or "[CRITICAL]" in line:
                level, event = "error", line.strip()
            elif "[WARNING]" in line:
                level, event = "warning", line.strip()
            if level in ("error", "critical", "exception"):
                errors[event_key(event)] += 1
                if cause:
                    causes[cause] += 1
                if len(samples) < 5:
                    samples.append(f"{event[:200]}{' | ' + cause if cause else ''}")
            elif level == "warning":
                warnings[event_key(event)] += 1
    return {
        "errors": sum(errors.values()),
        "warnings": sum(warnings.values()),
        "error_events": dict(errors.most_common(10)),
        "error_causes": dict(causes.most_common(10)),
        "warning_events": dict(warnings.most_common(10)),
        "error_samples": samples,
    }


def save(result: dict[str, Any], directory: Path, stamp: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path
