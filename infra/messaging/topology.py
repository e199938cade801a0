"""The broker is a boundary: accessflow's exchanges, queues and bindings, and who may touch what.

Outside parties never reach a queue directly. Each publishes to an exchange of its own
kind, as an AMQP user of its own, and RabbitMQ checks every step (rabbitmq.com/docs/
access-control): the exchange it may write to, the routing key it may use there (topic
authorisation), and the ``user-id`` property it may set (validated user-id)::

    portal P ---rk "P"-----------> <prefix>.in.submissions (topic) --"#"--> <prefix>.requests
    admin tool -rk <admin id>----> <prefix>.in.decisions   (topic) --"#"--> <prefix>.decisions
    workers ----rk "P.<event>"---> <prefix>.out.events     (topic) --"P.#"--> <prefix>.portal.P.events
                                        |                          (P consumes)
                                        |                          --"admins.#"--> <prefix>.admin.events
                                        |                          (the admin tool consumes)
                                        | alternate-exchange: no queue is bound for it
                                        v
                                   <prefix>.out.unrouted (fanout) -----> <prefix>.events.unrouted
    workers <--default exchange--> <prefix>.{requests,decisions,credentials,notifications,gateway} (+ .XQ, .DQ)

Only the workers (and the operators' dead-letter replay) may write to the default
exchange, which reaches every queue of the vhost: so only they can put a message on an
internal queue. A portal can send a submission only under its own portal id and read
only its own events; the admin tool can only send decisions and read the admins' events
(a bulk decision's results).

Nobody outside accessflow declares or binds anything: every queue, exchange and binding
above is accessflow's, made by ``accessflow broker setup`` and again, idempotently, by
the workers at boot, each portal's events queue included. Whoever declares a queue
chooses its arguments, ``x-dead-letter-exchange`` and ``x-dead-letter-routing-key``
among them; RabbitMQ asks the declarer only for read on the queue and write on that
exchange, checks no topic permission for the dead-letter routing key, and a
dead-lettered message keeps the properties it was published with. A portal allowed to
declare (and bind) a queue of its own could bind it to its own events, which the workers
publish, give it a TTL of 0 and dead-letter them into the submissions exchange under
another portal's id: they would reach the requests queue with that portal's routing key
and the workers' validated ``user-id``. So portals have no configure permission at all
(see :func:`permissions`).

:class:`Topology` names everything; :func:`declare` declares the exchanges, the unrouted
queue, the portals' events queues and the bindings on a channel (the workers call it at
boot); :func:`definitions` builds the RabbitMQ definitions document (users, permissions,
topic permissions and the same topology) that ``accessflow broker setup`` imports into a
node.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dramatiq.common import xq_name

from infra.messaging.broker import QuorumRabbitmqBroker, make_broker
from infra.settings import Settings
from messages.events import ADMINS

if TYPE_CHECKING:
    from pika.adapters.blocking_connection import BlockingChannel

#: The queues the workers consume, declared by dramatiq with quorum arguments.
WORK_QUEUES: tuple[str, ...] = ("requests", "decisions", "credentials", "notifications", "gateway")
#: The only hashing algorithm we write; RabbitMQ's default since 3.6.
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
#: What a portal id may be: it becomes a routing key word and part of regexes, so no dots,
#: topic wildcards or regex syntax; and never :data:`~messages.events.ADMINS`, the first word
#: of the admins' events (:func:`check_portal_id`).
PORTAL_ID = re.compile(r"^[A-Za-z0-9_-]+$")
#: A regex that matches no resource name: RabbitMQ's "nothing".
NOTHING = "^$"
#: A regex matching the binding key of a portal's events queue, ``<portal id>.#``, and no other key.
PORTAL_EVENTS_BINDING_KEY = "^" + PORTAL_ID.pattern.removeprefix("^").removesuffix("$") + r"\.#$"
#: Where the definitions for the default deployment are shipped, and what they are made for.
SHIPPED_DEFINITIONS = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "definitions.json"
SHIPPED_PREFIX = "accessflow"
SHIPPED_VHOST = "accessflow"


@dataclass(frozen=True)
class Topology:
    """Every exchange and queue name of one deployment, all under ``prefix``."""

    prefix: str = "accessflow"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.prefix):
            raise ValueError(f"invalid queue prefix {self.prefix!r}")

    @property
    def submissions_exchange(self) -> str:
        """Topic exchange where portals publish access requests, routing key = their portal id."""
        return f"{self.prefix}.in.submissions"

    @property
    def decisions_exchange(self) -> str:
        """Topic exchange where the admin tool publishes signed decisions, routing key = admin id."""
        return f"{self.prefix}.in.decisions"

    @property
    def events_exchange(self) -> str:
        """Topic exchange where accessflow publishes events to portals, routing key ``<portal_id>.<event>``."""
        return f"{self.prefix}.out.events"

    @property
    def unrouted_exchange(self) -> str:
        """Fanout exchange, the events exchange's alternate: an event no portal queue wants is kept."""
        return f"{self.prefix}.out.unrouted"

    @property
    def unrouted_queue(self) -> str:
        """Quorum queue behind :attr:`unrouted_exchange`; alert on its depth."""
        return f"{self.prefix}.events.unrouted"

    def queue(self, name: str) -> str:
        """A work queue: ``<prefix>.<name>`` for a name in :data:`WORK_QUEUES`."""
        if name not in WORK_QUEUES:
            raise ValueError(f"unknown work queue {name!r}; expected one of {WORK_QUEUES}")
        return f"{self.prefix}.{name}"

    def dead_letter_queue(self, name: str) -> str:
        """Where a work queue dead-letters: ``<prefix>.<name>.XQ``."""
        return xq_name(self.queue(name))

    @property
    def admin_events_queue(self) -> str:
        """Quorum queue of the events for the admins' tools (``admins.#``): only the admin tool reads it."""
        return f"{self.prefix}.admin.events"

    def portal_events_queue(self, portal_id: str) -> str:
        """A portal's queue for its events: accessflow declares and binds it, the portal only consumes."""
        check_portal_id(portal_id)
        return f"{self.prefix}.portal.{portal_id}.events"

    def portal_events_binding(self, portal_id: str) -> tuple[str, str, str]:
        """(exchange, queue, routing key) that brings a portal its own events, ``<portal_id>.#``, and no other's."""
        return (self.events_exchange, self.portal_events_queue(portal_id), f"{portal_id}.#")

    def bindings(self, portal_ids: Iterable[str] = ()) -> list[tuple[str, str, str]]:
        """(exchange, queue, routing key) of every binding accessflow owns, with those of ``portal_ids``."""
        return [
            (self.submissions_exchange, self.queue("requests"), "#"),
            (self.decisions_exchange, self.queue("decisions"), "#"),
            (self.unrouted_exchange, self.unrouted_queue, ""),
            (self.events_exchange, self.admin_events_queue, f"{ADMINS}.#"),
            *(self.portal_events_binding(portal_id) for portal_id in sorted(set(portal_ids))),
        ]

    def exchanges(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(name, type, arguments) of every exchange accessflow owns."""
        return [
            (self.submissions_exchange, "topic", {}),
            (self.decisions_exchange, "topic", {}),
            (self.unrouted_exchange, "fanout", {}),
            (self.events_exchange, "topic", {"alternate-exchange": self.unrouted_exchange}),
        ]


def check_portal_id(portal_id: str) -> str:
    """``portal_id`` if it may name a portal's routing key and queue; else ValueError, saying why."""
    if not PORTAL_ID.fullmatch(portal_id):
        raise ValueError(f"invalid portal id {portal_id!r}: letters, digits, '_' and '-' only")
    if portal_id == ADMINS:
        raise ValueError(f"invalid portal id {portal_id!r}: reserved for the admins' events")
    return portal_id


#: The arguments of the unrouted-events queue.
UNROUTED_QUEUE_ARGUMENTS: Mapping[str, Any] = {"x-queue-type": "quorum"}
#: The arguments of the admins' events queue.
ADMIN_EVENTS_QUEUE_ARGUMENTS: Mapping[str, Any] = {"x-queue-type": "quorum"}
#: The arguments of each portal's events queue: no dead-lettering, no TTL, nothing a portal chose.
PORTAL_EVENTS_QUEUE_ARGUMENTS: Mapping[str, Any] = {"x-queue-type": "quorum"}


@dataclass(frozen=True)
class QueueArguments:
    """The arguments the workers declare their queues with, so that nobody else declares them differently.

    A queue's arguments cannot change once declared: a second declaration with other
    arguments is refused with PRECONDITION_FAILED, and the workers would not boot. So
    whoever declares a work queue before the workers do (:func:`declare`, the definitions
    import) takes the arguments from here, and here they come from the workers' broker.
    """

    #: Arguments of a work queue, given its full name (``<prefix>.requests``).
    work: Callable[[str], Mapping[str, Any]]
    #: Arguments of a work queue's dead-letter queue, given the work queue's full name.
    dead_letter: Callable[[str], Mapping[str, Any]]

    @classmethod
    def from_broker(cls, broker: QuorumRabbitmqBroker) -> QueueArguments:
        """What ``broker`` declares: its quorum arguments, and its dead-letter queues' arguments."""

        def dead_letter(_queue_name: str) -> Mapping[str, Any]:
            # Mirrors QuorumRabbitmqBroker._declare_xq_queue, which declares rather than returns;
            # tests/unit/test_topology.py checks that the two agree.
            arguments: dict[str, Any] = {"x-queue-type": "quorum"}
            if broker.dead_letter_ttl_ms:
                arguments["x-message-ttl"] = broker.dead_letter_ttl_ms
            return arguments

        return cls(work=broker._build_queue_arguments, dead_letter=dead_letter)

    @classmethod
    def from_settings(cls, settings: Settings) -> QueueArguments:
        """What the workers' broker, built from ``settings``, declares (nothing is connected)."""
        amqp = settings.model_copy(update={"broker_url": "amqp://127.0.0.1/"})
        broker = make_broker(amqp)
        assert isinstance(broker, QuorumRabbitmqBroker)
        return cls.from_broker(broker)

    @classmethod
    def defaults(cls) -> QueueArguments:
        """What the workers declare when no ``ACCESSFLOW_*`` setting changes it."""
        return cls.from_settings(Settings.model_construct())


def declare(
    channel: BlockingChannel,
    topology: Topology,
    *,
    queue_arguments: QueueArguments | None = None,
    portal_ids: Iterable[str] = (),
) -> None:
    """Declare accessflow's exchanges, the unrouted-events queue, portals' events queues and the bindings; idempotent.

    The work queues bound here (``<prefix>.requests`` and ``<prefix>.decisions``) must exist:
    the workers call this after dramatiq has declared its queues. With ``queue_arguments``
    they are declared first (with their dead-letter queues), with exactly those arguments.

    Each portal in ``portal_ids`` gets its events queue (:data:`PORTAL_EVENTS_QUEUE_ARGUMENTS`)
    bound to the events exchange with ``<portal_id>.#``, as :func:`definitions` has them:
    a portal registered after the last ``broker setup`` receives its events from the next
    worker boot on, instead of having them kept in the unrouted queue. Portals declare and
    bind nothing themselves (see the module docstring). A queue of that name that exists
    with other arguments (one a portal declared before portals lost configure, say) makes
    RabbitMQ close the channel with PRECONDITION_FAILED: delete it, it is not ours.

    Parameters:
      channel: an open channel of a user with configure, write and read on ``<prefix>.*``
        (the workers' user).
      topology: the names.
      queue_arguments: the workers' queue arguments, to declare the two bound work queues.
      portal_ids: the portals to declare an events queue and its binding for (the
        portals registered in the database); each must match :data:`PORTAL_ID`.

    Raises:
      ValueError: a portal id is invalid (before anything is declared).
    """
    portals = sorted(set(portal_ids))
    for portal_id in portals:
        check_portal_id(portal_id)
    for name, kind, arguments in topology.exchanges():
        channel.exchange_declare(exchange=name, exchange_type=kind, durable=True, arguments=dict(arguments))
    channel.queue_declare(
        queue=topology.unrouted_queue, durable=True, arguments=dict(UNROUTED_QUEUE_ARGUMENTS)
    )
    channel.queue_declare(
        queue=topology.admin_events_queue, durable=True, arguments=dict(ADMIN_EVENTS_QUEUE_ARGUMENTS)
    )
    if queue_arguments is not None:
        for name in ("requests", "decisions"):
            queue = topology.queue(name)
            channel.queue_declare(
                queue=xq_name(queue), durable=True, arguments=dict(queue_arguments.dead_letter(queue))
            )
            channel.queue_declare(queue=queue, durable=True, arguments=dict(queue_arguments.work(queue)))
    for portal_id in portals:
        channel.queue_declare(
            queue=topology.portal_events_queue(portal_id),
            durable=True,
            arguments=dict(PORTAL_EVENTS_QUEUE_ARGUMENTS),
        )
    for exchange, queue, routing_key in topology.bindings(portals):
        channel.queue_bind(queue=queue, exchange=exchange, routing_key=routing_key)


# --------------------------------------------------------------------------------------
# Who may do what


@dataclass(frozen=True)
class Accounts:
    """The AMQP users of one deployment, one per role, each a different user."""

    #: The worker pools: they consume every work queue and publish events.
    workers: str
    #: The admin tool, which publishes signed decisions and reads the admins' events.
    admin_tool: str
    #: The operators' CLI: ``dlq list``/``dlq replay`` and queue status.
    ops: str
    #: Portal id -> the AMQP user that portal connects as.
    portals: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for portal_id in self.portals:
            check_portal_id(portal_id)
        names = [self.workers, self.admin_tool, self.ops, *self.portals.values()]
        if any(not name for name in names):
            raise ValueError("every AMQP user needs a name")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            # One user in two roles would get only the last role's permissions (one entry per user and vhost).
            raise ValueError(f"each role needs a user of its own; used twice: {', '.join(duplicates)}")

    @classmethod
    def defaults(cls, topology: Topology, portals: Mapping[str, str] | None = None) -> Accounts:
        """``<prefix>-workers``, ``<prefix>-admin``, ``<prefix>-ops``, and the given portals."""
        prefix = topology.prefix
        return cls(f"{prefix}-workers", f"{prefix}-admin", f"{prefix}-ops", dict(portals or {}))

    def users(self) -> list[str]:
        """Every user, workers first, portals last in portal-id order."""
        return [self.workers, self.admin_tool, self.ops, *(self.portals[p] for p in sorted(self.portals))]


@dataclass(frozen=True)
class Permission:
    """One user's permission regexes in a vhost (configure, write, read), and why."""

    user: str
    configure: str
    write: str
    read: str


@dataclass(frozen=True)
class TopicPermission:
    """Which routing keys a user may publish with (write) or bind with (read) on a topic exchange."""

    user: str
    exchange: str
    write: str
    read: str


def _exactly(*names: str) -> str:
    """An anchored regex matching exactly these resource names."""
    return "^(" + "|".join(re.escape(name) for name in names) + ")$"


def _under(prefix: str) -> str:
    """An anchored regex matching every name that starts with ``prefix``."""
    return f"^{re.escape(prefix)}.*$"


def permissions(topology: Topology, accounts: Accounts) -> list[Permission]:
    """Each user's configure/write/read regexes (RabbitMQ's table: rabbitmq.com/docs/access-control).

    * workers: configure, write and read on every ``<prefix>.`` name: dramatiq declares,
      consumes and publishes to the work queues (and their ``.DQ``/``.XQ``), the workers
      declare the exchanges and bindings (:func:`declare`) and publish events. Write on
      ``amq.default`` too, because dramatiq reaches its queues through the default exchange
      (and a queue declared with a dead-letter exchange ``""`` needs write on it).
    * admin tool: write on the decisions exchange only (``basic.publish`` needs write on the
      exchange and nothing else); read on the admins' events queue only (a bulk decision's
      results); it declares nothing. No write on a queue: it binds nothing.
    * portal P: configure nothing; write on the submissions exchange only (to publish); read
      on its own events queue ``<prefix>.portal.P.events`` only (``basic.consume``,
      ``basic.get``; ``basic.ack`` and a passive ``queue.declare`` need no permission).
      That queue and its binding are accessflow's (:func:`definitions`, :func:`declare`).
      No configure means no ``queue.declare``, ``queue.delete``, ``exchange.declare``, so no
      queue with a dead-letter exchange of the portal's choosing (module docstring); no
      write on a queue and no read on an exchange means no ``queue.bind``/``queue.unbind``
      and no ``exchange.bind`` (which needs read on the source exchange), so no route of
      the portal's making, for instance from the events exchange into the submissions
      exchange. No write on ``amq.default``: no internal queue is within its reach. Both
      regexes name exactly one resource, so no name accessflow adds later is granted by
      accident.
    * ops: read on the dead-letter queues (``basic.get``), write on ``amq.default`` (replay
      publishes back onto the work queues), configure nothing. A passive ``queue.declare``
      (queue depth) and ``basic.ack``/``basic.nack`` need no permission at all, so the work
      queues themselves stay unreadable: ops cannot take work from them.
    """
    prefix = topology.prefix
    everything = _under(f"{prefix}.")
    granted = [
        Permission(
            accounts.workers,
            configure=everything,
            write=f"^({re.escape(prefix)}\\..*|amq\\.default)$",
            read=everything,
        ),
        Permission(
            accounts.admin_tool,
            configure=NOTHING,
            write=_exactly(topology.decisions_exchange),
            read=_exactly(topology.admin_events_queue),
        ),
        Permission(
            accounts.ops,
            configure=NOTHING,
            write=_exactly("amq.default"),
            read=_exactly(*(topology.dead_letter_queue(name) for name in WORK_QUEUES)),
        ),
    ]
    for portal_id in sorted(accounts.portals):
        granted.append(
            Permission(
                accounts.portals[portal_id],
                configure=NOTHING,
                write=_exactly(topology.submissions_exchange),
                read=_exactly(topology.portal_events_queue(portal_id)),
            )
        )
    return granted


def topic_permissions(topology: Topology, accounts: Accounts) -> list[TopicPermission]:
    """Routing-key permissions on the topic exchanges.

    RabbitMQ checks them only for a user that has some on that exchange (otherwise every
    key is allowed), on ``basic.publish`` (write) and on ``queue.bind``/``exchange.bind``
    (read, against the binding key).

    * workers, events exchange: publish with any key (an event for any portal); bind only
      with ``<portal id>.#`` (:func:`declare` binds each portal's events queue so, and the
      admins' events queue with ``admins.#``, a word no portal id may be), never with a key
      that would bring one queue the events of several portals (``#``, ``*.x``).
    * portal P, submissions exchange: publish only with the key ``P``, so a submission's
      routing key names the portal that sent it; bind none.
    * portal P, events exchange: nothing, on purpose. A topic permission narrows what the
      vhost permissions already allow, and a portal may neither publish to the events
      exchange (no write on it) nor bind from it (no read on it, no write on any queue):
      RabbitMQ refuses both before it looks at a routing key. Its events come through the
      binding ``P.#`` that accessflow makes. A ``^$``/``^$`` entry would add no protection,
      only a second place to keep in step; what guards against the vhost permissions being
      widened again is tests/faults/test_broker_boundary.py, which expects each refusal.
    * the admin tool gets none: its routing key (the admin id) is not what authorises a
      decision; the signature inside it is.
    """
    granted = [
        TopicPermission(
            accounts.workers, topology.events_exchange, write=".*", read=PORTAL_EVENTS_BINDING_KEY
        )
    ]
    for portal_id in sorted(accounts.portals):
        granted.append(
            TopicPermission(
                accounts.portals[portal_id],
                topology.submissions_exchange,
                write=f"^{re.escape(portal_id)}$",
                read=NOTHING,
            )
        )
    return granted


# --------------------------------------------------------------------------------------
# Passwords, as RabbitMQ's internal backend stores them


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + utf-8 password)), salt 4 random bytes."""
    salt = secrets.token_bytes(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("RabbitMQ's salt is 4 bytes")
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode("ascii")


def verify_password(password: str, password_hash: str) -> bool:
    """Whether ``password`` matches a ``rabbit_password_hashing_sha256`` hash (constant time)."""
    try:
        raw = base64.b64decode(password_hash, validate=True)
    except ValueError:
        return False
    if len(raw) != 4 + hashlib.sha256().digest_size:
        return False
    return hmac.compare_digest(hash_password(password, salt=raw[:4]), password_hash)


# --------------------------------------------------------------------------------------
# The definitions document


def definitions(
    topology: Topology,
    *,
    vhost: str,
    accounts: Accounts,
    passwords: Mapping[str, str],
    queue_arguments: QueueArguments | None = None,
) -> dict[str, Any]:
    """A RabbitMQ definitions document for one deployment (``rabbitmqctl import_definitions``).

    It holds the vhost, the users (no tags; a ``rabbit_password_hashing_sha256`` hash for
    each user with a password in ``passwords``, an empty hash for the others, who then
    cannot log in with a password until one is set), their permissions and topic
    permissions, the exchanges, the queues and the bindings.

    The work queues are the workers' concern: their quorum arguments (delivery limit,
    dead-lettering) follow the workers' settings. They are in the document anyway, with
    exactly the workers' arguments (``queue_arguments``, by default those of the default
    settings) and with their ``.XQ`` dead-letter queues, because an import creates the
    bindings to ``<prefix>.requests`` and ``<prefix>.decisions`` and a binding to a queue
    that does not exist is not created; and because a portal's submission must land on a
    queue even before any worker has booted. When the workers then declare them, the
    arguments are equal and the declaration is a no-op. The delay queues (``.DQ``) are
    left to dramatiq.

    Each portal of ``accounts`` gets its events queue (:data:`PORTAL_EVENTS_QUEUE_ARGUMENTS`)
    and its binding ``<portal_id>.#`` from the events exchange: portals declare and bind
    nothing (module docstring).

    Passwords never appear in the document, only salted hashes; with ``passwords`` empty
    the document is deterministic, and is what ``deploy/rabbitmq/definitions.json`` holds.

    An import adds and replaces; it never removes, and it leaves an existing queue as it is,
    arguments included. On a node set up before portals lost configure, what a portal
    declared or bound itself is still there: :func:`infra.messaging.broker_admin.apply_definitions`
    fails on a portal events queue whose arguments differ; any other queue under
    ``<prefix>.portal.``, any binding from the events exchange other than ``P.#`` to P's
    queue, and any exchange-to-exchange binding into the submissions exchange must be
    deleted by an operator. The events-exchange topic permission portals had is harmless
    where it remains (the vhost permissions refuse first).
    """
    unknown = sorted(set(passwords) - set(accounts.users()))
    if unknown:
        raise ValueError(f"passwords for users that have no role: {', '.join(unknown)}")
    arguments = queue_arguments or QueueArguments.defaults()

    def queue(name: str, queue_args: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "vhost": vhost,
            "durable": True,
            "auto_delete": False,
            "arguments": dict(queue_args),
        }

    queues = [
        queue(topology.unrouted_queue, UNROUTED_QUEUE_ARGUMENTS),
        queue(topology.admin_events_queue, ADMIN_EVENTS_QUEUE_ARGUMENTS),
    ]
    for name in WORK_QUEUES:
        work = topology.queue(name)
        queues += [queue(work, arguments.work(work)), queue(xq_name(work), arguments.dead_letter(work))]
    queues += [
        queue(topology.portal_events_queue(portal_id), PORTAL_EVENTS_QUEUE_ARGUMENTS)
        for portal_id in sorted(accounts.portals)
    ]
    return {
        "vhosts": [{"name": vhost}],
        "users": [
            {
                "name": user,
                "password_hash": hash_password(passwords[user]) if user in passwords else "",
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": [],
            }
            for user in accounts.users()
        ],
        "permissions": [
            {"user": p.user, "vhost": vhost, "configure": p.configure, "write": p.write, "read": p.read}
            for p in permissions(topology, accounts)
        ],
        "topic_permissions": [
            {"user": t.user, "vhost": vhost, "exchange": t.exchange, "write": t.write, "read": t.read}
            for t in topic_permissions(topology, accounts)
        ],
        "exchanges": [
            {
                "name": name,
                "vhost": vhost,
                "type": kind,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": dict(exchange_args),
            }
            for name, kind, exchange_args in topology.exchanges()
        ],
        "queues": queues,
        "bindings": [
            {
                "source": exchange,
                "vhost": vhost,
                "destination": queue_name,
                "destination_type": "queue",
                "routing_key": routing_key,
                "arguments": {},
            }
            for exchange, queue_name, routing_key in topology.bindings(accounts.portals)
        ],
    }


def render(document: Mapping[str, Any]) -> str:
    """The document as deterministic JSON: sorted keys, two-space indent, a trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def shipped_definitions() -> str:
    """What ``deploy/rabbitmq/definitions.json`` must hold: the default deployment, without passwords."""
    topology = Topology(SHIPPED_PREFIX)
    document = definitions(
        topology,
        vhost=SHIPPED_VHOST,
        accounts=Accounts.defaults(topology),
        passwords={},
        queue_arguments=QueueArguments.defaults(),
    )
    return render(document)


def main(argv: Sequence[str] | None = None, *, target: Path = SHIPPED_DEFINITIONS) -> int:
    """``python -m infra.messaging.topology [--check]``: write (or check) the shipped definitions file."""
    args = list(sys.argv[1:] if argv is None else argv)
    expected = shipped_definitions()
    current = target.read_text(encoding="utf-8") if target.exists() else None
    if args == ["--check"]:
        if current != expected:
            print(f"{target} is out of date: run python -m infra.messaging.topology", file=sys.stderr)
            return 1
        return 0
    if args:
        print("usage: python -m infra.messaging.topology [--check]", file=sys.stderr)
        return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(expected, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
