"""The SQLAlchemy unit of work: one session, one transaction, outbox published after commit."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from sqlalchemy.orm import Session, sessionmaker

from infra.faults import crash_point
from infra.outbox import OutboxRelay, SqlOutbox
from infra.repositories import (
    SqlAdminKeyRepository,
    SqlCatalogueRepository,
    SqlCredentialRepository,
    SqlDecisionRepository,
    SqlNotificationRepository,
    SqlPortalRepository,
    SqlRequestRepository,
)


class SqlUnitOfWork:
    """Rolls back unless :meth:`commit` is called; after a commit, publishes what the outbox got."""

    session: Session
    requests: SqlRequestRepository
    catalogue: SqlCatalogueRepository
    decisions: SqlDecisionRepository
    credentials: SqlCredentialRepository
    notifications: SqlNotificationRepository
    portals: SqlPortalRepository
    admin_keys: SqlAdminKeyRepository
    outbox: SqlOutbox

    def __init__(
        self, session_factory: sessionmaker[Session], *, queue_prefix: str, relay: OutboxRelay | None
    ) -> None:
        self.session_factory = session_factory
        self.queue_prefix = queue_prefix
        self.relay = relay

    def __enter__(self) -> Self:
        self.session = self.session_factory()
        self.requests = SqlRequestRepository(self.session)
        self.catalogue = SqlCatalogueRepository(self.session)
        self.decisions = SqlDecisionRepository(self.session)
        self.credentials = SqlCredentialRepository(self.session)
        self.notifications = SqlNotificationRepository(self.session)
        self.portals = SqlPortalRepository(self.session)
        self.admin_keys = SqlAdminKeyRepository(self.session)
        self.outbox = SqlOutbox(self.session, self.queue_prefix)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # close() rolls back whatever was not committed; unlike rollback() it leaves loaded
        # objects readable, so a handler can return what it loaded.
        self.outbox.added = []
        self.session.close()

    def commit(self) -> None:
        self.session.commit()
        crash_point("after_commit")  # the fault suite's "crash after commit, before ack"
        committed, self.outbox.added = self.outbox.added, []
        if committed and self.relay is not None:
            self.relay.publish_quietly(committed)

    def rollback(self) -> None:
        self.session.rollback()
        self.outbox.added = []
