"""The per-sample oracle: each initial noise's own schedule, by gradient descent.

For every noise ``z_b`` of a batch, the schedule ``sigma_b`` of N steps that brings the
student solver's sample closest to the teacher's sample on that same noise,

    sigma_b* = argmin_sigma  dist(solve(D, z_b, sigma), teacher(z_b)),

found by Adam through ``solve`` (which is differentiable in the levels), all noises at once
with per-sample sigmas [B, N+1]. Each noise has its own parameters and its own loss, and
the batch loss is the *sum* of the per-sample losses, so a sample's gradient is that of its
own loss alone (Adam is elementwise, and the gradient norm is clipped per sample), and the
result for a noise does not depend on which other noises share its batch.

- **Parameters**: LD3's (``searchd.methods.ld3.Ld3Parameterization``), one logit vector per
  sample: every vector is a valid schedule. The start is the global schedule, encoded (the
  encoding is exact up to LD3's share floor).
- **Selection**: per sample, the lowest loss seen, the global schedule itself included
  (evaluated exactly, not through the encoding), so no noise ends worse off than with the
  global schedule on the loss it was fitted to.
- The oracle is fitted on the noise it is evaluated on: its scores are an upper bound on
  what a predictor (which sees only the noise, or the state, at sampling time) can reach,
  not a result a user gets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.methods.ld3 import (
    Ld3Parameterization,
    feature_distance,
    with_sigma_gradient,
)
from searchd.models.base import Denoiser
from searchd.schedule import validate_sigmas
from searchd.solvers import get as get_solver
from searchd.solvers import solve

Distance = Callable[[Tensor, Tensor], Tensor]


@dataclass
class OracleResult:
    """Per-sample schedules and their losses.

    Attributes:
        sigmas: float64 [B, N+1], each row the lowest-loss schedule seen for its noise.
        loss: the per-sample loss of those schedules [B] (float64).
        global_loss: the per-sample loss of the global schedule [B].
        improved: how many rows moved away from the global schedule.
        history: mean loss of the current (not the best) schedules per iteration.
    """

    sigmas: np.ndarray
    loss: np.ndarray
    global_loss: np.ndarray
    improved: int
    history: list[float] = field(default_factory=list)


def batched_sigmas(param: Ld3Parameterization, theta: Tensor) -> Tensor:
    """``param.sigmas`` for a batch of logit vectors ``theta`` [B, n_params] -> [B, N+1]."""
    if theta.ndim != 2 or theta.shape[1] != param.n_params:
        raise ValueError(f"theta has shape {tuple(theta.shape)}; expected (B, {param.n_params})")
    theta = theta.to(torch.float64)
    frac = torch.cumsum(param.shares(theta), dim=-1)[:, : param.n_levels - 1]
    w = param._w_hi - (param._w_hi - param._w_lo) * torch.cat(
        [frac.new_zeros(frac.shape[0], 1), frac], dim=1
    )
    levels = param._w_inv(w)
    b = theta.shape[0]
    top = levels.new_full((b, 1), param.sigma_max)
    zero = levels.new_zeros((b, 1 if param.final_zero else 0))
    if param.free_end:
        return torch.cat([top, levels[:, 1:], zero], dim=1)
    if param.n_levels == 1:
        return torch.cat([top, zero], dim=1)
    bottom = levels.new_full((b, 1), param.sigma_min)
    return torch.cat([top, levels[:, 1:-1], bottom, zero], dim=1)


def oracle_schedules(
    denoiser: Denoiser,
    noise: Tensor,
    teacher_samples: Tensor,
    global_sigmas: np.ndarray | Any,
    solver: str = "dpmpp_2m",
    *,
    iters: int = 60,
    lr: float = 0.05,
    space: str = "logsnr",
    rho: float = 7.0,
    free_end: bool = True,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    features: Callable[[Tensor], Any] | None = None,
    distance: Distance | None = None,
    clip: float | None = 1.0,
    batch_size: int | None = None,
    solver_options: Mapping[str, Any] | None = None,
    sigma_grad: str = "auto",
) -> OracleResult:
    """Each noise's own schedule, fitted against the teacher's sample on that noise.

    Args:
        denoiser: ``D(x, sigma)``, differentiable in sigma (else central differences).
        noise: unit noise [B, *shape]; teacher_samples: the teacher's samples on it.
        global_sigmas: the global schedule [N+1] (the start, and the reference).
        solver, solver_options: the student.
        iters: Adam steps; lr: learning rate (cosine-decayed to lr / 10).
        space, rho, free_end, sigma_min, sigma_max: LD3's parameterization (the range
            defaults to the denoiser's); the global schedule's shape fixes N and its ending.
        features / distance: the per-sample loss, as in ``ld3_schedule`` (default: mean
            squared pixel difference).
        clip: max gradient norm per sample (None: none).
        batch_size: noises per solver pass (default: all); the result does not depend on it.
        sigma_grad: "auto", "autograd" or "fd" (``with_sigma_gradient``).

    Returns:
        An ``OracleResult``; row b of ``sigmas`` is noise b's schedule.
    """
    get_solver(solver)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters = {iters!r}; it must be an integer >= 0")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr = {lr!r}; it must be > 0")
    if noise.shape != teacher_samples.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and teacher samples "
                         f"{tuple(teacher_samples.shape)} differ in shape")
    lo = denoiser.sigma_min if sigma_min is None else sigma_min
    hi = denoiser.sigma_max if sigma_max is None else sigma_max
    g = validate_sigmas(global_sigmas, lo, hi)
    final_zero = bool(g[-1] == 0.0)
    param = Ld3Parameterization(g.size - 1, lo, hi, final_zero, space, rho, free_end)
    opts = dict(solver_options or {})
    dist = distance or feature_distance(features)
    model = with_sigma_gradient(denoiser, noise.device, noise.dtype, sigma_grad)
    b = noise.shape[0]
    bs = b if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size = {batch_size!r}; it must be >= 1")
    target = teacher_samples.detach()

    def per_sample(sig: Tensor, grad: bool) -> Tensor:
        out = []
        for a in range(0, b, bs):
            with torch.set_grad_enabled(grad):
                x = solve(model, noise[a : a + bs], sig[a : a + bs], solver=solver, **opts)
                out.append(dist(x, target[a : a + bs]))
        return torch.cat(out)

    g_t = torch.as_tensor(np.array(g), dtype=torch.float64, device=noise.device)
    with torch.no_grad():
        global_loss = per_sample(g_t.expand(b, -1), False).to(torch.float64)
    best_loss = global_loss.clone()
    best_sig = g_t.expand(b, -1).clone()
    theta = param.encode(g).to(noise.device).expand(b, -1).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    history: list[float] = []
    for it in range(iters + 1):
        sig = batched_sigmas(param, theta)
        last = it == iters or param.n_free == 0
        if last:
            with torch.no_grad():
                loss = per_sample(sig, False).to(torch.float64)
        else:
            loss = per_sample(sig, True).to(torch.float64)
        with torch.no_grad():
            ok = torch.isfinite(loss) & (loss < best_loss)
            best_loss = torch.where(ok, loss, best_loss)
            best_sig = torch.where(ok[:, None], sig.detach(), best_sig)
        history.append(float(loss.detach().mean()))
        if last:
            break
        opt.zero_grad()
        # The sum: each sample's logits get the gradient of that sample's loss only.
        torch.nan_to_num(loss, nan=0.0, posinf=0.0).sum().backward()
        with torch.no_grad():
            grad = torch.nan_to_num(theta.grad, nan=0.0, posinf=0.0, neginf=0.0)
            if clip is not None:
                norm = grad.norm(dim=1, keepdim=True)
                grad = grad * torch.clamp(clip / norm.clamp_min(1e-30), max=1.0)
            theta.grad.copy_(grad)
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (it + 1) / iters)))
        opt.step()
    best = best_sig.detach().cpu().numpy().astype(np.float64)
    moved = int((best != np.array(g)[None, :]).any(axis=1).sum())
    return OracleResult(best, best_loss.cpu().numpy(), global_loss.cpu().numpy(), moved, history)
