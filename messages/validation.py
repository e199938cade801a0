"""Validating a message's arguments against its route's contract, and explaining a refusal in one line.

Here, beside the contracts, so that the workers, the producer and the CLI share one reading
of "valid" without any of them importing another.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError

from messages.routes import Route
from messages.v1 import MAX_MESSAGE_BYTES


def explain(error: ValidationError) -> str:
    """One line per problem, naming the field, without echoing the (possibly huge) input."""
    return "; ".join(f"{_location(problem['loc'])}: {problem['msg']}" for problem in error.errors())


def _location(loc: tuple[int | str, ...]) -> str:
    # A field name can come from the input: escape it, so a crafted key cannot break a line.
    return ".".join(str(part).encode("unicode_escape").decode() for part in loc) or "message"


def decode(route: Route, args: tuple[Any, ...], kwargs: dict[str, Any]) -> BaseModel:
    """Validate the envelope's arguments against the route's contract.

    Raises:
      ValueError: the arguments are not one JSON object within the size limit.
      ValidationError: the object does not satisfy the contract.
    """
    if kwargs or len(args) != 1 or not isinstance(args[0], dict):
        raise ValueError("the envelope must carry exactly one positional argument, a JSON object")
    if len(json.dumps(args[0], default=str)) > MAX_MESSAGE_BYTES:
        raise ValueError(f"payload is larger than {MAX_MESSAGE_BYTES} bytes")
    return route.contract_for(args[0]).model_validate(args[0])
