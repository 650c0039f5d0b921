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
# How the local phase's step size moves (``refine_rule``).
REFINE_RULES = ("decay", "success")

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
        refine: candidates at the end of the search spent on a local search around the
            incumbent (the best candidate scored so far) instead of bred generations: the
            phase begins where ``refine`` candidates of ``max_candidates`` are left (the
            bred generation then running is cut), or after the last bred generation
            (``max_epochs``, which counts bred generations only), whichever comes first,
            and ends after ``refine`` candidates. It is a (1 + ``refine_batch``) evolution
            strategy whose
            every step moves all parameters of the incumbent by a Gaussian of standard
            deviation ``refine_scale[0]`` at the phase's first candidate, shrinking
            log-linearly to ``refine_scale[1]`` at its last (see ``refine_step``). With the
            pre-screen on, each step's mutants are drawn ``1 / top_fraction`` times as many
            and the predicted best ``refine_batch`` are scored. 0: off.
        refine_batch: mutants per local step (scored together, then the incumbent updates).
        refine_scale: (first, last) step size of the local phase, first >= last > 0.
        refine_rule: how the local step size moves: "decay" (log-linearly from
            ``refine_scale[0]`` to ``refine_scale[1]`` over the phase, whatever happens) or
            "success" (Rechenberg's 1/5 rule: it starts at ``refine_scale[0]``, doubles
            after a step that improved the incumbent and shrinks by 2^(-1/4) after one that
            did not, kept within ``refine_scale``).
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
        refine: int = 0,
        refine_batch: int = 1,
        refine_scale: Sequence[float] = (0.1, 0.01),
        refine_rule: str = "decay",
    ) -> None:
        super().__init__(space, metric, mode)
        if not (isinstance(refine, (int, np.integer)) and refine >= 0):
            raise ValueError(f"refine = {refine!r}; it must be an integer >= 0")
        if not (isinstance(refine_batch, (int, np.integer)) and refine_batch >= 1):
            raise ValueError(f"refine_batch = {refine_batch!r}; it must be an integer >= 1")
        rs = tuple(float(x) for x in refine_scale)
        if len(rs) != 2 or not (math.isfinite(rs[0]) and rs[0] >= rs[1] > 0):
            raise ValueError(f"refine_scale = {refine_scale!r}; a pair (first, last) with "
                             "first >= last > 0")
        if refine_rule not in REFINE_RULES:
            raise ValueError(f"refine_rule = {refine_rule!r}; allowed: "
                             f"{', '.join(REFINE_RULES)}")
        self.refine_rule = refine_rule
        self._refine_sigma: float | None = None  # the success rule's current step
        self.refine, self.refine_batch = int(refine), int(refine_batch)
        self.refine_scale: tuple[float, float] = (rs[0], rs[1])
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
        self._refine_start: int | None = None  # candidates suggested when refine began

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
        if self._refine_start is None and self._refine_due():
            for s in self._queue:  # the bred generation is cut where the local phase begins
                self._seen.discard(s.id)
            self._queue = []
            self._refine_start = self.num_suggested
        local = self._refine_start is not None
        if local and self.num_suggested - self._refine_start >= self.refine:
            return FINISHED
        if not self._queue:
            if self._pending or self._retry:
                return None  # the generation is out; wait for its results
            if not local and self._generation + 1 >= self.max_epochs:
                return FINISHED
            self._generation += 1
            self._queue = (self._build_refine(self._generation) if local
                           else self._build_generation(self._generation))
            self._sizes.append(len(self._queue))
            if not self._queue:
                return FINISHED  # the space has nothing new to offer
        return self._queue.pop(0), {}

    def _adder(self, g: int, out: list[Schedule]) -> Any:
        """``add(schedule, **meta)``: append a schedule never proposed before to ``out`` as a
        candidate of generation ``g`` (True), or skip a known one (False)."""
        def add(s: Schedule, **meta: Any) -> bool:
            if s.id in self._seen:
                return False
            self._seen.add(s.id)
            out.append(with_meta(s, generation=g, searcher=self.algorithm, **meta))
            return True

        return add

    def _build_generation(self, g: int) -> list[Schedule]:
        out: list[Schedule] = []
        add = self._adder(g, out)

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

    # Local phase (refine) --------------------------------------------------------------------
    def _refine_due(self) -> bool:
        """Whether the local phase begins now: refine is on, generation 0 is out, and either
        the budget left is the phase's (the last ``refine`` of ``max_candidates``) or the
        bred generations (``max_epochs``) are all handed out."""
        if not self.refine or self._generation < 0:
            return False
        if (self.max_candidates is not None
                and self.num_suggested >= self.max_candidates - self.refine):
            return True
        return not self._queue and self._generation + 1 >= self.max_epochs

    def refine_step(self, j: int) -> float:
        """Step size of the local phase's ``j``-th candidate (0-based): ``refine_scale[0]``
        at j = 0, shrinking log-linearly to ``refine_scale[1]`` at j = refine - 1."""
        hi, lo = self.refine_scale
        frac = min(max(j, 0), max(self.refine - 1, 1)) / max(self.refine - 1, 1)
        return float(hi * (lo / hi) ** frac)

    def _build_refine(self, g: int) -> list[Schedule]:
        """One local step: ``refine_batch`` mutants of the incumbent (every parameter moves,
        by the current step size), pre-screened like a bred generation when the predictor
        is on. Falls back to a bred generation while nothing has a finite value."""
        self._score_predictions()
        ranked = self.ranked()
        if not ranked:
            return self._build_generation(g)
        inc = Schedule.from_dict(ranked[0]["schedule"])
        j = self.num_suggested - int(self._refine_start or 0)  # index in the phase
        if self.refine_rule == "success":
            hi, lo = self.refine_scale
            if self._refine_sigma is None:
                step = hi
            else:  # the last step succeeded when one of its mutants is the incumbent now
                won = inc.meta.get("origin") == "refine" and inc.meta.get("generation") == g - 1
                step = min(hi, max(lo, self._refine_sigma * (2.0 if won else 2.0 ** -0.25)))
            self._refine_sigma = step
        else:
            step = self.refine_step(j)
        wanted = min(self.refine_batch, self.refine - j)
        if self.max_candidates is not None:
            wanted = min(wanted, self.max_candidates - self.num_suggested)
        screen = (self.predictor_top_fraction is not None
                  and len(ranked) >= self.predictor_min_train)
        n_draw = int(math.ceil(wanted / self.predictor_top_fraction)) if screen else wanted
        out: list[Schedule] = []
        add = self._adder(g, out)

        meta = {"origin": "refine", "parents": [inc.id], "mutation_scale": step}
        self._vary(add, out, n_draw, lambda: (self.space.mutate(inc, self._rng, 1.0, step),
                                              dict(meta)))
        if screen and len(out) > wanted:
            out = self._screen(g, out, ranked, keep=wanted)
        return out

    # Predictor (OMS-DPM) -------------------------------------------------------------------
    def _screen(self, g: int, pool: list[Schedule], ranked: list[dict[str, Any]],
                keep: int | None = None) -> list[Schedule]:
        """Keep the ``keep`` (default ``population_num``) offspring the predictor ranks
        best; the others are forgotten (not marked as proposed), so they may come back
        later."""
        keep = self.population_num if keep is None else keep
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
        kept = sorted(order[:keep])
        for k in order[keep:]:
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
            **({"refine_start": self._refine_start,
                "refine_sigma": self._refine_sigma} if self.refine else {}),
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
                **({"refine": self.refine, "refine_batch": self.refine_batch,
                    "refine_scale": list(self.refine_scale),
                    **({"refine_rule": self.refine_rule}
                       if self.refine_rule != "decay" else {})} if self.refine else {}),
            },
        }

    def _set_algo_state(self, state: Mapping[str, Any]) -> None:
        self._rng = rng_from_state(state["rng"])
        self._generation = int(state["generation"])
        self._queue = [Schedule.from_dict(d) for d in state["queue"]]
        self._sizes = [int(n) for n in state["sizes"]]
        start = state.get("refine_start")
        self._refine_start = None if start is None else int(start)
        sigma = state.get("refine_sigma")
        self._refine_sigma = None if sigma is None else float(sigma)
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
