"""Linear multistep solvers of ``dx/dsigma = eps(x, sigma)``, ``eps = (x - D) / sigma``.

In the EDM parameterization the exponential integrator of DEIS has no linear part left:
``x(sigma_{i+1}) = x(sigma_i) + int eps dsigma``. Both solvers here extrapolate ``eps``
from past steps and integrate it over the step:

- ``ipndm``: improved PNDM (Zhang & Chen 2023, DEIS paper; zju-pi/diff-sampler's
  ``ipndm``): the fixed Adams-Bashforth coefficients of orders 1..4, the order growing by
  one per step (warm-up by lower-order multistep steps instead of PNDM's Runge-Kutta).
- ``deis``: DEIS's tAB: the polynomial through the past ``eps`` in VP time ``t`` (linear-beta
  VP-SDE), integrated over the step against the kernel ``dsigma/dt``.

Both are linear in ``eps``, so the step to ``sigma = 0`` is an ordinary step (no log, no
division by the target level): the multistep formula is used there too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from searchd.solvers._core import Trajectory, combine, lagrange_weights
from searchd.solvers.stepping import SolverState, Stepper, run

# Adams-Bashforth coefficients for equal steps, newest first (iPNDM).
AB_COEFFICIENTS: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}

# The linear-beta VP-SDE of Song et al. (the same as searchd.schedules.baselines):
# sigma(t)^2 = exp(beta_min t + beta_d t^2 / 2) - 1.
VP_BETA_MIN = 0.1
VP_BETA_D = 19.9

# Gauss-Legendre nodes and weights on [-1, 1] for DEIS's coefficient integrals.
DEIS_QUADRATURE_NODES = 24
_GL_X, _GL_W = np.polynomial.legendre.leggauss(DEIS_QUADRATURE_NODES)


def _residuals(state: SolverState) -> list[Tensor]:
    """``x_j - D_j`` of the steps kept, newest first (``eps_j`` times ``sigma_j``)."""
    return [x - d for x, d in zip(state.evaluated, state.denoised)]


class IPNDM(Stepper):
    """Improved PNDM: ``x_{i+1} = x_i + (s_{i+1} - s_i) sum_j b_j eps_{i-j}``.

    ``b`` are the equal-step Adams-Bashforth coefficients of order ``k = min(order, i + 1)``,
    applied on whatever schedule is given, as in the DEIS paper and diff-sampler's
    ``ipndm``. That is of order ``order`` on a schedule uniform in sigma; on a graded
    schedule the fixed coefficients leave an O(h^3) error per step, so the method is of
    order ``min(order, 2)`` there (docs/notes-solvers.md). ``variable_step=True`` uses the
    variable-step Adams-Bashforth coefficients instead (diff-sampler's ``ipndm_v``):
    ``int_{s_i}^{s_{i+1}} l_j(s) ds`` for the Lagrange basis over ``s_i, ..., s_{i-k+1}``,
    of order ``order`` on any smooth schedule. 1 evaluation per step.
    """

    def __init__(self, order: int = 4, variable_step: bool = False) -> None:
        self.history = order
        self.variable_step = variable_step

    def advance(self, traj: Trajectory, state: SolverState) -> SolverState:
        i, sig = state.step, traj.sigmas
        k = self.order_at(traj, state)
        residuals = _residuals(state)[:k]
        dsig = sig[:, i + 1] - sig[:, i]
        if self.variable_step:
            nodes = [sig[:, i - j] - sig[:, i] for j in range(k)]
            coeffs = lagrange_weights(nodes, [dsig ** (n + 1) / (n + 1) for n in range(k)])
        else:
            coeffs = [dsig * b for b in AB_COEFFICIENTS[k]]
        # Adams-Bashforth step on eps_j = (x_j - D_j) / sigma_j.
        terms = [(c / sig[:, i - j], r) for j, (c, r) in enumerate(zip(coeffs, residuals))]
        return state.moved(state.x + combine(terms))


class DEIS(Stepper):
    """DEIS tAB (Zhang & Chen 2023): ``x_{i+1} = x_i + sum_j C_ij eps_{i-j}``.

    ``C_ij = int_{t_i}^{t_{i+1}} l_j(t) (dsigma/dt) dt = int_{s_i}^{s_{i+1}} l_j(t(s)) ds``,
    with ``l_j`` the Lagrange basis in VP time over ``t_i, ..., t_{i-k+1}``,
    ``k = min(order, i + 1)``. Computed by Gauss-Legendre quadrature (24 nodes) in
    ``u = sqrt(t)``, in which ``sigma`` is analytic down to ``sigma = 0``. 1 evaluation per
    step.
    """

    def __init__(self, order: int = 3) -> None:
        self.history = order

    def advance(self, traj: Trajectory, state: SolverState) -> SolverState:
        i, sig = state.step, traj.sigmas
        t = vp_time(traj.positive)
        u = torch.sqrt(t)
        if traj.final_zero:
            u = torch.cat([u, torch.zeros_like(u[:, :1])], dim=1)
        k = self.order_at(traj, state)
        residuals = _residuals(state)[:k]
        if k == 1:
            coeffs = [sig[:, i + 1] - sig[:, i]]
        else:
            nodes = [t[:, i - j] for j in range(k)]
            coeffs = deis_coefficients(u[:, i], u[:, i + 1], nodes)
        # Multistep step on eps_j = (x_j - D_j) / sigma_j.
        terms = [(c / sig[:, i - j], r) for j, (c, r) in enumerate(zip(coeffs, residuals))]
        return state.moved(state.x + combine(terms))


def ipndm(traj: Trajectory, x: Tensor, order: int = 4, variable_step: bool = False) -> Tensor:
    """Improved PNDM along the whole trajectory (see ``IPNDM``)."""
    return run(IPNDM(order, variable_step), traj, x)


def deis(traj: Trajectory, x: Tensor, order: int = 3) -> Tensor:
    """DEIS tAB along the whole trajectory (see ``DEIS``)."""
    return run(DEIS(order), traj, x)


def vp_time(sigma: Tensor) -> Tensor:
    """VP time of EDM levels: the root of ``beta_d t^2 / 2 + beta_min t = log(1 + sigma^2)``.

    Written as ``2 L / (sqrt(beta_min^2 + 2 beta_d L) + beta_min)``, exact near sigma = 0.
    """
    log1p = torch.log1p(sigma**2)
    return 2 * log1p / (torch.sqrt(VP_BETA_MIN**2 + 2 * VP_BETA_D * log1p) + VP_BETA_MIN)


def vp_sigma_of_sqrt_time(u: Tensor) -> tuple[Tensor, Tensor]:
    """``sigma`` and ``dsigma/du`` at ``u = sqrt(t)`` (u > 0) [any shape]."""
    t = u * u
    sigma = torch.sqrt(torch.expm1(VP_BETA_MIN * t + 0.5 * VP_BETA_D * t * t))
    dsigma = u * (VP_BETA_MIN + VP_BETA_D * t) * (1 + sigma * sigma) / sigma
    return sigma, dsigma


def deis_coefficients(u_from: Tensor, u_to: Tensor, nodes: list[Tensor]) -> list[Tensor]:
    """``int_{u_from}^{u_to} l_j(u^2) (dsigma/du) du`` for the Lagrange basis over ``nodes``.

    ``u_from``, ``u_to`` [B] are ``sqrt`` of VP times; ``nodes`` are k VP times [B] each.
    Returns k coefficients [B] (float64); they sum to ``sigma(u_to) - sigma(u_from)``.
    """
    gl_x = torch.as_tensor(_GL_X, dtype=u_from.dtype, device=u_from.device)
    gl_w = torch.as_tensor(_GL_W, dtype=u_from.dtype, device=u_from.device)
    mid, half = 0.5 * (u_to + u_from), 0.5 * (u_to - u_from)
    uq = mid.unsqueeze(-1) + half.unsqueeze(-1) * gl_x  # [B, Q]
    _, dsigma = vp_sigma_of_sqrt_time(uq)
    weight = half.unsqueeze(-1) * gl_w * dsigma  # [B, Q]
    tq = uq * uq
    coeffs = []
    for j, tj in enumerate(nodes):
        basis = torch.ones_like(tq)
        for m, tm in enumerate(nodes):
            if m != j:
                basis = basis * (tq - tm.unsqueeze(-1)) / (tj - tm).unsqueeze(-1)
        coeffs.append((basis * weight).sum(-1))
    return coeffs
