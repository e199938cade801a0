"""Applying a definitions document (:func:`infra.messaging.topology.definitions`) to a RabbitMQ node.

Everything goes through ``rabbitmqctl``, which RabbitMQ ships on every node and which
needs no management plugin: ``import_definitions`` (RabbitMQ 3.8.2 and later; 3.10 reads
the document from standard input when no file is named), ``change_password`` (which
reads the password from standard input when it is not an argument), ``delete_vhost`` and
``delete_user``. Neither a password nor a password hash ever goes into an argument
vector, where ``ps`` would show it, or into a file; and an error message has every
secret we handed to rabbitmqctl masked before it is raised.

An import replaces each user it names, password included: a user named with an empty
hash loses the password it had. :func:`apply_definitions` therefore leaves out of the
import every existing user for whom the document has no new password, so that running
``accessflow broker setup`` again without the passwords file keeps everyone's password.

rabbitmqctl reports an import as "started" and RabbitMQ skips, silently, a binding whose
queue does not exist; so after importing, :func:`apply_definitions` reads back the
permissions, topic permissions, exchanges, queues and bindings, waiting (with a
deadline) until they are all there, and fails naming what is missing.

An import also keeps, silently, a queue that exists already, whatever its arguments. A
queue of ours that someone else declared first (a portal's events queue declared by the
portal, back when portals could declare, perhaps with an ``x-dead-letter-exchange``)
would stay as its declarer made it; so :func:`apply_definitions` then compares each
queue's arguments with the document's and fails, at once, naming the queues that differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger()

#: Shown instead of a secret in an error message.
MASK = "********"


class BrokerAdminError(RuntimeError):
    """rabbitmqctl failed or the node does not hold what was applied; secrets are masked in the message."""


def _mask(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


@dataclass(frozen=True)
class Rabbitmqctl:
    """Runs ``rabbitmqctl [-n NODE] ...`` with this process's environment plus ``env``.

    ``env`` carries what a node other than the local default needs: ``HOME`` (where the
    Erlang cookie is), ``RABBITMQ_CONF_ENV_FILE``, ``ERL_EPMD_ADDRESS`` and so on.
    """

    executable: str = "rabbitmqctl"
    node: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    #: Seconds before a call is given up (the command is killed).
    timeout: float = 120.0

    def run(self, *args: str, stdin: str | None = None, secrets: Sequence[str] = ()) -> str:
        """Run one command and return its standard output.

        Parameters:
          args: the command and its arguments; never a secret.
          stdin: what to write to its standard input (a document, a password).
          secrets: strings to mask in an error message (whatever ``stdin`` holds that is secret).

        Raises:
          BrokerAdminError: the command exited non-zero, could not start, or timed out.
        """
        argv = [self.executable, *(["-n", self.node] if self.node else []), *args]
        where = f"rabbitmqctl {args[0] if args else ''}" + (f" on {self.node}" if self.node else "")
        try:
            completed = subprocess.run(
                argv,
                input=stdin if stdin is not None else "",
                capture_output=True,
                text=True,
                env={**os.environ, **self.env},
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BrokerAdminError(f"{where} did not finish within {self.timeout:.0f}s") from None
        except OSError as error:
            raise BrokerAdminError(f"cannot run {self.executable}: {error.strerror}") from None
        if completed.returncode != 0:
            output = (completed.stderr.strip() or completed.stdout.strip())[-4000:]
            raise BrokerAdminError(
                f"{where} exited with {completed.returncode}: {_mask(output, secrets) or '(no output)'}"
            )
        return completed.stdout

    def _json(self, *args: str) -> list[dict[str, Any]]:
        output = self.run(*args, "--formatter", "json", "--quiet")
        decoded = json.loads(output) if output.strip() else []
        if not isinstance(decoded, list):
            raise BrokerAdminError(f"rabbitmqctl {args[0]} returned {type(decoded).__name__}, not a list")
        return decoded

    # ---- what the node holds

    def list_users(self) -> set[str]:
        return {row["user"] for row in self._json("list_users")}

    def list_vhosts(self) -> set[str]:
        return {row["name"] for row in self._json("list_vhosts")}

    def list_permissions(self, vhost: str) -> list[dict[str, Any]]:
        return self._json("list_permissions", "-p", vhost)

    def list_topic_permissions(self, vhost: str) -> list[dict[str, Any]]:
        return self._json("list_topic_permissions", "-p", vhost)

    def list_exchanges(self, vhost: str) -> list[dict[str, Any]]:
        return self._json("list_exchanges", "-p", vhost, "name", "type")

    def list_queues(self, vhost: str) -> list[dict[str, Any]]:
        """Each queue's ``name`` and ``arguments`` (a mapping; rabbitmqctl's field types dropped)."""
        rows = self._json("list_queues", "-p", vhost, "name", "arguments")
        # rabbitmqctl renders arguments as [name, type, value] triples: [["x-queue-type", "longstr", "quorum"]].
        return [
            {"name": row["name"], "arguments": {name: value for name, _kind, value in row["arguments"]}}
            for row in rows
        ]

    def list_bindings(self, vhost: str) -> list[dict[str, Any]]:
        return self._json("list_bindings", "-p", vhost, "source_name", "destination_name", "routing_key")

    # ---- changes

    def import_definitions(self, document: Mapping[str, Any]) -> None:
        """``import_definitions --format json`` with the document on standard input (no file)."""
        hashes = [str(user.get("password_hash", "")) for user in document.get("users", [])]
        self.run("import_definitions", "--format", "json", stdin=json.dumps(document), secrets=hashes)

    def change_password(self, user: str, password: str) -> None:
        """Set ``user``'s password; rabbitmqctl reads it from standard input, one line."""
        if not password or "\n" in password or "\r" in password:
            raise ValueError(f"the password of {user} must be one non-empty line")
        self.run("change_password", user, stdin=password + "\n", secrets=[password])

    def delete_vhost(self, vhost: str, *, missing_ok: bool = True) -> None:
        """Delete a vhost and everything in it (tests clean up with this)."""
        if missing_ok and vhost not in self.list_vhosts():
            return
        self.run("delete_vhost", vhost)

    def delete_user(self, user: str, *, missing_ok: bool = True) -> None:
        """Delete a user; its open connections are closed."""
        if missing_ok and user not in self.list_users():
            return
        self.run("delete_user", user)


