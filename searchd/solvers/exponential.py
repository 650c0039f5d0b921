"""Multistep exponential integrators in ``lambda = -log(sigma)``: DPM-Solver++ and UniPC.

With ``x = x0 + sigma * n`` the probability-flow ODE, written for the data prediction
``D``, has the exact solution over one step ``lambda_i -> lambda_i + h``

    x(lambda_i + h) = e^{-h} x(lambda_i) + int_0^h e^{-(h - u)} D(lambda_i + u) du,

and ``e^{-h} = sigma_{i+1} / sigma_i``. The solvers differ in how they approximate ``D`` over
the step from the data predictions of past steps. The moments of the kernel,
``M_k(h) = int_0^h e^{-(h-u)} u^k du`` (``M_0 = 1 - e^{-h}``, ``M_k = h^k - k M_{k-1}``),
give every coefficient in closed form.

The step to ``sigma = 0`` (``h = inf``) returns the last data prediction ``D(x, sigma_{N-1})``,
as k-diffusion's DPM-Solver++ samplers and UniPC's ``denoise_to_zero`` do: it is the limit of
the first-order step, and the multistep corrections, which scale with ``h / h_prev``, have
no limit there.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from searchd.solvers._core import Trajectory, combine, lagrange_weights
from searchd.solvers.stepping import SolverState, Stepper, run

# Below this many steps UniPC lowers the order of its last steps (``lower_order_final``). UniPC's
# code and diffusers' UniPC scheduler do it at every N, which makes a schedule ending above 0
# first order in its last step (so second order overall); the threshold is the one of
# diffusers' DPMSolverMultistepScheduler, where lower_order_final is a few-step stabilizer.
UNIPC_LOWER_ORDER_FINAL_BELOW = 15


def kernel_moments(h: Tensor, k: int) -> list[Tensor]:
    """``[M_0, ..., M_{k-1}]`` with ``M_n = int_0^h e^{-(h-u)} u^n du``; ``h`` [B] float64."""
    moments = [-torch.expm1(-h)]
    for n in range(1, k):
        moments.append(h**n - n * moments[-1])
    return moments


class DPMpp2M(Stepper):
    """DPM-Solver++(2M) (Lu et al. 2022), deterministic, as k-diffusion's ``sample_dpmpp_2m``.

    First step first order (DDIM); then the data prediction is extrapolated linearly
    ``D + (D - D_prev) / (2 r)``, ``r = h_prev / h``, and integrated with weight
    ``1 - e^{-h}``. Second order; 1 evaluation per step.
    """

    history = 2

    def advance(self, traj: Trajectory, state: SolverState) -> SolverState:
        i, x = state.step, state.x
        if traj.final_zero and i == traj.n_steps - 1:
            # Step to sigma = 0: the data prediction.
            return state.moved(state.denoised[0])
        order = self.order_at(traj, state)
        if order > 2:
            # Third-order step of a per-step strategy: DPM-Solver++(3M)'s.
            return _exponential_adams_step(traj, state, order)
        sig, lam = traj.sigmas, traj.lam
        h = lam[:, i + 1] - lam[:, i]
        ratio = sig[:, i + 1] / sig[:, i]
        m0 = -torch.expm1(-h)
        if order == 1:
            # First-order step (DDIM).
            return state.moved(combine([(ratio, x), (m0, state.denoised[0])]))
        # Second-order multistep step.
        denoised, denoised_prev = state.denoised[:2]
        half_inv_r = 0.5 * h / (lam[:, i] - lam[:, i - 1])
        return state.moved(
            combine(
                [(ratio, x), (m0 * (1 + half_inv_r), denoised), (-m0 * half_inv_r, denoised_prev)]
            )
        )


class ExponentialAdams(Stepper):
    """Exponential Adams-Bashforth in lambda with Lagrange interpolation of ``D``.

    The data prediction is interpolated by the polynomial through the last ``order`` data
    predictions (in lambda) and integrated exactly against the kernel ``e^{-(h-u)}``.
    Warm-up: orders 1, 2, ... up to ``order``.
    """

    def __init__(self, order: int) -> None:
        self.history = order

    def advance(self, traj: Trajectory, state: SolverState) -> SolverState:
        if traj.final_zero and state.step == traj.n_steps - 1:
            # Step to sigma = 0: the data prediction.
            return state.moved(state.denoised[0])
        return _exponential_adams_step(traj, state, self.order_at(traj, state))


def _exponential_adams_step(traj: Trajectory, state: SolverState, k: int) -> SolverState:
    """The exponential Adams step of order ``k`` from an observed state (not to sigma = 0)."""
    i, history = state.step, state.denoised[:k]
    sig, lam = traj.sigmas, traj.lam
    h = lam[:, i + 1] - lam[:, i]
    nodes = [lam[:, i - j] - lam[:, i] for j in range(k)]
    weights = lagrange_weights(nodes, kernel_moments(h, k))
    # Exponential multistep step.
    return state.moved(combine([(sig[:, i + 1] / sig[:, i], state.x), *zip(weights, history)]))


class UniPC(Stepper):
    """UniPC (Zhao et al. 2023), multistep, data prediction, ``B(h) = e^h - 1`` (bh2).

    Each step ``i`` evaluates ``m_i = D(x_i, sigma_i)`` once, uses it in the corrector UniC
    to refine ``x_i`` (no extra evaluation; it reads levels up to i, so it is part of
    ``observe``), then predicts ``x_{i+1}`` with UniP. The predictor of order ``p`` uses
    ``m_i, ..., m_{i-p+1}``; the corrector of that step adds ``m_{i+1}`` and has order
    ``p + 1``. Warm-up: ``p = 1, 2, ...`` up to ``order``; with ``lower_order_final`` and
    fewer than 15 steps, ``p <= N - i`` in the last steps. The last step has no corrector
    (its evaluation would be an extra one). Default ``order=2`` (bh2 with order 2 is
    diffusers' default and the authors' choice for guided sampling; see
    docs/notes-solvers.md for why not 3 here).
    """

    def __init__(self, order: int = 2, lower_order_final: bool = True) -> None:
        self.history = order
        self.order = order
        self.lower_order_final = lower_order_final

    def step_order(self, traj: Trajectory, i: int) -> int:
        """Order p of the predictor of step i (a per-step strategy's where there is one)."""
        strategy = getattr(traj, "strategy", None)
        if strategy is not None:
            return min(strategy.orders[i], i + 1)
        p = min(self.order, i + 1)
        if self.lower_order_final and traj.n_steps < UNIPC_LOWER_ORDER_FINAL_BELOW:
            p = min(p, traj.n_steps - i)
        return p

    def observe(self, traj: Trajectory, state: SolverState) -> SolverState:
        i = state.step
        denoised = traj.denoise(state.x, i)
        observed = state.with_evaluation(denoised, self.keep(traj))
        if (traj.final_zero and i == traj.n_steps - 1) or state.previous is None:
            return observed
        strategy = getattr(traj, "strategy", None)
        if strategy is not None and not strategy.correctors[i - 1]:
            return observed  # the strategy has no corrector after step i-1
        # UniC corrector of the step i-1 -> i, with the new evaluation.
        p_prev = self.step_order(traj, i - 1)
        x = _unipc_update(
            traj.sigmas, traj.lam, i - 1, state.previous, list(state.denoised[:p_prev]),
            p_prev, denoised,
        )
        return replace(observed, x=x)

    def advance(self, traj: Trajectory, state: SolverState) -> SolverState:
        i = state.step
        if traj.final_zero and i == traj.n_steps - 1:
            # Step to sigma = 0: the data prediction.
            return state.moved(state.denoised[0])
        p = self.step_order(traj, i)
        # UniP predictor of the step i -> i+1.
        x = _unipc_update(
            traj.sigmas, traj.lam, i, state.x, list(state.denoised[:p]), p, None
        )
        return state.moved(x)


def dpmpp_2m(traj: Trajectory, x: Tensor) -> Tensor:
    """DPM-Solver++(2M) along the whole trajectory (see ``DPMpp2M``)."""
    return run(DPMpp2M(), traj, x)


def dpmpp_3m(traj: Trajectory, x: Tensor) -> Tensor:
    """DPM-Solver++(3M), deterministic (k-diffusion's ``sample_dpmpp_3m_sde`` with eta = 0).

    ``ExponentialAdams`` of order 3: warm-up orders 1, 2, then 3. Third order; 1 evaluation
    per step. The third-order term is the exact integral of the quadratic interpolant.
    k-diffusion writes it as ``-phi_3 * d2`` with ``d2 = (d1_0 - d1_1) / (r0 + r1)``, which
    is half of that integral (so its 3M is second order); see docs/notes-solvers.md.
    """
    return run(ExponentialAdams(3), traj, x)


def unipc(traj: Trajectory, x: Tensor, order: int = 2, lower_order_final: bool = True) -> Tensor:
    """UniPC along the whole trajectory (see ``UniPC``)."""
    return run(UniPC(order, lower_order_final), traj, x)


def _unipc_update(
    sig: Tensor,
    lam: Tensor,
    i: int,
    x: Tensor,
    history: list[Tensor],
    p: int,
    model_next: Tensor | None,
) -> Tensor:
    """One UniP step ``i -> i+1`` of order ``p`` or, given ``model_next``, its UniC version.

    ``x_{i+1} = (s_{i+1}/s_i) x + M_0 m_i - B(h) sum_k a_k D_k``, with ``B(h) = -M_0`` (bh2),
    ``D_k = (m_{i-k} - m_i) / r_k``, ``r_k = (lambda_{i-k} - lambda_i) / h``, and the
    corrector's extra term ``D_p = m_{i+1} - m_i`` (``r_p = 1``). The ``a_k`` solve the order
    conditions ``sum_k a_k r_k^{n-1} = M_n / (h^n M_0)``, n = 1, 2, ... (UniPC's
    ``b_n = h phi_{n+1}(h) n! / B(h)``); as in UniPC, ``a = 1/2`` is used for the order-2
    predictor and the order-1 corrector.
    """
    h = lam[:, i + 1] - lam[:, i]
    ratios = [(lam[:, i - k] - lam[:, i]) / h for k in range(1, p)]
    moments = kernel_moments(h, p + 1)
    m0 = moments[0]
    if model_next is not None:
        ratios.append(torch.ones_like(h))
    n_eq = len(ratios)
    if n_eq == 0:
        rhos: list[Tensor] = []
    elif n_eq == 1:
        rhos = [torch.full_like(h, 0.5)]
    else:
        # Solve the Vandermonde system sum_k a_k r_k^n = b_n (n < n_eq): its solution is
        # a_k = sum_n c_kn b_n, with c_kn the monomial coefficients of the Lagrange basis
        # over the r_k, which is what lagrange_weights computes.
        rhs = [moments[n] / (h**n * m0) for n in range(1, n_eq + 1)]
        rhos = lagrange_weights(ratios, rhs)
    # The update as weights on x, m_i, the past m_{i-k} and m_{i+1}.
    w_cur = m0
    terms: list[tuple[Tensor, Tensor]] = []
    for k, (rho, r) in enumerate(zip(rhos, ratios), start=1):
        w = m0 * rho / r
        w_cur = w_cur - w
        terms.append((w, history[k] if k < p else model_next))
    return combine([(sig[:, i + 1] / sig[:, i], x), (w_cur, history[0]), *terms])
