"""Guidance spaces: every point decodes to a valid guided schedule, encode/decode round trips,
the paper's interval, and the searchers (evolution, random, bayes) searching timesteps and
guidance together with no change to their code."""

from __future__ import annotations

import numpy as np
import pytest

from searchd.schedule import Schedule
from searchd.schedules import baseline
from searchd.schedules.guidance_spaces import (
    PAPER_INTERVAL,
    ConstantGuidance,
    FixedTimesteps,
    GuidedSpace,
    IntervalGuidance,
    StepGuidance,
    constant_guidance,
    interval_guidance,
    interval_weights,
)
from searchd.schedules.spaces import ContinuousSpace, DiscreteSpace
from tests.test_searcher_contract import METRIC, build, drive

SMIN, SMAX = 0.002, 80.0


def spaces() -> dict[str, GuidedSpace]:
    ts = ContinuousSpace(6, SMIN, SMAX, True, "rho", free_endpoints=True)
    return {
        "constant": GuidedSpace(ts, ConstantGuidance(2.0)),
        "interval": GuidedSpace(ts, IntervalGuidance(2.0, SMIN, SMAX)),
        "interval-w": GuidedSpace(ts, IntervalGuidance((1.0, 4.0), SMIN, SMAX)),
        "steps": GuidedSpace(ts, StepGuidance(6, (0.0, 4.0), one_band=0.1)),
        "discrete-steps": GuidedSpace(DiscreteSpace(6, np.geomspace(SMIN, SMAX, 40)),
                                      StepGuidance(6)),
        "fixed-interval": GuidedSpace(
            FixedTimesteps(baseline("polynomial", 6, SMIN, SMAX, rho=7)),
            IntervalGuidance((1.0, 4.0), SMIN, SMAX)),
    }


def test_paper_interval_is_the_reference_codes_steps():
    """The reference code guides steps 17..22 of EDM's 32-step schedule (rho 7, 0.002..80)
    at w = 2: exactly the steps whose level lies in (0.28, 1.61]."""
    sig = baseline("polynomial", 32, SMIN, SMAX, rho=7)
    w = interval_weights(sig, PAPER_INTERVAL["w"], PAPER_INTERVAL["sigma_lo"],
                         PAPER_INTERVAL["sigma_hi"])
    assert np.flatnonzero(w != 1).tolist() == list(range(17, 23))
    assert set(w.tolist()) == {1.0, 2.0}
    s = interval_guidance(Schedule(sig))
    assert s.guidance.tolist() == w.tolist() and s.meta["guidance_family"] == "interval"


@pytest.mark.parametrize("name", list(spaces()))
def test_every_point_decodes_and_round_trips(name):
    space = spaces()[name]
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = space.sample(rng)
        space.check(s)
        assert s.guidance is not None and s.guidance.shape == (6,)
        for again in (space.decode(space.encode(s)), space.decode(space.params(s))):
            # The same candidate up to the rounding of the timestep warp.
            np.testing.assert_allclose(again.sigmas, s.sigmas, rtol=1e-12)
            assert np.array_equal(again.guidance, s.guidance)
        assert space.decode({"schedule": s.to_dict()}) == s
        m = space.mutate(s, rng, 0.4, 0.2)
        space.check(m)
        c = space.crossover(s, m, rng)
        space.check(c)
    for u in (np.zeros(space.dim), np.ones(space.dim)):
        space.check(space.decode(u))


def test_interval_family_holds_one_weight_inside_and_ones_outside():
    space = spaces()["interval-w"]
    rng = np.random.default_rng(1)
    seen_empty = seen_all = False
    for _ in range(300):
        s = space.sample(rng)
        w = s.guidance
        inside = w != 1.0
        if inside.any():
            on = np.flatnonzero(inside)
            assert np.all(np.diff(on) == 1)  # one contiguous run of levels
            assert len(set(w[inside].tolist())) == 1 and 1.0 <= w[inside][0] <= 4.0
        seen_empty |= not inside.any()
        seen_all |= bool(inside.all())
    assert seen_empty and seen_all
    # A guidance vector of the family given without its interval (no meta) is encoded
    # to an interval that reproduces it.
    s = space.sample(np.random.default_rng(7))
    bare = Schedule(s.sigmas, solver=s.solver, guidance=s.guidance)
    assert np.array_equal(space.decode(space.encode(bare)).guidance, bare.guidance)


