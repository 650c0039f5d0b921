"""GITS: a time schedule by dynamic programming over a teacher trajectory.

Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling" (ICML 2024),
and their code (zju-pi/diff-sampler, ``gits-main``). Sampling trajectories of one model are
so alike that a schedule fitted to a few warm-up trajectories serves every sample:

1. **Teacher.** Warm-up noises are integrated by an accurate solver over a fine grid (61
   levels, EDM's polynomial schedule rho = 7 from sigma_max to sigma_min, with a final 0
   when the schedules end in 0); its states ``x_i`` and denoised outputs ``D_i`` are kept at
   every grid level (``teacher.teacher_trajectory``).
2. **Costs.** ``C[i, j]`` (i < j) is the error of one step of the student solver from the
   teacher's ``x_i`` at ``s_i`` straight to ``s_j``, measured against the teacher's ``x_j``:
   ``l2``/``l1``: the mean over samples of the L2/L1 norm of the difference; ``dev``: the
   mean over samples of the jump's deviation from the straight line between the teacher's
   first and last states, minus the same mean deviation of the teacher's ``x_j`` (can be
   negative; the deviation of the last state itself is 0).
3. **DP.** ``gits_dp`` picks the path ``0 = p_0 < p_1 < ... < p_N = G - 1`` that minimizes
   ``sum_m coeff**m * C[p_m, p_{m+1}]`` (``m = 0`` is the first step, from sigma_max):
   GITS's recursion ``V[j][k] = min_i C[j][i] + coeff * V[i][k-1]``. The coefficient does not
   change the number of steps (fixed at N); it weighs the m-th step by ``coeff**m``, so with
   the default 1.15 > 1 errors made late, near the data, count more than early ones.

One-step jumps. Every solver of ``searchd.solvers`` except Heun takes, as a single step from
``x_i``, the Euler/DDIM step ``x_i + (s_j - s_i) (x_i - D_i) / s_i``: euler; dpmpp_2m,
dpmpp_3m and unipc (their first step is DDIM, and UniPC has no corrector after its last
step); ipndm and deis (order 1 at the first step). For those the costs need no further
denoiser call, exactly as GITS computes them. For Heun (two stages) each jump is a real
one-step ``solve``. Decisions are in ``docs/notes-anchors.md``.

``compute_gits`` runs on an evaluator (in an actor, or in-process); ``GitsSearcher``
(``searchd.searchers.precomputed``) hands its schedule to the search loop like any candidate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.evaluation.teacher import teacher_trajectory
from searchd.methods.counting import denoiser_of, warmup_noise
from searchd.models.base import Denoiser
from searchd.schedule import Schedule
from searchd.schedules.baselines import baseline
from searchd.solvers import get as get_solver
from searchd.solvers import solve

METRICS: tuple[str, ...] = ("dev", "l1", "l2")
# Solvers whose single step from (x, s) to s' is the Euler/DDIM step, using only D(x, s).
# Checked against solve() in tests/test_gits.py.
EULER_STEP_SOLVERS: frozenset[str] = frozenset(
    {"euler", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis"}
)
# Values of one-step jumps held at once while costing (float64: 256 MiB).
_CHUNK_ELEMENTS = 1 << 25


# The dynamic programme ----------------------------------------------------------------------
def path_cost(cost: np.ndarray, path: Sequence[int], coeff: float) -> float:
    """GITS's objective of a path: ``sum_m coeff**m * cost[p_m, p_{m+1}]``."""
    return float(sum(coeff**m * cost[a, b] for m, (a, b) in enumerate(zip(path[:-1], path[1:]))))


