"""The database hot path on real PostgreSQL: the reference cache and its invalidation, the statements.

Each worker process caches the catalogue, the portals and the admin keys, and checks one
row (``catalogue_version``) per transaction. These tests warm one process's cache, change
the data from another process (or from psql), and show that the next message sees it.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.orm import sessionmaker

from domain import commands, handlers
from domain.errors import Unauthorized
from domain.model import (
    AdminKey,
    App,
    DecisionOutcome,
    NotificationKind,
    Portal,
    Status,
    utcnow,
)
from infra.bootstrap import Services
from infra.cli import producer
from infra.credentials import signing
from infra.credentials.sealing import generate_portal_keypair
from infra.db import catalogue_file, migrate, orm, views
from infra.db.unit_of_work import SqlUnitOfWork
from tests import services as svc
from tests.conftest import PORTAL_ID, TEST_CATALOGUE, Parties
from tests.unit.fakes import FakeMailer

pytestmark = pytest.mark.integration

#: The deployment the decisions of these tests are signed for.
AUDIENCE = "accessflow-reference-cache"
#: The tables each worker process caches; no SELECT from them once the cache is warm.
CACHED = set(orm.CACHED_TABLES)


def another_process(services: Services) -> SqlUnitOfWork:
    """A unit of work with a cache of its own, as the CLI or another worker process would have."""
    return SqlUnitOfWork(
        sessionmaker(services.engine, expire_on_commit=False),
        queue_prefix=services.settings.queue_prefix,
        relay=None,
    )


def sender_of(services: Services, portal_id: str) -> str:
    with services.uow() as uow:
        portal = uow.portals.get(portal_id)
        assert portal is not None
        return portal.broker_user


def submission(
    *, portal_id: str = PORTAL_ID, sender: str, plan_id: str = "partner", app_id: str | None = "acme-checkout"
) -> commands.RouteRequest:
    return commands.RouteRequest(
        request_id=str(uuid.uuid4()),
        consumer_id="acme",
        consumer_email="dev@acme.example",
        consumer_name="Acme",
        plan_id=plan_id,
        product_ids=("payments",),
        app_id=app_id,
        new_app_name=None if app_id else "An app of its own",
        new_app_description=None if app_id else "",
        justification=None,
        submitted_at=datetime.now(UTC),
        portal_id=portal_id,
        sender=sender,
    )


def route(services: Services, command: commands.RouteRequest) -> Status:
    return handlers.route_request(command, uow=services.uow())


def pending(services: Services) -> str:
    command = submission(sender=sender_of(services, PORTAL_ID))
    assert route(services, command) is Status.PENDING_REVIEW
    return command.request_id


def issue(services: Services, request_id: str) -> None:
    handlers.issue_credentials(
        commands.IssueCredentials(request_id),
        uow=services.uow(),
        issuer=services.issuer,
        sealer=services.sealer(),
        portal_sealer=services.portal_sealer,
    )


def email(services: Services, request_id: str, kind: NotificationKind = NotificationKind.APPROVE) -> None:
    handlers.send_notification(
        commands.SendNotification(request_id, kind), uow=services.uow(), mailer=FakeMailer(), admin_emails=[]
    )


def decide(
    services: Services, request_id: str, key_id: str, key: Ed25519PrivateKey, admin_id: str
) -> DecisionOutcome:
    decision = producer.signed_decision(
        request_id=request_id,
        approve=True,
        admin_id=admin_id,
        reason="fine",
        audience=AUDIENCE,
        key_id=key_id,
        private_key=key,
    )
    return handlers.decide(
        decision.to_command(), uow=services.uow(), verify=services.verify_signature, audience=AUDIENCE
    )


def outcome_reason(services: Services, request_id: str) -> str:
    with services.engine.connect() as connection:
        return str(
            connection.execute(
                sa.select(orm.decisions.c.outcome_reason).where(orm.decisions.c.request_id == request_id)
            ).scalar_one()
        )


def new_key(services: Services, admin_id: str) -> tuple[str, Ed25519PrivateKey]:
    """A fresh key for ``admin_id``, registered by another process."""
    key = Ed25519PrivateKey.generate()
    key_id = f"cache-{uuid.uuid4().hex[:8]}"
    with another_process(services) as uow:
        uow.admin_keys.add_key(
            AdminKey(key_id, admin_id, signing.public_key_text(key.public_key()), utcnow())
        )
        uow.commit()
    return key_id, key


def version(services: Services) -> str:
    with services.engine.connect() as connection:
        return str(connection.execute(sa.select(orm.catalogue_version.c.version)).scalar_one())


@contextmanager
def statements(services: Services) -> Iterator[list[str]]:
    """Every SQL statement the services' engine sends while the block runs."""
    sent: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        sent.append(" ".join(statement.split()))

    sa.event.listen(services.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        sa.event.remove(services.engine, "before_cursor_execute", record)


def tables_read(statement: str) -> set[str]:
    return set(re.findall(r"\b(?:FROM|JOIN)\s+(\w+)", statement, flags=re.IGNORECASE))


class TestAWarmCache:
    def test_lets_a_request_through_without_reading_the_catalogue(self, services: Services) -> None:
        # Given a process that has handled one request
        sender = sender_of(services, PORTAL_ID)
        warm = submission(sender=sender, plan_id="starter")
        route(services, warm)
        issue(services, warm.request_id)
        email(services, warm.request_id)

        # When it routes, provisions and emails another, on the same plan, app and portal
        command = submission(sender=sender, plan_id="starter")
        with statements(services) as sent:
            assert route(services, command) is Status.APPROVED
            issue(services, command.request_id)
            email(services, command.request_id)

        # Then it reads no cached table, and the catalogue version at most once per transaction
        assert [s for s in sent if tables_read(s) & CACHED] == []
        transactions_that_read = 3
        assert sum("catalogue_version" in s for s in sent) == transactions_that_read

    def test_reads_the_version_with_the_request_when_it_loads_the_request_first(
        self, services: Services
    ) -> None:
        # Given a provisioned request, in a process with a warm cache
        command = submission(sender=sender_of(services, PORTAL_ID), plan_id="starter")
        route(services, command)
        issue(services, command.request_id)

        # When its approve email is sent, which loads the request before the catalogue
        with statements(services) as sent:
            email(services, command.request_id)

        # Then the version comes with the request: no statement reads it alone
        assert [s for s in sent if s.startswith("SELECT catalogue_version.version")] == []
        assert any("catalogue_version" in s and "access_requests" in s for s in sent)


class TestARevokedKey:
    def test_is_refused_by_the_next_decision_after_the_revoke_commits(
        self, services: Services, parties: Parties
    ) -> None:
        # Given a key that this process has accepted once, so its cache holds it as active
        key_id, key = new_key(services, parties.admin_id)
        assert decide(services, pending(services), key_id, key, parties.admin_id) is DecisionOutcome.APPLIED

        # When another process revokes it
        with another_process(services) as uow:
            assert uow.admin_keys.revoke(key_id)
            uow.commit()

        # Then the next decision signed with it is refused
        request_id = pending(services)
        assert decide(services, request_id, key_id, key, parties.admin_id) is DecisionOutcome.REFUSED
        assert outcome_reason(services, request_id) == f"rejected_auth: key {key_id!r} was revoked"

    def test_is_refused_when_an_operator_revokes_it_in_psql(
        self, services: Services, parties: Parties
    ) -> None:
        # Given a key this process has accepted once
        key_id, key = new_key(services, parties.admin_id)
        assert decide(services, pending(services), key_id, key, parties.admin_id) is DecisionOutcome.APPLIED

        # When an operator revokes it with SQL, past every repository
        with services.engine.begin() as connection:
            connection.execute(
                sa.text("UPDATE admin_keys SET revoked_at = now() WHERE key_id = :key_id"), {"key_id": key_id}
            )

        # Then the next decision signed with it is refused all the same
        assert decide(services, pending(services), key_id, key, parties.admin_id) is DecisionOutcome.REFUSED

    def test_that_was_never_committed_changes_nothing(self, services: Services, parties: Parties) -> None:
        # Given a key this process has accepted once
        key_id, key = new_key(services, parties.admin_id)
        assert decide(services, pending(services), key_id, key, parties.admin_id) is DecisionOutcome.APPLIED

        # When a revoke is rolled back
        with another_process(services) as uow:
            assert uow.admin_keys.revoke(key_id)

        # Then the key still signs
        assert decide(services, pending(services), key_id, key, parties.admin_id) is DecisionOutcome.APPLIED


class TestAPortal:
    def test_registered_after_a_refusal_counts_at_once(self, services: Services) -> None:
        # Given a portal this process has been asked about, and found unknown
        portal_id, user = f"late-{uuid.uuid4().hex[:8]}", f"late-user-{uuid.uuid4().hex[:8]}"
        with pytest.raises(Unauthorized, match="unknown portal"):
            route(services, submission(portal_id=portal_id, sender=user))

        # When another process registers it
        portal = Portal(portal_id, "Late Portal", user, generate_portal_keypair()[1], frozenset({"acme"}))
        with another_process(services) as uow:
            uow.portals.upsert(portal)
            uow.commit()

        # Then its next submission is accepted
        assert route(services, submission(portal_id=portal_id, sender=user)) is Status.PENDING_REVIEW

    def test_that_changes_its_user_is_refused_under_the_old_one_at_once(self, services: Services) -> None:
        # Given a portal whose submissions this process has accepted
        portal_id, user = f"moving-{uuid.uuid4().hex[:8]}", f"old-user-{uuid.uuid4().hex[:8]}"
        portal = Portal(portal_id, "Moving Portal", user, generate_portal_keypair()[1], frozenset({"acme"}))
        with another_process(services) as uow:
            uow.portals.upsert(portal)
            uow.commit()
        assert route(services, submission(portal_id=portal_id, sender=user)) is Status.PENDING_REVIEW

        # When another process gives it a new AMQP user
        new_user = f"new-user-{uuid.uuid4().hex[:8]}"
        with another_process(services) as uow:
            uow.portals.upsert(
                Portal(portal_id, portal.name, new_user, portal.public_key, portal.consumer_ids)
            )
            uow.commit()

        # Then the old user is refused, and the new one accepted
        with pytest.raises(Unauthorized, match="publishes as AMQP user"):
            route(services, submission(portal_id=portal_id, sender=user))
        assert route(services, submission(portal_id=portal_id, sender=new_user)) is Status.PENDING_REVIEW

    def test_written_but_rolled_back_never_reaches_the_cache(self, services: Services) -> None:
        # Given a unit of work that registers a portal, reads it back, and does not commit
        portal_id, user = f"ghost-{uuid.uuid4().hex[:8]}", f"ghost-user-{uuid.uuid4().hex[:8]}"
        with services.uow() as uow:
            uow.portals.upsert(Portal(portal_id, "Ghost", user, generate_portal_keypair()[1], frozenset()))
            assert uow.portals.get(portal_id) is not None  # its own write, read past the cache

        # Then the next unit of work of the same process does not know it
        with services.uow() as uow:
            assert uow.portals.get(portal_id) is None
            assert uow.portals.by_broker_user(user) is None

    def test_written_after_a_cached_read_and_rolled_back_never_reaches_the_cache(
        self, services: Services
    ) -> None:
        # Given a unit of work that reads through the cache (so holds the version), then
        # registers a portal and reads it back, and does not commit
        portal_id, user = f"ghost-{uuid.uuid4().hex[:8]}", f"ghost-user-{uuid.uuid4().hex[:8]}"
        with services.uow() as uow:
            assert uow.portals.get(PORTAL_ID) is not None
            uow.portals.upsert(Portal(portal_id, "Ghost", user, generate_portal_keypair()[1], frozenset()))
            assert uow.portals.get(portal_id) is not None

        # Then the next unit of work of the same process does not know it
        with services.uow() as uow:
            assert uow.portals.get(portal_id) is None


class TestTheCatalogue:
    def test_a_plan_changed_by_a_catalogue_load_counts_at_once(self, services: Services) -> None:
        # Given a plan of its own, used once by this process (so cached)
        plan_id = f"plan-{uuid.uuid4().hex[:8]}"
        catalogue = catalogue_file.read(TEST_CATALOGUE)
        plan = catalogue_file.PlanEntry(
            id=plan_id, name="Metered", auto_approve=True, rate_limit_per_minute=10, products=["payments"]
        )
        catalogue_file.load(catalogue.model_copy(update={"plans": [plan]}), another_process(services))
        sender = sender_of(services, PORTAL_ID)
        first = submission(sender=sender, plan_id=plan_id)
        route(services, first)
        issue(services, first.request_id)

        # When a catalogue load raises its rate limit
        raised = plan.model_copy(update={"rate_limit_per_minute": 99})
        catalogue_file.load(catalogue.model_copy(update={"plans": [raised]}), another_process(services))

        # Then the next credential of the plan carries the new limit
        second = submission(sender=sender, plan_id=plan_id)
        route(services, second)
        issue(services, second.request_id)
        with services.uow() as uow:
            credential = uow.credentials.for_request(second.request_id)
            assert credential is not None
            assert credential.rate_limit_per_minute == 99

    def test_an_app_created_by_a_request_that_rolled_back_is_not_kept(self, services: Services) -> None:
        # Given a unit of work that creates an app, reads it back, and does not commit
        app_id = f"app-{uuid.uuid4().hex[:8]}"
        with services.uow() as uow:
            uow.catalogue.add_app(made_by_a_request(app_id))
            assert uow.catalogue.app(app_id) is not None

        # Then a later unit of work does not find it
        with services.uow() as uow:
            assert uow.catalogue.app(app_id) is None

    def test_an_app_not_found_is_found_once_created(self, services: Services) -> None:
        # Given an app id this process looked up and did not find
        app_id = f"app-{uuid.uuid4().hex[:8]}"
        with services.uow() as uow:
            assert uow.catalogue.app(app_id) is None

        # When a request creates it, which does not replace the catalogue version
        before = version(services)
        with another_process(services) as uow:
            uow.catalogue.add_app(made_by_a_request(app_id))
            uow.commit()
        assert version(services) == before

        # Then it is found
        with services.uow() as uow:
            assert uow.catalogue.app(app_id) is not None


def made_by_a_request(app_id: str) -> App:
    return App(id=app_id, consumer_id="acme", name="Made by a request")


class TestTheVersion:
    @pytest.mark.parametrize(
        ("table", "insert", "update", "delete"),
        [
            (
                "products",
                "INSERT INTO products VALUES (:id, 'P', 'api_key')",
                "UPDATE products SET name = 'Q' WHERE id = :id",
                "DELETE FROM products WHERE id = :id",
            ),
            (
                "plans",
                "INSERT INTO plans VALUES (:id, 'P', true, 1, NULL, '[]')",
                "UPDATE plans SET rate_limit_per_minute = 2 WHERE id = :id",
                "DELETE FROM plans WHERE id = :id",
            ),
            (
                "consumers",
                "INSERT INTO consumers VALUES (:id, 'c@example.com', 'C')",
                "UPDATE consumers SET name = 'D' WHERE id = :id",
                "DELETE FROM consumers WHERE id = :id",
            ),
            (
                "admins",
                "INSERT INTO admins VALUES (:id, 'a@example.com')",
                "UPDATE admins SET email = 'b@example.com' WHERE id = :id",
                "DELETE FROM admins WHERE id = :id",
            ),
            (
                "portals",
                "INSERT INTO portals VALUES (:id, 'P', :id, 'key', '')",
                "UPDATE portals SET name = 'Q' WHERE id = :id",
                "DELETE FROM portals WHERE id = :id",
            ),
            (
                "portal_consumers",
                "INSERT INTO portal_consumers VALUES ('acme-portal', :id)",
                "UPDATE portal_consumers SET consumer_id = :id WHERE consumer_id = :id",
                "DELETE FROM portal_consumers WHERE consumer_id = :id",
            ),
            (
                "admin_keys",
                "INSERT INTO admin_keys VALUES (:id, 'dana', 'key', now(), NULL)",
                "UPDATE admin_keys SET revoked_at = now() WHERE key_id = :id",
                "DELETE FROM admin_keys WHERE key_id = :id",
            ),
        ],
    )
    def test_changes_with_every_write_to_a_cached_table(
        self, services: Services, table: str, insert: str, update: str, delete: str
    ) -> None:
        entry_id = f"v-{uuid.uuid4().hex[:8]}"
        if table == "portal_consumers":  # refers to a consumer; made first, outside the count
            with services.engine.begin() as connection:
                connection.execute(
                    sa.text("INSERT INTO consumers VALUES (:id, 'c@example.com', 'C')"), {"id": entry_id}
                )
        for statement in (insert, update, delete):
            before = version(services)
            with services.engine.begin() as connection:
                connection.execute(sa.text(statement), {"id": entry_id})
            assert version(services) != before, statement
        if table == "portal_consumers":
            with services.engine.begin() as connection:
                connection.execute(sa.text("DELETE FROM consumers WHERE id = :id"), {"id": entry_id})

    def test_does_not_change_when_a_request_creates_an_app_but_does_when_one_changes(
        self, services: Services
    ) -> None:
        app_id = f"v-{uuid.uuid4().hex[:8]}"
        before = version(services)
        with services.engine.begin() as connection:
            connection.execute(sa.text("INSERT INTO apps VALUES (:id, 'acme', 'A', '')"), {"id": app_id})
        assert version(services) == before  # requests create apps all the time: no invalidation
        for statement in ("UPDATE apps SET name = 'B' WHERE id = :id", "DELETE FROM apps WHERE id = :id"):
            before = version(services)
            with services.engine.begin() as connection:
                connection.execute(sa.text(statement), {"id": app_id})
            assert version(services) != before, statement

    def test_is_kept_by_a_trigger_on_every_cached_table(self, services: Services) -> None:
        with services.engine.connect() as connection:
            triggered = set(
                connection.execute(
                    sa.text(
                        "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                        "JOIN pg_proc p ON p.oid = t.tgfoid WHERE p.proname = 'bump_catalogue_version'"
                    )
                ).scalars()
            )
        assert triggered == CACHED

    def test_is_not_changed_by_a_write_that_rolls_back(self, services: Services) -> None:
        before = version(services)
        with services.engine.connect() as connection:
            connection.execute(sa.text("UPDATE products SET name = name"))
            connection.rollback()
        assert version(services) == before


class TestTheWrites:
    def test_a_state_change_and_its_audit_rows_are_one_statement(self, services: Services) -> None:
        # Given a request approved at routing
        command = submission(sender=sender_of(services, PORTAL_ID), plan_id="starter")
        route(services, command)

        # When its credentials are issued, which moves it to provisioned
        with statements(services) as sent:
            issue(services, command.request_id)

        # Then one statement updates the request and appends its audit row, and none reads the trail alone
        writes = [s for s in sent if "audit_log" in s and not s.startswith("SELECT")]
        assert len(writes) == 1
        assert "UPDATE access_requests" in writes[0]
        assert "INSERT INTO audit_log" in writes[0]
        assert [s for s in sent if s.startswith("SELECT") and tables_read(s) == {"audit_log"}] == []

    def test_a_unit_of_work_that_changes_nothing_writes_nothing(self, services: Services) -> None:
        request_id = pending(services)
        with statements(services) as sent, services.uow() as uow:
            assert uow.requests.get(request_id, for_update=True) is not None
            uow.commit()
        assert [s for s in sent if not s.startswith("SELECT")] == []

    def test_a_loaded_notification_that_changed_is_written_back(self, services: Services) -> None:
        request_id = pending(services)
        email(services, request_id, NotificationKind.REVIEW)  # no recipients: recorded as failed
        with services.uow() as uow:
            notification = uow.notifications.get(request_id, NotificationKind.REVIEW, for_update=True)
            assert notification is not None
            assert notification.id is not None
            attempts = notification.attempts
            notification.attempts += 1
            uow.commit()
        with services.uow() as uow:
            notification = uow.notifications.get(request_id, NotificationKind.REVIEW)
            assert notification is not None
            assert notification.attempts == attempts + 1

    def test_a_loaded_credential_that_was_revealed_is_written_back(self, services: Services) -> None:
        # Given a v1 request (no portal) provisioned for an app of its own: its secret is kept sealed
        command = dataclasses.replace(submission(sender="", plan_id="starter", app_id=None), portal_id=None)
        handlers.route_request(command, uow=services.uow(), accept_v1_submissions=True)
        issue(services, command.request_id)
        with services.uow() as uow:
            request = uow.requests.get(command.request_id)
            assert request is not None and request.app_id is not None
            app_id = request.app_id

        # When an operator reveals the app's credentials twice
        first, second = (
            views.reveal_credentials(services.uow(), services.sealer().unseal, app_id),
            views.reveal_credentials(services.uow(), services.sealer().unseal, app_id),
        )

        # Then the secret is shown the first time only
        assert first[0]["secret"] and first[0]["revealed_at"]
        assert second[0]["secret"] is None

    def test_the_engine_prepares_a_statement_on_its_second_run(self, services: Services) -> None:
        # Server-side prepared statements: parsed and planned once per connection.
        marker = f"prepared-{uuid.uuid4().hex[:8]}"
        query = sa.select(sa.literal(marker, sa.String).label("marker"))
        with services.engine.connect() as connection:
            for _ in range(2):
                connection.execute(query)
            prepared = connection.execute(
                sa.text("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%marker%'")
            ).scalar_one()
        assert prepared >= 1


class TestTheMigration:
    def test_goes_down_and_up_again(self, postgres_server: str) -> None:
        with svc.fresh_database(postgres_server) as url:
            migrate.upgrade(url)
            command.downgrade(migrate.alembic_config(url), "0005")
            migrate.upgrade(url)
            engine = sa.create_engine(url)
            try:
                with engine.connect() as connection:
                    assert connection.execute(sa.select(orm.catalogue_version.c.version)).scalar_one()
            finally:
                engine.dispose()
