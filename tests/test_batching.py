"""``BatchedSearcher``: several candidates per Tune trial, one-candidate protocol inside.

Plain objects, no Ray runtime: the tests call ``suggest``/``on_trial_complete`` as Tune's
controller would, with searchd's own searchers (random, evolution) inside, and check what
the inner searcher sees against running it directly.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from ray.tune.search import Searcher

from searchd.schedule import Schedule
from searchd.schedules.spaces import ContinuousSpace
from searchd.search.batching import BatchedSearcher
from searchd.search.evolution import EvolutionSearcher
from searchd.search.random_search import RandomSearcher

FINISHED = Searcher.FINISHED
METRIC = "dist"


def space() -> ContinuousSpace:
    return ContinuousSpace(4, 0.002, 80.0, True, "logsnr", free_endpoints=True)


def objective(cfg: dict[str, Any]) -> float:
    """An analytic score of a candidate config: RMS log-sigma distance to a fixed schedule."""
    s = Schedule.from_dict(cfg["schedule"])
    target = np.log(np.array([40.0, 5.0, 0.5, 0.02]))
    return float(np.sqrt(np.mean((np.log(s.sigmas[:-1]) - target) ** 2)))


def per_candidate(batch: dict[str, Any], failed: tuple[int, ...] = ()) -> dict[str, Any]:
    """The result a trial reports for a batch (as searchd's runner builds it)."""
    per = []
    for j, cfg in enumerate(batch["candidates"]):
        if j in failed:
            per.append({"status": "failed", METRIC: math.nan, "error": "boom"})
        else:
            per.append({"status": "ok", METRIC: objective(cfg)})
    best = min(p[METRIC] for p in per if math.isfinite(p[METRIC]))
    return {METRIC: best, "per_candidate": per}


def test_batches_use_sub_ids_and_end_with_a_partial_batch() -> None:
    b = BatchedSearcher(RandomSearcher(space(), METRIC, num_samples=7, seed=1), batch_size=3)
    sizes = []
    for t in ("a", "b", "c"):
        batch = b.suggest(t)
        assert batch["sub_ids"] == [f"{t}/{j}" for j in range(len(batch["candidates"]))]
        sizes.append(len(batch["candidates"]))
    assert sizes == [3, 3, 1]
    assert b.suggest("d") == FINISHED and b.finished
    assert sorted(b.pending) == ["a", "b", "c"]
    assert b.n_trials == 3 and b.n_candidates == 7


def test_results_reach_the_inner_searcher_under_their_sub_ids() -> None:
    inner = RandomSearcher(space(), METRIC, num_samples=8, seed=2)
    b = BatchedSearcher(inner, batch_size=4)
    ok = b.suggest("t1")
    b.suggest("t2")
    b.on_trial_complete("t1", per_candidate(ok, failed=(2,)))
    b.on_trial_complete("t2", None, error=True)
    hist = {h["trial_id"]: h for h in inner.history}
    assert sorted(hist) == [f"t{i}/{j}" for i in (1, 2) for j in range(4)]
    for j, cfg in enumerate(ok["candidates"]):
        h = hist[f"t1/{j}"]
        assert h["id"] == cfg["schedule"]["id"]
        if j == 2:
            assert h["status"] == "error" and h["value"] is None
        else:
            assert h["status"] == "ok" and h["value"] == pytest.approx(objective(cfg))
    assert all(hist[f"t2/{j}"]["status"] == "error" for j in range(4))
    assert not b.pending and not inner.pending


def test_waiting_inner_searcher_makes_the_trial_wait() -> None:
    # An evolutionary generation (5 candidates) fits in one trial; the next trial must wait
    # for its results, then carries the next generation.
    inner = EvolutionSearcher(space(), METRIC, population_num=5, select_num=2, mutation_num=2,
                              crossover_num=1, max_epochs=2, seed=3)
    b = BatchedSearcher(inner, batch_size=16)
    gen0 = b.suggest("g0")
    assert len(gen0["candidates"]) == 5
    assert b.suggest("x") is None and not b.finished
    b.on_trial_complete("g0", per_candidate(gen0))
    gen1 = b.suggest("g1")
    assert len(gen1["candidates"]) == 5
    assert {c["schedule"]["meta"]["generation"] for c in gen1["candidates"]} == {1}
    b.on_trial_complete("g1", per_candidate(gen1))
    assert b.suggest("y") == FINISHED and b.finished and not b.pending


def test_batch_size_one_is_plain_tune() -> None:
    direct = RandomSearcher(space(), METRIC, num_samples=6, seed=4)
    b = BatchedSearcher(RandomSearcher(space(), METRIC, num_samples=6, seed=4), batch_size=1)
    for i in range(6):
        cfg = direct.suggest(f"t{i}")
        batch = b.suggest(f"t{i}")
        assert batch["candidates"] == [cfg]
        direct.on_trial_complete(f"t{i}", {METRIC: objective(cfg)})
        b.on_trial_complete(f"t{i}", per_candidate(batch))
    assert b.suggest("end") == direct.suggest("end") == FINISHED
    assert [(h["id"], h["value"]) for h in b.inner.history] == [
        (h["id"], h["value"]) for h in direct.history
    ]


def test_state_round_trips_as_json_and_continues_identically(tmp_path) -> None:
    def make() -> BatchedSearcher:
        inner = EvolutionSearcher(space(), METRIC, population_num=6, select_num=2,
                                  mutation_num=3, crossover_num=1, max_epochs=3, seed=5)
        return BatchedSearcher(inner, batch_size=4)

    a = make()
    g0a, g0b = a.suggest("t0"), a.suggest("t1")
    a.on_trial_complete("t0", per_candidate(g0a))
    state = json.loads(json.dumps(a.get_state()))  # plain data
    a.save(str(tmp_path / "state.json"))
    b, c = make(), make()
    b.set_state(state)
    c.restore(str(tmp_path / "state.json"))
    assert b.pending == c.pending == {"t1": ["t1/0", "t1/1"]}
    for s in (a, b, c):
        s.on_trial_complete("t1", per_candidate(g0b))
    nxt = [s.suggest("t2") for s in (a, b, c)]
    assert nxt[0] == nxt[1] == nxt[2] and len(nxt[0]["candidates"]) == 4
    assert a.get_state() == b.get_state() == c.get_state()


class Counting(Searcher):
    """A tiny deterministic searcher without a metric of its own: x = 0, 1, 2, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.seen: dict[str, Any] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        self._metric, self._mode = metric, mode
        return True

    def suggest(self, trial_id: str) -> dict[str, Any]:
        self.n += 1
        return {"x": self.n - 1}

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        self.seen[trial_id] = (result, error)


def test_metric_and_mode_pass_through_and_missing_results_stay_missing() -> None:
    inner = Counting()
    b = BatchedSearcher(inner, batch_size=2)
    assert b.set_search_properties("loss", "max", {})
    assert (inner.metric, inner.mode, b.metric, b.mode) == ("loss", "max", "loss", "max")
    assert b.suggest("t") == {"candidates": [{"x": 0}, {"x": 1}], "sub_ids": ["t/0", "t/1"]}
    # Tune removed the trial before it ran: each candidate completes without a result.
    b.on_trial_complete("t")
    assert inner.seen == {"t/0": (None, False), "t/1": (None, False)}
    with pytest.raises(TypeError, match="get_state"):
        b.get_state()
    with pytest.raises(ValueError, match="batch_size"):
        BatchedSearcher(inner, 0)
