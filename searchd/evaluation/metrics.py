"""Per-sample metrics: KID (unbiased MMD, cubic polynomial kernel) and the Inception Score.

KID follows Binkowski et al. and clean-fid: ``k(x, y) = (x . y / d + 1)^3``, the unbiased
MMD^2 estimate averaged over ``num_subsets`` random subsets of size
``m = min(n_gen, n_ref, max_subset_size)`` drawn without replacement from each set. Instead
of one kernel matrix per subset, the kernel matrices of the whole sets are computed once and
each subset's sums are read off them with 0/1 indicator vectors (``s^T K t``), which gives
the same numbers at a fraction of the cost; the reference's own term is computed once per
reference (``KIDReference``) and shared by every candidate. Subsets come from a seeded
generator, so every candidate is scored on the same subsets.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

DEFAULT_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 1000


def _f64(x: Tensor | np.ndarray, device: torch.device | None = None) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"features must be [n, d]; got shape {tuple(t.shape)}")
    return t.to(device=device or t.device, dtype=torch.float64)


def poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    """Cubic polynomial kernel matrix [n, m] of features x [n, d] and y [m, d]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _indicators(rng: np.random.Generator, n: int, m: int, count: int) -> np.ndarray:
    """``count`` rows of 0/1 indicators [count, n], each marking m indices without replacement."""
    out = np.zeros((count, n), dtype=np.float64)
    for row in range(count):
        out[row, rng.choice(n, m, replace=False)] = 1.0
    return out


# Columns of a kernel matrix computed at a time (bounds memory for large sets).
_BLOCK = 2048


def _subset_sums(a: Tensor, b: Tensor, sa: Tensor, sb: Tensor) -> Tensor:
    """``sa[s] @ K(a, b) @ sb[s]`` for every indicator row s -> [S], in column blocks.

    a [n, d], b [m, d], sa [S, n], sb [S, m].
    """
    total = torch.zeros(sa.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, b.shape[0], _BLOCK):
        k = poly_kernel(a, b[start : start + _BLOCK])
        total += ((sa @ k) * sb[:, start : start + _BLOCK]).sum(1)
    return total


def _within_sums(a: Tensor, s: Tensor) -> Tensor:
    """For each indicator row of s [S, n]: sum of K(a, a) over i != j in the subset -> [S]."""
    diag = ((a * a).sum(1) / a.shape[1] + 1.0) ** 3
    return _subset_sums(a, a, s, s) - s @ diag


class KIDReference:
    """Reference features for KID, with the subsets and the reference term precomputed.

    Args:
        features: reference features [n_ref, d].
        num_subsets, max_subset_size: as clean-fid (100 and 1000).
        seed: seed of the subset draws (the same subsets for every candidate).
        device: where the float64 kernel sums run.
    """

    def __init__(
        self,
        features: Tensor | np.ndarray,
        *,
        num_subsets: int = DEFAULT_SUBSETS,
        max_subset_size: int = DEFAULT_SUBSET_SIZE,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_subsets < 1 or max_subset_size < 2:
            raise ValueError("KID needs num_subsets >= 1 and max_subset_size >= 2")
        self.device = torch.device(device)
        self.features = _f64(features, self.device)
        self.num_subsets = int(num_subsets)
        self.max_subset_size = int(max_subset_size)
        self.seed = int(seed)
        self._cache: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    @property
    def n(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def _subsets(self, n_gen: int) -> tuple[Tensor, Tensor, Tensor]:
        """(reference indicators [S, n_ref], generated indicators [S, n_gen], the reference
        term [S]) for ``n_gen`` generated samples."""
        if n_gen not in self._cache:
            m = self.subset_size(n_gen)
            rng = np.random.default_rng(self.seed)
            ref_rows, gen_rows = [], []
            for _ in range(self.num_subsets):
                ref_rows.append(_indicators(rng, self.n, m, 1)[0])
                gen_rows.append(_indicators(rng, n_gen, m, 1)[0])
            sy = torch.as_tensor(np.stack(ref_rows), device=self.device)
            sx = torch.as_tensor(np.stack(gen_rows), device=self.device)
            term = _within_sums(self.features, sy) / (m * (m - 1))
            self._cache[n_gen] = (sy, sx, term)
        return self._cache[n_gen]

    def subset_size(self, n_gen: int) -> int:
        m = min(n_gen, self.n, self.max_subset_size)
        if m < 2:
            raise ValueError(f"KID needs at least 2 samples in each set; got {n_gen} and {self.n}")
        return m

    def __call__(self, features: Tensor | np.ndarray) -> float:
        """KID of generated features [n_gen, d] against the reference (mean over subsets)."""
        x = _f64(features, self.device)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} dimensions; the reference has {self.dim}")
        n = x.shape[0]
        m = self.subset_size(n)
        sy, sx, ref_term = self._subsets(n)
        gen_term = _within_sums(x, sx) / (m * (m - 1))
        cross = _subset_sums(x, self.features, sx, sy) * (2.0 / (m * m))
        return float((gen_term + ref_term - cross).mean())


def kid(
    gen: Tensor | np.ndarray,
    ref: Tensor | np.ndarray,
    *,
    num_subsets: int = DEFAULT_SUBSETS,
    max_subset_size: int = DEFAULT_SUBSET_SIZE,
    seed: int = 0,
) -> float:
    """Kernel Inception Distance of features gen [n, d] to ref [m, d] (one-off)."""
    return KIDReference(ref, num_subsets=num_subsets, max_subset_size=max_subset_size, seed=seed)(
        gen
    )


def mmd2_unbiased(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Unbiased MMD^2 of two whole sets with the cubic polynomial kernel (no subsets)."""
    xs, ys = _f64(x), _f64(y)
    n, m = xs.shape[0], ys.shape[0]
    kxx, kyy, kxy = poly_kernel(xs, xs), poly_kernel(ys, ys), poly_kernel(xs, ys)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def inception_score(logits: Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score of class logits [n, C]: mean and std of exp(E KL(p(y|x) || p(y)))
    over ``splits`` contiguous parts (10, as in the original and StyleGAN2-ADA)."""
    lg = _f64(logits)
    n = lg.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"inception_score needs at least {splits} samples; got {n}")
    logp = torch.log_softmax(lg, dim=1)
    scores = []
    for part in torch.tensor_split(logp, splits):
        log_marginal = torch.logsumexp(part, 0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))
