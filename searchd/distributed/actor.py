"""``EvaluatorActor``: a long-lived Ray actor that holds one evaluator and serves candidates.

The actor is a thin shell around an ``EvaluatorHost`` (``searchd.loop.factory``): the model
and the feature network are loaded once per actor (and again only if Ray restarts the
actor, which it reports), and a ``RequestBatcher`` merges the ``evaluate`` requests arriving
together (same seeds) into one population-batched call run in a worker thread.

Results come back as the evaluator's own ``CandidateResult``s with ``worker`` (the actor's
name) and ``node`` (host and Ray node) filled in, which the Parquet rows record; their
feature statistics are dropped here unless asked for (they can be large).

This module imports neither torch nor the evaluator's code (the factory does, when an actor
starts): a process that unpickles an actor's handle imports the module of its class, and the
Tune trials, which hold the handles in their ``PoolClient``, must stay free of torch
(``searchd.distributed.trial``).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import ray

from searchd.distributed.batcher import RequestBatcher

if TYPE_CHECKING:  # the evaluator's code (torch) is imported by the factory, in the actor
    from searchd.loop.factory import EvaluatorFactory, EvaluatorHost


def seed_key(seeds: Sequence[int]) -> Hashable:
    """Hashable key of a seed list: requests merge only when their seeds are equal."""
    return tuple(int(s) for s in seeds)


class PlainHost:
    """A host around any evaluator (a factory without ``host()``: a zero-argument callable
    returning an object with ``evaluate(candidates, seeds)``): no facts, no reference jobs."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        import time

        t0 = time.perf_counter()
        self.evaluator = factory()
        self.load_s = time.perf_counter() - t0
        self.loads = 1

    def facts(self) -> dict[str, Any]:
        return {}

    def evaluate(self, candidates: Any, seeds: Any) -> list[Any]:
        return self.evaluator.evaluate(candidates, seeds)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.evaluator, *args, **kwargs)

    def exact_reference(self, n: int, seed_base: int) -> dict[str, Any]:
        raise ValueError("this evaluator has no model to draw exact samples from")

    def exact_reference_part(self, lo: int, hi: int) -> dict[str, Any]:
        return self.exact_reference(hi - lo, lo)

    def set_reference(self, reference: Mapping[str, Any]) -> None:
        raise ValueError("this evaluator takes no reference statistics")


@dataclass(frozen=True)
class FactoryName:
    """The name of the named actor (``holders.FactoryHolder``) that keeps an evaluator
    factory."""

    name: str


@ray.remote
class EvaluatorActor:
    """Ray actor serving ``evaluate(candidates, seeds)`` with request merging, and jobs on
    its loaded models.

    Args:
        factory: an ``EvaluatorFactory`` (or any picklable object with ``host()``, or a
            zero-argument callable returning an evaluator), or the name of the
            ``FactoryHolder`` actor that keeps it (what ``EvaluatorPool`` passes): a
            restarted actor then builds from the factory as it is now (with the reference
            statistics once they are set).
        name: worker name recorded with every result (default: the start of the actor id).
        max_batch: candidates above which no further request is merged into a call.
        max_wait_s: longest wait for more requests after the first of a call arrives.
    """

    def __init__(
        self,
        factory: EvaluatorFactory | FactoryName,
        name: str | None = None,
        max_batch: int = 4096,
        max_wait_s: float = 0.005,
    ) -> None:
        if isinstance(factory, FactoryName):  # a pool's FactoryHolder: pickled bytes
            from searchd.distributed.holders import loads

            factory = loads(ray.get(ray.get_actor(factory.name).get.remote()))
        self._host: EvaluatorHost | PlainHost = (
            factory.host() if hasattr(factory, "host") else PlainHost(factory))
        ctx = ray.get_runtime_context()
        self._actor_id = ctx.get_actor_id() or ""
        self._node_id = ctx.get_node_id()
        with warnings.catch_warnings():  # Ray 2.60 warns from inside this property
            warnings.simplefilter("ignore")
            self._restarted = bool(ctx.was_current_actor_reconstructed)
        self._name = name or self._actor_id[:12]
        self._host_name = socket.gethostname()
        self._node = f"{self._host_name}/{self._node_id[:12]}"
        self._batcher = RequestBatcher(self._call, max_batch=max_batch, max_wait_s=max_wait_s)

    def _call(self, candidates: list[Any], seeds: Sequence[int]) -> list[Any]:
        """One blocking evaluator call over merged requests (runs in the batcher's thread)."""
        results = self._host.evaluate(candidates, seeds)
        return [dataclasses.replace(r, worker=self._name, node=self._node, stats=None)
                for r in results]

    async def ready(self) -> dict[str, Any]:
        """Who and where this actor is, and the model's facts, once its models are loaded.

        Returns ``{"worker", "node", "host", "node_id", "actor_id", "pid", "load_s",
        "loads", "restarted", "facts"}`` (``node`` as in the results; ``loads``: models
        loaded by this actor process).
        """
        return {
            "worker": self._name,
            "node": self._node,
            "host": self._host_name,
            "node_id": self._node_id,
            "actor_id": self._actor_id,
            "pid": os.getpid(),
            "load_s": self._host.load_s,
            "loads": self._host.loads,
            "restarted": self._restarted,
            "facts": self._host.facts(),
        }

    async def ping(self) -> int:
        """This actor's pid: an answer means it is alive and has built its evaluator (a
        restarted actor answers only once its constructor has finished)."""
        return os.getpid()

    async def evaluate(self, candidates: Sequence[Any], seeds: Sequence[int]) -> list[Any]:
        """Score ``candidates`` on ``seeds``; merged with concurrent requests of equal seeds.

        Returns one ``CandidateResult`` per candidate, in order.
        """
        return await self._batcher.submit(list(candidates), seed_key(seeds), seeds)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(evaluator, *args, **kwargs)`` on the evaluator's thread, between batched
        calls, and return its value (anchors, the adaptive predictor, held-out scoring,
        sample grids: jobs that need the loaded models but are not ``evaluate``)."""
        return await self._batcher.run_exclusive(lambda: self._host.call(fn, *args, **kwargs))

    async def exact_reference(self, n: int, seed_base: int) -> dict[str, Any]:
        """Reference statistics of ``n`` exact samples of the loaded model."""
        return await self._batcher.run_exclusive(
            lambda: self._host.exact_reference(n, seed_base))

    async def exact_reference_part(self, lo: int, hi: int) -> dict[str, Any]:
        """Exact samples of seeds ``[lo, hi)`` and their features (``EvaluatorHost``): this
        actor's share of an exact reference split over the pool."""
        return await self._batcher.run_exclusive(
            lambda: self._host.exact_reference_part(lo, hi))

    async def set_reference(self, reference: Mapping[str, Any]) -> None:
        """Build the evaluator over the loaded models and these reference statistics."""
        await self._batcher.run_exclusive(lambda: self._host.set_reference(reference))

    async def stats(self) -> dict[str, Any]:
        """The batcher's counters (``BatcherStats`` as a dict)."""
        return asdict(self._batcher.stats)
