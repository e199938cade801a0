"""Every query accessflow runs lives here, one repository per aggregate or table.

The domain classes are plain: nothing maps them. Each repository reads rows with Core
and builds domain objects, and keeps what it loaded and what it was given in the unit
of work, with a copy of the values it read. When the unit of work commits it calls
``flush``, and each repository writes what changed with as few statements as it takes:
a request's new state and its new audit rows go in one statement. So reads see the
database, and a unit of work's own writes reach it at commit; the catalogue, portal and
admin writes, which other reads of the same transaction may need, go at once.

The catalogue, the portals and the admin keys change seldom and are read by every
message. They are read through :class:`ReferenceReads`, from a cache each process keeps
(:class:`ReferenceCache`), checked once per transaction against the one-row table
``catalogue_version``, whose value a trigger replaces whenever any of those tables changes
(migration 0006). Entries are never served once such a change has committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, Generic, TypeVar, cast

import psycopg
import sqlalchemy as sa
from psycopg.rows import namedtuple_row
from psycopg.types.json import Json
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, Row
from sqlalchemy.orm import Session

from domain.errors import Duplicate
from domain.model import (
    AccessRequest,
    AdminKey,
    App,
    AuditEntry,
    BulkDecision,
    Catalogue,
    Consumer,
    Credential,
    CredentialOperation,
    CredentialStatus,
    Decision,
    DecisionOutcome,
    DeliveryStatus,
    Notification,
    NotificationKind,
    OperationTarget,
    Plan,
    Portal,
    Product,
    Status,
    utcnow,
)
from domain.rules import RequestCounts, parse_rules
from infra.db import orm

T = TypeVar("T")
K = TypeVar("K")
E = TypeVar("E")
Values = dict[str, Any]

#: How many entries a process's reference cache holds before it drops the least recently used.
#: Apps are cached too, and requests create apps, so the cache is bounded rather than complete.
REFERENCE_CACHE_ENTRIES: Final = 10_000


def _upsert(session: Session, table: sa.Table, values: Values, key: str = "id") -> None:
    """Insert a row, or update every other column of the row with the same ``key``; one statement."""
    dialect = session.get_bind().dialect.name
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table).values(**values)
    updated = {name: insert.excluded[name] for name in values if name != key}
    session.connection().execute(insert.on_conflict_do_update(index_elements=[key], set_=updated))


def _on_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _violates(error: sa.exc.IntegrityError, table: str, constraint: str, columns: str) -> bool:
    """Whether ``error`` is a unique key's refusal: ``constraint`` on PostgreSQL, ``columns`` on SQLite."""
    orig = error.orig
    if isinstance(orig, psycopg.errors.UniqueViolation):
        return orig.diag.constraint_name == constraint
    return f"UNIQUE constraint failed: {', '.join(f'{table}.{c}' for c in columns.split(','))}" in str(orig)


@contextlib.contextmanager
def _duplicate_of(what: str, table: str, constraint: str, columns: str = "id") -> Iterator[None]:
    """Turn the refusal of a key that identifies a message into :class:`Duplicate`.

    Two deliveries of one message that run at once both find no row, and both write one: the
    second waits for the first's commit and is then refused by the key. That is the duplicate
    the message is, not a failure; the domain sees it as such (and never SQLAlchemy's error).
    Another key's refusal, or any other error, goes through as it is.
    """
    try:
        yield
    except sa.exc.IntegrityError as error:
        if _violates(error, table, constraint, columns):
            raise Duplicate(f"{what} was written by another delivery of the same message") from error
        raise


# --- the hot path's statements -------------------------------------------------------------------


def run(session: Session, statement: sa.Executable, parameters: Mapping[str, Any] | None = None) -> list[Any]:
    """Run a statement built once, in the session's transaction, and return its rows (``[]`` if none).

    On PostgreSQL psycopg runs it itself, as SQL compiled once, with server-side prepared
    statements. SQLAlchemy's execution (a cache lookup, typed parameters, a result
    object with rows built around psycopg's) costs about as much again as psycopg's for
    the small statements a message runs, and more for several rows: 200 against 84 µs
    for a request and its trail, measured on the bench machine. Elsewhere (SQLite, for
    the demo) SQLAlchemy runs it. The rows are psycopg's named tuples or SQLAlchemy's
    Row objects; the builders below read both by attribute, and build the enumerated
    columns' values, which psycopg returns as plain text.
    """
    connection = session.connection()
    if connection.dialect.name != "postgresql" or connection.dispatch.before_cursor_execute:
        # With a listener on SQLAlchemy's statements (instrumentation such as OpenTelemetry's,
        # or a test that counts them), SQLAlchemy runs them all, so that it sees them all.
        result = connection.execute(statement, parameters)
        return list(result.all()) if result.returns_rows else []
    sql, defaults = _postgres_sql(statement, connection.dialect)
    values = {name: _postgres_value(value) for name, value in {**defaults, **(parameters or {})}.items()}
    driver = connection.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        with driver.cursor(row_factory=namedtuple_row) as cursor:
            cursor.execute(sql, values, prepare=True)
            return cursor.fetchall() if cursor.description is not None else []
    except psycopg.Error as error:
        # What SQLAlchemy does with a driver's error, since it did not see this one: the same
        # exception classes (IntegrityError, OperationalError...), with the parameters hidden,
        # and a connection that died is dropped from the pool.
        gone = connection.dialect.is_disconnect(error, connection.connection, None)  # type: ignore[arg-type]
        if gone:
            connection.invalidate(error)
        raise sa.exc.DBAPIError.instance(
            sql, None, error, psycopg.Error, hide_parameters=True, connection_invalidated=gone
        ) from error


@functools.lru_cache(maxsize=512)
def _postgres_sql(statement: sa.Executable, dialect: Dialect) -> tuple[str, dict[str, Any]]:
    """The statement's SQL, and the values of the parameters it holds itself (``id = 1``)."""
    assert isinstance(statement, sa.ClauseElement)
    compiled = statement.compile(dialect=dialect)
    return compiled.string, {name: value for name, value in compiled.params.items() if value is not None}


def _postgres_value(value: Any) -> Any:
    # psycopg sends a list as an ARRAY; the lists and mappings written here go to JSON columns.
    return Json(value) if isinstance(value, list | tuple | dict) else value


def _enums(table: sa.Table) -> dict[str, Callable[[Any], Any]]:
    """The enumerated columns of ``table``, each with its enum class, to build values read as text."""
    return {
        column.name: column.type.enum_class
        for column in table.columns
        if isinstance(column.type, sa.Enum) and column.type.enum_class is not None
    }


_ENUMS: Final = {table.name: _enums(table) for table in orm.metadata.tables.values()}


def _record(table: sa.Table, names: Sequence[str], row: Any, prefix: str = "") -> dict[str, Any]:
    """The values of ``names`` in ``row`` (read by ``<prefix><name>``), enums built from their text."""
    enums = _ENUMS[table.name]
    values = {}
    for name in names:
        value = getattr(row, f"{prefix}{name}")
        enum = enums.get(name)
        values[name] = value if enum is None or value is None else enum(value)
    return values


