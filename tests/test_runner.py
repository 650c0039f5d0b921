"""``run_tune_search``: a real searcher under Ray Tune, candidates scored by the actor pool.

Starts a local Ray (marked ``ray``). The actors hold searchd's ``Evaluator`` on the embedded
gmm-digits-k64 model with the digits feature network, scoring FID against exact reference
statistics; the searcher is searchd's ``RandomSearcher``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from searchd.evaluation import Evaluator, exact_reference, load_features
from searchd.models import load
from searchd.schedule import Schedule
from searchd.schedules.spaces import ContinuousSpace
from searchd.search.driver import evaluation_row
from searchd.search.random_search import RandomSearcher
from searchd.search.runner import run_tune_search
from searchd.storage import rows_to_table, table_to_rows

METRIC = "fid"
SEEDS = range(200)
REFERENCE_SEEDS = range(2_000_000, 2_000_500)

pytestmark = pytest.mark.ray


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


class DecodeRefusing:
    """``space.decode`` that raises for the candidates in ``refused`` (a trial whose decoding
    fails, for the error path)."""

    def __init__(self, space: ContinuousSpace, refused: set[str]) -> None:
        self.space = space
        self.refused = set(refused)

    def __call__(self, cfg: Mapping[str, Any]) -> Schedule:
        s = self.space.decode(cfg)
        if s.id in self.refused:
            raise ValueError(f"refused candidate {s.id}")
        return s


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


def test_every_candidate_completes_once_and_is_stored_before_the_searcher_learns(
    pool, tmp_path
) -> None:
    space = make_space()
    searcher = RandomSearcher(space, METRIC, num_samples=12, seed=2)
    # Make decoding fail for one of the 12 candidates the searcher will propose (in the last
    # trial, so that no trial waits for a fresh Tune actor after the failure): its trial
    # errors, and the others are scored.
    preview = RandomSearcher(space, METRIC, num_samples=12, seed=2)
    ids = [space.decode(preview.suggest(f"p{i}")).id for i in range(12)]
    decode = DecodeRefusing(space, {ids[9]})
    calls: list[tuple[str, list[Schedule], list[Any]]] = []
    errors: list[tuple[str, list[dict[str, Any]], str]] = []

    def on_results(trial_id: str, schedules: list[Schedule], results: list[Any]) -> None:
        known = {h["id"] for h in searcher.history}
        # The searcher has not learned of this trial's candidates yet.
        assert not known & {s.id for s in schedules}
        calls.append((trial_id, schedules, results))

    out = run_tune_search(
        searcher, decode, pool.client(), SEEDS, metric=METRIC, batch_size=4,
        on_results=on_results, on_error=lambda t, cfgs, err: errors.append((t, cfgs, err)),
        storage_path=str(tmp_path), name="full",
    )
    assert out.finished and out.n_trials == 2 and out.n_candidates == 8
    assert out.n_failed_candidates == 0 and out.n_errored_trials == 1
    assert [len(c[1]) for c in calls] == [4, 4]
    # The errored trial: reported once, with its 4 candidates and the exception's text.
    assert len(errors) == 1 and "ValueError: refused candidate" in errors[0][2]
    failed_trial, cfgs, _ = errors[0]
    assert len(cfgs) == 4
    # Every candidate completed exactly once in the searcher, under the sub-id of its trial:
    # the scored ones with their own value, the errored trial's ones as errors.
    hist = {h["trial_id"]: h for h in searcher.history}
    assert len(searcher.history) == 12 and len({h["id"] for h in searcher.history}) == 12
    assert sorted(t for t, h in hist.items() if h["status"] == "error") == [
        f"{failed_trial}/{j}" for j in range(4)
    ]
    for trial_id, scheds, results in calls:
        for j, (s, r) in enumerate(zip(scheds, results)):
            h = hist[f"{trial_id}/{j}"]
            assert r.candidate_id == s.id == h["id"] and r.worker in pool.names
            assert h["status"] == "ok" and h["value"] == pytest.approx(r.result.metrics[METRIC])
            assert r.result.stats is None  # dropped in the trial
    # The scores are the evaluator's own (independent of batching and actors).
    some = [s for _, scheds, _ in calls for s in scheds][:3]
    direct = DigitsFID()().evaluate(some, SEEDS)
    by_id = {h["id"]: h["value"] for h in searcher.history}
    for s, d in zip(some, direct):
        assert math.isfinite(by_id[s.id])
        assert by_id[s.id] == pytest.approx(d.metrics[METRIC], rel=1e-5)


def test_sigint_leaves_the_search_unfinished_and_a_resume_scores_nothing_twice(
    pool, tmp_path
) -> None:
    space = make_space()
    searcher = RandomSearcher(space, METRIC, num_samples=12, seed=1)
    stored: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []

    def interrupt(trial_id: str, schedules: list[Schedule], results: list[Any]) -> None:
        stored.update({s.id: r for s, r in zip(schedules, results)})
        rows.extend(evaluation_row("run", s, r, metric=METRIC, trial_id=trial_id, generation=0)
                    for s, r in zip(schedules, results))
        if len(stored) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C during the search

    out = run_tune_search(searcher, space.decode, pool.client(), SEEDS, metric=METRIC,
                          batch_size=4, on_results=interrupt, storage_path=str(tmp_path),
                          name="interrupted")
    assert not out.finished and out.n_candidates == len(stored) == 4
    assert len(searcher.history) < 12

    # Resume as the driver does: re-issue what was in flight; the stored Parquet rows (here
    # through the storage schema's round trip) stand in for what was scored.
    known = {r["candidate_id"]: r for r in table_to_rows(rows_to_table(rows))}
    searcher.requeue_pending()
    items_before = sum(s["items"] for s in pool.stats())
    seen: list[str] = []
    out = run_tune_search(searcher, space.decode, pool.client(), SEEDS, metric=METRIC,
                          batch_size=4, on_results=lambda t, s, r: seen.extend(x.id for x in s),
                          storage_path=str(tmp_path), name="resumed", known=known)
    assert out.finished
    assert sum(s["items"] for s in pool.stats()) - items_before == 8  # only the new ones
    hist = {h["id"]: h["value"] for h in searcher.history}
    assert len(searcher.history) == 12 == len(hist)
    assert set(stored) | set(seen) == set(hist)
    for cid, r in stored.items():
        assert hist[cid] == pytest.approx(r.result.metrics[METRIC])
