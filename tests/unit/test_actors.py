"""workers/: every actor declared is registered, and every route has exactly one actor.

The composition root registers :data:`workers.actors.ACTORS` and nothing else, so an actor
declared with ``@actor(route)`` but left out of that tuple would never consume its queue:
caught here, not by an end-to-end test timing out.
"""

from __future__ import annotations

from messages.routes import ROUTES
from workers import actors
from workers.registry import Actor


def test_every_declared_actor_is_registered() -> None:
    declared = sorted(value.name for value in vars(actors).values() if isinstance(value, Actor))
    assert declared == sorted(actor.name for actor in actors.ACTORS)
    assert len({actor.name for actor in actors.ACTORS}) == len(actors.ACTORS)


def test_each_route_has_exactly_one_actor_and_each_actor_a_route() -> None:
    by_route = [actor.route for actor in actors.ACTORS]
    assert sorted(route.actor_name for route in by_route) == sorted(route.actor_name for route in ROUTES)
