"""The one contract every model is wrapped into: a denoiser ``D(x, sigma) -> x0_hat``.

All noise levels are in the EDM parameterization, ``x = x0 + sigma * n``. Model families with
other parameterizations (VP, discrete time, eps/v prediction) are converted in their adapters
in this package and nowhere else.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """A model wrapped as the posterior-mean estimator of the clean sample.

    Attributes:
        shape: shape of one sample, e.g. ``(64,)`` or ``(3, 32, 32)``.
        sigma_min, sigma_max: the range of noise levels the model supports.
        sigma_grid: for discrete-time models, the ascending sigmas the network was trained
            at (search spaces then draw from it); ``None`` for continuous models.
        cost: relative cost of one call per sample (used by model schedules).
    """

    shape: tuple[int, ...]
    sigma_min: float
    sigma_max: float
    sigma_grid: Tensor | None
    cost: float

    def __call__(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        """Denoise ``x`` [B, *shape] at per-sample noise levels ``sigma`` [B]."""
        ...


def sigma_per_sample(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or [B] noise level to a [B] tensor on ``x``'s device and dtype."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma has shape {tuple(sigma.shape)}; expected () or ({x.shape[0]},)")
    return sigma


def expand_to(sigma: Tensor, x: Tensor) -> Tensor:
    """Reshape a [B] tensor so it broadcasts against ``x`` [B, *shape]."""
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - 1))
