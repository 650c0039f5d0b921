"""From a configuration to what a run searches with: the space, the baselines, the
searcher, and the jobs that compute the anchors (GITS, LD3).

``make_space`` and ``make_baselines`` build what the search runs over from the configuration
and the model's facts (noise range, grid, a zoo's latencies); ``make_searcher`` builds the
searcher ``search.algorithm`` names (``searchd.searchers.SEARCHERS``); ``anchor_job`` gives
the arguments of ``searchd.methods.compute_anchor`` for one anchor. Only this module and the
run's stages read the configuration; searchers, spaces and methods take plain arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from searchd.config import SearchConfig, SearchSection
from searchd.schedule import Schedule
from searchd.schedules.baselines import GRIDS, baseline
from searchd.schedules.spaces import ContinuousSpace, DiscreteSpace, Space, with_meta
from searchd.searchers.base import ScheduleSearcher

Factory = Callable[..., ScheduleSearcher]
# Factories take (search, space, seeds, metric, mode, anchors): ``anchors`` maps "gits"/"ld3"
# to the schedules computed at run start (``compute_anchor``).


def _anchor(anchors: Mapping[str, Schedule] | None, name: str) -> Schedule:
    if not anchors or name not in anchors:
        raise ValueError(f"the {name} schedule must be computed before the searcher is built "
                         f"(searchd.methods.compute_anchor)")
    return anchors[name]


def searcher_budget(search: SearchSection) -> int:
    """The candidates the searcher may score: ``search.budget`` less the race's re-scorings,
    and with successive halving as many candidates as the same samples pay for
    (``searchd.loop.racing.search_budget``)."""
    from searchd.loop.racing import search_budget

    blocks = search.race_blocks
    return search_budget(int(search.budget), search.race_k, blocks,
                         search.halving.rungs, search.halving.eta)


def _evolution(
    search: SearchSection, space: Space, seeds: Sequence[Schedule], metric: str, mode: str,
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    from searchd.searchers.evolution import EvolutionSearcher
    from searchd.searchers.predictor import PredictorConfig

    ev = search.evolution
    pr = search.predictor
    # Warm start: the computed schedules join the baselines in generation 0 (a schedule
    # that is also a baseline is kept once, as the baseline).
    seeds = [*seeds, *(_anchor(anchors, a) for a in ev.warm_start)]
    # The pre-screen's step tokens hold levels and models, not guidance weights: on a guided
    # space it would rank offspring blind to half of what they are, so it stays off there.
    screen = pr.enabled and not _is_guided(space)
    try:
        return EvolutionSearcher(
            space, metric, mode,
            population_num=ev.population_num, select_num=ev.select_num,
            mutation_num=ev.mutation_num, crossover_num=ev.crossover_num, m_prob=ev.m_prob,
            max_epochs=ev.generations, seed=search.seed, seeds=seeds,
            mutation_scale=ev.mutation_scale, random_fill=ev.random_fill,
            max_candidates=searcher_budget(search),
            predictor_top_fraction=pr.top_fraction if screen else None,
            predictor_min_train=pr.min_train,
            predictor_config=PredictorConfig(hidden=pr.hidden, steps=pr.steps,
                                             warm_steps=pr.warm_steps),
            mutation=ev.mutation, refine=ev.refine, refine_batch=ev.refine_batch,
            refine_scale=ev.refine_scale, refine_rule=ev.refine_rule,
        )
    except ValueError as e:
        if len(seeds) <= ev.population_num:
            raise
        # Generation 0 holds every seed. The configuration counts baselines and warm starts;
        # on a guided space their number is known only here (each baseline with each
        # space.guidance.baseline_w, and the paper's interval, where the family holds them).
        from searchd.loop.runs import BadInput

        raise BadInput(
            f"search.evolution.population_num: got {ev.population_num}; generation 0 must "
            f"hold every baseline and warm start ({e}); allowed: a population_num at least "
            f"that large, or fewer baselines / space.guidance.baseline_w"
        ) from None


def _random(
    search: SearchSection, space: Space, seeds: Sequence[Schedule], metric: str, mode: str,
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    from searchd.searchers.random_search import RandomSearcher

    return RandomSearcher(space, metric, mode, num_samples=searcher_budget(search),
                          seed=search.seed,
                          seeds=seeds)


def _bayes(
    search: SearchSection, space: Space, seeds: Sequence[Schedule], metric: str, mode: str,
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    from searchd.searchers.bayes import BayesSearcher

    return BayesSearcher(
        space, metric, mode, sampler=search.bayes.sampler,
        num_samples=searcher_budget(search),
        seed=search.seed, seeds=seeds, n_startup_trials=search.bayes.n_startup_trials,
    )


def _gits(
    search: SearchSection, space: Space, seeds: Sequence[Schedule], metric: str, mode: str,
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    from searchd.searchers.precomputed import GitsSearcher

    return GitsSearcher(space, metric, mode, schedule=_anchor(anchors, "gits"), seeds=seeds)


def _ld3(
    search: SearchSection, space: Space, seeds: Sequence[Schedule], metric: str, mode: str,
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    from searchd.searchers.precomputed import Ld3Searcher

    return Ld3Searcher(space, metric, mode, schedule=_anchor(anchors, "ld3"), seeds=seeds)


def _adaptive(
    search: SearchSection, space: Space, seeds: Sequence[Schedule], metric: str, mode: str,
    anchors: Mapping[str, Schedule] | None = None,
) -> ScheduleSearcher:
    from searchd.loop.adaptive import global_schedule
    from searchd.searchers.precomputed import AdaptiveSearcher

    return AdaptiveSearcher(space, metric, mode,
                            schedule=global_schedule(search.adaptive, space, anchors),
                            seeds=seeds)


# One factory per algorithm of ``searchd.searchers.SEARCHERS`` (tested to match).
FACTORIES: dict[str, Factory] = {
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
    if name not in FACTORIES:
        raise ValueError(f"unknown search algorithm {name!r}; known: {sorted(FACTORIES)}")
    if _is_guided(space) and anchors:
        # Anchors are computed on the timesteps alone: as candidates they get the guided
        # space's nearest weights (w = 1 where the family has it).
        anchors = {k: space.project(v) for k, v in anchors.items()}  # type: ignore[attr-defined]
    return FACTORIES[name](search, space, baselines, metric, mode, anchors)


def _without_strategy(space: Space) -> Space:
    """The space a solver-schedule space (``StrategySpace``) joins the strategy to (the
    space itself otherwise)."""
    if getattr(space, "has_strategy", False):
        return space.timesteps  # type: ignore[attr-defined]
    return space


def _is_guided(space: Space) -> bool:
    from searchd.schedules.guidance_spaces import GuidedSpace

    return isinstance(_without_strategy(space), GuidedSpace)


def timestep_space(space: Space) -> Space:
    """The timestep part of a guided or solver-schedule space (the space itself otherwise):
    what the anchors (GITS, LD3) are computed and fitted on."""
    space = _without_strategy(space)
    return space.timesteps if _is_guided(space) else space  # type: ignore[attr-defined]


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
    if sc.strategy:
        from searchd.schedules.strategy_space import StrategySpace

        inner = make_space(config.model_copy(update={"space": sc.model_copy(
            update={"strategy": False})}), sigma_min, sigma_max, grid, zoo)
        return StrategySpace(inner, config.solver.options,  # type: ignore[arg-type]
                             max_order=sc.max_order)
    if sc.kind == "continuous":
        times: Space = ContinuousSpace(
            config.steps, lo, hi, sc.final_zero, sc.warp, sc.rho,
            sc.endpoints == "free", gap_ratio=sc.gap_ratio,
            endpoint_range=sc.endpoint_range, solver=config.solver.name, shift=sc.shift,
        )
        return _guided(config, times)
    if sc.grid is not None:
        grid = GRIDS[sc.grid]()
    if grid is None:
        raise ValueError(
            "space.kind = 'discrete' needs a grid: set space.grid or use a model that has one"
        )
    return _guided(config, DiscreteSpace(config.steps, grid, sc.final_zero, lo, hi,
                                         sc.endpoints == "free", solver=config.solver.name))


def _guided(config: SearchConfig, times: Any) -> Space:
    """``times`` joined with the guidance part ``space.guidance`` names (unchanged for kind
    none): ``searchd.schedules.guidance_spaces``."""
    from searchd.schedules.guidance_spaces import (
        ConstantGuidance,
        GuidedSpace,
        IntervalGuidance,
        StepGuidance,
    )

    g = config.space.guidance
    if g.kind == "none":
        return times
    part: Any
    if g.kind == "constant":
        part = ConstantGuidance(float(g.w))  # type: ignore[arg-type]
    elif g.kind == "interval":
        part = IntervalGuidance(g.w if g.w is not None else g.w_range, times.sigma_min,
                                times.sigma_max)
    else:
        part = StepGuidance(times.n_steps, g.w_range, g.one_band)
    return GuidedSpace(times, part)


def guided_baselines(config: SearchConfig, space: Any, timesteps: Sequence[Schedule]
                     ) -> list[Schedule]:
    """The baselines of a guided space: each baseline's timesteps with constant guidance at
    each ``space.guidance.baseline_w`` (and the constant space's own w), and the paper's
    interval (``PAPER_INTERVAL``) on the first; the ones the space's family cannot hold
    are left out (a constant space holds only its w)."""
    from searchd.schedules.guidance_spaces import constant_guidance, interval_guidance

    g = config.space.guidance
    ws = list(dict.fromkeys([*g.baseline_w, *([g.w] if g.kind == "constant" else [])]))
    out: list[Schedule] = []
    for k, t in enumerate(timesteps):
        name = str(t.meta.get("name", t.id))
        made = [with_meta(constant_guidance(t, w), name=f"{name} w={w:g}") for w in ws]
        if g.paper_interval and k == 0:
            made.append(with_meta(interval_guidance(t), name=f"{name} interval"))
        for s in made:
            try:
                out.append(space.check(s))
            except ValueError:
                continue
    if not out:
        raise ValueError(
            f"no baseline fits space.guidance (kind {g.kind!r}): give space.guidance.baseline_w "
            "weights the family holds"
        )
    return out


def _model_space(config: SearchConfig, lo: float, hi: float,
                 zoo: Mapping[str, Any] | None) -> Space:
    from searchd.schedules.cost import budget_ms
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
    are the single-member schedules that fit the budget; on a solver-schedule space they
    are the plain solver's (no strategy).
    """
    if config.space.kind in ("models", "joint"):
        return _model_baselines(config, space)
    if getattr(space, "has_strategy", False):
        # The plain solver's baselines (no strategy) on the timestep (and guidance) half.
        return [space.check(b) for b in make_baselines(config, space.timesteps, anchors)]
    if config.space.guidance.kind != "none":
        return guided_baselines(config, space,
                                make_baselines(_unguided(config), space.timesteps, anchors))
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


def _unguided(config: SearchConfig) -> SearchConfig:
    """The configuration with ``space.guidance.kind`` none (the same timestep baselines)."""
    space = config.space.model_copy(
        update={"guidance": config.space.guidance.model_copy(update={"kind": "none"})})
    return config.model_copy(update={"space": space})


# Anchors: the jobs that compute them -----------------------------------------------------
def free_end(space: Space) -> bool:
    """The lowest positive level is chosen by the method unless the space pins it."""
    return bool(getattr(space, "free_endpoints", True)) or not space.final_zero


def gits_params(cfg: SearchConfig, space: Space) -> dict[str, Any]:
    """``compute_gits`` keywords for a configuration's ``search.gits`` over ``space``."""
    g = cfg.search.gits
    params: dict[str, Any] = {
        "grid_points": g.grid_points, "rho": g.rho, "teacher_solver": g.teacher_solver,
        "teacher_substeps": g.teacher_substeps, "metric": g.metric, "coeff": g.coeff,
        "final_zero": space.final_zero, "free_end": free_end(space),
        "sigma_min": space.sigma_min, "sigma_max": space.sigma_max,
    }
    if g.student_solver is not None:
        params["student_solver"] = g.student_solver
    if cfg.solver.options:
        params["student_options"] = dict(cfg.solver.options)
    if isinstance(space, DiscreteSpace):
        # GITS's "discrete" schedule type: a teacher grid of the space's own levels.
        pool = np.asarray(space.grid, dtype=np.float64)[space.pool]
        n = min(g.grid_points, pool.size)
        pick = np.unique(np.round(np.linspace(0, pool.size - 1, n)).astype(int))
        levels = pool[pick][::-1]
        params["grid"] = [float(x) for x in
                          (np.append(levels, 0.0) if space.final_zero else levels)]
    return params


def ld3_params(cfg: SearchConfig, space: Space) -> dict[str, Any]:
    """``compute_ld3`` keywords for a configuration's ``search.ld3`` over ``space``."""
    c = cfg.search.ld3
    params: dict[str, Any] = {
        "iters": c.iters, "lr": c.lr, "optimizer": c.optimizer, "space": c.space, "rho": c.rho,
        "loss": c.loss, "teacher_solver": c.teacher_solver, "teacher_steps": c.teacher_steps,
        "batch_size": c.batch_size, "slack": c.slack, "patience": c.patience,
        "lr_decay": c.lr_decay, "seed": cfg.search.seed, "final_zero": space.final_zero,
        "free_end": free_end(space), "sigma_min": space.sigma_min,
        "sigma_max": space.sigma_max, "init": c.init,
    }
    if cfg.solver.options:
        params["solver_options"] = dict(cfg.solver.options)
    if c.init == "gits":
        params["gits_params"] = gits_params(cfg, space)
        params["gits_seeds"] = anchor_seeds(cfg, "gits")
    return params


def anchor_seeds(cfg: SearchConfig, name: str) -> list[int]:
    """Warm-up / training seeds: the first ones of the search's own seed range (held-out
    seeds stay unseen)."""
    n = cfg.search.gits.warmup if name == "gits" else cfg.search.ld3.train
    base = cfg.samples.seed_base
    return list(range(base, base + n))


def anchor_job(cfg: SearchConfig, space: Space, name: str) -> tuple[Any, ...]:
    """The arguments of ``compute_anchor`` (after the evaluator) for anchor ``name``."""
    params = gits_params(cfg, space) if name == "gits" else ld3_params(cfg, space)
    return (name, space.n_steps, space.solver, anchor_seeds(cfg, name), params)


def predictor_params(cfg: SearchConfig, space: Space) -> dict[str, Any]:
    """``train_predictor`` keywords for a configuration's ``search.adaptive``."""
    a = cfg.search.adaptive
    options = dict(cfg.solver.options)
    oracle: dict[str, Any] = {
        "iters": a.oracle_iters, "lr": a.oracle_lr, "free_end": free_end(space),
        "sigma_min": space.sigma_min, "sigma_max": space.sigma_max,
    }
    fit: dict[str, Any] = {"epochs": a.epochs, "hidden": a.hidden, "seed": cfg.search.seed}
    tune: dict[str, Any] | None = None
    if a.tune_epochs > 0:
        tune = {"epochs": a.tune_epochs, "seed": cfg.search.seed}
    if options:
        oracle["solver_options"] = options
        if a.kind == "delta":
            fit["solver_options"] = options
        if tune is not None:
            tune["solver_options"] = options
    return {"kind": a.kind, "solver": space.solver, "teacher_solver": a.teacher_solver,
            "teacher_steps": a.teacher_steps, "oracle": oracle, "fit": fit, "tune": tune}
