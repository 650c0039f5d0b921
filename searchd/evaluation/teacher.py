"""Teacher solutions: the high-NFE samples and trajectories students are measured by.

The one implementation of the teacher: the evaluator's ``teacher_distance`` metric, GITS,
LD3 and the adaptive oracle all use it.

- ``TeacherSettings``: how a teacher sample is made (solver, steps of a baseline schedule,
  noise range, ending, solver options), as a frozen, hashable value.
- ``teacher_samples(denoiser, noise, settings)``: the teacher's output on given noise.
- ``TeacherCache``: teacher samples of one denoiser by (seeds, settings), kept in a plain
  dict (the least recently used entry goes first when ``max_entries`` is reached); an
  ``Evaluator`` owns one (``evaluator.teacher_cache``).
- ``teacher_trajectory(denoiser, noise, levels, ...)``: the teacher's states at every level of
  a fine grid and the denoiser's output there, the raw material of GITS's cost matrix.

Everything runs under ``torch.no_grad``: teachers are targets, never trained through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.models.base import Denoiser
from searchd.models.conditional import row_conditioning
from searchd.noise import make_noise
from searchd.schedules.baselines import FAMILIES, baseline
from searchd.solvers import get as get_solver
from searchd.solvers import solve


def _options_tuple(options: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> tuple:
    items = options.items() if isinstance(options, Mapping) else options
    return tuple(sorted((str(k), v) for k, v in items))


# Keys of the plain-data form of a teacher (``TeacherSettings.coerce``); ``steps`` is an alias
# of ``n_steps`` and ``schedule`` of ``family``.
_KEYS = frozenset({"solver", "n_steps", "steps", "family", "schedule", "params", "rho",
                   "sigma_min", "sigma_max", "final_zero", "options"})


@dataclass(frozen=True)
class TeacherSettings:
    """How a teacher sample is made.

    Attributes:
        solver: a solver of ``searchd.solvers`` (default Heun, EDM's deterministic sampler).
        n_steps: steps of the teacher's schedule.
        rho: exponent of the polynomial (EDM) schedule.
        sigma_min, sigma_max: the schedule's range; None: the denoiser's.
        final_zero: the schedule ends in 0 (the teacher's last step denoises), else at
            ``sigma_min``. Match the students it is compared with.
        options: the solver's options, as sorted ``(name, value)`` pairs (a mapping is
            accepted and converted).
        family: the schedule's baseline family (default "polynomial", with ``rho``).
        params: the family's parameters other than ``rho``, as sorted pairs (a mapping is
            accepted).
    """

    solver: str = "heun"
    n_steps: int = 64
    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_zero: bool = True
    options: tuple = field(default=())
    family: str = "polynomial"
    params: tuple = field(default=())

    def __post_init__(self) -> None:
        get_solver(self.solver)
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, (int, np.integer)):
            raise ValueError(f"n_steps = {self.n_steps!r}; it must be an integer >= 1")
        if self.n_steps < 1:
            raise ValueError(f"n_steps = {self.n_steps!r}; it must be an integer >= 1")
        if not self.rho > 0:
            raise ValueError(f"rho = {self.rho!r}; it must be > 0")
        if self.family not in FAMILIES:
            raise ValueError(f"teacher schedule {self.family!r}; allowed: {', '.join(FAMILIES)}")
        object.__setattr__(self, "options", _options_tuple(self.options))
        object.__setattr__(self, "params", _options_tuple(self.params))

    @classmethod
    def coerce(cls, value: TeacherSettings | Mapping[str, Any] | None) -> TeacherSettings:
        """Settings from plain data (``metric.options.teacher``: ``solver``, ``n_steps`` or
        ``steps``, ``schedule`` or ``family``, ``params``, ``options``, ...); None: defaults."""
        if value is None:
            return cls()
        if isinstance(value, TeacherSettings):
            return value
        unknown = sorted(set(value) - _KEYS)
        if unknown:
            raise ValueError(f"unknown teacher option(s) {unknown}; allowed: {sorted(_KEYS)}")
        v = dict(value)
        if "steps" in v:
            v["n_steps"] = v.pop("steps")
        if "schedule" in v:
            v["family"] = v.pop("schedule")
        params = dict(v.pop("params", None) or {})
        if v.get("family", "polynomial") == "polynomial" and "rho" in params:
            v["rho"] = params.pop("rho")
        return cls(**v, params=params)

    def sigmas(self, denoiser: Denoiser) -> np.ndarray:
        """The teacher's schedule for ``denoiser``: float64 [n_steps + 1]."""
        lo = denoiser.sigma_min if self.sigma_min is None else self.sigma_min
        hi = denoiser.sigma_max if self.sigma_max is None else self.sigma_max
        params = dict(self.params)
        if self.family == "polynomial":
            params["rho"] = self.rho
        return baseline(self.family, self.n_steps, lo, hi, self.final_zero, **params)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for meta and logs)."""
        out = {
            "solver": self.solver, "n_steps": int(self.n_steps), "rho": float(self.rho),
            "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
            "final_zero": bool(self.final_zero), "options": dict(self.options),
        }
        if self.family != "polynomial" or self.params:
            out.update(family=self.family, params=dict(self.params))
        return out


def teacher_samples(denoiser: Denoiser, noise: Tensor, settings: TeacherSettings,
                    batch_size: int | None = None, seeds: Sequence[int] | None = None
                    ) -> Tensor:
    """The teacher's samples [B, *shape] from unit noise [B, *shape] (no autograd graph),
    solved in chunks of ``batch_size`` rows (None: one pass). ``seeds`` [B] (the noise's)
    give a conditional model each row's class or prompt (``row_conditioning``)."""
    sigmas = settings.sigmas(denoiser)
    if noise.shape[0] == 0:
        return noise.clone()
    step = batch_size or noise.shape[0]
    cond = None if seeds is None else row_conditioning(denoiser, seeds)
    with torch.no_grad():
        parts = [solve(denoiser, noise[a : a + step], sigmas, solver=settings.solver,
                       cond=None if cond is None else {k: v[a : a + step]
                                                       for k, v in cond.items()},
                       **dict(settings.options)).detach()
                 for a in range(0, noise.shape[0], step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class TeacherCache:
    """Teacher samples of one denoiser, cached by (seeds, settings) in a plain dict.

    Args:
        denoiser: the model every entry belongs to (one cache per loaded model).
        device, dtype: where and in which precision noise is drawn and samples are kept
            (defaults: the denoiser's ``device``/``dtype`` attributes, else CPU float32).
        max_entries: entries kept; the least recently used is dropped first. None: no limit.
        batch_size: rows per solver call when computing an entry (None: one pass).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_entries: int | None = 8,
        batch_size: int | None = None,
    ) -> None:
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries = {max_entries!r}; it must be >= 1 or None")
        self.denoiser = denoiser
        self.device = torch.device(device or getattr(denoiser, "device", "cpu"))
        self.dtype = dtype or getattr(denoiser, "dtype", torch.float32)
        self.max_entries = max_entries
        self.batch_size = batch_size
        self._entries: dict[tuple, Tensor] = {}
        self.hits = 0
        self.misses = 0

    def samples(
        self, seeds: Sequence[int] | range, settings: TeacherSettings = TeacherSettings()
    ) -> Tensor:
        """Teacher samples [len(seeds), *shape] on the noise of ``seeds`` (``make_noise``).

        The returned tensor is the cached one: do not modify it in place.
        """
        key = (tuple(int(s) for s in seeds), settings)
        if key in self._entries:
            self.hits += 1
            self._entries[key] = self._entries.pop(key)  # most recently used last
            return self._entries[key]
        self.misses += 1
        noise = make_noise(key[0], tuple(self.denoiser.shape), device=self.device,
                           dtype=self.dtype)
        out = teacher_samples(self.denoiser, noise, settings, self.batch_size, key[0])
        if self.max_entries is not None:
            while len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
        self._entries[key] = out
        return out

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        if not (isinstance(key, tuple) and len(key) == 2):
            return False
        seeds, settings = key
        return (tuple(int(s) for s in seeds), settings) in self._entries

    def clear(self) -> None:
        self._entries.clear()


# Trajectories on a fine grid ----------------------------------------------------------------
def refine(levels: np.ndarray, substeps: int) -> list[np.ndarray]:
    """Each interval of a decreasing grid split into ``substeps`` steps.

    Positive intervals are split geometrically (uniform in log sigma); an interval ending in
    0 is one step (the step to 0 denoises). Returns one float64 array per interval, from
    ``levels[i]`` to ``levels[i + 1]`` inclusive.
    """
    if substeps < 1:
        raise ValueError(f"substeps = {substeps!r}; it must be >= 1")
    out = []
    for hi, lo in zip(levels[:-1], levels[1:]):
        if lo == 0.0 or substeps == 1:
            seg = np.array([hi, lo], dtype=np.float64)
        else:
            seg = np.geomspace(hi, lo, substeps + 1)
            seg[0], seg[-1] = hi, lo
        out.append(seg)
    return out


def teacher_trajectory(
    denoiser: Denoiser,
    noise: Tensor,
    levels: np.ndarray | Sequence[float],
    *,
    solver: str = "heun",
    substeps: int = 1,
    **opts: Any,
) -> tuple[Tensor, Tensor]:
    """The teacher's states and denoised outputs at every level of a fine grid.

    Integrates from ``noise * levels[0]`` with ``solver``, interval by interval (each split
    into ``substeps`` steps, see ``refine``), and records the state at each level. A
    single-step solver (euler, heun) gives exactly its run over the refined grid; a multistep
    one restarts at order 1 at every grid level (use substeps >= its order for accuracy).

    Args:
        denoiser: ``D(x [B, *shape], sigma [B]) -> x0_hat``.
        noise: unit noise [B, *shape].
        levels: strictly decreasing grid [G]; positive, except perhaps the last, which may
            be 0 (the sample denoised).
        solver, substeps, **opts: the teacher's solver, steps per interval, its options.

    Returns:
        ``xs`` [G, B, *shape]: the state at each level (``xs[0] = noise * levels[0]``;
        at a level 0, the denoised sample); ``dens`` [G, B, *shape]: ``D(xs[i], levels[i])``
        at each positive level (at a level 0, ``dens`` equals ``xs``).
    """
    lv = np.asarray(levels, dtype=np.float64)
    if lv.ndim != 1 or lv.size < 2 or not np.all(np.diff(lv) < 0) or lv[-2] <= 0:
        raise ValueError("levels must be a strictly decreasing grid [G >= 2], positive but "
                         "for a final 0")
    b = noise.shape[0]
    xs, dens = [], []
    with torch.no_grad():
        x = noise * float(lv[0])
        for i, seg in enumerate(refine(lv, substeps)):
            s = float(lv[i])
            sig = torch.full((b,), s, dtype=noise.dtype, device=noise.device)
            xs.append(x)
            dens.append(denoiser(x, sig))
            # solve starts from noise * seg[0]; hand it x / seg[0] to start exactly at x.
            x = solve(denoiser, x / s, seg, solver=solver, **opts)
        xs.append(x)
        dens.append(x if lv[-1] == 0.0 else denoiser(
            x, torch.full((b,), float(lv[-1]), dtype=noise.dtype, device=noise.device)))
    return torch.stack(xs), torch.stack(dens)
