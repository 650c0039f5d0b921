"""Racing and successive halving (searchd.loop.racing) against hand-computed outcomes.

A scorer with a known value per (candidate, seed block) makes every outcome computable by
hand: which candidates a race re-scores on which seeds, the pooled means, the winner, the
survivors of each halving rung and the samples each one got. The library run then races
for real (local engine) and stores the race as rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from searchd.evaluation import CandidateResult
from searchd.loop import SearchLoop
from searchd.loop.racing import (
    HalvingScorer,
    halving_cost,
    race,
    race_blocks,
    search_budget,
)
from searchd.schedule import Schedule
from searchd.schedules.spaces import ContinuousSpace
from searchd.searchers.random_search import RandomSearcher


def sched(i: int) -> Schedule:
    return Schedule(np.array([80.0, 10.0 / (i + 1), 0.0]), meta={"i": i})


class TableScorer:
    """value = base[candidate] + noise[candidate][block], block = seeds[0] // block_size."""

    def __init__(self, base: dict[str, float], noise: dict[str, list[float]],
                 block_size: int) -> None:
        self.base, self.noise, self.block_size = base, noise, block_size
        self.calls: list[tuple[list[str], list[int]]] = []

    def score(self, schedules: Sequence[Schedule], seeds: Sequence[int]
              ) -> list[CandidateResult]:
        seeds = list(seeds)
        self.calls.append(([s.id for s in schedules], seeds))
        b = seeds[0] // self.block_size
        return [CandidateResult(s.id, "ok", {"fid": self.base[s.id] + self.noise[s.id][b]},
                                nfe=4, n_samples=len(seeds), seed_base=seeds[0], wall_s=1.0,
                                samples_per_s=len(seeds)) for s in schedules]


def test_race_rescores_the_top_k_on_fresh_blocks_and_pools():
    s = [sched(i) for i in range(5)]
    # Search values (block 0): s0 luckiest. True quality: s2 best.
    base = {s[0].id: 1.0, s[1].id: 0.9, s[2].id: 0.8, s[3].id: 2.0, s[4].id: 3.0}
    noise = {s[0].id: [-0.3, 0.1, 0.1], s[1].id: [-0.1, 0.0, 0.0],
             s[2].id: [0.05, -0.02, 0.0], s[3].id: [0, 0, 0], s[4].id: [0, 0, 0]}
    scorer = TableScorer(base, noise, 100)
    scored = [(x, scorer.score([x], range(100))[0].value("fid")) for x in s]
    scorer.calls.clear()
    blocks = race_blocks(0, 100, 2)
    assert blocks == [list(range(100, 200)), list(range(200, 300))]
    rows = []
    out = race(scored, scorer, blocks, "fid", 3,
               record=lambda b, sc, rs: rows.append((b, [x.id for x in sc], rs)))
    # The top 3 by search value: s0 (0.7), s1 (0.8), s2 (0.85); each block scores them once.
    top = [s[0].id, s[1].id, s[2].id]
    assert [c[0] for c in scorer.calls] == [top, top]
    assert [c[1][0] for c in scorer.calls] == [100, 200]
    assert out.search_winner.id == s[0].id
    pooled = {e.schedule.id: e.pooled for e in out.entries}
    assert pooled[s[0].id] == pytest.approx((0.7 + 1.1 + 1.1) / 3)
    assert pooled[s[2].id] == pytest.approx((0.85 + 0.78 + 0.8) / 3)
    assert out.winner.id == s[2].id
    assert out.calls == 2 * 3 * 4 * 100 and out.scored == 6
    assert [(b, ids) for b, ids, _ in rows] == [(1, top), (2, top)]
    assert all(r.seed_base == 100 * b for b, _, rs in rows for r in rs)
    # A resumed race does not score what is stored again.
    known = {(x, b): r for b, ids, rs in rows for x, r in zip(ids, rs)}
    scorer.calls.clear()
    again = race(scored, scorer, blocks, "fid", 3, known=known)
    assert scorer.calls == [] and again.winner.id == out.winner.id
    assert again.scored == 0 and again.calls == out.calls  # the race's cost, stored or not
    # Too few finite values: no race.
    assert race([(s[0], 1.0), (s[1], None)], scorer, blocks, "fid", 3) is None