# --- the reference cache -------------------------------------------------------------------------


class _Missing:
    """What the cache returns for a key it does not hold (``None`` is a cached "not found")."""


MISSING: Final = _Missing()

Key = tuple[str, str]


class ReferenceCache:
    """Catalogue entries, portals and admin keys of one catalogue version, shared by a process's threads.

    It holds one version at a time: :meth:`observe` with another version drops every
    entry. An entry is only ever stored under the version its reader read *before* it
    read the entry, so an entry is never older than the version it is filed under.
    Values are stored as read, ``None`` for "not found" where that may be kept.
    """

    def __init__(self, max_entries: int = REFERENCE_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._version: str | None = None
        self._entries: OrderedDict[Key, object] = OrderedDict()

    def observe(self, version: str) -> None:
        """Note the version a transaction read; a different one than held empties the cache."""
        with self._lock:
            if version != self._version:
                self._version = version
                self._entries.clear()

    def get(self, version: str, key: Key) -> object:
        """The entry for ``key`` if it is held for ``version``, else :data:`MISSING`."""
        with self._lock:
            if version != self._version:
                return MISSING
            value = self._entries.get(key, MISSING)
            if value is not MISSING:
                self._entries.move_to_end(key)
            return value

    def put(self, version: str, key: Key, value: object) -> None:
        """Keep ``value``, read after ``version`` was; dropped if the cache moved to another version."""
        with self._lock:
            if version != self._version:
                return
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


_VERSION = sa.select(orm.catalogue_version.c.version).where(orm.catalogue_version.c.id == 1)


class ReferenceReads:
    """One transaction's reads of cached tables: the version is read once, on the first such read.

    After the transaction writes to a cached table, its reads go to the database and
    are not cached: they may see its own uncommitted writes, which must not reach
    another transaction through the cache.
    """

    def __init__(self, session: Session, cache: ReferenceCache) -> None:
        self.session = session
        self.cache = cache
        self._version: str | None = None
        self._bypass = False

    def wrote(self) -> None:
        """The transaction changed a cached table: read past the cache from now on."""
        self._bypass = True

    @property
    def wants_version(self) -> bool:
        """Whether the transaction has yet to read the catalogue version (and may use it)."""
        return not self._bypass and self._version is None

    def offer(self, version: str | None) -> None:
        """Take the version a statement of this transaction read anyway, unless one was read already."""
        if self._bypass or self._version is not None:
            return
        if version is None:
            self._bypass = True
            return
        self._version = version
        self.cache.observe(version)

    def _current(self) -> str | None:
        if self._bypass:
            return None
        if self._version is None:
            # The row gone would mean nothing can be trusted: then nothing is cached.
            rows = run(self.session, _VERSION)
            self.offer(rows[0].version if rows else None)
        return self._version

    def one(self, key: Key, load: Callable[[], T | None], *, keep_missing: bool = True) -> T | None:
        """The entry for ``key``, from the cache or from ``load`` (which the cache then keeps).

        Parameters:
          keep_missing: cache a ``None`` from ``load`` too; only for kinds that a
            transaction cannot create without replacing the catalogue version.
        """
        version = self._current()
        if version is None:
            return load()
        hit = self.cache.get(version, key)
        if hit is not MISSING:
            return cast("T | None", hit)
        value = load()
        if value is not None or keep_missing:
            self.cache.put(version, key, value)
        return value

    def many(
        self, kind: str, ids: Sequence[str], load: Callable[[list[str]], Mapping[str, T]]
    ) -> dict[str, T]:
        """The entries of ``kind`` for ``ids`` that exist; the missing ones are loaded together."""
        version = self._current()
        if version is None:
            return dict(load(list(dict.fromkeys(ids))))
        found: dict[str, T] = {}
        wanted: list[str] = []
        for entry_id in dict.fromkeys(ids):
            hit = self.cache.get(version, (kind, entry_id))
            if hit is MISSING:
                wanted.append(entry_id)
            elif hit is not None:
                found[entry_id] = cast("T", hit)
        if wanted:
            loaded = load(wanted)
            for entry_id in wanted:
                value = loaded.get(entry_id)
                self.cache.put(version, (kind, entry_id), value)
                if value is not None:
                    found[entry_id] = value
        return found


def _fresh(entity: T) -> T:
    """A copy for the caller: cached objects are shared by threads, and these dataclasses are mutable."""
    if isinstance(entity, Plan):
        return cast(
            "T", dataclasses.replace(entity, product_ids=list(entity.product_ids), rules=list(entity.rules))
        )
    if dataclasses.is_dataclass(entity) and not isinstance(entity, type):
        return cast("T", dataclasses.replace(entity))
    return entity


# --- access requests -----------------------------------------------------------------------------

_requests = orm.access_requests
_audit = orm.audit_log
_REQUEST_COLUMNS: Final = tuple(c.name for c in _requests.columns)
_AUDIT_COLUMNS: Final = ("request_id", "from_status", "to_status", "actor_kind", "actor_id", "reason", "at")
_TRAIL = [_audit.c[name].label(f"audit_{name}") for name in (*_AUDIT_COLUMNS, "id")]


def _with_trail(*, locked: bool = False, with_version: bool = False) -> sa.Select[Any]:
    # The request and its audit trail in one statement: one row per audit entry. The lock
    # covers the request only. Under a lock wait, PostgreSQL rechecks the request row
    # and keeps the audit rows it read first; the writer it waited for changed the status
    # too, which every handler checks before it reads the trail.
    #
    # ``with_version``: the statement also reads the catalogue version, for a transaction
    # that loads its request before it reads the catalogue (an email), which then needs no
    # read of its own. Never with a lock: the value would be as old as the wait for the lock.
    assert not (locked and with_version)
    columns: list[Any] = [_requests, *_TRAIL]
    if with_version:
        columns.append(_VERSION.scalar_subquery().label("catalogue_version"))
    query: sa.Select[Any] = (
        sa.select(*columns)
        .select_from(_requests.outerjoin(_audit, _audit.c.request_id == _requests.c.id))
        .where(_requests.c.id == sa.bindparam("request_id"))
        .order_by(_audit.c.id)
    )
    return query.with_for_update(of=_requests) if locked else query


_GET_REQUEST: Final = _with_trail()
_GET_REQUEST_AND_VERSION: Final = _with_trail(with_version=True)
_GET_REQUEST_LOCKED: Final = _with_trail(locked=True)
_TRAILS_OF: Final = (
    sa.select(_audit)
    .where(_audit.c.request_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(_audit.c.id)
)


#: Serialises the routing of one consumer's requests on throttled plans (key space 0x11A1, then the consumer).
_LOCK_CONSUMER: Final = sa.select(
    sa.func.pg_advisory_xact_lock(
        sa.literal(0x11A1, sa.Integer), sa.func.hashtext(sa.bindparam("consumer_id"))
    )
)
_OPEN: Final = sa.or_(
    *(_requests.c.status == s for s in (Status.SUBMITTED, Status.PENDING_REVIEW, Status.APPROVED))
)
_THROTTLE_COUNTS: Final = sa.select(
    sa.func.count().filter(_OPEN).label("open"),
    sa.func.count()
    .filter(_requests.c.received_at >= sa.bindparam("since"), _requests.c.status != Status.INVALID)
    .label("recent"),
).where(
    _requests.c.consumer_id == sa.bindparam("consumer_id"), _requests.c.plan_id == sa.bindparam("plan_id")
)


def _request_values(request: AccessRequest) -> Values:
    return {name: getattr(request, name) for name in _REQUEST_COLUMNS}


def _request_of(row: Any) -> AccessRequest:
    values = _record(_requests, _REQUEST_COLUMNS, row)
    event_seq = values.pop("event_seq")
    request = AccessRequest(**values)
    request.event_seq = event_seq
    return request


def _entry_of(row: Any, prefix: str = "") -> AuditEntry:
    return AuditEntry(**_record(_audit, (*_AUDIT_COLUMNS, "id"), row, prefix))


def _binds(table: sa.Table, names: Sequence[str], prefix: str) -> list[sa.BindParameter[Any]]:
    return [sa.bindparam(f"{prefix}{name}", type_=table.c[name].type) for name in names]


def _placeholders(names: Sequence[str], prefix: str) -> str:
    return ", ".join(f":{prefix}{name}" for name in names)


def _values_sql(
    table: sa.Table, columns: Sequence[str], rows: int, prefix: str
) -> tuple[str, list[sa.BindParameter[Any]]]:
    """``INSERT INTO table (columns) VALUES (...), ...`` for ``rows`` rows, binds named ``<prefix><i>_<column>``."""
    values = ", ".join(f"({_placeholders(columns, f'{prefix}{i}_')})" for i in range(rows))
    binds = [bind for i in range(rows) for bind in _binds(table, columns, f"{prefix}{i}_")]
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES {values}", binds  # noqa: S608 - names only


def rows_parameters(rows: Iterable[object], columns: Sequence[str], prefix: str) -> Values:
    """The parameters of a :func:`_values_sql` statement: each row's attribute per column."""
    return {f"{prefix}{i}_{name}": getattr(row, name) for i, row in enumerate(rows) for name in columns}


@functools.lru_cache(maxsize=256)
def insert_rows(
    table: sa.Table, columns: tuple[str, ...], rows: int, prefix: str = "v", *, returning: str = ""
) -> sa.TextClause:
    """One statement that inserts ``rows`` rows into ``table``; built once per shape.

    Plain SQL from the table's column names: SQLAlchemy compiles a multi-row VALUES
    afresh on every execution, a text clause once.
    """
    sql, binds = _values_sql(table, columns, rows, prefix)
    if returning:
        sql += f" RETURNING {returning}"
    return sa.text(sql).bindparams(*binds)


def _audit_sql(entries: int) -> tuple[str, list[sa.BindParameter[Any]]]:
    return _values_sql(_audit, _AUDIT_COLUMNS, entries, "a")


@functools.cache
def _write_statement(kind: str, entries: int, postgres: bool) -> sa.TextClause:
    """The one statement that writes a request (``insert`` or ``update``) with ``entries`` new audit rows.

    On PostgreSQL the request's write is a CTE of the audit insert; SQLite, which has no
    writing CTE, gets the request's write alone, and :func:`_audit_statement` after it.
    Plain SQL, built from the tables' column names: SQLAlchemy compiles a multi-row
    VALUES afresh on every execution, a text clause once.
    """
    columns = _REQUEST_COLUMNS
    if kind == "insert":
        write = f"INSERT INTO access_requests ({', '.join(columns)}) VALUES ({_placeholders(columns, 'r_')})"  # noqa: S608 - column names only
    else:
        assignments = ", ".join(f"{name} = :r_{name}" for name in columns if name != "id")
        write = f"UPDATE access_requests SET {assignments} WHERE id = :r_id"  # noqa: S608 - column names only
    binds = _binds(_requests, columns, "r_")
    if entries and postgres:
        audit, audit_binds = _audit_sql(entries)
        return sa.text(f"WITH {kind}_request AS ({write}) {audit}").bindparams(*binds, *audit_binds)
    return sa.text(write).bindparams(*binds)


def _audit_statement(entries: int) -> sa.TextClause:
    return insert_rows(_audit, _AUDIT_COLUMNS, entries, "a")


class SqlRequestRepository:
    """Access requests with their audit trails.

    ``get`` loads a request and its trail in one statement; the unit of work's commit
    writes each request that changed, and the entries appended to its trail, in one more.
    """

    def __init__(self, session: Session, reads: ReferenceReads | None = None) -> None:
        self.session = session
        self.reads = reads
        #: Requests loaded in this transaction: the values read, and how many audit entries were stored.
        self._loaded: dict[str, tuple[AccessRequest, Values, int]] = {}
        self._added: dict[str, AccessRequest] = {}

    def add(self, request: AccessRequest) -> None:
        self._added[request.id] = request

    def get(self, request_id: str, *, for_update: bool = False) -> AccessRequest | None:
        if request_id in self._added:
            return self._added[request_id]
        known = self._loaded.get(request_id)
        if known is not None and not for_update:
            return known[0]
        rows = run(self.session, self._get_statement(for_update), {"request_id": request_id})
        if not rows:
            return None
        if "catalogue_version" in rows[0]._fields and self.reads is not None:
            self.reads.offer(rows[0].catalogue_version)
        if known is not None:  # already loaded here: keep the caller's object, now locked
            return known[0]
        request = _request_of(rows[0])
        request.history = [_entry_of(row, "audit_") for row in rows if row.audit_id is not None]
        self._track(request)
        return request

    def _get_statement(self, for_update: bool) -> sa.Select[Any]:
        if for_update:
            return _GET_REQUEST_LOCKED
        if self.reads is not None and self.reads.wants_version:
            return _GET_REQUEST_AND_VERSION
        return _GET_REQUEST

    def stuck_approved(self, *, before: datetime, limit: int) -> list[AccessRequest]:
        """Requests ``approved`` whose last change (or re-drive) is older than ``before``, oldest first.

        Locked for this transaction; rows another transaction holds (a sweep, or the worker
        issuing the credential) are skipped, not waited for. Not on the hot path: a sweep runs
        it about once a minute per worker process, on a partial index of approved requests.
        """
        c = _requests.c
        query = (
            sa.select(_requests)
            .where(c.status == Status.APPROVED, c.updated_at < before)
            .order_by(c.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return self._load_with_trails(query)

    def review_due(self, *, before: datetime, limit: int) -> list[AccessRequest]:
        """Requests pending review whose deadline is before ``before``, soonest first.

        Locked for this transaction; rows another transaction holds (a sweep, or a decision being
        applied) are skipped, not waited for. Read on a partial index of pending requests with a
        deadline (migration 0012).
        """
        c = _requests.c
        query = (
            sa.select(_requests)
            .where(
                c.status == Status.PENDING_REVIEW,
                c.review_deadline_at.is_not(None),
                c.review_deadline_at < before,
            )
            .order_by(c.review_deadline_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return self._load_with_trails(query)

    def pending_matching(
        self,
        *,
        plan_id: str | None,
        consumer_id: str | None,
        received_before: datetime | None,
        limit: int,
    ) -> list[str]:
        """Ids of requests pending review matching every filter given, oldest first, at most ``limit``.

        Not locked: each is decided afterwards in its own transaction, which locks it and checks
        it is still pending.
        """
        c = _requests.c
        query = sa.select(c.id).where(c.status == Status.PENDING_REVIEW)
        if plan_id is not None:
            query = query.where(c.plan_id == plan_id)
        if consumer_id is not None:
            query = query.where(c.consumer_id == consumer_id)
        if received_before is not None:
            query = query.where(c.received_at < received_before)
        query = query.order_by(c.received_at, c.id).limit(limit)
        return [str(row.id) for row in self.session.connection().execute(query)]

    def _load_with_trails(self, query: sa.Select[Any]) -> list[AccessRequest]:
        connection = self.session.connection()
        requests = [_request_of(row) for row in connection.execute(query)]
        if requests:
            trails: dict[str, list[AuditEntry]] = {r.id: [] for r in requests}
            for row in connection.execute(_TRAILS_OF, {"ids": list(trails)}):
                trails[row.request_id].append(_entry_of(row))
            for request in requests:
                request.history = trails[request.id]
                self._track(request)
        return requests

    def list(self, *, status: Status | None = None, limit: int = 100) -> list[AccessRequest]:
        query = sa.select(_requests).order_by(_requests.c.received_at.desc()).limit(limit)
        if status is not None:
            query = query.where(_requests.c.status == status)
        connection = self.session.connection()
        requests = [
            self._loaded[row.id][0] if row.id in self._loaded else _request_of(row)
            for row in connection.execute(query)
        ]
        fresh = [r for r in requests if r.id not in self._loaded]
        if fresh:
            trails: dict[str, list[AuditEntry]] = {r.id: [] for r in fresh}
            for row in connection.execute(_TRAILS_OF, {"ids": list(trails)}):
                trails[row.request_id].append(_entry_of(row))
            for request in fresh:
                request.history = trails[request.id]
                self._track(request)
        return requests

    def counts_for_throttle(self, *, consumer_id: str, plan_id: str, since: datetime) -> RequestCounts:
        """The consumer's open requests on the plan, and those received since ``since`` (not invalid).

        Takes a lock per consumer first, held until the transaction ends (PostgreSQL's
        transaction-level advisory lock), and counts in a statement of its own: under READ
        COMMITTED that statement sees every request a concurrent router committed before it
        released the lock, so two submissions cannot both slip under a limit. Run only for a
        plan that throttles: the hot path of the others pays nothing.
        """
        if _on_postgres(self.session):
            run(self.session, _LOCK_CONSUMER, {"consumer_id": consumer_id})
        rows = run(
            self.session, _THROTTLE_COUNTS, {"consumer_id": consumer_id, "plan_id": plan_id, "since": since}
        )
        return RequestCounts(open=rows[0].open or 0, last_hour=rows[0].recent or 0)

    def count_by_status(self) -> dict[str, int]:
        rows = self.session.connection().execute(
            sa.select(_requests.c.status, sa.func.count()).group_by(_requests.c.status)
        )
        return {Status(status).value: count for status, count in rows}

    def _track(self, request: AccessRequest) -> None:
        self._loaded[request.id] = (request, _request_values(request), len(request.history))

    def flush(self) -> None:
        """Write every added request, and every loaded one that changed, each with its new audit rows."""
        postgres = _on_postgres(self.session)
        for request in self._added.values():
            with _duplicate_of(f"request {request.id}", "access_requests", "access_requests_pkey"):
                self._write("insert", request, request.history, postgres)
        for request, values, stored in self._loaded.values():
            changed = _request_values(request) != values
            new_entries = request.history[stored:]
            if changed:
                self._write("update", request, new_entries, postgres)
            elif new_entries:
                self._write_audit(new_entries)
        # What is written is what the next flush compares with (a unit of work may go on after a commit).
        for request in [*self._added.values(), *(loaded for loaded, _, _ in self._loaded.values())]:
            self._track(request)
        self._added.clear()

    def _write(
        self, kind: str, request: AccessRequest, entries: Sequence[AuditEntry], postgres: bool
    ) -> None:
        parameters = {f"r_{name}": value for name, value in _request_values(request).items()}
        if postgres:
            parameters.update(_audit_parameters(entries))
            run(self.session, _write_statement(kind, len(entries), True), parameters)
            return
        run(self.session, _write_statement(kind, 0, False), parameters)
        if entries:
            self._write_audit(entries)

    def _write_audit(self, entries: Sequence[AuditEntry]) -> None:
        run(self.session, _audit_statement(len(entries)), _audit_parameters(entries))

    def forget(self) -> None:
        self._loaded.clear()
        self._added.clear()


def _audit_parameters(entries: Iterable[AuditEntry]) -> Values:
    return rows_parameters(entries, _AUDIT_COLUMNS, "a")


# --- the catalogue -------------------------------------------------------------------------------

_PLAN: Final = sa.select(orm.plans).where(orm.plans.c.id == sa.bindparam("id"))
_PRODUCTS: Final = sa.select(orm.products).where(orm.products.c.id.in_(sa.bindparam("ids", expanding=True)))
_CONSUMER: Final = sa.select(orm.consumers).where(orm.consumers.c.id == sa.bindparam("id"))
_APP: Final = sa.select(orm.apps).where(orm.apps.c.id == sa.bindparam("id"))


def _plan_of(row: Row[Any]) -> Plan:
    return Plan(
        id=row.id,
        name=row.name,
        auto_approve=row.auto_approve,
        rate_limit_per_minute=row.rate_limit_per_minute,
        monthly_quota=row.monthly_quota,
        product_ids=list(row.product_ids),
        credential_lifetime_days=row.credential_lifetime_days,
        review_deadline_hours=row.review_deadline_hours,
        # Validated as the catalogue was loaded; a bad one here is a bug, and raises.
        rules=parse_rules(row.rules or []),
        max_open_requests_per_consumer=row.max_open_requests_per_consumer,
        max_requests_per_consumer_per_hour=row.max_requests_per_consumer_per_hour,
    )


def _app_of(row: Row[Any]) -> App:
    return App(id=row.id, consumer_id=row.consumer_id, name=row.name, description=row.description)


class SqlCatalogueRepository:
    """Products, plans, consumers and apps; read through the process's reference cache."""

    def __init__(self, session: Session, reads: ReferenceReads) -> None:
        self.session = session
        self.reads = reads

    def slice_for(
        self, *, plan_id: str, product_ids: Sequence[str], consumer_id: str, app_id: str | None
    ) -> Catalogue:
        return Catalogue(
            plan=self.plan(plan_id),
            products={p.id: p for p in self.products(product_ids)},
            consumer=self.consumer(consumer_id),
            app=self.app(app_id) if app_id is not None else None,
        )

    def _first(self, query: sa.Select[Any], entry_id: str) -> Any:
        rows = run(self.session, query, {"id": entry_id})
        return rows[0] if rows else None

    def plan(self, plan_id: str) -> Plan | None:
        def load() -> Plan | None:
            row = self._first(_PLAN, plan_id)
            return None if row is None else _plan_of(row)

        found = self.reads.one(("plan", plan_id), load)
        return None if found is None else _fresh(found)

    def products(self, product_ids: Sequence[str]) -> list[Product]:
        def load(ids: list[str]) -> dict[str, Product]:
            rows = self.session.connection().execute(_PRODUCTS, {"ids": ids})
            return {row.id: Product(id=row.id, name=row.name, auth_method=row.auth_method) for row in rows}

        found = self.reads.many("product", product_ids, load)
        return [_fresh(found[p]) for p in product_ids if p in found]

    def consumer(self, consumer_id: str) -> Consumer | None:
        def load() -> Consumer | None:
            row = self._first(_CONSUMER, consumer_id)
            return (
                None
                if row is None
                else Consumer(
                    id=row.id,
                    email=row.email,
                    name=row.name,
                    max_open_requests=row.max_open_requests,
                    max_requests_per_hour=row.max_requests_per_hour,
                )
            )

        found = self.reads.one(("consumer", consumer_id), load)
        return None if found is None else _fresh(found)

    def app(self, app_id: str) -> App | None:
        def load() -> App | None:
            row = self._first(_APP, app_id)
            return None if row is None else _app_of(row)

        # An app that is not found is not cached: a request creates its app without
        # replacing the catalogue version (see migration 0006).
        found = self.reads.one(("app", app_id), load, keep_missing=False)
        return None if found is None else _fresh(found)

    def apps_of(self, consumer_id: str) -> list[App]:
        query = sa.select(orm.apps).where(orm.apps.c.consumer_id == consumer_id).order_by(orm.apps.c.id)
        return [_app_of(row) for row in self.session.connection().execute(query)]

    def add_app(self, app: App) -> None:
        # The new app is uncommitted: no later read of this transaction may put it in the cache.
        self.reads.wrote()
        # A new app's id is derived from its request's: a twin delivery of the request made it.
        with _duplicate_of(f"app {app.id}", "apps", "apps_pkey"):
            self.session.connection().execute(orm.apps.insert(), dataclasses.asdict(app))

    def upsert(self, entity: Product | Plan | Consumer | App) -> None:
        self.reads.wrote()
        table = {Product: orm.products, Plan: orm.plans, Consumer: orm.consumers, App: orm.apps}[type(entity)]
        values = dataclasses.asdict(entity)
        if isinstance(entity, Plan):
            values["rules"] = [rule.to_json() for rule in entity.rules]
        _upsert(self.session, table, values)


# --- decisions, credentials, notifications ---------------------------------------------------------

_decisions = orm.decisions
_DECISION_COLUMNS: Final = tuple(c.name for c in _decisions.columns)
_GET_DECISION: Final = sa.select(_decisions).where(_decisions.c.id == sa.bindparam("id"))


def _decision_of(row: Any) -> Decision:
    return Decision(**_record(_decisions, _DECISION_COLUMNS, row))


_COUNTED_APPROVERS: Final = sa.select(_decisions.c.admin_id).where(
    _decisions.c.request_id == sa.bindparam("request_id"),
    _decisions.c.outcome == DecisionOutcome.COUNTED,
    _decisions.c.approve.is_(True),
)


class SqlDecisionRepository:
    """Admin decisions as received. A decision is a record: added once, never changed."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._added: list[Decision] = []

    def get(self, decision_id: str) -> Decision | None:
        for decision in self._added:
            if decision.id == decision_id:
                return decision
        rows = run(self.session, _GET_DECISION, {"id": decision_id})
        return _decision_of(rows[0]) if rows else None

    def add(self, decision: Decision) -> None:
        self._added.append(decision)

    def approvers_of(self, request_id: str) -> set[str]:
        rows = run(self.session, _COUNTED_APPROVERS, {"request_id": request_id})
        return {row.admin_id for row in rows} | {
            d.admin_id
            for d in self._added
            if d.request_id == request_id and d.outcome is DecisionOutcome.COUNTED
        }

    def for_request(self, request_id: str) -> list[Decision]:
        query = (
            sa.select(_decisions)
            .where(_decisions.c.request_id == request_id)
            .order_by(_decisions.c.received_at)
        )
        return [_decision_of(row) for row in self.session.connection().execute(query)]

    def flush(self) -> None:
        if self._added:
            with _duplicate_of(
                f"decision {', '.join(d.id for d in self._added)}", "decisions", "decisions_pkey"
            ):
                run(
                    self.session,
                    insert_rows(_decisions, _DECISION_COLUMNS, len(self._added)),
                    rows_parameters(self._added, _DECISION_COLUMNS, "v"),
                )
        self._added.clear()

    def forget(self) -> None:
        self._added.clear()


_credentials = orm.credentials
_CREDENTIAL_COLUMNS: Final = tuple(c.name for c in _credentials.columns)
#: What may change once a credential is stored: its one reveal, and its whole life after issue.
_CREDENTIAL_CHANGES: Final = (
    "sealed_secret",
    "revealed_at",
    "revoked_at",
    "status",
    "public_id",
    "secret_hash",
    "previous_public_id",
    "previous_secret_hash",
    "previous_valid_until",
    "plan_id",
    "rate_limit_per_minute",
    "monthly_quota",
    "expires_at",
    "revision",
    "updated_at",
    "expiry_notices",
)
_UPDATE_CREDENTIAL: Final = (
    _credentials.update()
    .where(_credentials.c.id == sa.bindparam("credential_id"))
    .values({n: sa.bindparam(f"new_{n}") for n in _CREDENTIAL_CHANGES})
)
_credential_audit = orm.credential_audit
_CREDENTIAL_AUDIT_COLUMNS: Final = tuple(c.name for c in _credential_audit.columns if c.name != "id")
#: The statuses a credential may still change from, but for a revocation.
_LIVE: Final = (CredentialStatus.ACTIVE, CredentialStatus.SUSPENDED)


_CREDENTIAL_OF_REQUEST: Final = sa.select(_credentials).where(
    _credentials.c.request_id == sa.bindparam("request_id")
)


def _credential_of(row: Any) -> Credential:
    return Credential(**_record(_credentials, _CREDENTIAL_COLUMNS, row))


def _changes(entity: object, names: Sequence[str]) -> tuple[Any, ...]:
    return tuple(getattr(entity, name) for name in names)


def _new_values(names: Sequence[str], values: Sequence[Any]) -> Values:
    # Named apart from the columns: SQLAlchemy keeps a column's own name for its VALUES and SET.
    return {f"new_{name}": value for name, value in zip(names, values, strict=True)}


class _Tracked(Generic[K, E]):
    """The rows a unit of work loaded, each with the values it had then, so that only a change is written.

    Loading a row twice gives back the same object, as a session's identity map would.
    """

    def __init__(self, build: Callable[[Row[Any]], E], names: Sequence[str]) -> None:
        self.build = build
        self.names = names
        self.entries: dict[K, tuple[E, tuple[Any, ...]]] = {}

    def load(self, rows: Iterable[Row[Any]]) -> list[E]:
        found = []
        for row in rows:
            known = self.entries.get(row.id)
            if known is None:
                self.remember(row.id, entity := self.build(row))
                found.append(entity)
            else:
                found.append(known[0])
        return found

    def remember(self, key: K, entity: E) -> None:
        self.entries[key] = (entity, _changes(entity, self.names))

    def changed(self) -> list[tuple[K, E, tuple[Any, ...]]]:
        """Every loaded entity whose tracked values changed, with the new values; they count as written."""
        found = []
        for key, (entity, read) in list(self.entries.items()):
            now = _changes(entity, self.names)
            if now != read:
                self.entries[key] = (entity, now)
                found.append((key, entity, now))
        return found

    def clear(self) -> None:
        self.entries.clear()


@functools.cache
def _insert_credentials_with_trail(credentials: int, entries: int) -> sa.TextClause:
    """``credentials`` new credentials and ``entries`` audit rows, in one statement (PostgreSQL's writing CTE)."""
    insert, binds = _values_sql(_credentials, _CREDENTIAL_COLUMNS, credentials, "v")
    audit, audit_binds = _values_sql(_credential_audit, _CREDENTIAL_AUDIT_COLUMNS, entries, "a")
    return sa.text(f"WITH issued AS ({insert}) {audit}").bindparams(*binds, *audit_binds)


_HOLDS_ACTIVE: Final = (
    sa.select(sa.literal(1))
    .where(
        _credentials.c.consumer_id == sa.bindparam("consumer_id"),
        _credentials.c.plan_id == sa.bindparam("plan_id"),
        _credentials.c.status == CredentialStatus.ACTIVE,
        sa.or_(_credentials.c.expires_at.is_(None), _credentials.c.expires_at > sa.func.now()),
    )
    .limit(1)
)


class SqlCredentialRepository:
    """Issued credentials; a loaded one that was revealed or revoked is written back at commit."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._added: list[Credential] = []
        self._loaded: _Tracked[str, Credential] = _Tracked(_credential_of, _CREDENTIAL_CHANGES)

    def add(self, credential: Credential) -> None:
        self._added.append(credential)

    def _load(self, query: sa.Select[Any], parameters: Mapping[str, Any] | None = None) -> list[Credential]:
        return self._loaded.load(run(self.session, query, parameters))

    def for_request(self, request_id: str) -> Credential | None:
        for credential in self._added:
            if credential.request_id == request_id:
                return credential
        found = self._load(_CREDENTIAL_OF_REQUEST, {"request_id": request_id})
        return found[0] if found else None

    def for_app(self, app_id: str, *, for_update: bool = False) -> list[Credential]:
        query = (
            sa.select(_credentials).where(_credentials.c.app_id == app_id).order_by(_credentials.c.created_at)
        )
        if for_update:
            query = query.with_for_update()
        return self._load(query)

    def by_public_id(self, public_id: str) -> Credential | None:
        """The credential a presented secret names: by its public id, or its previous one in a grace period."""
        c = _credentials.c
        query = (
            sa.select(_credentials)
            .where(sa.or_(c.public_id == public_id, c.previous_public_id == public_id))
            .order_by(sa.case((c.public_id == public_id, 0), else_=1))
            .limit(1)
        )
        found = self._load(query)
        return found[0] if found else None

    def get(self, credential_id: str, *, for_update: bool = False) -> Credential | None:
        for credential in self._added:
            if credential.id == credential_id:
                return credential
        query = sa.select(_credentials).where(_credentials.c.id == credential_id)
        found = self._load(query.with_for_update() if for_update else query)
        return found[0] if found else None

    def holds_active(self, *, consumer_id: str, plan_id: str) -> bool:
        """Whether the consumer holds an active credential on the plan (for an approval rule)."""
        return bool(run(self.session, _HOLDS_ACTIVE, {"consumer_id": consumer_id, "plan_id": plan_id}))

    def targets(self, target: OperationTarget, target_id: str) -> list[Credential]:
        """The credentials an operation names, locked for this transaction, in a fixed order (no deadlock)."""
        column = {
            OperationTarget.CREDENTIAL: _credentials.c.id,
            OperationTarget.APP: _credentials.c.app_id,
            OperationTarget.CONSUMER: _credentials.c.consumer_id,
        }[target]
        query = sa.select(_credentials).where(column == target_id).order_by(_credentials.c.id)
        return self._load(query.with_for_update())

    def expiring(self, *, before: datetime, limit: int) -> list[Credential]:
        """Live credentials that expire before ``before``, soonest first.

        Locked for this transaction; rows another transaction holds (another sweep, an
        operation) are skipped, not waited for, so that many workers sweep side by side.
        """
        c = _credentials.c
        query = (
            sa.select(_credentials)
            .where(c.status.in_(_LIVE), c.expires_at.is_not(None), c.expires_at < before)
            .order_by(c.expires_at, c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return self._loaded.load(self.session.connection().execute(query))

    def listing(
        self,
        *,
        app_id: str | None = None,
        consumer_id: str | None = None,
        status: CredentialStatus | None = None,
        limit: int = 100,
    ) -> list[Credential]:
        """Credentials, newest first, narrowed by app, consumer and status; nothing is locked or revealed."""
        c = _credentials.c
        query = sa.select(_credentials).order_by(c.created_at.desc(), c.id).limit(limit)
        if app_id is not None:
            query = query.where(c.app_id == app_id)
        if consumer_id is not None:
            query = query.where(c.consumer_id == consumer_id)
        if status is not None:
            query = query.where(c.status == status)
        return [_credential_of(row) for row in self.session.connection().execute(query)]

    def trail(self, credential_id: str) -> list[dict[str, Any]]:
        query = (
            sa.select(_credential_audit)
            .where(_credential_audit.c.credential_id == credential_id)
            .order_by(_credential_audit.c.id)
        )
        return [
            _record(_credential_audit, (*_CREDENTIAL_AUDIT_COLUMNS, "id"), row)
            for row in self.session.connection().execute(query)
        ]

    def flush(self) -> None:
        for credential_id, _, now in self._loaded.changed():
            run(
                self.session,
                _UPDATE_CREDENTIAL,
                {"credential_id": credential_id, **_new_values(_CREDENTIAL_CHANGES, now)},
            )
        if self._added:
            parameters = rows_parameters(self._added, _CREDENTIAL_COLUMNS, "v")
            issued = [change for credential in self._added for change in credential.changes]
            if issued and _on_postgres(self.session):
                # On the hot path: the new credentials and the first rows of their trails in one statement.
                parameters.update(rows_parameters(issued, _CREDENTIAL_AUDIT_COLUMNS, "a"))
                run(self.session, _insert_credentials_with_trail(len(self._added), len(issued)), parameters)
                for credential in self._added:
                    credential.changes.clear()
            else:
                run(
                    self.session, insert_rows(_credentials, _CREDENTIAL_COLUMNS, len(self._added)), parameters
                )
        for credential in self._added:
            self._loaded.remember(credential.id, credential)
        self._added.clear()
        # Each change a credential recorded is a row of its audit trail, written once.
        changes = [change for credential, _ in self._loaded.entries.values() for change in credential.changes]
        if changes:
            run(
                self.session,
                insert_rows(_credential_audit, _CREDENTIAL_AUDIT_COLUMNS, len(changes)),
                rows_parameters(changes, _CREDENTIAL_AUDIT_COLUMNS, "v"),
            )
            for credential, _ in self._loaded.entries.values():
                credential.changes.clear()

    def forget(self) -> None:
        self._added.clear()
        self._loaded.clear()


_operations = orm.credential_operations
_OPERATION_COLUMNS: Final = tuple(c.name for c in _operations.columns)


class SqlCredentialOperationRepository:
    """Admin operations on credentials as received: added once, never changed."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._added: list[CredentialOperation] = []

    def get(self, operation_id: str) -> CredentialOperation | None:
        for operation in self._added:
            if operation.id == operation_id:
                return operation
        rows = run(self.session, sa.select(_operations).where(_operations.c.id == operation_id))
        if not rows:
            return None
        values = _record(_operations, _OPERATION_COLUMNS, rows[0])
        values["target"] = OperationTarget(values["target"])
        return CredentialOperation(**values)

    def add(self, operation: CredentialOperation) -> None:
        self._added.append(operation)

    def flush(self) -> None:
        for operation in self._added:
            with _duplicate_of(
                f"operation {operation.id}", "credential_operations", "credential_operations_pkey"
            ):
                run(
                    self.session,
                    insert_rows(_operations, _OPERATION_COLUMNS, 1),
                    rows_parameters([operation], _OPERATION_COLUMNS, "v"),
                )
        self._added.clear()

    def forget(self) -> None:
        self._added.clear()


_bulks = orm.bulk_decisions
_BULK_COLUMNS: Final = tuple(c.name for c in _bulks.columns)


class SqlBulkDecisionRepository:
    """Admins' bulk decisions as received: added once, never changed."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._added: list[BulkDecision] = []

    def get(self, bulk_id: str) -> BulkDecision | None:
        for bulk in self._added:
            if bulk.id == bulk_id:
                return bulk
        rows = run(self.session, sa.select(_bulks).where(_bulks.c.id == bulk_id))
        if not rows:
            return None
        return BulkDecision(**_record(_bulks, _BULK_COLUMNS, rows[0]))

    def add(self, bulk: BulkDecision) -> None:
        self._added.append(bulk)

    def flush(self) -> None:
        for bulk in self._added:
            with _duplicate_of(f"bulk decision {bulk.id}", "bulk_decisions", "bulk_decisions_pkey"):
                run(
                    self.session,
                    insert_rows(_bulks, _BULK_COLUMNS, 1),
                    rows_parameters([bulk], _BULK_COLUMNS, "v"),
                )
        self._added.clear()

    def forget(self) -> None:
        self._added.clear()


_notifications = orm.notifications
_NOTIFICATION_COLUMNS: Final = tuple(c.name for c in _notifications.columns if c.name != "id")
#: What a send changes on a notification it loaded.
_NOTIFICATION_CHANGES: Final = ("status", "attempts", "last_error", "sent_at", "lease_expires_at")
_GET_NOTIFICATION = sa.select(_notifications).where(
    _notifications.c.request_id == sa.bindparam("request_id"),
    _notifications.c.kind == sa.bindparam("kind"),
    _notifications.c.topic == sa.bindparam("topic"),
)
_GET_NOTIFICATION_LOCKED: Final = _GET_NOTIFICATION.with_for_update()
_INSERT_NOTIFICATION: Final = insert_rows(_notifications, _NOTIFICATION_COLUMNS, 1, returning="id")
_UPDATE_NOTIFICATION: Final = (
    _notifications.update()
    .where(_notifications.c.id == sa.bindparam("notification_id"))
    .values({n: sa.bindparam(f"new_{n}") for n in _NOTIFICATION_CHANGES})
)


def _notification_of(row: Any) -> Notification:
    return Notification(**_record(_notifications, (*_NOTIFICATION_COLUMNS, "id"), row))


class SqlNotificationRepository:
    """The emails owed per (request, kind); a loaded one that changed is written back at commit."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._added: list[Notification] = []
        self._loaded: _Tracked[int, Notification] = _Tracked(_notification_of, _NOTIFICATION_CHANGES)

    def get(
        self, request_id: str, kind: NotificationKind, topic: str = "", *, for_update: bool = False
    ) -> Notification | None:
        for notification in self._added:
            if (notification.request_id, notification.kind, notification.topic) == (request_id, kind, topic):
                return notification
        query = _GET_NOTIFICATION_LOCKED if for_update else _GET_NOTIFICATION
        found = self._load(query, {"request_id": request_id, "kind": kind, "topic": topic})
        return found[0] if found else None

    def _load(self, query: sa.Select[Any], parameters: Mapping[str, Any] | None = None) -> list[Notification]:
        return self._loaded.load(run(self.session, query, parameters))

    def add(self, notification: Notification) -> None:
        self._added.append(notification)

    def recent(self, *, status: DeliveryStatus | None = None, limit: int = 100) -> list[Notification]:
        query = sa.select(_notifications).order_by(_notifications.c.id.desc()).limit(limit)
        if status is not None:
            query = query.where(_notifications.c.status == status)
        return self._load(query)

    def for_request(self, request_id: str) -> list[Notification]:
        query = sa.select(_notifications).where(_notifications.c.request_id == request_id)
        return self._load(query.order_by(_notifications.c.id))

    def stuck(self, *, before: datetime, limit: int) -> list[Notification]:
        """Emails in ``sending`` whose lease ran out (or that were never leased) before ``before``.

        Locked for this transaction; rows another transaction holds are skipped, not waited for.
        Not on the hot path: a sweep runs it about once a minute per worker process.
        """
        c = _notifications.c
        query = (
            sa.select(_notifications)
            .where(
                c.status == DeliveryStatus.SENDING,
                sa.func.coalesce(c.lease_expires_at, c.created_at) < before,
            )
            .order_by(c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return self._loaded.load(self.session.connection().execute(query))

    def flush(self) -> None:
        for notification in self._added:
            with _duplicate_of(
                f"the {notification.kind.value} email of request {notification.request_id}",
                "notifications",
                "uq_notifications_request_kind_topic",
                "request_id,kind,topic",
            ):
                [inserted] = run(
                    self.session,
                    _INSERT_NOTIFICATION,
                    rows_parameters([notification], _NOTIFICATION_COLUMNS, "v"),
                )
            notification.id = inserted.id
            self._loaded.remember(notification.id, notification)
        self._added.clear()
        for notification_id, _, now in self._loaded.changed():
            run(
                self.session,
                _UPDATE_NOTIFICATION,
                {"notification_id": notification_id, **_new_values(_NOTIFICATION_CHANGES, now)},
            )

    def forget(self) -> None:
        self._added.clear()
        self._loaded.clear()


# --- portals and admin keys ------------------------------------------------------------------------

_portals = orm.portals
_PORTAL_WITH_CONSUMERS = sa.select(_portals, orm.portal_consumers.c.consumer_id).select_from(
    _portals.outerjoin(orm.portal_consumers, orm.portal_consumers.c.portal_id == _portals.c.id)
)
_PORTAL: Final = _PORTAL_WITH_CONSUMERS.where(_portals.c.id == sa.bindparam("key"))
_PORTAL_OF_USER: Final = _PORTAL_WITH_CONSUMERS.where(_portals.c.broker_user == sa.bindparam("key"))


def _portal_of(rows: Sequence[Row[Any]]) -> Portal | None:
    if not rows:
        return None
    row = rows[0]
    return Portal(
        id=row.id,
        name=row.name,
        broker_user=row.broker_user,
        public_key=row.public_key,
        consumer_ids=frozenset(r.consumer_id for r in rows if r.consumer_id is not None),
        url=row.url,
    )


class SqlPortalRepository:
    """Registered portals, with the consumers each may speak for; read through the reference cache."""

    def __init__(self, session: Session, reads: ReferenceReads) -> None:
        self.session = session
        self.reads = reads

    def _load(self, query: sa.Select[Any], key: str) -> Portal | None:
        return _portal_of(run(self.session, query, {"key": key}))

    def get(self, portal_id: str) -> Portal | None:
        # Portals are frozen: the cached object itself can be handed out.
        return self.reads.one(("portal", portal_id), lambda: self._load(_PORTAL, portal_id))

    def by_broker_user(self, broker_user: str) -> Portal | None:
        return self.reads.one(
            ("portal_of_user", broker_user), lambda: self._load(_PORTAL_OF_USER, broker_user)
        )

    def list(self) -> list[Portal]:
        rows = self.session.connection().execute(_PORTAL_WITH_CONSUMERS.order_by(_portals.c.id)).all()
        by_id: dict[str, list[Row[Any]]] = {}
        for row in rows:
            by_id.setdefault(row.id, []).append(row)
        return [portal for group in by_id.values() if (portal := _portal_of(group)) is not None]

    def upsert(self, portal: Portal) -> None:
        """Register a portal, or replace what is registered for it, consumers included."""
        self.reads.wrote()
        _upsert(
            self.session,
            _portals,
            {
                "id": portal.id,
                "name": portal.name,
                "broker_user": portal.broker_user,
                "public_key": portal.public_key,
                "url": portal.url,
            },
        )
        connection = self.session.connection()
        connection.execute(orm.portal_consumers.delete().where(orm.portal_consumers.c.portal_id == portal.id))
        if portal.consumer_ids:
            connection.execute(
                orm.portal_consumers.insert(),
                [{"portal_id": portal.id, "consumer_id": c} for c in sorted(portal.consumer_ids)],
            )


_admin_keys = orm.admin_keys
_KEY: Final = sa.select(_admin_keys).where(_admin_keys.c.key_id == sa.bindparam("key_id"))
_ADMIN_EMAIL: Final = sa.select(orm.admins.c.email).where(orm.admins.c.id == sa.bindparam("admin_id"))


def _key_of(row: Row[Any]) -> AdminKey:
    return AdminKey(
        key_id=row.key_id,
        admin_id=row.admin_id,
        public_key=row.public_key,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


class SqlAdminKeyRepository:
    """Admins and the public keys their decisions are verified with; read through the reference cache."""

    def __init__(self, session: Session, reads: ReferenceReads) -> None:
        self.session = session
        self.reads = reads

    def _key(self, key_id: str) -> AdminKey | None:
        rows = run(self.session, _KEY, {"key_id": key_id})
        return _key_of(rows[0]) if rows else None

    def _admin_email(self, admin_id: str) -> str | None:
        rows = run(self.session, _ADMIN_EMAIL, {"admin_id": admin_id})
        return str(rows[0].email) if rows else None

    def key(self, key_id: str) -> AdminKey | None:
        # Admin keys are frozen: the cached object itself can be handed out.
        return self.reads.one(("admin_key", key_id), lambda: self._key(key_id))

    def admin_email(self, admin_id: str) -> str | None:
        return self.reads.one(("admin_email", admin_id), lambda: self._admin_email(admin_id))

    def admins(self) -> list[tuple[str, str, list[AdminKey]]]:
        """Every admin with their keys, revoked ones included: (id, email, keys)."""
        connection = self.session.connection()
        keys: dict[str, list[AdminKey]] = {}
        for row in connection.execute(sa.select(_admin_keys).order_by(_admin_keys.c.created_at)):
            keys.setdefault(row.admin_id, []).append(_key_of(row))
        rows = connection.execute(sa.select(orm.admins).order_by(orm.admins.c.id))
        return [(row.id, row.email, keys.get(row.id, [])) for row in rows]

    def upsert_admin(self, admin_id: str, email: str) -> None:
        self.reads.wrote()
        _upsert(self.session, orm.admins, {"id": admin_id, "email": email})

    def add_key(self, key: AdminKey) -> None:
        """Register a key; adding the same key again changes nothing, another key under its id is refused."""
        self.reads.wrote()
        existing = self._key(key.key_id)
        if existing is None:
            self.session.connection().execute(_admin_keys.insert(), dataclasses.asdict(key))
        elif (existing.admin_id, existing.public_key) != (key.admin_id, key.public_key):
            raise ValueError(f"key id {key.key_id!r} is taken by another key")

    def revoke(self, key_id: str) -> bool:
        """Revoke a key for good (revoking it again changes nothing); return False if there is no such key."""
        self.reads.wrote()
        revoked = self.session.connection().execute(
            _admin_keys.update()
            .where(_admin_keys.c.key_id == key_id)
            # Keeps the first revocation's time; one statement finds the key and revokes it.
            .values(revoked_at=sa.func.coalesce(_admin_keys.c.revoked_at, utcnow()))
            .returning(_admin_keys.c.key_id)
        )
        return revoked.first() is not None
