"""Search spaces: maps between parameter vectors (or their flat dicts) and ``Schedule``s.

A space knows only the shape of the schedules it holds (``n_steps``, ``final_zero``, the
solver that will run them) and the noise range (``sigma_min``, ``sigma_max``) or, for
discrete-time models, the grid of noise levels the network was trained at. It knows nothing
about models, datasets or search algorithms.

Two spaces are defined here:

- ``ContinuousSpace``: ``u in [0, 1]^d`` decodes to a strictly decreasing schedule through
  positive gaps in a warped coordinate (log sigma, or sigma^(1/rho)). Every point of the
  cube is valid, so random and Bayesian searchers need no rejection; ``u = 0.5`` everywhere
  is the schedule uniform in the warped coordinate (the logsnr baseline for ``warp="logsnr"``,
  EDM's polynomial schedule for ``warp="rho"``, SD3's shifted flow-time schedule, the
  ``flow_shift`` baseline, for ``warp="flow"``).
- ``DiscreteSpace``: a sorted subset of a model's sigma grid (O2TDM, GITS). Mutation and
  crossover keep the subset sorted and unique.

Both follow the ``Space`` protocol, which later spaces (model schedules, joint spaces) will
follow too. Numerical code only: no Ray, no Tune.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from searchd.schedule import Schedule, validate_sigmas
from searchd.schedules.baselines import flow_sigma, flow_t, shift_t, unshift_t

Warp = Literal["logsnr", "rho", "flow"]
WARPS: tuple[str, ...] = ("logsnr", "rho", "flow")

# Relative tolerance used to decide that a level lies on the model's range or grid.
_RTOL = 1e-9


def param_names(dim: int) -> list[str]:
    """Names of the flat parameters of a ``dim``-dimensional space: ``u0 .. u{dim-1}``."""
    return [f"u{i}" for i in range(dim)]


def reflect_unit(v: np.ndarray) -> np.ndarray:
    """Fold values back into [0, 1] by reflection at the borders (keeps a perturbation's law)."""
    v = np.abs(np.asarray(v, dtype=np.float64)) % 2.0
    return np.where(v > 1.0, 2.0 - v, v)


def halves_to_mutate(rng: np.random.Generator, times_dim: int) -> tuple[bool, bool]:
    """Which halves of a two-part space (timesteps, then models / strategy / guidance) a
    mutation moves: each with probability 1/2, at least one; a timestep half without
    parameters passes its turn to the other. Returns (timesteps, other)."""
    which = rng.random(2) < 0.5
    if not which.any():
        which[rng.integers(2)] = True
    if times_dim == 0:
        return False, True
    return bool(which[0]), bool(which[1])


def with_meta(schedule: Schedule, **meta: Any) -> Schedule:
    """The same candidate (same id) with ``meta`` merged into its provenance."""
    merged = {**dict(schedule.meta), **meta}
    return dataclasses.replace(schedule, meta=merged)


@runtime_checkable
class Space(Protocol):
    """What searchers rely on. Later spaces (model schedules, joint) implement it too.

    ``decode`` accepts a parameter vector [dim] or a plain config: either
    ``{"schedule": Schedule.to_dict()}`` or the flat ``{"u0": .., "u1": ..}`` form.
    """

    n_steps: int
    final_zero: bool
    solver: str

    @property
    def dim(self) -> int: ...

    def decode(self, x: Sequence[float] | np.ndarray | Mapping[str, Any]) -> Schedule: ...

    def encode(self, schedule: Schedule) -> np.ndarray: ...

    def sample(self, rng: np.random.Generator) -> Schedule: ...

    def mutate(
        self, schedule: Schedule, rng: np.random.Generator, m_prob: float, scale: float
    ) -> Schedule: ...

    def crossover(self, a: Schedule, b: Schedule, rng: np.random.Generator) -> Schedule: ...

    def params(self, schedule: Schedule) -> dict[str, float]: ...

    def check(self, schedule: Schedule) -> Schedule: ...

    def project(self, schedule: Schedule) -> Schedule: ...

    def describe(self) -> dict[str, Any]: ...


class _VectorSpace:
    """Shared parts of spaces parameterized by a vector in [0, 1]^dim."""

    n_steps: int
    final_zero: bool
    solver: str
    sigma_min: float
    sigma_max: float

    @property
    def dim(self) -> int:
        raise NotImplementedError

    @property
    def n_levels(self) -> int:
        """Number of positive noise levels in a schedule (the trailing 0 excluded)."""
        return self.n_steps if self.final_zero else self.n_steps + 1

    def _decode_vector(self, u: np.ndarray) -> Schedule:
        raise NotImplementedError

    # Configs ------------------------------------------------------------------------------
    def decode(self, x: Sequence[float] | np.ndarray | Mapping[str, Any]) -> Schedule:
        """Schedule of a parameter vector [dim], or of a config (either form)."""
        if isinstance(x, Mapping):
            if "schedule" in x:
                return self.check(Schedule.from_dict(x["schedule"]))
            names = param_names(self.dim)
            missing = [n for n in names if n not in x]
            if missing:
                raise ValueError(
                    f"config lacks parameter(s) {missing}; a config is either "
                    f"{{'schedule': ...}} or the flat form with keys {names}"
                )
            x = [x[n] for n in names]
        return self._decode_vector(self._as_unit_vector(x))

    def _as_unit_vector(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        u = np.array(x, dtype=np.float64).reshape(-1)
        if u.size != self.dim:
            raise ValueError(f"parameter vector has {u.size} entries; this space has {self.dim}")
        for i, v in enumerate(u):
            if not math.isfinite(v) or v < -1e-12 or v > 1 + 1e-12:
                raise ValueError(f"u{i} = {v!r} is outside [0, 1]")
        return np.clip(u, 0.0, 1.0)

    def params(self, schedule: Schedule) -> dict[str, float]:
        """The flat form ``{"u0": .., "u1": ..}`` of ``encode(schedule)``."""
        return dict(zip(param_names(self.dim), (float(v) for v in self.encode(schedule))))

    def encode(self, schedule: Schedule) -> np.ndarray:
        raise NotImplementedError

    def project(self, schedule: Schedule) -> Schedule:
        """The point of the space nearest (in parameters) to ``schedule``, meta kept."""
        return with_meta(self._decode_vector(self.encode(schedule)), **dict(schedule.meta))

    def sample(self, rng: np.random.Generator) -> Schedule:
        """A schedule drawn uniformly in parameter space."""
        return self._decode_vector(rng.random(self.dim))

    # Validation --------------------------------------------------------------------------
    def _check_shape(self, schedule: Schedule) -> None:
        if schedule.n_steps != self.n_steps or schedule.final_zero != self.final_zero:
            raise ValueError(
                f"schedule {schedule.id} has {schedule.n_steps} steps, final_zero="
                f"{schedule.final_zero}; this space holds {self.n_steps} steps, final_zero="
                f"{self.final_zero}"
            )
        if schedule.solver != self.solver:
            raise ValueError(
                f"schedule {schedule.id} is for solver {schedule.solver!r}; this space's "
                f"solver is {self.solver!r}"
            )
        if schedule.model_ids is not None:
            raise ValueError(f"schedule {schedule.id} has model_ids; this is a timestep space")
        schedule.check_range(self.sigma_min, self.sigma_max)

    def _positive_levels(self, schedule: Schedule) -> np.ndarray:
        self._check_shape(schedule)
        return np.asarray(schedule.sigmas[: self.n_levels], dtype=np.float64)

    def _finish(self, levels: np.ndarray) -> Schedule:
        sig = np.concatenate([levels, [0.0]]) if self.final_zero else levels
        return Schedule(sig, solver=self.solver)


class ContinuousSpace(_VectorSpace):
    """Strictly decreasing schedules through positive gaps in a warped coordinate.

    The warped coordinate is ``w = log(sigma)`` (``warp="logsnr"``), ``w = sigma^(1/rho)``
    (``warp="rho"``) or, for rectified-flow models, the base time of SD3's shift
    (``warp="flow"``): ``w = s`` with ``t = sigma / (1 + sigma) = shift s / (1 + (shift - 1)
    s)``, so that the centre of the space is what flow users run (``shift`` 1: uniform in
    t; 3: SD3's default). A schedule has L positive levels (L = n_steps with a final 0, else
    n_steps + 1), hence L - 1 gaps in w. Parameters (all in [0, 1]):

    - ``u[i]`` for i < L - 2: the i-th gap (from the top) is ``exp(kappa (u[i] - 1/2))`` times
      the last gap (the one nearest sigma_min), with ``kappa = 2 log(gap_ratio)``; so each
      gap lies within a factor ``gap_ratio`` of the last one. The gaps are normalized to span
      the range between the endpoints. Fixing one gap as the reference removes the scale
      redundancy: the map is one-to-one and ``encode(decode(u)) == u``.
    - with ``free_endpoints``, two more: ``u[-2]`` moves the top level down from sigma_max by
      up to ``endpoint_range`` of the warped span (u = 1: sigma_max), ``u[-1]`` moves the
      lowest positive level up from sigma_min likewise (u = 0: sigma_min).

    ``u = 0.5`` (with endpoints at 1 and 0) is the schedule uniform in w.
    """

    def __init__(
        self,
        n_steps: int,
        sigma_min: float,
        sigma_max: float,
        final_zero: bool = True,
        warp: Warp = "logsnr",
        rho: float = 7.0,
        free_endpoints: bool = False,
        *,
        gap_ratio: float = 30.0,
        endpoint_range: float = 0.3,
        solver: str = "dpmpp_2m",
        shift: float = 1.0,
    ) -> None:
        if not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
            raise ValueError(f"n_steps = {n_steps!r}; it must be an integer >= 1")
        if not (0 < sigma_min < sigma_max < math.inf):
            raise ValueError(
                f"sigma_min = {sigma_min!r}, sigma_max = {sigma_max!r}; "
                "need 0 < sigma_min < sigma_max < inf"
            )
        if warp not in WARPS:
            raise ValueError(f"warp = {warp!r}; allowed: {list(WARPS)}")
        if not rho > 0:
            raise ValueError(f"rho = {rho!r}; it must be > 0")
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift = {shift!r}; it must be a finite number > 0")
        if not gap_ratio > 1:
            raise ValueError(f"gap_ratio = {gap_ratio!r}; it must be > 1")
        if not 0 < endpoint_range < 0.5:
            raise ValueError(f"endpoint_range = {endpoint_range!r}; it must be in (0, 0.5)")
        self.n_steps = int(n_steps)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.final_zero = bool(final_zero)
        self.warp = warp
        self.rho = float(rho)
        self.shift = float(shift)
        self.free_endpoints = bool(free_endpoints)
        self.gap_ratio = float(gap_ratio)
        self.endpoint_range = float(endpoint_range)
        self.solver = solver
        if self.n_levels < 2:
            raise ValueError(
                f"n_steps = {n_steps} with final_zero = {final_zero} leaves "
                f"{self.n_levels} positive level(s); a continuous space needs at least 2"
            )
        self._kappa = 2.0 * math.log(self.gap_ratio)
        self._w_hi = float(self._w(np.float64(self.sigma_max)))
        self._w_lo = float(self._w(np.float64(self.sigma_min)))
        self._span = self._w_hi - self._w_lo

    # Warp ---------------------------------------------------------------------------------
    def _w(self, sigma: np.ndarray) -> np.ndarray:
        if self.warp == "logsnr":
            return np.log(sigma)
        if self.warp == "flow":
            return unshift_t(flow_t(sigma), self.shift)
        return np.power(sigma, 1.0 / self.rho)

    def _w_inv(self, w: np.ndarray) -> np.ndarray:
        if self.warp == "logsnr":
            return np.exp(w)
        if self.warp == "flow":
            return flow_sigma(shift_t(w, self.shift))
        return np.power(w, self.rho)

    # Shape --------------------------------------------------------------------------------
    @property
    def n_gap_params(self) -> int:
        return self.n_levels - 2

    @property
    def dim(self) -> int:
        return self.n_gap_params + (2 if self.free_endpoints else 0)

    def describe(self) -> dict[str, Any]:
        """Everything that defines the space, as plain data (for states and logs)."""
        return {
            "kind": "continuous",
            "n_steps": self.n_steps,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "final_zero": self.final_zero,
            "warp": self.warp,
            "rho": self.rho,
            **({"shift": self.shift} if self.warp == "flow" else {}),
            "free_endpoints": self.free_endpoints,
            "gap_ratio": self.gap_ratio,
            "endpoint_range": self.endpoint_range,
            "solver": self.solver,
        }

    def __repr__(self) -> str:
        return f"ContinuousSpace({self.describe()})"

    # Decode / encode ---------------------------------------------------------------------
    def _decode_vector(self, u: np.ndarray) -> Schedule:
        k = self.n_gap_params
        top, bot = self._w_hi, self._w_lo
        if self.free_endpoints:
            reach = self.endpoint_range * self._span
            top = self._w_hi - reach * (1.0 - u[k])
            bot = self._w_lo + reach * u[k + 1]
        # Gap weights relative to the last gap, then positions from top to bottom.
        weights = np.concatenate([np.exp(self._kappa * (u[:k] - 0.5)), [1.0]])
        frac = np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
        w = top - (top - bot) * frac
        levels = self._w_inv(w)
        # Exact endpoints where they are the model's, and never outside its range.
        levels[0] = self.sigma_max if (not self.free_endpoints or u[k] == 1.0) else levels[0]
        levels[-1] = (
            self.sigma_min if (not self.free_endpoints or u[k + 1] == 0.0) else levels[-1]
        )
        levels[0] = min(levels[0], self.sigma_max)
        levels[-1] = max(levels[-1], self.sigma_min)
        validate_sigmas(levels)  # strictly decreasing; cannot fail for u in the cube
        return self._finish(levels)

    def encode(self, schedule: Schedule) -> np.ndarray:
        """Parameters of ``schedule`` (exact inverse of decode inside the space).

        A schedule outside the space is projected: gap ratios beyond ``gap_ratio`` and
        endpoints beyond their range are clipped; with fixed endpoints the gaps keep their
        proportions and are rescaled to the space's range.
        """
        w = self._w(self._positive_levels(schedule))
        gaps = -np.diff(w)
        k = self.n_gap_params
        u = np.empty(self.dim, dtype=np.float64)
        u[:k] = 0.5 + np.log(gaps[:-1] / gaps[-1]) / self._kappa
        if self.free_endpoints:
            reach = self.endpoint_range * self._span
            u[k] = 1.0 - (self._w_hi - w[0]) / reach
            u[k + 1] = (w[-1] - self._w_lo) / reach
        return np.clip(u, 0.0, 1.0)

    # Variation ---------------------------------------------------------------------------
    def mutate(
        self, schedule: Schedule, rng: np.random.Generator, m_prob: float, scale: float = 0.1
    ) -> Schedule:
        """Each parameter moves with probability ``m_prob`` (at least one always does) by a
        Gaussian step of standard deviation ``scale``, reflected into [0, 1]."""
        u = self.encode(schedule)
        if self.dim == 0:
            return self._decode_vector(u)
        mask = rng.random(self.dim) < m_prob
        if not mask.any():
            mask[rng.integers(self.dim)] = True
        u[mask] = reflect_unit(u[mask] + rng.normal(0.0, scale, int(mask.sum())))
        return self._decode_vector(u)

    def crossover(self, a: Schedule, b: Schedule, rng: np.random.Generator) -> Schedule:
        """Uniform crossover: each parameter comes from ``a`` or ``b`` with probability 1/2."""
        ua, ub = self.encode(a), self.encode(b)
        take_a = rng.random(self.dim) < 0.5
        return self._decode_vector(np.where(take_a, ua, ub))

    def check(self, schedule: Schedule) -> Schedule:
        """Raise ``ValueError`` unless ``schedule`` fits this space's shape, solver and range.

        A schedule that fits need not be a decoded point (a baseline of another family
        does fit); ``project`` maps it onto the space.
        """
        self._check_shape(schedule)
        return schedule


class DiscreteSpace(_VectorSpace):
    """Sorted subsets of a discrete-time model's sigma grid (O2TDM, GITS).

    ``grid`` holds the model's training noise levels in ascending order; only the levels in
    [sigma_min, sigma_max] are used (the "pool"). A schedule takes L of them (L = n_steps with
    a final 0, else n_steps + 1), from high to low. With fixed endpoints the highest and the
    lowest pool levels are always taken and the L - 2 others chosen; with free endpoints all L
    are chosen.

    Tune form: one ``uniform(0, 1)`` per chosen level. The sorted values v_0 <= ... <= v_{k-1}
    map to pool positions ``min(floor(v_j c), c - 1) + j`` with ``c = m - k + 1`` (m choosable
    levels): strictly increasing, so every point of the cube is a valid subset.
    """

    def __init__(
        self,
        n_steps: int,
        grid: Sequence[float] | np.ndarray,
        final_zero: bool = True,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        free_endpoints: bool = False,
        *,
        solver: str = "dpmpp_2m",
    ) -> None:
        g = np.array(grid, dtype=np.float64).reshape(-1)
        if g.size < 2 or not np.all(np.isfinite(g)) or not np.all(g > 0):
            raise ValueError("grid must hold at least 2 finite positive noise levels")
        if not np.all(np.diff(g) > 0):
            raise ValueError("grid must be strictly ascending (index t -> sigma_t)")
        if not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
            raise ValueError(f"n_steps = {n_steps!r}; it must be an integer >= 1")
        lo = float(g[0]) if sigma_min is None else float(sigma_min)
        hi = float(g[-1]) if sigma_max is None else float(sigma_max)
        inside = np.flatnonzero((g >= lo * (1 - _RTOL)) & (g <= hi * (1 + _RTOL)))
        self.grid = g
        self.grid.setflags(write=False)
        self.n_steps = int(n_steps)
        self.final_zero = bool(final_zero)
        self.free_endpoints = bool(free_endpoints)
        self.solver = solver
        if inside.size < self.n_levels:
            raise ValueError(
                f"the grid has {inside.size} levels in [{lo}, {hi}]; a schedule of "
                f"{n_steps} steps (final_zero={final_zero}) needs {self.n_levels}"
            )
        self.pool = inside  # absolute grid indices, ascending
        self.sigma_min = float(g[inside[0]])
        self.sigma_max = float(g[inside[-1]])
        # Pool positions every schedule takes (fixed endpoints), the choosable rest, and how
        # many of those a schedule picks.
        top = self.pool.size - 1
        if self.free_endpoints:
            fixed: list[int] = []
        else:
            fixed = [0, top] if self.n_levels >= 2 else [top]
        self._fixed = np.asarray(fixed, dtype=np.int64)
        self._choosable = np.setdiff1d(np.arange(self.pool.size), self._fixed)
        self._k = self.n_levels - len(fixed)

    @property
    def dim(self) -> int:
        return self._k

    def describe(self) -> dict[str, Any]:
        """Everything that defines the space, as plain data (for states and logs)."""
        return {
            "kind": "discrete",
            "n_steps": self.n_steps,
            "final_zero": self.final_zero,
            "free_endpoints": self.free_endpoints,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "grid_size": int(self.grid.size),
            "grid_sha256": hashlib.sha256(self.grid.astype("<f8").tobytes()).hexdigest()[:16],
            "pool": [int(self.pool[0]), int(self.pool[-1])],
            "solver": self.solver,
        }

    def __repr__(self) -> str:
        return f"DiscreteSpace({self.describe()})"

    # Subsets <-> schedules ---------------------------------------------------------------
    def _full_positions(self, chosen: np.ndarray) -> np.ndarray:
        """Pool positions of all L levels (ascending): the chosen ones and the fixed ends."""
        return np.sort(np.concatenate([self._fixed, np.asarray(chosen, dtype=np.int64)]))

    def from_positions(self, chosen: Sequence[int] | np.ndarray) -> Schedule:
        """Schedule of the chosen pool positions (sorted, unique, from ``_choosable``)."""
        pos = self._full_positions(np.asarray(chosen, dtype=np.int64))
        if np.unique(pos).size != pos.size:
            raise ValueError(f"pool positions {pos.tolist()} repeat a level")
        levels = self.grid[self.pool[pos]][::-1].copy()
        return with_meta(
            self._finish(levels), grid_indices=[int(i) for i in self.pool[pos][::-1]]
        )

    def positions(self, schedule: Schedule) -> np.ndarray:
        """Chosen pool positions of a schedule (ascending). With fixed endpoints its top (and
        bottom) level map to the pool's ends; every other level maps to the nearest unused
        choosable level in log sigma, so any schedule of the right shape gives a valid
        subset (a schedule on the grid gives its own)."""
        levels = self._positive_levels(schedule)[::-1]  # ascending
        if self._fixed.size:
            # Fixed ends: the lowest level (with two ends) and the highest level.
            levels = levels[1:-1] if self._fixed.size == 2 else levels[:-1]
        logp = np.log(self.grid[self.pool[self._choosable]])
        taken: set[int] = set()
        for s in levels:
            order = np.argsort(np.abs(logp - math.log(s)), kind="stable")
            r = int(next(r for r in order if int(r) not in taken))
            taken.add(r)
        return self._choosable[np.sort(np.fromiter(taken, dtype=np.int64, count=len(taken)))]

    def indices(self, schedule: Schedule) -> np.ndarray:
        """Grid indices (timesteps) of a schedule's positive levels, high to low."""
        return self.pool[self._full_positions(self.positions(schedule))][::-1].copy()

    # Vector form -------------------------------------------------------------------------
    def _cells(self) -> int:
        return self._choosable.size - self._k + 1

    def _decode_vector(self, u: np.ndarray) -> Schedule:
        c = self._cells()
        v = np.sort(u)
        rank = np.minimum(np.floor(v * c).astype(np.int64), c - 1) + np.arange(self._k)
        return self.from_positions(self._choosable[rank])

    def encode(self, schedule: Schedule) -> np.ndarray:
        """Canonical parameters (cell centres) of a schedule; ``decode(encode(s)) == s``."""
        rank = np.searchsorted(self._choosable, self.positions(schedule))
        return (rank - np.arange(self._k) + 0.5) / self._cells()

    def sample(self, rng: np.random.Generator) -> Schedule:
        """A subset drawn uniformly among all subsets of the right size."""
        return self.from_positions(rng.choice(self._choosable, size=self._k, replace=False))

    # Variation ---------------------------------------------------------------------------
    def mutate(
        self, schedule: Schedule, rng: np.random.Generator, m_prob: float, scale: float = 1.0
    ) -> Schedule:
        """O2TDM's mutation: each chosen level is replaced, with probability ``m_prob`` (at
        least one always is), by an unused level; ``scale`` < 1 limits the move to that
        fraction of the pool around the old level (1: anywhere). Sorted and unique."""
        pos = self.positions(schedule)
        if self._k == 0 or self._k == self._choosable.size:
            return self.from_positions(pos)
        mask = rng.random(self._k) < m_prob
        if not mask.any():
            mask[rng.integers(self._k)] = True
        radius = max(1, int(round(scale * self._choosable.size)))
        for j in np.flatnonzero(mask):
            free = np.setdiff1d(self._choosable, pos)
            near = free[np.abs(free - pos[j]) <= radius]
            pos[j] = rng.choice(near if near.size else free)
        return self.from_positions(np.sort(pos))

    def crossover(self, a: Schedule, b: Schedule, rng: np.random.Generator) -> Schedule:
        """Uniform crossover of the rank-aligned levels of two subsets; repeated levels are
        replaced by unused levels of either parent, then of the pool. Sorted and unique."""
        pa, pb = self.positions(a), self.positions(b)
        take_a = rng.random(self._k) < 0.5
        child = list(dict.fromkeys(int(p) for p in np.where(take_a, pa, pb)))
        spare = [p for p in sorted(set(pa.tolist()) | set(pb.tolist())) if p not in child]
        rng.shuffle(spare)
        while len(child) < self._k and spare:
            child.append(int(spare.pop()))
        if len(child) < self._k:
            rest = [int(p) for p in self._choosable if int(p) not in child]
            child.extend(int(p) for p in rng.choice(rest, self._k - len(child), replace=False))
        return self.from_positions(np.sort(np.asarray(child, dtype=np.int64)))

    def check(self, schedule: Schedule) -> Schedule:
        """Raise ``ValueError`` unless ``schedule`` fits this space and lies on its grid."""
        levels = self._positive_levels(schedule)
        on = self.grid[self.pool]
        for i, s in enumerate(levels):
            j = int(np.argmin(np.abs(on - s)))
            if abs(on[j] - s) > _RTOL * s:
                raise ValueError(
                    f"sigmas[{i}] = {s!r} is not a level of the model's grid; a discrete "
                    "space only holds grid levels (use project() to snap a schedule)"
                )
        if not self.free_endpoints and (
            levels[0] != self.sigma_max or (self.n_levels >= 2 and levels[-1] != self.sigma_min)
        ):
            raise ValueError(
                f"schedule {schedule.id} does not run from {self.sigma_max!r} down to "
                f"{self.sigma_min!r}; this space has fixed endpoints"
            )
        return schedule
