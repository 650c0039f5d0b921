"""LD3 (searchd/search/ld3.py): parameterization, gradients, the slack, and convergence to a
schedule known from a closed form.

The known case: Gaussian data N(mu, s^2 I) and the Euler solver. Each Euler step from
sigma to sigma' multiplies the deviation from mu by ``1 + (sigma' - sigma) sigma /
(s^2 + sigma^2)`` (the step to 0 by ``s^2 / (s^2 + sigma^2)``), and the exact flow from
sigma_max to 0 by ``s / sqrt(s^2 + sigma_max^2)``. So the loss of a schedule is
``(G - G*)^2`` times the mean squared deviation of the initial points, in closed form, and
its minimizer over the two free levels of a 3-step schedule is found by brute force on a
grid. LD3 runs through the project's solver on the Gaussian's denoiser in closed form (and,
in the other tests, on the project's Gaussian-mixture denoiser with one component).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch

from searchd.evaluation.teacher import TeacherCache, TeacherSettings
from searchd.methods.ld3 import (
    FiniteDifferenceSigma,
    Ld3Parameterization,
    compute_ld3,
    differentiable_in_sigma,
    feature_distance,
    ld3_schedule,
    ld3_slack,
    relax_noise,
    with_sigma_gradient,
)
from searchd.models import GaussianMixtureDenoiser, load
from searchd.noise import make_noise
from searchd.schedule import Schedule
from searchd.schedules.baselines import baseline
from searchd.solvers import solve

SMIN, SMAX = 0.002, 80.0
S, D = 0.5, 4
MU = np.array([0.3, -0.2, 0.1, 0.0])


@pytest.fixture(autouse=True)
def small_threads(one_thread):
    yield
    assert not ray.is_initialized(), "these tests must not start Ray"


def gaussian() -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser([1.0], MU[None], (S**2 * np.eye(D))[None], shape=(D,),
                                   sigma_min=SMIN, sigma_max=SMAX, dtype=torch.float64)


class AnalyticGaussian:
    """The same Gaussian's denoiser in closed form, differentiable in sigma by autograd."""

    shape, sigma_min, sigma_max, sigma_grid, cost = (D,), SMIN, SMAX, None, 1.0

    def __call__(self, x, sigma, **cond):
        mu = torch.as_tensor(MU, dtype=x.dtype)
        k = (S**2 / (S**2 + sigma**2)).reshape(-1, 1)
        return mu + k * (x - mu)


def exact_teacher(noise: torch.Tensor) -> torch.Tensor:
    mu = torch.as_tensor(MU, dtype=noise.dtype)
    return mu + (SMAX * noise - mu) * S / math.sqrt(S**2 + SMAX**2)


def closed_form_loss(levels: np.ndarray, noise: torch.Tensor) -> np.ndarray:
    """Mean squared error of Euler over ``levels`` [..., N+1] (ending in 0) against the
    exact flow, on ``noise`` [B, D]."""
    g = np.ones(levels.shape[:-1])
    for i in range(levels.shape[-1] - 1):
        a, b = levels[..., i], levels[..., i + 1]
        g = g * (1 + (b - a) * a / (S**2 + a**2))
    g_star = S / math.sqrt(S**2 + SMAX**2)
    e2 = float(((SMAX * noise.numpy() - MU) ** 2).mean())
    return (g - g_star) ** 2 * e2


def brute_force_optimum(noise: torch.Tensor) -> tuple[np.ndarray, float]:
    """Best (sigma_1, sigma_2) of the schedule [80, sigma_1, sigma_2, 0]: a coarse grid
    over the whole range, then a fine one around its best point."""
    lo, hi = math.log(SMIN), math.log(SMAX)
    centre, half = None, None
    for n, width in ((400, None), (400, 0.05)):
        if width is None:
            axis = np.exp(np.linspace(lo, hi, n + 1)[:-1])
            a, b = np.meshgrid(axis, axis, indexing="ij")
        else:
            a, b = np.meshgrid(centre[0] * np.exp(np.linspace(-half, half, n)),
                               centre[1] * np.exp(np.linspace(-half, half, n)), indexing="ij")
        lv = np.stack([np.full_like(a, SMAX), a, b, np.zeros_like(a)], axis=-1)
        loss = np.where((a < SMAX) & (a > b) & (b >= SMIN), closed_form_loss(lv, noise), np.inf)
        i = np.unravel_index(np.argmin(loss), loss.shape)
        centre, half, best = (a[i], b[i]), 0.05, float(loss[i])
    return np.array(centre), best


