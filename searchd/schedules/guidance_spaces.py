"""Guidance schedules: classifier-free guidance weights per step, searched with the timesteps.

A guided schedule is a timestep schedule plus one weight w per step (``Schedule.guidance``):
the denoiser of step i returns ``u + w_i (c - u)``, and a step with w_i = 1 makes no
unconditional call (``searchd.solvers.network_calls`` counts the calls). The weight of a
step belongs to its first noise level ``sigmas[i]`` (every call of the step uses it,
including Heun's correction at ``sigmas[i + 1]``), as in the reference code of the guidance
interval paper (Kynkaanniemi et al., NeurIPS 2024: ``guidance-interval/sampling``).

``GuidedSpace(timesteps, part)`` joins a timestep space (``ContinuousSpace``,
``DiscreteSpace``, or ``FixedTimesteps``) with one of three guidance parts:

- ``ConstantGuidance(w)``: every step w (no parameter): searched timesteps, constant w;
- ``IntervalGuidance(w, ...)``: w on the steps whose level lies in (sigma_lo, sigma_hi], 1
  outside (the paper's family): two parameters, three if w is searched too;
- ``StepGuidance(w_min, w_max)``: a free weight per step (N parameters), snapped to exactly
  1 within ``one_band`` so that the search can switch a step's unconditional call off.

Like every space, its flat form is ``u0 .. u{dim-1}`` in [0, 1] (the timestep space's
parameters first), every point decodes to a valid schedule, and evolution, random and
Bayesian search use it unchanged. Mutation moves the timestep half and the guidance half
each with probability 1/2 (at least one), as ``JointSpace`` does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from searchd.schedule import Schedule
from searchd.schedules.spaces import (
    ContinuousSpace,
    DiscreteSpace,
    _VectorSpace,
    halves_to_mutate,
    reflect_unit,
    with_meta,
)

# The guidance interval of the paper's FID-optimal EDM2-XXL setting on ImageNet-512 (its
# code's README: --guidance_interval=[17, 22] --guidance_scale=2.0, i.e. steps 17..22 of
# EDM's 32-step schedule, levels 1.609 .. 0.283): w = 2 for sigma in (0.28, 1.61].
PAPER_INTERVAL: dict[str, float] = {"w": 2.0, "sigma_lo": 0.28, "sigma_hi": 1.61}


def with_guidance(schedule: Schedule, weights: Sequence[float] | np.ndarray | None,
                  **meta: Any) -> Schedule:
    """``schedule`` with these guidance weights [N] (None: none), ``meta`` merged."""
    merged = {**dict(schedule.meta), **meta}
    return dataclasses.replace(
        schedule, meta=merged,
        guidance=None if weights is None else np.asarray(weights, dtype=np.float64),
    )


def strip_guidance(schedule: Schedule) -> Schedule:
    """The same timesteps (and models) without guidance weights (meta kept)."""
    return dataclasses.replace(schedule, guidance=None)


def step_levels(sigmas: np.ndarray) -> np.ndarray:
    """The noise level that decides each step's weight: its first level, [N]."""
    return np.asarray(sigmas, dtype=np.float64)[:-1]


def interval_weights(sigmas: Sequence[float] | np.ndarray, w: float, sigma_lo: float,
                     sigma_hi: float) -> np.ndarray:
    """w on the steps whose level lies in (sigma_lo, sigma_hi], 1 elsewhere, float64 [N]."""
    lv = step_levels(np.asarray(sigmas))
    inside = (lv > sigma_lo) & (lv <= sigma_hi)
    return np.where(inside, float(w), 1.0)


def constant_guidance(schedule: Schedule, w: float) -> Schedule:
    """Constant guidance: every step of ``schedule`` gets weight w."""
    return with_guidance(schedule, np.full(schedule.n_steps, float(w)),
                         guidance_family="constant", guidance_w=float(w))


