"""The SQLAlchemy engine: timeouts, pool sizing, prepared statements and dead-connection checks."""

from __future__ import annotations

import select
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from infra.settings import Settings

#: Seconds after which a pooled database connection is replaced at its next checkout, so that
#: none outlives the idle timeout of a server, proxy or firewall that would drop it silently.
POOL_RECYCLE_SECONDS = 600


def create_engine(settings: Settings) -> Engine:
    """The engine for ``settings.database_url``; on PostgreSQL with connect, statement and lock timeouts.

    No ping on checkout: ``pool_pre_ping`` cost a round trip, and a transaction, every time.
    Instead a pooled connection is recycled after :data:`POOL_RECYCLE_SECONDS`; one whose
    server hung up (a restart, a terminated backend) is dropped at checkout after a look at
    its socket, with no round trip (:func:`_refuse_if_hung_up`); and one that dies in use
    fails its statement, SQLAlchemy drops it, and the message is retried
    (:func:`infra.messaging.delivery.transient_database_error`).
    """
    url = sa.make_url(settings.database_url)
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql":
        connect_args = {
            "connect_timeout": settings.db_connect_timeout_seconds,
            "options": f"-c statement_timeout={settings.db_statement_timeout_ms}"
            f" -c lock_timeout={settings.db_statement_timeout_ms}",
            # Server-side prepared statements from a statement's second run on a connection: the
            # hot path's statements are fixed texts, parsed and planned once per connection
            # (PostgreSQL's CPU per request falls by about a third); one-off statements are not
            # prepared. A pooler in front would need to support them (PgBouncer >= 1.21).
            "prepare_threshold": 1,
        }
        engine = sa.create_engine(
            url,
            connect_args=connect_args,
            # Sized to the threads that use it: a connection beyond pool_size is closed when it
            # is returned, and a process that needs more than that connects anew all the time.
            pool_size=settings.db_pool_size,
            max_overflow=max(4, settings.db_pool_size // 2),
            pool_recycle=POOL_RECYCLE_SECONDS,
        )
        sa.event.listen(engine, "checkout", _refuse_if_hung_up)
        return engine
    return sa.create_engine(url, connect_args={"check_same_thread": False})


def _refuse_if_hung_up(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """Make the pool connect afresh instead of handing out a connection its server has closed.

    A pooled connection is idle: the server sends it nothing, unless it hangs up, when it
    sends its reason (``terminating connection due to ...``) and closes the socket. So a
    socket with something to read, or an error, is dead. Looking is one poll(2) that does
    not wait. A connection that died without a word (a host gone) is not seen here: its
    first statement fails, and the message is retried.
    """
    try:
        descriptor = dbapi_connection.fileno()
    except Exception:  # psycopg raises once the connection is closed
        descriptor = None
    if descriptor is not None:
        poller = select.poll()
        poller.register(descriptor, select.POLLIN)  # hang-ups and errors are always reported
        if not poller.poll(0):
            return
    raise sa.exc.DisconnectionError("the database server closed this pooled connection")
