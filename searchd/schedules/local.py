"""Level-local mutation: one noise level moves between its neighbours, the others stay put.

O2TDM's and AutoDiffusion's evolutions mutate individual timesteps. The continuous space's
own ``mutate`` moves parameters that are normalized gaps, so any mutation moves every level;
``mutate_level`` instead moves one level ``j`` and keeps every other level's float64 value
exactly. A mutant therefore shares its parent's first ``j`` levels bit for bit, and two
mutants of one parent share ``min(j1, j2)`` levels: on common noise the solver work of those
steps is the same, and prefix-tree sampling (``searchd.solvers.prefix``) does it once.

The level moves inside the space: between its neighbours, within the free endpoint's range
for the top and bottom levels, and, on a ``ContinuousSpace``, where every gap stays within
``gap_ratio`` of the last gap (the bounds of the space's cube), so the mutant is a point the
space's own operators could reach. A parent outside the cube (a baseline or warm start of
another family) keeps only the neighbour and range bounds for the level it moves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from searchd.schedule import Schedule
from searchd.schedules.spaces import ContinuousSpace, DiscreteSpace, reflect_unit

# Draws of a new position before giving up (the parent is returned: a known candidate,
# which the evolution's retry loop replaces).
_TRIES = 10


def mutate_level(
    space: Any,
    schedule: Schedule,
    rng: np.random.Generator,
    scale: float = 0.1,
    level: int | None = None,
) -> Schedule:
    """A mutant of ``schedule`` that differs from it in one positive noise level.

    Args:
        space: a ``ContinuousSpace`` or a ``DiscreteSpace`` that holds ``schedule``.
        schedule: the parent (its shape, solver and range are checked against the space).
        rng: the searcher's random generator.
        scale: step size. Continuous: the standard deviation of the move, as a fraction of
            the interval the level may move in (in the space's warped coordinate),
            reflected at its ends. Discrete: the move stays within ``scale`` times the pool
            size of the old level (at least one grid level), as the space's ``mutate``.
        level: the index of the level to move (0 = the highest); None: drawn uniformly
            among the levels the space lets move (the top and bottom ones only with free
            endpoints).

    Returns:
        The mutant; every level but ``level`` is the parent's, bit for bit. If no move is
        possible (no movable level, no free grid level between the neighbours), the parent.
    """
    if not isinstance(scale, (int, float, np.floating)) or not float(scale) > 0:
        raise ValueError(f"scale = {scale!r}; it must be > 0")
    space.check(schedule)
    if isinstance(space, ContinuousSpace):
        return _mutate_continuous(space, schedule, rng, float(scale), level)
    if isinstance(space, DiscreteSpace):
        return _mutate_discrete(space, schedule, rng, float(scale), level)
    raise ValueError(
        f"level-local mutation works on ContinuousSpace and DiscreteSpace; got "
        f"{type(space).__name__}"
    )


def movable_levels(space: ContinuousSpace | DiscreteSpace) -> list[int]:
    """Indices of the positive levels ``mutate_level`` may move (0 = the highest)."""
    n = space.n_levels
    first, last = (0, n - 1) if space.free_endpoints else (1, n - 2)
    return list(range(first, last + 1))


def _pick(space: ContinuousSpace | DiscreteSpace, rng: np.random.Generator,
          level: int | None) -> int | None:
    movable = movable_levels(space)
    if level is None:
        return int(movable[rng.integers(len(movable))]) if movable else None
    if level not in movable:
        raise ValueError(f"level = {level}; this space lets levels {movable} move")
    return int(level)


def _finish(space: ContinuousSpace | DiscreteSpace, levels: np.ndarray) -> Schedule:
    sig = np.concatenate([levels, [0.0]]) if space.final_zero else levels
    return Schedule(sig, solver=space.solver)


def _mutate_continuous(space: ContinuousSpace, schedule: Schedule, rng: np.random.Generator,
                       scale: float, level: int | None) -> Schedule:
    levels = np.array(schedule.sigmas[: space.n_levels], dtype=np.float64)
    j = _pick(space, rng, level)
    if j is None:
        return schedule
    w = space._w(levels)  # the space's warped coordinate, decreasing along the schedule
    lo, hi = _interval(space, w, j)
    if not hi > lo:
        return schedule
    for _ in range(_TRIES):
        t = reflect_unit((w[j] - lo) / (hi - lo) + rng.normal(0.0, scale))
        new = float(space._w_inv(np.float64(lo + (hi - lo) * t)))
        new = min(max(new, space.sigma_min), space.sigma_max)
        above = levels[j - 1] if j > 0 else np.inf
        below = levels[j + 1] if j + 1 < len(levels) else 0.0
        if below < new < above:
            out = levels.copy()
            out[j] = new
            return _finish(space, out)
    return schedule


def _interval(space: ContinuousSpace, w: np.ndarray, j: int) -> tuple[float, float]:
    """Where level ``j``'s warped coordinate may move: [lo, hi].

    Every bound is affine in ``w_j``: the gaps ``g_i = w_i - w_{i+1}`` change only for
    ``i = j - 1`` (by ``-dw``) and ``i = j`` (by ``+dw``). Bounds: gaps > 0; the endpoint
    ranges; and, inside the cube, ``g_last / R <= g_i <= R g_last`` (R = gap_ratio).
    """
    n = len(w)
    w_hi, w_lo = float(space._w(np.float64(space.sigma_max))), float(
        space._w(np.float64(space.sigma_min)))
    lo = float(w[j + 1]) if j + 1 < n else w_lo
    hi = float(w[j - 1]) if j > 0 else w_hi
    if space.free_endpoints:
        reach = space.endpoint_range * (w_hi - w_lo)
        if j == 0:
            lo = max(lo, w_hi - reach)
        if j == n - 1:
            hi = min(hi, w_lo + reach)
    gaps = -np.diff(w)
    slope = np.zeros(n - 1)
    if j > 0:
        slope[j - 1] = -1.0
    if j < n - 1:
        slope[j] = 1.0
    # Cube bounds as alpha + beta * dw >= 0, dw = w_new - w_j.
    r = space.gap_ratio
    last = n - 2
    cube_lo, cube_hi = -np.inf, np.inf
    for i in range(n - 2):
        for alpha, beta in ((gaps[i] - gaps[last] / r, slope[i] - slope[last] / r),
                            (r * gaps[last] - gaps[i], r * slope[last] - slope[i])):
            if beta > 0:
                cube_lo = max(cube_lo, w[j] - alpha / beta)
            elif beta < 0:
                cube_hi = min(cube_hi, w[j] - alpha / beta)
            elif alpha < 0:
                return lo, hi  # the parent is outside the cube in a gap this move keeps
    if max(lo, cube_lo) <= w[j] <= min(hi, cube_hi):
        return max(lo, cube_lo), min(hi, cube_hi)
    return lo, hi


def _mutate_discrete(space: DiscreteSpace, schedule: Schedule, rng: np.random.Generator,
                     scale: float, level: int | None) -> Schedule:
    # Pool positions of the positive levels, highest level first (schedule order).
    full = space._full_positions(space.positions(schedule))[::-1]
    j = _pick(space, rng, level)
    if j is None:
        return schedule
    above = full[j - 1] if j > 0 else space.pool.size
    below = full[j + 1] if j + 1 < len(full) else -1
    radius = max(1, int(round(scale * space._choosable.size)))
    free = np.arange(below + 1, above)
    free = free[(free != full[j]) & (np.abs(free - full[j]) <= radius)]
    if free.size == 0:
        return schedule
    full = full.copy()
    full[j] = int(rng.choice(free))
    chosen = np.setdiff1d(full, space._fixed)
    return space.from_positions(np.sort(chosen))