# Parameterization ---------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["logsnr", "rho"])
@pytest.mark.parametrize(("final_zero", "free_end"), [(True, True), (True, False), (False, True)])
def test_every_logit_vector_gives_a_valid_schedule(space, final_zero, free_end):
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 8):
        p = Ld3Parameterization(n, SMIN, SMAX, final_zero, space, free_end=free_end)
        want_free = max(n - 2, 0) if final_zero and not free_end else n - 1
        assert p.n_free == want_free
        for scale in (0.0, 1.0, 30.0, 1000.0):
            theta = torch.as_tensor(rng.normal(0, scale, p.n_params))
            sig = p.sigmas(theta).numpy()
            s = Schedule(sig).check_range(SMIN, SMAX)
            assert s.n_steps == n and s.final_zero == final_zero and sig[0] == SMAX
            if not final_zero or (not free_end and n > 1):
                assert sig[p.n_levels - 1] == SMIN
            if p.n_params:
                np.testing.assert_allclose(p.sigmas(p.encode(sig)).numpy(), sig, rtol=1e-7)
        if p.n_params:
            extreme = torch.zeros(p.n_params)
            extreme[0] = 800.0  # every share but one underflows: the floor keeps them apart
            Schedule(p.sigmas(extreme).numpy()).check_range(SMIN, SMAX)


@pytest.mark.parametrize(("space", "family"), [("logsnr", "logsnr"), ("rho", "polynomial")])
def test_zero_logits_are_the_uniform_schedule_and_encode_inverts(space, family):
    p = Ld3Parameterization(6, SMIN, SMAX, False, space)
    uniform = p.sigmas(torch.zeros(p.n_params)).numpy()
    np.testing.assert_allclose(uniform, baseline(family, 6, SMIN, SMAX, False), rtol=1e-8)
    for final_zero in (True, False):
        q = Ld3Parameterization(5, SMIN, SMAX, final_zero, space)
        target = Schedule(q.sigmas(torch.linspace(-2, 3, q.n_params)).numpy()).sigmas
        np.testing.assert_allclose(q.sigmas(q.encode(target)).numpy(), target, rtol=1e-7)
    with pytest.raises(ValueError, match="steps"):
        p.encode(baseline(family, 5, SMIN, SMAX, True))


# Gradients ----------------------------------------------------------------------------------------
class SnappedGaussian(AnalyticGaussian):
    """The Gaussian called only at the levels of a grid (as a discrete-time model is): sigma
    is snapped to the nearest level, which autograd cannot differentiate."""

    grid = torch.tensor(np.geomspace(SMIN, SMAX, 50))

    def __call__(self, x, sigma, **cond):
        i = torch.bucketize(sigma.detach(), self.grid.to(sigma.dtype)).clamp(1, 49)
        lo, hi = self.grid[i - 1].to(sigma.dtype), self.grid[i].to(sigma.dtype)
        snapped = torch.where((sigma.detach() - lo) < (hi - sigma.detach()), lo, hi)
        return super().__call__(x, snapped)