def interval_guidance(schedule: Schedule, w: float = PAPER_INTERVAL["w"],
                      sigma_lo: float = PAPER_INTERVAL["sigma_lo"],
                      sigma_hi: float = PAPER_INTERVAL["sigma_hi"]) -> Schedule:
    """Guidance in a limited interval: w on the steps in (sigma_lo, sigma_hi], 1 outside
    (defaults: the paper's EDM2 setting, ``PAPER_INTERVAL``)."""
    if not (0 <= sigma_lo <= sigma_hi):
        raise ValueError(f"need 0 <= sigma_lo <= sigma_hi; got {sigma_lo}, {sigma_hi}")
    return with_guidance(schedule, interval_weights(schedule.sigmas, w, sigma_lo, sigma_hi),
                         guidance_family="interval", guidance_w=float(w),
                         guidance_interval=[float(sigma_lo), float(sigma_hi)])


# Timesteps that do not move ---------------------------------------------------------------
class FixedTimesteps(_VectorSpace):
    """One fixed timestep schedule (no parameter): for searching the guidance alone."""

    def __init__(self, sigmas: Sequence[float] | np.ndarray, *, solver: str = "dpmpp_2m"):
        base = Schedule(np.asarray(sigmas, dtype=np.float64), solver=solver)
        self.sigmas = base.sigmas
        self.n_steps = base.n_steps
        self.final_zero = base.final_zero
        self.solver = solver
        self.sigma_max = float(base.sigmas[0])
        self.sigma_min = float(base.sigmas[-2] if base.final_zero else base.sigmas[-1])

    @property
    def dim(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        return {"kind": "fixed", "sigmas": [float(s) for s in self.sigmas],
                "solver": self.solver}

    def _decode_vector(self, u: np.ndarray) -> Schedule:
        return Schedule(self.sigmas, solver=self.solver)

    def encode(self, schedule: Schedule) -> np.ndarray:
        self.check(schedule)
        return np.empty(0)

    def mutate(self, schedule: Schedule, rng: np.random.Generator, m_prob: float,
               scale: float = 0.1) -> Schedule:
        return self._decode_vector(np.empty(0))

    def crossover(self, a: Schedule, b: Schedule, rng: np.random.Generator) -> Schedule:
        return self._decode_vector(np.empty(0))

    def check(self, schedule: Schedule) -> Schedule:
        self._check_shape(schedule)
        if not np.array_equal(schedule.sigmas, self.sigmas):
            raise ValueError(
                f"schedule {schedule.id} has other noise levels than the fixed timesteps "
                f"{[float(s) for s in self.sigmas]}"
            )
        return schedule


# Guidance parts ---------------------------------------------------------------------------
def _check_range(name: str, lo: float, hi: float) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"{name} = [{lo!r}, {hi!r}]; need 0 <= low < high, finite")


