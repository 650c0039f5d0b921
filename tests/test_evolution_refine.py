"""The evolution's local phase (``EvolutionSearcher(refine=...)``): a (1 + lambda) step with
shrinking steps around the incumbent for the last candidates of the budget.

Checked against closed forms: a quadratic bowl in the space's own parameters (its minimum
known), the log-linear step schedule, and a resumed search that must hand out exactly the
candidates of an uninterrupted one.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from searchd.schedule import Schedule
from searchd.schedules.spaces import ContinuousSpace, with_meta
from searchd.searchers.base import FINISHED
from searchd.searchers.evolution import EvolutionSearcher

TARGET = np.array([0.62, 0.35, 0.4, 0.3, 0.9, 0.6])  # a 6-parameter optimum inside the cube


def space6() -> ContinuousSpace:
    """NFE 6 with a final 0 and free endpoints: 6 parameters, as digits-flow-s's flow space."""
    return ContinuousSpace(6, 0.002, 80.0, True, "flow", free_endpoints=True, gap_ratio=10.0,
                           solver="euler")


def bowl(space: ContinuousSpace):
    """Squared distance to TARGET in the space's parameters: minimum 0 at TARGET."""
    def f(s: Schedule) -> float:
        return float(np.sum((space.encode(s) - TARGET) ** 2))
    return f


def start(space: ContinuousSpace) -> Schedule:
    """One seed schedule 0.25 away from the optimum in every parameter but the top's."""
    u = TARGET + np.array([0.25, -0.25, 0.25, 0.25, 0.0, -0.25])
    return with_meta(space.decode(u), origin="baseline")


def run(s: EvolutionSearcher, f, stop_after: int | None = None) -> list[Schedule]:
    """Ask one candidate at a time and tell its value at once, until FINISHED (or until
    ``stop_after`` candidates were asked and told)."""
    asked: list[Schedule] = []
    while stop_after is None or len(asked) < stop_after:
        x = s.ask(f"k{s.num_suggested}")
        assert x is not None, "one at a time, a result is always in before the next ask"
        if x == FINISHED:
            break
        asked.append(x)
        s.tell(f"k{s.num_suggested - 1}", f(x))
    return asked


def searcher(space: ContinuousSpace, seed: int, refine: int, budget: int = 40,
             **kw) -> EvolutionSearcher:
    return EvolutionSearcher(space, "d", "min", population_num=6, select_num=2,
                             mutation_num=4, crossover_num=2, m_prob=0.4, max_epochs=1000,
                             seed=seed, seeds=[start(space)], max_candidates=budget,
                             mutation_scale=(0.02, 0.3), refine=refine, **kw)


@pytest.mark.parametrize("rule", ["decay", "success"])
def test_refine_alone_converges_on_a_quadratic_bowl(rule):
    space = space6()
    f = bowl(space)
    f0 = f(start(space))
    for seed in range(4):
        # Generation 0 is the one seed; every later candidate is the local phase's.
        s = EvolutionSearcher(space, "d", "min", population_num=6, select_num=2,
                              mutation_num=4, crossover_num=2, seed=seed, seeds=[start(space)],
                              random_fill=False, max_candidates=81, refine=80, refine_batch=1,
                              refine_scale=(0.2, 0.002), refine_rule=rule)
        asked = run(s, f)
        assert len(asked) == 81 and [x.meta["origin"] for x in asked[1:]] == ["refine"] * 80
        # The incumbent never gets worse, and it ends within a factor 20 of the optimum's
        # value (a random sampler's best of 81 in 6 parameters is nowhere near).
        best = np.minimum.accumulate([h["value"] for h in s.history])
        assert best[-1] < 0.05 * f0, (rule, seed, best[-1] / f0)
        assert best[40] > best[-1]  # still improving in the second half (smaller steps)
        steps = [x.meta["mutation_scale"] for x in asked[1:]]
        assert min(steps) >= 0.002 - 1e-12 and max(steps) <= 0.2 + 1e-12
        if rule == "decay":
            assert steps == pytest.approx([s.refine_step(j) for j in range(80)])
        else:  # doubled after a step that won, shrunk by 2^(-1/4) after one that did not
            for j in range(1, 80):
                won = best[j] < best[j - 1]  # candidate j (step j - 1) improved
                want = min(0.2, max(0.002, steps[j - 1] * (2.0 if won else 2 ** -0.25)))
                assert steps[j] == pytest.approx(want)


