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


def test_weights_round_trip_bit_for_bit_and_a_warm_fit_continues_from_them():
    sp = space()
    rng = np.random.default_rng(1)
    pool = list({s.id: s for s in (sp.sample(rng) for _ in range(120))}.values())
    a, b, test = pool[:40], pool[:80], pool[80:]
    cfg = PredictorConfig(steps=30, warm_steps=10)
    first = SchedulePredictor(3, seed=0, config=cfg).fit(a, [quality(s) for s in a])
    w = json.loads(json.dumps(first.weights()))  # plain data, through JSON
    from searchd.searchers.predictor import _tensors

    for k, v in first.net.state_dict().items():
        assert torch_equal(_tensors(w)[k], v), k
    # A warm fit from the weights: reproducible, different from a fit from scratch, and
    # a warm fit of 0 steps is the first network itself.
    warm = SchedulePredictor(3, seed=0, config=cfg).fit(b, [quality(s) for s in b], 1, init=w)
    again = SchedulePredictor(3, seed=0, config=cfg).fit(b, [quality(s) for s in b], 1, init=w)
    np.testing.assert_array_equal(warm.score(test), again.score(test))
    scratch = SchedulePredictor(3, seed=0, config=cfg).fit(b, [quality(s) for s in b], 1)
    assert not np.array_equal(warm.score(test), scratch.score(test))
    zero = SchedulePredictor(3, seed=0, config=PredictorConfig(steps=30, warm_steps=0))
    zero.fit(b, [quality(s) for s in b], 1, init=w)
    np.testing.assert_array_equal(zero.score(test), first.score(test))
    assert kendall_tau(warm.score(test), [quality(s) for s in test]) > 0.6
    with pytest.raises(ValueError, match="entry 'x'"):
        _tensors({"x": 1})


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


@pytest.mark.parametrize("warm_steps", [0, 7])
def test_evolution_refits_warm_from_its_last_weights(monkeypatch, warm_steps):
    """The first screening fits from scratch (``steps``), later ones continue from the last
    weights for ``warm_steps`` (0: from scratch every time, as before); the same seed gives
    the same candidates, and the weights are in the state."""
    from searchd.searchers import predictor as pm

    trained: list[tuple[int, bool]] = []
    fit = pm.SchedulePredictor.fit

    def spy(self, schedules, values, round=0, init=None):
        out = fit(self, schedules, values, round, init)
        trained.append((self.cfg.steps if init is None else self.cfg.warm_steps,
                        init is not None))
        return out

    monkeypatch.setattr(pm.SchedulePredictor, "fit", spy)
    runs = []
    for _ in range(2):
        sp = space()
        ev = EvolutionSearcher(
            sp, METRIC, "min", population_num=8, select_num=3, mutation_num=4,
            crossover_num=2, max_epochs=4, seed=2, predictor_top_fraction=0.25,
            predictor_min_train=8, predictor_config=PredictorConfig(steps=10,
                                                                    warm_steps=warm_steps))
        runs.append([s.id for s in drive(ev, sp, quality)])
    assert runs[0] == runs[1]
    if warm_steps:
        assert trained == [(10, False), (7, True), (7, True)] * 2
        assert "predictor_weights" in json.loads(json.dumps(ev.get_state()))["algo"]
    else:
        assert trained == [(10, False)] * 6
        assert "predictor_weights" not in ev.get_state()["algo"]