class GuidancePart:
    """The guidance half of a ``GuidedSpace``: parameters u [dim] <-> weights [N]."""

    dim: int = 0

    def weights(self, u: np.ndarray, sigmas: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Weights [N] of parameters ``u`` [dim] on ``sigmas``, and provenance for meta."""
        raise NotImplementedError

    def encode(self, schedule: Schedule) -> np.ndarray:
        """Parameters [dim] that give ``schedule``'s weights on its own levels (projected if
        it has none of this family)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class ConstantGuidance(GuidancePart):
    """Every step the same weight w (no parameter)."""

    def __init__(self, w: float) -> None:
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"w = {w!r}; guidance weights must be finite and >= 0")
        self.w = float(w)

    def weights(self, u: np.ndarray, sigmas: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        n = len(sigmas) - 1
        return np.full(n, self.w), {"guidance_family": "constant", "guidance_w": self.w}

    def encode(self, schedule: Schedule) -> np.ndarray:
        return np.empty(0)

    def describe(self) -> dict[str, Any]:
        return {"kind": "constant", "w": self.w}


class IntervalGuidance(GuidancePart):
    """w on the steps in (sigma_lo, sigma_hi], 1 outside.

    Parameters: ``u_lo``, ``u_hi`` (and ``u_w`` first when w is a range). In log sigma over
    [log(sigma_min / 2), log sigma_max]: ``lo = L0 + u_lo (L1 - L0)`` and ``hi = lo + u_hi
    (L1 - lo)``, so every point gives lo <= hi, the interval can hold every step (lo below
    sigma_min, hi = sigma_max) or none, and the map is one-to-one.

    Args:
        w: a fixed weight, or a range ``(w_min, w_max)`` searched linearly.
        sigma_min, sigma_max: the model's noise range.
    """

    def __init__(self, w: float | Sequence[float], sigma_min: float, sigma_max: float) -> None:
        if isinstance(w, (int, float)):
            ConstantGuidance(float(w))
            self.w_range: tuple[float, float] | None = None
            self.w = float(w)
        else:
            lo, hi = (float(v) for v in w)
            _check_range("w", lo, hi)
            self.w_range, self.w = (lo, hi), float("nan")
        if not (0 < sigma_min < sigma_max < math.inf):
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._l0 = math.log(self.sigma_min / 2)
        self._l1 = math.log(self.sigma_max)
        self.dim = 2 if self.w_range is None else 3

    def _w_of(self, u: float) -> float:
        lo, hi = self.w_range  # type: ignore[misc]
        return lo + u * (hi - lo)

    def interval(self, u: np.ndarray) -> tuple[float, float, float]:
        """(w, sigma_lo, sigma_hi) of parameters u."""
        k = 0 if self.w_range is None else 1
        w = self.w if self.w_range is None else self._w_of(float(u[0]))
        log_lo = self._l0 + float(u[k]) * (self._l1 - self._l0)
        log_hi = log_lo + float(u[k + 1]) * (self._l1 - log_lo)
        # The ends of the cube are the ends of the range exactly (exp(log(x)) may miss x by
        # an ulp, which would leave the top step out of an interval meant to hold it).
        lo = self.sigma_min / 2 if float(u[k]) <= 0.0 else math.exp(log_lo)
        hi = self.sigma_max if float(u[k + 1]) >= 1.0 else math.exp(log_hi)
        return w, lo, max(lo, hi)

    def weights(self, u: np.ndarray, sigmas: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        w, lo, hi = self.interval(u)
        return interval_weights(sigmas, w, lo, hi), {
            "guidance_family": "interval", "guidance_w": w, "guidance_interval": [lo, hi]}

    def _u_of(self, w: float, lo: float, hi: float) -> np.ndarray:
        log_lo = min(max(math.log(max(lo, 1e-300)), self._l0), self._l1)
        log_hi = min(max(math.log(max(hi, 1e-300)), log_lo), self._l1)
        span = self._l1 - log_lo
        u_hi = (log_hi - log_lo) / span if span > 0 else 0.0
        u = [(log_lo - self._l0) / (self._l1 - self._l0), u_hi]
        if self.w_range is not None:
            a, b = self.w_range
            u = [min(max((w - a) / (b - a), 0.0), 1.0), *u]
        return np.clip(np.asarray(u, dtype=np.float64), 0.0, 1.0)

    def encode(self, schedule: Schedule) -> np.ndarray:
        """The interval recorded in the schedule's meta when it reproduces its weights;
        otherwise the interval from the first to the last guided step (boundaries halfway,
        in log sigma, to the neighbouring levels) with their mean weight."""
        meta = schedule.meta
        if schedule.guidance is not None and "guidance_interval" in meta:
            lo, hi = (float(v) for v in meta["guidance_interval"])
            u = self._u_of(float(meta.get("guidance_w", self.w)), lo, hi)
            if np.array_equal(self.weights(u, schedule.sigmas)[0], schedule.guidance):
                return u
        lv = step_levels(schedule.sigmas)
        g = schedule.guidance if schedule.guidance is not None else np.ones(lv.size)
        on = np.flatnonzero(g != 1.0)
        if on.size == 0:
            return self._u_of(self.w if self.w_range is None else 1.0, self.sigma_min / 2,
                              self.sigma_min / 2)
        a, b = int(on[0]), int(on[-1])
        hi = self.sigma_max if a == 0 else math.sqrt(lv[a] * lv[a - 1])
        lo = (math.sqrt(lv[b] * lv[b + 1]) if b + 1 < lv.size
              else max(lv[b] / 2, self.sigma_min / 2))
        return self._u_of(float(np.mean(g[on])), lo, hi)

    def describe(self) -> dict[str, Any]:
        w: Any = list(self.w_range) if self.w_range is not None else self.w
        return {"kind": "interval", "w": w, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max}


class StepGuidance(GuidancePart):
    """A free weight per step: ``w_i = w_min + u_i (w_max - w_min)``, set to exactly 1 when
    within ``one_band`` of 1 (so a search can drop a step's unconditional call).

    Args:
        n_steps: N.
        w_range: (w_min, w_max).
        one_band: weights within this distance of 1 become 1 (0: never).
    """

    def __init__(self, n_steps: int, w_range: Sequence[float] = (0.0, 4.0),
                 one_band: float = 0.05) -> None:
        lo, hi = (float(v) for v in w_range)
        _check_range("w_range", lo, hi)
        if not (0 <= one_band < (hi - lo) / 2):
            raise ValueError(f"one_band = {one_band!r}; need 0 <= one_band < (w_max - w_min) / 2")
        self.w_range = (lo, hi)
        self.one_band = float(one_band)
        self.dim = int(n_steps)

    def weights(self, u: np.ndarray, sigmas: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        lo, hi = self.w_range
        w = lo + np.asarray(u, dtype=np.float64) * (hi - lo)
        w = np.where(np.abs(w - 1.0) <= self.one_band, 1.0, w)
        return w, {"guidance_family": "steps"}

    def encode(self, schedule: Schedule) -> np.ndarray:
        lo, hi = self.w_range
        g = schedule.guidance if schedule.guidance is not None else np.ones(self.dim)
        return np.clip((np.asarray(g, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)

    def describe(self) -> dict[str, Any]:
        return {"kind": "steps", "w_range": list(self.w_range), "one_band": self.one_band}


# The joint space ----------------------------------------------------------------------------
class GuidedSpace(_VectorSpace):
    """Timesteps and guidance weights searched together.

    Args:
        timesteps: a ``ContinuousSpace``, ``DiscreteSpace`` or ``FixedTimesteps``.
        guidance: a ``GuidancePart`` (``ConstantGuidance``, ``IntervalGuidance``,
            ``StepGuidance``).

    Parameters: the timestep space's, then the guidance part's.
    """

    def __init__(self, timesteps: ContinuousSpace | DiscreteSpace | FixedTimesteps,
                 guidance: GuidancePart) -> None:
        if not isinstance(timesteps, (ContinuousSpace, DiscreteSpace, FixedTimesteps)):
            raise ValueError(
                f"timesteps is a {type(timesteps).__name__}; a guided space takes a "
                "ContinuousSpace, DiscreteSpace or FixedTimesteps"
            )
        if not isinstance(guidance, GuidancePart):
            raise ValueError(f"guidance is a {type(guidance).__name__}; expected a GuidancePart")
        if isinstance(guidance, StepGuidance) and guidance.dim != timesteps.n_steps:
            raise ValueError(
                f"StepGuidance has {guidance.dim} weights; the timesteps have "
                f"{timesteps.n_steps} steps"
            )
        self.timesteps = timesteps
        self.guidance = guidance
        self.n_steps = timesteps.n_steps
        self.final_zero = timesteps.final_zero
        self.solver = timesteps.solver
        self.sigma_min = timesteps.sigma_min
        self.sigma_max = timesteps.sigma_max

    @property
    def dim(self) -> int:
        return self.timesteps.dim + self.guidance.dim

    def describe(self) -> dict[str, Any]:
        return {"kind": "guided", "timesteps": self.timesteps.describe(),
                "guidance": self.guidance.describe()}

    def __repr__(self) -> str:
        return f"GuidedSpace({self.describe()})"

    def _join(self, times: Schedule, ug: np.ndarray) -> Schedule:
        w, meta = self.guidance.weights(ug, times.sigmas)
        return with_guidance(times, w, **meta)

    def _decode_vector(self, u: np.ndarray) -> Schedule:
        k = self.timesteps.dim
        return self._join(self.timesteps._decode_vector(u[:k]), u[k:])

    def encode(self, schedule: Schedule) -> np.ndarray:
        """Parameters of ``schedule``: its timesteps' and its guidance's (projected onto the
        family when they are not of it)."""
        times = strip_guidance(schedule)
        return np.concatenate([self.timesteps.encode(times), self.guidance.encode(schedule)])

    def mutate(self, schedule: Schedule, rng: np.random.Generator, m_prob: float,
               scale: float = 0.1) -> Schedule:
        """The timestep half (its own operator) and the guidance half (Gaussian steps of
        ``scale`` in parameter space, reflected into [0, 1]) each mutate with probability
        1/2; at least one does."""
        ug = self.guidance.encode(schedule)
        times = strip_guidance(schedule)
        move_times, move_weights = halves_to_mutate(rng, self.timesteps.dim)
        if self.guidance.dim == 0:  # nothing to move in the guidance half
            move_times, move_weights = True, False
        if move_times:
            times = self.timesteps.mutate(times, rng, m_prob, scale)
        if move_weights:
            mask = rng.random(ug.size) < m_prob
            if not mask.any():
                mask[rng.integers(ug.size)] = True
            ug = ug.copy()
            ug[mask] = reflect_unit(ug[mask] + rng.normal(0.0, scale, int(mask.sum())))
        return self._join(Schedule(times.sigmas, solver=self.solver), ug)

    def crossover(self, a: Schedule, b: Schedule, rng: np.random.Generator) -> Schedule:
        """Timesteps by the timestep space's crossover, guidance parameters uniformly."""
        times = self.timesteps.crossover(strip_guidance(a), strip_guidance(b), rng)
        ua, ub = self.guidance.encode(a), self.guidance.encode(b)
        ug = np.where(rng.random(ua.size) < 0.5, ua, ub)
        return self._join(Schedule(times.sigmas, solver=self.solver), ug)

    def check(self, schedule: Schedule) -> Schedule:
        """Raise ``ValueError`` unless the timesteps fit and the weights are of the family
        (a schedule of the family need not be a decoded point; ``project`` maps it)."""
        self.timesteps.check(strip_guidance(schedule))
        if schedule.guidance is None:
            raise ValueError(f"schedule {schedule.id} has no guidance weights; this is a "
                             "guided space")
        got = self._join(Schedule(schedule.sigmas, solver=self.solver),
                         self.guidance.encode(schedule)).guidance
        if not np.allclose(got, schedule.guidance, rtol=1e-9, atol=1e-12):
            raise ValueError(
                f"schedule {schedule.id}'s guidance {schedule.guidance.tolist()} is not of "
                f"this space's family {self.guidance.describe()} (use project())"
            )
        return schedule

    def project(self, schedule: Schedule) -> Schedule:
        """The nearest point of the space (timesteps projected, guidance encoded), meta kept."""
        out = self._decode_vector(self.encode(schedule))
        return with_meta(out, **{k: v for k, v in dict(schedule.meta).items()
                                 if not k.startswith("guidance_")})
