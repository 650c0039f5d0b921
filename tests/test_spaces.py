"""Search spaces: every point decodes to a valid schedule, round trips, variation operators.

References are independent of the space code: the baseline families of
``searchd.schedules.baselines`` (the uniform-in-warp points), ``Schedule``'s own validation,
and the documented meaning of the parameters (gap ratios, endpoint reach).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from searchd.schedule import Schedule
from searchd.schedules.baselines import baseline, ddpm_linear_grid
from searchd.schedules.spaces import ContinuousSpace, DiscreteSpace, reflect_unit

SMIN, SMAX = 0.002, 80.0

CONTINUOUS = [
    dict(n_steps=n, final_zero=fz, warp=w, free_endpoints=fe)
    for n, fz, w, fe in itertools.product((2, 5, 12), (True, False), ("logsnr", "rho", "flow"),
                                          (False, True))
]


def cont(**kw) -> ContinuousSpace:
    return ContinuousSpace(sigma_min=SMIN, sigma_max=SMAX, **kw)


def corners(dim: int, rng: np.random.Generator, n: int = 16) -> list[np.ndarray]:
    """All-zeros, all-ones, alternating and random vertices of the unit cube."""
    pts = [np.zeros(dim), np.ones(dim), np.arange(dim) % 2.0, 1.0 - np.arange(dim) % 2.0]
    pts += [rng.integers(0, 2, dim).astype(float) for _ in range(n)]
    return pts


def assert_valid(space, s: Schedule) -> None:
    """A schedule the space may hand out: right shape, solver, strictly decreasing, in range."""
    assert isinstance(s, Schedule)
    assert s.n_steps == space.n_steps and s.final_zero == space.final_zero
    assert s.solver == space.solver
    pos = s.sigmas[:-1] if s.final_zero else s.sigmas
    assert np.all(np.diff(s.sigmas) < 0)
    assert np.all(pos > 0)
    s.check_range(space.sigma_min, space.sigma_max)
    space.check(s)


# Continuous space ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw", CONTINUOUS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_every_point_decodes_to_a_valid_schedule(kw):
    space = cont(**kw)
    rng = np.random.default_rng(0)
    points = corners(space.dim, rng) + [rng.random(space.dim) for _ in range(200)]
    for u in points:
        s = space.decode(u)
        assert_valid(space, s)
        if not space.free_endpoints:
            assert s.sigmas[0] == SMAX and s.sigmas[space.n_levels - 1] == SMIN


@pytest.mark.parametrize("kw", CONTINUOUS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_encode_inverts_decode(kw):
    space = cont(**kw)
    rng = np.random.default_rng(1)
    for u in [rng.random(space.dim) for _ in range(50)] + corners(space.dim, rng, 4):
        np.testing.assert_allclose(space.encode(space.decode(u)), u, atol=1e-9)


@pytest.mark.parametrize("final_zero", [True, False])
@pytest.mark.parametrize("free", [False, True])
@pytest.mark.parametrize("warp,family,params", [
    ("logsnr", "logsnr", {}),
    ("rho", "polynomial", {"rho": 7.0}),
    ("rho", "polynomial", {"rho": 3.0}),
])
def test_midpoint_is_the_uniform_in_warp_baseline(final_zero, free, warp, family, params):
    space = cont(n_steps=7, final_zero=final_zero, warp=warp, free_endpoints=free,
                 rho=params.get("rho", 7.0))
    u = np.full(space.dim, 0.5)
    if free:
        u[-2:] = (1.0, 0.0)  # endpoints at sigma_max and sigma_min
    ref = baseline(family, 7, SMIN, SMAX, final_zero, **params)
    np.testing.assert_allclose(space.decode(u).sigmas, ref, rtol=1e-12, atol=0)
    # ... and the baseline encodes back to that point exactly.
    np.testing.assert_allclose(space.encode(Schedule(ref)), u, atol=1e-12)


@pytest.mark.parametrize("warp", ["logsnr", "rho"])
def test_gaps_stay_within_gap_ratio_of_the_last_gap(warp):
    space = cont(n_steps=8, warp=warp, gap_ratio=10.0)
    rng = np.random.default_rng(2)
    w = (lambda s: np.log(s)) if warp == "logsnr" else (lambda s: s ** (1 / 7))
    for u in corners(space.dim, rng) + [rng.random(space.dim) for _ in range(50)]:
        gaps = -np.diff(w(space.decode(u).sigmas[:-1]))
        ratio = gaps[:-1] / gaps[-1]
        assert np.all(ratio <= 10.0 * (1 + 1e-9)) and np.all(ratio >= 0.1 * (1 - 1e-9))
    # The extreme corners reach the bound.
    gaps = -np.diff(w(space.decode(np.ones(space.dim)).sigmas[:-1]))
    np.testing.assert_allclose(gaps[:-1] / gaps[-1], 10.0, rtol=1e-9)


def test_free_endpoints_move_within_their_reach():
    space = cont(n_steps=5, warp="logsnr", free_endpoints=True, endpoint_range=0.25)
    span = np.log(SMAX) - np.log(SMIN)
    top_lo = np.exp(np.log(SMAX) - 0.25 * span)
    bot_hi = np.exp(np.log(SMIN) + 0.25 * span)
    u = np.full(space.dim, 0.5)
    u[-2:] = (0.0, 1.0)  # endpoints pulled fully inward
    s = space.decode(u)
    np.testing.assert_allclose([s.sigmas[0], s.sigmas[-2]], [top_lo, bot_hi], rtol=1e-12)
    rng = np.random.default_rng(3)
    for _ in range(100):
        s = space.decode(rng.random(space.dim))
        assert top_lo * (1 - 1e-12) <= s.sigmas[0] <= SMAX
        assert SMIN <= s.sigmas[-2] <= bot_hi * (1 + 1e-12)


def test_schedules_outside_the_space_are_projected_validly():
    space = cont(n_steps=6, warp="logsnr", gap_ratio=3.0)
    for fam in ("time_uniform", "time_quadratic", "polynomial"):
        s = Schedule(baseline(fam, 6, SMIN, SMAX, True))
        u = space.encode(s)
        assert np.all((0 <= u) & (u <= 1))
        assert_valid(space, space.project(s))


def test_decode_accepts_both_tune_config_forms():
    space = cont(n_steps=5, warp="rho", free_endpoints=True)
    u = np.random.default_rng(4).random(space.dim)
    s = space.decode(u)
    flat = {f"u{i}": float(v) for i, v in enumerate(u)}
    assert space.decode(flat) == s
    assert space.params(s) == pytest.approx(flat, abs=1e-9)
    tagged = Schedule(s.sigmas, solver=s.solver, meta={"origin": "mutation", "parents": ["x"]})
    back = space.decode({"schedule": tagged.to_dict()})
    assert back == s and back.meta["origin"] == "mutation"
    with pytest.raises(ValueError, match="u4"):
        space.decode({k: v for k, v in flat.items() if k != "u4"})
    with pytest.raises(ValueError, match="steps"):
        space.decode({"schedule": Schedule(baseline("logsnr", 4, SMIN, SMAX)).to_dict()})
    with pytest.raises(ValueError, match="solver"):
        space.decode({"schedule": Schedule(s.sigmas, solver="heun").to_dict()})
    with pytest.raises(ValueError, match="outside"):
        space.decode(np.full(space.dim, 1.5))


def test_flat_parameters_anywhere_in_the_unit_cube_decode_to_valid_schedules():
    """What Bayes's Optuna distributions (``u<i>`` uniform in [0, 1]) may propose."""
    space = cont(n_steps=6, warp="logsnr", free_endpoints=True)
    rng = np.random.default_rng(8)
    for _ in range(20):
        flat = {f"u{i}": float(v) for i, v in enumerate(rng.random(space.dim))}
        assert_valid(space, space.decode(flat))
    for corner in (np.zeros(space.dim), np.ones(space.dim)):
        assert_valid(space, space.decode(corner))


