"""The search loop's guarantees (``searchd.loop``), the one result record and its Parquet row,
canonical candidate ids, and the recorder. No Ray, no model: an analytic scorer."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from searchd.evaluation import CandidateResult
from searchd.loop import Progress, Recorder, SearchLoop
from searchd.loop.record import from_row, to_row
from searchd.schedule import CANONICAL_BITS, Schedule, canonical_sigmas
from searchd.schedules.spaces import ContinuousSpace
from searchd.searchers.base import FINISHED, Next, ScheduleSearcher
from searchd.searchers.random_search import RandomSearcher
from searchd.storage import RunDir, table_to_rows

SPACE = ContinuousSpace(4, 0.002, 80.0, True, "logsnr")
METRIC = "fid"
DATA = Path(__file__).resolve().parent / "data"


def objective(s: Schedule) -> float:
    return float(np.log(s.sigmas[:-1]).sum())


class Counting:
    """The scoring protocol over ``objective``, counting what it is asked to score."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.asked: list[str] = []
        self.fail = set(fail)

    def score(self, schedules: Sequence[Schedule], seeds: Sequence[int]
              ) -> list[CandidateResult]:
        out = []
        for s in schedules:
            self.asked.append(s.id)
            if s.id in self.fail:
                out.append(CandidateResult(s.id, "failed", {}, 4, len(seeds), seeds[0], 0.1,
                                           0.0, error="solver error: boom"))
            else:
                out.append(CandidateResult(s.id, "ok", {METRIC: objective(s)}, 4, len(seeds),
                                           seeds[0], 0.1, 10.0))
        return out


class Listed(ScheduleSearcher):
    """A searcher proposing a fixed list (repeats included: the loop must not rescore)."""

    algorithm = "listed"

    def __init__(self, schedules: Sequence[Schedule]) -> None:
        super().__init__(SPACE, METRIC, "min")
        self._queue = list(schedules)

    def _next(self, key: str) -> Next:
        return (self._queue.pop(0), {}) if self._queue else FINISHED


def some(n: int, seed: int = 0) -> list[Schedule]:
    rng = np.random.default_rng(seed)
    return [SPACE.sample(rng) for _ in range(n)]


# Scored exactly once ---------------------------------------------------------------------------
def test_a_candidate_proposed_again_is_not_scored_again():
    a, b = some(2)
    near = Schedule(a.sigmas * (1 + 1e-14), solver=a.solver)  # floating-point noise
    assert near.id == a.id and not np.array_equal(near.sigmas, a.sigmas)
    searcher = Listed([a, b, a, near, b])
    scorer = Counting()
    out = SearchLoop(searcher, range(4), batch_size=2).run(scorer)
    assert out.finished and out.n_candidates == 5 and out.n_scored == 2
    assert scorer.asked == [a.id, b.id]
    # Every proposal was told, each with the value its candidate scored.
    assert [h["id"] for h in searcher.history] == [a.id, b.id, a.id, a.id, b.id]
    assert [h["value"] for h in searcher.history] == [objective(x) for x in (a, b, a, a, b)]


def test_stored_results_stand_in_and_are_never_scored():
    cands = some(6, seed=1)
    stored = {s.id: r for s, r in zip(cands[:3], Counting().score(cands[:3], [0, 1]))}
    scorer = Counting()
    loop = SearchLoop(Listed(cands), [0, 1], batch_size=4, known=stored)
    out = loop.run(scorer)
    assert scorer.asked == [s.id for s in cands[3:]] and out.n_scored == 3
    assert out.n_candidates == 6 and loop.result_of(cands[0].id) is stored[cands[0].id]


def test_results_must_match_the_batch_one_to_one_and_nothing_is_recorded_otherwise():
    cands = some(3, seed=2)

    class Rec:
        n = 0

        def recorded(self, batch, new):
            Rec.n += 1

    loop = SearchLoop(Listed(cands), [0, 1], batch_size=3, observers=[Rec()])
    batch = loop.ask("b0")
    good = Counting().score(batch.to_score, loop.seeds)
    with pytest.raises(ValueError, match="expected one for each"):
        loop.complete("b0", good[:2])  # one missing
    with pytest.raises(ValueError, match="expected one for each"):
        loop.complete("b0", good[::-1])  # out of order
    with pytest.raises(ValueError, match="not completed"):
        loop.tell("b0")  # the searcher never learns an unrecorded result
    assert Rec.n == 0 and loop.searcher.history == []
    loop.complete("b0", good)
    loop.tell("b0")
    assert Rec.n == 1 and len(loop.searcher.history) == 3
    with pytest.raises(ValueError, match="unknown batch"):
        loop.tell("b0")


def test_every_batch_is_recorded_before_the_searcher_learns_of_it():
    searcher = RandomSearcher(SPACE, METRIC, num_samples=10, seed=3)
    seen: list[int] = []

    class Check:
        def recorded(self, batch, new):
            assert not {h["id"] for h in searcher.history} & {s.id for s in batch.schedules}
            seen.append(len(batch.schedules))

    SearchLoop(searcher, [0, 1], batch_size=4, observers=[Check()]).run(Counting())
    assert seen == [4, 4, 2] and len(searcher.history) == 10


def test_a_batch_whose_scoring_failed_is_recorded_as_failed_and_the_search_goes_on():
    cands = some(4, seed=4)
    loop = SearchLoop(Listed(cands), [0, 1], batch_size=2)
    batch = loop.ask("b0")
    loop.fail("b0", "trial errored: RayActorError: the actor died")
    loop.tell("b0")
    assert [r.status for r in batch.results] == ["failed", "failed"]
    assert loop.run(Counting()).n_scored == 4 and loop.searcher.best is not None
    assert [h["status"] for h in loop.searcher.history] == ["error"] * 2 + ["ok"] * 2