def test_refine_steps_shrink_log_linearly_around_the_incumbent():
    space = space6()
    f = bowl(space)
    s = searcher(space, 3, refine=10, budget=30, refine_batch=3, refine_scale=(0.2, 0.02))
    assert s.refine_step(0) == pytest.approx(0.2) and s.refine_step(9) == pytest.approx(0.02)
    assert s.refine_step(3) == pytest.approx(0.2 * 0.1 ** (3 / 9))
    asked = run(s, f)
    assert len(asked) == 30
    origins = [x.meta["origin"] for x in asked]
    # Bred candidates first (the generation running at candidate 20 is cut), then the phase.
    assert "refine" not in origins[:20] and origins[20:] == ["refine"] * 10
    hist = s.history
    for i in range(20, 30):
        x = asked[i]
        j0 = 20 + 3 * ((i - 20) // 3)  # each step of 3 draws its step size at its first
        assert x.meta["mutation_scale"] == pytest.approx(s.refine_step(j0 - 20))
        # The parent is the best candidate scored before that step was built.
        before = [h for h in hist[:j0] if h["value"] is not None]
        best = min(before, key=lambda h: (h["value"], h["id"]))
        assert x.meta["parents"] == [best["id"]]
    assert s.generation_sizes[-4:] == [3, 3, 3, 1]


def test_a_resumed_refine_phase_hands_out_the_same_candidates(tmp_path):
    space = space6()
    f = bowl(space)
    whole = [x.id for x in run(searcher(space, 7, refine=12, budget=30), f)]
    a = searcher(space, 7, refine=12, budget=30)
    first = run(a, f, stop_after=23)  # stopped inside the local phase
    assert first[-1].meta["origin"] == "refine"
    a.save(tmp_path / "state.json")
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["algo"]["params"]["refine"] == 12 and state["algo"]["refine_start"] == 18
    b = searcher(space, 7, refine=12, budget=30)
    b.restore(tmp_path / "state.json")
    rest = run(b, f)
    assert [x.id for x in first] + [x.id for x in rest] == whole


def test_refine_after_the_last_bred_generation_without_a_candidate_cap():
    space = space6()
    s = EvolutionSearcher(space, "d", "min", population_num=6, select_num=2, mutation_num=4,
                          crossover_num=2, max_epochs=3, seed=1, seeds=[start(space)],
                          refine=5, refine_batch=2)
    asked = run(s, bowl(space))
    assert [x.meta["origin"] == "refine" for x in asked].count(True) == 5
    assert len(asked) == 18 + 5 and s.generation_sizes[-3:] == [2, 2, 1]


@pytest.mark.parametrize("kw, says", [
    (dict(refine=-1), "refine = -1"), (dict(refine=2.5), "refine = 2.5"),
    (dict(refine=4, refine_batch=0), "refine_batch = 0"),
    (dict(refine=4, refine_scale=(0.01, 0.1)), "refine_scale"),
    (dict(refine=4, refine_scale=(0.1, 0.0)), "refine_scale"),
    (dict(refine=4, refine_scale=(math.inf, 0.1)), "refine_scale"),
    (dict(refine=4, refine_scale=(0.1,)), "refine_scale"),
    (dict(refine=4, refine_rule="cma"), "refine_rule = 'cma'")])
def test_bad_refine_settings_are_refused(kw, says):
    with pytest.raises(ValueError, match=says.replace("(", "\\(")):
        EvolutionSearcher(space6(), population_num=6, select_num=2, mutation_num=2,
                          crossover_num=2, **kw)


def test_refine_from_a_config_stores_every_candidate_as_a_parquet_row(tmp_path):
    """search.evolution.refine through make_searcher, the loop and the recorder: every
    candidate, those of the local phase included, is a row with its origin and parent."""
    from searchd.config import load_config
    from searchd.loop import Progress, Recorder, SearchLoop
    from searchd.loop.plan import make_searcher
    from searchd.storage import RunDir, table_to_rows
    from tests.test_loop import Counting

    space = space6()
    cfg = load_config(None, [
        "model.name=gmm-digits", "nfe=6", "space.endpoints=free", "search.algorithm=evolution",
        "search.budget=30", "search.predictor.enabled=false",
        "search.evolution.population_num=8", "search.evolution.select_num=3",
        "search.evolution.mutation_num=4", "search.evolution.crossover_num=2",
        "search.evolution.refine=10", "search.evolution.refine_batch=2",
        "search.evolution.refine_scale=[0.2,0.02]", "search.evolution.refine_rule=success"])

    def searcher() -> EvolutionSearcher:
        s = make_searcher(cfg.search, space, [start(space)], "fid", cfg.mode)
        assert (s.refine, s.refine_batch, s.refine_scale, s.refine_rule) == (
            10, 2, (0.2, 0.02), "success")
        return s

    run = RunDir(tmp_path / "run")
    s = searcher()
    rec = Recorder(run, "run", s, Progress(None, s.max_candidates, "fid", {}), lambda line: None)
    SearchLoop(s, [0, 1], batch_size=4, observers=[rec]).run(Counting())
    rows = table_to_rows(run.read_evaluations())
    # The searcher's budget is search.budget less the default race's re-scoring.
    assert len(rows) == s.num_suggested == s.max_candidates > 10 + 8
    local = [r for r in rows if r["origin"] == "refine"]
    assert len(local) == 10 and all(len(r["parent_ids"]) == 1 for r in local)
    assert {r["candidate_id"] for r in rows} == {h["id"] for h in s.history}
    # The newest stored state (taken as the last batch was recorded, before the searcher
    # learnt of it) restores the same search, the local phase's step included.
    _, state = run.latest_searcher_state()
    again = searcher()
    again.set_state(state)
    n = len(again.history)
    assert n >= len(s.history) - 4 and again.history == s.history[:n]
    assert again.get_state()["algo"]["refine_sigma"] == state["algo"]["refine_sigma"]
