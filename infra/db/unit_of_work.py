"""The SQLAlchemy unit of work: one session, one transaction, outbox published after commit."""

from __future__ import annotations

import threading
import weakref
from types import TracebackType
from typing import Self

from sqlalchemy.orm import Session, sessionmaker

from domain.outcomes import Outcome
from infra.db.outbox import SqlOutbox
from infra.db.repositories import (
    ReferenceCache,
    ReferenceReads,
    SqlAdminKeyRepository,
    SqlBulkDecisionRepository,
    SqlCatalogueRepository,
    SqlCredentialOperationRepository,
    SqlCredentialRepository,
    SqlDecisionRepository,
    SqlNotificationRepository,
    SqlPortalRepository,
    SqlRequestRepository,
)
from infra.logs import log_outcome
from infra.messaging.relay import OutboxRelay

_caches: weakref.WeakKeyDictionary[sessionmaker[Session], ReferenceCache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def reference_cache_of(session_factory: sessionmaker[Session]) -> ReferenceCache:
    """The reference cache of the database ``session_factory`` opens sessions on; one per factory.

    A process builds its session factory once (infra.bootstrap.build), so this is one cache per
    process and database, and it goes when the factory does.
    """
    with _caches_lock:
        cache = _caches.get(session_factory)
        if cache is None:
            cache = _caches[session_factory] = ReferenceCache()
        return cache


class SqlUnitOfWork:
    """Rolls back unless :meth:`commit` is called; after a commit, publishes what the outbox got.

    It logs the handler's outcomes (:meth:`record_outcome`): one about a state change after
    the commit that made it, and none if the transaction rolls back; any other at once.

    The repositories write what the handler changed when it commits, in one go and in the
    order the foreign keys want (:meth:`_flush`); the outbox rows are in the same transaction.
    """

    session: Session
    reads: ReferenceReads
    requests: SqlRequestRepository
    catalogue: SqlCatalogueRepository
    decisions: SqlDecisionRepository
    credentials: SqlCredentialRepository
    credential_operations: SqlCredentialOperationRepository
    bulk_decisions: SqlBulkDecisionRepository
    notifications: SqlNotificationRepository
    portals: SqlPortalRepository
    admin_keys: SqlAdminKeyRepository
    outbox: SqlOutbox

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        queue_prefix: str,
        relay: OutboxRelay | None,
        reference_cache: ReferenceCache | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.queue_prefix = queue_prefix
        self.relay = relay
        self.reference_cache = reference_cache or reference_cache_of(session_factory)
        #: Outcomes told when the transaction commits (:meth:`record_outcome`).
        self.outcomes: list[Outcome] = []

    def __enter__(self) -> Self:
        self.session = self.session_factory()
        self.reads = ReferenceReads(self.session, self.reference_cache)
        self.requests = SqlRequestRepository(self.session, self.reads)
        self.catalogue = SqlCatalogueRepository(self.session, self.reads)
        self.decisions = SqlDecisionRepository(self.session)
        self.credentials = SqlCredentialRepository(self.session)
        self.credential_operations = SqlCredentialOperationRepository(self.session)
        self.bulk_decisions = SqlBulkDecisionRepository(self.session)
        self.notifications = SqlNotificationRepository(self.session)
        self.portals = SqlPortalRepository(self.session, self.reads)
        self.admin_keys = SqlAdminKeyRepository(self.session, self.reads)
        self.outbox = SqlOutbox(self.session, self.queue_prefix)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # close() rolls back whatever was not committed; the objects the handler loaded stay
        # readable (they are plain), so a handler can return what it loaded.
        self.outbox.added = []
        self.outcomes = []
        self._forget()
        self.session.close()

    def _flush(self) -> None:
        # Requests first: credentials, notifications and audit rows refer to them.
        self.requests.flush()
        self.decisions.flush()
        self.credentials.flush()
        self.credential_operations.flush()
        self.bulk_decisions.flush()
        self.notifications.flush()
        self.outbox.flush()

    def _forget(self) -> None:
        for repository in (
            self.requests,
            self.decisions,
            self.credentials,
            self.credential_operations,
            self.bulk_decisions,
            self.notifications,
        ):
            repository.forget()

    def commit(self) -> None:
        self._flush()
        self.session.commit()
        # The next transaction reads the catalogue version again, and the cache again.
        self.reads = self._new_reads()
        self._publish_committed()

    def _publish_committed(self) -> None:
        """Publish the messages the transaction just committed; the sweep sends any left behind."""
        committed, self.outbox.added = self.outbox.added, []
        told, self.outcomes = self.outcomes, []
        for outcome in told:
            log_outcome(outcome)
        if committed and self.relay is not None:
            self.relay.publish_quietly(committed)

    def record_outcome(self, outcome: Outcome) -> None:
        """Log ``outcome`` once this transaction commits if it is ``committed_only``, else now."""
        if outcome.committed_only:
            self.outcomes.append(outcome)
        else:
            log_outcome(outcome)

    def rollback(self) -> None:
        self.session.rollback()
        self._forget()
        self.reads = self._new_reads()
        self.outbox.added = []
        self.outcomes = []

    def _new_reads(self) -> ReferenceReads:
        reads = ReferenceReads(self.session, self.reference_cache)
        for repository in (self.requests, self.catalogue, self.portals, self.admin_keys):
            repository.reads = reads
        return reads