def test_successive_halving_survivors_and_pooled_values():
    s = [sched(i) for i in range(8)]
    base = {x.id: float(i) for i, x in enumerate(s)}
    noise = {x.id: [0.0, 0.5, 1.0, 1.5] for x in s}
    noise[s[5].id] = [-5.0, 0.0, 0.0, 0.0]  # lucky on block 0: survives rung 1, then out
    inner = TableScorer(base, noise, 25)
    hs = HalvingScorer(inner, "fid", rungs=3, eta=2)
    out = hs.score(s, list(range(75)))
    # Rung 0: all 8 on seeds 0..24; rung 1: best 4 by block 0 (s5, s0, s1, s2) on 25..49;
    # rung 2: best 2 by mean (s0: 0.25, s1: 1.25; s5: 2.5, s2: 2.25) on 50..74.
    ids = [c[0] for c in inner.calls]
    assert ids[0] == [x.id for x in s]
    assert sorted(ids[1]) == sorted([s[5].id, s[0].id, s[1].id, s[2].id])
    assert sorted(ids[2]) == sorted([s[0].id, s[1].id])
    assert [c[1][0] for c in inner.calls] == [0, 25, 50]
    by = {r.candidate_id: r for r in out}
    assert [r.candidate_id for r in out] == [x.id for x in s]
    assert by[s[0].id].n_samples == 75 and by[s[0].id].value("fid") == pytest.approx(0.5)
    assert by[s[0].id].metrics["fid@block2"] == pytest.approx(1.0)
    assert by[s[5].id].n_samples == 50 and by[s[5].id].value("fid") == pytest.approx(2.5)
    assert by[s[7].id].n_samples == 25 and "fid@block1" not in by[s[7].id].metrics
    assert all(r.seed_base == 0 for r in out)
    with pytest.raises(ValueError, match="halving: 5 seeds cannot make 3 blocks"):
        hs.score(s, list(range(5)))


def test_budget_arithmetic():
    assert halving_cost(1, 2) == 1.0
    assert halving_cost(3, 2) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert search_budget(64, 8, 1) == 56
    assert search_budget(64, 8, 2, rungs=3, eta=2) == math.floor(48 / halving_cost(3, 2))
    assert search_budget(4, 8, 1) == 1


def test_halving_in_the_search_loop_counts_samples():
    space = ContinuousSpace(4, 0.002, 80.0, solver="dpmpp_2m")
    searcher = RandomSearcher(space, "fid", "min", num_samples=8, seed=0)
    rng = np.random.default_rng(0)

    class Noisy:
        def score(self, schedules, seeds):
            return [CandidateResult(x.id, "ok", {"fid": float(x.sigmas[1]) + rng.normal()},
                                    nfe=4, n_samples=len(seeds), seed_base=seeds[0],
                                    wall_s=0.1, samples_per_s=1.0) for x in schedules]

    loop = SearchLoop(searcher, range(40), batch_size=8,
                      wrap_scorer=lambda sc: HalvingScorer(sc, "fid", 2, 2))
    loop.run(Noisy())
    samples = sorted(loop.result_of(s.id).n_samples for s, _ in loop.scored())
    assert samples == [20] * 4 + [40] * 4


