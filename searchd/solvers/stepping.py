"""Solvers as steps over an immutable state, so that a state can be continued several ways.

Every solver is a ``Stepper``: step ``i`` of a schedule is two phases,

- ``observe(traj, state)``: the step's first denoiser call, ``D(x_i, sigma_i)``, and whatever
  else depends only on the levels ``sigma_0 .. sigma_i`` (UniPC's corrector);
- ``advance(traj, state)``: the move from level ``i`` to level ``i + 1`` (which reads
  ``sigma_{i+1}``, and for a two-stage method calls the denoiser again there).

``run(stepper, traj, x)`` alternates them for ``i = 0 .. N-1`` and is what ``solve`` does.
The state after ``observe`` of step ``i`` depends only on the noise, the levels up to
``sigma_i`` and the step's models (and any other per-step conditioning the trajectory hands
the denoiser), never on later levels. So schedules that agree on their first ``k + 1``
levels share that state, the denoiser calls of steps ``0 .. k`` included, and it can be
computed once and continued along each of them (``searchd.solvers.prefix``).

A ``SolverState`` is immutable and its tensors are never written in place: continuing a
state along one schedule leaves it intact for the next. It carries the data predictions
and the samples they were taken at (newest first), which is all any solver here needs, so
a step of one solver can follow a step of another (per-step strategies).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

from torch import Tensor

from searchd.solvers._core import Trajectory


@dataclass(frozen=True)
class SolverState:
    """What a solver carries between its phases.

    Attributes:
        step: i: ``x`` is the sample at level ``sigma_i``.
        x: the sample [B, *shape] (after UniPC's observe: the corrected one).
        denoised: data predictions ``D(x_j, sigma_j)`` [B, *shape] of the last steps, newest
            first; after ``observe`` of step i, ``denoised[0]`` is step i's.
        evaluated: the samples ``x_j`` those predictions were taken at (same length).
        previous: the sample the last ``advance`` started from (None before the first).
        observed: step i's denoiser call is in ``denoised[0]``.
    """

    step: int
    x: Tensor
    denoised: tuple[Tensor, ...] = ()
    evaluated: tuple[Tensor, ...] = ()
    previous: Tensor | None = None
    observed: bool = False

    def with_evaluation(self, denoised: Tensor, keep: int) -> SolverState:
        """This state with step i's data prediction added (histories cut to ``keep``)."""
        return replace(
            self,
            denoised=(denoised, *self.denoised)[:keep],
            evaluated=(self.x, *self.evaluated)[:keep],
            observed=True,
        )

    def moved(self, x: Tensor) -> SolverState:
        """The state at the next level, reached from this one's sample with ``x``."""
        return replace(self, step=self.step + 1, x=x, previous=self.x, observed=False)


class Stepper(ABC):
    """A solver written as two phases per step (see the module docstring).

    Attributes:
        history: how many past data predictions the solver keeps (its multistep order).
    """

    history: int = 1

    def start(self, traj: Trajectory, x: Tensor) -> SolverState:
        """The state at level 0: ``x = noise * sigma_0`` [B, *shape]."""
        del traj
        return SolverState(step=0, x=x)

    def observe(self, traj: Trajectory, state: SolverState) -> SolverState:
        """Step i's first denoiser call, ``D(x_i, sigma_i)`` (reads no level beyond i)."""
        return state.with_evaluation(traj.denoise(state.x, state.step), self.keep(traj))

    # Per-step strategies (searchd.solvers.strategy) -----------------------------------------
    def keep(self, traj: Trajectory) -> int:
        """How many data predictions to carry: the solver's history, or with a per-step
        strategy the longest any strategy uses (the same for every strategy, so schedules
        that share a prefix share its state)."""
        if getattr(traj, "strategy", None) is None:
            return self.history
        from searchd.strategy_codes import MAX_ORDER

        return max(self.history, MAX_ORDER)

    def order_at(self, traj: Trajectory, state: SolverState) -> int:
        """The multistep order of step i: the strategy's where the trajectory has one,
        else the solver's (``history``), never more than the predictions held."""
        strategy = getattr(traj, "strategy", None)
        want = self.history if strategy is None else strategy.orders[state.step]
        return min(want, len(state.denoised))

    @abstractmethod
    def advance(self, traj: Trajectory, state: SolverState) -> SolverState:
        """Move an observed state from level i to level i + 1."""


def run(stepper: Stepper, traj: Trajectory, x: Tensor) -> Tensor:
    """Integrate along the whole trajectory from ``x`` (the noise times ``sigma_0``).

    Returns the sample [B, *shape] at the last level.
    """
    state = stepper.start(traj, x)
    for _ in range(traj.n_steps):
        state = stepper.advance(traj, stepper.observe(traj, state))
    return state.x
