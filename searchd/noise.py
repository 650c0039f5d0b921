"""Common random numbers: sample ``i`` draws its initial noise from its own seed.

Every candidate is scored on the same noise, and results do not depend on batch size, on
how many workers share the seeds, or on their order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def make_noise(
    seeds: Sequence[int] | np.ndarray | range,
    shape: tuple[int, ...],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Unit Gaussian noise [len(seeds), *shape]; row i depends only on ``seeds[i]``.

    Drawn on the CPU in float64 with one generator per seed, so the values are identical on
    every device and batch split; then cast and moved.
    """
    seeds = [int(s) for s in seeds]
    out = torch.empty((len(seeds), *shape), dtype=torch.float64)
    g = torch.Generator(device="cpu")
    for row, s in enumerate(seeds):
        if s < 0:
            raise ValueError(f"seed {s} is negative; seeds must be >= 0")
        g.manual_seed(s)
        out[row] = torch.randn(shape, generator=g, dtype=torch.float64)
    return out.to(device=device, dtype=dtype)


def seed_range(base: int, n: int) -> range:
    """The seeds ``base, ..., base + n - 1`` of a block of samples."""
    if base < 0 or n < 0:
        raise ValueError(f"seed base {base} and count {n} must be >= 0")
    return range(base, base + n)
