"""Flow-time schedule families against diffusers' own computation.

The reference is diffusers: ``FlowMatchEulerDiscreteScheduler.set_timesteps`` with ``shift``
(SD3), with ``use_dynamic_shifting`` and a ``mu`` from the pipelines' ``calculate_shift``
(Flux), and with ``use_beta_sigmas``; the Flux pipeline's own ``sigmas`` grid; ComfyUI's beta
scheduler re-derived from its definition (index quantiles of a 1000-level table).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from searchd.schedules import baseline
from searchd.schedules.baselines import (
    FAMILIES,
    flow_sigma,
    flow_t,
    flow_times,
    flux_image_seq_len,
    flux_mu,
    shift_t,
    unshift_t,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402


def _diffusers_function(relpath: str, name: str) -> Any:
    """A module-level function of an installed diffusers file, compiled from its own source
    (the Flux pipeline module imports transformers, which the test environment lacks; its
    ``calculate_shift`` is plain arithmetic)."""
    path = Path(diffusers.__file__).parent / relpath
    tree = ast.parse(path.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module([fn], []), str(path), "exec"), namespace)  # noqa: S102
    return namespace[name]


calculate_shift = _diffusers_function("pipelines/flux/pipeline_flux.py", "calculate_shift")

# diffusers computes its sigmas in float32.
RTOL = 2e-6
FLUX_CONFIG = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                   base_image_seq_len=256, max_image_seq_len=4096)


def diffusers_t(sched: FlowMatchEulerDiscreteScheduler) -> np.ndarray:
    """The positive levels (flow time t) of a scheduler after ``set_timesteps``."""
    sig = sched.sigmas.double().numpy()
    assert sig[-1] == 0.0
    return sig[:-1]


def in_t(sigmas: np.ndarray) -> np.ndarray:
    """Positive levels of a searchd schedule, in flow time."""
    return flow_t(sigmas[sigmas > 0])


def test_sigma_and_t_convert_both_ways():
    sigma = np.array([0.002, 0.5, 1.0, 80.0, 1e4])
    t = flow_t(sigma)
    np.testing.assert_allclose(t, sigma / (1 + sigma), rtol=0)
    np.testing.assert_allclose(flow_sigma(t), sigma, rtol=1e-12)
    assert flow_sigma(1.0) == np.inf and flow_t(0.0) == 0.0
    s = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(unshift_t(shift_t(s, 3.0), 3.0), s, atol=1e-15)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 10, 28])
def test_sd3_shift_is_diffusers_set_timesteps(shift, n):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    # diffusers' grid: uniform from its top level (1) to its lowest training level
    # shift(1/1000), then shifted (again): its last level is that level shifted twice.
    t_min = float(shift_t(shift_t(1 / 1000, shift), shift))
    np.testing.assert_allclose(flow_times(n, t_min, 1.0, shift=shift), diffusers_t(sched),
                               rtol=RTOL)


@pytest.mark.parametrize("family,params", [("flow_shift", {"shift": 3.0}),
                                           ("flow_uniform", {})])
@pytest.mark.parametrize("n", [4, 7])
def test_registry_family_is_diffusers_on_a_model_range(family, params, n):
    """On a finite noise range the family is diffusers' shifted grid between the base times
    of that range (diffusers takes base times as ``sigmas=`` and shifts them itself)."""
    shift = params.get("shift", 1.0)
    smin, smax = 0.002, 80.0
    s_hi, s_lo = unshift_t(flow_t(smax), shift), unshift_t(flow_t(smin), shift)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(s_hi, s_lo, n).tolist())
    ours = baseline(family, n, smin, smax, **params)
    assert ours[0] == smax and ours[-2] == smin and ours[-1] == 0.0
    np.testing.assert_allclose(in_t(ours), diffusers_t(sched), rtol=RTOL)
    # final_zero=False: the same curve at n + 1 points, no final 0.
    sched.set_timesteps(sigmas=np.linspace(s_hi, s_lo, n + 1).tolist())
    np.testing.assert_allclose(in_t(baseline(family, n, smin, smax, False, **params)),
                               diffusers_t(sched), rtol=RTOL)


@pytest.mark.parametrize("height,width", [(1024, 1024), (512, 768), (256, 256)])
def test_flux_mu_is_diffusers_calculate_shift(height, width):
    # The Flux pipeline's token count: latents of height 2 * (H // 16), packed 2x2.
    lat_h, lat_w = 2 * (height // 16), 2 * (width // 16)
    seq = (lat_h // 2) * (lat_w // 2)
    assert flux_image_seq_len(height, width) == seq
    assert flux_mu(seq) == pytest.approx(calculate_shift(seq), rel=1e-12)
    assert flux_mu(seq, 256, 4096, 0.5, 1.16) == pytest.approx(
        calculate_shift(seq, 256, 4096, 0.5, 1.16), rel=1e-12)


@pytest.mark.parametrize("n", [4, 28])
def test_flux_dynamic_shift_is_diffusers(n):
    seq = flux_image_seq_len(1024, 1024)
    mu = calculate_shift(seq)
    # The Flux pipeline: sigmas = linspace(1, 1/N, N), exponential dynamic shift with mu.
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_CONFIG)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    flux = diffusers_t(sched)
    np.testing.assert_allclose(flow_times(n, 0.5, 1.0, shift=np.exp(mu), to_zero=True), flux,
                               rtol=RTOL)
    # The scheduler alone (no sigmas): uniform from 1 to 1/1000, then the dynamic shift.
    sched.set_timesteps(n, mu=mu)
    t_min = 1 / (1 + np.exp(-mu) * (1000 - 1))  # e^mu / (e^mu + 1 / s - 1) at s = 1/1000
    np.testing.assert_allclose(flow_times(n, t_min, 1.0, shift=np.exp(mu)), diffusers_t(sched),
                               rtol=RTOL)
    # The registry family on a finite range: the pipeline's grid scaled to start at sigma_max.
    smax = 80.0
    s_hi = float(unshift_t(flow_t(smax), np.exp(mu)))
    sched.set_timesteps(sigmas=np.linspace(s_hi, s_hi / n, n), mu=mu)
    ours = baseline("flow_flux", n, 0.002, smax, image_seq_len=seq)
    assert ours[0] == smax and ours[-1] == 0.0 and ours[-2] > 0.002
    np.testing.assert_allclose(in_t(ours), diffusers_t(sched), rtol=RTOL)
    np.testing.assert_allclose(baseline("flow_flux", n, 0.002, smax, mu=mu), ours, rtol=1e-12)


@pytest.mark.parametrize("n", [4, 10])
def test_beta_is_diffusers_use_beta_sigmas(n):
    sched = FlowMatchEulerDiscreteScheduler(use_beta_sigmas=True)
    sched.set_timesteps(n)
    np.testing.assert_allclose(flow_times(n, 1 / 1000, 1.0, alpha=0.6, beta=0.6),
                               diffusers_t(sched), rtol=RTOL)
    # The registry family on a range, diffusers' placement (to_zero false).
    smin, smax = 0.002, 80.0
    tl, th = flow_t(smin), flow_t(smax)
    q = diffusers_t(sched)  # 0.001 + ppf (1 - 0.001): recover the quantiles
    ppf = (q - 1 / 1000) / (1 - 1 / 1000)
    np.testing.assert_allclose(in_t(baseline("flow_beta", n, smin, smax, to_zero=False)),
                               tl + ppf * (th - tl), rtol=1e-5)


@pytest.mark.parametrize("n", [4, 9, 20])
def test_beta_to_zero_is_comfyui_beta_scheduler(n):
    """ComfyUI's beta scheduler on a flow model with a 1000-level table t_i = (i + 1) / 1000:
    indices rint(ppf(1 - j / N) * 999), j < N, then 0; ours is its continuous version."""
    from scipy.stats import beta as beta_dist

    u = 1 - np.linspace(0, 1, n, endpoint=False)
    t_comfy = (np.rint(beta_dist.ppf(u, 0.6, 0.6) * 999) + 1) / 1000
    ours = in_t(baseline("flow_beta", n, 0.002, 1e6))
    np.testing.assert_allclose(ours, t_comfy, atol=1.5e-3)


def test_families_are_registered_and_valid():
    for fam in ("flow_uniform", "flow_shift", "flow_flux", "flow_beta"):
        assert fam in FAMILIES
        for n in (1, 2, 5, 10):
            s = baseline(fam, n, 0.002, 80.0)
            assert s.shape == (n + 1,) and s[-1] == 0.0 and s[0] == 80.0
            assert np.all(np.diff(s) < 0) and s[-2] >= 0.002


@pytest.mark.parametrize("family,params,fragment", [
    ("flow_shift", {"shift": 0}, "shift = 0"),
    ("flow_shift", {"rho": 7}, "unknown parameters ['rho']"),
    ("flow_flux", {"mu": 1.0, "image_seq_len": 64}, "not both"),
    ("flow_beta", {"alpha": -1}, "must be > 0"),
    ("flow_uniform", {"to_zero": "yes"}, "to_zero = 'yes'"),
    ("flow_shift", {"shift": "3"}, "shift = '3'"),
])
def test_bad_parameters_are_named(family, params, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        baseline(family, 4, 0.002, 80.0, **params)


def test_to_zero_needs_a_final_zero():
    with pytest.raises(ValueError, match="needs final_zero=True"):
        baseline("flow_flux", 4, 0.002, 80.0, final_zero=False)
    s = baseline("flow_flux", 4, 0.002, 80.0, final_zero=False, to_zero=False)
    assert s[-1] == 0.002 and s.shape == (5,)


# The t-warped search space --------------------------------------------------------------------
@pytest.mark.parametrize("final_zero", [True, False])
@pytest.mark.parametrize("free", [False, True])
@pytest.mark.parametrize("family,params", [("flow_shift", {"shift": 3.0}),
                                           ("flow_shift", {"shift": 0.5}),
                                           ("flow_uniform", {})])
def test_flow_space_midpoint_is_the_shifted_baseline(final_zero, free, family, params):
    from searchd.schedule import Schedule
    from searchd.schedules.spaces import ContinuousSpace

    shift = params.get("shift", 1.0)
    space = ContinuousSpace(6, 0.002, 80.0, final_zero, "flow", free_endpoints=free,
                            shift=shift)
    u = np.full(space.dim, 0.5)
    if free:
        u[-2:] = (1.0, 0.0)  # endpoints at sigma_max and sigma_min
    ref = baseline(family, 6, 0.002, 80.0, final_zero, **params)
    np.testing.assert_allclose(space.decode(u).sigmas, ref, rtol=1e-12, atol=0)
    np.testing.assert_allclose(space.encode(Schedule(ref)), u, atol=1e-12)
    assert space.describe()["shift"] == shift


def test_flow_space_gaps_are_bounded_in_base_time():
    from searchd.schedules.spaces import ContinuousSpace

    space = ContinuousSpace(8, 0.002, 80.0, True, "flow", gap_ratio=10.0, shift=3.0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = unshift_t(flow_t(space.decode(rng.random(space.dim)).sigmas[:-1]), 3.0)
        ratio = -np.diff(s)[:-1] / -np.diff(s)[-1]
        assert np.all(ratio <= 10.0 * (1 + 1e-9)) and np.all(ratio >= 0.1 * (1 - 1e-9))
    with pytest.raises(ValueError, match="shift = 0"):
        ContinuousSpace(4, 0.002, 80.0, warp="flow", shift=0.0)


@pytest.mark.parametrize("config,mu", [({"shift": 1.0}, None), ({"shift": 3.0}, None),
                                       (FLUX_CONFIG, 0.83),
                                       ({**FLUX_CONFIG, "time_shift_type": "linear"}, 1.7)])
def test_scheduler_sigmas_land_a_flow_scheduler_on_the_schedule(config, mu):
    """A FlowMatch scheduler shifts the sigmas it is given; scheduler_sigmas undoes exactly
    that, so the scheduler's levels are the schedule's flow times."""
    from searchd.schedules.baselines import scheduler_sigmas

    sched = FlowMatchEulerDiscreteScheduler(**config)
    s = baseline("polynomial", 7, 0.002, 80.0)
    given = scheduler_sigmas(s, shift=config.get("shift", 1.0), mu=mu,
                             time_shift_type=config.get("time_shift_type", "exponential"))
    sched.set_timesteps(sigmas=given.tolist(), **({"mu": mu} if mu is not None else {}))
    np.testing.assert_allclose(diffusers_t(sched), flow_t(s[:-1]), rtol=RTOL)
    with pytest.raises(ValueError, match="ending in 0"):
        scheduler_sigmas(s[:-1])
