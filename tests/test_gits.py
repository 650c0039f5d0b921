"""GITS (searchd/methods/gits.py), the teacher (searchd/evaluation/teacher.py), and what is
particular to the searchers of a precomputed schedule (GITS and LD3; their contract is
tests/test_searcher_contract.py's).

The DP is checked on hand-worked cost matrices, against brute force over every path, and
against a plain transcription of GITS's own recursion; the whole method on the embedded
model is checked for determinism, validity, and for beating the baselines in distance to a
high-NFE teacher on held-out noise. No test starts Ray.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import ray
import torch

from searchd.evaluation.teacher import (
    TeacherCache,
    TeacherSettings,
    teacher_samples,
    teacher_trajectory,
)
from searchd.methods.gits import (
    EULER_STEP_SOLVERS,
    compute_gits,
    cost_matrix,
    deviation,
    gits_dp,
    gits_grid,
    gits_plan,
    gits_schedule,
    model_grid_levels,
    path_cost,
)
from searchd.models import load
from searchd.noise import make_noise
from searchd.schedule import Schedule
from searchd.schedules.baselines import baseline, ddpm_linear_grid
from searchd.schedules.spaces import ContinuousSpace, DiscreteSpace
from searchd.searchers.base import FINISHED
from searchd.searchers.precomputed import GitsSearcher, Ld3Searcher
from searchd.solvers import SOLVERS, solve

INF = math.inf


@pytest.fixture(autouse=True)
def small_threads(one_thread):
    yield
    assert not ray.is_initialized(), "these tests must not start Ray"


@pytest.fixture(scope="module")
def k8_64():
    return load("gmm-digits-k8", dtype=torch.float64)


# The DP on hand-worked matrices ------------------------------------------------------------
def test_dp_coefficient_weighs_later_steps_more():
    # Two ways through a 4-point grid in 2 steps: 0-1-3 costs 1 then 4, 0-2-3 costs 3 then 2.
    # Weighted cost c0 + coeff * c1: via 1: 1 + 4 coeff; via 2: 3 + 2 coeff.
    cost = np.full((4, 4), INF)
    cost[0, 1], cost[1, 3], cost[0, 2], cost[2, 3] = 1.0, 4.0, 3.0, 2.0
    cost[0, 3], cost[1, 2] = 100.0, 100.0
    assert gits_dp(cost, 2, 0.5).tolist() == [0, 1, 3]  # 3.0 < 4.0
    assert gits_dp(cost, 2, 1.15).tolist() == [0, 2, 3]  # 5.3 < 5.6
    assert gits_dp(cost, 2, 1.0).tolist() == [0, 1, 3]  # 5 = 5: the smaller index
    assert gits_dp(cost, 1, 1.15).tolist() == [0, 3]
    assert gits_dp(cost, 3, 1.15).tolist() == [0, 1, 2, 3]
    assert path_cost(cost, [0, 2, 3], 1.15) == pytest.approx(3 + 1.15 * 2)


def test_dp_five_points_worked_by_hand():
    c = np.full((5, 5), INF)
    c[0, 1:] = [1, 2, 9, 20]
    c[1, 2:] = [2, 1, 9]
    c[2, 3:] = [1, 3.5]
    c[3, 4] = 4
    # 2 steps: 0-1-4 = 10, 0-2-4 = 5.5, 0-3-4 = 13.
    assert gits_dp(c, 2, 1.0).tolist() == [0, 2, 4]
    # 3 steps, coeff 1: 0-1-2-4 = 6.5, 0-1-3-4 = 6, 0-2-3-4 = 7.
    assert gits_dp(c, 3, 1.0).tolist() == [0, 1, 3, 4]
    # coeff 3 (weights 1, 3, 9): 38.5, 40, 41: the cheap last step wins.
    assert gits_dp(c, 3, 3.0).tolist() == [0, 1, 2, 4]
    assert path_cost(c, [0, 1, 2, 4], 3.0) == pytest.approx(38.5)
    assert gits_dp(c, 4, 1.15).tolist() == [0, 1, 2, 3, 4]


def all_paths(g: int, n_steps: int):
    for mid in itertools.combinations(range(1, g - 1), n_steps - 1):
        yield [0, *mid, g - 1]


def gits_reference(cost: np.ndarray, n_steps: int, coeff: float) -> list[int]:
    """GITS's recursion and its scan for the path, written out with plain loops."""
    g, k_max = len(cost), n_steps
    v = [[INF] * (k_max + 1) for _ in range(g)]
    for i in range(g):
        v[i][1] = cost[i][g - 1]
    for k in range(2, k_max + 1):
        for j in range(g - 1):
            for i in range(j + 1, g - 1):
                v[j][k] = min(v[j][k], cost[j][i] + coeff * v[i][k - 1])
    path, w = [0], 0
    for k in range(k_max, 1, -1):
        for j in range(w + 1, g):
            if v[w][k] == cost[w][j] + coeff * v[j][k - 1]:
                path.append(j)
                w = j
                break
    return [*path, g - 1]


