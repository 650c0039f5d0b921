"""ODE solvers over arbitrary noise-level schedules, one signature for all.

``solve(denoiser, noise, sigmas, solver=..., model_ids=None, **opts)`` integrates the
probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` from ``noise * sigmas[..., 0]``
along ``sigmas`` ([N+1], or per sample [B, N+1]) and returns the sample at the last level:
the denoised sample when the schedule ends in 0, the sample at that level as it stands
otherwise. ``nfe(solver, n_steps, final_zero)`` is the number of denoiser calls it makes.
In place of a fixed schedule, ``sigmas`` may be a ``SchedulePolicy`` that chooses each
next level from the state reached (per-sample adaptive schedules, ``searchd.adaptive``).

Solvers: euler, heun, dpmpp_2m, dpmpp_3m, unipc (bh2), ipndm, deis (tAB). ``SOLVERS`` maps
each name to its ``SolverSpec`` (options, theoretical order, cost). Decisions are recorded in
docs/notes-solvers.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from searchd.models.base import Denoiser
from searchd.solvers._core import Trajectory, trajectory
from searchd.solvers.policy import SchedulePolicy
from searchd.solvers.registry import SOLVERS, Option, SolverSpec

__all__ = [
    "SOLVERS", "Option", "SchedulePolicy", "SolverSpec", "Trajectory", "get", "network_calls",
    "nfe", "solve",
]


def get(solver: str) -> SolverSpec:
    """The registry entry of ``solver``; ``ValueError`` listing the known names otherwise."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known solvers: {', '.join(SOLVERS)}")
    return SOLVERS[solver]


def solve(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Tensor | np.ndarray | SchedulePolicy | Any,
    *,
    solver: str = "dpmpp_2m",
    model_ids: Tensor | np.ndarray | Any | None = None,
    guidance: Tensor | np.ndarray | Any | None = None,
    cond: dict[str, Tensor] | None = None,
    strategy: Any = None,
    **opts: Any,
) -> Tensor:
    """Sample along a schedule.

    Args:
        denoiser: ``D(x [B, *shape], sigma [B]) -> x0_hat [B, *shape]`` (sigma in x's dtype).
        noise: unit Gaussian noise [B, *shape]; its dtype and device are the sample's.
        sigmas: strictly decreasing noise levels, [N+1] or per sample [B, N+1]; all rows end
            in 0 or none does. A tensor keeps its autograd graph (gradients flow to it).
            Or a ``SchedulePolicy``: the levels are chosen while sampling, from the state
            reached (``searchd.solvers.policy``); the denoiser calls are the same.
        solver: a name of ``SOLVERS``.
        model_ids: None, or model index per step [N] or per sample and step [B, N]; each
            denoiser call of step i then gets ``model_id=<int64 [B]>`` (column i).
        guidance: None (the denoiser's own guidance), or a classifier-free guidance weight
            per step [N] or per sample and step [B, N]; each denoiser call of step i then
            gets ``guidance=<float64 [B]>`` (column i), as ``model_id``. Only conditional
            denoisers accept it (``searchd.models.conditional.supports_guidance``).
        cond: None, or per-row denoiser keywords {name: tensor [B, ...]} passed to every
            call unchanged (``sample_index``: the row's seed, which picks its class/prompt).
        strategy: None, or the solver's choice per step, one code per step [N]
            (``searchd.solvers.strategy``: ``"2"``, ``"3"``, ``"2c"``, ...); it replaces
            the solver's own rule for the multistep order (and UniPC's corrector).
        **opts: the solver's options (``SOLVERS[solver].options``).

    Returns:
        The sample [B, *shape] at ``sigmas[..., -1]``, in ``noise``'s dtype.
    """
    spec = get(solver)
    options = spec.resolve(opts)
    traj = trajectory(denoiser, noise, sigmas, model_ids, guidance, cond,
                      strategy=strategy, solver=solver)
    x = noise * traj.sigmas[:, 0].to(noise.dtype).reshape((-1,) + (1,) * (noise.ndim - 1))
    return spec.fn(traj, x, **options)


def nfe(solver: str, n_steps: int, final_zero: bool = True) -> int:
    """Denoiser calls ``solve`` makes for a schedule of ``n_steps`` steps (exact)."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps = {n_steps!r}; it must be an integer >= 1")
    return get(solver).nfe(int(n_steps), bool(final_zero))


def network_calls(
    solver: str,
    n_steps: int,
    final_zero: bool = True,
    guidance: Any = None,
    *,
    guided: bool = False,
) -> int:
    """Network forward passes per sample of a schedule, guidance counted honestly.

    A denoiser call at a step with guidance weight w != 1 costs two passes (conditional and
    unconditional), one with w = 1 costs one (the unconditional pass is skipped). Without a
    guidance schedule (``guidance=None``) every call costs two passes if the model was
    loaded with constant guidance (``guided``), else one: ``nfe`` or twice it.

    Args:
        solver, n_steps, final_zero: as ``nfe``.
        guidance: the weights per step [n_steps], or None.
        guided: the model's own constant guidance is on (only read when guidance is None).
    """
    calls = get(solver).step_calls(_steps(n_steps), bool(final_zero))
    if guidance is None:
        return sum(calls) * (2 if guided else 1)
    w = np.asarray(guidance, dtype=np.float64).reshape(-1)
    if w.size != len(calls):
        raise ValueError(f"guidance has {w.size} weights; the schedule has {len(calls)} steps")
    return int(sum(c * (2 if v != 1.0 else 1) for c, v in zip(calls, w.tolist())))


def _steps(n_steps: Any) -> int:
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps = {n_steps!r}; it must be an integer >= 1")
    return int(n_steps)
