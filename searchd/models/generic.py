"""Any network as an EDM denoiser: parameterizations, conditioning, and a generic entry point.

A neural denoiser is three things: a network, a *parameterization* (what the network is fed
at a noise level sigma and how its output becomes ``x0_hat``), and optional *conditioning*
(class labels or text embeddings, with classifier-free guidance). All conversions between
the EDM convention ``x = x0 + sigma * n`` and other model families happen here:

- ``edm``: the network is an EDM ``Precond`` and returns ``D(x, sigma)`` itself.
- ``edm_precond``: a raw network ``F`` with EDM's preconditioning applied here:
  ``D = c_skip x + c_out F(c_in x, c_noise)`` (the digits neural zoo).
- ``vp_eps`` / ``vp_v`` / ``vp_x0``: variance-preserving models. With
  ``alpha = 1 / sqrt(1 + sigma^2)`` and ``sigma_vp = sigma * alpha``, the network sees
  ``x_vp = alpha x`` at the model time of sigma (continuous VP-SDE time, or a fractional
  index of a discrete ``alphas_cumprod`` grid, found by interpolating log-sigma); its output
  becomes ``x0 = x - sigma eps`` (eps), ``x0 = alpha x_vp - sigma_vp v`` (v), or ``x0``.
- ``flow``: rectified flow / flow matching, ``x_t = (1 - t) x0 + t n``: ``t = sigma / (1 +
  sigma)``, the network sees ``x / (1 + sigma)`` and its velocity ``v = n - x0`` becomes
  ``x0 = x_t - t v``.

``load_entry_point("package.module:function")`` (or ``"path/to/file.py:function"``) covers any
other codebase (ADM/IDDPM via ``vp_eps`` with their grid): the function returns
``(module, parameterization)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from searchd.models.base import expand_to, sigma_per_sample
from searchd.models.runtime import Runtime, auto_batch_size, prepare_module

# Default noise range of continuous models (EDM's).
EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0


# Time maps: sigma <-> the model's own time ------------------------------------------------
def interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``fp`` over ascending ``xp`` at ``x`` (clamped to the
    end values outside ``[xp[0], xp[-1]]``), like ``numpy.interp``, differentiable in x."""
    x_c = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x_c.detach().contiguous(), right=True).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w = (x_c - x0) / (x1 - x0)
    return f0 + w * (f1 - f0)


class TimeMap(ABC):
    """Maps EDM noise levels to the time value a network is conditioned on, and back."""

    sigma_min: float
    sigma_max: float
    sigma_grid: Tensor | None = None

    @abstractmethod
    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Model time [B] of noise levels sigma [B] (what the network is fed)."""

    @abstractmethod
    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Noise levels [B] of model times t [B]."""


class DiscreteTime(TimeMap):
    """A discrete-time model trained at ``alphas_cumprod[i]``, i = 0..N-1.

    ``sigma_grid`` holds the ascending sigmas ``sqrt((1 - abar) / abar)`` of its N levels;
    a noise level between grid points maps to a fractional index by linear interpolation of
    log-sigma (k-diffusion's convention), multiplied by ``time_scale`` (IDDPM's
    ``rescale_timesteps`` uses 1000 / N). Levels outside the grid clamp to its ends.
    """

    def __init__(
        self, alphas_cumprod: Sequence[float] | np.ndarray | Tensor, time_scale: float = 1.0
    ):
        abar = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        if abar.ndim != 1 or abar.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D array of >= 2 levels; got {abar.shape}")
        if not torch.all((abar > 0) & (abar <= 1)):
            raise ValueError("alphas_cumprod must lie in (0, 1]; clamp a zero-SNR final level")
        sigmas = torch.sqrt((1 - abar) / abar)
        if not torch.all(sigmas[1:] > sigmas[:-1]):
            raise ValueError("alphas_cumprod must be strictly decreasing (sigmas increasing)")
        if not sigmas[0] > 0:
            raise ValueError("alphas_cumprod[0] = 1 gives sigma = 0; drop that level")
        self.time_scale = float(time_scale)
        self.sigma_grid = sigmas  # float64 [N], ascending
        self._log_sigmas = sigmas.log()
        self._index = torch.arange(sigmas.numel(), dtype=torch.float64)
        self.sigma_min = float(sigmas[0])
        self.sigma_max = float(sigmas[-1])

    @classmethod
    def from_sigmas(
        cls, sigmas: Sequence[float] | np.ndarray, time_scale: float = 1.0
    ) -> DiscreteTime:
        """From an ascending sigma grid (e.g. ``searchd.schedules.baselines.GRIDS``)."""
        s = np.asarray(sigmas, dtype=np.float64)
        return cls(1.0 / (1.0 + s**2), time_scale)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        ls = self._log_sigmas.to(sigma.device)
        idx = interp(sigma.to(torch.float64).log(), ls, self._index.to(sigma.device))
        return (idx * self.time_scale).to(sigma.dtype)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        idx = t.to(torch.float64) / self.time_scale
        ls = interp(idx, self._index.to(t.device), self._log_sigmas.to(t.device))
        return ls.exp().to(t.dtype if t.is_floating_point() else torch.float64)


