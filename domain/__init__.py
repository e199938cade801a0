"""The access-request domain: standard library only.

Nothing here knows about SQL, RabbitMQ, SMTP or pydantic. Adapters in ``infra``
implement the ports declared in :mod:`domain.ports`, and the handlers in
:mod:`domain.handlers` are driven by the thin actors in ``workers``.
"""
