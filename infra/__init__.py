"""Adapters for the domain's ports, laid out by kind, and the one composition root, :mod:`infra.bootstrap`.

- :mod:`infra.db`: PostgreSQL (and the demo's SQLite): engine, tables, repositories, unit of
  work, migrations, and the read models the CLI and the demo print;
- :mod:`infra.messaging`: RabbitMQ and dramatiq: the broker, the envelope check, the actors'
  wrapper, the middleware, the outbox relay, dead letters, topology and the supervisor;
- :mod:`infra.mail`: rendering emails and delivering them;
- :mod:`infra.credentials`: issuing, hashing and sealing secrets, and admins' signatures;
- :mod:`infra.cli`: the ``accessflow`` command, one module per command group;
- :mod:`infra.observability`: metrics, health, and what ``accessflow status`` reads;
- :mod:`infra.settings`, :mod:`infra.logs`, :mod:`infra.faults` (the fault suite's hooks).
"""
