"""The OMS-DPM predictor: it learns a ranking online, and evolution uses it to pre-screen."""

from __future__ import annotations

import json

import numpy as np
import pytest

from searchd.schedule import Schedule
from searchd.schedules.baselines import baseline
from searchd.schedules.model_spaces import ModelSpace
from searchd.searchers.evolution import EvolutionSearcher
from searchd.searchers.predictor import PredictorConfig, SchedulePredictor, kendall_tau
from tests.test_searcher_contract import METRIC, drive

LAT = [0.01, 0.2, 1.0]
SIG = baseline("polynomial", 8, 0.002, 80.0, True, rho=7.0)
WEIGHTS = np.linspace(0.2, 2.0, 8)  # later (low-noise) steps matter more


def space() -> ModelSpace:
    return ModelSpace(SIG, LAT, 4.5)


def quality(s: Schedule) -> float:
    """Lower is better: a big member helps most at low noise (the last steps)."""
    return float(np.sum(WEIGHTS * (2 - s.model_ids) ** 1.5))


def test_predictor_ranks_held_out_candidates():
    sp = space()
    rng = np.random.default_rng(0)
    pool = list({s.id: s for s in (sp.sample(rng) for _ in range(160))}.values())
    train, test = pool[:80], pool[80:]
    pred = SchedulePredictor(3, seed=0, config=PredictorConfig(steps=40))
    pred.fit(train, [quality(s) for s in train])
    tau = kendall_tau(pred.score(test), [quality(s) for s in test])
    assert tau > 0.6, tau
    # The same data and seed give the same network.
    again = SchedulePredictor(3, seed=0, config=PredictorConfig(steps=40))
    again.fit(train, [quality(s) for s in train])
    np.testing.assert_array_equal(again.score(test), pred.score(test))
    with pytest.raises(ValueError, match="not trained yet"):
        SchedulePredictor(3).score(test)


def test_predictor_on_a_training_set_larger_than_a_step_draws():
    """Above twice the pairs a step draws, a step runs the network on the drawn rows only
    (the same loss): it still learns the ranking."""
    sp = space()
    rng = np.random.default_rng(0)
    pool = list({s.id: s for s in (sp.sample(rng) for _ in range(160))}.values())
    train, test = pool[:80], pool[80:]
    pred = SchedulePredictor(3, seed=0, config=PredictorConfig(steps=60, pairs_per_step=16))
    pred.fit(train, [quality(s) for s in train])  # 80 > 2 x 16: the drawn rows only
    assert kendall_tau(pred.score(test), [quality(s) for s in test]) > 0.6


def build(top_fraction):
    sp = space()
    return sp, EvolutionSearcher(
        sp, METRIC, "min", population_num=8, select_num=3, mutation_num=4, crossover_num=2,
        max_epochs=4, seed=2, predictor_top_fraction=top_fraction, predictor_min_train=8,
        predictor_config=PredictorConfig(steps=10),
    )


def test_evolution_prescreens_offspring_and_logs_its_tau():
    sp, ev = build(0.25)
    got = drive(ev, sp, quality)
    assert ev.generation_sizes == [8, 8, 8, 8]  # the actors still get population_num each
    assert len({s.id for s in got}) == len(got) == 32
    log = ev.predictor_log
    assert [e["generation"] for e in log] == [1, 2, 3]
    assert all(e["pool"] > e["kept"] == 8 for e in log)
    assert all(e["tau"] is not None and -1 <= e["tau"] <= 1 for e in log)
    # Plain-data state with the log; a restored searcher continues identically.
    state = json.loads(json.dumps(ev.get_state()))
    assert state["algo"]["predictor_log"][0]["kept"] == 8


def test_state_round_trip_with_the_predictor():
    sp, a = build(0.5)
    drive(a, sp, quality, steps=12)
    _, b = build(0.5)
    b.set_state(json.loads(json.dumps(a.get_state())))
    rest_a = [s.id for s in drive(a, sp, quality, start=100)]
    rest_b = [s.id for s in drive(b, sp, quality, start=100)]
    assert rest_a == rest_b and rest_a


def test_bad_top_fraction_is_refused():
    with pytest.raises(ValueError, match="predictor_top_fraction = 1.5"):
        EvolutionSearcher(space(), METRIC, predictor_top_fraction=1.5)