class ContinuousVPTime(TimeMap):
    """The VP-SDE with linear beta(t) = beta_min + t (beta_max - beta_min), t in [eps, 1]:
    ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``. The network is fed
    ``time_scale * t`` (score-SDE DDPM++ and EDM's VPPrecond use 999)."""

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        time_scale: float = 1.0,
        t_min: float = 1e-5,
        t_max: float = 1.0,
    ):
        self.beta_min, self.beta_d = float(beta_min), float(beta_max - beta_min)
        self.time_scale = float(time_scale)
        self.sigma_min = float(
            self.t_to_sigma(torch.tensor(t_min * time_scale, dtype=torch.float64))
        )
        self.sigma_max = float(
            self.t_to_sigma(torch.tensor(t_max * time_scale, dtype=torch.float64))
        )

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        s = sigma.to(torch.float64)
        t = torch.sqrt(self.beta_min**2 + 2 * self.beta_d * torch.log1p(s**2)) - self.beta_min
        return (t / self.beta_d * self.time_scale).to(sigma.dtype)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        u = t.to(torch.float64) / self.time_scale
        return torch.sqrt(torch.expm1(0.5 * self.beta_d * u**2 + self.beta_min * u)).to(t.dtype)


# Parameterizations ------------------------------------------------------------------------
class Parameterization(ABC):
    """What a network is fed at noise level sigma, and how its output becomes ``x0_hat``.

    ``network_inputs(x, sigma)`` -> (network input [B, *shape], conditioning value [B]);
    ``to_x0(x, sigma, out)`` -> ``x0_hat`` [B, *shape] from the (guided) network output.
    ``to_x0`` is affine in ``out``, so classifier-free guidance composed on raw outputs equals
    guidance composed on ``x0_hat``.
    """

    kind: str
    sigma_min: float
    sigma_max: float
    sigma_grid: Tensor | None = None

    @abstractmethod
    def network_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]: ...

    def model_time(self, sigma: Tensor) -> Tensor:
        """The conditioning value [B] the network is fed at noise levels sigma [B]."""
        return self.network_inputs(torch.zeros_like(sigma), sigma)[1]

    @abstractmethod
    def to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor: ...

    def describe(self) -> dict[str, Any]:
        """Plain-data description (reports, ``best.json``)."""
        return {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class EDMDirect(Parameterization):
    """An EDM ``Precond`` network: fed ``(x, sigma)``, returns ``D(x, sigma)`` itself."""

    kind = "edm"

    def __init__(self, sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def network_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return x, sigma

    def to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        return out


class EDMPreconditioned(Parameterization):
    """EDM preconditioning (Karras et al. 2022, Table 1) around a raw network F:
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_skip = sd^2 / (sigma^2 + sd^2)``,
    ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``, ``c_noise = c_noise_scale * log(sigma)``
    (EDM: 1/4; diffusers UNets embed timesteps made for 0..1000, hence a larger scale)."""

    kind = "edm_precond"

    def __init__(
        self,
        sigma_data: float = 0.5,
        c_noise_scale: float = 0.25,
        sigma_min: float = EDM_SIGMA_MIN,
        sigma_max: float = EDM_SIGMA_MAX,
    ):
        self.sigma_data, self.c_noise_scale = float(sigma_data), float(c_noise_scale)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise), each [B]."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return (
            sd2 / total,
            sigma * self.sigma_data / total.sqrt(),
            total.rsqrt(),
            (self.c_noise_scale * sigma.log()),
        )

    def network_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        _, _, c_in, c_noise = self.coefficients(sigma)
        return expand_to(c_in, x) * x, c_noise

    def to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        c_skip, c_out, _, _ = self.coefficients(sigma)
        return expand_to(c_skip, x) * x + expand_to(c_out, x) * out

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "sigma_data": self.sigma_data,
            "c_noise_scale": self.c_noise_scale,
        }


PREDICTIONS: dict[str, str] = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v_prediction": "v_prediction",
    "v": "v_prediction",
    "sample": "sample",
    "x0": "sample",
}


