"""The pool's two small named actors, in a module that imports Ray only.

An actor's process imports the module of its class. These two hold no model, so their
processes must not import torch and searchd's numerical code (4.7 s of CPU against 0.8 s
for Ray alone, measured on the 2-core development machine): on a small machine they start
beside the evaluator actors, on the same cores. ``searchd.distributed``'s package imports
are lazy for the same reason.

- ``FactoryHolder`` keeps the evaluator factory *as pickled bytes*, for the pool's actors
  and their restarts (unpickled in the evaluator actors, never here);
- ``PoolMembership`` keeps the pool's current actor handles for clients pickled before the
  pool grew.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.actor import ActorHandle


@ray.remote(num_cpus=0)
class FactoryHolder:
    """Keeps the evaluator factory (which may hold large reference statistics) for the
    pool's actors and their restarts, as ``cloudpickle`` bytes. Actors get this named actor's
    name as a constructor argument and fetch the factory from it when they start: with the
    factory itself, an ``ObjectRef`` of it or an actor handle (which carries a reference) as
    a constructor argument, Ray logs an error-level line for every actor with restarts
    (ray-project/ray#53727). Placed on the driver's node; not restarted (a restart would come
    back empty)."""

    def __init__(self) -> None:
        self._factory: bytes | None = None

    def put(self, factory: bytes) -> None:
        self._factory = factory

    def get(self) -> bytes | None:
        return self._factory


@ray.remote(num_cpus=0)
class PoolMembership:
    """The pool's current actors, for clients that were pickled before the pool grew (Tune
    trials get their client when the Tuner is built). A client asks once per call; one
    round trip of about a millisecond. Not restarted if it dies: a restart would bring back
    the initial list; clients then keep the actors they know."""

    def __init__(self, actors: list[ActorHandle], names: list[str]) -> None:
        self._version = 0
        self._actors = list(actors)
        self._names = list(names)

    def update(self, actors: list[ActorHandle], names: list[str]) -> int:
        """Publish a new actor list; returns its version."""
        self._version += 1
        self._actors, self._names = list(actors), list(names)
        return self._version

    def get(self, version: int) -> tuple[int, list[ActorHandle], list[str]] | None:
        """None if ``version`` is current, else ``(version, actors, names)``."""
        if version == self._version:
            return None
        return self._version, self._actors, self._names


def dumps(obj: Any) -> bytes:
    """``obj`` as the bytes ``FactoryHolder`` keeps."""
    import ray.cloudpickle as cloudpickle

    return cloudpickle.dumps(obj)


def loads(blob: bytes) -> Any:
    """The object ``dumps`` made."""
    import ray.cloudpickle as cloudpickle

    return cloudpickle.loads(blob)
