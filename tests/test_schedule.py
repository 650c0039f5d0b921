"""Schedule value object, baseline families and per-sample noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from searchd.noise import make_noise
from searchd.schedule import Schedule
from searchd.schedules import AYS_TABLES, FAMILIES, baseline, loglinear_interp
from searchd.schedules.baselines import (
    ddpm_linear_grid,
    iddpm_cosine_grid,
    vp_sigma_to_t,
    vp_t_to_sigma,
)


# Schedule -----------------------------------------------------------------------------------
def test_schedule_is_validated_with_the_bad_entry_named():
    with pytest.raises(ValueError, match=r"sigmas\[2\].*strictly decreasing"):
        Schedule([80.0, 10.0, 10.0, 0.0])
    with pytest.raises(ValueError, match=r"sigmas\[1\] = nan"):
        Schedule([80.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match=r"sigmas\[2\] = -1"):
        Schedule([80.0, 1.0, -1.0])
    with pytest.raises(ValueError, match="at least 2"):
        Schedule([80.0])
    with pytest.raises(ValueError, match=r"model_ids has shape \(2,\); expected \(3,\)"):
        Schedule([80.0, 1.0, 0.1, 0.0], model_ids=[0, 1])
    with pytest.raises(ValueError, match=r"model_ids\[1\] = -1"):
        Schedule([80.0, 1.0, 0.0], model_ids=[0, -1])


def test_schedule_range_and_zoo_checks():
    s = Schedule([80.0, 1.0, 0.0], model_ids=[0, 2])
    s.check_range(0.002, 80.0)
    with pytest.raises(ValueError, match=r"sigmas\[0\] = 81.0 is above.*sigma_max = 80.0"):
        Schedule([81.0, 1.0, 0.0]).check_range(0.002, 80.0)
    with pytest.raises(ValueError, match=r"sigmas\[1\] = 0.001 is below.*sigma_min"):
        Schedule([80.0, 0.001]).check_range(0.002, 80.0)
    with pytest.raises(ValueError, match=r"model_ids\[1\] = 2 is out of range.*0..1"):
        s.check_models(2)


def test_schedule_hash_is_content_only():
    a = Schedule([80.0, 1.0, 0.0], meta={"origin": "random"})
    b = Schedule(np.array([80.0, 1.0, 0.0]), meta={"origin": "mutation"})
    c = Schedule([80.0, 1.0, 0.0], solver="euler")
    d = Schedule([80.0, 1.0 + 1e-6, 0.0])
    e = Schedule([80.0, 1.0, 0.0], model_ids=[0, 1])
    assert a == b and a.id == b.id and hash(a) == hash(b)
    assert len({a.id, c.id, d.id, e.id}) == 4
    # floating-point noise below the canonical rounding (a relative 2**-30) is one candidate
    assert Schedule([80.0, 1.0 + 1e-15, 0.0]).id == a.id
    assert len(a.id) == 16


def test_schedule_json_round_trip_is_exact():
    rng = np.random.default_rng(0)
    sig = np.sort(rng.uniform(0.002, 80, 9))[::-1]
    s = Schedule(np.append(sig, 0.0), model_ids=rng.integers(0, 3, 9), meta={"origin": "x"})
    t = Schedule.from_json(s.to_json())
    assert t == s and np.array_equal(t.sigmas, s.sigmas) and t.meta == {"origin": "x"}
    assert np.array_equal(t.model_ids, s.model_ids)
    bad = json.loads(s.to_json())
    bad["sigmas"][1] *= 1.0000001
    with pytest.raises(ValueError, match="does not match its content"):
        Schedule.from_dict(bad)


def test_schedule_is_immutable():
    s = Schedule([80.0, 1.0, 0.0])
    with pytest.raises(ValueError):
        s.sigmas[0] = 3.0
    with pytest.raises(AttributeError):
        s.solver = "euler"  # type: ignore[misc]


# Baselines ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["polynomial", "logsnr", "time_uniform", "time_quadratic"])
@pytest.mark.parametrize("n", [1, 2, 5, 10])
@pytest.mark.parametrize("final_zero", [True, False])
def test_continuous_families_span_the_range(family, n, final_zero):
    s = baseline(family, n, 0.002, 80.0, final_zero=final_zero)
    assert s.dtype == np.float64 and s.shape == (n + 1,)
    Schedule(s).check_range(0.002, 80.0)
    assert s[0] == 80.0
    if final_zero:
        assert s[-1] == 0.0 and (n == 1 or s[-2] == 0.002)
    else:
        assert s[-1] == 0.002


def test_polynomial_is_edms_formula():
    # EDM (Karras et al. 2022, eq. 5): sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) -
    # smax^(1/rho)))^rho for i < N, sigma_N = 0.
    n, rho, smin, smax = 18, 7.0, 0.002, 80.0
    i = np.arange(n)
    ref = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    np.testing.assert_allclose(baseline("polynomial", n, smin, smax)[:-1], ref, rtol=1e-14)
    # rho = 1 is uniform in sigma.
    np.testing.assert_allclose(
        baseline("polynomial", 4, 1.0, 5.0, final_zero=False, rho=1), [5, 4, 3, 2, 1]
    )


def test_logsnr_is_uniform_in_log_sigma():
    s = baseline("logsnr", 6, 0.01, 100.0, final_zero=False)
    np.testing.assert_allclose(np.diff(np.log(s)), np.log(1e-4) / 6, rtol=1e-12)


def test_vp_time_maps_invert_each_other():
    t = np.linspace(1e-3, 1.0, 50)
    np.testing.assert_allclose(vp_sigma_to_t(vp_t_to_sigma(t)), t, rtol=1e-10)
    s = baseline("time_uniform", 5, 0.002, 80.0, final_zero=False)
    np.testing.assert_allclose(np.diff(vp_sigma_to_t(s)), np.diff(vp_sigma_to_t(s))[0])
    q = baseline("time_quadratic", 5, 0.002, 80.0, final_zero=False)
    np.testing.assert_allclose(
        np.diff(np.sqrt(vp_sigma_to_t(q))), np.diff(np.sqrt(vp_sigma_to_t(q)))[0]
    )


def test_discrete_grids_and_family():
    g = ddpm_linear_grid()
    # DDPM: beta from 1e-4 to 0.02 over 1000 steps; alpha_bar_T ~ 4.04e-5 (sigma ~ 157.4).
    assert g.shape == (1000,) and np.all(np.diff(g) > 0)
    np.testing.assert_allclose(g[0], np.sqrt(1e-4 / (1 - 1e-4)), rtol=1e-12)
    assert 155 < g[-1] < 160
    c = iddpm_cosine_grid()
    assert c.shape == (4000,) and np.all(np.diff(c) > 0)
    s = baseline("discrete", 10, g[0], g[-1], grid="ddpm_linear")
    assert s[-1] == 0.0 and s[0] == g[-1] and s[-2] == g[0]
    assert np.all(np.isin(s[:-1], g))
    with pytest.raises(ValueError, match="unknown grid 'nope'"):
        baseline("discrete", 10, 0.01, 80, grid="nope")


def test_ays_tables_and_interpolation():
    for name, table in AYS_TABLES.items():
        t = np.asarray(table)
        assert t.size == 11 and np.all(np.diff(t) < 0), name
        np.testing.assert_array_equal(baseline("ays", 10, 0.01, 1, final_zero=False, model=name), t)
        z = baseline("ays", 10, 0.01, 1, model=name)
        np.testing.assert_array_equal(z[:-1], t[:-1])
        assert z[-1] == 0.0
    # Published SD1.5 values.
    assert AYS_TABLES["sd15"][:3] == (14.6146412293, 6.4745760956, 3.8636745985)
    # Log-linear interpolation keeps the ends and is linear in log sigma between table points.
    five = baseline("ays", 5, 0.01, 1, final_zero=False, model="sdxl")
    np.testing.assert_allclose(five, np.asarray(AYS_TABLES["sdxl"])[::2], rtol=1e-12)
    twenty = loglinear_interp(np.asarray(AYS_TABLES["svd"]), 21)
    np.testing.assert_allclose(twenty[::2], AYS_TABLES["svd"], rtol=1e-12)
    np.testing.assert_allclose(np.log(twenty[1]), np.log(twenty[0] * twenty[2]) / 2, rtol=1e-12)


def test_unknown_family_and_bad_arguments_name_what_is_allowed():
    with pytest.raises(ValueError, match="unknown schedule family 'karras'.*polynomial"):
        baseline("karras", 5, 0.002, 80)
    with pytest.raises(ValueError, match="n_steps = 0"):
        baseline("logsnr", 0, 0.002, 80)
    with pytest.raises(ValueError, match="sigma_min = 80"):
        baseline("logsnr", 5, 80, 0.002)
    with pytest.raises(ValueError, match="bad parameters"):
        baseline("logsnr", 5, 0.002, 80, rho=3)
    with pytest.raises(ValueError, match="unknown AYS table"):
        baseline("ays", 5, 0.002, 80, model="sd3")
    assert set(FAMILIES) >= {"polynomial", "logsnr", "time_uniform", "time_quadratic", "ays"}


# Noise --------------------------------------------------------------------------------------
def test_noise_rows_depend_only_on_their_seed():
    a = make_noise(range(10, 20), (1, 4, 4), dtype=torch.float64)
    b = make_noise([15, 12], (1, 4, 4), dtype=torch.float64)
    assert torch.equal(a[5], b[0]) and torch.equal(a[2], b[1])
    c = make_noise(range(10, 20), (1, 4, 4), dtype=torch.float32)
    assert torch.equal(c, a.float())
    assert not torch.equal(a[0], a[1])
    with pytest.raises(ValueError, match="seed -1"):
        make_noise([-1], (2,))
