"""Ray Tune driving the search loop (``searchd.distributed.tune``): a real searcher, its
candidates scored by the actor pool, every result recorded before the searcher learns it.

Starts a local Ray (marked ``ray``). The actors hold searchd's ``Evaluator`` on the embedded
gmm-digits-k64 model with the digits feature network, scoring FID against exact reference
statistics; the searcher is searchd's ``RandomSearcher``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from searchd.distributed.tune import run_tune
from searchd.evaluation import CandidateResult, Evaluator, exact_reference, load_features
from searchd.loop import SearchLoop
from searchd.models import load
from searchd.schedule import Schedule
from searchd.schedules.spaces import ContinuousSpace
from searchd.searchers.random_search import RandomSearcher

METRIC = "fid"
SEEDS = range(200)
REFERENCE_SEEDS = range(2_000_000, 2_000_500)


class DigitsFID:
    """Evaluator factory: gmm-digits-k64, digits features, FID against 500 exact samples."""

    def __call__(self) -> Evaluator:
        torch.set_num_threads(1)
        denoiser = load("gmm-digits-k64")
        features = load_features("digits")
        reference = exact_reference(denoiser, features, REFERENCE_SEEDS)
        return Evaluator(denoiser, features, reference, metrics=(METRIC,))


def make_space() -> ContinuousSpace:
    return ContinuousSpace(5, 0.002, 80.0, True, "rho", 7.0, True)


class RefusingScorer:
    """The pool's scorer, raising for a batch holding a refused candidate (a trial that
    errors, for the error path)."""

    def __init__(self, client: Any, refused: set[str]) -> None:
        self.client = client
        self.refused = set(refused)

    def score(self, schedules: Sequence[Schedule], seeds: Sequence[int]
              ) -> list[CandidateResult]:
        bad = [s.id for s in schedules if s.id in self.refused]
        if bad:
            raise ValueError(f"refused candidate {bad[0]}")
        return self.client.score(schedules, seeds)


class Recorded:
    """A loop observer: checks each batch is recorded before the searcher learns of it, and
    keeps what was recorded; sends itself SIGINT (Ctrl+C) after ``interrupt_after``."""

    def __init__(self, searcher: Any, interrupt_after: int | None = None) -> None:
        self.searcher = searcher
        self.batches: list[tuple[str, list[Schedule], list[CandidateResult]]] = []
        self.interrupt_after = interrupt_after

    def recorded(self, batch: Any, new: Sequence[int]) -> None:
        known = {h["id"] for h in self.searcher.history}
        assert not known & {s.id for s in batch.schedules}  # not learned yet
        self.batches.append((batch.key, list(batch.schedules), list(batch.results)))
        n = sum(len(b[1]) for b in self.batches)
        if self.interrupt_after is not None and n == self.interrupt_after:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C during the search


@pytest.fixture(scope="module")
def pool():
    import ray
    import ray.cloudpickle

    from searchd.distributed import EvaluatorPool

    # This module is not importable in Ray's workers: ship its classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    p = EvaluatorPool(DigitsFID(), num_workers=2, cpus_per_worker=0.9)
    yield p
    p.shutdown()
    if started:
        ray.shutdown()


@pytest.mark.ray
def test_every_candidate_completes_once_and_is_recorded_before_the_searcher_learns(
    pool, tmp_path
) -> None:
    space = make_space()
    searcher = RandomSearcher(space, METRIC, num_samples=12, seed=2)
    # Scoring fails for one of the 12 candidates (in the last trial, so that no trial waits
    # for a fresh Tune actor after the failure): its trial errors, the others are scored.
    preview = RandomSearcher(space, METRIC, num_samples=12, seed=2)
    ids = [preview.ask(f"p{i}").id for i in range(12)]
    scorer = RefusingScorer(pool.client(), {ids[9]})
    rec = Recorded(searcher)
    loop = SearchLoop(searcher, SEEDS, batch_size=4, observers=[rec])
    out = run_tune(loop, scorer, storage_path=str(tmp_path), name="full")
    assert out.finished and out.n_trials == 2 and out.n_errored_trials == 1
    assert loop.n_batches == 3 and loop.n_scored == 12 and loop.n_failed == 4
    # The errored trial's batch was recorded too: its 4 candidates failed with its error.
    failed = [b for b in rec.batches if any(r.status != "ok" for r in b[2])]
    assert len(failed) == 1 and len(failed[0][2]) == 4
    assert all("ValueError: refused candidate" in r.error for r in failed[0][2])
    # Every candidate was told exactly once, under the key of its batch: the scored ones
    # with their own value, the errored batch's ones as errors.
    hist = {h["trial_id"]: h for h in searcher.history}
    assert len(searcher.history) == 12 and len({h["id"] for h in searcher.history}) == 12
    assert sorted(t for t, h in hist.items() if h["status"] == "error") == [
        f"{failed[0][0]}/{j}" for j in range(4)]
    for key, scheds, results in rec.batches:
        for j, (s, r) in enumerate(zip(scheds, results)):
            h = hist[f"{key}/{j}"]
            assert r.candidate_id == s.id == h["id"]
            if r.status == "ok":
                assert r.worker in pool.names and r.node
                assert h["status"] == "ok" and h["value"] == r.metrics[METRIC]
                assert r.stats is None  # dropped by the actor
    # The scores are the evaluator's own (independent of batching and actors).
    some = [s for _, scheds, res in rec.batches for s, r in zip(scheds, res)
            if r.status == "ok"][:3]
    direct = DigitsFID()().evaluate(some, SEEDS)
    by_id = {h["id"]: h["value"] for h in searcher.history}
    for s, d in zip(some, direct):
        assert math.isfinite(by_id[s.id])
        assert by_id[s.id] == pytest.approx(d.metrics[METRIC], rel=1e-5)


@pytest.mark.ray
def test_the_first_batch_scored_by_the_driver_is_recorded_as_its_trial_would_be(
    pool, tmp_path
) -> None:
    """``prefetch_first``: the driver scores the first batch while Tune starts the first
    trial; an error there fails that batch as the trial's error would, the search goes on,
    and the values are those of the trials' path."""
    space = make_space()
    preview = RandomSearcher(space, METRIC, num_samples=8, seed=5)
    ids = [preview.ask(f"p{i}").id for i in range(8)]
    runs = {}
    for prefetch, refused in ((True, {ids[1]}), (True, set()), (False, set())):
        searcher = RandomSearcher(space, METRIC, num_samples=8, seed=5)
        rec = Recorded(searcher)
        loop = SearchLoop(searcher, SEEDS, batch_size=4, observers=[rec])
        out = run_tune(loop, RefusingScorer(pool.client(), refused),
                       storage_path=str(tmp_path), name=f"first{len(runs)}",
                       prefetch_first=prefetch)
        assert out.finished and loop.n_batches == 2 and loop.n_scored == 8
        runs[(prefetch, bool(refused))] = (out, loop, rec)
    out, loop, rec = runs[(True, True)]
    assert out.n_trials == 1 and out.n_errored_trials == 1 and loop.n_failed == 4
    first = rec.batches[0][2]
    assert all(r.status == "failed" and "ValueError: refused candidate" in r.error
               for r in first)
    assert all(r.status == "ok" for r in rec.batches[1][2])
    values = {}
    for key in ((True, False), (False, False)):
        out, loop, rec = runs[key]
        assert out.n_trials == 2 and out.n_errored_trials == 0 and loop.n_failed == 0
        assert all(r.worker in pool.names for b in rec.batches for r in b[2])
        values[key] = {r.candidate_id: r.metrics[METRIC] for b in rec.batches for r in b[2]}
    assert values[(True, False)] == values[(False, False)]


