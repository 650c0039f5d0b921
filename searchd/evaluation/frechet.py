"""Frechet distance between Gaussians: the exact path of clean-fid, and a fast path.

``FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)``.

* ``frechet_distance`` is the exact path, computed as clean-fid computes it: scipy's
  ``sqrtm`` of the (non-symmetric) product ``S1 S2``; if that is not finite, ``eps`` is added
  to both diagonals and the root taken again; a small imaginary part is dropped.
* ``FrechetReference`` is the fast path for a search, where one reference is compared with
  many candidates. ``S1 S2`` is similar to the symmetric PSD matrix ``R S1 R`` with
  ``R = S2^(1/2)`` (the symmetric square root), so ``tr sqrt(S1 S2)`` is the sum of the square
  roots of that matrix's eigenvalues. Any factor ``B`` with ``B B^T = S2`` gives the same
  eigenvalues through ``B^T S1 B``; the Cholesky factor is used (computed once; the symmetric
  root when S2 is singular), so each candidate costs two triangular products and one
  ``eigvalsh``, in float64, on the CPU (numpy/scipy LAPACK) or a GPU (torch). Eigenvalues
  that rounding makes slightly negative are clipped to 0, so singular covariances (fewer
  samples than dimensions) need no ``eps``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np
import torch
from scipy import linalg
from scipy.linalg import blas
from torch import Tensor

from searchd.evaluation.stats import FeatureStats

try:  # a dependency of scikit-learn
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover
    ThreadpoolController = None
_controller = None

log = logging.getLogger(__name__)


def _check_pair(mu1, sigma1, mu2, sigma2) -> tuple[np.ndarray, ...]:
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape:
        raise ValueError(f"means have different shapes: {mu1.shape} and {mu2.shape}")
    if s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"covariances {s1.shape} and {s2.shape} do not match means of dimension {mu1.size}"
        )
    return mu1, s1, mu2, s2


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's principal square root, without its deprecation and singularity warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return linalg.sqrtm(a)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Exact Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as clean-fid does it.

    Args:
        mu1, mu2: means [d].
        sigma1, sigma2: covariances [d, d].
        eps: added to both diagonals when the square root of the product is not finite.

    Returns:
        The distance (a float; slightly negative values from rounding are returned as is).

    Raises:
        ValueError: shapes disagree, or the root has an imaginary diagonal above 1e-3.
    """
    mu1, s1, mu2, s2 = _check_pair(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = _sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        log.warning("singular product in the Frechet distance; adding %g to the diagonals", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _f64(x: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """Any array as a float64 tensor on ``device`` (no copy for float64 CPU arrays)."""
    if isinstance(x, Tensor):
        return x.detach().to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64)).to(device)


def _blas_one_thread() -> contextlib.AbstractContextManager:
    """Limit BLAS/LAPACK to one thread (a no-op without threadpoolctl).

    Used around ``eigh``/``eigvalsh``: LAPACK's tridiagonal reduction is half BLAS-2 and
    gains little from threads, and when the cores are oversubscribed its spinning threads
    make it many times slower (measured on this project's shared 2-core machine: one
    2048x2048 ``eigvalsh`` 26 s with 2 OpenBLAS threads, 4.8 s with 1; a batch of 200
    128x128 ones 8 s vs 0.9 s).
    """
    global _controller
    if ThreadpoolController is None:
        return contextlib.nullcontext()
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def eigvalsh(m: Tensor) -> Tensor:
    """Eigenvalues of symmetric matrices [..., d, d] (float64), ascending.

    On the CPU numpy's LAPACK on one thread, on a GPU torch's.
    """
    if m.device.type == "cpu":
        with _blas_one_thread():
            return torch.from_numpy(np.linalg.eigvalsh(m.numpy()))
    return torch.linalg.eigvalsh(m)


def psd_sqrt(sigma: Tensor) -> Tensor:
    """Symmetric PSD square root of a symmetric matrix [d, d] (negative eigenvalues -> 0)."""
    sym = 0.5 * (sigma + sigma.T)
    if sym.device.type == "cpu":
        with _blas_one_thread():
            w, v = (torch.from_numpy(a) for a in np.linalg.eigh(sym.numpy()))
    else:
        w, v = torch.linalg.eigh(sym)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def psd_factor(sigma: Tensor) -> tuple[Tensor, bool]:
    """A factor B [d, d] with B B^T = sigma: (Cholesky L, True) when sigma is positive
    definite, else (the symmetric PSD square root, False)."""
    sym = 0.5 * (sigma + sigma.T)
    chol, info = torch.linalg.cholesky_ex(sym)
    if int(info) == 0 and bool(torch.isfinite(chol).all()):
        return chol, True
    return psd_sqrt(sym), False


class FrechetReference:
    """Fast Frechet distances from many candidates to one fixed reference Gaussian.

    Args:
        mu: reference mean [d].
        sigma: reference covariance [d, d] (symmetric PSD; may be singular).
        device: where the float64 linear algebra runs ("cpu" or a CUDA device).

    Once, here: a factor ``B`` with ``B B^T = sigma`` (the Cholesky factor, or the symmetric
    square root when sigma is singular). Per candidate: ``B^T S B`` is symmetric PSD and
    similar to ``S sigma``, so ``tr sqrt(S sigma)`` is the sum of the square roots of its
    eigenvalues. On the CPU the two products are triangular (BLAS ``trmm``, half the work of
    general products) when B is triangular.
    """

    def __init__(
        self,
        mu: np.ndarray | Tensor,
        sigma: np.ndarray | Tensor,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.mu = _f64(mu, self.device)
        sig = _f64(sigma, self.device)
        if self.mu.ndim != 1 or sig.shape != (self.mu.numel(), self.mu.numel()):
            raise ValueError(
                f"reference mean {tuple(self.mu.shape)} and covariance {tuple(sig.shape)} "
                "do not match"
            )
        self.sigma = 0.5 * (sig + sig.T)
        self.trace = float(torch.trace(self.sigma))
        self.factor, self.triangular = psd_factor(self.sigma)
        cpu = self.device.type == "cpu"
        self._mu_np = self.mu.numpy() if cpu else None
        self._factor_f = np.asfortranarray(self.factor.numpy()) if cpu else None

    @classmethod
    def from_stats(
        cls, stats: FeatureStats, device: str | torch.device = "cpu"
    ) -> FrechetReference:
        """A reference from accumulated statistics."""
        return cls(stats.mean, stats.cov, device=device)

    @property
    def dim(self) -> int:
        return int(self.mu.numel())

    def _congruence_np(self, sigma: np.ndarray) -> np.ndarray:
        """``B^T sigma B`` [d, d] on the CPU."""
        b = self._factor_f
        if self.triangular:
            # sigma is symmetric, so its C-ordered buffer is its own Fortran-ordered transpose.
            s = sigma if sigma.flags.f_contiguous else np.ascontiguousarray(sigma).T
            t = blas.dtrmm(1.0, b, s, side=1, lower=1)  # sigma @ L
            return blas.dtrmm(1.0, b, t, side=0, lower=1, trans_a=1)  # L^T @ (sigma @ L)
        return b.T @ sigma @ b

    def trace_sqrt_product(self, sigma: np.ndarray | Tensor) -> float:
        """``tr sqrt(sigma sigma_ref)`` for a covariance [d, d] (float64)."""
        if self.device.type == "cpu":
            s = _f64(sigma, self.device).numpy()
            # Products on one thread below 1024 too: OpenBLAS threads small trmm calls.
            with _blas_one_thread() if self.dim < 1024 else contextlib.nullcontext():
                m = self._congruence_np(s)
            with _blas_one_thread():
                ev = np.linalg.eigvalsh(0.5 * (m + m.T))
            return float(np.sqrt(np.clip(ev, 0.0, None)).sum())
        s = _f64(sigma, self.device)
        m = self.factor.T @ s @ self.factor
        ev = torch.linalg.eigvalsh(0.5 * (m + m.T))
        return float(ev.clamp_min(0).sqrt().sum())

    def distance(self, mu: np.ndarray | Tensor, sigma: np.ndarray | Tensor) -> float:
        """Frechet distance from N(mu [d], sigma [d, d]) to the reference."""
        m, s = _f64(mu, self.device), _f64(sigma, self.device)
        if m.shape != self.mu.shape or s.shape != (self.dim, self.dim):
            raise ValueError(
                f"candidate mean {tuple(m.shape)} / covariance {tuple(s.shape)} do not "
                f"match the reference dimension {self.dim}"
            )
        diff = m - self.mu
        tr_cross = self.trace_sqrt_product(s)
        return float(diff @ diff) + float(torch.trace(s)) + self.trace - 2.0 * tr_cross

    def __call__(self, stats: FeatureStats) -> float:
        """Frechet distance from the Gaussian fit of ``stats`` to the reference."""
        return self.distance(stats.mean, stats.cov)


def frechet_distance_fast(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    device: str | torch.device = "cpu",
) -> float:
    """One-off fast-path distance (builds a ``FrechetReference`` on the second Gaussian)."""
    mu1, s1, mu2, s2 = _check_pair(mu1, sigma1, mu2, sigma2)
    return FrechetReference(mu2, s2, device=device).distance(mu1, s1)
