"""Anchors: the published methods' schedules (GITS, LD3) computed on a model, and their cost.

``compute_anchor(evaluator, name, n_steps, solver, seeds, params)`` runs one method on an
evaluator (or a bare denoiser) through ``Counted``, so that its cost is counted, not
estimated (``searchd.methods.counting``). LD3's backward passes through the solver are not
counted as calls; its wall time includes them. A run computes each anchor it needs once, in
an evaluator actor or in-process, and keeps it, so that a resumed run uses the very same
schedule; the same schedule then serves every role: the candidate of ``GitsSearcher``/
``Ld3Searcher``, a baseline re-scored on the held-out seeds, a seed of the evolution.

Numerical code: no Ray, no Tune, no pyarrow, no configuration.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from searchd.methods import ANCHORS
from searchd.methods.counting import Counted
from searchd.methods.gits import compute_gits
from searchd.methods.ld3 import compute_ld3
from searchd.schedule import Schedule
from searchd.schedules.spaces import DiscreteSpace, Space, with_meta


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
    if name not in ANCHORS:
        raise ValueError(f"unknown anchor {name!r}; known: {list(ANCHORS)}")
    counted = Counted(evaluator_or_denoiser)
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


# Fitting results to a space ---------------------------------------------------------------
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
