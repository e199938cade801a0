"""How a function declares itself an actor: the route it consumes, nothing more.

``@actor(route)`` marks a function; :data:`workers.actors.ACTORS` lists every one, and the
composition root (:func:`infra.bootstrap.wire`) registers them on the broker explicitly,
through :func:`infra.messaging.actors.register`, which decodes, refuses bad input and maps
errors to retries in one place. Nothing is registered by importing a module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel

from messages.routes import Route

if TYPE_CHECKING:
    from infra.bootstrap import Services

C = TypeVar("C", bound=BaseModel)
ActorFunction = Callable[[Any, "Services", "str | None"], None]


@dataclass(frozen=True)
class Actor(Generic[C]):
    """An actor function and the route whose queue it consumes."""

    route: Route
    fn: Callable[[C, Services, str | None], None]

    @property
    def name(self) -> str:
        return self.fn.__name__


def actor(route: Route) -> Callable[[Callable[[C, Services, str | None], None]], Actor[C]]:
    """Declare the function that consumes ``route``'s queue."""

    def declare(fn: Callable[[C, Services, str | None], None]) -> Actor[C]:
        return Actor(route, fn)

    return declare
