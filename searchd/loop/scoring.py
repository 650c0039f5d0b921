"""The scoring protocol, and what a run needs of the loaded models besides scoring.

``Scorer.score(schedules, seeds) -> results`` is all the search loop needs: one
``CandidateResult`` per schedule, in order, each scored on the samples of ``seeds``. The Ray
engine implements it on the actor pool (``searchd.distributed``); ``EvaluatorScorer`` does
it in-process on one ``Evaluator`` (tests, benchmarks, the local engine).

``Workers`` is the rest of what a run asks of the evaluators, all on models loaded once:
the model's facts, the exact reference statistics, jobs (anchors, the adaptive predictor,
the held-out scoring) run on a loaded evaluator, and growth between batches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

from searchd.evaluation import CandidateResult
from searchd.schedule import Schedule

T = TypeVar("T")


@runtime_checkable
class Scorer(Protocol):
    """Scores candidate schedules: ``score(schedules, seeds)`` returns one result per
    schedule, in order (a candidate that cannot be scored gets status "failed" and the
    reason; it never raises for one bad candidate)."""

    def score(self, schedules: Sequence[Schedule], seeds: Sequence[int]
              ) -> list[CandidateResult]: ...


class Workers(Scorer, Protocol):
    """The evaluators of a run: the scoring protocol plus jobs on the loaded models.

    Attributes:
        facts: the model's facts (``EvaluatorHost.facts``: shape, noise range, grid, cost,
            name, zoo members, the feature network and its dimension).
        model_loads: how many times the model was loaded, per evaluator
            (``{worker name: loads}``).
    """

    facts: dict[str, Any]
    model_loads: dict[str, int]

    def exact_reference(self, n: int, seed_base: int) -> dict[str, Any]:
        """Reference statistics (``ReferenceStats.to_dict()``) of ``n`` exact samples of the
        model, computed by one evaluator."""
        ...

    def set_reference(self, reference: Mapping[str, Any]) -> None:
        """Give every evaluator (and every one started later) the reference statistics."""
        ...

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(evaluator, *args)`` on one loaded evaluator."""
        ...

    def call_each(self, jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]
                  ) -> list[Any]:
        """``fn(evaluator, *args)`` for each job, spread over the evaluators (side by side
        where there are several), results in order."""
        ...

    def call_all(self, fn: Callable[..., T], *args: Any) -> list[T]:
        """``fn(evaluator, *args)`` on every evaluator, results in evaluator order."""
        ...

    def grow(self) -> list[str]:
        """Between batches: admit evaluators for capacity that joined; never waits. Returns
        the names of the evaluators admitted."""
        ...


class EvaluatorScorer:
    """The scoring protocol in-process, on one ``Evaluator`` (its results as they are, with
    ``worker`` set; feature statistics dropped unless ``keep_stats``)."""

    def __init__(self, evaluator: Any, worker: str = "local", keep_stats: bool = False) -> None:
        self.evaluator = evaluator
        self.worker = worker
        self.keep_stats = keep_stats

    def score(self, schedules: Sequence[Schedule], seeds: Sequence[int]
              ) -> list[CandidateResult]:
        """One result per schedule, in order (``Evaluator.evaluate``)."""
        import dataclasses

        results = self.evaluator.evaluate(list(schedules), list(seeds))
        out = []
        for r in results:
            changes: dict[str, Any] = {"worker": self.worker}
            if not self.keep_stats:
                changes["stats"] = None
            out.append(dataclasses.replace(r, **changes))
        return out
