"""One-step solvers of the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``."""

from __future__ import annotations

from torch import Tensor

from searchd.solvers._core import Trajectory, combine


def euler(traj: Trajectory, x: Tensor) -> Tensor:
    """Euler's method in sigma (first order; 1 evaluation per step).

    Written as ``x' = (s'/s) x + (1 - s'/s) D``, which is the Euler step
    ``x + (s' - s) (x - D) / s`` and, for ``s' = 0``, returns ``D``.
    """
    for i in range(traj.n_steps):
        denoised = traj.denoise(x, i)
        sig = traj.sigmas
        s, s_next = sig[:, i], sig[:, i + 1]
        # Euler step.
        ratio = s_next / s
        x = combine([(ratio, x), (1 - ratio, denoised)])
    return x


def heun(traj: Trajectory, x: Tensor) -> Tensor:
    """EDM's second-order Heun method (Karras et al. 2022, Algorithm 1, deterministic).

    Two evaluations per step, except the step to ``sigma = 0``, which is an Euler step
    (it returns the denoiser's output), hence ``2N - 1`` evaluations with a final 0.
    """
    for i in range(traj.n_steps):
        denoised = traj.denoise(x, i)
        sig = traj.sigmas
        s, s_next = sig[:, i], sig[:, i + 1]
        # Euler step.
        ratio = s_next / s
        x_euler = combine([(ratio, x), (1 - ratio, denoised)])
        if traj.final_zero and i == traj.n_steps - 1:
            x = x_euler
            break
        # Heun correction: average the slopes at both ends.
        denoised_next = traj.denoise(x_euler, i, i + 1)
        half_step = 0.5 * (s_next - s)
        x = combine(
            [
                (1 + half_step / s, x),
                (-half_step / s, denoised),
                (half_step / s_next, x_euler),
                (-half_step / s_next, denoised_next),
            ]
        )
    return x