def gits_dp(cost: np.ndarray, n_steps: int, coeff: float = 1.15) -> np.ndarray:
    """The path of ``n_steps`` jumps over a grid that minimizes GITS's weighted cost.

    Args:
        cost: ``C[i, j]`` [G, G], the cost of one step from grid point i to j; only i < j is
            read. NaN counts as +inf (a jump that diverged is never taken).
        n_steps: N, the number of steps (1 <= N <= G - 1).
        coeff: weight ratio between consecutive steps (> 0): the m-th step from the start
            costs ``coeff**m * C``. 1 is the plain shortest path with N edges.

    Returns:
        int64 indices [N + 1], strictly increasing, from 0 to G - 1, minimizing
        ``path_cost(cost, path, coeff)``. Ties go to the smallest index at each step, as in
        GITS's own scan.
    """
    c = np.array(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2:
        raise ValueError(f"cost must be a square matrix [G, G] with G >= 2; got {c.shape}")
    g = c.shape[0]
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)):
        raise ValueError(f"n_steps = {n_steps!r}; it must be an integer")
    if not 1 <= n_steps <= g - 1:
        raise ValueError(f"n_steps = {n_steps}; a grid of {g} points allows 1 to {g - 1} steps")
    if not (math.isfinite(coeff) and coeff > 0):
        raise ValueError(f"coeff = {coeff!r}; it must be a finite number > 0")
    c[np.isnan(c)] = np.inf
    last = g - 1
    i_idx, j_idx = np.indices((g, g))
    inner = (j_idx > i_idx) & (j_idx < last)  # j may be an intermediate stop after i
    # value[k][i]: least weighted cost from i to the last point in exactly k steps (the
    # first of them weighted 1); nxt[k][i]: the stop after i on that path.
    value = np.full((n_steps + 1, g), np.inf)
    nxt = np.full((n_steps + 1, g), -1, dtype=np.int64)
    value[1, :last] = c[:last, last]
    nxt[1, :last] = last
    for k in range(2, n_steps + 1):
        cand = np.where(inner, c + coeff * value[k - 1][None, :], np.inf)
        nxt[k] = np.argmin(cand, axis=1)
        value[k] = cand[np.arange(g), nxt[k]]
    if not math.isfinite(value[n_steps, 0]):
        raise ValueError(f"no path of {n_steps} steps with finite cost through the grid")
    path = [0]
    for k in range(n_steps, 0, -1):
        path.append(int(nxt[k][path[-1]]))
    return np.asarray(path, dtype=np.int64)


# Grid and costs -----------------------------------------------------------------------------
def gits_grid(
    grid_points: int,
    sigma_min: float,
    sigma_max: float,
    final_zero: bool = True,
    rho: float = 7.0,
) -> np.ndarray:
    """The teacher grid: ``grid_points`` levels of EDM's polynomial schedule from sigma_max
    to sigma_min, plus a final 0 when ``final_zero``. float64 [grid_points (+ 1)]."""
    if grid_points < 2:
        raise ValueError(f"grid_points = {grid_points}; it must be >= 2")
    levels = baseline("polynomial", grid_points - 1, sigma_min, sigma_max, False, rho=rho)
    return np.concatenate([levels, [0.0]]) if final_zero else levels


def model_grid_levels(
    sigma_grid: Tensor | np.ndarray | Sequence[float],
    grid_points: int,
    sigma_min: float,
    sigma_max: float,
    final_zero: bool = True,
) -> np.ndarray:
    """The teacher grid of a discrete-time model: ``grid_points`` evenly spaced levels of its
    own grid in [sigma_min, sigma_max] (all of them if it has fewer), high to low, plus a
    final 0 when ``final_zero`` (GITS's "discrete" schedule type)."""
    g = np.sort(np.asarray(torch.as_tensor(sigma_grid).cpu(), dtype=np.float64))
    inside = g[(g >= sigma_min * (1 - 1e-9)) & (g <= sigma_max * (1 + 1e-9))]
    if inside.size < 2:
        raise ValueError(f"the model's grid has {inside.size} levels in "
                         f"[{sigma_min}, {sigma_max}]; GITS needs at least 2")
    n = min(grid_points, inside.size)
    levels = baseline("discrete", n - 1, sigma_min, sigma_max, False, grid=inside)
    return np.concatenate([levels, [0.0]]) if final_zero else levels


