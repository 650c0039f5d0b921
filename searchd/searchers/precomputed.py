"""Searchers of schedules computed before the search: GITS, LD3 and adaptive's global one.

``PrecomputedSearcher`` hands out one schedule computed up-front (``compute_gits`` /
``compute_ld3`` in ``searchd.methods``, or an adaptive run's global schedule), then the
baselines, then FINISHED, so the published methods run through the same loop, scoring and
Parquet log as every searcher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from searchd.schedule import Schedule
from searchd.schedules.spaces import Space, with_meta
from searchd.searchers.base import FINISHED, Next, ScheduleSearcher


class PrecomputedSearcher(ScheduleSearcher):
    """Suggests one schedule computed before the search, then the baselines, then FINISHED.

    The schedule and every baseline are scored exactly like any other candidate. Nothing is
    learned from results. A baseline equal to the schedule is not suggested twice.

    Args:
        space: the search space (the schedule must fit it: ``space.check``).
        metric, mode: what the results are ranked by.
        schedule: the precomputed schedule (a ``Schedule`` or its ``to_dict()``).
        seeds: the baseline schedules.
    """

    algorithm = "precomputed"
    origin = "precomputed"

    def __init__(
        self,
        space: Space,
        metric: str = "fid",
        mode: str = "min",
        schedule: Schedule | Mapping[str, Any] | None = None,
        seeds: Sequence[Schedule] = (),
    ) -> None:
        super().__init__(space, metric, mode)
        if schedule is None:
            raise ValueError(
                f"{type(self).__name__} needs its schedule, computed before the search "
                f"(compute_{self.algorithm})"
            )
        if isinstance(schedule, Mapping):
            schedule = Schedule.from_dict(schedule)
        self.schedule = with_meta(schedule, origin=schedule.meta.get("origin", self.origin))
        space.check(self.schedule)
        self._queue = [self.schedule, *self._prepare_seeds(seeds, "baseline")]

    def _next(self, key: str) -> Next:
        while self._queue:
            s = self._queue.pop(0)
            if s.id not in self._seen:
                return with_meta(s, searcher=self.algorithm, parents=[]), {}
        return FINISHED

    def _algo_state(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_dict(), "queue": [s.to_dict() for s in self._queue]}

    def _set_algo_state(self, state: Mapping[str, Any]) -> None:
        stored = Schedule.from_dict(state["schedule"])
        if stored.id != self.schedule.id:
            raise ValueError(
                f"state was taken with the {self.algorithm} schedule {stored.id}; this "
                f"searcher's is {self.schedule.id}: recompute it with the run's settings, or "
                "build the searcher from the stored one (state['algo']['schedule'])"
            )
        self._queue = [Schedule.from_dict(d) for d in state["queue"]]


class GitsSearcher(PrecomputedSearcher):
    """GITS as a searcher: its schedule (``compute_gits``) and the baselines, then FINISHED."""

    algorithm = "gits"
    origin = "gits"


class Ld3Searcher(PrecomputedSearcher):
    """LD3 as a searcher: its schedule (``compute_ld3``) and the baselines, then FINISHED."""

    algorithm = "ld3"
    origin = "ld3"


class AdaptiveSearcher(PrecomputedSearcher):
    """``search.algorithm: adaptive``'s search: the global schedule, then the baselines, each
    scored like any candidate; the per-sample predictor is trained after the search
    (``searchd.adaptive.product.compute_predictor``)."""

    algorithm = "adaptive"
    origin = "global"