@pytest.mark.parametrize("coeff", [0.8, 1.0, 1.15])
def test_dp_is_the_best_path_by_brute_force_and_gits_recursion(coeff):
    rng = np.random.default_rng(7)
    for trial in range(6):
        g = 8
        cost = rng.normal(1.0, 1.0, (g, g))  # negative costs occur (the "dev" metric)
        cost[np.tril_indices(g)] = INF
        for n in range(1, g):
            best = min(all_paths(g, n), key=lambda p: path_cost(cost, p, coeff))
            got = gits_dp(cost, n, coeff)
            assert got.tolist() == best, (trial, n)
            assert got.tolist() == gits_reference(cost, n, coeff), (trial, n)


def test_dp_avoids_nan_and_checks_its_input():
    c = np.full((4, 4), INF)
    c[0, 1], c[1, 3], c[0, 2], c[2, 3] = 0.0, np.nan, 5.0, 5.0
    c[0, 3] = c[1, 2] = 50.0
    assert gits_dp(c, 2, 1.0).tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="square"):
        gits_dp(np.zeros((3, 4)), 1)
    with pytest.raises(ValueError, match="allows 1 to 3 steps"):
        gits_dp(c, 4)
    with pytest.raises(ValueError, match="coeff"):
        gits_dp(c, 2, 0.0)
    blocked = np.full((3, 3), INF)
    with pytest.raises(ValueError, match="no path"):
        gits_dp(blocked, 2)


# Costs ---------------------------------------------------------------------------------------
def test_deviation_is_the_distance_from_the_line():
    start = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    end = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[[1.0, 3.0, 4.0]], [[5.0, 0.0, 0.0]], [[2.0, 0.0, 0.0]]],
                     dtype=torch.float64)
    assert deviation(x, start, end)[:, 0].tolist() == pytest.approx([5.0, 0.0, 0.0])


@pytest.mark.parametrize("solver", sorted(EULER_STEP_SOLVERS))
def test_one_step_of_these_solvers_is_the_euler_step(k8_64, solver):
    x0 = make_noise(range(3), k8_64.shape, dtype=torch.float64)
    s, d = 7.0, None
    x = x0 * s
    d = k8_64(x, torch.full((3,), s, dtype=torch.float64))
    for target in (2.5, 0.0):
        euler = d + (target / s) * (x - d)
        got = solve(k8_64, x0, [s, target], solver=solver)
        torch.testing.assert_close(got, euler, rtol=1e-9, atol=1e-9)
    assert "heun" not in EULER_STEP_SOLVERS and set(EULER_STEP_SOLVERS) <= set(SOLVERS)


@pytest.mark.parametrize("metric", ["l2", "l1", "dev"])
def test_cost_matrix_entries_are_one_step_errors(k8_64, metric):
    noise = make_noise(range(4), k8_64.shape, dtype=torch.float64)
    levels = gits_grid(6, 0.002, 80.0, final_zero=True)
    xs, dens = teacher_trajectory(k8_64, noise, levels)
    for student in ("euler", "heun"):
        cost = cost_matrix(k8_64, xs, dens, levels, metric=metric, solver=student)
        assert np.isinf(cost[np.tril_indices(len(levels))]).all()
        start, end = xs[0].flatten(1), xs[-1].flatten(1)
        for i, j in [(0, 1), (0, 6), (2, 4), (3, 6), (5, 6)]:
            y = solve(k8_64, xs[i] / levels[i], [levels[i], levels[j]], solver=student)
            diff = (y - xs[j]).flatten(1)
            if metric == "l2":
                want = diff.norm(dim=1).mean()
            elif metric == "l1":
                want = diff.abs().sum(dim=1).mean()
            else:
                want = (deviation(y.flatten(1), start, end).mean()
                        - deviation(xs[j].flatten(1), start, end).mean())
            assert cost[i, j] == pytest.approx(float(want), rel=1e-9, abs=1e-12), (student, i, j)


def test_warm_up_batches_and_target_chunks_give_the_same_plan(k8_64, monkeypatch):
    import searchd.methods.gits as gits_module

    noise = make_noise(range(6), k8_64.shape, dtype=torch.float64)
    for student in ("euler", "heun"):
        kw = dict(grid_points=9, metric="dev", student_solver=student)
        whole = gits_plan(k8_64, noise, 3, **kw)
        with monkeypatch.context() as m:
            m.setattr(gits_module, "_CHUNK_ELEMENTS", 700)  # two targets per chunk
            parts = gits_plan(k8_64, noise, 3, warmup_batch=4, **kw)
        np.testing.assert_allclose(parts.cost, whole.cost, rtol=1e-10, atol=1e-12)
        assert parts.indices.tolist() == whole.indices.tolist()


