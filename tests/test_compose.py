"""``searchd.models.compose``: routing rows to zoo members, latency, schedule cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchd.models import load
from searchd.models.compose import (
    ComposedDenoiser,
    budget_ms,
    calls_per_step,
    compose,
    schedule_latency_ms,
)
from searchd.noise import make_noise
from searchd.schedules.baselines import baseline
from searchd.solvers import solve

NAMES = ["gmm-digits-k1", "gmm-digits-k8"]


class Counting:
    """A real zoo member that also counts the rows of each call (to see routing)."""

    def __init__(self, inner):
        self.inner = inner
        self.shape, self.sigma_min, self.sigma_max = inner.shape, inner.sigma_min, inner.sigma_max
        self.sigma_grid, self.cost, self.name = None, inner.cost, inner.name
        self.device, self.dtype = inner.device, inner.dtype
        self.rows: list[int] = []

    def __call__(self, x, sigma, **cond):
        self.rows.append(x.shape[0])
        return self.inner(x, sigma, **cond)


@pytest.fixture(scope="module")
def members():
    return [load(n) for n in NAMES]


def test_mixed_rows_match_each_member_alone(members):
    d = ComposedDenoiser(members)
    x = make_noise(range(10), d.shape, device="cpu", dtype=torch.float32) * 3.0
    sigma = torch.linspace(0.5, 5.0, 10)
    ids = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])
    out = d(x, sigma, model_id=ids)
    for m in (0, 1):
        rows = (ids == m).nonzero().squeeze(1)
        torch.testing.assert_close(out[rows], members[m](x[rows], sigma[rows]))
    # No model_id: the reference member (the last).
    torch.testing.assert_close(d(x, sigma), members[1](x, sigma))
    torch.testing.assert_close(d(x, sigma, model_id=0), members[0](x, sigma))


def test_bad_model_ids_name_the_allowed_range(members):
    d = ComposedDenoiser(members, ["small", "big"])
    x = torch.zeros(3, *d.shape)
    with pytest.raises(ValueError, match=r"model_id 2 is out of range; .*0\.\.1 \(small, big\)"):
        d(x, torch.ones(3), model_id=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="must be integers"):
        d(x, torch.ones(3), model_id=torch.tensor([0.0, 1.0, 1.0]))


def test_heun_extra_evaluation_uses_the_step_member(members):
    counted = [Counting(m) for m in members]
    d = ComposedDenoiser(counted)
    sig = baseline("polynomial", 3, 0.002, 80.0, True, rho=7.0)
    noise = make_noise(range(4), d.shape, device="cpu", dtype=torch.float32)
    # Step 0: member 0 (2 calls), step 1: member 1 (2 calls), step 2 to 0: member 0 (1 call).
    solve(d, noise, torch.tensor(sig), solver="heun", model_ids=[0, 1, 0])
    assert counted[0].rows == [4, 4, 4] and counted[1].rows == [4, 4]
    assert calls_per_step("heun", 3).tolist() == [2, 2, 1]
    assert calls_per_step("dpmpp_2m", 3).tolist() == [1, 1, 1]


def test_population_pass_groups_rows_by_member(members):
    counted = [Counting(m) for m in members]
    d = ComposedDenoiser(counted)
    sig = torch.tensor(baseline("polynomial", 2, 0.002, 80.0, True, rho=7.0))
    noise = make_noise(range(6), d.shape, device="cpu", dtype=torch.float32)
    ids = torch.tensor([[0, 1]] * 3 + [[1, 1]] * 3)  # two candidates of 3 samples each
    x = solve(d, noise, sig.expand(6, -1), solver="dpmpp_2m", model_ids=ids)
    assert counted[0].rows == [3] and counted[1].rows == [3, 6]
    alone = solve(d, noise[:3], sig, solver="dpmpp_2m", model_ids=[0, 1])
    torch.testing.assert_close(x[:3], alone)


def test_latency_is_measured_per_member_and_schedules_cost_calls_times_latency():
    d = compose(NAMES)
    lat = d.measure_latency(batch_size=256, warmup=1, repeats=3)
    assert len(lat) == 2 and all(v > 0 for v in lat)
    rep = d.latency_report()
    assert rep["members"] == NAMES and rep["batch_size"] == 256 and len(rep["call_s"][0]) == 3
    assert schedule_latency_ms([0, 1, 1], [0.5, 2.0], [2, 2, 1]) == pytest.approx(7.0)
    assert budget_ms([0.5, 2.0], nfe=3) == pytest.approx(6.0)
    assert budget_ms([0.5, 2.0], ms=1.5) == 1.5
    with pytest.raises(ValueError, match="exactly one"):
        budget_ms([0.5, 2.0], ms=1.0, nfe=2)
    with pytest.raises(ValueError, match="latency_ms\\[1\\] = 0.0"):
        d.set_latency([1.0, 0.0])


def test_exact_samples_are_the_reference_member(members):
    d = ComposedDenoiser(members)
    np.testing.assert_array_equal(d.sample_data([3, 4]).numpy(),
                                  members[1].sample_data([3, 4]).numpy())