def test_interval_holding_every_step_reaches_sigma_max():
    """Constant guidance is the interval over every step: encoding it puts the upper end at
    the cube's edge, which must decode to sigma_max itself (exp(log(80)) is 80 - 3e-14, which
    would leave the first step out)."""
    base = Schedule(baseline("polynomial", 6, SMIN, SMAX, rho=7))
    for name in ("interval-w", "fixed-interval"):
        space = spaces()[name]
        s = constant_guidance(base, 2.0)
        assert space.encode(s)[-1] == 1.0
        assert space.decode(space.encode(s)).guidance.tolist() == [2.0] * 6
        assert space.check(s) is s


def test_step_weights_snap_to_exactly_one():
    part = StepGuidance(4, (0.0, 4.0), one_band=0.1)
    w, _ = part.weights(np.array([0.25, 0.26, 0.5, 0.22]), np.ones(5))
    assert w.tolist() == [1.0, 1.0, 2.0, 0.88]  # within 0.1 of 1 -> exactly 1
    with pytest.raises(ValueError, match="one_band"):
        StepGuidance(4, (0.0, 1.0), one_band=0.6)


def test_check_refuses_other_families():
    space = spaces()["interval"]
    times = space.timesteps.decode(np.full(space.timesteps.dim, 0.5))
    with pytest.raises(ValueError, match="no guidance"):
        space.check(times)
    with pytest.raises(ValueError, match="not of this space's family"):
        space.check(constant_guidance(times, 3.0))
    space.check(interval_guidance(times, 2.0, 0.1, 5.0))
    with pytest.raises(ValueError, match="w = -1"):
        ConstantGuidance(-1.0)
    with pytest.raises(ValueError, match="6 steps"):
        GuidedSpace(space.timesteps, StepGuidance(5))


def guidance_objective(space: GuidedSpace):
    """Analytic: distance to a hidden guided schedule (log sigma and weights)."""
    rng = np.random.default_rng(3)
    target = space.decode(rng.random(space.dim))
    lt = np.log(target.sigmas[:-1])

    def f(s: Schedule) -> float:
        return float(np.sqrt(np.mean((np.log(s.sigmas[:-1]) - lt) ** 2))
                     + np.mean(np.abs(s.guidance - target.guidance)))

    return f


@pytest.mark.parametrize("name", ["evolution", "random", "bayes-tpe"])
@pytest.mark.parametrize("kind", ["interval-w", "steps"])
def test_searchers_search_timesteps_and_guidance_together(name, kind):
    space = spaces()[kind]
    obj = guidance_objective(space)
    times = space.timesteps.decode(np.full(space.timesteps.dim, 0.5))
    seeds = [constant_guidance(times, 2.0) if kind == "steps" else
             interval_guidance(times, 2.0, 0.28, 1.61)]
    s = build(name, space, seeds, budget=24)
    got = drive(s, space, obj)
    assert len(got) >= 16
    for sched in got:
        space.check(sched)
    assert len({tuple(x.guidance) for x in got}) > 5  # the weights are searched
    if name != "random":  # the model-based searchers improve on their seed
        assert s.best["value"] < obj(seeds[0])
    best = s.best["schedule"]
    assert best.guidance is not None
    # Plain-data state, guided schedules included, restores.
    state = s.get_state()
    again = build(name, space, seeds, budget=24)
    again.set_state(state)
    assert again.best["schedule"] == best and again.best["schedule"].guidance is not None
    assert METRIC == "dist"