@pytest.mark.ray
def test_sigint_leaves_the_loop_unfinished_and_a_resume_scores_nothing_twice(
    pool, tmp_path, capfd
) -> None:
    space = make_space()
    searcher = RandomSearcher(space, METRIC, num_samples=12, seed=1)
    rec = Recorded(searcher, interrupt_after=4)
    loop = SearchLoop(searcher, SEEDS, batch_size=4, observers=[rec])
    out = run_tune(loop, pool.client(), storage_path=str(tmp_path), name="interrupted")
    stored = {s.id: r for _, scheds, res in rec.batches for s, r in zip(scheds, res)}
    assert not out.finished and not loop.finished and len(stored) == 4
    # Tune's advice to resume with Tuner.restore is not shown: the run directory resumes.
    captured = capfd.readouterr()
    assert "Resume experiment with" not in captured.out + captured.err
    assert len(searcher.history) < 12

    # Resume as a run does: re-ask what was in flight; the stored results stand in.
    searcher.requeue_pending()
    items_before = sum(s["items"] for s in pool.stats())
    rec2 = Recorded(searcher)
    loop = SearchLoop(searcher, SEEDS, batch_size=4, known=stored, observers=[rec2])
    out = run_tune(loop, pool.client(), storage_path=str(tmp_path), name="resumed")
    assert out.finished and loop.finished
    assert sum(s["items"] for s in pool.stats()) - items_before == 8  # only the new ones
    assert loop.n_scored == 8
    hist = {h["id"]: h["value"] for h in searcher.history}
    assert len(searcher.history) == 12 == len(hist)
    seen = {s.id for _, scheds, _ in rec2.batches for s in scheds}
    assert set(stored) | seen == set(hist)
    for cid, r in stored.items():
        assert hist[cid] == r.metrics[METRIC]


def test_tune_searcher_is_a_plain_tune_searcher_without_ray() -> None:
    """Any searchd searcher as a one-candidate-per-trial ``ray.tune.search.Searcher``, also
    under Tune's ConcurrencyLimiter."""
    import ray
    from ray.tune.search import ConcurrencyLimiter, Searcher

    from searchd.distributed.tune import TuneSearcher

    space = make_space()
    target = space.decode([0.2, 0.4, 0.6, 0.5, 0.5])

    def obj(s: Schedule) -> float:
        return float(abs(s.sigmas[1:-1] - target.sigmas[1:-1]).sum())

    def run(searcher: Any) -> list[str]:
        out, pending, n = [], {}, 0
        while True:
            while len(pending) < 4:
                cfg = searcher.suggest(f"t{n}")
                if cfg is None or cfg == Searcher.FINISHED:
                    break
                pending[f"t{n}"] = Schedule.from_dict(cfg["schedule"])
                out.append(pending[f"t{n}"].id)
                n += 1
            if not pending:
                return out
            tid = next(iter(pending))
            searcher.on_trial_complete(tid, {METRIC: obj(pending.pop(tid))})

    started = ray.is_initialized()
    inner = RandomSearcher(space, METRIC, num_samples=10, seed=4)
    plain = TuneSearcher(inner)
    assert isinstance(plain, Searcher)
    ids = run(ConcurrencyLimiter(plain, max_concurrent=4, batch=True))
    assert len(ids) == 10 and inner.best is not None
    assert ids == run(TuneSearcher(RandomSearcher(space, METRIC, num_samples=10, seed=4)))
    assert ray.is_initialized() == started
