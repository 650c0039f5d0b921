"""One contract for every searcher: evolution, random, Bayes (TPE, GP), and the searchers of
a precomputed schedule (GITS, LD3, adaptive).

Searchers are plain objects here (ask/tell over plain data), run by the in-process search
loop (``searchd.loop.SearchLoop``) with an analytic scorer, and never start Ray. The
objective is the RMS distance, in log sigma, from a candidate's noise levels to a hidden
target schedule of the space, so the best possible value is 0 and the baselines are far
from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import ray

from searchd.evaluation import CandidateResult
from searchd.loop import SearchLoop
from searchd.loop.plan import FACTORIES, make_searcher
from searchd.schedule import Schedule
from searchd.schedules.baselines import baseline
from searchd.schedules.spaces import ContinuousSpace, DiscreteSpace, with_meta
from searchd.searchers import SEARCHERS, ScheduleSearcher
from searchd.searchers.base import FINISHED
from searchd.searchers.bayes import BayesSearcher
from searchd.searchers.evolution import EvolutionSearcher
from searchd.searchers.precomputed import AdaptiveSearcher, GitsSearcher, Ld3Searcher
from searchd.searchers.random_search import RandomSearcher

METRIC = "dist"
SMIN, SMAX = 0.002, 80.0


def make_space() -> ContinuousSpace:
    return ContinuousSpace(5, SMIN, SMAX, True, "logsnr", free_endpoints=True)


def make_baselines(space) -> list[Schedule]:
    fams = [("polynomial", {"rho": 7.0}), ("logsnr", {}), ("time_uniform", {})]
    if isinstance(space, DiscreteSpace):
        return [with_meta(space.project(Schedule(
            baseline(f, space.n_steps, space.sigma_min, space.sigma_max, space.final_zero, **p),
            solver=space.solver)), origin="baseline", family=f) for f, p in fams]
    return [Schedule(baseline(f, space.n_steps, space.sigma_min, space.sigma_max,
                              space.final_zero, **p), solver=space.solver,
                     meta={"origin": "baseline", "family": f}) for f, p in fams]


TARGET_U = np.array([0.8, 0.3, 0.65, 0.7, 0.4])


def target_objective(space) -> Callable[[Schedule], float]:
    target = np.log(space.decode(TARGET_U[: space.dim]).sigmas[: space.n_levels])

    def dist(s: Schedule) -> float:
        return float(np.sqrt(np.mean((np.log(s.sigmas[: space.n_levels]) - target) ** 2)))

    return dist


PRECOMPUTED = {"gits": GitsSearcher, "ld3": Ld3Searcher, "adaptive": AdaptiveSearcher}


def precomputed_schedule(space, name: str) -> Schedule:
    """The schedule a GITS/LD3/adaptive searcher hands out: near the hidden target."""
    return with_meta(space.decode(np.full(space.dim, 0.6)), origin=name)


# Budgets are small: GP asks cost ~0.25 s each on 2 cores.
def build(name: str, space, seeds=(), *, budget: int | None = None, seed: int = 0,
          mode: str = "min") -> ScheduleSearcher:
    if name.startswith("evolution"):
        gens = 4 if budget is None else max(1, budget // 8)
        scale = (0.02, 0.3) if name == "evolution-mixed" else 0.15
        # evolution-refine: the second half of the budget is the local phase (refine).
        local = (dict(max_candidates=8 * gens, refine=4 * gens, refine_batch=2)
                 if name == "evolution-refine" else {})
        return EvolutionSearcher(space, METRIC, mode, population_num=8, select_num=3,
                                 mutation_num=3, crossover_num=3, m_prob=0.4, max_epochs=gens,
                                 seed=seed, seeds=seeds, mutation_scale=scale, **local)
    if name == "random":
        return RandomSearcher(space, METRIC, mode, num_samples=budget or 24, seed=seed,
                              seeds=seeds)
    if name in PRECOMPUTED:
        return PRECOMPUTED[name](space, METRIC, mode,
                                 schedule=precomputed_schedule(space, name), seeds=seeds)
    sampler = name.split("-")[1]
    default = 24 if sampler == "tpe" else 10
    return BayesSearcher(space, METRIC, mode, sampler=sampler, num_samples=budget or default,
                         seed=seed, seeds=seeds, n_startup_trials=5)


LEARNING = ["evolution", "evolution-mixed", "evolution-refine", "random", "bayes-tpe",
            "bayes-gp"]
ALL = [*LEARNING, "gits", "ld3", "adaptive"]
DETERMINISTIC = ALL  # bayes too: its samplers are seeded per trial and its history replayed


def n_expected(name: str, s: ScheduleSearcher, n_baselines: int = 3) -> int:
    if name.startswith("evolution"):
        return 32
    if name in PRECOMPUTED:
        return 1 + n_baselines
    return s.num_samples


# The analytic scorer and the loop ---------------------------------------------------------
def _result(s: Schedule, outcome: dict[str, Any]) -> CandidateResult:
    """A Tune-style outcome (``{"result": {...}, "error": bool}``) as the one result record."""
    result = outcome.get("result")
    if outcome.get("error"):
        return CandidateResult(s.id, "failed", {}, 5, 2, 0, 0.0, 0.0, error="scored wrong")
    metrics = {k: (math.nan if v is None else float(v)) for k, v in (result or {}).items()}
    return CandidateResult(s.id, "ok", metrics, 5, 2, 0, 0.0, 0.0)


class ObjectiveScorer:
    """The scoring protocol over an analytic objective: ``score(schedules, seeds)``. Each
    candidate's outcome is ``outcome(i, schedule)`` (Tune-style kwargs) for the i-th scored
    one, else its objective."""

    def __init__(self, objective: Callable[[Schedule], float] | None,
                 outcome: Callable[[int, Schedule], dict[str, Any]] | None = None) -> None:
        self.objective = objective
        self.outcome = outcome
        self.scored: list[Schedule] = []

    def score(self, schedules: Sequence[Schedule], seeds: Sequence[int]
              ) -> list[CandidateResult]:
        out = []
        for s in schedules:
            i = len(self.scored)
            self.scored.append(s)
            kw = (self.outcome(i, s) if self.outcome else
                  {"result": {METRIC: self.objective(s)}})  # type: ignore[misc]
            out.append(_result(s, kw))
        return out


def drive(searcher, space, objective: Callable[[Schedule], Any] | None, *,
          parallel: int = 4, steps: int | None = None, start: int = 0,
          outcome: Callable[[int, Schedule], dict[str, Any]] | None = None) -> list[Schedule]:
    """Run the searcher in the in-process search loop, ``parallel`` candidates per batch,
    until it is finished; or until ``steps`` candidates were asked, the last batch left
    pending (asked, not told). Candidates the searcher has pending are asked again first
    (``requeue_pending``, as a resumed run does). Returns the candidates asked, in order."""
    searcher.requeue_pending()
    scorer = ObjectiveScorer(objective, outcome)
    asked: list[Schedule] = []
    loop = SearchLoop(searcher, [0, 1], batch_size=parallel, first_index=start)
    if steps is None:
        while True:
            batch = loop.ask(f"b{start + len(asked)}-{loop.n_batches}")
            if batch is None:
                raise AssertionError("the searcher waits with nothing pending")
            if batch == FINISHED:
                return asked
            asked.extend(batch.schedules)
            loop.complete(batch.key, scorer.score(batch.to_score, loop.seeds))
            loop.tell(batch.key)
    while len(asked) < steps:
        loop.batch_size = min(parallel, steps - len(asked))
        batch = loop.ask(f"b{start + len(asked)}")
        if batch is None or batch == FINISHED:
            return asked
        asked.extend(batch.schedules)
        if len(asked) < steps:
            loop.complete(batch.key, scorer.score(batch.to_score, loop.seeds))
            loop.tell(batch.key)
    return asked


@pytest.fixture(autouse=True)
def no_ray():
    yield
    assert not ray.is_initialized(), "searcher tests must not start Ray"


# The contract ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_ask_and_tell(name):
    space = make_space()
    obj = target_objective(space)
    s = build(name, space, make_baselines(space))
    got = drive(s, space, obj)
    assert len(got) == n_expected(name, s) == len(s.history) == s.num_suggested
    for sched in got:
        space.check(sched)
        assert sched.meta["origin"] in ("baseline", "random", "mutation", "crossover",
                                        "refine", "bayes", "gits", "ld3", "adaptive")
    values = [obj(x) for x in got]
    assert s.best["value"] == pytest.approx(min(values))
    assert s.best["schedule"] == got[int(np.argmin(values))]
    assert s.ask("after-the-end") == FINISHED


@pytest.mark.parametrize("name", ALL)
def test_no_candidate_is_asked_twice_even_in_a_tiny_space(name):
    # 2 levels chosen among 8 interior grid levels: 28 schedules in all. The samplers keep
    # proposing known ones; each must be turned into a new candidate or FINISHED.
    space = DiscreteSpace(4, np.geomspace(0.01, 80.0, 10), final_zero=True)
    obj = target_objective(space)
    budget = 10 if name == "bayes-gp" else 24  # GP asks are slow
    seeds = make_baselines(space) if name in PRECOMPUTED else ()
    s = build(name, space, seeds, budget=budget)
    got = drive(s, space, obj)
    ids = [x.id for x in got]
    assert len(ids) == len(set(ids)) == len(s.history)
    if name.startswith("evolution"):  # generations shrink once mutations only find known subsets
        assert 8 < len(got) <= budget
    elif name in PRECOMPUTED:  # its schedule, then the baselines it is not (projected, distinct)
        assert ids[0] == precomputed_schedule(space, name).id and len(got) <= 4
    else:
        assert len(got) == budget
    if name.startswith("bayes"):  # repeats were asked, told their known value, and skipped
        assert len(s.study.trials) > len(got)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_state_round_trip_continues_the_same_search(name, tmp_path):
    space = make_space()
    obj = target_objective(space)
    a = build(name, space, make_baselines(space), seed=3)
    steps = 3 if name in PRECOMPUTED else 10 if "gp" not in name else 6
    first = drive(a, space, obj, steps=steps, parallel=2)
    assert a.pending, "the state is taken with candidates outstanding"
    state = json.loads(json.dumps(a.get_state(), allow_nan=False))
    a.save(tmp_path / "state.json")
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left behind

    b = build(name, space, make_baselines(space), seed=3)
    b.set_state(state)
    c = build(name, space, make_baselines(space), seed=3)
    c.restore(tmp_path / "state.json")
    assert b.pending == a.pending == c.pending
    assert b.history == a.history

    rest = [[x.id for x in drive(t, space, obj, start=1000)] for t in (a, b, c)]
    assert rest[0] == rest[1] == rest[2]
    assert rest[0], "the search continues after the restore"
    n_pending = len(state["pending"])
    assert len(first) + len(rest[0]) - n_pending == a.num_suggested == b.num_suggested
    assert a.num_suggested == len(b.history)
    assert a.best["schedule"] == b.best["schedule"] and a.best["value"] == b.best["value"]


@pytest.mark.parametrize("name", ["evolution", "random", "bayes-tpe", "gits"])
def test_requeued_pending_candidates_are_asked_again_not_counted_twice(name):
    space = make_space()
    obj = target_objective(space)
    a = build(name, space, make_baselines(space))
    drive(a, space, obj, steps=3, parallel=2)
    b = build(name, space, make_baselines(space))
    b.set_state(a.get_state())
    old = dict(b.pending)
    assert b.requeue_pending() == sorted(old) and not b.pending
    again = [b.ask(f"new-{i}") for i in range(len(old))]
    assert [c.id for c in again] == [old[t]["id"] for t in sorted(old)]
    assert b.num_suggested == a.num_suggested
    n_optuna = len(b.study.trials) if name.startswith("bayes") else 0
    for i, c in enumerate(again):
        b.tell(f"new-{i}", obj(c))
    assert not b.pending and len(b.history) == len(a.history) + len(old)
    if name.startswith("bayes"):  # the same Optuna trials were told, none was added
        assert len(b.study.trials) == n_optuna
        assert all(t.state.is_finished() for t in b.study.trials)
    rest = drive(b, space, obj, start=100)
    ids = [h["id"] for h in b.history]
    assert len(ids) == len(set(ids)) and rest


@pytest.mark.parametrize("name", ALL)
def test_nan_inf_missing_and_failed_results_never_crash_nor_win(name):
    space = make_space()
    obj = target_objective(space)
    bad: dict[str, str] = {}
    kinds = ["ok", "nan", "ok", "inf", "-inf", "error", "ok", "missing", "none"]
    if name in PRECOMPUTED:  # four candidates: make each one count
        kinds = ["nan", "ok", "error", "missing"]

    def outcome(i: int, s: Schedule) -> dict[str, Any]:
        kind = kinds[i % len(kinds)]
        if kind != "ok":
            bad[s.id] = kind
        return {
            "ok": {"result": {METRIC: obj(s)}},
            "nan": {"result": {METRIC: math.nan}},
            "inf": {"result": {METRIC: math.inf}},
            "-inf": {"result": {METRIC: -math.inf}},  # would win a plain min
            "error": {"result": None, "error": True},
            "missing": {"result": {"other": 1.0}},
            "none": {"result": {METRIC: None}},
        }[kind]

    s = build(name, space, make_baselines(space))
    got = drive(s, space, obj, outcome=outcome)
    assert bad and len(got) == len(s.history)
    assert s.best is not None and s.best["schedule"].id not in bad
    ok_values = [obj(x) for x in got if x.id not in bad]
    assert s.best["value"] == pytest.approx(min(ok_values))
    statuses = {h["status"] for h in s.history}
    assert {"ok", "nonfinite", "error", "missing"} <= statuses
    assert all(h["value"] is None for h in s.history if h["status"] != "ok")
    json.dumps(s.get_state(), allow_nan=False)  # failures stay plain, strict JSON


@pytest.mark.parametrize("name", ALL)
def test_a_search_where_everything_fails_finishes_without_a_best(name):
    space = make_space()
    s = build(name, space, make_baselines(space), budget=16)
    got = drive(s, space, None, outcome=lambda i, x: {"result": None, "error": True})
    assert len(got) == (4 if name in PRECOMPUTED else 16) and s.best is None


@pytest.mark.parametrize("name", ALL)
def test_budget_runs_out(name):
    space = make_space()
    budget = 10 if name == "bayes-gp" else 16
    s = build(name, space, make_baselines(space), budget=budget)
    got = drive(s, space, target_objective(space), parallel=16)
    assert len(got) == (4 if name in PRECOMPUTED else budget)
    for _ in range(3):
        assert s.ask("more") == FINISHED
    # Values told after FINISHED (or for unknown keys) are harmless.
    s.tell("never-asked", 0.0)
    assert len(s.history) == len(got)


@pytest.mark.parametrize("name", ALL)
def test_baselines_come_first_exactly(name):
    space = make_space()
    bases = make_baselines(space)
    s = build(name, space, bases)
    first = [s.ask(f"t{i}") for i in range(len(bases) + (name in PRECOMPUTED))]
    if name in PRECOMPUTED:  # the computed schedule, then the baselines
        assert first.pop(0).id == precomputed_schedule(space, name).id
    assert [x.id for x in first] == [b.id for b in bases]
    assert all(x.meta["origin"] == "baseline" and "family" in x.meta for x in first)


@pytest.mark.parametrize("name", ALL)
def test_mode_max_prefers_larger_values(name):
    space = make_space()
    obj = target_objective(space)
    s = build(name, space, make_baselines(space), mode="max",
              budget=10 if name == "bayes-gp" else 16)
    got = drive(s, space, obj)
    assert s.best["value"] == pytest.approx(max(obj(x) for x in got))


@pytest.mark.parametrize("name", ALL)
def test_the_order_values_are_told_in_does_not_matter(name):
    """On a cluster results arrive in any order: a batch told in reverse gives the same
    search (the candidates asked, and the best)."""
    space = make_space()
    obj = target_objective(space)
    runs = []
    for reverse in (False, True):
        s = build(name, space, make_baselines(space), seed=5,
                  budget=10 if name == "bayes-gp" else 16)
        asked, n = [], 0
        while True:
            keys, batch = [], []
            for _ in range(8):
                x = s.ask(f"t{n}")
                if x is None or x == FINISHED:
                    break
                keys.append(f"t{n}")
                batch.append(x)
                n += 1
            if not batch:
                break
            asked += [x.id for x in batch]
            order = range(len(batch) - 1, -1, -1) if reverse else range(len(batch))
            for j in order:
                s.tell(keys[j], obj(batch[j]))
        runs.append((asked, s.best["schedule"].id))
    if not name.startswith("bayes"):  # Bayes learns in telling order: only its best is compared
        assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1] or name.startswith("bayes")


# Evolution ------------------------------------------------------------------------------------
def test_evolution_generations_baselines_and_provenance():
    space = make_space()
    obj = target_objective(space)
    bases = make_baselines(space)
    s = build("evolution", space, bases)
    # Generation 0 is handed out whole, then the searcher waits for its results.
    gen0 = [s.ask(f"g0-{i}") for i in range(8)]
    assert s.ask("early") is None
    assert [x.id for x in gen0[:3]] == [b.id for b in bases]
    assert [x.meta["origin"] for x in gen0] == ["baseline"] * 3 + ["random"] * 5
    assert all(x.meta["generation"] == 0 for x in gen0)
    for i, x in enumerate(gen0):
        s.tell(f"g0-{i}", obj(x))
    rest = drive(s, space, obj)
    assert s.generation_sizes == [8, 8, 8, 8] and len(rest) == 24
    scored_before: set[str] = {x.id for x in gen0}
    for g in (1, 2, 3):
        gen = [x for x in rest if x.meta["generation"] == g]
        origins = [x.meta["origin"] for x in gen]
        # Mutants, then crossover children, then random ones up to the population; a child
        # that repeats a known schedule (crossing a mutant with its parent often does) is
        # not a new candidate, and a random one takes its place.
        n_mut, n_cross = origins.count("mutation"), origins.count("crossover")
        assert origins == ["mutation"] * n_mut + ["crossover"] * n_cross + ["random"] * (
            8 - n_mut - n_cross)
        assert n_mut == 3 and 1 <= n_cross <= 3
        for x in gen:
            assert set(x.meta["parents"]) <= scored_before  # parents were already scored
            assert len(x.meta["parents"]) == {"mutation": 1, "crossover": 2, "random": 0}[
                x.meta["origin"]]
        scored_before |= {x.id for x in gen}


def test_evolution_beats_the_best_baseline_on_an_analytic_objective():
    space = make_space()
    obj = target_objective(space)
    bases = make_baselines(space)
    s = EvolutionSearcher(space, METRIC, "min", population_num=16, select_num=4,
                          mutation_num=8, crossover_num=4, m_prob=0.4, max_epochs=10, seed=1,
                          seeds=bases, mutation_scale=0.1)
    drive(s, space, obj, parallel=16)
    best_baseline = min(obj(b) for b in bases)
    assert s.best["value"] <= best_baseline
    # Not only never worse: it finds the hidden target's neighbourhood.
    assert s.best["value"] < 0.25 * best_baseline
    by_gen = {}
    for h in s.history:
        g = h["schedule"]["meta"]["generation"]
        by_gen[g] = min(by_gen.get(g, math.inf), h["value"])
    assert min(by_gen[g] for g in range(5, 10)) < min(by_gen[g] for g in range(0, 2))


def test_evolution_does_not_depend_on_the_batch_size():
    space = make_space()
    obj = target_objective(space)
    runs = [[x.id for x in drive(build("evolution", space, make_baselines(space), seed=5),
                                 space, obj, parallel=p)] for p in (3, 8, 32)]
    assert runs[0] == runs[1] == runs[2]


def test_evolution_caps_the_candidate_budget():
    space = make_space()
    s = EvolutionSearcher(space, METRIC, population_num=8, select_num=2, mutation_num=3,
                          crossover_num=3, max_epochs=10, max_candidates=20,
                          seeds=make_baselines(space))
    assert len(drive(s, space, target_objective(space))) == 20


def test_evolution_mixed_scale_mutation_draws_small_and_large_steps():
    space = make_space()
    obj = target_objective(space)
    s = EvolutionSearcher(space, METRIC, "min", population_num=16, select_num=4,
                          mutation_num=12, crossover_num=4, m_prob=1.0, max_epochs=6, seed=2,
                          seeds=make_baselines(space), mutation_scale=[0.01, 0.4])
    assert s.get_state()["algo"]["params"]["mutation_scale"] == [0.01, 0.4]
    drive(s, space, obj)
    mutants = [h["schedule"] for h in s.history if h["schedule"]["meta"]["origin"] == "mutation"]
    scales = np.array([m["meta"]["mutation_scale"] for m in mutants])
    assert len(scales) == 12 * 5 and ((0.01 <= scales) & (scales <= 0.4)).all()
    # Log-uniform: as many steps below the geometric middle (0.063) as above it.
    assert 0.3 < np.mean(scales < 0.063) < 0.7
    # The step drawn is the step taken: a mutant's parameters move by about that much.
    moves = []
    for m in mutants:
        parent = next(h for h in s.history if h["id"] == m["meta"]["parents"][0])
        du = space.encode(Schedule.from_dict(m)) - space.encode(
            Schedule.from_dict(parent["schedule"]))
        moves.append((m["meta"]["mutation_scale"], float(np.sqrt(np.mean(du ** 2)))))
    small = [d for sc, d in moves if sc < 0.03]
    large = [d for sc, d in moves if sc > 0.2]
    assert small and large and np.median(large) > 4 * np.median(small)
    # A fixed scale keeps the old behaviour: no step recorded in the meta.
    f = build("evolution", space, make_baselines(space))
    drive(f, space, obj)
    assert all("mutation_scale" not in h["schedule"]["meta"] for h in f.history)


def test_evolution_rejects_inconsistent_parameters():
    space = make_space()
    with pytest.raises(ValueError, match="select_num"):
        EvolutionSearcher(space, population_num=4, select_num=5, mutation_num=1,
                          crossover_num=1)
    with pytest.raises(ValueError, match="mutation_num \\+ crossover_num"):
        EvolutionSearcher(space, population_num=4, select_num=2, mutation_num=3,
                          crossover_num=3)
    with pytest.raises(ValueError, match="population_num"):
        EvolutionSearcher(space, population_num=2, select_num=1, mutation_num=1,
                          crossover_num=1, seeds=make_baselines(space))
    with pytest.raises(ValueError, match="steps"):
        EvolutionSearcher(space, population_num=8, select_num=2, mutation_num=1,
                          crossover_num=1,
                          seeds=[Schedule(baseline("logsnr", 7, SMIN, SMAX, True))])
    for bad in (0.0, -0.1, [0.3, 0.1], [0.0, 0.1], [0.1, 0.2, 0.3]):
        with pytest.raises(ValueError, match="mutation_scale"):
            EvolutionSearcher(space, population_num=8, select_num=2, mutation_num=1,
                              crossover_num=1, mutation_scale=bad)


# Bayes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_bayes_state_keeps_completed_trials_in_a_fresh_study(sampler):
    space = make_space()
    obj = target_objective(space)
    a = build(f"bayes-{sampler}", space, make_baselines(space))
    drive(a, space, obj, steps=7)
    b = build(f"bayes-{sampler}", space, make_baselines(space))
    b.set_state(json.loads(json.dumps(a.get_state())))
    assert b.study is not a.study
    ta, tb = a.study.trials, b.study.trials
    assert [t.number for t in tb] == [t.number for t in ta]
    assert [t.state for t in tb] == [t.state for t in ta]
    assert [t.value for t in tb] == [t.value for t in ta]
    # pytest.approx takes a flat dict, not a list of dicts: one trial at a time.
    for t1, t2 in zip(ta, tb, strict=True):
        assert t2.params.keys() == t1.params.keys() and t2.params == pytest.approx(t1.params)
    assert len(tb) == 7  # one Optuna trial per suggestion (no repeats in a continuous space)


def test_bayes_tells_optuna_about_failures_and_baselines():
    from optuna.trial import TrialState

    space = make_space()
    s = build("bayes-tpe", space, make_baselines(space), budget=6)
    count = iter(range(6))
    drive(s, space, None,
          outcome=lambda i, x: {"result": {METRIC: [1.0, math.nan][next(count) % 2]}})
    states = [t.state for t in s.study.trials]
    assert states.count(TrialState.FAIL) == 3 and states.count(TrialState.COMPLETE) == 3
    # The baselines' Optuna trials hold their encoded parameters.
    first = s.study.trials[0]
    enc = space.encode(make_baselines(space)[0])
    assert [first.params[f"u{i}"] for i in range(space.dim)] == pytest.approx(enc.tolist())


# Registry --------------------------------------------------------------------------------
def test_make_searcher_builds_every_algorithm_from_a_config():
    from searchd.config import load_config

    space = make_space()
    for algo in ("evolution", "random", "bayes"):
        cfg = load_config(None, ["model.name=gmm-digits", "nfe=5", "space.endpoints=free",
                                 f"search.algorithm={algo}", "search.budget=40"])
        s = make_searcher(cfg.search, space, make_baselines(space), METRIC, cfg.mode)
        assert s.algorithm == algo and s.metric == METRIC and s.mode == "min"
    # One registry of names: every algorithm has its factory, and its class says its name.
    assert list(SEARCHERS) == list(FACTORIES)
    from searchd.searchers import searcher_class

    assert [searcher_class(n).algorithm for n in SEARCHERS] == list(SEARCHERS)
    with pytest.raises(ValueError,
                       match=r"unknown search algorithm 'cmaes'; known: \['adaptive', 'bayes'"):
        make_searcher(SimpleNamespace(algorithm="cmaes"), space)


def test_registry_builds_the_quickstart_space_and_baselines():
    from searchd.config import load_config
    from searchd.loop.plan import make_baselines as registry_baselines
    from searchd.loop.plan import make_space as registry_space

    cfg = load_config("configs/quickstart.yaml")
    space = registry_space(cfg, SMIN, SMAX)
    assert space.dim == 5 and space.n_steps == cfg.steps == 5
    bases = registry_baselines(cfg, space)
    assert [b.meta["name"] for b in bases] == [b.label for b in cfg.baselines]
    np.testing.assert_allclose(bases[0].sigmas, baseline("polynomial", 5, SMIN, SMAX, rho=7))
    disc = load_config("configs/quickstart.yaml", ["space.kind=discrete",
                                                   "space.grid=ddpm_linear"])
    dspace = registry_space(disc, SMIN, SMAX)
    assert isinstance(dspace, DiscreteSpace)
    for b in registry_baselines(disc, dspace):
        dspace.check(b)  # projected onto the grid
