"""Name -> searcher factory, and the config -> space/baselines glue the driver needs.

``make_searcher(config.search, space, baselines, metric, mode)`` builds the searcher a
configuration names; ``make_space`` and ``make_baselines`` build what it searches over from
the configuration and the model's noise range (or grid). Only this module and the driver
read the configuration; searchers and spaces take plain arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from searchd.schedule import Schedule
from searchd.schedules.baselines import GRIDS, baseline
from searchd.schedules.spaces import ContinuousSpace, DiscreteSpace, Space, with_meta
from searchd.search.base import ScheduleSearcher

if TYPE_CHECKING:
    from searchd.config import SearchConfig, SearchSection

Factory = Callable[..., ScheduleSearcher]
# Factories take (search, space, seeds, metric, mode, anchors): ``anchors`` maps "gits"/"ld3"
# to the schedules computed at run start (searchd.search.anchors).


def _anchor(anchors: Mapping[str, Schedule] | None, name: str) -> Schedule:
    if not anchors or name not in anchors:
        raise ValueError(f"the {name} schedule must be computed before the searcher is built "
                         f"(searchd.search.anchors.compute_anchor)")
    return anchors[name]


def _evolution(
    search: SearchSection, space: Space, seeds: Sequence[Schedule], metric: str, mode: str,
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    from searchd.search.evolution import EvolutionSearcher
    from searchd.search.predictor import PredictorConfig

    ev = search.evolution
    pr = search.predictor
    # Warm start: the computed schedules join the baselines in generation 0 (a schedule
    # that is also a baseline is kept once, as the baseline).
    seeds = [*seeds, *(_anchor(anchors, a) for a in ev.warm_start)]
    return EvolutionSearcher(
        space, metric, mode,
        population_num=ev.population_num, select_num=ev.select_num,
        mutation_num=ev.mutation_num, crossover_num=ev.crossover_num, m_prob=ev.m_prob,
        max_epochs=ev.generations, seed=search.seed, seeds=seeds,
        mutation_scale=ev.mutation_scale, random_fill=ev.random_fill,
        max_candidates=search.budget,
        predictor_top_fraction=pr.top_fraction if pr.enabled else None,
        predictor_min_train=pr.min_train,
        predictor_config=PredictorConfig(hidden=pr.hidden, steps=pr.steps),
    )


def _random(
    search: SearchSection, space: Space, seeds: Sequence[Schedule], metric: str, mode: str,
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    from searchd.search.random_search import RandomSearcher

    return RandomSearcher(space, metric, mode, num_samples=search.budget, seed=search.seed,
                          seeds=seeds)


def _bayes(
    search: SearchSection, space: Space, seeds: Sequence[Schedule], metric: str, mode: str,
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    from searchd.search.bayes import BayesSearcher

    return BayesSearcher(
        space, metric, mode, sampler=search.bayes.sampler, num_samples=search.budget,
        seed=search.seed, seeds=seeds, n_startup_trials=search.bayes.n_startup_trials,
    )


def _gits(
    search: SearchSection, space: Space, seeds: Sequence[Schedule], metric: str, mode: str,
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    from searchd.search.gits import GitsSearcher

    return GitsSearcher(space, metric, mode, schedule=_anchor(anchors, "gits"), seeds=seeds)


def _ld3(
    search: SearchSection, space: Space, seeds: Sequence[Schedule], metric: str, mode: str,
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    from searchd.search.ld3 import Ld3Searcher

    return Ld3Searcher(space, metric, mode, schedule=_anchor(anchors, "ld3"), seeds=seeds)


def _adaptive(
    search: SearchSection, space: Space, seeds: Sequence[Schedule], metric: str, mode: str,
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    from searchd.adaptive.run import AdaptiveSearcher, global_schedule

    return AdaptiveSearcher(space, metric, mode,
                            schedule=global_schedule(search.adaptive, space, anchors),
                            seeds=seeds)


SEARCHERS: dict[str, Factory] = {
    "evolution": _evolution,
    "random": _random,
    "bayes": _bayes,
    "gits": _gits,
    "ld3": _ld3,
    "adaptive": _adaptive,
}


def make_searcher(
    search: SearchSection,
    space: Space,
    baselines: Sequence[Schedule] = (),
    metric: str = "fid",
    mode: str = "min",
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    """The searcher named by ``search.algorithm``, seeded with the baseline schedules.

    ``anchors``: the GITS/LD3 schedules computed for the run (needed by ``gits``, ``ld3``
    and by an evolution with ``warm_start``). Raises ``ValueError`` listing the known
    algorithms for an unknown name.
    """
    name = search.algorithm
    if name not in SEARCHERS:
        raise ValueError(f"unknown search algorithm {name!r}; known: {sorted(SEARCHERS)}")
    return SEARCHERS[name](search, space, baselines, metric, mode, anchors)


def make_space(
    config: SearchConfig,
    sigma_min: float,
    sigma_max: float,
    grid: Sequence[float] | np.ndarray | None = None,
    zoo: Mapping[str, Any] | None = None,
) -> Space:
    """The search space of a configuration over a model's noise range (and grid).

    ``space.sigma_min``/``space.sigma_max`` in the configuration override the model's range.
    A discrete space uses ``space.grid`` (a named grid) or else the model's ``grid``.
    Model-schedule spaces (kind models/joint) need ``zoo``: ``{"members": [names],
    "latency_ms": [ms per sample per call]}`` as the actors measured them.
    """
    sc = config.space
    lo = sc.sigma_min if sc.sigma_min is not None else sigma_min
    hi = sc.sigma_max if sc.sigma_max is not None else sigma_max
    if sc.kind in ("models", "joint"):
        return _model_space(config, lo, hi, zoo)
    if sc.kind == "continuous":
        return ContinuousSpace(
            config.steps, lo, hi, sc.final_zero, sc.warp, sc.rho,
            sc.endpoints == "free", gap_ratio=sc.gap_ratio,
            endpoint_range=sc.endpoint_range, solver=config.solver.name, shift=sc.shift,
        )
    if sc.grid is not None:
        grid = GRIDS[sc.grid]()
    if grid is None:
        raise ValueError(
            "space.kind = 'discrete' needs a grid: set space.grid or use a model that has one"
        )
    return DiscreteSpace(config.steps, grid, sc.final_zero, lo, hi, sc.endpoints == "free",
                         solver=config.solver.name)


def _model_space(config: SearchConfig, lo: float, hi: float,
                 zoo: Mapping[str, Any] | None) -> Space:
    from searchd.models.compose import budget_ms
    from searchd.schedules.model_spaces import JointSpace, ModelSpace

    sc = config.space
    if zoo is None:
        raise ValueError(f"space.kind = {sc.kind!r} needs the zoo's measured latencies")
    lat = [float(v) for v in zoo["latency_ms"]]
    names = [str(n) for n in zoo["members"]]
    budget = budget_ms(lat, ms=sc.budget_ms, nfe=sc.budget_nfe)
    if sc.kind == "models":
        t = sc.timesteps
        sig = baseline(t["family"], config.steps, lo, hi, sc.final_zero, **dict(t.get("params")
                                                                                 or {}))
        return ModelSpace(sig, lat, budget, solver=config.solver.name, names=names)
    times = ContinuousSpace(
        config.steps, lo, hi, sc.final_zero, sc.warp, sc.rho, sc.endpoints == "free",
        gap_ratio=sc.gap_ratio, endpoint_range=sc.endpoint_range, solver=config.solver.name,
        shift=sc.shift,
    )
    return JointSpace(times, lat, budget, names=names)


def _model_baselines(config: SearchConfig, space: Any) -> list[Schedule]:
    """Single-member schedules that fit the budget (and the slowest member's, repaired): of
    the fixed timesteps (kind models), or of every configured family (kind joint)."""
    from searchd.schedules.model_spaces import JointSpace, single_model_schedules

    if isinstance(space, JointSpace):
        families = [(b.label + "/", b.family, dict(b.params)) for b in config.baselines]
    else:
        t = config.space.timesteps
        families = [("", t["family"], dict(t.get("params") or {}))]
    out: list[Schedule] = []
    for prefix, family, params in families:
        sig = baseline(family, space.n_steps, space.sigma_min, space.sigma_max,
                       space.final_zero, **params)
        times = Schedule(sig, solver=space.solver)
        for member, s in single_model_schedules(space, times):
            meta = {"origin": "baseline", "family": family, "name": prefix + member,
                    "params": params, "member": member}
            out.append(space.check(with_meta(s, **meta)))
    return out


def make_baselines(
    config: SearchConfig, space: Space, anchors: Mapping[str, Schedule] | None = None
) -> list[Schedule]:
    """The configured baseline schedules, fitted to ``space``.

    Continuous families are sampled over the space's range; on a discrete space every
    baseline is projected onto the grid (nearest free levels in log sigma), and the
    ``discrete`` family uses the space's grid unless it names one. The computed families
    (``gits``, ``ld3``) are taken from ``anchors``. On a model-schedule space the baselines
    are the single-member schedules that fit the budget.
    """
    if config.space.kind in ("models", "joint"):
        return _model_baselines(config, space)
    out: list[Schedule] = []
    for b in config.baselines:
        if b.family in ("gits", "ld3"):
            a = _anchor(anchors, b.family)
            keep = {k: v for k, v in a.meta.items() if k in ("params", "cost")}
            meta = {"origin": "baseline", "family": b.family, "name": b.label, **keep}
            out.append(space.check(with_meta(a, **meta)))
            continue
        params: dict[str, Any] = dict(b.params)
        if b.family == "discrete" and "grid" not in params:
            if not isinstance(space, DiscreteSpace):
                raise ValueError(f"baseline {b.label!r} needs a grid; give params.grid")
            params["grid"] = space.grid
        sig = baseline(b.family, space.n_steps, space.sigma_min, space.sigma_max,
                       space.final_zero, **params)
        meta = {"origin": "baseline", "family": b.family, "name": b.label,
                "params": dict(b.params)}
        s = Schedule(sig, solver=space.solver, meta=meta)
        if isinstance(space, DiscreteSpace):
            s = with_meta(space.project(s), **meta)
        out.append(space.check(s))
    return out
