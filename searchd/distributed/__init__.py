"""The Ray engine: evaluator actors, the actor pool (the scoring protocol on Ray), Ray Tune
driving the search loop, and the start of Ray itself.

- ``EvaluatorActor`` (``actor``): one evaluator host per actor, requests merged
  (``RequestBatcher``, ``batcher``);
- ``EvaluatorPool`` / ``PoolClient`` (``pool``): the actors, and the picklable client that
  scores on them (actor replacement and re-sends: see ``pool``);
- ``run_tune`` (``tune``): a ``searchd.loop.SearchLoop`` driven by Ray Tune;
- ``RayEngine`` (``engine``): Ray started or joined (address checked with a timeout), the
  pool sized against the cluster, the loop driven by Tune: what ``searchd.search`` uses;
- ``FactoryHolder``, ``PoolMembership`` (``holders``): the pool's small named actors, in a
  module that imports Ray only.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use: an actor whose class lives in a light module of this package
# (``holders``) then starts without torch (see ``searchd.distributed.holders``).
_LAZY = {
    "EvaluatorActor": "searchd.distributed.actor",
    "BatcherStats": "searchd.distributed.batcher",
    "RequestBatcher": "searchd.distributed.batcher",
    "EvaluatorPool": "searchd.distributed.pool",
    "PoolClient": "searchd.distributed.pool",
    "split_balanced": "searchd.distributed.pool",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'searchd.distributed' has no attribute {name!r}")
