"""Write the JSON Schema of every wire contract, and of dramatiq's envelope, to ``messages/schemas/``.

Run ``python -m messages.export`` (``make schemas``) after changing a contract and
commit the result; ``python -m messages.export --check`` writes nothing and exits 1
when the files on disk are out of date. ``asyncapi.yaml`` refers to these files.

One file per contract, named ``<type>.v<version>.json`` after the contract's
``type`` and ``version`` literals (``access_request.submitted.v1.json``), plus
``envelope.json``. The output is deterministic: sorted keys, two-space indent and
a trailing newline, so a diff shows only real changes.

Some rules of the contracts are checked by their validators and have no JSON
Schema form (exactly one of ``app_id`` and ``new_app``; no control characters in
names; timestamps with an offset; ids that are UUIDs): the pydantic models in
``messages.v1`` remain the authority, the schemas are documentation and a first check.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field

from messages.events import AdminEvent, RequestEvent
from messages.routes import ROUTES

#: Where the schema files live, next to ``asyncapi.yaml``.
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
ENVELOPE_FILE = "envelope.json"
#: The dialect pydantic generates.
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class Envelope(BaseModel):
    """dramatiq's JSON envelope: the whole body of every message accessflow consumes.

    A body dramatiq cannot decode into this envelope (not JSON, a field missing, an
    unknown field) is dead-lettered to ``<queue>.XQ``; a body whose single argument
    fails its contract is recorded in ``malformed_messages`` and acknowledged.
    """

    model_config = ConfigDict(extra="forbid", title="DramatiqEnvelope")

    queue_name: str = Field(
        min_length=1,
        max_length=255,
        description="The queue the message is published to, i.e. its routing key: "
        "'<prefix>.<queue>', e.g. 'accessflow.requests'. dramatiq re-enqueues retries here.",
    )
    actor_name: str = Field(
        min_length=1,
        description="The actor that consumes the queue, e.g. 'access_request.route'. "
        "A name no worker knows is dead-lettered.",
    )
    args: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=1,
        description="Exactly one positional argument: the contract's JSON object.",
    )
    kwargs: dict[str, Any] = Field(max_length=0, description="Always {}.")
    options: dict[str, Any] = Field(
        description="Send {}. accessflow strips every option but its own retry bookkeeping.",
    )
    message_id: uuid.UUID = Field(
        description="A fresh UUID per publish; names the message in logs and in malformed_messages."
    )
    message_timestamp: int = Field(ge=0, description="Publish time, in milliseconds since the Unix epoch.")


def contract_filename(contract: type[BaseModel]) -> str:
    """``<type>.v<version>.json``, from the defaults of the contract's ``type`` and ``version`` literals."""
    type_name = _literal(contract, "type")
    version = _literal(contract, "version")
    if not isinstance(type_name, str) or not isinstance(version, int):
        raise TypeError(f"{contract.__name__} lacks the default of its 'type' or 'version' literal")
    return f"{type_name}.v{version}.json"


def _literal(contract: type[BaseModel], name: str) -> object:
    """The one value of a ``Literal`` field, whether or not it has a default."""
    field = contract.model_fields.get(name)
    if field is None:
        return None
    values = get_args(field.annotation)
    return values[0] if len(values) == 1 else field.default


def _render(schema: dict[str, Any]) -> str:
    return json.dumps({"$schema": JSON_SCHEMA_DIALECT, **schema}, indent=2, sort_keys=True) + "\n"


def render_schemas() -> dict[str, str]:
    """Every schema file's name and text, the contracts of ``ROUTES`` first, then the envelope."""
    rendered: dict[str, str] = {}
    contracts: list[type[BaseModel]] = [
        c for route in ROUTES for c in (route.contract, *route.legacy.values())
    ]
    every: list[type[BaseModel]] = [*contracts, RequestEvent, AdminEvent]
    for contract in dict.fromkeys(every):
        name = contract_filename(contract)
        if name in rendered or name == ENVELOPE_FILE:
            raise ValueError(f"two schemas would be written to {name}")
        rendered[name] = _render(contract.model_json_schema(mode="validation"))
    rendered[ENVELOPE_FILE] = _render(Envelope.model_json_schema(mode="validation"))
    return rendered


def differences(directory: Path = SCHEMA_DIR) -> list[str]:
    """The names of the schema files in ``directory`` that are missing, different or stale."""
    rendered = render_schemas()
    changed = [
        name
        for name, text in rendered.items()
        if not (directory / name).is_file() or (directory / name).read_text(encoding="utf-8") != text
    ]
    stale = sorted(path.name for path in directory.glob("*.json") if path.name not in rendered)
    return changed + stale


def write_schemas(directory: Path = SCHEMA_DIR) -> list[str]:
    """Bring ``directory`` up to date; return the names of the files written or removed."""
    rendered = render_schemas()
    directory.mkdir(parents=True, exist_ok=True)
    touched = differences(directory)
    for name in touched:
        path = directory / name
        if name in rendered:
            path.write_text(rendered[name], encoding="utf-8", newline="\n")
        else:
            path.unlink()
    return touched


def main(argv: Sequence[str] | None = None, *, directory: Path = SCHEMA_DIR) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m messages.export", description="Write the JSON Schemas of the wire contracts."
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the files on disk are out of date"
    )
    options = parser.parse_args(argv)
    if options.check:
        stale = differences(directory)
        if stale:
            print(f"out of date in {directory}: {', '.join(stale)}; run `make schemas`", file=sys.stderr)
            return 1
        print(f"{directory}: up to date")
        return 0
    touched = write_schemas(directory)
    print(f"{directory}: " + (f"updated {', '.join(touched)}" if touched else "up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
