"""The HTTP endpoint of a worker pool and of ``accessflow metrics``: ``/metrics``, ``/healthz/live``, ``/healthz/ready``.

A pool's endpoint runs in a process of its own that dramatiq forks beside the worker
processes (:func:`serve_pool`, a middleware ``fork`` like dramatiq's own Prometheus
exposition server), so that it answers while every worker thread is busy, and it stops
with the pool. It sums the worker processes' multiprocess files and judges their heartbeat
reports (:mod:`infra.observability.health`). Both health paths answer 200 or 503 with a
JSON body that says why.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from infra.db.engine import create_engine
from infra.observability import health
from infra.observability.metrics import StateCollector
from infra.settings import Settings

log = structlog.get_logger()

#: The paths, as probes and scrapers are configured with them.
METRICS_PATH = "/metrics"
LIVE_PATH = "/healthz/live"
READY_PATH = "/healthz/ready"


@dataclass(frozen=True)
class Endpoint:
    """What the three paths answer."""

    registry: CollectorRegistry
    live: Callable[[], health.Verdict]
    ready: Callable[[], health.Verdict]


def make_server(endpoint: Endpoint, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server for ``endpoint`` on ``host:port``, bound but not yet serving."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == METRICS_PATH:
                self._answer(200, generate_latest(endpoint.registry), CONTENT_TYPE_LATEST)
            elif path in (LIVE_PATH, READY_PATH):
                verdict = endpoint.live() if path == LIVE_PATH else endpoint.ready()
                self._answer(200 if verdict.ok else 503, verdict.as_json(), "application/json")
            else:
                self._answer(404, b"not found\n", "text/plain")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # a probe every few seconds is not worth a log line

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def pool_endpoint(settings: Settings, pool_dir: Path) -> Endpoint:
    """A worker pool's endpoint: its processes' message series, and their heartbeats judged."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(pool_dir))  # type: ignore[no-untyped-call]

    def live() -> health.Verdict:
        return health.liveness(
            health.read_reports(pool_dir), now=time.time(), stuck_after=settings.health_stuck_seconds
        )

    def ready() -> health.Verdict:
        return health.readiness(
            health.read_reports(pool_dir),
            now=time.time(),
            expected=health.expected_processes(pool_dir),
            stuck_after=settings.health_stuck_seconds,
        )

    return Endpoint(registry, live, ready)


def serve_pool() -> int:
    """Serve a pool's endpoint until dramatiq stops the pool; dramatiq runs it as a forked process."""
    settings = Settings()
    server = make_server(
        pool_endpoint(settings, Path(settings.metrics_dir)), settings.metrics_host, settings.metrics_port
    )
    log.info(
        "metrics.serving", host=settings.metrics_host, port=settings.metrics_port, dir=settings.metrics_dir
    )
    try:
        server.serve_forever()
    finally:  # dramatiq's SIGTERM handler raises SystemExit here
        server.server_close()
    return 0


def collector_endpoint(collector: StateCollector) -> Endpoint:
    """``accessflow metrics``' endpoint: the state series; ready while the database and broker answer."""
    registry = CollectorRegistry()
    registry.register(collector)

    def live() -> health.Verdict:
        return health.Verdict(True, [], 1)

    def ready() -> health.Verdict:
        snapshot = collector.refresh()
        reasons = [
            f"{name} unreachable"
            for name, up in (("database", snapshot.database_up), ("broker", snapshot.broker_up))
            if not up
        ]
        return health.Verdict(not reasons, reasons, 1)

    return Endpoint(registry, live, ready)


def run_collector(settings: Settings) -> None:
    """Serve the state series on ``ACCESSFLOW_METRICS_PORT`` until SIGTERM or SIGINT."""
    engine = create_engine(settings)
    collector = StateCollector(
        engine, settings.broker_url, settings.queue_prefix, refresh_seconds=settings.metrics_refresh_seconds
    )
    server = make_server(collector_endpoint(collector), settings.metrics_host, settings.metrics_port)
    stop = threading.Event()

    def handle(signum: int, _: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    log.info("metrics.collector_serving", host=settings.metrics_host, port=settings.metrics_port)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        engine.dispose()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        log.info("metrics.collector_stopped")
