"""Search spaces of model schedules (OMS-DPM): which zoo member runs each step, under a
latency budget.

- ``ModelSpace``: a fixed timestep schedule; one categorical choice (a zoo member) per step.
- ``JointSpace``: a timestep space (continuous or discrete) and a model per step.

Both follow the ``Space`` protocol of ``spaces.py``. The flat (Tune) form of a step's choice
is one ``u in [0, 1]`` split into ``n_models`` equal cells (member ``floor(u * M)``), so every
point of the cube decodes, as in the other spaces, and ``encode`` gives the cell centres.

Cost: a member's latency (ms per sample per call, measured on the actor) times the calls of
the step (``cost.calls_per_step``: 2 for Heun's steps but a last one to 0). A candidate
over the budget is never discarded: it is *repaired*, by downgrading the most expensive step
(calls x latency) to the next cheaper member, ties going to the step of highest noise (the
earliest), until it fits. Every decoded, sampled, mutated or crossed-over schedule is
repaired, so searchers only ever see schedules within the budget. A budget that even the
cheapest member at every step exceeds is refused when the space is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from searchd.schedule import Schedule
from searchd.schedules.cost import calls_per_step
from searchd.schedules.spaces import (
    ContinuousSpace,
    DiscreteSpace,
    _VectorSpace,
    halves_to_mutate,
    with_meta,
)

# Relative slack on the budget (float sums of latencies).
_BUDGET_RTOL = 1e-9


def repair_models(
    model_ids: Sequence[int] | np.ndarray,
    calls: np.ndarray,
    latency_ms: np.ndarray,
    budget_ms: float,
) -> np.ndarray:
    """Downgrade the most expensive steps first until the schedule fits ``budget_ms``.

    A step's cost is ``calls[i] * latency_ms[ids[i]]``; the costliest step whose member is
    not the cheapest moves to the next cheaper member (ties: the earliest step, the one of
    highest noise, where a small model loses least). Returns a new int64 array.
    """
    ids = np.array(model_ids, dtype=np.int64)
    order = np.argsort(latency_ms, kind="stable")  # cheap -> expensive
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    limit = budget_ms * (1 + _BUDGET_RTOL)
    cost = calls * latency_ms[ids]
    while cost.sum() > limit:
        movable = rank[ids] > 0
        if not movable.any():
            raise ValueError(
                f"no model schedule of {ids.size} steps fits budget_ms = {budget_ms!r}; the "
                f"cheapest costs {float(np.sum(calls * latency_ms[order[0]])):.6g} ms"
            )
        masked = np.where(movable, cost, -np.inf)
        i = int(np.argmax(masked))  # first maximum: the earliest step
        ids[i] = order[rank[ids[i]] - 1]
        cost[i] = calls[i] * latency_ms[ids[i]]
    return ids


class _ModelPart:
    """The model-schedule half of a space: members, their latencies, the budget."""

    def __init__(
        self,
        n_steps: int,
        solver: str,
        final_zero: bool,
        latency_ms: Sequence[float],
        budget_ms: float,
        names: Sequence[str] | None,
    ) -> None:
        lat = np.array([float(v) for v in latency_ms], dtype=np.float64)
        if lat.size < 1:
            raise ValueError("a model space needs at least one zoo member; got 0 latencies")
        for i, v in enumerate(lat):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(
                    f"latency_ms[{i}] = {float(v)!r}; latencies must be finite and > 0"
                )
        if not (isinstance(budget_ms, (int, float)) and math.isfinite(budget_ms)
                and budget_ms > 0):
            raise ValueError(f"budget_ms = {budget_ms!r}; it must be a finite number > 0")
        self.n_models = int(lat.size)
        self.latency_ms = lat
        self.latency_ms.setflags(write=False)
        self.budget_ms = float(budget_ms)
        self.names = [str(n) for n in (names or [f"m{i}" for i in range(self.n_models)])]
        if len(self.names) != self.n_models:
            raise ValueError(f"{len(self.names)} names for {self.n_models} zoo members")
        self.calls = calls_per_step(solver, n_steps, final_zero)
        cheapest = float(np.sum(self.calls) * lat.min())
        if cheapest > self.budget_ms * (1 + _BUDGET_RTOL):
            raise ValueError(
                f"budget_ms = {self.budget_ms:.6g} is below the cheapest model schedule of "
                f"{n_steps} steps with {solver} ({cheapest:.6g} ms: "
                f"{self.names[int(lat.argmin())]} at every step); raise the budget or use "
                "fewer steps"
            )
        self.n_steps = int(n_steps)

    def latency(self, model_ids: Sequence[int] | np.ndarray,
                guidance: Sequence[float] | np.ndarray | None = None) -> float:
        """ms per sample: calls x member latency per step; a step with a guidance weight
        != 1 makes every call twice (conditional and unconditional)."""
        ids = np.asarray(model_ids, dtype=np.int64)
        calls = self.calls
        if guidance is not None:
            calls = calls * np.where(np.asarray(guidance, dtype=np.float64) != 1.0, 2, 1)
        return float(np.sum(calls * self.latency_ms[ids]))

    def repair(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return repair_models(ids, self.calls, self.latency_ms, self.budget_ms)

    def ids_of(self, u: np.ndarray) -> np.ndarray:
        m = np.minimum(np.floor(u * self.n_models).astype(np.int64), self.n_models - 1)
        return self.repair(m)

    def u_of(self, ids: np.ndarray) -> np.ndarray:
        return (np.asarray(ids, dtype=np.float64) + 0.5) / self.n_models

    def mutate(self, ids: np.ndarray, rng: np.random.Generator, m_prob: float,
               force: bool = True) -> np.ndarray:
        """Each step takes another member with probability ``m_prob`` (at least one does
        when ``force``), then the schedule is repaired."""
        ids = np.array(ids, dtype=np.int64)
        if self.n_models < 2:
            return ids
        mask = rng.random(ids.size) < m_prob
        if force and not mask.any():
            mask[rng.integers(ids.size)] = True
        for i in np.flatnonzero(mask):
            other = rng.integers(self.n_models - 1)
            ids[i] = other + (other >= ids[i])
        return self.repair(ids)

    def crossover(self, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        take_a = rng.random(a.size) < 0.5
        return self.repair(np.where(take_a, a, b))

    def check(self, schedule: Schedule) -> None:
        if schedule.model_ids is None:
            raise ValueError(f"schedule {schedule.id} has no model_ids; this is a model space")
        schedule.check_models(self.n_models)
        cost = self.latency(schedule.model_ids, schedule.guidance)
        if cost > self.budget_ms * (1 + _BUDGET_RTOL):
            raise ValueError(
                f"schedule {schedule.id} costs {cost:.6g} ms per sample; the budget is "
                f"{self.budget_ms:.6g} ms (repair it with project())"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "members": list(self.names),
            "latency_ms": [float(v) for v in self.latency_ms],
            "budget_ms": self.budget_ms,
        }


class _ModelSchedules:
    """What a space with a model part (``self.models``) answers about its model schedules."""

    models: _ModelPart

    @property
    def n_models(self) -> int:
        return self.models.n_models

    @property
    def budget_ms(self) -> float:
        return self.models.budget_ms

    def latency(self, schedule: Schedule) -> float:
        """ms per sample of ``schedule``'s model schedule (guided steps count twice)."""
        return self.models.latency(schedule.model_ids, schedule.guidance)