@dataclass(frozen=True)
class Applied:
    """What :func:`apply_definitions` did: users created or given a new password, and users left as they were."""

    vhost: str
    with_new_password: tuple[str, ...]
    created_without_password: tuple[str, ...]
    kept: tuple[str, ...]


def apply_definitions(
    ctl: Rabbitmqctl,
    document: Mapping[str, Any],
    *,
    passwords: Mapping[str, str] | None = None,
    verify_timeout: float = 60.0,
) -> Applied:
    """Import ``document`` into the node, keep existing passwords, then check that it all arrived.

    Parameters:
      ctl: how to reach the node.
      document: one vhost's definitions (:func:`infra.messaging.topology.definitions`).
      passwords: user -> password, set afterwards with ``change_password`` (for users the
        document gives an empty hash, e.g. one printed by ``accessflow broker definitions``).
      verify_timeout: seconds to wait for the node to show everything imported.

    Returns:
      Which users got a password, which were created without one, and which were kept as they were.

    Raises:
      BrokerAdminError: rabbitmqctl failed; the node still lacks part of the document at the
        deadline; or it holds a queue of the document with other arguments (at once: an
        import never changes an existing queue).
    """
    vhosts = [v["name"] for v in document.get("vhosts", [])]
    if len(vhosts) != 1:
        raise ValueError("apply_definitions takes a document for exactly one vhost")
    vhost = vhosts[0]
    passwords = dict(passwords or {})
    existing = ctl.list_users()
    users = list(document.get("users", []))
    with_hash = {u["name"] for u in users if u.get("password_hash")}
    unknown = sorted(set(passwords) - {u["name"] for u in users})
    if unknown:
        raise ValueError(f"passwords for users the document does not name: {', '.join(unknown)}")
    # A user named with an empty hash would lose its password: leave existing ones out.
    kept = sorted(u["name"] for u in users if u["name"] in existing and u["name"] not in with_hash)
    imported = {**document, "users": [u for u in users if u["name"] not in kept]}
    ctl.import_definitions(imported)
    for user, password in sorted(passwords.items()):
        ctl.change_password(user, password)
    _wait_until_applied(ctl, document, vhost, verify_timeout)
    created = sorted(
        u["name"] for u in users if u["name"] not in existing and u["name"] not in with_hash | set(passwords)
    )
    applied = Applied(
        vhost=vhost,
        with_new_password=tuple(sorted(with_hash | set(passwords))),
        created_without_password=tuple(created),
        kept=tuple(kept),
    )
    log.info(
        "broker.definitions_applied",
        node=ctl.node,
        vhost=vhost,
        with_new_password=list(applied.with_new_password),
        created_without_password=list(applied.created_without_password),
        kept=list(applied.kept),
    )
    return applied


