"""Plumbing shared by every solver: input checks, the per-step denoiser call, coefficients.

All step arithmetic follows one rule: coefficients are computed in float64 from the noise
levels, per sample (``[B]`` tensors), and cast to the dtype of ``x`` only when they multiply
a sample. A one-dimensional schedule ``[N+1]`` is repeated to ``[B, N+1]`` before anything
else, so it runs exactly the code (and the kernels) of a per-sample schedule with equal rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.models.base import Denoiser


class Trajectory:
    """One call of ``solve``: the denoiser, the schedule (or policy) and the models, checked.

    Solvers read the levels through ``sigmas`` / ``positive`` / ``lam`` *after* the first
    denoiser call of a step (``denoise(x, i)``), and use only levels up to ``i + 1`` then:
    with a ``SchedulePolicy`` that call is when level ``i + 1`` gets chosen. Unknown later
    levels read as NaN. A fixed schedule is complete from the start, and its ``sigmas`` is
    the checked array itself (so fixed schedules run exactly the code they always did).

    Attributes:
        denoiser: ``D(x [B, *shape], sigma [B]) -> x0_hat [B, *shape]``.
        model_ids: model index per sample and step [B, N] (int64), or None.
        guidance: classifier-free guidance weight per sample and step [B, N] (float64), or
            None (the denoiser's own guidance).
        cond: per-row keyword tensors [B, ...] handed to every denoiser call unchanged
            (e.g. ``sample_index``, which picks each row's class or prompt).
        final_zero: every row ends in 0 (the last step denoises); else no row does.
        dtype: dtype of the samples (and of the sigma handed to the denoiser).
        n_steps: steps N.
        policy: the ``SchedulePolicy`` choosing the levels, or None (fixed schedule).
        strategy: the per-step solver strategy (``searchd.solvers.strategy.Strategy``),
            or None (the solver's own choices).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        sigmas: Tensor,
        model_ids: Tensor | None,
        final_zero: bool,
        dtype: torch.dtype,
        n_steps: int | None = None,
        policy: Any = None,
        guidance: Tensor | None = None,
        cond: dict[str, Tensor] | None = None,
        strategy: Any = None,
    ) -> None:
        self.denoiser = denoiser
        self.strategy = strategy
        self.model_ids = model_ids
        self.guidance = guidance
        self.cond = dict(cond or {})
        self.final_zero = final_zero
        self.dtype = dtype
        self.policy = policy
        self.n_steps = sigmas.shape[1] - 1 if n_steps is None else int(n_steps)
        self._batch = sigmas.shape[0]
        self._levels: list[Tensor] = []  # a policy's levels so far, [B] each
        self._sigmas: Tensor | None = None if policy is not None else sigmas
        self._lam: Tensor | None = None

    # Levels -------------------------------------------------------------------------------
    @property
    def sigmas(self) -> Tensor:
        """float64 noise levels [B, N+1] (keeps autograd); levels not chosen yet are NaN."""
        if self._sigmas is None:
            cols = list(self._levels)
            if len(cols) < self.n_steps + 1:
                nan = torch.full_like(cols[0].detach(), float("nan"))
                cols += [nan] * (self.n_steps + 1 - len(cols))
            self._sigmas = torch.stack(cols, dim=1)
        return self._sigmas

    @property
    def positive(self) -> Tensor:
        """The levels that are > 0 [B, N+1] or [B, N] (logs and divisions are safe on them)."""
        return self.sigmas[:, :-1] if self.final_zero else self.sigmas

    @property
    def lam(self) -> Tensor:
        """``lambda = -log(sigma)`` of the levels > 0 [B, N+1] or [B, N] (never log(0))."""
        if self._lam is None:
            self._lam = -torch.log(self.positive)
        return self._lam

    def _append(self, new: Tensor) -> None:
        """Check the levels a policy chose and add them."""
        known = len(self._levels)
        if not isinstance(new, Tensor) or new.ndim != 2 or new.shape[0] != self._batch:
            shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
            raise ValueError(
                f"a schedule policy must return float levels [B, m] with B = "
                f"{self._batch}; got {shape}"
            )
        new = new.to(torch.float64)
        if new.shape[1] < 1 or known + new.shape[1] > self.n_steps + 1:
            raise ValueError(
                f"a schedule policy returned {new.shape[1]} levels after {known}; "
                f"it must return 1 to {self.n_steps + 1 - known} (N = {self.n_steps})"
            )
        vals = new.detach().cpu().numpy()
        prev = self._levels[-1].detach().cpu().numpy() if known else None
        for j in range(vals.shape[1]):
            col, level = vals[:, j], known + j
            lowest = 0.0 if (self.final_zero and level == self.n_steps) else None
            bad = ~np.isfinite(col) | (col <= 0 if lowest is None else col != 0)
            if prev is not None:
                bad |= ~(col < prev)
            if bad.any():
                r = int(np.argmax(bad))
                what = "0 (final_zero)" if lowest is not None else "finite, > 0"
                raise ValueError(
                    f"schedule policy: sigmas[{r}, {level}] = {float(col[r])!r}; it must be "
                    f"{what} and below sigmas[{r}, {level - 1}]"
                )
            prev = col
        self._levels.extend(new[:, j] for j in range(new.shape[1]))
        self._sigmas = self._lam = None

    def begin(self, noise: Tensor) -> None:
        """Ask the policy for its first levels (a fixed schedule has them all)."""
        if self.policy is not None:
            self._append(self.policy.start(noise))

    def denoise(self, x: Tensor, step: int, level: int | None = None) -> Tensor:
        """Call the denoiser for step ``step`` at ``sigmas[:, level]`` (default: ``step``).

        Every call of a step passes that step's models (``model_id``) and guidance weights
        (``guidance``, float64 [B]), including the extra evaluation of a two-stage step at
        the next level, and the per-row ``cond`` keywords. With a policy, the first call of
        a step makes level ``step + 1`` known (the policy's choice, or 0 for a final 0).
        """
        level = step if level is None else level
        if self.policy is not None and len(self._levels) <= level:
            raise RuntimeError(f"level {level} is not known yet (solver reads ahead)")
        sigma = (self._levels[level] if self.policy is not None else self.sigmas[:, level])
        sigma = sigma.to(self.dtype)
        kw: dict[str, Tensor] = dict(self.cond)
        if self.model_ids is not None:
            kw["model_id"] = self.model_ids[:, step]
        if self.guidance is not None:
            kw["guidance"] = self.guidance[:, step]
        out = self.denoiser(x, sigma, **kw)
        if self.policy is not None and level == step and len(self._levels) == step + 1:
            if self.final_zero and step == self.n_steps - 1:
                self._append(torch.zeros_like(self._levels[0].detach()).unsqueeze(1))
            else:
                self._append(self.policy.advance(step, x, self.sigmas[:, : step + 1], out))
        return out


def as_coef(c: Tensor, x: Tensor) -> Tensor:
    """A float64 per-sample coefficient [B] cast to ``x``'s dtype, broadcastable against x."""
    return c.to(x.dtype).reshape(c.shape + (1,) * (x.ndim - 1))


def combine(terms: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """``sum_j c_j * v_j`` for float64 coefficients ``c_j`` [B] and samples ``v_j`` [B, *shape].

    Summed in the given order, so the result is the same for every batch layout.
    """
    (c0, v0), *rest = terms
    out = as_coef(c0, v0) * v0
    for c, v in rest:
        out = out + as_coef(c, v) * v
    return out


# Input checks ------------------------------------------------------------------------------
def _sigmas_tensor(sigmas: Any, device: torch.device) -> Tensor:
    """``sigmas`` as a float64 tensor on ``device``; a tensor keeps its autograd graph."""
    if isinstance(sigmas, Tensor):
        if sigmas.is_complex():
            raise ValueError(f"sigmas must be real; got dtype {sigmas.dtype}")
        return sigmas.to(device=device, dtype=torch.float64)
    try:
        arr = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"sigmas must be a float array [N+1] or [B, N+1]: {e}") from None
    return torch.as_tensor(arr, device=device)


def check_sigmas(sigmas: Any, batch: int, device: torch.device) -> tuple[Tensor, bool]:
    """Validate a schedule [N+1] or [B, N+1] and return it as float64 [B, N+1], and final_zero.

    The 1-D case is repeated (not expanded) to [B, N+1], so both forms share one code path.
    Raises ``ValueError`` naming the first bad entry.
    """
    sig = _sigmas_tensor(sigmas, device)
    if sig.ndim == 1:
        sig = sig.unsqueeze(0).repeat(batch, 1)
    elif sig.ndim == 2:
        if sig.shape[0] != batch:
            raise ValueError(
                f"per-sample sigmas have {sig.shape[0]} rows; the noise has {batch} samples"
            )
        sig = sig.contiguous()
    else:
        raise ValueError(f"sigmas must be [N+1] or [B, N+1]; got shape {tuple(sig.shape)}")
    if sig.shape[1] < 2:
        raise ValueError(f"sigmas must have at least 2 levels (1 step); got {sig.shape[1]}")
    vals = sig.detach().cpu().numpy()
    one_d = np.ndim(sigmas) == 1 if not isinstance(sigmas, Tensor) else sigmas.ndim == 1

    def name(r: int, j: int) -> str:
        index = f"{j}" if one_d else f"{r}, {j}"
        return f"sigmas[{index}] = {float(vals[r, j])!r}"

    bad = np.argwhere(~np.isfinite(vals) | (vals < 0))
    if bad.size:
        r, j = (int(v) for v in bad[0])
        raise ValueError(f"{name(r, j)}; noise levels must be finite and >= 0")
    bad = np.argwhere(~(vals[:, 1:] < vals[:, :-1]))
    if bad.size:
        r, j = (int(v) for v in bad[0])
        raise ValueError(
            f"{name(r, j + 1)} is not below {name(r, j)}; a schedule must be strictly decreasing"
        )
    ends_zero = vals[:, -1] == 0.0
    if ends_zero.any() and not ends_zero.all():
        r0, r1 = int(np.argmax(ends_zero)), int(np.argmin(ends_zero))
        raise ValueError(
            f"per-sample sigmas mix endings: row {r0} ends in 0 and row {r1} ends at "
            f"{float(vals[r1, -1])!r}; all rows must end in 0 or none may"
        )
    return sig, bool(ends_zero[0])


def check_model_ids(model_ids: Any, batch: int, n_steps: int, device: torch.device) -> Tensor:
    """Validate a model schedule [N] or [B, N] of non-negative ints; return int64 [B, N]."""
    if isinstance(model_ids, Tensor):
        if model_ids.is_floating_point() or model_ids.is_complex() or model_ids.dtype == torch.bool:
            raise ValueError(f"model_ids must be integers; got dtype {model_ids.dtype}")
        ids = model_ids.to(device=device, dtype=torch.int64)
    else:
        arr = np.asarray(model_ids)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"model_ids must be integers; got {arr.tolist()}")
        ids = torch.as_tensor(arr.astype(np.int64), device=device)
    if ids.ndim == 1 and ids.shape[0] == n_steps:
        ids = ids.unsqueeze(0).repeat(batch, 1)
    elif not (ids.ndim == 2 and tuple(ids.shape) == (batch, n_steps)):
        raise ValueError(
            f"model_ids has shape {tuple(ids.shape)}; expected ({n_steps},) or "
            f"({batch}, {n_steps}), one model per step"
        )
    if (ids < 0).any():
        r, j = (int(v) for v in torch.nonzero(ids < 0)[0])
        raise ValueError(f"model_ids[{r}, {j}] = {int(ids[r, j])} is negative; must be >= 0")
    return ids.contiguous()


def check_guidance(guidance: Any, batch: int, n_steps: int, device: torch.device) -> Tensor:
    """Validate a guidance schedule [N] or [B, N] of finite weights >= 0; return float64
    [B, N]."""
    if isinstance(guidance, Tensor):
        if guidance.is_complex() or guidance.dtype == torch.bool:
            raise ValueError(f"guidance must be real numbers; got dtype {guidance.dtype}")
        g = guidance.detach().to(device=device, dtype=torch.float64)
    else:
        try:
            g = torch.as_tensor(np.asarray(guidance, dtype=np.float64), device=device)
        except (TypeError, ValueError) as e:
            raise ValueError(f"guidance must be a float array [N] or [B, N]: {e}") from None
    if g.ndim == 1 and g.shape[0] == n_steps:
        g = g.unsqueeze(0).repeat(batch, 1)
    elif not (g.ndim == 2 and tuple(g.shape) == (batch, n_steps)):
        raise ValueError(
            f"guidance has shape {tuple(g.shape)}; expected ({n_steps},) or "
            f"({batch}, {n_steps}), one weight per step"
        )
    bad = ~torch.isfinite(g) | (g < 0)
    if bad.any():
        r, j = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(
            f"guidance[{r}, {j}] = {float(g[r, j])!r}; guidance weights must be finite and >= 0"
        )
    return g.contiguous()


def check_cond(cond: Any, batch: int) -> dict[str, Tensor]:
    """Validate per-row denoiser keywords: a mapping name -> tensor [B, ...]."""
    if cond is None:
        return {}
    if not isinstance(cond, dict):
        raise ValueError(f"cond must be a dict of per-row tensors; got {type(cond).__name__}")
    for k, v in cond.items():
        if k in ("model_id", "guidance"):
            raise ValueError(f"cond may not hold {k!r}: pass model_ids= / guidance= to solve")
        if not isinstance(v, Tensor) or v.ndim < 1 or v.shape[0] != batch:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"cond[{k!r}] must be a tensor [B = {batch}, ...]; got {shape}")
    return dict(cond)


