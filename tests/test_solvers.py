"""Solvers against the closed-form probability-flow ODE of Gaussian data.

For data ``x0 ~ N(mu, Q diag(s^2) Q^T)`` the ideal denoiser is
``D(x, sigma) = mu + Q diag(s^2 / (s^2 + sigma^2)) Q^T (x - mu)``, and the ODE
``dx/dsigma = (x - D) / sigma`` is solved by
``x(sigma) - mu = Q diag(sqrt((s^2 + sigma^2) / (s^2 + sigma0^2))) Q^T (x(sigma0) - mu)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from searchd.schedules.baselines import VP_BETA_D, VP_BETA_MIN, baseline, vp_sigma_to_t
from searchd.solvers import SOLVERS, nfe, solve
from searchd.solvers._core import lagrange_weights
from searchd.solvers.exponential import kernel_moments
from searchd.solvers.linear_multistep import deis_coefficients, vp_time

SIGMA_MAX, SIGMA_MIN = 80.0, 0.05

# Every solver, with its non-default variants.
CONFIGS: list[tuple[str, dict]] = [
    ("euler", {}),
    ("heun", {}),
    ("dpmpp_2m", {}),
    ("dpmpp_3m", {}),
    ("unipc", {"order": 1}),
    ("unipc", {}),
    ("unipc", {"order": 3}),
    ("ipndm", {"order": 2}),
    ("ipndm", {}),
    ("ipndm", {"order": 3, "variable_step": True}),
    ("ipndm", {"variable_step": True}),
    ("deis", {"order": 2}),
    ("deis", {}),
]
CONFIG_IDS = [name + "".join(f"-{k}={v}" for k, v in o.items()) for name, o in CONFIGS]


class GaussianDenoiser:
    """Exact denoiser of anisotropic Gaussian data; records every call it gets."""

    sigma_min, sigma_max, sigma_grid, cost = 0.002, 80.0, None, 1.0

    def __init__(self, shape: tuple[int, ...] = (2, 3), seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        dim = math.prod(shape)
        self.shape = shape
        self.q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.var = torch.linspace(0.3, 1.8, dim, dtype=torch.float64) ** 2
        self.mu = torch.randn(dim, generator=g, dtype=torch.float64)
        self.calls: list[dict] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        self.calls.append({"sigma": sigma.detach().clone(), **cond})
        q, var, mu = (t.to(x.dtype) for t in (self.q, self.var, self.mu))
        z = (x.reshape(x.shape[0], -1) - mu) @ q
        gain = var / (var + sigma[:, None] ** 2)
        return (mu + (z * gain) @ q.T).reshape(x.shape)

    def exact(self, x_start: torch.Tensor, sigma_start, sigma_end) -> torch.Tensor:
        """The ODE solution at ``sigma_end`` from ``x_start`` at ``sigma_start`` (float64)."""
        s0 = torch.as_tensor(sigma_start, dtype=torch.float64).reshape(-1, 1)
        s1 = torch.as_tensor(sigma_end, dtype=torch.float64).reshape(-1, 1)
        z = (x_start.reshape(x_start.shape[0], -1) - self.mu) @ self.q
        scale = torch.sqrt((self.var + s1**2) / (self.var + s0**2))
        return (self.mu + (z * scale) @ self.q.T).reshape(x_start.shape)


def make_noise(batch: int = 8, shape: tuple[int, ...] = (2, 3), seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=g, dtype=torch.float64)


def solve_error(name: str, opts: dict, sigmas: np.ndarray) -> float:
    """Max abs error of the solver's sample against the exact ODE solution."""
    den, noise = GaussianDenoiser(), make_noise()
    x = solve(den, noise, sigmas, solver=name, **opts)
    exact = den.exact(noise * sigmas[0], sigmas[0], sigmas[-1])
    return float((x - exact).abs().max())


# Accuracy ----------------------------------------------------------------------------------
def polynomial_to_zero(n_steps: int, rho: float = 7.0) -> np.ndarray:
    """EDM's polynomial schedule with sigma_min = 0: it refines towards 0 as N grows."""
    return (SIGMA_MAX ** (1 / rho) * (1 - np.arange(n_steps + 1) / n_steps)) ** rho


