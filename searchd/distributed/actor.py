"""``EvaluatorActor``: a long-lived Ray actor that holds one evaluator and serves candidates.

The actor is a thin shell: an evaluator built once from a factory (models, feature network
and reference statistics loaded once per actor, and again only if Ray restarts the actor),
and a ``RequestBatcher`` that merges the ``evaluate`` requests arriving together (same
seeds) into one population-batched call run in a worker thread.

Results come back as ``EvaluatedCandidate``: the evaluator's own result, unchanged, plus the
``worker`` (the actor's name) and the ``node`` (host and Ray node) that scored it, which
the Parquet rows record. ``CandidateResult`` itself stays plain data that knows nothing of Ray.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import ray

from searchd.distributed.batcher import RequestBatcher


class SupportsEvaluate(Protocol):
    """What the actor needs of an evaluator (``searchd.evaluation.Evaluator`` is one)."""

    def evaluate(self, candidates: Sequence[Any], seeds: Sequence[int]) -> Sequence[Any]: ...


# A picklable zero-argument callable building the evaluator inside the actor.
EvaluatorFactory = Callable[[], SupportsEvaluate]


@dataclass(frozen=True)
class EvaluatedCandidate:
    """One scored candidate and where it was scored.

    Attributes:
        result: the evaluator's result for the candidate (a ``CandidateResult``).
        worker: name of the actor that scored it (``"evaluator-<i>"``).
        node: ``"<host name>/<first 12 hex digits of the Ray node id>"``: the machine, and
            the Ray node on it (several Ray nodes may share one host).
    """

    result: Any
    worker: str
    node: str

    @property
    def candidate_id(self) -> str:
        """The candidate's content hash, as the evaluator reported it."""
        return str(self.result.candidate_id)


def seed_key(seeds: Sequence[int]) -> Hashable:
    """Hashable key of a seed list: requests merge only when their seeds are equal."""
    return tuple(int(s) for s in seeds)


@dataclass(frozen=True)
class FactoryName:
    """The name of the named actor (``pool.FactoryHolder``) that keeps an evaluator factory."""

    name: str


@ray.remote
class EvaluatorActor:
    """Ray actor serving ``evaluate(candidates, seeds)`` with request merging.

    Args:
        factory: picklable zero-argument callable returning the evaluator; called once in
            ``__init__`` (and once more after each restart of the actor). Or the name of
            the ``FactoryHolder`` actor that keeps it (what ``EvaluatorPool`` passes).
        name: worker name recorded with every result (default: the start of the actor id).
        max_batch: candidates above which no further request is merged into a call.
        max_wait_s: longest wait for more requests after the first of a call arrives.
    """

    def __init__(
        self,
        factory: EvaluatorFactory,
        name: str | None = None,
        max_batch: int = 4096,
        max_wait_s: float = 0.005,
    ) -> None:
        t0 = time.perf_counter()
        if isinstance(factory, FactoryName):  # a pool's FactoryHolder
            factory = ray.get(ray.get_actor(factory.name).get.remote())
        self._evaluator = factory()
        self._load_s = time.perf_counter() - t0
        ctx = ray.get_runtime_context()
        self._actor_id = ctx.get_actor_id() or ""
        self._node_id = ctx.get_node_id()
        with warnings.catch_warnings():  # Ray 2.60 warns from inside this property
            warnings.simplefilter("ignore")
            self._restarted = bool(ctx.was_current_actor_reconstructed)
        self._name = name or self._actor_id[:12]
        self._host = socket.gethostname()
        self._node = f"{self._host}/{self._node_id[:12]}"
        self._batcher = RequestBatcher(self._call, max_batch=max_batch, max_wait_s=max_wait_s)

    def _call(self, candidates: list[Any], seeds: Sequence[int]) -> list[EvaluatedCandidate]:
        """One blocking evaluator call over merged requests (runs in the batcher's thread)."""
        results = self._evaluator.evaluate(candidates, seeds)
        return [EvaluatedCandidate(r, self._name, self._node) for r in results]

    async def ready(self) -> dict[str, Any]:
        """Who and where this actor is, once the evaluator is built.

        Returns ``{"worker", "node", "host", "node_id", "actor_id", "pid", "load_s",
        "restarted"}`` (``node`` as in the results).
        """
        return {
            "worker": self._name,
            "node": self._node,
            "host": self._host,
            "node_id": self._node_id,
            "actor_id": self._actor_id,
            "pid": os.getpid(),
            "load_s": self._load_s,
            "restarted": self._restarted,
        }

    async def evaluate(
        self, candidates: Sequence[Any], seeds: Sequence[int]
    ) -> list[EvaluatedCandidate]:
        """Score ``candidates`` on ``seeds``; merged with concurrent requests of equal seeds.

        Returns one ``EvaluatedCandidate`` per candidate, in order.
        """
        return await self._batcher.submit(list(candidates), seed_key(seeds), seeds)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(evaluator, *args, **kwargs)`` on the evaluator's thread, between batched
        calls, and return its value (held-out scoring, sample grids: jobs that need the
        loaded models but are not ``evaluate``)."""
        return await self._batcher.run_exclusive(lambda: fn(self._evaluator, *args, **kwargs))

    async def stats(self) -> dict[str, Any]:
        """The batcher's counters (``BatcherStats`` as a dict)."""
        return asdict(self._batcher.stats)
