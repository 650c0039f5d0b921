"""``FeatureStats``: mergeable float64 moments of a feature set, the unit workers exchange.

A worker never returns images or per-sample features for FID: it returns ``n``, the sum of
the feature vectors and the sum of their outer products, all float64. Partial statistics of
disjoint sample sets add up to the statistics of the union, so the driver can merge the
results of any number of workers and compute the mean and the (unbiased) covariance that
the Frechet distance needs, exactly as if one process had seen every sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Rows per matmul when statistics are built from a large feature matrix.
DEFAULT_CHUNK = 4096


def _as_float64_rows(features: Tensor | np.ndarray) -> Tensor:
    """Features [n, d] (any float dtype, any device) as a float64 tensor on the same device."""
    t = torch.as_tensor(features)
    if t.ndim != 2:
        raise ValueError(f"features must be [n, d]; got shape {tuple(t.shape)}")
    return t.detach().to(torch.float64)


class FeatureStats:
    """Sufficient statistics of a feature set for its Gaussian fit.

    Attributes:
        n: number of feature vectors seen.
        sum: float64 [d], the sum of the vectors.
        sum_outer: float64 [d, d], the sum of their outer products ``x x^T`` (symmetric).

    ``mean`` and ``cov`` (unbiased, ``ddof=1``, what ``np.cov(x, rowvar=False)`` and
    clean-fid compute) are derived on demand. Instances merge with ``merge`` or ``+`` (also
    ``sum(list_of_stats)``); merging is exact addition of the stored sums, so the merged
    statistics equal those of the concatenated features up to float64 rounding (about
    1e-16 relative).
    """

    __slots__ = ("n", "sum", "sum_outer")

    def __init__(self, n: int, sum: np.ndarray, sum_outer: np.ndarray) -> None:  # noqa: A002
        s = np.array(sum, dtype=np.float64)
        so = np.array(sum_outer, dtype=np.float64)
        if s.ndim != 1 or so.shape != (s.size, s.size):
            raise ValueError(
                f"FeatureStats needs sum [d] and sum_outer [d, d]; got {s.shape} and {so.shape}"
            )
        if isinstance(n, bool) or int(n) != n or n < 0:
            raise ValueError(f"FeatureStats.n = {n!r}; it must be an integer >= 0")
        self.n = int(n)
        self.sum = s
        self.sum_outer = so

    # Construction ---------------------------------------------------------------------------
    @classmethod
    def zeros(cls, dim: int) -> FeatureStats:
        """Empty statistics of ``dim``-dimensional features."""
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def from_features(
        cls, features: Tensor | np.ndarray, chunk_size: int = DEFAULT_CHUNK
    ) -> FeatureStats:
        """Statistics of features [n, d], accumulated ``chunk_size`` rows at a time."""
        feats = _as_float64_rows(features)
        out = cls.zeros(feats.shape[1])
        for start in range(0, feats.shape[0], chunk_size):
            out.add(feats[start : start + chunk_size])
        return out

    def add(self, features: Tensor | np.ndarray) -> FeatureStats:
        """Accumulate a chunk of features [m, d] in place (float64, on the chunk's device).

        Returns ``self`` so calls chain.
        """
        x = _as_float64_rows(features)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} dimensions; these stats have {self.dim}")
        if x.shape[0] == 0:
            return self
        outer = x.T @ x
        # The product is symmetric in exact arithmetic; keep the stored sum exactly so.
        outer = 0.5 * (outer + outer.T)
        self.n += int(x.shape[0])
        self.sum += x.sum(0).cpu().numpy()
        self.sum_outer += outer.cpu().numpy()
        return self

    # Merging --------------------------------------------------------------------------------
    def merge(self, other: FeatureStats) -> FeatureStats:
        """Statistics of the union of the two (disjoint) sample sets, as a new object."""
        if not isinstance(other, FeatureStats):
            raise TypeError(f"cannot merge FeatureStats with {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dimension {self.dim} and {other.dim}")
        return FeatureStats(
            self.n + other.n, self.sum + other.sum, self.sum_outer + other.sum_outer
        )

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return self.merge(other)

    def __radd__(self, other: Any) -> FeatureStats:
        # Lets the builtin sum() start from 0.
        if isinstance(other, int) and other == 0:
            return self.copy()
        return NotImplemented

    @staticmethod
    def merge_all(parts: Iterable[FeatureStats]) -> FeatureStats:
        """Merge any number of partial statistics (at least one)."""
        parts = list(parts)
        if not parts:
            raise ValueError("merge_all needs at least one FeatureStats")
        out = parts[0].copy()
        for p in parts[1:]:
            out = out.merge(p)
        return out

    def copy(self) -> FeatureStats:
        return FeatureStats(self.n, self.sum.copy(), self.sum_outer.copy())

    # Moments --------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.sum.size)

    @property
    def mean(self) -> np.ndarray:
        """Mean feature vector, float64 [d]."""
        if self.n < 1:
            raise ValueError("the mean of an empty feature set is undefined")
        return self.sum / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (``ddof=1``), float64 [d, d]."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples; these stats have {self.n}")
        mu = self.sum / self.n
        return (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    # Plain data -----------------------------------------------------------------------------
    def to_dict(self, *, lists: bool = True) -> dict[str, Any]:
        """Plain data: ``{"n", "dim", "sum" [d], "sum_outer" [d*d] row-major}``.

        With ``lists=False`` the arrays stay numpy arrays (cheaper through Ray's object
        store); with the default they are Python lists of floats (JSON, Parquet list<double>).
        """
        s, so = self.sum.copy(), self.sum_outer.reshape(-1).copy()
        return {
            "n": self.n,
            "dim": self.dim,
            "sum": s.tolist() if lists else s,
            "sum_outer": so.tolist() if lists else so,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureStats:
        """Inverse of ``to_dict`` (either form)."""
        s = np.asarray(d["sum"], dtype=np.float64)
        dim = int(d.get("dim", s.size))
        so = np.asarray(d["sum_outer"], dtype=np.float64).reshape(dim, dim)
        return cls(int(d["n"]), s, so)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FeatureStats)
            and self.n == other.n
            and np.array_equal(self.sum, other.sum)
            and np.array_equal(self.sum_outer, other.sum_outer)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"FeatureStats(n={self.n}, dim={self.dim})"