class VariancePreserving(Parameterization):
    """A VP model predicting epsilon, v or the sample, on a continuous or discrete time."""

    def __init__(
        self,
        prediction: str,
        time: TimeMap,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction {prediction!r}; allowed: {sorted(PREDICTIONS)}")
        self.prediction = PREDICTIONS[prediction]
        self.kind = {"epsilon": "vp_eps", "v_prediction": "vp_v", "sample": "vp_x0"}[
            self.prediction
        ]
        self.time = time
        self.sigma_grid = time.sigma_grid
        self.sigma_min = float(time.sigma_min if sigma_min is None else sigma_min)
        self.sigma_max = float(time.sigma_max if sigma_max is None else sigma_max)

    def network_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        alpha = torch.rsqrt(1 + sigma**2)
        return expand_to(alpha, x) * x, self.time.sigma_to_t(sigma)

    def model_time(self, sigma: Tensor) -> Tensor:
        return self.time.sigma_to_t(sigma)

    def to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        if self.prediction == "sample":
            return out
        s = expand_to(sigma, x)
        if self.prediction == "epsilon":
            # x = x0 + sigma eps, so x0 = x - sigma eps (same as (x_vp - sigma_vp eps) / alpha).
            return x - s * out
        # v = alpha eps - sigma_vp x0  =>  x0 = alpha x_vp - sigma_vp v.
        alpha = torch.rsqrt(1 + s**2)
        return alpha * (alpha * x) - (s * alpha) * out

    def describe(self) -> dict[str, Any]:
        d = {**super().describe(), "prediction": self.prediction, "time": type(self.time).__name__}
        if self.sigma_grid is not None:
            d["grid_size"] = int(self.sigma_grid.numel())
        return d


class Flow(Parameterization):
    """Rectified flow / flow matching with ``x_t = (1 - t) x0 + t n`` and velocity
    ``v = n - x0``: ``sigma = t / (1 - t)``. The network is fed ``time_scale * t`` (SD3-style
    models: 1000). ``data_at_one=True`` is the opposite convention (facebookresearch
    flow_matching: ``x_t = t x1 + (1 - t) x0`` with data at t = 1, velocity ``x1 - x0``).

    ``Flow.sigma_to_t`` / ``Flow.t_to_sigma`` convert between searchd's noise levels and the
    flow time of diffusers' ``FlowMatch*`` schedulers and of SD3/Flux pipelines (their
    ``sigmas=``: noise at t = 1, whatever convention the network itself uses). Whether a
    loaded model is a flow model: ``flow_parameterization(denoiser)`` (module level).
    """

    kind = "flow"

    @staticmethod
    def sigma_to_t(sigma: Any) -> Any:
        """Flow time ``t = sigma / (1 + sigma)`` (in [0, 1)) of EDM noise levels ``sigma``
        (a float, NumPy array or tensor of any shape; the result has its type and shape).
        A final 0 stays 0."""
        return sigma / (1 + sigma)

    @staticmethod
    def t_to_sigma(t: Any) -> Any:
        """EDM noise level ``sigma = t / (1 - t)`` of flow times ``t`` in [0, 1) (any shape;
        t = 1, pure noise, is sigma = inf and has no searchd level)."""
        return t / (1 - t)

    def __init__(
        self,
        time_scale: float = 1.0,
        data_at_one: bool = False,
        sigma_min: float = EDM_SIGMA_MIN,
        sigma_max: float = EDM_SIGMA_MAX,
        shift: float = 1.0,
        dynamic_shifting: bool = False,
    ):
        self.time_scale, self.data_at_one = float(time_scale), bool(data_at_one)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        # What the checkpoint's FlowMatch scheduler does to the sigmas= it is given (its
        # config's shift, or a shift from the image size with dynamic shifting): the
        # model itself does not depend on it; handing a schedule to that scheduler does
        # (searchd.schedules.baselines.scheduler_sigmas).
        self.shift, self.dynamic_shifting = float(shift), bool(dynamic_shifting)

    def network_inputs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        t = sigma / (1 + sigma)
        x_flow = x / expand_to(1 + sigma, x)
        return x_flow, self.time_scale * ((1 - t) if self.data_at_one else t)

    def to_x0(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        t = expand_to(sigma / (1 + sigma), x)
        x_flow = x / expand_to(1 + sigma, x)
        # Noise at t = 1: v = n - x0; data at one: u = x0 - n = -v.
        return x_flow + t * out if self.data_at_one else x_flow - t * out

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "time_scale": self.time_scale,
            "data_at_one": self.data_at_one,
            "shift": self.shift,
            "dynamic_shifting": self.dynamic_shifting,
        }


PARAMETERIZATIONS = ("edm", "edm_precond", "vp_eps", "vp_v", "vp_x0", "flow")


def flow_parameterization(denoiser: Any) -> Flow | None:
    """The ``Flow`` parameterization of a loaded rectified-flow model, else None.

    Not None exactly when the denoiser is a network wrapped with ``Flow`` (a diffusers
    checkpoint with a ``FlowMatch*`` scheduler, such as ``digits-flow-s``, or any model given
    ``parameterization: flow``), or a model schedule (``ComposedDenoiser``) whose members all
    are. Use it to tell a flow model apart and to convert its levels:
    ``flow_parameterization(den).sigma_to_t(sigmas)`` gives the ``sigmas=`` a FlowMatch
    scheduler or an SD3/Flux pipeline takes (``Flow.sigma_to_t`` is a static method)."""
    members = getattr(denoiser, "members", None)
    if members is not None:
        flows = [flow_parameterization(m) for m in members]
        return flows[-1] if flows and all(f is not None for f in flows) else None
    param = getattr(denoiser, "param", None)
    return param if isinstance(param, Flow) else None


def make_time(params: Mapping[str, Any]) -> TimeMap:
    """A TimeMap from plain data: ``alphas_cumprod`` (list), ``sigma_grid`` (ascending list),
    or ``grid`` (a name of ``searchd.schedules.baselines.GRIDS``) for discrete time, each
    with ``time_scale``; otherwise continuous VP time (``beta_min``, ``beta_max``,
    ``time_scale``)."""
    p = dict(params)
    scale = float(p.pop("time_scale", 1.0))
    if "alphas_cumprod" in p:
        return DiscreteTime(p.pop("alphas_cumprod"), scale)
    if "sigma_grid" in p:
        return DiscreteTime.from_sigmas(p.pop("sigma_grid"), scale)
    if "grid" in p:
        from searchd.schedules.baselines import GRIDS

        name = p.pop("grid")
        if name not in GRIDS:
            raise ValueError(f"unknown grid {name!r}; known grids: {sorted(GRIDS)}")
        return DiscreteTime.from_sigmas(GRIDS[name](), scale)
    return ContinuousVPTime(
        beta_min=float(p.pop("beta_min", 0.1)),
        beta_max=float(p.pop("beta_max", 20.0)),
        time_scale=scale,
    )


_TIME_KEYS = {"alphas_cumprod", "sigma_grid", "grid", "time_scale", "beta_min", "beta_max"}


def make_parameterization(spec: str | Mapping[str, Any] | Parameterization) -> Parameterization:
    """A Parameterization from a name (``"vp_eps"``), a mapping ``{"kind": ..., **params}``,
    or an instance (returned as is). Unknown names or parameters raise ``ValueError``."""
    if isinstance(spec, Parameterization):
        return spec
    p: dict[str, Any] = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = p.pop("kind", None)
    if kind not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {kind!r}; allowed: {list(PARAMETERIZATIONS)}")
    rng = {k: float(p.pop(k)) for k in ("sigma_min", "sigma_max") if k in p}
    if kind.startswith("vp_"):
        time_params = {k: p.pop(k) for k in list(p) if k in _TIME_KEYS}
        _no_extra(kind, p)
        pred = {"vp_eps": "epsilon", "vp_v": "v_prediction", "vp_x0": "sample"}[kind]
        return VariancePreserving(pred, make_time(time_params), **rng)
    cls: type[Parameterization] = {
        "edm": EDMDirect,
        "edm_precond": EDMPreconditioned,
        "flow": Flow,
    }[kind]
    try:
        return cls(**p, **rng)  # type: ignore[call-arg]
    except TypeError as e:
        raise ValueError(f"bad parameters {sorted(p)} for parameterization {kind!r}: {e}") from None


def _no_extra(kind: str, p: Mapping[str, Any]) -> None:
    if p:
        raise ValueError(f"unknown parameters {sorted(p)} for parameterization {kind!r}")


# Conditioning ----------------------------------------------------------------------------
class Conditioning(ABC):
    """Per-row keyword arguments of the network (class labels, text embeddings).

    Row ``r`` of a call is conditioned on entry ``index[r] mod n`` of the conditioning
    table; ``index`` is the ``sample_index`` keyword of the denoiser call if given, else the
    row position ``0..B-1`` (see ``NetworkDenoiser``).
    """

    n: int

    @abstractmethod
    def kwargs(self, index: Tensor, device: torch.device) -> dict[str, Tensor]:
        """Network keyword arguments for rows with table indices ``index`` [B] (int64)."""

    @abstractmethod
    def unconditional(self, batch: int, device: torch.device) -> dict[str, Tensor] | None:
        """Keyword arguments of ``batch`` unconditional rows (None: no unconditional input)."""


class ClassLabels(Conditioning):
    """Class-conditional models. Row r gets ``labels[index[r] mod len(labels)]``.

    Args:
        num_classes: classes the network knows.
        labels: the label table (default ``0..num_classes-1``: classes in turn).
        one_hot: pass one-hot float vectors [B, num_classes] (EDM) instead of int64 [B].
        null_label: the unconditional label (DiT: ``num_classes``); for one-hot models the
            zero vector is the unconditional input. None: no guidance possible.
        key: the network keyword (``class_labels``).
    """

    def __init__(
        self,
        num_classes: int,
        labels: Sequence[int] | None = None,
        *,
        one_hot: bool = False,
        null_label: int | None = None,
        key: str = "class_labels",
    ):
        self.num_classes = int(num_classes)
        table = list(range(self.num_classes)) if labels is None else [int(v) for v in labels]
        if not table or any(not 0 <= v < self.num_classes for v in table):
            raise ValueError(f"labels {table} must be a non-empty list in [0, {num_classes})")
        self.table = torch.tensor(table, dtype=torch.int64)
        self.n = len(table)
        self.one_hot, self.null_label, self.key = bool(one_hot), null_label, key

    def _encode(self, labels: Tensor, device: torch.device) -> Tensor:
        if self.one_hot:
            return torch.nn.functional.one_hot(labels, self.num_classes).to(device, torch.float32)
        return labels.to(device)

    def kwargs(self, index: Tensor, device: torch.device) -> dict[str, Tensor]:
        return {self.key: self._encode(self.table[index.cpu() % self.n], device)}

    def unconditional(self, batch: int, device: torch.device) -> dict[str, Tensor] | None:
        if self.one_hot:
            return {self.key: torch.zeros(batch, self.num_classes, device=device)}
        if self.null_label is None:
            return None
        return {self.key: torch.full((batch,), self.null_label, dtype=torch.int64, device=device)}


class TextEmbeddings(Conditioning):
    """Text-conditioned models: prompt embeddings computed once at load time.

    Args:
        cond: encoder hidden states of the P prompts [P, L, D].
        uncond: encoder hidden states of the negative (empty) prompt [1, L, D] or [P, L, D].
        key: the network keyword (``encoder_hidden_states``).
        pooled, uncond_pooled: pooled prompt embeddings [P, D'] and of the negative prompt
            [1, D'] or [P, D'] (SD3's ``pooled_projections``), passed as ``pooled_key``;
            None for networks that take none.
    """

    def __init__(
        self,
        cond: Tensor,
        uncond: Tensor | None = None,
        key: str = "encoder_hidden_states",
        *,
        pooled: Tensor | None = None,
        uncond_pooled: Tensor | None = None,
        pooled_key: str = "pooled_projections",
    ):
        if cond.ndim != 3:
            raise ValueError(f"prompt embeddings must be [P, L, D]; got {tuple(cond.shape)}")
        if uncond is not None and (uncond.ndim != 3 or uncond.shape[1:] != cond.shape[1:]):
            raise ValueError(
                f"negative embeddings {tuple(uncond.shape)} do not match {tuple(cond.shape)}"
            )
        if pooled is not None and (pooled.ndim != 2 or pooled.shape[0] != cond.shape[0]):
            raise ValueError(f"pooled embeddings must be [P, D] with P = {cond.shape[0]}; got "
                             f"{tuple(pooled.shape)}")
        if (uncond is not None and pooled is not None) and (
            uncond_pooled is None or uncond_pooled.shape[1:] != pooled.shape[1:]
        ):
            raise ValueError("a model with pooled embeddings needs the negative prompt's too")
        self.cond, self.uncond, self.key = (
            cond.detach(),
            None if uncond is None else uncond.detach(),
            key,
        )
        self.pooled = None if pooled is None else pooled.detach()
        self.uncond_pooled = None if uncond_pooled is None else uncond_pooled.detach()
        self.pooled_key = pooled_key
        self.n = cond.shape[0]

    def kwargs(self, index: Tensor, device: torch.device) -> dict[str, Tensor]:
        self.cond = self.cond.to(device)
        rows = index.to(device) % self.n
        out = {self.key: self.cond[rows]}
        if self.pooled is not None:
            self.pooled = self.pooled.to(device)
            out[self.pooled_key] = self.pooled[rows]
        return out

    def unconditional(self, batch: int, device: torch.device) -> dict[str, Tensor] | None:
        if self.uncond is None:
            return None
        self.uncond = self.uncond.to(device)
        rows = torch.arange(batch, device=device)
        out = {self.key: self.uncond[rows % self.uncond.shape[0]]}
        if self.uncond_pooled is not None:
            self.uncond_pooled = self.uncond_pooled.to(device)
            out[self.pooled_key] = self.uncond_pooled[rows % self.uncond_pooled.shape[0]]
        return out


# Calling conventions ---------------------------------------------------------------------
NetworkCall = Callable[[nn.Module, Tensor, Tensor, dict[str, Tensor]], Any]


def call_positional(net: nn.Module, x: Tensor, t: Tensor, kw: dict[str, Tensor]) -> Any:
    """``net(x, t, **kw)``: EDM ``Precond`` (t = sigma), ADM/IDDPM, most research code."""
    return net(x, t, **kw)


def call_timestep_keyword(net: nn.Module, x: Tensor, t: Tensor, kw: dict[str, Tensor]) -> Any:
    """``net(x, timestep=t, **kw)``: diffusers UNets and transformers."""
    return net(x, timestep=t, **kw)


def output_tensor(out: Any) -> Tensor:
    """The prediction in a network's return value: a tensor, ``.sample``, or element 0."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find the prediction in a {type(out).__name__} network output")


# The denoiser ----------------------------------------------------------------------------
class NetworkDenoiser:
    """A neural network wrapped as ``D(x, sigma) -> x0_hat`` (the ``Denoiser`` protocol).

    Args:
        net: the network (a ``torch.nn.Module``).
        parameterization: how inputs and outputs relate to the EDM denoiser.
        shape: shape of one sample, e.g. ``(3, 32, 32)`` (latent shape for latent models).
        call: calling convention ``call(net, x_in, t, kwargs) -> output``.
        conditioning: class labels or text embeddings, or None.
        guidance_scale: classifier-free guidance weight w: ``out = u + w (c - u)`` with c/u
            the conditional/unconditional outputs of one batched call; 1 means no guidance
            (one call of B rows). Solvers never see it.
        runtime: device, precision, layout, compilation and batch size (``runtime.py``).
        cost: relative cost of one call per sample (doubled by guidance by the adapters).
        name: for messages and reports.
        decode: latent models: ``decode(latents [B, *shape]) -> images [B, C, H, W]`` in
            [-1, 1], applied before features are taken; None for pixel-space models.

    A call takes ``x`` [B, *shape] and ``sigma`` [B] (or a scalar), optionally
    ``sample_index`` (int64 [B]): the conditioning of row r is entry ``sample_index[r] mod n``
    of the conditioning table; without it, the row position r. And optionally ``guidance``
    (float [B]): the guidance weight of each row, in place of ``guidance_scale`` (a guidance
    schedule's weights for the step); rows with weight 1 get the conditional output alone
    and cost one network row, the others two. The result has ``x``'s dtype
    and device; the parameterization runs in float32 (float64 if ``x`` is float64), the
    network in the runtime's precision, in chunks of at most ``batch_size`` rows.
    """

    def __init__(
        self,
        net: nn.Module,
        parameterization: Parameterization,
        shape: Sequence[int],
        *,
        call: NetworkCall = call_positional,
        conditioning: Conditioning | None = None,
        guidance_scale: float = 1.0,
        runtime: Runtime | None = None,
        cost: float = 1.0,
        name: str = "network",
        decode: Callable[[Tensor], Tensor] | None = None,
    ):
        self.runtime = (runtime or Runtime()).resolve()
        self.module = net
        self.net = prepare_module(net, self.runtime)
        self.param = parameterization
        self.shape = tuple(int(s) for s in shape)
        self.call = call
        self.conditioning = conditioning
        self.guidance_scale = float(guidance_scale)
        if self.guided and (
            conditioning is None or conditioning.unconditional(1, torch.device("cpu")) is None
        ):
            raise ValueError(
                f"guidance_scale = {guidance_scale} needs conditioning with an unconditional "
                "input (a null class, one-hot labels, or negative-prompt embeddings)"
            )
        self.sigma_min = float(parameterization.sigma_min)
        self.sigma_max = float(parameterization.sigma_max)
        self.sigma_grid = parameterization.sigma_grid
        self.cost = float(cost)
        self.name = name
        self.decode = decode
        self._batch: int | None = None

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def conditional(self) -> bool:
        """Rows are conditioned (class labels, prompts), picked by ``sample_index``."""
        return self.conditioning is not None

    @property
    def supports_guidance(self) -> bool:
        """Per-row guidance weights are possible: there is an unconditional input."""
        return (
            self.conditioning is not None
            and self.conditioning.unconditional(1, torch.device("cpu")) is not None
        )

    @property
    def device(self) -> torch.device:
        return self.runtime.torch_device

    @property
    def batch_size(self) -> int:
        """Rows per network call (found on first use when the runtime says ``"auto"``)."""
        if self._batch is None:
            self._batch = auto_batch_size(self._probe, self.runtime)
        return self._batch

    def _probe(self, rows: int) -> None:
        """One network call of ``rows`` rows of the sample shape (automatic batch size)."""
        x = torch.randn((rows, *self.shape), device=self.device)
        sigma = torch.full((rows,), self.sigma_max, device=self.device)
        x_in, t = self.param.network_inputs(x, sigma)
        kw = self._kwargs(torch.arange(rows))
        with self.runtime.context():
            self._forward(x_in, t, kw)

    def _kwargs(self, index: Tensor) -> dict[str, Tensor]:
        if self.conditioning is None:
            return {}
        return self.conditioning.kwargs(index, self.device)

    def _forward(self, x_in: Tensor, t: Tensor, kw: dict[str, Tensor]) -> Tensor:
        """The network on prepared inputs; output [rows, *shape] in float32 (float64 for a
        float64 network). Time values go in float32 at least: a half-precision fractional
        timestep near 1000 would be rounded to a multiple of 0.5."""
        out = output_tensor(
            self.call(
                self.net,
                self.runtime.input_tensor(x_in),
                t.to(self.device, self.runtime.io_dtype if t.is_floating_point() else t.dtype),
                {
                    k: self.runtime.input_tensor(v) if v.is_floating_point() else v
                    for k, v in kw.items()
                },
            )
        )
        c = self.shape[0]
        if out.ndim == x_in.ndim and out.shape[1] == 2 * c and x_in.shape[1] == c:
            out = out[:, :c]  # learned variance (ADM, IDDPM, DiT): keep the mean prediction
        return out.to(self.runtime.io_dtype)

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor | float,
        *,
        sample_index: Tensor | None = None,
        guidance: Tensor | float | None = None,
    ) -> Tensor:
        """Denoise ``x`` [B, *shape] at noise levels ``sigma`` [B] -> ``x0_hat`` [B, *shape]."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"x has sample shape {tuple(x.shape[1:])}; {self.name} takes {self.shape}"
            )
        sigma = sigma_per_sample(sigma, x)
        b = x.shape[0]
        index = torch.arange(b) if sample_index is None else sample_index.to(torch.int64).cpu()
        if index.shape != (b,):
            raise ValueError(f"sample_index has shape {tuple(index.shape)}; expected ({b},)")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        xw = x.to(self.device, work)
        sw = sigma.to(self.device, work)
        grad = torch.is_grad_enabled() and (x.requires_grad or sigma.requires_grad)
        x_in, t = self.param.network_inputs(xw, sw)
        weights = None
        if guidance is not None:
            if not self.supports_guidance:
                raise ValueError(
                    f"{self.name}: guidance weights need conditioning with an unconditional "
                    "input (a null class, one-hot labels, or negative-prompt embeddings)"
                )
            weights = torch.as_tensor(guidance, dtype=torch.float64).detach().cpu()
            weights = weights.expand(b) if weights.ndim == 0 else weights
            if weights.shape != (b,):
                raise ValueError(f"guidance has shape {tuple(weights.shape)}; expected ({b},)")
        out = self._run(x_in, t, index, grad, weights)
        return self.param.to_x0(xw, sw, out.to(work)).to(dtype=x.dtype, device=x.device)

    def _run(
        self, x_in: Tensor, t: Tensor, index: Tensor, grad: bool, weights: Tensor | None = None
    ) -> Tensor:
        """The (guided) network output [B, *shape] for all rows, in chunks; ``weights``
        (float64 [B]): per-row guidance weights in place of ``guidance_scale``."""
        b = x_in.shape[0]
        guided = self.guided if weights is None else bool((weights != 1).any())
        chunk = self.batch_size // (2 if guided else 1) or 1
        outs = []
        with self.runtime.context(grad=grad):
            for lo in range(0, b, chunk):
                sl = slice(lo, min(lo + chunk, b))
                xs, ts = x_in[sl], t[sl]
                kw = self._kwargs(index[sl])
                if weights is not None:
                    outs.append(self._guided_rows(xs, ts, kw, weights[sl]))
                    continue
                if not self.guided:
                    outs.append(self._forward(xs, ts, kw))
                    continue
                unc = self.conditioning.unconditional(xs.shape[0], self.device)  # type: ignore[union-attr]
                both = {k: torch.cat([kw[k], unc[k]]) for k in kw}  # type: ignore[index]
                out = self._forward(torch.cat([xs, xs]), torch.cat([ts, ts]), both)
                c, u = out.chunk(2)
                # Classifier-free guidance on the raw prediction (equal to guidance on x0).
                outs.append(u + self.guidance_scale * (c - u))
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        return out.clone() if not grad and self.runtime.inference_mode else out

    def _guided_rows(
        self, xs: Tensor, ts: Tensor, kw: dict[str, Tensor], w: Tensor
    ) -> Tensor:
        """Per-row guidance on one chunk: every row's conditional output, and an
        unconditional one only for the rows with w != 1, in one network call."""
        need = (w != 1).nonzero().squeeze(1)
        if need.numel() == 0:
            return self._forward(xs, ts, kw)
        nd = need.to(xs.device)
        unc = self.conditioning.unconditional(need.numel(), self.device)  # type: ignore[union-attr]
        both = {k: torch.cat([kw[k], unc[k]]) for k in kw}  # type: ignore[index]
        out = self._forward(torch.cat([xs, xs[nd]]), torch.cat([ts, ts[nd]]), both)
        c, u = out[: xs.shape[0]], out[xs.shape[0] :]
        wn = w[need].to(out.device, out.dtype).reshape((-1,) + (1,) * (out.ndim - 1))
        guided = c.clone()
        # Classifier-free guidance on the raw prediction (equal to guidance on x0).
        guided[nd] = u + wn * (c[nd] - u)
        return guided

    def model_time(self, sigma: Tensor | float) -> Tensor:
        """The time value [B] the network is fed at noise levels sigma (a discrete model's
        fractional timestep index, a flow model's scaled t, EDM's c_noise...)."""
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        return self.param.model_time(s)

    def describe(self) -> dict[str, Any]:
        """Plain data for reports."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "cost": self.cost,
            "guidance_scale": self.guidance_scale,
            **self.param.describe(),
        }


# Generic entry point ---------------------------------------------------------------------
# Untrusted code ---------------------------------------------------------------------------
# Model kinds whose loading runs code from the user's file (a pickle, an entry point).
UNTRUSTED_KINDS = ("edm", "generic")
TRUST_FLAG = "--trust-remote-code (or model.trust_remote_code: true in the configuration)"


class UntrustedCodeError(ValueError):
    """A model would run code from a file or module that was not declared trusted."""


def require_trust(what: str, trusted: bool) -> None:
    """Refuse, on one line, to run code from ``what`` unless ``trusted``.

    An EDM pickle is unpickled (``pickle`` calls whatever the file names) and a generic entry
    point is imported and called: both run arbitrary code with the user's rights. As with
    transformers' ``trust_remote_code``, that needs an explicit opt-in; ``what`` says what
    would run (e.g. ``"the EDM pickle x.pkl (unpickling runs the code it names)"``).
    """
    if not trusted:
        raise UntrustedCodeError(
            f"not loading {what}: it runs code with your rights; if you trust it, pass "
            f"{TRUST_FLAG}"
        )


def import_target(target: str) -> Callable[..., Any]:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the function."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"entry point {target!r} must be 'module:function' or 'file.py:function'")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"entry point file {path} does not exist")
        name = f"searchd_entry_{path.stem}_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"entry point {target!r} is not callable")
    return fn


def load_entry_point(
    target: str,
    options: Mapping[str, Any] | None = None,
    *,
    runtime: Runtime | None = None,
    name: str | None = None,
    trust_remote_code: bool = False,
) -> NetworkDenoiser:
    """A denoiser from a user function returning ``(module, parameterization)``.

    Importing and calling ``target`` runs its code: ``trust_remote_code=True`` is required
    (else ``UntrustedCodeError``, before anything is imported).

    ``parameterization`` is a name of ``PARAMETERIZATIONS``, a mapping ``{"kind": ...,
    **params}`` (e.g. ``{"kind": "vp_eps", "grid": "iddpm_cosine", "time_scale": 0.25}``,
    ``{"kind": "vp_eps", "alphas_cumprod": [...]}``), or a ``Parameterization``; it may also
    hold ``shape`` and ``num_classes``/``labels``/``one_hot``/``null_label`` (class labels).

    ``options`` (the model spec's options): ``args`` (keyword arguments of the function),
    ``parameterization`` (overrides the returned one's entries), ``shape``, ``call``
    (``"positional"``: ``net(x, t, **kw)``, default; ``"timestep"``: ``net(x, timestep=t)``),
    ``guidance_scale``, ``cost``, ``runtime`` (``Runtime.from_options``). The shape comes
    from the options, the parameterization mapping, or the module's ``img_channels`` and
    ``img_resolution`` attributes (EDM/ADM conventions), in that order.
    """
    require_trust(f"the entry point {target!r} (imported and called)", trust_remote_code)
    opts = dict(options or {})
    fn = import_target(target)
    result = fn(**dict(opts.pop("args", {}) or {}))
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ValueError(f"entry point {target!r} must return (torch module, parameterization)")
    module, param_spec = result
    info: dict[str, Any] = (
        {"kind": param_spec}
        if isinstance(param_spec, str)
        else dict(param_spec)
        if isinstance(param_spec, Mapping)
        else {}
    )
    info.update(opts.pop("parameterization", {}) or {})
    shape = opts.pop("shape", None) or info.pop("shape", None) or module_shape(module)
    if shape is None:
        raise ValueError(f"entry point {target!r}: give the sample shape (options.shape)")
    cond = class_conditioning(info, opts)
    param = param_spec if isinstance(param_spec, Parameterization) else make_parameterization(info)
    call_name = opts.pop("call", "positional")
    calls = {"positional": call_positional, "timestep": call_timestep_keyword}
    if call_name not in calls:
        raise ValueError(f"call = {call_name!r}; allowed: {sorted(calls)}")
    rt = runtime or Runtime.from_options(opts.pop("runtime", None))
    guidance = float(opts.pop("guidance_scale", 1.0))
    cost = float(opts.pop("cost", 1.0)) * (2.0 if guidance != 1.0 else 1.0)
    _no_extra(f"entry point {target!r} options", opts)
    return NetworkDenoiser(
        module,
        param,
        shape,
        call=calls[call_name],
        conditioning=cond,
        guidance_scale=guidance,
        runtime=rt,
        cost=cost,
        name=name or target.rpartition(":")[2],
    )


def module_shape(module: nn.Module) -> tuple[int, int, int] | None:
    """``(img_channels, img_resolution, img_resolution)`` of EDM/ADM-style modules, or None."""
    c = getattr(module, "img_channels", None)
    r = getattr(module, "img_resolution", None)
    if isinstance(c, int) and isinstance(r, int):
        return (c, r, r)
    return None


def class_conditioning(info: dict[str, Any], opts: dict[str, Any]) -> ClassLabels | None:
    """Class labels from ``num_classes`` (+ ``labels``, ``one_hot``, ``null_label``), popped
    from the parameterization info and the options (options win); None if absent."""
    keys = ("num_classes", "labels", "one_hot", "null_label")
    got = {k: info.pop(k) for k in keys if k in info}
    got.update({k: opts.pop(k) for k in keys if k in opts})
    if not got.get("num_classes"):
        if got.get("labels") is not None:
            raise ValueError("labels need num_classes")
        return None
    return ClassLabels(
        int(got["num_classes"]),
        got.get("labels"),
        one_hot=bool(got.get("one_hot", False)),
        null_label=got.get("null_label"),
    )