# The one record -----------------------------------------------------------------------------------
def test_the_record_round_trips_through_its_parquet_row(tmp_path):
    """Whatever a Schedule carries (its meta, per-step data a later schedule may add) comes
    back from the row, with the result, without a schema change."""
    s = Schedule(some(1)[0].sigmas, solver=SPACE.solver, meta={
        "origin": "mutation", "parents": ["0123456789abcdef"], "generation": 3,
        "per_step": {"guidance": [1.5, 2.0, 2.5, 3.0]}, "mutation_scale": 0.07})
    r = CandidateResult(s.id, "ok", {"fid": 1.25, "kid": 0.5}, 4, 100, 7, 0.5, 200.0,
                        worker="evaluator-1", node="host/abcdef012345")
    run = RunDir(tmp_path / "run")
    run.append_evaluations([to_row(s, r, run_id="r", metric="fid", generation=3,
                                   trial_id="t/0")])
    (row,) = table_to_rows(run.read_evaluations())
    back, res = from_row(row)
    assert back.to_dict() == s.to_dict() and back.meta == s.meta
    assert res == r
    failed = CandidateResult(s.id, "failed", {}, 4, 100, 7, 0.0, 0.0, error="boom")
    assert to_row(s, failed, run_id="r", metric="fid", generation=0, trial_id="t")["value"] \
        is None
    with pytest.raises(ValueError, match="paired with schedule"):
        to_row(some(2)[1], r, run_id="r", metric="fid", generation=0, trial_id="t")


# Canonical ids ------------------------------------------------------------------------------------
def test_the_quickstarts_near_duplicates_share_their_ids():
    """Pairs of schedules an earlier quickstart run scored twice (their sigmas differ by
    1e-16 to 6e-15, relative): each pair is one candidate now."""
    pairs = json.loads((DATA / "quickstart_near_duplicates.json").read_text())
    assert len(pairs) == 67
    for a, b in pairs:
        sa, sb = Schedule(a), Schedule(b)
        assert a != b and sa.id == sb.id and sa == sb
    # A real difference (a relative 1e-6) is another candidate.
    a = np.asarray(pairs[0][0])
    moved = a.copy()
    moved[1] *= 1 + 1e-6
    assert Schedule(moved).id != Schedule(a).id


def test_canonical_sigmas_round_to_a_relative_two_to_the_minus_30():
    x = np.array([80.0, 3.14159265358979, 1e-3, 0.0])
    c = canonical_sigmas(x)
    assert c[-1] == 0.0 and c[0] == 80.0
    assert np.all(np.abs(c[:-1] - x[:-1]) <= x[:-1] * 2.0 ** -CANONICAL_BITS)
    assert np.array_equal(canonical_sigmas(c), c)


# The recorder ----------------------------------------------------------------------------------
def test_the_recorder_writes_new_rows_once_a_state_per_batch_and_counts_failures(tmp_path):
    cands = some(5, seed=6)
    run = RunDir(tmp_path / "run")
    searcher = Listed(cands)
    lines: list[str] = []
    progress = Progress(None, 5, METRIC, {"polynomial": 2.0})
    rec = Recorder(run, "run", searcher, progress, lines.append)
    stored = dict(zip([cands[0].id], Counting().score(cands[:1], [0, 1])))
    fail = {cands[1].id, cands[2].id}
    SearchLoop(searcher, [0, 1], batch_size=3, known=stored, observers=[rec]).run(
        Counting(fail))
    rows = table_to_rows(run.read_evaluations())
    assert [r["candidate_id"] for r in rows] == [s.id for s in cands[1:]]  # the stored one: not
    assert run.searcher_state_generations() == [0, 1]
    assert [r["status"] for r in rows] == ["failed", "failed", "ok", "ok"]
    assert rows[0]["error"] == "solver error: boom" and rows[0]["value"] is None
    assert "| 2 failed |" in lines[0] and "| 2 failed |" in lines[1]
    assert rec.first_failure == f"candidate {cands[1].id}: solver error: boom"


def test_the_progress_line_before_any_success_says_so():
    p = Progress(8, 100, METRIC, {"polynomial(rho=7)": 1.9})
    line = p.update(0, [None, None], 400, failed=2)
    assert "best fid none yet (best baseline polynomial(rho=7) 1.9)" in line
    assert "inf" not in line and "nan" not in line and "| 2 failed |" in line
    line = p.update(1, [1.5], 200)
    assert "best fid 1.5 (best baseline polynomial(rho=7) 1.9, -21.1%)" in line
    assert math.isfinite(p.best)


# The end of a run ---------------------------------------------------------------------------------
def test_a_heldout_difference_whose_interval_contains_0_is_not_a_win():
    from searchd.loop.finish import summary_lines

    def score(name, fid, diff, ci):
        return {"name": name, "candidate_id": name, "status": "ok", "fid": fid,
                "fid_ci": [fid - 0.1, fid + 0.1], "diff": diff, "diff_ci": ci}

    best = {"search": {"metric": "fid"}, "best_baseline": "polynomial",
            "heldout": {"level": 0.95, "n_samples": 100, "seed_base": 7, "scores": [
                score("searched", 1.0, -0.05, [-0.2, 0.1]),
                score("polynomial", 1.05, 0.0, [0.0, 0.0]),
                score("logsnr", 2.0, 0.95, [0.5, 1.4])]}}
    lines = summary_lines(best)
    searched = next(ln for ln in lines if "searched" in ln)
    assert "not significant (the interval contains 0)" in searched
    assert "not significant" not in next(ln for ln in lines if "logsnr" in ln)
    assert "diff" not in next(ln for ln in lines if ln.strip().startswith("polynomial"))
