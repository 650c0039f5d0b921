"""Model-schedule spaces: budget repair, round trips, validation."""

from __future__ import annotations

import numpy as np
import pytest

from searchd.schedule import Schedule
from searchd.schedules.baselines import baseline
from searchd.schedules.model_spaces import JointSpace, ModelSpace, repair_models
from searchd.schedules.spaces import ContinuousSpace

LAT = [0.01, 0.2, 1.0]
SIG = baseline("polynomial", 6, 0.002, 80.0, True, rho=7.0)


def test_repair_downgrades_the_most_expensive_steps_first_earliest_on_ties():
    calls = np.array([1, 1, 1, 1])
    lat = np.array(LAT)
    # All large (4.0 ms) into 3.0: the first step goes down one member.
    assert repair_models([2, 2, 2, 2], calls, lat, 3.2).tolist() == [1, 2, 2, 2]
    # Into 2.0: the large steps go down one by one, earliest first, until it fits.
    assert repair_models([2, 2, 2, 2], calls, lat, 2.0).tolist() == [1, 1, 1, 2]
    # Into 0.5: every large step goes first (they cost most), then the medium ones.
    assert repair_models([2, 2, 2, 2], calls, lat, 0.5).tolist() == [0, 0, 1, 1]
    # Heun-like calls: a step with 2 calls costs twice as much and goes first.
    assert repair_models([2, 2], np.array([1, 2]), lat, 2.5).tolist() == [2, 1]
    # Within budget: unchanged.
    assert repair_models([0, 1, 2, 0], calls, lat, 10.0).tolist() == [0, 1, 2, 0]


def test_an_infeasible_budget_is_refused_with_the_cheapest_cost():
    with pytest.raises(ValueError, match=r"budget_ms = 0.05 is below the cheapest .*\(0.06 ms"):
        ModelSpace(SIG, LAT, 0.05, names=["s", "m", "l"])
    with pytest.raises(ValueError, match=r"latency_ms\[1\] = -1.0"):
        ModelSpace(SIG, [0.1, -1.0], 1.0)


@pytest.mark.parametrize("kind", ["models", "joint"])
def test_every_operator_stays_within_the_budget_and_round_trips(kind):
    budget = 2.5
    if kind == "models":
        space = ModelSpace(SIG, LAT, budget)
    else:
        space = JointSpace(ContinuousSpace(6, 0.002, 80.0, True, "rho", free_endpoints=True),
                           LAT, budget)
    rng = np.random.default_rng(0)
    pop = [space.sample(rng) for _ in range(30)]
    for _ in range(200):
        a, b = pop[rng.integers(30)], pop[rng.integers(30)]
        child = space.mutate(a, rng, 0.3, 0.1) if rng.random() < 0.5 else \
            space.crossover(a, b, rng)
        space.check(child)
        assert space.latency(child) <= budget * (1 + 1e-9)
        back = space.decode(space.encode(child))
        # Members exactly; continuous timesteps up to rounding (encode/decode of floats).
        assert back.model_ids.tolist() == child.model_ids.tolist()
        np.testing.assert_allclose(back.sigmas, child.sigmas, rtol=1e-9)
        assert space.decode(space.params(child)).model_ids.tolist() == child.model_ids.tolist()
        assert space.decode({"schedule": child.to_dict()}) == child
        pop[rng.integers(30)] = child
    # The whole cube decodes within the budget (all-large corner included).
    assert space.latency(space.decode(np.ones(space.dim))) <= budget * (1 + 1e-9)


def test_check_names_what_is_wrong():
    space = ModelSpace(SIG, LAT, 2.5)
    with pytest.raises(ValueError, match="costs 6 ms per sample; the budget is 2.5 ms"):
        space.check(Schedule(SIG, [2] * 6))
    with pytest.raises(ValueError, match="has no model_ids"):
        space.check(Schedule(SIG))
    with pytest.raises(ValueError, match="model_ids\\[0\\] = 3 is out of range"):
        space.check(Schedule(SIG, [3, 0, 0, 0, 0, 0]))
    other = baseline("logsnr", 6, 0.002, 80.0, True)
    with pytest.raises(ValueError, match="other noise levels"):
        space.check(Schedule(other, [0] * 6))
    assert space.project(Schedule(SIG, [2] * 6)).model_ids.tolist() == [1, 1, 1, 1, 1, 2]