class ModelSpace(_ModelSchedules, _VectorSpace):
    """Model schedules over a fixed timestep schedule: one zoo member per step.

    Args:
        sigmas: the fixed timestep schedule [N+1].
        latency_ms: each member's ms per sample per call (measured).
        budget_ms: most ms per sample a schedule may cost.
        solver: the solver that runs the schedules (sets the calls per step).
        names: member names (for reports and ``describe``).
    """

    def __init__(
        self,
        sigmas: Sequence[float] | np.ndarray,
        latency_ms: Sequence[float],
        budget_ms: float,
        *,
        solver: str = "dpmpp_2m",
        names: Sequence[str] | None = None,
    ) -> None:
        base = Schedule(np.asarray(sigmas, dtype=np.float64), solver=solver)
        self.sigmas = base.sigmas
        self.n_steps = base.n_steps
        self.final_zero = base.final_zero
        self.solver = solver
        self.sigma_max = float(base.sigmas[0])
        self.sigma_min = float(base.sigmas[-2] if base.final_zero else base.sigmas[-1])
        self.models = _ModelPart(self.n_steps, solver, self.final_zero, latency_ms, budget_ms,
                                 names)

    @property
    def dim(self) -> int:
        return self.n_steps

    def describe(self) -> dict[str, Any]:
        return {"kind": "models", "sigmas": [float(s) for s in self.sigmas],
                "solver": self.solver, **self.models.describe()}

    def __repr__(self) -> str:
        return f"ModelSpace({self.describe()})"

    def with_models(self, model_ids: Sequence[int] | np.ndarray) -> Schedule:
        """The space's schedule with these members (repaired to the budget)."""
        return Schedule(self.sigmas, self.models.repair(model_ids), solver=self.solver)

    def _decode_vector(self, u: np.ndarray) -> Schedule:
        return Schedule(self.sigmas, self.models.ids_of(u), solver=self.solver)

    def encode(self, schedule: Schedule) -> np.ndarray:
        self._check_shape_models(schedule)
        return self.models.u_of(schedule.model_ids)

    def mutate(self, schedule: Schedule, rng: np.random.Generator, m_prob: float,
               scale: float = 1.0) -> Schedule:
        """Each step takes another member with probability ``m_prob`` (at least one);
        ``scale`` is not used (a categorical choice has no step size)."""
        self._check_shape_models(schedule)
        return self.with_models(self.models.mutate(schedule.model_ids, rng, m_prob))

    def crossover(self, a: Schedule, b: Schedule, rng: np.random.Generator) -> Schedule:
        self._check_shape_models(a)
        self._check_shape_models(b)
        return self.with_models(self.models.crossover(a.model_ids, b.model_ids, rng))

    def _check_shape_models(self, schedule: Schedule) -> None:
        if schedule.solver != self.solver:
            raise ValueError(
                f"schedule {schedule.id} is for solver {schedule.solver!r}; this space's "
                f"solver is {self.solver!r}"
            )
        if schedule.sigmas.shape != self.sigmas.shape or not np.array_equal(
            schedule.sigmas, self.sigmas
        ):
            raise ValueError(
                f"schedule {schedule.id} has other noise levels than this model space's "
                f"fixed timestep schedule {[float(s) for s in self.sigmas]}"
            )
        if schedule.model_ids is None:
            raise ValueError(f"schedule {schedule.id} has no model_ids; this is a model space")
        schedule.check_models(self.n_models)

    def check(self, schedule: Schedule) -> Schedule:
        """Raise ``ValueError`` unless ``schedule`` has the fixed timesteps, valid members
        and fits the budget."""
        self._check_shape_models(schedule)
        self.models.check(schedule)
        return schedule

    def project(self, schedule: Schedule) -> Schedule:
        """The same members repaired to the budget (meta kept)."""
        self._check_shape_models(schedule)
        return with_meta(self.with_models(schedule.model_ids), **dict(schedule.meta))


