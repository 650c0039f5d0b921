"""Class-conditional models: the exact conditional mixture, labels per seed, guidance support.

Conventions shared by every conditional model of searchd:

- **The class of a sample is a function of its seed**: ``class_of_seed(seed, C) = seed mod C``
  (``class_labels``). The evaluator passes each row's seed as ``sample_index``, and a
  conditional denoiser conditions row r on entry ``sample_index[r] mod n`` of its label (or
  prompt) table, so the same seed gets the same noise *and* the same class in every
  candidate (common random numbers), and any C consecutive seeds hold every class once
  (class-balanced). ``row_conditioning(denoiser, seeds)`` gives the keywords to pass.
- **Guidance per call**: a conditional denoiser takes ``guidance`` (float [B], the weight w
  of each row) and returns ``u + w (c - u)``; w = 1 is the conditional model alone (no
  unconditional evaluation), w = 0 the unconditional one. ``supports_guidance(denoiser)``
  says whether a denoiser takes it.

``ConditionalGaussianMixture`` is the exact model: one Gaussian mixture per class. Its
conditional denoiser is the posterior mean under the class's components only, its
unconditional denoiser the posterior mean under the mixture of all classes (weights
``pi_c w_{c,k}``), and since the posterior mean is linear in the responsibilities,
classifier-free guidance is computed exactly from one projection of ``x`` (see
``GaussianMixtureDenoiser._mix``). Its exact samples of class c give per-class reference
statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.models.gmm import GaussianMixtureDenoiser


def class_labels(seeds: Sequence[int] | np.ndarray | range, n_classes: int) -> np.ndarray:
    """The class of each sample, int64 [n]: ``seed mod n_classes`` (class-balanced over any
    ``n_classes`` consecutive seeds; the same in every candidate)."""
    if n_classes < 1:
        raise ValueError(f"n_classes = {n_classes}; it must be >= 1")
    s = np.asarray([int(v) for v in seeds], dtype=np.int64)
    if (s < 0).any():
        raise ValueError(f"seed {int(s[s < 0][0])} is negative; seeds must be >= 0")
    return s % int(n_classes)


def is_conditional(denoiser: Any) -> bool:
    """Whether a denoiser conditions its rows on ``sample_index`` (class labels, prompts)."""
    return bool(getattr(denoiser, "conditional", False))


def supports_guidance(denoiser: Any) -> bool:
    """Whether a denoiser takes per-row guidance weights (``guidance=`` in its calls)."""
    return bool(getattr(denoiser, "supports_guidance", False))


def row_conditioning(denoiser: Any, seeds: Sequence[int] | Tensor) -> dict[str, Tensor] | None:
    """The per-row keywords for ``solve(..., cond=...)``: ``{"sample_index": seeds}`` (int64
    [n]) for a conditional denoiser, None for any other (which takes no such keyword)."""
    if not is_conditional(denoiser):
        return None
    idx = torch.as_tensor(np.asarray([int(s) for s in seeds], dtype=np.int64))
    return {"sample_index": idx}


def _index_labels(
    b: int, n_classes: int, sample_index: Tensor | None, class_labels: Tensor | None
) -> Tensor:
    """Labels int64 [B]: ``class_labels``, else ``sample_index mod C``, else row mod C."""
    if class_labels is not None:
        labels = torch.as_tensor(class_labels).to(torch.int64).reshape(-1)
        if labels.shape != (b,):
            raise ValueError(f"class_labels has shape {tuple(labels.shape)}; expected ({b},)")
        bad = (labels < 0) | (labels >= n_classes)
        if bad.any():
            raise ValueError(
                f"class label {int(labels[bad][0])} is out of range; classes are 0..{n_classes - 1}"
            )
        return labels.cpu()
    if sample_index is not None:
        idx = torch.as_tensor(sample_index).to(torch.int64).reshape(-1).cpu()
        if idx.shape != (b,):
            raise ValueError(f"sample_index has shape {tuple(idx.shape)}; expected ({b},)")
        return idx % n_classes
    return torch.arange(b) % n_classes


def guidance_weights(guidance: Tensor | float | None, default: float, b: int) -> Tensor | None:
    """Per-row guidance weights float64 [B] (``default`` where none is given), or None when
    every row has w = 1 (the conditional model alone)."""
    if guidance is None:
        w = torch.full((b,), float(default), dtype=torch.float64)
    else:
        w = torch.as_tensor(guidance, dtype=torch.float64).detach().cpu()
        if w.ndim == 0:
            w = w.expand(b)
        if w.shape != (b,):
            raise ValueError(f"guidance has shape {tuple(w.shape)}; expected () or ({b},)")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("guidance weights must be finite and >= 0")
    return None if bool((w == 1).all()) else w


class ConditionalGaussianMixture(GaussianMixtureDenoiser):
    """One full-covariance Gaussian mixture per class, with exact conditional, unconditional
    and guided denoisers, and exact samples per class.

    Args:
        weights: mixture weights [K] of the unconditional model (``pi_c w_{c,k}``; normalized).
        means, covs: components [K, D], [K, D, D].
        component_class: the class of each component, int [K], every class in 0..C-1 used.
        n_classes: C.
        guidance_scale: the weight used when a call gives none (1: conditional, no guidance).
        **kw: the other ``GaussianMixtureDenoiser`` arguments (shape, sigma range, name, ...).

    A call ``den(x, sigma, *, sample_index=None, class_labels=None, guidance=None)``
    conditions row r on ``class_labels[r]``, else ``sample_index[r] mod C``, else ``r mod C``
    (as ``NetworkDenoiser`` picks a row's label), and guides it with ``guidance[r]``.
    """

    conditional = True
    supports_guidance = True

    def __init__(
        self,
        weights: np.ndarray | Tensor | Sequence[float],
        means: np.ndarray | Tensor,
        covs: np.ndarray | Tensor,
        component_class: Sequence[int] | np.ndarray,
        n_classes: int,
        *,
        guidance_scale: float = 1.0,
        **kw: Any,
    ) -> None:
        super().__init__(weights, means, covs, **kw)
        cls = np.asarray(component_class)
        if cls.shape != (self.n_components,) or (cls.size and not np.issubdtype(cls.dtype,
                                                                                  np.integer)):
            raise ValueError(
                f"component_class must be integers [{self.n_components}]; got shape {cls.shape}"
            )
        n_classes = int(n_classes)
        missing = sorted(set(range(n_classes)) - set(cls.tolist()))
        if missing or cls.min() < 0 or cls.max() >= n_classes:
            raise ValueError(
                f"component_class must use every class 0..{n_classes - 1} and nothing else; "
                f"missing {missing}, range [{int(cls.min())}, {int(cls.max())}]"
            )
        if not (np.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale = {guidance_scale!r}; it must be finite and >= 0")
        self.n_classes = n_classes
        self.component_class = torch.as_tensor(cls.astype(np.int64))
        self.guidance_scale = float(guidance_scale)
        # Class priors pi_c and, per class, the cumulative weights of its components.
        self.class_weights = torch.zeros(n_classes, dtype=torch.float64).index_add_(
            0, self.component_class, self.weights
        )
        self._place_bias()

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> ConditionalGaussianMixture:
        super().to(device, dtype)
        if hasattr(self, "component_class"):
            self._place_bias()
        return self

    def _place_bias(self) -> None:
        # Log-mask [C, K]: 0 on the class's components, -inf elsewhere.
        mask = self.component_class[None, :] == torch.arange(self.n_classes)[:, None]
        bias = torch.where(mask, 0.0, float("-inf")).to(torch.float64)
        self._class_bias = bias.to(self.device, self.dtype)

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    # Denoising ----------------------------------------------------------------------------
    def __call__(
        self,
        x: Tensor,
        sigma: Tensor | float,
        *,
        sample_index: Tensor | None = None,
        class_labels: Tensor | None = None,
        guidance: Tensor | float | None = None,
        **cond: Any,
    ) -> Tensor:
        """Guided posterior mean ``u + w (c - u)`` [B, *shape] of ``x`` [B, *shape] at
        ``sigma`` [B]: c under the row's class, u under all classes, w per row (default
        ``guidance_scale``); rows with w = 1 are the conditional posterior mean exactly."""
        b = x.shape[0]
        labels = _index_labels(b, self.n_classes, sample_index, class_labels)
        bias = self._class_bias[labels.to(self.device)]
        w = guidance_weights(guidance, self.guidance_scale, b)
        return self._call(x, sigma, bias, None if w is None else w.to(self.device))

    def conditional_denoiser(self, x: Tensor, sigma: Tensor | float, labels: Tensor) -> Tensor:
        """The exact conditional posterior mean E[x0 | x, class] [B, *shape] (w = 1)."""
        return self(x, sigma, class_labels=labels, guidance=1.0)

    def unconditional_denoiser(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """The exact unconditional posterior mean E[x0 | x] under all classes [B, *shape]."""
        return self._call(x, sigma)

    # Data distribution --------------------------------------------------------------------
    def sample_data(
        self,
        seeds: Sequence[int] | np.ndarray | range,
        *,
        labels: Sequence[int] | np.ndarray | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Exact samples [n, *shape] of the class of each seed (``seed mod C``, or
        ``labels``); row i depends only on seeds[i] (and its class).

        As ``GaussianMixtureDenoiser.sample_data``: per row a standard normal D-vector and
        a uniform from the row's own generator; the uniform picks a component among the
        class's components by their weights. Any C consecutive seeds give a class-balanced
        set, whose statistics are those of the class-balanced pool the evaluator samples.
        """
        seeds = [int(s) for s in seeds]
        cls = class_labels(seeds, self.n_classes) if labels is None else np.asarray(labels)
        if cls.shape != (len(seeds),):
            raise ValueError(f"labels has shape {cls.shape}; expected ({len(seeds)},)")
        if (cls < 0).any() or (cls >= self.n_classes).any():
            raise ValueError(f"labels must lie in 0..{self.n_classes - 1}")
        scale = self.eigvals.sqrt()
        comps = [torch.nonzero(self.component_class == c).squeeze(1) for c in
                 range(self.n_classes)]
        cums = [self.weights[k].cumsum(0) / self.weights[k].sum() for k in comps]
        out = torch.empty((len(seeds), self.dim), dtype=torch.float64)
        g = torch.Generator(device="cpu")
        for row, (s, c) in enumerate(zip(seeds, cls.tolist())):
            g.manual_seed(s)
            eps = torch.randn(self.dim, generator=g, dtype=torch.float64)
            u = torch.rand((), generator=g, dtype=torch.float64)
            j = min(int(torch.searchsorted(cums[c], u, right=True)), comps[c].numel() - 1)
            k = int(comps[c][j])
            out[row] = self.means[k] + self.eigvecs[k] @ (scale[k] * eps)
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None else dtype
        return out.reshape(len(seeds), *self.shape).to(device, dtype)

    def class_mixture(self, c: int) -> GaussianMixtureDenoiser:
        """The mixture of class c alone (its components, weights renormalized), float64."""
        if not 0 <= c < self.n_classes:
            raise ValueError(f"class {c} is out of range; classes are 0..{self.n_classes - 1}")
        k = torch.nonzero(self.component_class == c).squeeze(1)
        return GaussianMixtureDenoiser(
            self.weights[k] / self.weights[k].sum(), self.means[k], self.covs[k],
            shape=self.shape, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
            name=f"{self.name}[{c}]", dtype=torch.float64,
        )

    # Files --------------------------------------------------------------------------------
    def save_npz(self, path: str | Path, **extra: np.ndarray) -> None:
        """Write the parameters, the class of each component and the metadata (``.npz``)."""
        super().save_npz(path, component_class=self.component_class.numpy(),
                         n_classes=np.int64(self.n_classes), **extra)

    @classmethod
    def from_npz(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **overrides: Any,
    ) -> ConditionalGaussianMixture:
        """Load a file written by ``save_npz``; ``overrides`` replace stored fields."""
        arrays, kw = cls.read_npz(path)
        if "component_class" not in arrays:
            raise ValueError(f"{path}: not a class-conditional mixture (no component_class)")
        kw.update(overrides)
        return cls(arrays["weights"], arrays["means"], arrays["covs"],
                   arrays["component_class"], int(arrays["n_classes"]), device=device,
                   dtype=dtype, **kw)

    def __repr__(self) -> str:
        return (
            f"ConditionalGaussianMixture(name={self.name!r}, K={self.n_components}, "
            f"classes={self.n_classes}, D={self.dim}, guidance_scale={self.guidance_scale}, "
            f"dtype={self.dtype})"
        )


