"""Random search: schedules drawn uniformly in the space, deduplicated, up to a budget.

The seed schedules (the baselines) come first, so a random search, like the others, is
compared with the baselines on the same footing; they count toward the budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from searchd.schedule import Schedule
from searchd.schedules.spaces import Space, with_meta
from searchd.searchers.base import FINISHED, Next, ScheduleSearcher, rng_from_state, rng_state

# Draws tried before a space is deemed exhausted (only small discrete spaces get there).
MAX_DRAWS = 100


class RandomSearcher(ScheduleSearcher):
    """Uniform random search.

    Args:
        space: search space (``space.sample`` draws the candidates).
        metric, mode: what to optimize.
        num_samples: candidates in all, seeds included.
        seed: seed of the searcher's random generator.
        seeds: schedules suggested first (the baselines).
    """

    algorithm = "random"

    def __init__(
        self,
        space: Space,
        metric: str = "fid",
        mode: str = "min",
        num_samples: int = 100,
        seed: int = 0,
        seeds: Sequence[Schedule] = (),
    ) -> None:
        super().__init__(space, metric, mode)
        if num_samples < 1:
            raise ValueError(f"num_samples = {num_samples}; it must be >= 1")
        self.num_samples = num_samples
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._seed_queue = self._prepare_seeds(seeds, "baseline")
        self._exhausted = False

    def _next(self, trial_id: str) -> Next:
        if self.num_suggested >= self.num_samples or self._exhausted:
            return FINISHED
        while self._seed_queue:
            s = self._seed_queue.pop(0)
            if s.id not in self._seen:
                return with_meta(s, searcher=self.algorithm, parents=[]), {}
        for _ in range(MAX_DRAWS):
            s = self.space.sample(self._rng)
            if s.id not in self._seen:
                return with_meta(s, origin="random", searcher=self.algorithm, parents=[]), {}
        self._exhausted = True
        return FINISHED

    def _algo_state(self) -> dict[str, Any]:
        return {
            "rng": rng_state(self._rng),
            "seed_queue": [s.to_dict() for s in self._seed_queue],
            "exhausted": self._exhausted,
            "params": {"num_samples": self.num_samples, "seed": self.seed},
        }

    def _set_algo_state(self, state: Mapping[str, Any]) -> None:
        self._rng = rng_from_state(state["rng"])
        self._seed_queue = [Schedule.from_dict(d) for d in state["seed_queue"]]
        self._exhausted = bool(state["exhausted"])
