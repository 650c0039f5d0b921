"""``Schedule``: one candidate of the search, an immutable, validated, content-hashed value.

A timestep schedule of N steps is a strictly decreasing float64 array of N+1 noise levels.
Its last entry is either 0 (the last step denoises) or a level > 0 at which the sample is
taken as it stands. A model schedule gives the zoo member used at each of the N steps. A
guidance schedule gives the classifier-free guidance weight w of each of the N steps
(``u + w (c - u)``; w = 1 is the conditional model alone, and a step with w = 1 makes no
unconditional call); a schedule without one runs the model as it was loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HASH_CHARS = 16
# The version of the id scheme (runs record it: a run is continued only by the same scheme).
# 1: SHA-256 of the raw float64 sigmas; 2: of the sigmas rounded to a relative 2**-30
# (about 1e-9) first, so schedules that differ only by floating-point noise share their id.
ID_SCHEME = 2
CANONICAL_BITS = 30


def canonical_sigmas(sigmas: np.ndarray) -> np.ndarray:
    """The noise levels as they are hashed: each mantissa rounded to ``CANONICAL_BITS``
    bits (a relative 2**-30, about 1e-9), exponents kept; 0 stays 0."""
    mantissa, exponent = np.frexp(np.asarray(sigmas, dtype=np.float64))
    scale = float(2**CANONICAL_BITS)
    return np.ldexp(np.round(mantissa * scale) / scale, exponent)


def validate_sigmas(
    sigmas: Sequence[float] | np.ndarray,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    *,
    rtol: float = 1e-9,
) -> np.ndarray:
    """Check a timestep schedule and return it as a read-only float64 array [N+1].

    Raises ``ValueError`` naming the first bad entry and what is allowed.
    """
    arr = np.array(sigmas, dtype=np.float64)
    vals = [float(v) for v in arr.reshape(-1)]
    if arr.ndim != 1:
        raise ValueError(f"sigmas must be one-dimensional [N+1]; got shape {arr.shape}")
    if arr.size < 2:
        raise ValueError(f"sigmas must have at least 2 entries (1 step); got {arr.size}")
    for i, s in enumerate(vals):
        if not math.isfinite(s):
            raise ValueError(f"sigmas[{i}] = {s} is not finite; all noise levels must be finite")
        if s < 0:
            raise ValueError(f"sigmas[{i}] = {s} is negative; noise levels must be >= 0")
    for i in range(arr.size - 1):
        if not arr[i + 1] < arr[i]:
            raise ValueError(
                f"sigmas[{i + 1}] = {vals[i + 1]!r} is not below sigmas[{i}] = {vals[i]!r}; "
                "a schedule must be strictly decreasing"
            )
    if sigma_max is not None and arr[0] > sigma_max * (1 + rtol):
        raise ValueError(f"sigmas[0] = {vals[0]!r} is above the model's sigma_max = {sigma_max!r}")
    if sigma_min is not None:
        last = arr.size - 1
        for i, s in enumerate(vals):
            if (i < last or s != 0.0) and s < sigma_min * (1 - rtol):
                raise ValueError(
                    f"sigmas[{i}] = {s!r} is below the model's sigma_min = {sigma_min!r}; "
                    "only the last entry may be 0"
                )
    arr.setflags(write=False)
    return arr


def validate_model_ids(model_ids: Sequence[int] | np.ndarray, n_steps: int) -> np.ndarray:
    """Check a model schedule (one non-negative model index per step) against N steps."""
    arr = np.asarray(model_ids)
    if arr.ndim != 1 or arr.size != n_steps:
        raise ValueError(
            f"model_ids has shape {arr.shape}; expected ({n_steps},), one model index per step"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"model_ids must be integers; got {arr.tolist()}")
    arr = arr.astype(np.int64)
    for i, m in enumerate(arr.tolist()):
        if m < 0:
            raise ValueError(f"model_ids[{i}] = {m} is negative; model indices must be >= 0")
    arr.setflags(write=False)
    return arr


def _strategy_of(value: Any) -> tuple[str, ...] | None:
    """A stored strategy (a list of codes) as the field holds it; a string is refused."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"strategy must be a list of per-step codes; got {value!r}")
    return tuple(value)


