"""Metrics and health: what a worker pool and the collector tell Prometheus and the orchestrator.

A room of its own because it belongs to no single adapter: the series read the database
(requests, outbox, emails) and the broker (queue depths, consumers), the heartbeats watch
dramatiq's threads, and the HTTP endpoint serves them all. It is read by nothing else:
:mod:`infra.messaging` writes into it (its middleware count messages and report heartbeats),
:mod:`infra.bootstrap` and the CLI start it.

- :mod:`infra.observability.metrics`: every exported series, by name; the per-process
  message series and the collector of the database and queue series;
- :mod:`infra.observability.health`: the heartbeat reports of worker processes, and the
  liveness and readiness verdicts drawn from them;
- :mod:`infra.observability.status`: what ``accessflow status`` reads from the broker and the
  database, and which of it needs a human;
- :mod:`infra.observability.server`: the HTTP endpoint (``/metrics``, ``/healthz/live``,
  ``/healthz/ready``) of a pool, and of ``accessflow metrics``.
"""
