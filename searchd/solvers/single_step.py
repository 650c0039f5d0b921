"""One-step solvers of the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``."""

from __future__ import annotations

from torch import Tensor

from searchd.solvers._core import Trajectory, combine
from searchd.solvers.stepping import SolverState, Stepper, run


def _euler_step(traj: Trajectory, state: SolverState) -> Tensor:
    """``x' = (s'/s) x + (1 - s'/s) D``: the Euler step ``x + (s' - s) (x - D) / s``."""
    sig, i = traj.sigmas, state.step
    ratio = sig[:, i + 1] / sig[:, i]
    return combine([(ratio, state.x), (1 - ratio, state.denoised[0])])


class Euler(Stepper):
    """Euler's method in sigma (first order; 1 evaluation per step).

    Written as ``x' = (s'/s) x + (1 - s'/s) D``, which is the Euler step
    ``x + (s' - s) (x - D) / s`` and, for ``s' = 0``, returns ``D``.
    """

    def advance(self, traj: Trajectory, state: SolverState) -> SolverState:
        # Euler step.
        return state.moved(_euler_step(traj, state))


class Heun(Stepper):
    """EDM's second-order Heun method (Karras et al. 2022, Algorithm 1, deterministic).

    Two evaluations per step, except the step to ``sigma = 0``, which is an Euler step
    (it returns the denoiser's output), hence ``2N - 1`` evaluations with a final 0. The
    correction's evaluation is at the next level, so it belongs to ``advance``.
    """

    def advance(self, traj: Trajectory, state: SolverState) -> SolverState:
        i, x, denoised = state.step, state.x, state.denoised[0]
        # Euler step.
        x_euler = _euler_step(traj, state)
        if traj.final_zero and i == traj.n_steps - 1:
            return state.moved(x_euler)
        # Heun correction: average the slopes at both ends.
        denoised_next = traj.denoise(x_euler, i, i + 1)
        sig = traj.sigmas
        s, s_next = sig[:, i], sig[:, i + 1]
        half_step = 0.5 * (s_next - s)
        x = combine(
            [
                (1 + half_step / s, x),
                (-half_step / s, denoised),
                (half_step / s_next, x_euler),
                (-half_step / s_next, denoised_next),
            ]
        )
        return state.moved(x)


def euler(traj: Trajectory, x: Tensor) -> Tensor:
    """Euler's method along the whole trajectory (see ``Euler``)."""
    return run(Euler(), traj, x)


def heun(traj: Trajectory, x: Tensor) -> Tensor:
    """Heun's method along the whole trajectory (see ``Heun``)."""
    return run(Heun(), traj, x)
