"""The SQLAlchemy engine: timeouts, pool sizing, prepared statements and dead-connection checks."""

from __future__ import annotations

import re
import select
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from infra.settings import Settings

#: Seconds after which a pooled database connection is replaced at its next checkout, so that
#: none outlives the idle timeout of a server, proxy or firewall that would drop it silently.
POOL_RECYCLE_SECONDS = 600
#: The DETAIL PostgreSQL gives a NOT NULL or CHECK violation: every column's value of the row,
#: secret hash and sealed secret included. The other DETAILs (``Key (public_id)=(...)``) name
#: only the constrained columns, ids, and are kept.
FAILING_ROW = re.compile(r"(Failing row contains )\(.*\)")


def create_engine(settings: Settings) -> Engine:
    """The engine for ``settings.database_url``; on PostgreSQL with connect, statement and lock timeouts.

    No ping on checkout: ``pool_pre_ping`` cost a round trip, and a transaction, every time.
    Instead a pooled connection is recycled after :data:`POOL_RECYCLE_SECONDS`; one whose
    server hung up (a restart, a terminated backend) is dropped at checkout after a look at
    its socket, with no round trip (:func:`_refuse_if_hung_up`); and one that dies in use
    fails its statement, SQLAlchemy drops it, and the message is retried
    (:func:`infra.messaging.delivery.transient_database_error`).

    A failed statement's error text never holds the values it carried: ``hide_parameters``
    leaves them out of SQLAlchemy's message, and :func:`_hide_row_values` takes them out of
    PostgreSQL's own DETAIL. That text is what gets logged, and what a retried message
    carries in its options; a credential's secret hash or sealed secret must be in neither.
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
            hide_parameters=True,
        )
        sa.event.listen(engine, "checkout", _refuse_if_hung_up)
        sa.event.listen(engine, "handle_error", _hide_row_values)
        return engine
    return sa.create_engine(url, connect_args={"check_same_thread": False}, hide_parameters=True)


def _hide_row_values(context: sa.engine.ExceptionContext) -> None:
    """Replace the row values in a failed statement's "Failing row contains (...)" DETAIL.

    The text is fixed in the driver's exception and in SQLAlchemy's wrapper of it, both made
    before this hook runs, so both are rewritten; the exception's type, and its ``diag``
    fields for code that asks for them on purpose, stay as they were.
    """
    for error in (context.original_exception, context.sqlalchemy_exception):
        if error is not None and error.args and isinstance(error.args[0], str):
            error.args = (FAILING_ROW.sub(r"\1(values hidden)", error.args[0]), *error.args[1:])


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