@pytest.mark.parametrize("final_zero", [True, False], ids=["to-zero", "to-sigma-min"])
@pytest.mark.parametrize(("name", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_converges_to_the_exact_solution(name, opts, final_zero):
    order = SOLVERS[name].theoretical_order(**opts)
    if final_zero:
        sigmas = polynomial_to_zero(200)
    else:
        sigmas = baseline("polynomial", 200, SIGMA_MIN, SIGMA_MAX, final_zero=False)
    # Sample values are O(1); measured errors are 1.5x to 20x below these bounds.
    assert solve_error(name, opts, sigmas) < {1: 0.1, 2: 1e-2, 3: 1e-3, 4: 2e-4}[order]


@pytest.mark.parametrize(("name", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_empirical_order_matches_the_theoretical_order(name, opts):
    # EDM's schedule (rho = 7) from 80 to 0.05, ending above 0: every step is a regular one.
    ns = np.array([64, 128, 256])
    errors = np.array(
        [
            solve_error(name, opts, baseline("polynomial", int(n), SIGMA_MIN, SIGMA_MAX, False))
            for n in ns
        ]
    )
    assert errors.min() > 1e-11, f"errors {errors} are too close to round-off to measure"
    slope = -np.polyfit(np.log(ns), np.log(errors), 1)[0]
    expected = SOLVERS[name].theoretical_order(**opts)
    assert abs(slope - expected) <= 0.3, f"{name} {opts}: slope {slope:.2f}, errors {errors}"


def test_theoretical_orders():
    orders = {n: SOLVERS[n].theoretical_order() for n in SOLVERS}
    assert orders == {
        "euler": 1,
        "heun": 2,
        "dpmpp_2m": 2,
        "dpmpp_3m": 3,
        "unipc": 3,  # order 2 + the corrector
        "ipndm": 2,  # fixed coefficients on a graded schedule
        "deis": 3,
    }
    assert SOLVERS["ipndm"].theoretical_order(variable_step=True) == 4
    assert SOLVERS["unipc"].theoretical_order(order=3) == 4


def test_ipndm_fixed_coefficients_are_the_variable_step_ones_on_uniform_steps():
    den, noise = GaussianDenoiser(), make_noise()
    sigmas = np.linspace(20.0, 0.5, 13)
    for order in (2, 3, 4):
        fixed = solve(den, noise, sigmas, solver="ipndm", order=order)
        variable = solve(den, noise, sigmas, solver="ipndm", order=order, variable_step=True)
        assert (fixed - variable).abs().max() < 1e-12
    graded = baseline("polynomial", 12, 0.5, 20.0, final_zero=False)
    fixed = solve(den, noise, graded, solver="ipndm")
    variable = solve(den, noise, graded, solver="ipndm", variable_step=True)
    assert (fixed - variable).abs().max() > 1e-3


def test_lagrange_weights_integrate_polynomials_exactly_against_both_kernels():
    # Exponential kernel e^{-(h-u)} on [0, h] (DPM-Solver++ / UniPC) and the flat kernel on
    # [0, H] (variable-step Adams-Bashforth), checked against scipy's quadrature.
    rng = np.random.default_rng(0)
    nodes_np = [0.0, -0.4, -0.9, -1.2]
    h = 0.7
    for k in (1, 2, 3, 4):
        coeffs = rng.normal(size=k)

        def poly(u, c=coeffs):
            return sum(ci * u**n for n, ci in enumerate(c))

        values = torch.tensor([poly(u) for u in nodes_np[:k]], dtype=torch.float64)
        nodes = [torch.tensor([u], dtype=torch.float64) for u in nodes_np[:k]]
        ht = torch.tensor([h], dtype=torch.float64)
        for moments, kernel in (
            (kernel_moments(ht, k), lambda u: math.exp(-(h - u))),
            ([ht ** (n + 1) / (n + 1) for n in range(k)], lambda u: 1.0),
        ):
            weights = lagrange_weights(nodes, moments)
            got = sum(float(w) * v for w, v in zip(weights, values.tolist()))

            def integrand(u, kernel=kernel, poly=poly):
                return kernel(u) * poly(u)

            want = integrate.quad(integrand, 0.0, h, epsabs=1e-14)[0]
            assert got == pytest.approx(want, rel=1e-12, abs=1e-13)


def test_deis_coefficients_match_independent_quadrature():
    # C_j = int l_j(t(sigma)) dsigma over each step, with t(sigma) from the schedules module.
    assert (VP_BETA_MIN, VP_BETA_D) == (0.1, 19.9)
    sig = baseline("polynomial", 6, 0.002, 80.0, final_zero=True)
    t_np = vp_sigma_to_t(sig)
    st = torch.tensor(sig[:-1], dtype=torch.float64).unsqueeze(0)
    t = vp_time(st)
    assert np.allclose(t[0].numpy(), t_np[:-1], rtol=1e-12, atol=0)
    u = torch.cat([t.sqrt(), torch.zeros(1, 1, dtype=torch.float64)], dim=1)
    for i in range(2, 6):
        nodes_np = [t_np[i - j] for j in range(3)]
        got = deis_coefficients(u[:, i], u[:, i + 1], [t[:, i - j] for j in range(3)])
        assert float(sum(got)) == pytest.approx(sig[i + 1] - sig[i], rel=1e-10)
        for j in range(3):

            def basis(s, j=j, tn=nodes_np):
                tau = vp_sigma_to_t(np.float64(s))
                return np.prod([(tau - tn[m]) / (tn[j] - tn[m]) for m in range(3) if m != j])

            want, _ = integrate.quad(basis, sig[i], sig[i + 1], epsabs=1e-13, epsrel=1e-12)
            assert float(got[j]) == pytest.approx(want, rel=1e-8, abs=1e-12)


# Per-sample schedules ----------------------------------------------------------------------
@pytest.mark.parametrize("final_zero", [True, False], ids=["to-zero", "to-sigma-min"])
@pytest.mark.parametrize(("name", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_per_sample_rows_equal_to_the_shared_schedule_give_identical_results(
    name, opts, final_zero
):
    den, noise = GaussianDenoiser(), make_noise().float()
    sigmas = baseline("polynomial", 7, 0.002, 80.0, final_zero=final_zero)
    shared = solve(den, noise, sigmas, solver=name, **opts)
    rows = torch.tensor(sigmas).repeat(noise.shape[0], 1)
    per_sample = solve(den, noise, rows, solver=name, **opts)
    assert shared.dtype == torch.float32
    assert torch.equal(shared, per_sample)


@pytest.mark.parametrize("final_zero", [True, False], ids=["to-zero", "to-sigma-min"])
@pytest.mark.parametrize(("name", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_per_sample_rows_equal_solving_each_row_alone(name, opts, final_zero):
    den, noise = GaussianDenoiser(), make_noise(batch=4)
    rows = np.stack(
        [
            baseline("polynomial", 6, 0.002, 80.0, final_zero=final_zero, rho=7),
            baseline("polynomial", 6, 0.01, 40.0, final_zero=final_zero, rho=3),
            baseline("logsnr", 6, 0.002, 80.0, final_zero=final_zero),
            baseline("time_uniform", 6, 0.05, 10.0, final_zero=final_zero),
        ]
    )
    ids = np.array([[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0], [1, 0, 1, 0, 1, 0], [0] * 6])
    batched = solve(den, noise, rows, solver=name, model_ids=ids, **opts)
    for r in range(len(rows)):
        alone = solve(den, noise[r : r + 1], rows[r], solver=name, model_ids=ids[r], **opts)
        assert (batched[r : r + 1] - alone).abs().max() < 1e-13


# Cost and models ---------------------------------------------------------------------------
@pytest.mark.parametrize("final_zero", [True, False], ids=["to-zero", "to-sigma-min"])
@pytest.mark.parametrize(("name", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_nfe_is_the_number_of_denoiser_calls(name, opts, final_zero):
    for n in range(1, 11):
        den = GaussianDenoiser()
        sigmas = baseline("logsnr", n, 0.002, 80.0, final_zero=final_zero)
        solve(den, make_noise(batch=2).float(), sigmas, solver=name, **opts)
        assert len(den.calls) == nfe(name, n, final_zero=final_zero), f"N = {n}"
        assert all("model_id" not in c for c in den.calls)


def test_nfe_values():
    assert [nfe("heun", n) for n in (1, 2, 5)] == [1, 3, 9]
    assert [nfe("heun", n, final_zero=False) for n in (1, 2, 5)] == [2, 4, 10]
    for name in ("euler", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis"):
        assert nfe(name, 7) == nfe(name, 7, final_zero=False) == 7


@pytest.mark.parametrize("final_zero", [True, False], ids=["to-zero", "to-sigma-min"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_call_of_a_step_gets_that_steps_models(name, final_zero):
    den, noise = GaussianDenoiser(), make_noise(batch=3)
    n = 5
    sigmas = baseline("polynomial", n, 0.002, 80.0, final_zero=final_zero)
    ids = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [1, 1, 2, 2, 3]])
    solve(den, noise, sigmas, solver=name, model_ids=ids)
    # (step, level) of each call: Heun evaluates step i at levels i and i + 1.
    if name == "heun":
        expected = [(i, lv) for i in range(n) for lv in (i, i + 1)]
        expected = expected[:-1] if final_zero else expected
    else:
        expected = [(i, i) for i in range(n)]
    assert len(den.calls) == len(expected)
    for call, (step, level) in zip(den.calls, expected):
        assert call["model_id"].dtype == torch.int64
        assert torch.equal(call["model_id"], ids[:, step])
        assert torch.equal(call["sigma"], torch.full((3,), sigmas[level], dtype=torch.float64))
    # A model schedule [N] is the same for every sample.
    den.calls.clear()
    solve(den, noise, sigmas, solver=name, model_ids=[4, 3, 2, 1, 0])
    assert torch.equal(den.calls[0]["model_id"], torch.tensor([4, 4, 4]))


# Gradients ---------------------------------------------------------------------------------
@pytest.mark.parametrize("final_zero", [True, False], ids=["to-zero", "to-sigma-min"])
@pytest.mark.parametrize(("name", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_gradient_flows_to_the_sigmas(name, opts, final_zero):
    den, noise = GaussianDenoiser(), make_noise(batch=3)
    base = torch.tensor(baseline("polynomial", 6, 0.002, 80.0, final_zero=final_zero))
    weights = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(1, 2, 3)

    def loss(s: torch.Tensor) -> torch.Tensor:
        return (solve(den, noise, s, solver=name, **opts) * weights).sum()

    sigmas = base.clone().requires_grad_(True)
    loss(sigmas).backward()
    grad = sigmas.grad
    assert torch.isfinite(grad).all()

    # Central differences (Richardson-extrapolated) on sigma_0 and two interior levels (the
    # last one small); the final 0, if any, is not a free parameter: it fixes the ending.
    def central(j: int, eps: float) -> float:
        up, down = base.clone(), base.clone()
        up[j] += eps
        down[j] -= eps
        with torch.no_grad():
            return float(loss(up) - loss(down)) / (2 * eps)

    for j in (0, 3, 5):
        eps = 3e-3 * float(base[j])
        fd = (4 * central(j, eps / 2) - central(j, eps)) / 3
        assert float(grad[j]) == pytest.approx(fd, rel=1e-6, abs=1e-9), f"sigmas[{j}]"


def test_gradient_flows_per_sample_and_through_float32_samples():
    den, noise = GaussianDenoiser(), make_noise(batch=2).float()
    rows = torch.tensor(
        np.stack([baseline("logsnr", 5, 0.002, 80.0), baseline("polynomial", 5, 0.002, 80.0)]),
        requires_grad=True,
    )
    solve(den, noise, rows, solver="dpmpp_2m").square().sum().backward()
    assert rows.grad.dtype == torch.float64 and torch.isfinite(rows.grad).all()
    assert (rows.grad[:, :-1].abs() > 0).all()


# Bad input ---------------------------------------------------------------------------------
def test_bad_input_is_rejected_with_a_clear_message():
    den, noise = GaussianDenoiser(), make_noise(batch=2)
    good = [80.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"unknown solver 'rk4'; known solvers: euler, heun"):
        solve(den, noise, good, solver="rk4")
    with pytest.raises(ValueError, match=r"unknown solver 'rk4'"):
        nfe("rk4", 3)
    with pytest.raises(ValueError, match=r"n_steps = 0"):
        nfe("euler", 0)
    with pytest.raises(
        ValueError, match=r"ipndm: option order = 5 is not allowed; allowed: 1, 2, 3, 4"
    ):
        solve(den, noise, good, solver="ipndm", order=5)
    with pytest.raises(ValueError, match=r"unipc: option order = 4 .* allowed: 1, 2, 3"):
        solve(den, noise, good, solver="unipc", order=4)
    with pytest.raises(ValueError, match=r"deis: option order = True"):
        solve(den, noise, good, solver="deis", order=True)
    with pytest.raises(
        ValueError, match=r"euler: unknown option\(s\) \['order'\]; allowed options: none"
    ):
        solve(den, noise, good, solver="euler", order=2)
    with pytest.raises(
        ValueError,
        match=r"unknown option\(s\) \['eta'\]; allowed options: order, lower_order_final",
    ):
        solve(den, noise, good, solver="unipc", eta=0.0)
    with pytest.raises(
        ValueError, match=r"sigmas\[2\] = 1.0 is not below sigmas\[1\] = 1.0; .*strictly decreasing"
    ):
        solve(den, noise, [80.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"sigmas\[1, 2\] = 5.0 is not below sigmas\[1, 1\] = 2.0"):
        solve(den, noise, [[80.0, 2.0, 1.0], [80.0, 2.0, 5.0]])
    with pytest.raises(ValueError, match=r"mix endings: row 0 ends in 0 and row 1 ends at 0.5"):
        solve(den, noise, [[80.0, 2.0, 0.0], [80.0, 2.0, 0.5]])
    with pytest.raises(ValueError, match=r"sigmas\[1\] = nan; .*finite and >= 0"):
        solve(den, noise, [80.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match=r"sigmas\[2\] = -1.0"):
        solve(den, noise, [80.0, 1.0, -1.0])
    with pytest.raises(ValueError, match=r"at least 2 levels"):
        solve(den, noise, [80.0])
    with pytest.raises(ValueError, match=r"3 rows; the noise has 2 samples"):
        solve(den, noise, [good] * 3)
    with pytest.raises(
        ValueError, match=r"model_ids has shape \(3,\); expected \(2,\) or \(2, 2\)"
    ):
        solve(den, noise, good, model_ids=[0, 1, 2])
    with pytest.raises(ValueError, match=r"model_ids\[1, 0\] = -1 is negative"):
        solve(den, noise, good, model_ids=[[0, 0], [-1, 0]])