def test_sigma_derivative_by_autograd_or_central_differences():
    assert differentiable_in_sigma(AnalyticGaussian(), "cpu", torch.float64)
    assert not differentiable_in_sigma(SnappedGaussian(), "cpu", torch.float64)
    assert isinstance(with_sigma_gradient(SnappedGaussian(), "cpu", torch.float64),
                      FiniteDifferenceSigma)
    assert with_sigma_gradient(AnalyticGaussian(), "cpu", torch.float64, "auto").__class__ \
        is AnalyticGaussian
    noise = make_noise(range(6), (D,), dtype=torch.float64)
    target = exact_teacher(noise)
    p = Ld3Parameterization(4, SMIN, SMAX, True, "logsnr")
    theta0 = torch.tensor([0.3, -0.5, 0.2, 0.1], dtype=torch.float64)

    def loss(den, theta):
        x = solve(den, noise, p.sigmas(theta), solver="dpmpp_2m")
        return (x - target).square().mean()

    grads = []
    # Autograd through the closed form and through the project's mixture, and central
    # differences around the mixture.
    for den in (AnalyticGaussian(), gaussian(), FiniteDifferenceSigma(gaussian())):
        theta = theta0.clone().requires_grad_(True)
        loss(den, theta).backward()
        grads.append(theta.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-6, atol=1e-10)
    # And against central differences of the loss itself.
    h = 1e-6
    fd = torch.stack([
        (loss(AnalyticGaussian(), theta0 + h * e) - loss(AnalyticGaussian(), theta0 - h * e))
        / (2 * h) for e in torch.eye(4, dtype=torch.float64)
    ])
    torch.testing.assert_close(grads[0], fd, rtol=1e-5, atol=1e-9)
    assert grads[0].abs().min() > 0


# Convergence to the known optimum -----------------------------------------------------------------
def test_ld3_converges_to_the_brute_force_optimum_of_the_gaussian_case():
    noise = make_noise(range(8), (D,), dtype=torch.float64)
    best_levels, best_loss = brute_force_optimum(noise)
    assert 0.7 < best_levels[0] < 1.0 and 0.2 < best_levels[1] < 0.4  # far from the start
    # The closed-form denoiser (autograd in sigma); the mixture's central differences are
    # checked against it above.
    sig, hist = ld3_schedule(AnalyticGaussian(), noise, exact_teacher(noise), 3, "euler",
                             iters=80, lr=0.2, init=[SMAX, 20.0, 5.0, 0.0])
    assert hist[0]["loss"] > 5 * best_loss
    np.testing.assert_allclose(sig[1:3], best_levels, rtol=0.01)
    # The loss LD3 reached (through the solver) is the closed form's.
    reached = min(h["loss"] for h in hist)
    assert reached == pytest.approx(float(closed_form_loss(sig, noise)), rel=1e-6)
    assert reached <= best_loss * (1 + 1e-3)


def test_ld3_one_free_level_in_rho_space_with_rmsprop():
    # Two steps ending in 0: one free level; the closed form's minimizer on a fine grid.
    noise = make_noise(range(8), (D,), dtype=torch.float64)
    axis = np.geomspace(SMIN, SMAX, 20001)[:-1]
    lv = np.stack([np.full_like(axis, SMAX), axis, np.zeros_like(axis)], axis=-1)
    want = axis[np.argmin(closed_form_loss(lv, noise))]
    sig, _ = ld3_schedule(gaussian(), noise, exact_teacher(noise), 2, "euler", iters=60,
                          lr=0.05, optimizer="rmsprop", space="rho", init=[SMAX, 20.0, 0.0])
    assert sig[1] == pytest.approx(want, rel=0.02)


def test_ld3_is_deterministic_and_minibatches_are_seeded():
    noise = make_noise(range(12), (D,), dtype=torch.float64)
    target = exact_teacher(noise)
    runs = [ld3_schedule(gaussian(), noise, target, 3, "dpmpp_2m", iters=6, lr=0.1,
                         batch_size=4, seed=s) for s in (1, 1, 2)]
    assert np.array_equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert runs[0][1] != runs[2][1]
    assert len(runs[0][1]) == 7 and all(math.isfinite(h["loss"]) for h in runs[0][1])
    fixed, hist = ld3_schedule(gaussian(), noise, target, 1, "euler", iters=5)
    assert fixed.tolist() == [SMAX, 0.0] and len(hist) == 1  # nothing to learn


