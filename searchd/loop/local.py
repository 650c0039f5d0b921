"""The in-process engine: one evaluator in this process, the loop run by a plain while loop.

``LocalEngine`` runs a whole search without Ray (tests, benchmarks, a quick look on a
laptop): the same setup, loop, recorder and finish as the Ray engine, with the scoring
protocol and the jobs served by one ``EvaluatorHost`` here. ``searchd.search(...,
engine="local")`` uses it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from searchd.evaluation import CandidateResult
from searchd.loop.factory import EvaluatorFactory, EvaluatorHost
from searchd.loop.hooks import FaultHooks
from searchd.loop.loop import SearchLoop
from searchd.loop.scoring import EvaluatorScorer
from searchd.schedule import Schedule

T = TypeVar("T")

WORKER = "local"


class LocalWorkers:
    """``Workers`` on one ``EvaluatorHost`` in this process (the model loaded once)."""

    def __init__(self, factory: EvaluatorFactory) -> None:
        self.host = EvaluatorHost(factory)
        self.facts: dict[str, Any] = self.host.facts()
        self.model_loads = {WORKER: self.host.loads}

    def score(self, schedules: Sequence[Schedule], seeds: Sequence[int]
              ) -> list[CandidateResult]:
        return EvaluatorScorer(self.host._ready(), WORKER).score(schedules, seeds)

    def exact_reference(self, n: int, seed_base: int) -> dict[str, Any]:
        return self.host.exact_reference(n, seed_base)

    def set_reference(self, reference: Mapping[str, Any]) -> None:
        self.host.set_reference(reference)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return self.host.call(fn, *args)

    def call_each(self, jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]
                  ) -> list[Any]:
        return [self.host.call(fn, *args) for fn, args in jobs]

    def call_all(self, fn: Callable[..., T], *args: Any) -> list[T]:
        return [self.host.call(fn, *args)]

    @property
    def names(self) -> list[str]:
        return [WORKER]

    @property
    def nodes(self) -> list[str]:
        return ["this process"]

    def grow(self) -> list[str]:
        return []

    def shutdown(self) -> None:
        """Nothing to stop."""


class LocalEngine:
    """Runs a search in this process: ``start`` loads the models, ``drive`` runs the loop."""

    name = "local"

    def __init__(self) -> None:
        self._threads: int | None = None  # torch's thread count before ``start``

    def start(self, factory: EvaluatorFactory, workers_config: Any) -> LocalWorkers:
        """One evaluator here, with the torch threads a Ray actor of ``workers_config``
        gets (``max(1, floor(cpus_per_worker))``, as Ray sets ``OMP_NUM_THREADS``, unless
        ``OMP_NUM_THREADS`` is set): torch's default (every core) made the small per-
        candidate passes of a many-candidate search 10-20x slower on a busy machine
        (benchmarks/results/reliability.md, case 7). ``close`` restores the count."""
        cpus = getattr(workers_config, "cpus_per_worker", None)
        if cpus is not None and "OMP_NUM_THREADS" not in os.environ:
            import torch

            self._threads = torch.get_num_threads()
            torch.set_num_threads(max(1, math.floor(float(cpus))))
        return LocalWorkers(factory)

    def drive(self, loop: SearchLoop, workers: LocalWorkers, *, name: str,
              between: Callable[[], Any] | None = None) -> bool:
        """Run the loop to its end (``between`` after each batch); True when the searcher
        finished. ``SEARCHD_FAULT``'s loop points are honoured (``FaultHooks``)."""
        if FaultHooks.wanted():
            loop.observers = [*loop.observers, FaultHooks()]
        return loop.run(workers, between=between).finished

    def close(self) -> None:
        """Nothing to stop; torch's thread count is restored."""
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)
            self._threads = None