def missing_definitions(ctl: Rabbitmqctl, document: Mapping[str, Any], vhost: str) -> list[str]:
    """What of ``document`` the node does not hold (permissions differ, a binding is absent, ...)."""
    if vhost not in ctl.list_vhosts():
        return [f"vhost {vhost}"]
    missing: list[str] = []
    have_permissions = {
        (p["user"], p["configure"], p["write"], p["read"]) for p in ctl.list_permissions(vhost)
    }
    for p in document.get("permissions", []):
        if (p["user"], p["configure"], p["write"], p["read"]) not in have_permissions:
            missing.append(f"permissions of {p['user']}")
    have_topic = {
        (t["user"], t["exchange"], t["write"], t["read"]) for t in ctl.list_topic_permissions(vhost)
    }
    for t in document.get("topic_permissions", []):
        if (t["user"], t["exchange"], t["write"], t["read"]) not in have_topic:
            missing.append(f"topic permissions of {t['user']} on {t['exchange']}")
    have_exchanges = {(e["name"], e["type"]) for e in ctl.list_exchanges(vhost)}
    missing += [
        f"exchange {e['name']}"
        for e in document.get("exchanges", [])
        if (e["name"], e["type"]) not in have_exchanges
    ]
    have_queues = {q["name"] for q in ctl.list_queues(vhost)}
    missing += [f"queue {q['name']}" for q in document.get("queues", []) if q["name"] not in have_queues]
    have_bindings = {
        (b["source_name"], b["destination_name"], b["routing_key"]) for b in ctl.list_bindings(vhost)
    }
    missing += [
        f"binding {b['source']} -> {b['destination']} ({b['routing_key']!r})"
        for b in document.get("bindings", [])
        if (b["source"], b["destination"], b["routing_key"]) not in have_bindings
    ]
    return missing


def differing_queues(ctl: Rabbitmqctl, document: Mapping[str, Any], vhost: str) -> list[str]:
    """The queues of ``document`` that the node holds with other arguments, each with both sets."""
    have = {q["name"]: q["arguments"] for q in ctl.list_queues(vhost)}
    return [
        f"queue {q['name']} has {json.dumps(have[q['name']], sort_keys=True)}, "
        f"not {json.dumps(q.get('arguments', {}), sort_keys=True)}"
        for q in document.get("queues", [])
        if q["name"] in have and have[q["name"]] != dict(q.get("arguments", {}))
    ]


def _wait_until_applied(ctl: Rabbitmqctl, document: Mapping[str, Any], vhost: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        missing = missing_definitions(ctl, document, vhost)
        if not missing:
            break
        if time.monotonic() >= deadline:
            raise BrokerAdminError(
                f"after import_definitions the node still lacks: {'; '.join(missing)} "
                "(RabbitMQ skips a binding whose queue does not exist)"
            )
        time.sleep(0.5)  # polling interval, bounded by the deadline above
    differing = differing_queues(ctl, document, vhost)  # waiting would not change them
    if differing:
        raise BrokerAdminError(
            f"the node keeps queues declared before with other arguments: {'; '.join(differing)} "
            "(an import never changes an existing queue: move its messages, delete it, run setup again)"
        )