def trajectory(
    denoiser: Denoiser,
    noise: Tensor,
    sigmas: Any,
    model_ids: Any,
    guidance: Any = None,
    cond: Any = None,
    *,
    strategy: Any = None,
    solver: str | None = None,
) -> Trajectory:
    """Check everything ``solve`` receives and bundle it (``sigmas`` may be a policy).

    ``strategy``: per-step codes of ``solver`` (``searchd.solvers.strategy``), or None."""
    from searchd.solvers.policy import SchedulePolicy

    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 1:
        raise ValueError("noise must be a floating-point tensor [B, *shape]")
    batch = noise.shape[0]
    if isinstance(sigmas, SchedulePolicy):
        n = sigmas.n_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"schedule policy n_steps = {n!r}; it must be an integer >= 1")
        ids = None
        if model_ids is not None:
            ids = check_model_ids(model_ids, batch, int(n), noise.device)
        g = None if guidance is None else check_guidance(guidance, batch, int(n), noise.device)
        empty = torch.empty((batch, 0), dtype=torch.float64, device=noise.device)
        traj = Trajectory(denoiser, empty, ids, bool(sigmas.final_zero), noise.dtype,
                          n_steps=int(n), policy=sigmas, guidance=g,
                          cond=check_cond(cond, batch))
    else:
        sig, final_zero = check_sigmas(sigmas, batch, noise.device)
        ids = None
        if model_ids is not None:
            ids = check_model_ids(model_ids, batch, sig.shape[1] - 1, noise.device)
        g = None
        if guidance is not None:
            g = check_guidance(guidance, batch, sig.shape[1] - 1, noise.device)
        traj = Trajectory(denoiser, sig, ids, final_zero, noise.dtype, guidance=g,
                          cond=check_cond(cond, batch))
    if strategy is not None:
        from searchd.strategy_codes import resolve

        if solver is None:
            raise ValueError("a per-step strategy needs the solver it is a strategy of")
        traj.strategy = resolve(solver, strategy, traj.n_steps, traj.final_zero)
    traj.begin(noise)
    return traj


