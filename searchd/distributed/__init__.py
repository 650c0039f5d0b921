"""The Ray engine: evaluator actors, the actor pool (the scoring protocol on Ray), Ray Tune
driving the search loop, and the start of Ray itself.

- ``EvaluatorActor`` (``actor``): one evaluator host per actor, requests merged
  (``RequestBatcher``, ``batcher``);
- ``EvaluatorPool`` / ``PoolClient`` (``pool``): the actors, and the picklable client that
  scores on them (actor replacement and re-sends: see ``pool``);
- ``run_tune`` (``tune``): a ``searchd.loop.SearchLoop`` driven by Ray Tune;
- ``RayEngine`` (``engine``): Ray started or joined (address checked with a timeout), the
  pool sized against the cluster, the loop driven by Tune: what ``searchd.search`` uses.
"""

from searchd.distributed.actor import EvaluatorActor
from searchd.distributed.batcher import BatcherStats, RequestBatcher
from searchd.distributed.pool import EvaluatorPool, PoolClient, split_balanced

__all__ = [
    "BatcherStats",
    "EvaluatorActor",
    "EvaluatorPool",
    "PoolClient",
    "RequestBatcher",
    "split_balanced",
]
