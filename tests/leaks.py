"""The leak search: every place a secret could end up, searched for every secret issued.

:func:`assert_no_secret_leaks` takes the plaintext secrets a test captured (opened with the
portal's key, revealed once by ``credentials show``) and looks for each in:

- every log line: worker pools' log files, and the output of every CLI command run;
- every row of every table of the database (reflected, so tables added later are searched too);
- every message waiting in every queue of the run's vhost, dead-letter queues included, and
  every message a portal has already taken from its events queue;
- every email the SMTP sink received, as the bytes that crossed the wire.

A flow that issues more secrets (rotation, say) adds them to the :class:`SecretsIssued` it
passes; a new place to search is one more function here.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import sqlalchemy as sa

from infra.messaging.broker_admin import Rabbitmqctl


@dataclass
class SecretsIssued:
    """Plaintext secrets a flow obtained, by what it calls them (for the failure message)."""

    by_name: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, secret: str) -> None:
        assert secret, f"{name}: an empty secret searches for nothing"
        self.by_name[name] = secret

    def needles(self) -> dict[str, str]:
        """What to look for: each secret, its random part alone, and the random part's encodings.

        The random part catches a secret whose prefix a redactor kept or a formatter split off;
        hex and base64 catch one written as bytes.
        """
        found: dict[str, str] = {}
        for name, secret in self.by_name.items():
            found[name] = secret
            tail = secret[-24:]
            found[f"{name} (its last 24 characters)"] = tail
            found[f"{name} (hex)"] = secret.encode().hex()
            found[f"{name} (base64)"] = base64.b64encode(secret.encode()).decode()
        return found


@dataclass(frozen=True)
class Haystack:
    """One searched thing: where it is (its first word is its kind: log, table, queue...), and its text."""

    where: str
    text: str

    @property
    def kind(self) -> str:
        return self.where.split(" ", 1)[0]


def log_haystacks(log_files: Iterable[Path], outputs: Iterable[tuple[str, str]] = ()) -> Iterator[Haystack]:
    """Each log file, line by line, and each captured command output (``(what, text)``)."""
    for path in log_files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            yield Haystack(f"log {path.name}:{number}", line)
    for what, text in outputs:
        yield Haystack(f"output of {what}", text)


def table_haystacks(engine: sa.Engine) -> Iterator[Haystack]:
    """Every row of every table, each value as text (bytes as text, hex and base64 alike)."""
    metadata = sa.MetaData()
    metadata.reflect(engine)
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            for row in connection.execute(sa.select(table)):
                yield Haystack(f"table {table.name}", " ".join(_as_text(v) for v in row))


def _as_text(value: Any) -> str:
    if isinstance(value, bytes | memoryview):
        raw = bytes(value)
        return f"{raw.decode(errors='replace')} {raw.hex()} {base64.b64encode(raw).decode()}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def queue_names(vhost: str, ctl: Rabbitmqctl | None = None) -> list[str]:
    """Every queue of ``vhost``, as the broker lists them."""
    out = (ctl or Rabbitmqctl()).run("list_queues", "-p", vhost, "name", "--no-table-headers", "--quiet")
    return [line.strip() for line in out.splitlines() if line.strip()]


def queue_haystacks(broker_url: str, queues: Iterable[str]) -> Iterator[Haystack]:
    """Every message waiting in each queue: taken without an ack, and put back when the channel closes.

    ``broker_url`` must be a user that may read every queue. Each message's body, headers and
    properties are searched.
    """
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        for queue in queues:
            channel = connection.channel()
            try:
                while True:
                    method, properties, body = channel.basic_get(queue, auto_ack=False)
                    if method is None:
                        break
                    text = f"{body.decode(errors='replace')} {properties!r}"
                    yield Haystack(f"queue {queue} message {properties.message_id}", text)
            finally:
                if channel.is_open:
                    channel.close()  # unacknowledged: every message goes back to its queue
    finally:
        if connection.is_open:
            connection.close()


def email_haystacks(raw_emails: Iterable[bytes]) -> Iterator[Haystack]:
    """Each email as the bytes the SMTP server received, and decoded (a body may be base64 or QP)."""
    for number, raw in enumerate(raw_emails, 1):
        text = raw.decode(errors="replace")
        yield Haystack(f"email {number}", text)
        for part, payload in enumerate(_decoded_parts(raw)):
            yield Haystack(f"email {number} part {part}", payload)


def _decoded_parts(raw: bytes) -> Iterator[str]:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    for part in message.walk():
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            yield payload.decode(errors="replace")


def event_haystacks(events: Iterable[dict[str, Any]], owner: str) -> Iterator[Haystack]:
    """Events a portal has already taken from its queue: the messages that left the broker."""
    for event in events:
        yield Haystack(f"event {event.get('event')} taken by {owner}", json.dumps(event, default=str))


def assert_no_secret_leaks(secrets: SecretsIssued, haystacks: Iterable[Haystack]) -> Counter[str]:
    """Fail, naming every place, if any secret (or its random part, hex or base64) is in any haystack.

    Returns:
      How many haystacks of each kind were searched, so a test can check that the search
      looked somewhere of every kind.
    """
    needles = secrets.needles()
    leaks: list[str] = []
    searched: Counter[str] = Counter()
    for haystack in haystacks:
        searched[haystack.kind] += 1
        leaks += [
            f"{name} in {haystack.where}" for name, needle in needles.items() if needle in haystack.text
        ]
    assert not leaks, "secrets leaked:\n" + "\n".join(leaks[:50])
    return searched
