"""Plumbing shared by every solver: input checks, the per-step denoiser call, coefficients.

All step arithmetic follows one rule: coefficients are computed in float64 from the noise
levels, per sample (``[B]`` tensors), and cast to the dtype of ``x`` only when they multiply
a sample. A one-dimensional schedule ``[N+1]`` is repeated to ``[B, N+1]`` before anything
else, so it runs exactly the code (and the kernels) of a per-sample schedule with equal rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.models.base import Denoiser


@dataclass(frozen=True)
class Trajectory:
    """One call of ``solve``: the denoiser, the schedule and the models, checked.

    Attributes:
        denoiser: ``D(x [B, *shape], sigma [B]) -> x0_hat [B, *shape]``.
        sigmas: float64 noise levels [B, N+1], strictly decreasing per row (keeps autograd).
        model_ids: model index per sample and step [B, N] (int64), or None.
        final_zero: every row ends in 0 (the last step denoises); else no row does.
        dtype: dtype of the samples (and of the sigma handed to the denoiser).
    """

    denoiser: Denoiser
    sigmas: Tensor
    model_ids: Tensor | None
    final_zero: bool
    dtype: torch.dtype

    @property
    def n_steps(self) -> int:
        return self.sigmas.shape[1] - 1

    @property
    def positive(self) -> Tensor:
        """The levels that are > 0 [B, N+1] or [B, N] (logs and divisions are safe on them)."""
        return self.sigmas[:, :-1] if self.final_zero else self.sigmas

    def denoise(self, x: Tensor, step: int, level: int | None = None) -> Tensor:
        """Call the denoiser for step ``step`` at ``sigmas[:, level]`` (default: ``step``).

        Every call of a step passes that step's models (``model_id``), including the extra
        evaluation of a two-stage step at the next level.
        """
        level = step if level is None else level
        sigma = self.sigmas[:, level].to(self.dtype)
        if self.model_ids is None:
            return self.denoiser(x, sigma)
        return self.denoiser(x, sigma, model_id=self.model_ids[:, step])


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


def trajectory(denoiser: Denoiser, noise: Tensor, sigmas: Any, model_ids: Any) -> Trajectory:
    """Check everything ``solve`` receives and bundle it."""
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 1:
        raise ValueError("noise must be a floating-point tensor [B, *shape]")
    batch = noise.shape[0]
    sig, final_zero = check_sigmas(sigmas, batch, noise.device)
    ids = None
    if model_ids is not None:
        ids = check_model_ids(model_ids, batch, sig.shape[1] - 1, noise.device)
    return Trajectory(denoiser, sig, ids, final_zero, noise.dtype)


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