@pytest.mark.parametrize("rungs", [1, 2])
def test_a_run_races_and_stores_the_race_as_rows(tmp_path, rungs):
    import searchd
    from searchd.storage import RunDir, table_to_rows

    overrides = [
        "nfe=4", "search.algorithm=random",
        "search.budget=16", "search.candidates_per_trial=4", "samples.per_candidate=40",
        "samples.heldout=40", "metric.reference=exact:200", "report.plots=false",
        "search.racing.top_k=4", "search.racing.blocks=2", f"search.halving.rungs={rungs}",
        f"run_dir={tmp_path / 'run'}",
    ]
    quick = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    out = searchd.search(str(quick), overrides, engine="local")
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    r = best["racing"]
    assert r["top_k"] == 4 and r["blocks"] == 2 and r["block_seed_bases"] == [40, 80]
    assert out.schedule.id == r["winner"]
    rows = table_to_rows(RunDir(str(tmp_path / "run")).read_evaluations())
    race_rows = [x for x in rows if x["trial_id"].startswith("race/")]
    assert len(race_rows) == 8
    assert sorted({(x["fidelity"], x["seed_base"], x["n_samples"]) for x in race_rows}) == [
        (1, 40, 40), (2, 80, 40)]
    winner = min(r["candidates"], key=lambda c: c["pooled"])
    assert winner["id"] == r["winner"]
    search_rows = [x for x in rows if not x["trial_id"].startswith("race/")]
    # The searcher got the budget less the race (and with halving the same samples' worth).
    want = 8 if rungs == 1 else int(8 / halving_cost(2, 2))
    assert len(search_rows) == want
    if rungs == 2:
        assert {x["fidelity"] for x in search_rows} <= {1, 2}
    assert out.status == "finished"


def test_a_run_killed_during_the_race_resumes_without_scoring_stored_blocks(tmp_path):
    """kill -9 (``SEARCHD_FAULT=during_race:1``) once the race has stored its first fresh
    block: the resume reads those rows back, scores the second block only, and its winner
    is the lowest pooled mean of the stored and the new values."""
    import os
    import signal
    import subprocess
    import sys

    import searchd
    from searchd.storage import RunDir, table_to_rows

    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    sets = ["nfe=4", "search.algorithm=random", "search.budget=16",
            "search.candidates_per_trial=4", "samples.per_candidate=40", "samples.heldout=40",
            "metric.reference=exact:200", "report.plots=false", "search.racing.top_k=4",
            "search.racing.blocks=2"]
    args = ["--config", str(repo / "configs" / "quickstart.yaml"), "--engine", "local",
            "--quiet", "--run-dir", str(run)] + [a for kv in sets for a in ("--set", kv)]
    env = dict(os.environ, PYTHONPATH=str(repo), SEARCHD_FAULT="during_race:1")
    p = subprocess.run([sys.executable, "-m", "searchd.search", *args], capture_output=True,
                       text=True, cwd=repo, env=env, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert "SIGKILL at during_race:1" in p.stderr

    def race_rows() -> list[dict]:
        rows = table_to_rows(RunDir(str(run)).read_evaluations())
        return [r for r in rows if r["trial_id"].startswith("race/")]

    killed = race_rows()
    assert sorted(r["fidelity"] for r in killed) == [1] * 4 and not (run / "best.json").exists()
    stored = {r["candidate_id"]: r["value"] for r in killed}

    out = searchd.search(run_dir=str(run), resume=True, engine="local")
    assert out.status == "finished"
    after = race_rows()
    # Block 1 is not scored again (its rows are the killed run's); block 2 is scored once.
    assert sorted((r["candidate_id"], r["fidelity"]) for r in after) == sorted(
        [(c, 1) for c in stored] + [(c, 2) for c in stored])
    assert {r["candidate_id"]: r["value"] for r in after if r["fidelity"] == 1} == stored
    best = json.loads((run / "best.json").read_text())["racing"]
    by_id = {c["id"]: c for c in best["candidates"]}
    assert set(by_id) == set(stored)
    for cid, c in by_id.items():
        assert c["values"][1] == stored[cid]
        block2 = next(r["value"] for r in after if r["candidate_id"] == cid
                      and r["fidelity"] == 2)
        assert c["values"][2] == block2
        assert math.isclose(c["pooled"], sum(c["values"]) / 3, rel_tol=1e-12)
    assert best["winner"] == min(by_id.values(), key=lambda c: c["pooled"])["id"]
    # The race's record counts every re-scoring (the stored block too), as an uninterrupted
    # run's does.
    assert out.schedule.id == best["winner"] and best["rescored"] == 8
    assert best["denoiser_calls"] == 8 * 4 * 40
