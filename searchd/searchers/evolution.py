"""Evolutionary search over schedules, as O2TDM and AutoDiffusion describe it.

Generation 0 is the seeds (the baseline schedules the driver passes, and any warm-start
schedules) filled up to ``population_num`` with random schedules; with ``random_fill=False``
and seeds given, generation 0 is the seeds alone (a warm-started local search spends
nothing on random candidates). Every later generation is built from the
``select_num`` best candidates scored so far (O2TDM's ``keep_top_k``: an elitist archive over
all generations, not only the last one): ``mutation_num`` mutants of a random parent,
``crossover_num`` children of two random parents, then random schedules up to
``population_num`` (``random_fill``). Candidates are deduplicated by content hash against
everything ever proposed, so nothing is scored twice; when a variation keeps producing known
candidates it is retried up to ``10 x`` the number wanted (O2TDM's bound), and the
generation is what could be found.

A whole generation is suggested at once; ``suggest`` returns None while results of the
current generation are outstanding, and FINISHED once the last generation (or the candidate
budget) is handed out. Parents are ranked by (value, id), so the search does not depend on
the order in which results arrive, nor on how many workers produced them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from searchd.schedule import Schedule
from searchd.schedules.spaces import Space, with_meta
from searchd.searchers.base import FINISHED, Next, ScheduleSearcher, rng_from_state, rng_state
from searchd.searchers.predictor import PredictorConfig, SchedulePredictor, kendall_tau

# O2TDM bounds each variation loop at 10 x the number of candidates wanted.
RETRY_FACTOR = 10


# Mutation operators: "space" (the space's own: every parameter may move, with probability
# m_prob) or "level" (``schedules.local.mutate_level``: one level moves between its
# neighbours, the others keep their bits, so mutants share their parent's leading levels and
# the evaluator's prefix tree computes those steps once).
MUTATIONS = ("space", "level")

class EvolutionSearcher(ScheduleSearcher):
    """O2TDM/AutoDiffusion evolutionary search.

    Args:
        space: search space (variation operators come from it).
        metric, mode: what to optimize.
        population_num: candidates per generation.
        select_num: parents: the best ``select_num`` candidates scored so far.
        mutation_num: mutants per generation.
        crossover_num: crossover children per generation.
        m_prob: per-parameter mutation probability.
        max_epochs: number of generations, generation 0 included.
        seed: seed of the searcher's random generator.
        seeds: schedules that open generation 0 (the baselines), in order.
        mutation_scale: step size of a mutation (see the space's ``mutate``): a number, or
            a pair ``(lo, hi)`` (mixed-scale mutation): every mutant draws its own step size
            log-uniformly in [lo, hi], so most mutants refine their parent while a few make
            the large moves (endpoints included) that a single small step never reaches
            within a few generations. The step drawn is kept in the mutant's meta.
        random_fill: fill every generation with random candidates up to population_num
            (False: generation 0 is the seeds alone, when there are any; later ones only
            mutants and children).
        max_candidates: optional cap on the number of candidates over the whole search.
        predictor_top_fraction: None (off), or the OMS-DPM pre-screen: every later
            generation's offspring are drawn ``1 / top_fraction`` times as many (mutants,
            crossover children and random fill alike), ranked by a ``SchedulePredictor``
            trained on every candidate scored so far, and only the predicted best
            ``population_num`` go to the actors. Active once ``predictor_min_train``
            candidates have finite values. The first screening fits the predictor from
            scratch (``steps``); every later one continues from the previous screening's
            weights for ``warm_steps`` steps on all candidates scored so far
            (``warm_steps=0``: from scratch every time). The weights are in the state.
        predictor_config: the predictor's sizes and training (``PredictorConfig``).
    """

    algorithm = "evolution"

    def __init__(
        self,
        space: Space,
        metric: str = "fid",
        mode: str = "min",
        population_num: int = 32,
        select_num: int = 8,
        mutation_num: int = 16,
        crossover_num: int = 8,
        m_prob: float = 0.25,
        max_epochs: int = 10,
        seed: int = 0,
        seeds: Sequence[Schedule] = (),
        *,
        mutation_scale: float | Sequence[float] = 0.1,
        random_fill: bool = True,
        max_candidates: int | None = None,
        predictor_top_fraction: float | None = None,
        predictor_min_train: int = 16,
        predictor_config: PredictorConfig | None = None,
        mutation: str = "space",
    ) -> None:
        super().__init__(space, metric, mode)
        if mutation not in MUTATIONS:
            raise ValueError(f"mutation = {mutation!r}; allowed: {', '.join(MUTATIONS)}")
        self.mutation = mutation
        if predictor_top_fraction is not None and not 0 < predictor_top_fraction <= 1:
            raise ValueError(
                f"predictor_top_fraction = {predictor_top_fraction}; it must be in (0, 1]"
            )
        if predictor_min_train < 2:
            raise ValueError(f"predictor_min_train = {predictor_min_train}; it must be >= 2")
        self.predictor_top_fraction = predictor_top_fraction
        self.predictor_min_train = predictor_min_train
        self.predictor_config = predictor_config or PredictorConfig()
        # Per screened generation: sizes, and the predictor's scores of the kept candidates
        # (their Kendall tau against the actual values is filled in once they are scored).
        self._pred_log: list[dict[str, Any]] = []
        # The last screening's predictor weights (plain data), which the next one continues.
        self._pred_weights: dict[str, Any] | None = None
        if population_num < 1 or max_epochs < 1:
            raise ValueError("population_num and max_epochs must be >= 1")
        if not 1 <= select_num <= population_num:
            raise ValueError(f"select_num = {select_num}; need 1 <= select_num <= population_num")
        if mutation_num < 0 or crossover_num < 0 or mutation_num + crossover_num > population_num:
            raise ValueError(
                f"mutation_num + crossover_num = {mutation_num + crossover_num}; "
                f"need 0 <= each and their sum <= population_num = {population_num}"
            )
        if not 0.0 <= m_prob <= 1.0:
            raise ValueError(f"m_prob = {m_prob}; it must be in [0, 1]")
        self.population_num = population_num
        self.select_num = select_num
        self.mutation_num = mutation_num
        self.crossover_num = crossover_num
        self.m_prob = m_prob
        self.max_epochs = max_epochs
        self.mutation_scale = _check_scale(mutation_scale)
        self.random_fill = random_fill
        self.max_candidates = max_candidates
        self.seed = seed
        self._seeds = self._prepare_seeds(seeds, "baseline")
        if len(self._seeds) > population_num:
            raise ValueError(
                f"{len(self._seeds)} seed schedules do not fit in population_num = "
                f"{population_num}"
            )
        self._rng = np.random.default_rng(seed)
        self._generation = -1  # index of the generation being handed out
        self._queue: list[Schedule] = []  # rest of the current generation, not yet suggested
        self._sizes: list[int] = []  # candidates per generation built so far

    @property
    def generation(self) -> int:
        """Index of the current generation (-1 before the first suggestion)."""
        return self._generation

    @property
    def generation_sizes(self) -> list[int]:
        return list(self._sizes)

    # Algorithm ---------------------------------------------------------------------------
    def _next(self, trial_id: str) -> Next:
        if self.max_candidates is not None and self.num_suggested >= self.max_candidates:
            return FINISHED
        if not self._queue:
            if self._pending or self._retry:
                return None  # the generation is out; wait for its results
            if self._generation + 1 >= self.max_epochs:
                return FINISHED
            self._generation += 1
            self._queue = self._build_generation(self._generation)
            self._sizes.append(len(self._queue))
            if not self._queue:
                return FINISHED  # the space has nothing new to offer
        return self._queue.pop(0), {}

    def _build_generation(self, g: int) -> list[Schedule]:
        out: list[Schedule] = []

        def add(s: Schedule, **meta: Any) -> bool:
            if s.id in self._seen:
                return False
            self._seen.add(s.id)
            out.append(with_meta(s, generation=g, searcher=self.algorithm, **meta))
            return True

        if g == 0:
            for s in self._seeds:
                add(s, origin=s.meta["origin"], parents=[])
            if self.random_fill or not out:
                self._fill_random(add, out)
            return out
        self._score_predictions()
        ranked = self.ranked()
        parents = [Schedule.from_dict(h["schedule"]) for h in ranked[: self.select_num]]
        screen = (self.predictor_top_fraction is not None and parents
                  and len(ranked) >= self.predictor_min_train)
        scale = 1.0 / self.predictor_top_fraction if screen else 1.0
        if parents:
            self._vary(add, out, int(math.ceil(self.mutation_num * scale)),
                       lambda: self._mutant(parents))
            self._vary(add, out, int(math.ceil(self.crossover_num * scale)),
                       lambda: self._child(parents))
        if self.random_fill or not parents:
            self._fill_random(add, out, int(math.ceil(self.population_num * scale)))
        if screen and len(out) > self.population_num:
            out = self._screen(g, out, ranked)
        return out

    # Predictor (OMS-DPM) -------------------------------------------------------------------
    def _screen(self, g: int, pool: list[Schedule], ranked: list[dict[str, Any]]
                ) -> list[Schedule]:
        """Keep the ``population_num`` offspring the predictor ranks best; the others are
        forgotten (not marked as proposed), so they may come back later."""
        train = [Schedule.from_dict(h["schedule"]) for h in ranked]
        values = [self.loss(h["value"]) for h in ranked]
        warm = self._pred_weights if self.predictor_config.warm_steps > 0 else None
        pred = SchedulePredictor(int(getattr(self.space, "n_models", 1)), self.seed,
                                 self.predictor_config,
                                 strategies=bool(getattr(self.space, "has_strategy", False))
                                 ).fit(train, values, round=g, init=warm)
        if self.predictor_config.warm_steps > 0:
            self._pred_weights = pred.weights()
        scores = pred.score(pool)
        order = sorted(range(len(pool)), key=lambda k: (scores[k], k))
        kept = sorted(order[: self.population_num])
        for k in order[self.population_num:]:
            self._seen.discard(pool[k].id)
        self._pred_log.append({
            "generation": g, "n_train": len(train), "pool": len(pool), "kept": len(kept),
            "scores": {pool[k].id: float(scores[k]) for k in kept}, "tau": None,
        })
        return [pool[k] for k in kept]

    def _score_predictions(self) -> None:
        """Kendall tau of the last screening's predictions against the values its kept
        candidates then got (held-out: the predictor never saw them)."""
        if not self._pred_log or self._pred_log[-1]["tau"] is not None:
            return
        last = self._pred_log[-1]
        values = {h["id"]: self.loss(h["value"]) for h in self._history}
        ids = [i for i in last["scores"] if i in values and math.isfinite(values[i])]
        if len(ids) >= 2:
            tau = kendall_tau([last["scores"][i] for i in ids], [values[i] for i in ids])
            last["tau"] = None if math.isnan(tau) else tau

    @property
    def predictor_log(self) -> list[dict[str, Any]]:
        """Per screened generation: generation, n_train, pool, kept, and the Kendall tau of
        the predictions of the kept candidates against their values (None until scored)."""
        self._score_predictions()
        return [{k: v for k, v in e.items() if k != "scores"} for e in self._pred_log]

    def _vary(self, add: Any, out: list[Schedule], wanted: int, make: Any) -> None:
        """Add up to ``wanted`` new candidates from ``make`` within the retry bound."""
        target = len(out) + wanted
        for _ in range(RETRY_FACTOR * wanted):
            if len(out) >= target:
                break
            child, meta = make()
            add(child, **meta)

    def _fill_random(self, add: Any, out: list[Schedule], size: int | None = None) -> None:
        wanted = (size or self.population_num) - len(out)
        self._vary(add, out, wanted, lambda: (self.space.sample(self._rng),
                                              {"origin": "random", "parents": []}))

    def _mutant(self, parents: list[Schedule]) -> tuple[Schedule, dict[str, Any]]:
        p = parents[int(self._rng.integers(len(parents)))]
        meta: dict[str, Any] = {"origin": "mutation", "parents": [p.id]}
        scale = self.mutation_scale
        if isinstance(scale, tuple):  # mixed scale: log-uniform in [lo, hi]
            lo, hi = scale
            scale = meta["mutation_scale"] = float(lo * (hi / lo) ** self._rng.random())
        if self.mutation == "level":  # one level moves; the others keep their bits
            from searchd.schedules.local import mutate_level

            return mutate_level(self.space, p, self._rng, scale), meta
        return self.space.mutate(p, self._rng, self.m_prob, scale), meta

    def _child(self, parents: list[Schedule]) -> tuple[Schedule, dict[str, Any]]:
        if len(parents) >= 2:
            i, j = self._rng.choice(len(parents), size=2, replace=False)
        else:
            i = j = 0
        a, b = parents[int(i)], parents[int(j)]
        return self.space.crossover(a, b, self._rng), {"origin": "crossover",
                                                       "parents": [a.id, b.id]}

    # State -------------------------------------------------------------------------------
    def _algo_state(self) -> dict[str, Any]:
        return {
            "rng": rng_state(self._rng),
            "generation": self._generation,
            "queue": [s.to_dict() for s in self._queue],
            "sizes": list(self._sizes),
            "predictor_log": [dict(e) for e in self._pred_log],
            **({"predictor_weights": self._pred_weights} if self._pred_weights else {}),
            "params": {
                "population_num": self.population_num, "select_num": self.select_num,
                "mutation_num": self.mutation_num, "crossover_num": self.crossover_num,
                "m_prob": self.m_prob, "max_epochs": self.max_epochs, "seed": self.seed,
                "mutation_scale": (list(self.mutation_scale)
                                   if isinstance(self.mutation_scale, tuple)
                                   else self.mutation_scale),
                "random_fill": self.random_fill,
                "max_candidates": self.max_candidates,
                "predictor_top_fraction": self.predictor_top_fraction,
                "predictor_min_train": self.predictor_min_train,
                **({"mutation": self.mutation} if self.mutation != "space" else {}),
            },
        }

    def _set_algo_state(self, state: Mapping[str, Any]) -> None:
        self._rng = rng_from_state(state["rng"])
        self._generation = int(state["generation"])
        self._queue = [Schedule.from_dict(d) for d in state["queue"]]
        self._sizes = [int(n) for n in state["sizes"]]
        self._pred_log = [dict(e) for e in state.get("predictor_log", [])]
        self._pred_weights = state.get("predictor_weights")


def _check_scale(scale: float | Sequence[float]) -> float | tuple[float, float]:
    """A mutation step: a positive number, or a pair 0 < lo <= hi (mixed scale)."""
    if isinstance(scale, (int, float, np.floating, np.integer)):
        if not (math.isfinite(float(scale)) and float(scale) > 0):
            raise ValueError(f"mutation_scale = {scale!r}; it must be > 0")
        return float(scale)
    pair = tuple(float(x) for x in scale)
    if len(pair) != 2 or not (0 < pair[0] <= pair[1] < math.inf):
        raise ValueError(
            f"mutation_scale = {scale!r}; a mixed scale is a pair (lo, hi) with 0 < lo <= hi"
        )
    if pair[0] == pair[1]:
        return pair[0]
    return pair  # type: ignore[return-value]