def test_mutation_and_crossover_of_continuous_schedules():
    space = cont(n_steps=8, warp="logsnr", free_endpoints=True)
    rng = np.random.default_rng(5)
    a, b = space.sample(rng), space.sample(rng)
    for _ in range(100):
        m = space.mutate(a, rng, m_prob=0.3, scale=0.2)
        assert_valid(space, m)
        assert m != a
        c = space.crossover(a, b, rng)
        assert_valid(space, c)
        ua, ub, uc = space.encode(a), space.encode(b), space.encode(c)
        # Every gene of the child comes from one parent.
        assert np.all(np.isclose(uc, ua, atol=1e-9) | np.isclose(uc, ub, atol=1e-9))
    # m_prob = 0 still changes exactly one parameter.
    for _ in range(20):
        diff = np.abs(space.encode(space.mutate(a, rng, m_prob=0.0, scale=0.1)) - space.encode(a))
        assert np.sum(diff > 1e-12) == 1


def test_reflect_unit_folds_into_the_cube():
    v = np.array([-0.25, 0.3, 1.2, 2.4, -1.7])
    np.testing.assert_allclose(reflect_unit(v), [0.25, 0.3, 0.8, 0.4, 0.3])


def test_continuous_space_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive level"):
        cont(n_steps=1, final_zero=True)
    with pytest.raises(ValueError, match="warp"):
        cont(n_steps=4, warp="linear")
    with pytest.raises(ValueError, match="sigma_min"):
        ContinuousSpace(4, 1.0, 0.5)


