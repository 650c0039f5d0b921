"""The solver-schedule space: timesteps and the solver's per-step strategy as one candidate.

``StrategySpace`` joins a timestep space (``ContinuousSpace`` or ``DiscreteSpace``, or a
``GuidedSpace`` over one: timesteps and guidance weights) with one choice per step among
the variants the solver computes at the same NFE (``searchd.solvers.strategy``): the
multistep order of every step, and for UniPC whether the UniC corrector follows it.
Parameters (all in [0, 1]): the timestep space's (with a guided one, its weights' too), then
one per step for the order (cell ``floor(u * K)`` of the family's K orders), then, for
UniPC, one per step for the corrector (on for u >= 1/2). Every point of the cube decodes; the
decoded schedule holds its strategy in canonical form (an order beyond the history at hand
is that history's), so points that sample the same share one id.

A schedule without a strategy (a baseline, an anchor) is the plain solver: ``check``
accepts it and ``encode`` places it at the solver's own per-step choices
(``default_strategy``); ``project`` makes that explicit.

Follows the ``Space`` protocol (``searchd.schedules.spaces``): evolution, random and Bayes
search it as they search any space. Numerical code only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from searchd.schedule import Schedule
from searchd.schedules.guidance_spaces import GuidedSpace
from searchd.schedules.spaces import (
    ContinuousSpace,
    DiscreteSpace,
    _VectorSpace,
    halves_to_mutate,
    with_meta,
)
from searchd.solvers.strategy import default_strategy, family, parse_code


class StrategySpace(_VectorSpace):
    """Timesteps and a per-step solver strategy, searched together.

    Args:
        timesteps: a ``ContinuousSpace`` or ``DiscreteSpace``, or a ``GuidedSpace`` over
            one (its guidance weights are searched too, as that space searches them); its
            shape and solver are this space's. The solver must have per-step variants
            (``FAMILIES``).
        options: the solver's options as the run gives them (they set the plain solver's
            own choices, where a schedule without a strategy sits in this space).
        max_order: highest multistep order offered (default: the family's highest).
    """

    def __init__(self, timesteps: ContinuousSpace | DiscreteSpace | GuidedSpace,
                 options: Mapping[str, Any] | None = None, max_order: int | None = None
                 ) -> None:
        if not isinstance(timesteps, (ContinuousSpace, DiscreteSpace, GuidedSpace)):
            raise ValueError(f"timesteps is a {type(timesteps).__name__}; a strategy space "
                             "takes a ContinuousSpace, a DiscreteSpace or a GuidedSpace")
        orders, corrector, _ = family(timesteps.solver)
        if max_order is not None:
            if max_order not in orders:
                raise ValueError(f"max_order = {max_order!r}; {timesteps.solver} offers "
                                 f"orders {list(orders)}")
            orders = tuple(o for o in orders if o <= max_order)
        self.timesteps = timesteps
        self.n_steps = timesteps.n_steps
        self.final_zero = timesteps.final_zero
        self.solver = timesteps.solver
        self.sigma_min = timesteps.sigma_min
        self.sigma_max = timesteps.sigma_max
        self.options = dict(options or {})
        self.orders = orders
        self.corrector = corrector
        self.has_strategy = True

    @property
    def dim(self) -> int:
        return self.timesteps.dim + self.n_steps * (2 if self.corrector else 1)

    def describe(self) -> dict[str, Any]:
        return {"kind": "strategy", "timesteps": self.timesteps.describe(),
                "orders": list(self.orders), "corrector": self.corrector,
                "options": dict(self.options)}

    def __repr__(self) -> str:
        return f"StrategySpace({self.describe()})"

    # Halves -------------------------------------------------------------------------------
    @staticmethod
    def _strip(schedule: Schedule) -> Schedule:
        """The schedule without its strategy (timesteps, models, guidance and meta kept)."""
        return dataclasses.replace(schedule, strategy=None)

    def _join(self, times: Schedule, codes: list[str]) -> Schedule:
        """The timestep half (with its guidance weights, if any) and these codes."""
        return dataclasses.replace(times, model_ids=None, solver=self.solver,
                                   strategy=tuple(codes))

    def codes_of(self, schedule: Schedule) -> list[str]:
        """The strategy of a schedule of this space (the plain solver's for none)."""
        if schedule.strategy is not None:
            return list(schedule.strategy)
        return list(default_strategy(self.solver, self.n_steps, self.final_zero,
                                     self.options))

    def _choices(self, step: int) -> list[str]:
        """The distinct codes step ``step`` can take (its history limits the order)."""
        last = step == self.n_steps - 1
        out = []
        for o in self.orders:
            for c in ((False, True) if self.corrector and not last else (False,)):
                code = f"{o}{'c' if c else ''}"
                canon = self._canon_step(code, step)
                if canon not in out:
                    out.append(canon)
        return out

    def _canon_step(self, code: str, step: int) -> str:
        from searchd.solvers.strategy import canonical

        filler = ["1"] * self.n_steps
        filler[step] = code
        return canonical(self.solver, filler, self.n_steps, self.final_zero)[step]

    def _codes_of_u(self, u: np.ndarray) -> list[str]:
        n, k = self.n_steps, len(self.orders)
        idx = np.minimum(np.floor(u[:n] * k).astype(np.int64), k - 1)
        corr = (u[n:2 * n] >= 0.5) if self.corrector else np.zeros(n, dtype=bool)
        return [f"{self.orders[int(i)]}{'c' if c else ''}" for i, c in zip(idx, corr)]

    def _u_of_codes(self, codes: list[str]) -> np.ndarray:
        parsed = [parse_code(self.solver, c, i) for i, c in enumerate(codes)]
        k = len(self.orders)
        order_u = [(self.orders.index(min(o, self.orders[-1])) + 0.5) / k for o, _ in parsed]
        parts = [np.asarray(order_u, dtype=np.float64)]
        if self.corrector:
            parts.append(np.asarray([0.75 if c else 0.25 for _, c in parsed]))
        return np.concatenate(parts)

    # Protocol -----------------------------------------------------------------------------
    def _decode_vector(self, u: np.ndarray) -> Schedule:
        k = self.timesteps.dim
        times = self.timesteps._decode_vector(u[:k])
        return self._join(times, self._codes_of_u(u[k:]))

    def encode(self, schedule: Schedule) -> np.ndarray:
        return np.concatenate([self.timesteps.encode(self._strip(schedule)),
                               self._u_of_codes(self.codes_of(schedule))])

    def sample(self, rng: np.random.Generator) -> Schedule:
        return self._decode_vector(rng.random(self.dim))

    def _mutate_codes(self, codes: list[str], rng: np.random.Generator, m_prob: float
                      ) -> list[str]:
        """Each step with a choice takes another one with probability ``m_prob`` (at least
        one step does)."""
        codes = list(codes)
        free = [i for i in range(self.n_steps) if len(self._choices(i)) > 1]
        if not free:
            return codes
        mask = rng.random(len(free)) < m_prob
        if not mask.any():
            mask[rng.integers(len(free))] = True
        for i, on in zip(free, mask):
            if on:
                others = [c for c in self._choices(i) if c != self._canon_step(codes[i], i)]
                codes[i] = others[int(rng.integers(len(others)))]
        return codes

    def mutate(self, schedule: Schedule, rng: np.random.Generator, m_prob: float,
               scale: float = 0.1) -> Schedule:
        """The timestep half and the strategy half each mutate with probability 1/2 (at
        least one does), each with its own operator."""
        codes = self.codes_of(schedule)
        move_times, move_codes = halves_to_mutate(rng, self.timesteps.dim)
        times = self._strip(schedule)
        if move_times:
            times = self.timesteps.mutate(times, rng, m_prob, scale)
        if move_codes:
            codes = self._mutate_codes(codes, rng, m_prob)
        return self._join(times, codes)

    def crossover(self, a: Schedule, b: Schedule, rng: np.random.Generator) -> Schedule:
        """Timesteps by the timestep space's crossover; each step's choice from either."""
        times = self.timesteps.crossover(self._strip(a), self._strip(b), rng)
        ca, cb = self.codes_of(a), self.codes_of(b)
        take_a = rng.random(self.n_steps) < 0.5
        return self._join(times, [x if t else y for x, y, t in zip(ca, cb, take_a)])

    def check(self, schedule: Schedule) -> Schedule:
        """Raise ``ValueError`` unless the timesteps fit and the strategy (if any) uses
        only the orders this space offers."""
        self.timesteps.check(self._strip(schedule))
        if schedule.strategy is not None:
            for i, c in enumerate(schedule.strategy):
                order, _ = parse_code(self.solver, c, i)
                if order not in self.orders:
                    raise ValueError(f"strategy[{i}] = {c!r} uses order {order}; this space "
                                     f"offers {list(self.orders)}")
        return schedule

    def project(self, schedule: Schedule) -> Schedule:
        """The nearest timesteps of the space with the schedule's strategy made explicit."""
        times = self.timesteps.project(self._strip(schedule))
        codes = [c if parse_code(self.solver, c, i)[0] in self.orders
                 else f"{self.orders[-1]}{c[1:]}"
                 for i, c in enumerate(self.codes_of(schedule))]
        # A guided space's projection sets the guidance provenance; the rest is the input's.
        guided = isinstance(self.timesteps, GuidedSpace)
        meta = {k: v for k, v in dict(schedule.meta).items()
                if not (guided and k.startswith("guidance_"))}
        return with_meta(self._join(times, codes), **meta)