def _flat(x: Tensor) -> Tensor:
    return x.reshape(*x.shape[:2], -1) if x.ndim > 2 else x


def deviation(x: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Distance of points from the straight line through ``start`` and ``end``, per sample.

    Args:
        x: points [T, B, D] (or [B, D]); start, end: [B, D].

    Returns:
        [T, B] (or [B]): the norm of the part of ``end - x`` orthogonal to ``end - start``.
    """
    axis = end - start
    unit = axis / axis.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(axis.dtype).tiny)
    v = end - x
    perp = v - (v * unit).sum(-1, keepdim=True) * unit
    return perp.norm(dim=-1)


def _jumps(
    denoiser: Denoiser,
    xs: Tensor,
    dens: Tensor,
    levels: np.ndarray,
    i: int,
    js: range,
    solver: str,
    opts: Mapping[str, Any],
) -> Tensor:
    """One student step from grid point i to each point of ``js``: [len(js), B, *shape]."""
    s_i = float(levels[i])
    targets = levels[js.start:js.stop]
    x, d = xs[i], dens[i]
    if solver in EULER_STEP_SOLVERS:
        r = torch.as_tensor(targets / s_i, dtype=x.dtype, device=x.device)
        r = r.reshape(-1, *([1] * x.ndim))
        return d + r * (x - d)
    # A real one-step solve per target; rows ending in 0 go in their own call.
    out = []
    b = x.shape[0]
    noise = x / s_i
    for group in ([t for t in targets if t > 0], [t for t in targets if t == 0]):
        if not group:
            continue
        sig = np.repeat(np.asarray([[s_i, t] for t in group]), b, axis=0)  # [T*B, 2]
        rows = noise.repeat(len(group), *([1] * (x.ndim - 1)))
        with torch.no_grad():
            y = solve(denoiser, rows, sig, solver=solver, **dict(opts))
        out.append(y.reshape(len(group), *x.shape))
    return torch.cat(out)


def cost_matrix(
    denoiser: Denoiser,
    xs: Tensor,
    dens: Tensor,
    levels: np.ndarray,
    *,
    metric: str = "dev",
    solver: str = "euler",
    solver_options: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """GITS's cost matrix of one-step jumps between grid points.

    Args:
        denoiser: the model (used only for solvers whose step needs more than ``D_i``).
        xs, dens: the teacher's states and denoised outputs [G, B, *shape].
        levels: the grid [G], decreasing (positive but for a final 0).
        metric: "dev", "l1" or "l2" (see the module docstring).
        solver, solver_options: the student solver whose single steps are costed.

    Returns:
        float64 [G, G]: ``C[i, j]`` for i < j, +inf elsewhere.
    """
    if metric not in METRICS:
        raise ValueError(f"metric = {metric!r}; allowed: {list(METRICS)}")
    get_solver(solver)
    g = len(levels)
    if xs.shape[0] != g or dens.shape[0] != g:
        raise ValueError(f"xs/dens have {xs.shape[0]}/{dens.shape[0]} levels; the grid has {g}")
    ref = _flat(xs).to(torch.float64)
    start, end = ref[0], ref[-1]
    dev_teacher = deviation(ref, start, end).mean(dim=1)  # [G]
    cost = np.full((g, g), np.inf)
    opts = dict(solver_options or {})
    # Targets in chunks of at most _CHUNK_ELEMENTS float64 values of jumps.
    per_target = max(1, ref[0].numel())
    chunk = max(1, _CHUNK_ELEMENTS // per_target)
    for i in range(g - 1):
        for j0 in range(i + 1, g, chunk):
            js = range(j0, min(j0 + chunk, g))
            y = _flat(_jumps(denoiser, xs, dens, levels, i, js, solver, opts))
            y = y.to(torch.float64)
            target = ref[js.start:js.stop]
            if metric == "l2":
                c = (y - target).norm(dim=-1).mean(dim=1)
            elif metric == "l1":
                c = (y - target).abs().sum(dim=-1).mean(dim=1)
            else:
                c = deviation(y, start, end).mean(dim=1) - dev_teacher[js.start:js.stop]
            cost[i, js.start:js.stop] = c.cpu().numpy()
    return cost


# The whole method ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GitsResult:
    """What ``gits_plan`` found.

    Attributes:
        sigmas: the schedule, float64 [N + 1] (grid levels; ends in 0 with ``final_zero``).
        indices: its grid indices, int64 [N + 1].
        grid: the teacher grid, float64 [G].
        cost: the cost matrix, float64 [G, G].
        objective: GITS's weighted cost of the chosen path.
    """

    sigmas: np.ndarray
    indices: np.ndarray
    grid: np.ndarray
    cost: np.ndarray
    objective: float


def gits_plan(
    denoiser: Denoiser,
    noise: Tensor,
    n_steps: int,
    *,
    grid_points: int = 61,
    rho: float = 7.0,
    grid: np.ndarray | Sequence[float] | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_zero: bool = True,
    free_end: bool = True,
    teacher_solver: str = "heun",
    teacher_substeps: int = 1,
    teacher_options: Mapping[str, Any] | None = None,
    student_solver: str = "euler",
    student_options: Mapping[str, Any] | None = None,
    metric: str = "dev",
    coeff: float = 1.15,
    warmup_batch: int | None = None,
) -> GitsResult:
    """GITS in full: teacher trajectories, cost matrix, DP. See ``gits_schedule``."""
    lo = denoiser.sigma_min if sigma_min is None else sigma_min
    hi = denoiser.sigma_max if sigma_max is None else sigma_max
    model_grid = getattr(denoiser, "sigma_grid", None)
    if grid is None and model_grid is not None:
        levels = model_grid_levels(model_grid, grid_points, lo, hi, final_zero)
    elif grid is None:
        levels = gits_grid(grid_points, lo, hi, final_zero, rho)
    else:
        levels = np.asarray(grid, dtype=np.float64)
        if (levels[-1] == 0.0) != final_zero:
            raise ValueError(f"the grid ends at {levels[-1]!r}; final_zero = {final_zero}")
    # Costs are means over samples: batches of warm-up noise are averaged by their sizes.
    b = noise.shape[0]
    step = b if warmup_batch is None else max(1, int(warmup_batch))
    cost = np.zeros((len(levels), len(levels)))
    for a in range(0, b, step):
        part = noise[a:a + step]
        xs, dens = teacher_trajectory(denoiser, part, levels, solver=teacher_solver,
                                      substeps=teacher_substeps, **dict(teacher_options or {}))
        cost += part.shape[0] / b * cost_matrix(
            denoiser, xs, dens, levels, metric=metric, solver=student_solver,
            solver_options=student_options)
        del xs, dens
    if final_zero and not free_end and n_steps > 1:
        # The lowest positive level is the grid's last one: N - 1 steps to it, then to 0.
        g = len(levels)
        idx = np.append(gits_dp(cost[: g - 1, : g - 1], n_steps - 1, coeff), g - 1)
    else:
        idx = gits_dp(cost, n_steps, coeff)
    return GitsResult(levels[idx].copy(), idx, levels, cost, path_cost(cost, idx, coeff))


def gits_schedule(
    denoiser: Denoiser,
    noise: Tensor,
    n_steps: int,
    *,
    grid_points: int = 61,
    teacher_solver: str = "heun",
    student_solver: str = "euler",
    metric: str = "dev",
    coeff: float = 1.15,
    final_zero: bool = True,
    **kwargs: Any,
) -> np.ndarray:
    """GITS's schedule of ``n_steps`` steps for ``denoiser``, from warm-up noise.

    Deterministic: one teacher pass over the warm-up noise, the cost matrix, the DP.

    Args:
        denoiser: ``D(x [B, *shape], sigma [B]) -> x0_hat``.
        noise: unit Gaussian warm-up noise [B, *shape] (GITS uses 256 samples).
        n_steps: steps of the schedule (N).
        grid_points: levels of the teacher grid, sigma_max to sigma_min (GITS: 61).
        teacher_solver: the solver of the teacher trajectory; ``teacher_substeps`` (kwarg)
            steps per grid interval, ``teacher_options`` its options.
        student_solver: the solver whose one-step jumps are costed (``student_options``).
        metric: "dev" (GITS's default), "l1" or "l2".
        coeff: the DP's step weight ratio (GITS: 1.15).
        final_zero: the schedule ends in 0 (the grid gets a final 0), else at the grid's
            last level (sigma_min).
        free_end (kwarg): with ``final_zero``, the lowest positive level is chosen by the DP
            (default); False pins it to the grid's sigma_min (for spaces with fixed ends).
        **kwargs: ``free_end``, ``rho`` (grid exponent, 7), ``grid`` (an explicit teacher
            grid; a model with a ``sigma_grid`` gets evenly spaced levels of its own grid),
            ``sigma_min``/``sigma_max`` (default: the denoiser's), ``teacher_substeps``,
            ``teacher_options``, ``student_options``, ``warmup_batch`` (warm-up samples per
            teacher pass; memory holds the trajectory of that many, [G, batch, *shape] twice).

    Returns:
        float64 [n_steps + 1]: strictly decreasing grid levels from sigma_max, ending in 0
        (``final_zero``) or at a grid level >= sigma_min.
    """
    return gits_plan(
        denoiser, noise, n_steps, grid_points=grid_points, teacher_solver=teacher_solver,
        student_solver=student_solver, metric=metric, coeff=coeff, final_zero=final_zero,
        **kwargs,
    ).sigmas


def compute_gits(
    evaluator_or_denoiser: Any,
    n_steps: int,
    solver: str,
    seeds: Sequence[int] | range,
    **params: Any,
) -> Schedule:
    """GITS's schedule as a ``Schedule`` for ``solver`` (meta origin "gits").

    Meant to run inside an evaluator actor (``pool.call(compute_gits, ...)``): the first
    argument is the actor's evaluator (its ``denoiser`` is used) or a denoiser.

    Args:
        n_steps: steps of the schedule.
        solver: the solver that will run the schedule. It is also the student whose jumps
            are costed unless ``student_solver`` is given (for every solver but Heun this is
            GITS's Euler jump).
        seeds: warm-up noise seeds (GITS: 256 samples).
        **params: ``gits_schedule``'s keyword arguments (grid_points, metric, coeff,
            final_zero, teacher_solver, teacher_substeps, rho, sigma_min, sigma_max, ...).
    """
    den = denoiser_of(evaluator_or_denoiser)
    params = dict(params)
    params.setdefault("student_solver", solver)
    seeds = [int(s) for s in seeds]
    res = gits_plan(den, warmup_noise(den, seeds), n_steps, **params)
    record = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in params.items()
              if k != "grid"}
    meta = {
        "origin": "gits", "family": "gits", "name": "gits",
        "params": record,
        "warmup": {"n": len(seeds), "first_seed": seeds[0] if seeds else None},
        "teacher_grid_indices": [int(i) for i in res.indices],
        "objective": res.objective,
    }
    model_grid = getattr(den, "sigma_grid", None)
    if model_grid is not None and params.get("grid") is None:
        # Indices into the model's own grid (for timesteps=), as a DiscreteSpace records them.
        g = np.asarray(torch.as_tensor(model_grid).cpu(), dtype=np.float64)
        meta["grid_indices"] = [int(np.argmin(np.abs(g - s))) for s in res.sigmas if s > 0]
    return Schedule(res.sigmas, solver=solver, meta=meta)