# Discrete space -----------------------------------------------------------------------------
GRID = ddpm_linear_grid()


def disc(**kw) -> DiscreteSpace:
    kw.setdefault("grid", GRID)
    return DiscreteSpace(**kw)


DISCRETE = [
    dict(n_steps=n, final_zero=fz, free_endpoints=fe)
    for n, fz, fe in itertools.product((1, 4, 10), (True, False), (False, True))
]


def assert_on_grid(space: DiscreteSpace, s: Schedule) -> None:
    assert_valid(space, s)
    idx = space.indices(s)
    assert np.all(np.diff(idx) < 0), "grid indices sorted (high noise first) and unique"
    np.testing.assert_array_equal(space.grid[idx], s.sigmas[: space.n_levels])
    if not space.free_endpoints:
        assert idx[0] == space.pool[-1]
        if space.n_levels >= 2:
            assert idx[-1] == space.pool[0]


@pytest.mark.parametrize("kw", DISCRETE, ids=lambda kw: "-".join(map(str, kw.values())))
def test_discrete_points_decode_to_sorted_unique_grid_subsets(kw):
    space = disc(**kw)
    rng = np.random.default_rng(6)
    for u in corners(space.dim, rng) + [rng.random(space.dim) for _ in range(100)]:
        s = space.decode(u)
        assert_on_grid(space, s)
        assert space.decode(space.encode(s)) == s
    for _ in range(50):
        assert_on_grid(space, space.sample(rng))


def test_discrete_restricted_range_and_baseline_projection():
    space = disc(n_steps=6, sigma_min=0.05, sigma_max=20.0)
    assert 0.05 <= space.sigma_min and space.sigma_max <= 20.0
    ref = baseline("discrete", 6, 0.05, 20.0, True, grid=GRID)
    assert space.decode(space.encode(Schedule(ref))).sigmas.tolist() == ref.tolist()
    # A continuous baseline snaps to distinct grid levels, even on a coarse grid where several
    # of its levels are nearest to the same grid level.
    coarse = DiscreteSpace(8, np.geomspace(0.01, 80, 12), final_zero=True)
    s = coarse.project(Schedule(baseline("polynomial", 8, 0.01, 80, True, rho=7)))
    assert_on_grid(coarse, s)
    with pytest.raises(ValueError, match="grid"):
        coarse.check(Schedule(baseline("logsnr", 8, 0.01, 80, True)))


@pytest.mark.parametrize("free", [False, True])
def test_discrete_mutation_and_crossover_keep_subsets_sorted_and_unique(free):
    space = disc(n_steps=10, free_endpoints=free)
    small = DiscreteSpace(5, np.geomspace(0.01, 80, 9), final_zero=False, free_endpoints=free)
    rng = np.random.default_rng(7)
    for sp in (space, small):
        pop = [sp.sample(rng) for _ in range(6)]
        for _ in range(200):
            a, b = pop[rng.integers(6)], pop[rng.integers(6)]
            m = sp.mutate(a, rng, m_prob=float(rng.random()), scale=float(rng.random()))
            c = sp.crossover(a, b, rng)
            assert_on_grid(sp, m)
            assert_on_grid(sp, c)
            assert m != a
            # Crossover draws its levels from the parents whenever they have enough.
            assert set(sp.indices(c)) <= set(sp.indices(a)) | set(sp.indices(b))
            pop[rng.integers(6)] = m


def test_discrete_local_mutation_moves_levels_nearby():
    space = disc(n_steps=6)
    rng = np.random.default_rng(8)
    a = space.sample(rng)
    radius = round(0.01 * space._choosable.size)
    for _ in range(50):
        m = space.mutate(a, rng, m_prob=0.0, scale=0.01)
        moved = np.setdiff1d(space.indices(m), space.indices(a))
        gone = np.setdiff1d(space.indices(a), space.indices(m))
        assert moved.size == gone.size == 1
        assert abs(int(moved[0]) - int(gone[0])) <= radius


def test_discrete_space_rejects_too_small_grids():
    with pytest.raises(ValueError, match="needs"):
        DiscreteSpace(10, np.geomspace(0.1, 10, 5))
    with pytest.raises(ValueError, match="ascending"):
        DiscreteSpace(2, [3.0, 2.0, 1.0])