# Teacher -------------------------------------------------------------------------------------
def test_teacher_trajectory_of_a_single_step_solver_is_its_run(k8_64):
    noise = make_noise(range(3), k8_64.shape, dtype=torch.float64)
    levels = gits_grid(9, 0.002, 80.0, final_zero=True)
    for sub in (1, 3):
        xs, dens = teacher_trajectory(k8_64, noise, levels, solver="heun", substeps=sub)
        fine = np.concatenate([seg[:-1] for seg in _segments(levels, sub)] + [[0.0]])
        whole = solve(k8_64, noise, fine, solver="heun")
        torch.testing.assert_close(xs[-1], whole, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(xs[0], noise * 80.0)
        i = 4
        d = k8_64(xs[i], torch.full((3,), levels[i], dtype=torch.float64))
        torch.testing.assert_close(dens[i], d)


def _segments(levels, sub):
    from searchd.evaluation.teacher import refine

    return refine(levels, sub)


def test_teacher_cache_by_seeds_and_settings(k8_64):
    cache = TeacherCache(k8_64, max_entries=2)
    a = TeacherSettings(n_steps=8)
    b = TeacherSettings(n_steps=8, solver="euler")
    x = cache.samples(range(3), a)
    assert cache.samples([0, 1, 2], a) is x and (cache.hits, cache.misses) == (1, 1)
    noise = make_noise(range(3), k8_64.shape, dtype=torch.float64)
    torch.testing.assert_close(x, solve(k8_64, noise, a.sigmas(k8_64), solver="heun"))
    torch.testing.assert_close(x, teacher_samples(k8_64, noise, a))
    assert not torch.equal(cache.samples(range(3), b), x)
    cache.samples(range(1, 4), a)  # a third entry pushes out the oldest
    assert len(cache) == 2 and (range(3), a) not in cache and (range(3), b) in cache
    assert TeacherSettings(options={"order": 2}, solver="unipc") == TeacherSettings(
        solver="unipc", options=(("order", 2),))
    with pytest.raises(ValueError, match="unknown solver"):
        TeacherSettings(solver="nope")


# The method on the embedded model --------------------------------------------------------------
def teacher_distance(den, sigmas, solver, noise, ref) -> float:
    with torch.no_grad():
        x = solve(den, noise, sigmas, solver=solver)
    return float((x - ref).flatten(1).norm(dim=1).mean())


def test_gits_on_the_embedded_model_is_deterministic_valid_and_beats_the_baselines():
    den = load("gmm-digits-k64")
    warm = make_noise(range(16), den.shape)
    a = gits_schedule(den, warm, 5)
    b = gits_schedule(den, warm, 5)
    assert np.array_equal(a, b)
    s = Schedule(a, solver="dpmpp_2m").check_range(den.sigma_min, den.sigma_max)
    grid = gits_grid(61, den.sigma_min, den.sigma_max, True)
    assert s.n_steps == 5 and s.final_zero and a[0] == den.sigma_max
    assert np.isin(a, grid).all()
    # Held-out noise, a 64-step Heun teacher (0.008 from a 256-step one, against distances
    # of 0.7 to 4 for the 5-step schedules).
    noise = make_noise(range(10_000, 10_032), den.shape)
    ref = teacher_samples(den, noise, TeacherSettings(n_steps=64))
    got = teacher_distance(den, a, "dpmpp_2m", noise, ref)
    base = {f: teacher_distance(den, baseline(f, 5, den.sigma_min, den.sigma_max), "dpmpp_2m",
                                noise, ref)
            for f in ("polynomial", "logsnr", "time_uniform")}
    assert got < min(base.values()), (got, base)


def test_gits_on_a_discrete_time_model_stays_on_its_grid(k8_64):
    grid = ddpm_linear_grid()
    inside = grid[(grid >= 0.01) & (grid <= 80.0)]
    levels = model_grid_levels(grid, 21, 0.01, 80.0, final_zero=True)
    assert levels.size == 22 and levels[-1] == 0.0 and np.isin(levels[:-1], inside).all()
    assert np.all(np.diff(levels) < 0)
    den = load("gmm-digits-k8", dtype=torch.float64)
    den.sigma_grid = torch.as_tensor(grid)  # as a discrete-time model declares it
    space = DiscreteSpace(4, grid, True, 0.01, 80.0, solver="euler")
    s = compute_gits(den, 4, "euler", range(3), grid_points=15, sigma_min=space.sigma_min,
                     sigma_max=space.sigma_max, free_end=False)
    space.check(s)  # fixed endpoints: from the pool's top down to its bottom, then 0
    assert s.sigmas[-2] == space.sigma_min and np.isin(s.sigmas[:-1], inside).all()
    assert grid[s.meta["grid_indices"]].tolist() == s.sigmas[:-1].tolist()
    GitsSearcher(space, METRIC, "min", schedule=s)


def test_compute_gits_gives_a_schedule_with_provenance(k8_64):
    s = compute_gits(k8_64, 4, "heun", range(4), grid_points=13, metric="l2",
                     final_zero=False)
    assert s.solver == "heun" and s.n_steps == 4 and not s.final_zero
    assert s.meta["origin"] == "gits" and s.meta["params"]["student_solver"] == "heun"
    assert s.sigmas[0] == 80.0 and s.sigmas[-1] >= 0.002
    assert Schedule.from_json(s.to_json()) == s
    json.dumps(s.to_dict(), allow_nan=False)


# The searchers of a precomputed schedule ---------------------------------------------------------
SPACE = ContinuousSpace(5, 0.002, 80.0, True, "logsnr")
METRIC = "dist"


def baselines() -> list[Schedule]:
    return [Schedule(baseline(f, 5, 0.002, 80.0), solver=SPACE.solver,
                     meta={"origin": "baseline", "family": f})
            for f in ("polynomial", "logsnr", "time_uniform")]


def precomputed(origin: str) -> Schedule:
    return Schedule([80.0, 3.0, 1.2, 0.5, 0.15, 0.0], solver=SPACE.solver,
                    meta={"origin": origin})


def objective(s: Schedule) -> float:
    return float(np.abs(np.log(s.sigmas[:-1]) - np.log([80.0, 3.0, 1.0, 0.5, 0.1])).sum())


CLASSES = [(GitsSearcher, "gits"), (Ld3Searcher, "ld3")]


def drive(searcher, start: int = 0):
    """The in-process search loop, two candidates per batch (``tests/test_searcher_contract``)."""
    from tests.test_searcher_contract import drive as loop_drive

    return loop_drive(searcher, SPACE, objective, parallel=2, start=start)


@pytest.mark.parametrize(("cls", "origin"), CLASSES)
def test_precomputed_searcher_asks_its_schedule_then_the_baselines(cls, origin):
    sch = precomputed(origin)
    s = cls(SPACE, METRIC, "min", schedule=sch, seeds=baselines() + [sch])
    assert s.algorithm == origin
    got = drive(s)
    assert [g.id for g in got] == [sch.id] + [b.id for b in baselines()]
    assert [g.meta["origin"] for g in got] == [origin] + ["baseline"] * 3
    assert s.ask("later") == FINISHED
    assert s.best["schedule"] == sch  # the objective favours it
    assert len(s.history) == 4 == s.num_suggested


@pytest.mark.parametrize(("cls", "origin"), CLASSES)
def test_precomputed_searcher_state_round_trip(cls, origin, tmp_path):
    sch = precomputed(origin)
    a = cls(SPACE, METRIC, "min", schedule=sch, seeds=baselines())
    first = [a.ask(f"t{i}") for i in range(2)]
    a.tell("t0", float("nan"))  # a NaN counts as a failure
    state = json.loads(json.dumps(a.get_state(), allow_nan=False))
    a.save(tmp_path / "s.json")
    b = cls(SPACE, METRIC, "min", schedule=sch, seeds=baselines())
    b.set_state(state)
    c = cls(SPACE, METRIC, "min", schedule=sch, seeds=baselines())
    c.restore(tmp_path / "s.json")
    assert b.pending == a.pending == c.pending and b.history == a.history
    rest = [[x.id for x in drive(t, start=10)] for t in (a, b, c)]
    # The pending candidate is asked again first (as a resumed run does), then the rest.
    assert rest[0] == rest[1] == rest[2] == [first[1].id] + [b_.id for b_ in baselines()[1:]]
    assert {x.id for x in first} | set(rest[0]) == {sch.id} | {x.id for x in baselines()}
    other = cls(SPACE, METRIC, "min", schedule=Schedule([80.0, 9.0, 2.0, 0.4, 0.01, 0.0]),
                seeds=baselines())
    with pytest.raises(ValueError, match="schedule"):
        other.set_state(state)


@pytest.mark.parametrize(("cls", "origin"), CLASSES)
def test_precomputed_searcher_refuses_a_missing_or_misfit_schedule(cls, origin):
    with pytest.raises(ValueError, match="needs its schedule"):
        cls(SPACE, METRIC, "min", schedule=None)
    with pytest.raises(ValueError, match="steps"):
        cls(SPACE, METRIC, "min", schedule=Schedule([80.0, 1.0, 0.0]))
    s = cls(SPACE, METRIC, "min", schedule=precomputed(origin).to_dict())
    assert s.schedule.meta["origin"] == origin