class JointSpace(_ModelSchedules, _VectorSpace):
    """Timesteps and models searched together: a timestep space plus a member per step.

    Args:
        timesteps: a ``ContinuousSpace`` or ``DiscreteSpace`` (its schedules' shape and
            solver are this space's).
        latency_ms, budget_ms, names: as ``ModelSpace``.

    Parameters: the timestep space's, then one per step for the members.
    """

    def __init__(
        self,
        timesteps: ContinuousSpace | DiscreteSpace,
        latency_ms: Sequence[float],
        budget_ms: float,
        *,
        names: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(timesteps, (ContinuousSpace, DiscreteSpace)):
            raise ValueError(
                f"timesteps is a {type(timesteps).__name__}; a joint space takes a "
                "ContinuousSpace or a DiscreteSpace"
            )
        self.timesteps = timesteps
        self.n_steps = timesteps.n_steps
        self.final_zero = timesteps.final_zero
        self.solver = timesteps.solver
        self.sigma_min = timesteps.sigma_min
        self.sigma_max = timesteps.sigma_max
        self.models = _ModelPart(self.n_steps, self.solver, self.final_zero, latency_ms,
                                 budget_ms, names)

    @property
    def dim(self) -> int:
        return self.timesteps.dim + self.n_steps

    def describe(self) -> dict[str, Any]:
        return {"kind": "joint", "timesteps": self.timesteps.describe(),
                **self.models.describe()}

    def __repr__(self) -> str:
        return f"JointSpace({self.describe()})"

    @staticmethod
    def _strip(schedule: Schedule) -> Schedule:
        return Schedule(schedule.sigmas, None, schedule.solver, schedule.meta)

    def _join(self, times: Schedule, ids: np.ndarray) -> Schedule:
        return Schedule(times.sigmas, ids, self.solver, times.meta)

    def with_models(self, times: Schedule, model_ids: Sequence[int] | np.ndarray) -> Schedule:
        """A timestep schedule of this space with these members (repaired to the budget)."""
        self.timesteps.check(self._strip(times))
        return self._join(self._strip(times), self.models.repair(model_ids))

    def _decode_vector(self, u: np.ndarray) -> Schedule:
        k = self.timesteps.dim
        times = self.timesteps._decode_vector(u[:k])
        return self._join(times, self.models.ids_of(u[k:]))

    def _ids(self, schedule: Schedule) -> np.ndarray:
        if schedule.model_ids is None:
            raise ValueError(f"schedule {schedule.id} has no model_ids; this is a joint space")
        schedule.check_models(self.n_models)
        return np.asarray(schedule.model_ids, dtype=np.int64)

    def encode(self, schedule: Schedule) -> np.ndarray:
        ids = self._ids(schedule)
        return np.concatenate([self.timesteps.encode(self._strip(schedule)),
                               self.models.u_of(ids)])

    def mutate(self, schedule: Schedule, rng: np.random.Generator, m_prob: float,
               scale: float = 0.1) -> Schedule:
        """The timestep half and the model half each mutate with probability 1/2 (at least
        one does), each with its own operator."""
        ids = self._ids(schedule)
        move_times, move_models = halves_to_mutate(rng, self.timesteps.dim)
        times = self._strip(schedule)
        if move_times:
            times = self.timesteps.mutate(times, rng, m_prob, scale)
        if move_models:
            ids = self.models.mutate(ids, rng, m_prob)
        return self._join(times, self.models.repair(ids))

    def crossover(self, a: Schedule, b: Schedule, rng: np.random.Generator) -> Schedule:
        times = self.timesteps.crossover(self._strip(a), self._strip(b), rng)
        return self._join(times, self.models.crossover(self._ids(a), self._ids(b), rng))

    def check(self, schedule: Schedule) -> Schedule:
        self.timesteps.check(self._strip(schedule))
        self.models.check(schedule)
        return schedule

    def project(self, schedule: Schedule) -> Schedule:
        """The nearest timestep schedule of the space, with the members repaired."""
        times = self.timesteps.project(self._strip(schedule))
        out = self._join(times, self.models.repair(self._ids(schedule)))
        return with_meta(out, **dict(schedule.meta))


ModelSpaces = (ModelSpace, JointSpace)


def single_model_schedules(space: ModelSpace | JointSpace, times: Schedule
                           ) -> list[tuple[str, Schedule]]:
    """(member name, schedule) for every member that can run every step of ``times``
    within the budget, plus the all-slowest schedule repaired (if no single member of the
    slowest kind fits): the natural baselines of a model schedule."""
    out: list[tuple[str, Schedule]] = []
    base = Schedule(times.sigmas, None, times.solver, times.meta)
    n = space.n_steps
    part = space.models
    for m in range(part.n_models):
        ids = np.full(n, m, dtype=np.int64)
        if part.latency(ids) <= part.budget_ms * (1 + _BUDGET_RTOL):
            out.append((part.names[m], Schedule(base.sigmas, ids, base.solver, base.meta)))
    slowest = int(np.argmax(part.latency_ms))
    if not any(name == part.names[slowest] for name, _ in out):
        ids = part.repair(np.full(n, slowest, dtype=np.int64))
        out.append((f"{part.names[slowest]}-repaired",
                    Schedule(base.sigmas, ids, base.solver, base.meta)))
    return out

