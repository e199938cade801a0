"""Fixtures shared by the integration and end-to-end tests: real services, isolated per run."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr

from domain.model import AdminKey, Portal, utcnow
from infra.bootstrap import Services, build
from infra.credentials import signing
from infra.credentials.sealing import generate_portal_keypair, generate_seal_key
from infra.db import catalogue_file, migrate
from infra.messaging.broker_admin import BrokerAdminError, Rabbitmqctl, apply_definitions
from infra.messaging.topology import Accounts, QueueArguments, Topology, definitions
from infra.settings import Settings
from tests import services as svc

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TEST_CATALOGUE = Path(__file__).resolve().parent / "catalog.yaml"
ADMIN = "admin@accessflow.example"
ESCALATION = "head-of-api@accessflow.example"
ADMIN_ID = "dana"
ADMIN_KEY_ID = "dana-2026-11"
#: Acme's portal speaks for consumer acme, Globex's for globex.
PORTAL_ID = "acme-portal"
OTHER_PORTAL_ID = "globex-portal"


@dataclass(frozen=True)
class PortalParty:
    id: str
    name: str
    consumers: tuple[str, ...]
    #: X25519, base64: the portal opens its sealed secrets with the private half.
    private_key: str = field(repr=False)
    public_key: str


@dataclass(frozen=True)
class Parties:
    """Who speaks to accessflow in the tests: an admin with a signing key, and two portals."""

    admin_id: str
    admin_key_id: str
    admin_key: Ed25519PrivateKey = field(repr=False)
    admin_key_file: Path
    portal: PortalParty
    other_portal: PortalParty


@dataclass(frozen=True)
class Boundary:
    """The run's own vhost on the shared RabbitMQ, with a user for each role (``accessflow broker setup``)."""

    vhost: str
    accounts: Accounts
    passwords: dict[str, str] = field(repr=False)
    host: str
    port: int
    #: A user the broker lets write everywhere: a misconfigured broker, to show the workers' own checks.
    intruder: str

    def url(self, user: str) -> str:
        password = self.passwords[user]
        return f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/{quote(self.vhost, safe='')}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    with svc.postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def parties(tmp_path_factory: pytest.TempPathFactory) -> Parties:
    keys = tmp_path_factory.mktemp("keys")
    key_file = keys / "dana.pem"
    signing.generate_keypair(key_file)

    def portal(portal_id: str, name: str, consumer: str) -> PortalParty:
        private, public = generate_portal_keypair()
        return PortalParty(portal_id, name, (consumer,), private, public)

    return Parties(
        admin_id=ADMIN_ID,
        admin_key_id=ADMIN_KEY_ID,
        admin_key=signing.load_private_key(key_file),
        admin_key_file=key_file,
        portal=portal(PORTAL_ID, "Acme Portal", "acme"),
        other_portal=portal(OTHER_PORTAL_ID, "Globex Portal", "globex"),
    )


@pytest.fixture(scope="session")
def database_url(postgres_server: str, parties: Parties, queue_prefix: str) -> Iterator[str]:
    """A database of this run's own, migrated to head, with the test catalogue and the parties loaded."""
    with svc.fresh_database(postgres_server) as url:
        migrate.upgrade(url)
        services = build(Settings(database_url=url, broker_url="stub://"))
        try:
            catalogue_file.load(catalogue_file.read(TEST_CATALOGUE), services.uow())
            with services.uow() as uow:
                for party in (parties.portal, parties.other_portal):
                    uow.portals.upsert(
                        Portal(
                            id=party.id,
                            name=party.name,
                            broker_user=portal_user(queue_prefix, party.id),
                            public_key=party.public_key,
                            consumer_ids=frozenset(party.consumers),
                            url=f"https://{party.id}.example",
                        )
                    )
                uow.admin_keys.upsert_admin(parties.admin_id, ADMIN)
                public_key = signing.public_key_text(parties.admin_key.public_key())
                uow.admin_keys.add_key(AdminKey(parties.admin_key_id, parties.admin_id, public_key, utcnow()))
                uow.commit()
        finally:
            services.close()
        yield url


def portal_user(queue_prefix: str, portal_id: str) -> str:
    return f"{queue_prefix}-{portal_id}"


@pytest.fixture(scope="session")
def amqp_server() -> Iterator[str]:
    """The RabbitMQ server, as its administrator (guest on the default vhost)."""
    with svc.rabbitmq_server() as url:
        yield url


@pytest.fixture(scope="session")
def queue_prefix() -> str:
    """Queue, exchange and user names of this run's own."""
    return f"aftest-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def boundary(amqp_server: str, queue_prefix: str) -> Iterator[Boundary]:
    """A vhost of this run's own with the deployment's users and permissions, deleted afterwards.

    Applied as an operator does, with the definitions ``accessflow broker setup`` imports;
    it needs ``rabbitmqctl`` for the node (a local one here).
    """
    topology = Topology(queue_prefix)
    accounts = Accounts.defaults(
        topology, {p: portal_user(queue_prefix, p) for p in (PORTAL_ID, OTHER_PORTAL_ID)}
    )
    intruder = f"{queue_prefix}-intruder"
    passwords = {user: secrets.token_urlsafe(16) for user in [*accounts.users(), intruder]}
    ctl = Rabbitmqctl()
    document = definitions(
        topology,
        vhost=queue_prefix,
        accounts=accounts,
        passwords={},
        queue_arguments=QueueArguments.defaults(),
    )
    try:
        apply_definitions(ctl, document, passwords={u: p for u, p in passwords.items() if u != intruder})
        ctl.run("add_user", intruder, stdin=passwords[intruder] + "\n", secrets=[passwords[intruder]])
        ctl.run("set_permissions", "-p", queue_prefix, intruder, "^$", ".*", ".*")
    except BrokerAdminError as error:
        svc.unavailable(f"cannot set up the broker boundary with rabbitmqctl: {error}")
    parts = urlsplit(amqp_server)
    try:
        yield Boundary(
            vhost=queue_prefix,
            accounts=accounts,
            passwords=passwords,
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5672,
            intruder=intruder,
        )
    finally:
        ctl.delete_vhost(queue_prefix)
        for user in [*accounts.users(), intruder]:
            ctl.delete_user(user)


@pytest.fixture(scope="session")
def broker_url(boundary: Boundary) -> str:
    """The workers' own AMQP URL, on the run's vhost."""
    return boundary.url(boundary.accounts.workers)


@pytest.fixture(scope="session")
def smtp() -> Iterator[svc.SmtpSink]:
    with svc.smtp_sink() as sink:
        yield sink


@pytest.fixture(scope="session")
def seal_key() -> str:
    return generate_seal_key()


@pytest.fixture(scope="session")
def settings(
    database_url: str,
    broker_url: str,
    boundary: Boundary,
    queue_prefix: str,
    smtp: svc.SmtpSink,
    seal_key: str,
) -> Settings:
    return Settings(
        database_url=database_url,
        broker_url=broker_url,
        queue_prefix=queue_prefix,
        smtp_host=smtp.host,
        smtp_port=smtp.port,
        seal_key=SecretStr(seal_key),
        admin_emails=[ADMIN],
        escalation_emails=[ESCALATION],
        broker_internal_users=[boundary.accounts.workers, boundary.accounts.ops],
        min_backoff_ms=100,
        max_backoff_ms=1_000,
        max_retries=3,
        outbox_sweep_seconds=1.0,
    )


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    built = build(settings)
    try:
        yield built
    finally:
        built.broker.close()
        built.close()