def lagrange_weights(nodes: Sequence[Tensor], moments: Sequence[Tensor]) -> list[Tensor]:
    """Integrals of the Lagrange basis over ``nodes`` against a kernel, from its moments.

    For nodes ``u_0, ..., u_{k-1}`` [B] (offsets from the current level) and the kernel's
    moments ``moments[n] = int K(u) u^n du`` over the step (n < k), returns
    ``w_j = int K(u) l_j(u) du`` [B], where ``l_j`` is 1 at ``u_j`` and 0 at the others.
    Each ``l_j`` is expanded in monomials, ``l_j(u) = sum_n c_jn u^n``, so
    ``w_j = sum_n c_jn moments[n]``.
    """
    k = len(nodes)
    weights = []
    for j, uj in enumerate(nodes):
        # Monomial coefficients of prod_{m != j} (u - u_m) / (u_j - u_m), lowest degree first.
        poly: list[Tensor] = [torch.ones_like(uj)]
        for m, um in enumerate(nodes):
            if m == j:
                continue
            scale = 1 / (uj - um)
            shifted = [c * scale for c in poly]
            poly = (
                [-um * shifted[0]]
                + [shifted[n - 1] - um * shifted[n] for n in range(1, len(shifted))]
                + [shifted[-1]]
            )
        w = poly[0] * moments[0]
        for n in range(1, k):
            w = w + poly[n] * moments[n]
        weights.append(w)
    return weights