# Slack --------------------------------------------------------------------------------------------
def test_relax_noise_stays_in_the_ball_and_never_raises_a_loss():
    torch.manual_seed(0)
    noise = torch.randn(64, D, dtype=torch.float64)
    z = noise + 0.01 * torch.randn(64, D, dtype=torch.float64)
    target = torch.randn(64, D, dtype=torch.float64)

    def per_sample(zs):
        return (zs - target.repeat(2, 1)).square().sum(1) + 3 * zs[:, 0].sin()

    zz = z.clone().requires_grad_(True)
    per_sample(torch.cat([zz, zz]))[:64].sum().backward()
    for step in (0.01, 1.0, 10.0):  # small steps mostly help, large ones overshoot
        new = relax_noise(per_sample, z, zz.grad, noise, step, radius=0.05)
        shift = (new - noise).norm(dim=1)
        moved = (new != z).any(dim=1)
        assert (shift[moved] <= 0.05 + 1e-12).all()
        before = per_sample(torch.cat([z, z]))[:64]
        after = per_sample(torch.cat([new, new]))[:64]
        assert (after <= before).all() and moved.any()


def test_ld3_with_slack_moves_the_noise_within_the_radius():
    noise = make_noise(range(8), (D,), dtype=torch.float64)
    r = 0.05
    _, hist = ld3_schedule(gaussian(), noise, exact_teacher(noise), 3, "euler", iters=8,
                           lr=0.1, slack=r, slack_lr=1.0)
    shifts = [h["max_shift"] for h in hist if "max_shift" in h]
    assert shifts and max(shifts) <= r + 1e-12 and max(shifts) > 0
    assert ld3_slack(3072, 10) == pytest.approx(0.03072)  # LD3's CIFAR-10 radius at N = 10


# In an actor --------------------------------------------------------------------------------------
def test_compute_ld3_schedule_provenance_teacher_cache_and_losses():
    den = gaussian()
    cache = TeacherCache(den)
    s = compute_ld3(den, 3, "euler", range(6), loss="pixels", iters=4, lr=0.1,
                    teacher_steps=16, teacher_cache=cache)
    assert s.solver == "euler" and s.n_steps == 3 and s.final_zero
    assert s.meta["origin"] == "ld3" and s.meta["params"]["loss"] == "pixels"
    assert s.meta["loss_best"] <= s.meta["loss_first"]
    json.dumps(s.to_dict(), allow_nan=False)
    assert (range(6), TeacherSettings(n_steps=16)) in cache
    # The evaluator's feature network gives the loss; a second call reuses the teacher.
    torch.manual_seed(0)
    # Feature networks take images [B, C, H, W]: the samples arrive as [B, 1, 2, 2].
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(D, 8), torch.nn.Tanh())
    net = net.double()
    ev = SimpleNamespace(denoiser=den, features=net, teacher_cache=cache)
    f = compute_ld3(ev, 3, "euler", range(6), loss="features", iters=4, lr=0.1,
                    teacher_steps=16)
    assert f.meta["params"]["loss"] == "features" and cache.hits == 1
    with pytest.raises(ValueError, match="feature network"):
        compute_ld3(den, 3, "euler", range(6), loss="features", iters=1, teacher_steps=4)


def test_feature_distance_is_mean_squared_difference_in_feature_space():
    x, y = torch.randn(5, D), torch.randn(5, D)
    lin = torch.nn.Linear(D, 3)
    got = feature_distance(lambda v: (lin(v), None))(x, y)
    torch.testing.assert_close(got, (lin(x) - lin(y)).square().mean(1))
    torch.testing.assert_close(feature_distance(None)(x, y), (x - y).square().mean(1))


def test_ld3_on_the_embedded_model_lowers_the_loss():
    den = load("gmm-digits-k8")
    seeds = range(8)
    target = TeacherCache(den).samples(seeds, TeacherSettings(n_steps=32))
    noise = make_noise(seeds, den.shape)
    sig, hist = ld3_schedule(den, noise, target, 4, "dpmpp_2m", iters=5, lr=0.2)
    Schedule(sig).check_range(den.sigma_min, den.sigma_max)
    assert min(h["loss"] for h in hist) < hist[0]["loss"]
