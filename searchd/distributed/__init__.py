"""Ray actors that hold the evaluator, and the pool that Tune trials send candidates to."""

from searchd.distributed.actor import EvaluatedCandidate, EvaluatorActor, EvaluatorFactory
from searchd.distributed.batcher import BatcherStats, RequestBatcher
from searchd.distributed.pool import EvaluatorPool, PoolClient, split_balanced

__all__ = [
    "BatcherStats",
    "EvaluatedCandidate",
    "EvaluatorActor",
    "EvaluatorFactory",
    "EvaluatorPool",
    "PoolClient",
    "RequestBatcher",
    "split_balanced",
]
