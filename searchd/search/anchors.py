"""Anchors: the published methods' schedules (GITS, LD3) computed for a run, and their cost.

A run needs an anchor when ``search.algorithm`` is ``gits``/``ld3``, when a baseline has
``family: gits``/``ld3``, or when ``search.evolution.warm_start`` names it
(``SearchConfig.anchors``). The driver computes each once, in an evaluator actor
(``pool.call(compute_anchor, ...)``, arguments from ``anchor_job``), before building the
baselines and the searcher, and stores them in ``<run>/anchors.json`` so that a resumed run
uses the very same schedules. The same schedule then serves every role: the candidate of
``GitsSearcher``/``Ld3Searcher``, a baseline re-scored on the held-out seeds, a seed of
generation 0 of the evolution.

Cost is counted, not estimated: ``CountingDenoiser`` counts the rows (samples) that go
through the network in forward calls, the unit every search cost of searchd is reported in
(a candidate scored on n samples at NFE k costs n k). LD3's backward passes through the
solver are not counted as calls; its wall time includes them.

This module does not import Ray: ``compute_anchor`` runs inside an actor, or in-process
(benchmarks, tests) on an ``Evaluator`` or a bare denoiser.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from searchd.schedule import Schedule
from searchd.schedules.spaces import DiscreteSpace, Space, with_meta

if TYPE_CHECKING:
    from searchd.config import SearchConfig

ANCHORS: tuple[str, ...] = ("gits", "ld3")


class CountingDenoiser:
    """A denoiser that counts its forward calls and the samples (rows) they carry.

    Every other attribute (shape, noise range, grid, device, dtype, ...) is the wrapped
    denoiser's. Gradients flow through unchanged.
    """

    def __init__(self, denoiser: Any) -> None:
        self._inner = denoiser
        self.calls = 0  # forward calls
        self.rows = 0  # samples through the network, summed over calls

    def __call__(self, x: Any, sigma: Any, **cond: Any) -> Any:
        self.calls += 1
        self.rows += int(x.shape[0])
        return self._inner(x, sigma, **cond)

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)


class _Counted:
    """What ``compute_gits``/``compute_ld3`` see of an evaluator: the counting denoiser, the
    feature network (LD3's feature loss), and a teacher cache of its own (so the teacher's
    calls are counted too)."""

    def __init__(self, evaluator_or_denoiser: Any) -> None:
        from searchd.search.teacher import TeacherCache

        inner = getattr(evaluator_or_denoiser, "denoiser", evaluator_or_denoiser)
        self.denoiser = CountingDenoiser(inner)
        self.features = getattr(evaluator_or_denoiser, "features", None)
        self.teacher_cache = TeacherCache(self.denoiser)


def compute_anchor(
    evaluator_or_denoiser: Any,
    name: str,
    n_steps: int,
    solver: str,
    seeds: Sequence[int],
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """Compute one anchor schedule and measure what it cost.

    Args:
        evaluator_or_denoiser: the actor's evaluator (or a denoiser).
        name: "gits" or "ld3".
        n_steps, solver: the schedule's steps and solver.
        seeds: warm-up (GITS) / training (LD3) noise seeds.
        params: keyword arguments of ``compute_gits`` / ``compute_ld3`` (``anchor_job``).
            LD3 with ``init="gits"`` takes ``gits_params`` and ``gits_seeds`` and runs GITS
            first (its cost is included).

    Returns:
        ``{"name", "schedule": Schedule.to_dict(), "denoiser_calls" (samples through the
        network), "forward_calls", "wall_s"}``.
    """
    from searchd.search.gits import compute_gits
    from searchd.search.ld3 import compute_ld3

    if name not in ANCHORS:
        raise ValueError(f"unknown anchor {name!r}; known: {list(ANCHORS)}")
    counted = _Counted(evaluator_or_denoiser)
    params = dict(params)
    t0 = time.perf_counter()
    if name == "gits":
        schedule = compute_gits(counted, n_steps, solver, seeds, **params)
    else:
        gits_params = params.pop("gits_params", None)
        gits_seeds = params.pop("gits_seeds", None)
        if params.get("init") == "gits":
            if gits_params is None or gits_seeds is None:
                raise ValueError("ld3 with init='gits' needs gits_params and gits_seeds")
            start = compute_gits(counted, n_steps, solver, gits_seeds, **gits_params)
            params["init"] = np.asarray(start.sigmas, dtype=np.float64)
        elif params.get("init") in (None, "uniform"):
            params.pop("init", None)
        schedule = compute_ld3(counted, n_steps, solver, seeds, **params)
    wall = time.perf_counter() - t0
    den = counted.denoiser
    schedule = with_meta(schedule, cost={"denoiser_calls": den.rows, "forward_calls": den.calls,
                                         "wall_s": wall})
    return {"name": name, "schedule": schedule.to_dict(), "denoiser_calls": den.rows,
            "forward_calls": den.calls, "wall_s": wall}


# From a configuration ------------------------------------------------------------------------
def _free_end(space: Space) -> bool:
    """The lowest positive level is chosen by the method unless the space pins it."""
    return bool(getattr(space, "free_endpoints", True)) or not space.final_zero


def gits_params(cfg: SearchConfig, space: Space) -> dict[str, Any]:
    """``compute_gits`` keywords for a configuration's ``search.gits`` over ``space``."""
    g = cfg.search.gits
    params: dict[str, Any] = {
        "grid_points": g.grid_points, "rho": g.rho, "teacher_solver": g.teacher_solver,
        "teacher_substeps": g.teacher_substeps, "metric": g.metric, "coeff": g.coeff,
        "final_zero": space.final_zero, "free_end": _free_end(space),
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
        "free_end": _free_end(space), "sigma_min": space.sigma_min,
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


def fit_to_space(schedule: Schedule, space: Space) -> Schedule:
    """The anchor as a candidate of ``space``: checked, and on a discrete space projected
    onto the grid (LD3's levels are continuous). Provenance is kept."""
    if isinstance(space, DiscreteSpace):
        try:
            return space.check(schedule)
        except ValueError:
            return space.check(with_meta(space.project(schedule), **schedule.meta))
    return space.check(schedule)


def anchors_from_results(results: Sequence[Mapping[str, Any]], space: Space
                         ) -> dict[str, Schedule]:
    """``compute_anchor`` results -> name -> schedule fitted to ``space``."""
    return {r["name"]: fit_to_space(Schedule.from_dict(r["schedule"]), space)
            for r in results}