class ClassDigitsData:
    """scikit-learn's digits as the exact samples of a class-conditional digits model.

    ``sample_data(seeds)`` gives, for seed s, digit number ``(s // 10) mod n_c`` of class
    ``c = s mod 10`` (in dataset order), scaled to [-1, 1] (``x / 8 - 1``), as
    [len(seeds), 1, 8, 8]: the class the evaluator asks of seed s, and a class-balanced
    pool of real digits for any 10 consecutive seeds. ``labels=`` picks the classes instead.
    """

    n_classes = 10

    def __init__(self) -> None:
        self._by_class: list[Tensor] | None = None

    @property
    def by_class(self) -> list[Tensor]:
        """The digits of each class, float64 [n_c, 1, 8, 8] in [-1, 1] (loaded once)."""
        if self._by_class is None:
            from sklearn.datasets import load_digits

            d = load_digits()
            x = (torch.from_numpy(d.images).to(torch.float64) / 8.0 - 1.0).unsqueeze(1)
            y = torch.from_numpy(d.target)
            self._by_class = [x[y == c] for c in range(self.n_classes)]
        return self._by_class

    def __call__(
        self,
        seeds: Sequence[int] | np.ndarray | range,
        *,
        labels: Sequence[int] | np.ndarray | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        seeds = [int(s) for s in seeds]
        cls = class_labels(seeds, self.n_classes) if labels is None else np.asarray(labels)
        rows = []
        for s, c in zip(seeds, cls.tolist()):
            pool = self.by_class[int(c)]
            rows.append(pool[(s // self.n_classes) % pool.shape[0]])
        out = torch.stack(rows) if rows else torch.empty(0, 1, 8, 8, dtype=torch.float64)
        return out.to(device=device or "cpu", dtype=dtype or torch.float32)