def validate_guidance(guidance: Sequence[float] | np.ndarray, n_steps: int) -> np.ndarray:
    """Check a guidance schedule (one finite weight >= 0 per step) against N steps and
    return it as a read-only float64 array [N]."""
    arr = np.array(guidance, dtype=np.float64)
    if arr.ndim != 1 or arr.size != n_steps:
        raise ValueError(
            f"guidance has shape {arr.shape}; expected ({n_steps},), one weight per step"
        )
    for i, w in enumerate(arr.tolist()):
        if not math.isfinite(w) or w < 0:
            raise ValueError(
                f"guidance[{i}] = {w!r}; guidance weights must be finite and >= 0 "
                "(1: conditional only, no guidance)"
            )
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Schedule:
    """One candidate: noise levels, optional model and guidance weight per step, and the
    solver that runs it.

    ``meta`` is free-form provenance (origin, family, parents); it is carried along but is
    not part of the identity: two schedules with the same sigmas (to a relative 1e-9),
    models, guidance, strategy and solver are the same candidate and have the same ``id``.
    ``guidance`` (float64 [N] or None) is part of the identity only when present, so every
    schedule without it keeps the id it always had.

    ``strategy``: None (the solver's own per-step rule), or the solver's variant per step,
    one code per step (``searchd.solvers.strategy``: ``"1"``, ``"2"``, ``"3"``, ``"2c"``),
    stored in canonical form; like ``guidance`` it is part of the identity only when present.
    A schedule may carry both.
    """

    sigmas: np.ndarray
    model_ids: np.ndarray | None = None
    solver: str = "dpmpp_2m"
    meta: Mapping[str, Any] = field(default_factory=dict)
    strategy: tuple[str, ...] | None = None
    guidance: np.ndarray | None = None

    def __post_init__(self) -> None:
        sig = validate_sigmas(self.sigmas)
        object.__setattr__(self, "sigmas", sig)
        if self.model_ids is not None:
            ids = validate_model_ids(self.model_ids, sig.size - 1)
            object.__setattr__(self, "model_ids", ids)
        if self.guidance is not None:
            object.__setattr__(self, "guidance", validate_guidance(self.guidance, sig.size - 1))
        if not isinstance(self.solver, str) or not self.solver:
            raise ValueError(f"solver must be a non-empty string; got {self.solver!r}")
        object.__setattr__(self, "meta", dict(self.meta))
        if self.strategy is not None:
            from searchd.strategy_codes import canonical

            object.__setattr__(self, "strategy", canonical(
                self.solver, self.strategy, self.n_steps, self.final_zero))

    # Shape --------------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        return int(self.sigmas.size - 1)

    @property
    def final_zero(self) -> bool:
        return bool(self.sigmas[-1] == 0.0)

    @property
    def guided_steps(self) -> np.ndarray | None:
        """Which steps call the unconditional model too (w != 1), bool [N]; None without a
        guidance schedule."""
        return None if self.guidance is None else self.guidance != 1.0

    def check_range(self, sigma_min: float, sigma_max: float) -> Schedule:
        """Validate against a model's noise range; returns self for chaining."""
        validate_sigmas(self.sigmas, sigma_min, sigma_max)
        return self

    def check_models(self, n_models: int) -> Schedule:
        """Validate model indices against a zoo of ``n_models`` members."""
        if self.model_ids is not None:
            for i, m in enumerate(self.model_ids.tolist()):
                if m >= n_models:
                    raise ValueError(
                        f"model_ids[{i}] = {m} is out of range; the zoo has models "
                        f"0..{n_models - 1}"
                    )
        return self

    # Identity -----------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """Content hash of (sigmas, model_ids, strategy, guidance, solver): the candidate's
        id everywhere (strategy and guidance only when present).

        The sigmas (and guidance weights) are hashed as ``canonical_sigmas`` (rounded to a
        relative 2**-30), so two schedules that differ only by floating-point noise (a
        parameter vector decoded twice, a crossover that reproduces a parent) are one
        candidate, scored once.
        """
        h = hashlib.sha256()
        h.update(self.solver.encode())
        h.update(b"|s|")
        h.update(np.ascontiguousarray(canonical_sigmas(self.sigmas), dtype="<f8").tobytes())
        if self.model_ids is not None:
            h.update(b"|m|")
            h.update(np.ascontiguousarray(self.model_ids, dtype="<i8").tobytes())
        if self.strategy is not None:
            h.update(b"|k|")
            h.update(",".join(self.strategy).encode())
        if self.guidance is not None:
            h.update(b"|g|")
            h.update(np.ascontiguousarray(canonical_sigmas(self.guidance), dtype="<f8").tobytes())
        return h.hexdigest()[:HASH_CHARS]

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.id == other.id

    def __repr__(self) -> str:
        sig = ", ".join(f"{s:.4g}" for s in self.sigmas)
        ids = "" if self.model_ids is None else f", model_ids={self.model_ids.tolist()}"
        strat = "" if self.strategy is None else f", strategy={list(self.strategy)}"
        g = (
            ""
            if self.guidance is None
            else ", guidance=[" + ", ".join(f"{w:.4g}" for w in self.guidance) + "]"
        )
        return f"Schedule(id={self.id}, solver={self.solver}, sigmas=[{sig}]{ids}{strat}{g})"

    # Serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form; floats are written with ``repr`` precision, so it round-trips.
        ``strategy`` and ``guidance`` appear only when the schedule has them."""
        d = {
            "id": self.id,
            "sigmas": [float(s) for s in self.sigmas],
            "model_ids": None if self.model_ids is None else [int(m) for m in self.model_ids],
            "solver": self.solver,
            "meta": dict(self.meta),
        }
        if self.strategy is not None:
            d["strategy"] = list(self.strategy)
        if self.guidance is not None:
            d["guidance"] = [float(w) for w in self.guidance]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Schedule:
        s = cls(
            sigmas=np.asarray(d["sigmas"], dtype=np.float64),
            model_ids=None if d.get("model_ids") is None else np.asarray(d["model_ids"]),
            solver=d.get("solver", "dpmpp_2m"),
            meta=d.get("meta") or {},
            strategy=_strategy_of(d.get("strategy")),
            guidance=None if d.get("guidance") is None else np.asarray(d["guidance"]),
        )
        if "id" in d and d["id"] != s.id:
            raise ValueError(f"schedule id {d['id']!r} does not match its content ({s.id})")
        return s

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        return cls.from_dict(json.loads(text))
