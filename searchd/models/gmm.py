"""Analytic Gaussian-mixture denoisers: the exact posterior mean of a mixture, in closed form.

For data ``x0 ~ sum_k pi_k N(mu_k, Sigma_k)`` observed as ``x = x0 + sigma * n``, the noisy
marginal is ``sum_k pi_k N(mu_k, Sigma_k + sigma^2 I)`` and the ideal denoiser is

    D(x, sigma) = sum_k r_k(x, sigma) [mu_k + Sigma_k (Sigma_k + sigma^2 I)^{-1} (x - mu_k)],

with responsibilities ``r_k`` proportional to ``pi_k N(x; mu_k, Sigma_k + sigma^2 I)``.
Each covariance is diagonalized once, ``Sigma_k = U_k diag(l_k) U_k^T``; in that eigenbasis
``Sigma_k + sigma^2 I`` is diagonal for every sigma, so a call costs two batched matmuls
(project ``x`` onto all K eigenbases at once, and back) and elementwise work, with no
per-component D x D solve per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.models.base import sigma_per_sample

# Elements of the [rows, K, D] intermediates per internal chunk of a call. On the CPU small
# chunks stay in cache (512 rows for K = D = 64 is about twice as fast on 10,000 samples as
# one pass); on CUDA they only bound memory.
_CHUNK_ELEMENTS = 1 << 21
_CHUNK_ELEMENTS_CUDA = 1 << 26
# On the CPU each chunk is computed in near-equal pieces of at most this many elements: for
# K = D = 64, pieces of <= 256 rows (4 MiB per intermediate) run about twice as fast as the
# 512-row chunks on a 2-core EPYC whose 32 MiB L3 two actors share. The chunks, not the
# pieces, fix the bits: a matrix product's row does not depend on how many rows come with
# it once there are 4 or more (MKL rounds 1-3 rows differently), and a chunk of more than
# 256 rows is cut into pieces of at least 128, while a smaller chunk (a 1-3 row remainder
# included) stays whole; in float64 MKL also rounds a row by its place in blocks of 4, which
# the pieces keep (``_pieces``); so every output is bitwise that of the chunks computed whole
# (tests/test_gmm.py).
_PIECE_ELEMENTS = 1 << 20
# Rows sharing one noise level are denoised together when the groups average at least this
# many rows; otherwise every row is handled with its own level.
_MIN_GROUP_ROWS = 64


def _slices(n: int, rows: int) -> list[slice]:
    """Consecutive slices of at most ``rows`` covering ``range(n)``."""
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _pieces(n: int, rows: int, piece_rows: int) -> list[slice]:
    """The slices of ``_slices(n, rows)``, each cut into near-equal consecutive pieces of
    about ``piece_rows`` (a slice of at most ``piece_rows`` stays whole). Every piece but a
    slice's last has a multiple of 4 rows and the last keeps the slice's remainder, so each
    row sits at the same position modulo 4 and in the same 1-3 row tail as in its slice:
    MKL's float64 product rounds rows by their position in blocks of 4."""
    out = []
    for sl in _slices(n, rows):
        m = sl.stop - sl.start
        parts = -(-m // piece_rows)
        bounds = [sl.start + 4 * ((m // 4) * j // parts) for j in range(parts)] + [sl.stop]
        out.extend(slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]))
    return out


class GaussianMixtureDenoiser:
    """Exact denoiser and exact sampler of a full-covariance Gaussian mixture.

    Args:
        weights: mixture weights [K] (normalized here; must be positive).
        means: component means [K, D], D = prod(shape).
        covs: component covariances [K, D, D], symmetric positive definite.
        shape: shape of one sample; the mixture lives on the flattened D-vector.
        cost: relative cost of one call per sample (model schedules).
        sigma_min, sigma_max: noise range the model is meant to be sampled over.
        name: zoo name, for messages and reports.
        device, dtype: where and in which precision calls are computed (see ``to``).

    Parameters are kept in float64 on the CPU (the master copy, used by ``sample_data`` and
    ``save_npz``); the working buffers used by calls live on ``device`` in ``dtype``.
    """

    sigma_grid: Tensor | None = None

    def __init__(
        self,
        weights: np.ndarray | Tensor | Sequence[float],
        means: np.ndarray | Tensor,
        covs: np.ndarray | Tensor,
        *,
        shape: tuple[int, ...] = (1, 8, 8),
        cost: float = 1.0,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        name: str = "gmm",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        mu = torch.as_tensor(np.asarray(means, dtype=np.float64))
        cov = torch.as_tensor(np.asarray(covs, dtype=np.float64))
        if w.ndim != 1 or mu.ndim != 2 or cov.ndim != 3:
            raise ValueError(
                f"expected weights [K], means [K, D], covs [K, D, D]; got {tuple(w.shape)}, "
                f"{tuple(mu.shape)}, {tuple(cov.shape)}"
            )
        k, d = mu.shape
        if w.shape != (k,) or cov.shape != (k, d, d):
            raise ValueError(
                f"inconsistent shapes: weights {tuple(w.shape)}, means {tuple(mu.shape)}, "
                f"covs {tuple(cov.shape)}"
            )
        if math.prod(shape) != d:
            raise ValueError(f"shape {shape} has {math.prod(shape)} entries; the means have {d}")
        if not torch.all(torch.isfinite(w)) or not torch.all(w > 0):
            raise ValueError(f"mixture weights must be finite and positive; got {w.tolist()}")
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        if not torch.allclose(cov, cov.transpose(1, 2), rtol=1e-6, atol=1e-9):
            raise ValueError("covariances must be symmetric")
        evals, evecs = torch.linalg.eigh(cov)
        if not torch.all(evals > 0):
            bad = int(torch.argmin(evals.min(dim=1).values))
            raise ValueError(
                f"covariance {bad} is not positive definite (smallest eigenvalue "
                f"{float(evals[bad].min()):.3g}); add a floor to its diagonal"
            )

        self.shape = tuple(int(s) for s in shape)
        self.cost = float(cost)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.name = str(name)
        self.n_components = int(k)
        self.dim = int(d)
        # Float64 CPU master copy.
        # Normalize, unless already normalized (so that files round-trip bit for bit).
        self.weights = w if abs(float(w.sum()) - 1.0) < 1e-12 else w / w.sum()
        self.means = mu
        self.covs = cov
        self.eigvals = evals  # [K, D], ascending
        self.eigvecs = evecs  # [K, D, D], columns are eigenvectors
        self.to(device, dtype)

    # Placement ----------------------------------------------------------------------------
    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> GaussianMixtureDenoiser:
        """Move the working buffers to ``device`` / ``dtype`` (in place; returns ``self``).

        Buffers are derived from the float64 master copy, so moving to float32 and back to
        float64 loses nothing.
        """
        device = torch.device(device) if device is not None else self.device
        dtype = dtype if dtype is not None else self.dtype
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point; got {dtype}")
        k, d = self.n_components, self.dim
        # Projection onto all eigenbases at once: (x @ proj)[b, k*D + j] = (U_k^T x_b)_j.
        proj = self.eigvecs.permute(1, 0, 2).reshape(d, k * d)
        self._proj = proj.to(device, dtype).contiguous()  # [D, K*D]
        self._back = proj.T.to(device, dtype).contiguous()  # [K*D, D]
        self._mu_proj = torch.einsum("kdj,kd->kj", self.eigvecs, self.means).to(device, dtype)
        self._mu = self.means.to(device, dtype)  # [K, D]
        self._lam = self.eigvals.to(device, dtype)  # [K, D]
        self._log_w = self.weights.log().to(device, dtype)  # [K]
        self.device, self.dtype = device, dtype
        return self

    # Denoising ----------------------------------------------------------------------------
    def __call__(self, x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
        """Posterior mean E[x0 | x] of ``x`` [B, *shape] at noise levels ``sigma`` [B] or ().

        Computed on the working device and dtype (see ``to``); returns [B, *shape] in
        ``x``'s dtype and device. Differentiable by autograd in ``x`` and in ``sigma``.
        Conditioning keywords are not used by this model.
        """
        return self._call(x, sigma)

    def _call(
        self,
        x: Tensor,
        sigma: Tensor | float,
        bias: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> Tensor:
        """The posterior mean with optionally reweighted responsibilities (see ``_mix``):
        ``bias`` [B, K] added to the log-responsibilities of the conditional part (0 or
        -inf: the row's class's components), ``weight`` [B] the guidance weight per row."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, {self.shape}]")
        sigma = sigma_per_sample(sigma, x)
        b = x.shape[0]
        xf = x.reshape(b, self.dim).to(self.device, self.dtype)
        s2 = sigma.to(self.device, self.dtype).square()
        out = torch.empty_like(xf)
        rows = self._chunk_rows()
        piece = self._piece_rows(rows)

        def chunks(n: int) -> list[slice]:
            return _pieces(n, rows, piece)

        def part(t: Tensor | None, sel: slice | Tensor) -> Tensor | None:
            return None if t is None else t[sel]

        if s2.requires_grad:
            # Differentiable in sigma: every row through its own level (grouping rows by
            # level would route the gradient of a group to one row's sigma).
            for sl in chunks(b):
                out[sl] = self._denoise_general(xf[sl], s2[sl], part(bias, sl), part(weight, sl))
            return out.reshape(x.shape).to(x.device, x.dtype)
        levels, group = torch.unique(s2, return_inverse=True)
        # Scratch for the [rows, K * D] intermediates of the shared-level path, reused by
        # every piece of the call (fresh 4 MiB tensors per piece cost page faults and cold
        # cache lines); not under autograd, which cannot differentiate through out=.
        work = None
        if not xf.requires_grad and self.device.type == "cpu":
            work = xf.new_empty((2, min(b, rows), self.n_components * self.dim))
        if levels.numel() == 1:
            for sl in chunks(b):
                out[sl] = self._denoise_shared(xf[sl], levels[0], part(bias, sl),
                                               part(weight, sl), work)
        elif levels.numel() * _MIN_GROUP_ROWS <= b:
            # Few distinct levels (per-sample schedules of a few candidates): one group each.
            for j in range(levels.numel()):
                idx = (group == j).nonzero().squeeze(1)
                xg, bg, wg = xf[idx], part(bias, idx), part(weight, idx)
                out[idx] = torch.cat(
                    [self._denoise_shared(xg[sl], levels[j], part(bg, sl), part(wg, sl), work)
                     for sl in chunks(idx.numel())]
                )
        else:
            for sl in chunks(b):
                out[sl] = self._denoise_general(xf[sl], s2[sl], part(bias, sl), part(weight, sl))
        return out.reshape(x.shape).to(x.device, x.dtype)

    @staticmethod
    def _mix(logits: Tensor, bias: Tensor | None, weight: Tensor | None) -> Tensor:
        """Responsibilities [B, K] from log-responsibilities ``logits`` [B, K].

        Plain: ``softmax(logits)``. With ``bias`` (the conditional part): ``r_c =
        softmax(logits + bias)``, and with ``weight`` w [B] the guided ``r_u + w (r_c -
        r_u)``, ``r_u = softmax(logits)`` (exactly ``r_c`` where w = 1). The posterior mean
        is linear in the responsibilities, so this is classifier-free guidance
        ``u + w (c - u)`` on the denoiser outputs, exactly.
        """
        if bias is None:
            return torch.softmax(logits, dim=1)
        cond = torch.softmax(logits + bias, dim=1)
        if weight is None:
            return cond
        uncond = torch.softmax(logits, dim=1)
        w = weight.to(logits.dtype)[:, None]
        return torch.where(w == 1, cond, uncond + w * (cond - uncond))

    def _chunk_rows(self) -> int:
        elements = _CHUNK_ELEMENTS_CUDA if self.device.type == "cuda" else _CHUNK_ELEMENTS
        return max(1, elements // (self.n_components * self.dim))

    def _piece_rows(self, rows: int) -> int:
        """Rows per piece of a chunk of ``rows`` (``_PIECE_ELEMENTS``; CUDA: whole chunks)."""
        if self.device.type == "cuda":
            return rows
        return max(1, min(rows, _PIECE_ELEMENTS // (self.n_components * self.dim)))

    def _denoise_shared(
        self, x: Tensor, s2: Tensor, bias: Tensor | None = None, weight: Tensor | None = None,
        work: Tensor | None = None,
    ) -> Tensor:
        """Rows sharing one noise variance: flat ``x`` [B, D], scalar ``s2`` -> [B, D].

        The whitening by (l + s2)^(-1/2) is folded into the projection and back-projection
        matrices, so the per-sample work is two matmuls, a squared norm and a softmax.
        ``work`` [2, >= B, K * D]: scratch for the intermediates (the same operations
        written into it, so the same values bit for bit), or None (fresh tensors).
        """
        if work is not None:
            return self._denoise_shared_into(x, s2, bias, weight, work)
        b, k, d = x.shape[0], self.n_components, self.dim
        inv = (self._lam + s2).reciprocal()  # [K, D]
        root = inv.sqrt()
        proj = (self._proj.view(d, k, d) * root).view(d, k * d)
        centre = (self._mu_proj * root).view(k * d)
        back = self._back * (self._lam * root).view(k * d, 1)
        log_norm = self._log_w + 0.5 * inv.log().sum(-1)  # [K]
        # Whitened coordinates of x - mu_k in the eigenbasis of Sigma_k + s2 I.
        w = torch.addmm(centre, x, proj, beta=-1).view(b, k, d)
        r = self._mix(log_norm - 0.5 * w.square().sum(-1), bias, weight)  # [B, K]
        # sum_k r_k [mu_k + U_k diag(l / (l + s2)) z_k], with z_k = sqrt(l + s2) w_k.
        return torch.addmm(r @ self._mu, (w * r[:, :, None]).view(b, k * d), back)

    def _denoise_shared_into(
        self, x: Tensor, s2: Tensor, bias: Tensor | None, weight: Tensor | None, work: Tensor
    ) -> Tensor:
        """``_denoise_shared`` with its [B, K * D] intermediates in ``work`` (no autograd)."""
        b, k, d = x.shape[0], self.n_components, self.dim
        inv = (self._lam + s2).reciprocal()  # [K, D]
        root = inv.sqrt()
        proj = (self._proj.view(d, k, d) * root).view(d, k * d)
        centre = (self._mu_proj * root).view(k * d)
        back = self._back * (self._lam * root).view(k * d, 1)
        log_norm = self._log_w + 0.5 * inv.log().sum(-1)  # [K]
        w = torch.addmm(centre, x, proj, beta=-1, out=work[0, :b]).view(b, k, d)
        sq = torch.mul(w, w, out=work[1, :b].view(b, k, d))
        r = self._mix(log_norm - 0.5 * sq.sum(-1), bias, weight)  # [B, K]
        shrunk = torch.mul(w, r[:, :, None], out=work[1, :b].view(b, k, d))
        return torch.addmm(r @ self._mu, shrunk.view(b, k * d), back)

    def _denoise_general(
        self, x: Tensor, s2: Tensor, bias: Tensor | None = None, weight: Tensor | None = None
    ) -> Tensor:
        """Rows with their own noise variances: flat ``x`` [B, D], ``s2`` [B] -> [B, D]."""
        b, k, d = x.shape[0], self.n_components, self.dim
        # Coordinates of x - mu_k in the eigenbasis of Sigma_k.
        z = torch.addmm(self._mu_proj.view(k * d), x, self._proj, beta=-1).view(b, k, d)
        # Variances of the noisy component along its eigenvectors.
        var = self._lam + s2[:, None, None]  # [B, K, D]
        inv = var.reciprocal()
        # Log-responsibilities: log pi_k + log N(x; mu_k, Sigma_k + s2 I), up to a constant.
        logp = self._log_w - 0.5 * ((z * z * inv).sum(-1) + var.log().sum(-1))  # [B, K]
        r = self._mix(logp, bias, weight)
        # Posterior means mu_k + U_k diag(l / (l + s2)) z_k, weighted by r_k and summed.
        shrunk = z * (self._lam * inv) * r[:, :, None]  # [B, K, D]
        return torch.addmm(r @ self._mu, shrunk.view(b, k * d), self._back)

    # Data distribution --------------------------------------------------------------------
    def sample_data(
        self,
        seeds: Sequence[int] | np.ndarray | range,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Exact samples of the mixture, [len(seeds), *shape]; row i depends only on seeds[i].

        Each row draws, from its own CPU generator seeded with ``seeds[i]`` (the convention of
        ``searchd.noise.make_noise``), a standard normal D-vector and then a uniform that picks
        the component; computed in float64 and then cast to ``dtype`` on ``device`` (default:
        the working ones). Use seeds disjoint from the noise seeds of the samples compared
        against, since a seed's draws coincide with ``make_noise``'s for that seed.
        """
        seeds = [int(s) for s in seeds]
        cum = self.weights.cumsum(0)
        scale = self.eigvals.sqrt()  # [K, D]
        out = torch.empty((len(seeds), self.dim), dtype=torch.float64)
        g = torch.Generator(device="cpu")
        for row, s in enumerate(seeds):
            if s < 0:
                raise ValueError(f"seed {s} is negative; seeds must be >= 0")
            g.manual_seed(s)
            eps = torch.randn(self.dim, generator=g, dtype=torch.float64)
            u = torch.rand((), generator=g, dtype=torch.float64)
            k = min(int(torch.searchsorted(cum, u, right=True)), self.n_components - 1)
            # x = mu_k + U_k diag(sqrt(l_k)) eps, one row at a time so that the rounding of
            # a row does not depend on the other rows of the batch.
            out[row] = self.means[k] + self.eigvecs[k] @ (scale[k] * eps)
        n = len(seeds)
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None else dtype
        return out.reshape(n, *self.shape).to(device, dtype)

    def data_mean(self) -> Tensor:
        """Mean of the mixture, float64 [D]."""
        return self.weights @ self.means

    def data_cov(self) -> Tensor:
        """Covariance of the mixture, float64 [D, D] (law of total covariance)."""
        m = self.data_mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs)
        second = second + torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        return second - torch.outer(m, m)

    # Files --------------------------------------------------------------------------------
    def save_npz(self, path: str | Path, **extra: np.ndarray) -> None:
        """Write the parameters (float64) and metadata to an ``.npz`` file (with ``extra``
        arrays: a subclass's own fields)."""
        np.savez(
            path,
            weights=self.weights.numpy(),
            means=self.means.numpy(),
            covs=self.covs.numpy(),
            shape=np.asarray(self.shape, dtype=np.int64),
            cost=np.float64(self.cost),
            sigma_min=np.float64(self.sigma_min),
            sigma_max=np.float64(self.sigma_max),
            name=np.str_(self.name),
            **extra,
        )

    @staticmethod
    def read_npz(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The arrays and the constructor keywords (shape, cost, range, name) of a file
        written by ``save_npz``."""
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        kw = {
            "shape": tuple(int(s) for s in arrays["shape"]),
            "cost": float(arrays["cost"]),
            "sigma_min": float(arrays["sigma_min"]),
            "sigma_max": float(arrays["sigma_max"]),
            "name": str(arrays["name"]),
        }
        return arrays, kw

    @classmethod
    def from_npz(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **overrides,
    ) -> GaussianMixtureDenoiser:
        """Load a mixture written by ``save_npz``; keyword ``overrides`` replace stored fields
        (e.g. ``sigma_min``, ``name``)."""
        arrays, kw = cls.read_npz(path)
        weights, means, covs = arrays["weights"], arrays["means"], arrays["covs"]
        kw.update(overrides)
        return cls(weights, means, covs, device=device, dtype=dtype, **kw)

    def __repr__(self) -> str:
        return (
            f"GaussianMixtureDenoiser(name={self.name!r}, K={self.n_components}, "
            f"D={self.dim}, shape={self.shape}, sigma=[{self.sigma_min}, {self.sigma_max}], "
            f"cost={self.cost:.3g}, device={self.device}, dtype={self.dtype})"
        )
