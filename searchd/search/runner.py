"""``run_tune_search``: a searcher driven by Ray Tune, candidates scored by the actor pool.

One Tune trial carries a batch of candidates (``BatchedSearcher``): the trial is thin. It
decodes its candidates into ``Schedule``s, sends them to the evaluator pool through a
``PoolClient``, and reports once:

- ``result[metric]``: the best value of the batch (what Tune's own bookkeeping sees);
- ``result["eval_s"]``: seconds the trial waited for the pool;
- ``result["per_candidate"]``: one plain dict per candidate (``candidate_id``, ``status``,
  the metric and every other metric, ``nfe``, ``n_samples``, ``wall_s``, ``worker``,
  ``node``), which ``BatchedSearcher`` hands to the inner searcher candidate by candidate;
- the full results (``EvaluatedCandidate``s) and the decoded schedules, under a private key
  that the runner's callback removes from the result in the driver process, where it calls
  ``on_results(trial_id, schedules, results)``.

Order of events (Ray 2.60's TuneController): the callback's ``on_trial_result`` runs when
the trial's result arrives; the searcher's ``on_trial_complete`` runs later, when the trial
function has returned. So ``on_results`` (the driver's Parquet append) finishes before the
searcher learns of any candidate of that trial: a candidate never counts as done without
its row.

A trial reserves a small fraction of a CPU and no GPU (Tune rejects ``{"cpu": 0}``), on the
head node (``HEAD_NODE_RESOURCE``); the evaluator actors hold the resources. With
``reuse_actors=True``, one trial in flight and Tune's result loggers off, a trial costs
Tune about 35-50 ms on 2 cores (about 1.3 s with two or more trials in flight, which defeats
actor reuse); see docs/notes-distributed.md.

On SIGINT, ``Tuner.fit()`` returns normally with a partial result; ``RunOutcome.finished``
is True only if the searcher returned FINISHED and every trial it handed out completed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune import Callback
from ray.tune.search import Searcher

from searchd.distributed.actor import EvaluatedCandidate
from searchd.distributed.pool import PoolClient
from searchd.schedule import Schedule
from searchd.search.batching import BatchedSearcher

logger = logging.getLogger(__name__)

# Result key carrying (schedules, results) from the trial to the driver's callback, which
# removes it before Tune's loggers and the trial's stored result see it.
PAYLOAD_KEY = "_searchd_payload"
# CPU a trial reserves: Tune rejects 0; the actors hold the real resources.
TRIAL_CPUS = 0.01
# Every head node has this resource (1.0); a trial asking for a sliver of it runs on the head,
# next to the driver: Tune's experiment directory is the driver's local scratch directory
# (a trial on another node would fail Tune's storage check), and the thin trials never take
# a CPU slot of a GPU node.
HEAD_NODE_RESOURCE = "node:__internal_head__"

OnResults = Callable[[str, list[Schedule], list[EvaluatedCandidate]], None]
OnError = Callable[[str, list[dict[str, Any]], str], None]


@dataclass(frozen=True)
class RunOutcome:
    """What a ``run_tune_search`` call did.

    Attributes:
        finished: the searcher returned FINISHED and every trial it handed out completed
            (False after SIGINT, a ``stop`` criterion, or trials lost to errors of Tune).
        n_trials: trials whose results reached ``on_results``.
        n_candidates: candidates whose results reached ``on_results``.
        n_failed_candidates: of those, candidates with status "failed".
        n_errored_trials: trials that Tune reported as errored (``on_error``).
        wall_s: seconds spent in ``Tuner.fit()``.
        startup_s: seconds from the start of ``fit()`` to the start of the first trial
            (Tune's fixed cost: placement group, the trial's worker process); NaN if none.
        eval_s: seconds the trials spent waiting for the pool (summed over trials); the
            rest of ``wall_s`` is Tune's overhead plus the driver's ``on_results``.
        experiment_path: Tune's experiment directory (scratch: the run directory written by
            ``on_results`` is the record).
    """

    finished: bool
    n_trials: int
    n_candidates: int
    n_failed_candidates: int
    n_errored_trials: int
    wall_s: float
    startup_s: float
    eval_s: float
    experiment_path: str


def candidate_summary(evaluated: EvaluatedCandidate, metric: str) -> dict[str, Any]:
    """The plain dict a searcher sees for one candidate (``result["per_candidate"][j]``).

    A failed candidate, or one without the metric, gets NaN for it (searchd's searchers
    count NaN as +inf; ``BatchedSearcher`` completes a failed one with ``error=True``).
    """
    r = evaluated.result
    metrics = {str(k): float(v) for k, v in (r.metrics or {}).items()}
    value = metrics.get(metric, math.nan) if r.status == "ok" else math.nan
    out: dict[str, Any] = {
        "candidate_id": str(r.candidate_id),
        "status": str(r.status),
        **metrics,
        metric: float(value),
        "nfe": int(r.nfe),
        "n_samples": int(r.n_samples),
        "wall_s": float(r.wall_s),
        "worker": evaluated.worker,
        "node": evaluated.node,
    }
    if r.error:
        out["error"] = str(r.error)
    return out


def best_value(values: Sequence[float], mode: str) -> float:
    """Best finite value under ``mode`` ("min" or "max"); NaN when there is none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan
    return min(finite) if mode == "min" else max(finite)


def _without_stats(evaluated: EvaluatedCandidate) -> EvaluatedCandidate:
    """Drop a result's partial feature statistics (large arrays the driver does not need)."""
    r = evaluated.result
    if dataclasses.is_dataclass(r) and getattr(r, "stats", None) is not None:
        return dataclasses.replace(evaluated, result=dataclasses.replace(r, stats=None))
    return evaluated


def result_from_row(row: Mapping[str, Any]) -> EvaluatedCandidate:
    """A stored evaluation (a Parquet row of DESIGN.md's schema) as an ``EvaluatedCandidate``
    holding a ``CandidateResult``."""
    from searchd.evaluation import CandidateResult

    wall = float(row.get("wall_s") or 0.0)
    n = int(row.get("n_samples") or 0)
    result = CandidateResult(
        candidate_id=str(row["candidate_id"]),
        status=str(row["status"]),
        metrics={str(k): float(v) for k, v in (row.get("metrics") or {}).items()},
        nfe=int(row.get("nfe") or 0),
        n_samples=n,
        seed_base=int(row.get("seed_base") or 0),
        wall_s=wall,
        samples_per_s=n / wall if wall > 0 else 0.0,
        error=row.get("error"),
    )
    return EvaluatedCandidate(result, str(row.get("worker") or ""), str(row.get("node") or ""))


def make_trainable(
    decode: Callable[[Mapping[str, Any]], Schedule],
    pool_client: PoolClient,
    seeds: Sequence[int],
    metric: str,
    mode: str,
    keep_stats: bool = False,
    known: Mapping[str, EvaluatedCandidate] | None = None,
) -> Callable[[dict[str, Any]], None]:
    """The Tune function trainable of one batch: decode, score on the pool, report once.

    Candidates whose id is in ``known`` are not scored again: their stored result stands in.
    """
    seeds = list(seeds)
    known = dict(known or {})

    def score_batch(config: dict[str, Any]) -> None:
        schedules = [decode(c) for c in config["candidates"]]
        todo = [s for s in schedules if s.id not in known]
        t0 = time.perf_counter()
        scored = iter(pool_client.evaluate(todo, seeds) if todo else [])
        eval_s = time.perf_counter() - t0
        evaluated = [known[s.id] if s.id in known else next(scored) for s in schedules]
        if not keep_stats:
            evaluated = [_without_stats(e) for e in evaluated]
        per = [candidate_summary(e, metric) for e in evaluated]
        tune.report(
            {
                metric: best_value([p[metric] for p in per], mode),
                "per_candidate": per,
                "n_candidates": len(per),
                "eval_s": eval_s,
                PAYLOAD_KEY: (schedules, evaluated),
            }
        )

    return score_batch


def _error_text(trial: Any) -> str:
    """The last line of a failed trial's error text (the exception), or a placeholder.

    Tune writes the error next to the trial's local results before calling the callbacks.
    """
    text = None
    path = getattr(trial, "error_file", None)
    try:
        if path and os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        else:
            err = trial.get_error()
            text = None if err is None else str(err)
    except Exception:  # an unreadable error file must not stop the search
        text = None
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "the trial errored (no error text)"


class _ResultsCallback(Callback):
    """Runs ``on_results`` in the driver when a trial's results arrive (before the searcher
    learns of them) and ``on_error`` when Tune reports a trial as errored."""

    def __init__(self, on_results: OnResults, on_error: OnError | None) -> None:
        self._on_results = on_results
        self._on_error = on_error
        self.n_trials = 0
        self.n_candidates = 0
        self.n_failed = 0
        self.n_errored = 0
        self.first_start: float | None = None
        self.eval_s = 0.0

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.first_start is None:
            self.first_start = time.perf_counter()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        payload = result.pop(PAYLOAD_KEY, None)
        if payload is None:
            return
        schedules, evaluated = payload
        self._on_results(trial.trial_id, list(schedules), list(evaluated))
        self.n_trials += 1
        self.n_candidates += len(evaluated)
        self.eval_s += float(result.get("eval_s", 0.0))
        self.n_failed += sum(1 for e in evaluated if e.result.status != "ok")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.n_errored += 1
        error = _error_text(trial)
        logger.error("trial %s errored: %s", trial.trial_id, error)
        if self._on_error is not None:
            self._on_error(trial.trial_id, list(trial.config.get("candidates", [])), error)


def _trial_name(trial: Any) -> str:
    """Short trial names and directories (Tune's default spells out the whole config)."""
    return f"batch_{trial.trial_id}"


def run_tune_search(
    searcher: Searcher,
    decode: Callable[[Mapping[str, Any]], Schedule],
    pool_client: PoolClient,
    seeds: Sequence[int],
    *,
    metric: str,
    mode: str = "min",
    batch_size: int,
    max_concurrent_trials: int = 1,
    on_results: OnResults,
    on_error: OnError | None = None,
    storage_path: str,
    name: str,
    stop: Mapping[str, Any] | Callable[[str, Mapping], bool] | None = None,
    keep_stats: bool = False,
    known: Mapping[str, Any] | None = None,
    trial_cpus: float = TRIAL_CPUS,
    on_head: bool = True,
    tune_loggers: bool = False,
) -> RunOutcome:
    """Run ``searcher`` under Ray Tune until it returns FINISHED (or is interrupted).

    Args:
        searcher: a per-candidate Tune searcher (wrapped here in ``BatchedSearcher``), or a
            ``BatchedSearcher`` (e.g. restored from a saved state), used as it is.
        decode: candidate config -> ``Schedule`` (``space.decode``); picklable.
        pool_client: the evaluator pool's client (``EvaluatorPool.client()``).
        seeds: the noise seeds every candidate is scored on.
        metric, mode: what the searcher optimizes ("min" or "max").
        batch_size: most candidates per trial (an evolutionary generation: population_num).
        max_concurrent_trials: trials in flight at once (Tune wraps the searcher in a
            ``ConcurrencyLimiter``, which also lets it keep that many trials pending).
        on_results: ``on_results(trial_id, schedules, results)`` in the driver process, once
            per trial, before the searcher learns of the results; an exception stops the
            search (it propagates out of ``Tuner.fit()``).
        on_error: ``on_error(trial_id, candidate_configs, error_text)`` for a trial Tune
            reports as errored (raw configs: decoding may be what failed). Its candidates
            complete with ``error=True`` in the searcher; Tune tells the searcher before it
            calls this.
        storage_path, name: where Tune keeps its experiment state (scratch).
        stop: Tune stopping criteria (``RunConfig.stop``); a stop makes ``finished`` False.
        keep_stats: keep the results' partial feature statistics (default: dropped in the
            trial, they can be large).
        known: candidate id -> stored result (an ``EvaluatedCandidate`` or a Parquet row
            dict) of candidates scored before (a resumed run): not scored again; the stored
            result is reported, and passed to ``on_results``, in their place.
        trial_cpus: CPU fraction a trial reserves (> 0).
        on_head: run the trials on the head node (``HEAD_NODE_RESOURCE``), where the driver
            and Tune's scratch experiment directory are.
        tune_loggers: keep Tune's CSV/JSON/TensorBoard result loggers (default off: the run
            directory is the record, and they cost time per trial).
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode = {mode!r}; allowed: 'min' or 'max'")
    if max_concurrent_trials < 1:
        raise ValueError(f"max_concurrent_trials = {max_concurrent_trials}; it must be >= 1")
    if not trial_cpus > 0:
        raise ValueError(f"trial_cpus = {trial_cpus}; Tune needs a positive CPU fraction")
    batched = searcher if isinstance(searcher, BatchedSearcher) else BatchedSearcher(
        searcher, batch_size)
    if batched.batch_size != batch_size:
        batched.batch_size = batch_size
    stored = {
        str(cid): r if isinstance(r, EvaluatedCandidate) else result_from_row(r)
        for cid, r in (known or {}).items()
    }
    resources: dict[str, float] = {"cpu": trial_cpus}
    if on_head:
        resources[HEAD_NODE_RESOURCE] = 0.001
    trainable = tune.with_resources(
        make_trainable(decode, pool_client, seeds, metric, mode, keep_stats, stored),
        resources,
    )
    callback = _ResultsCallback(on_results, on_error)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=batched,
            metric=metric,
            mode=mode,
            num_samples=-1,  # until the searcher returns FINISHED
            max_concurrent_trials=max_concurrent_trials,
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            stop=stop,
            callbacks=[callback],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
        ),
    )
    # Quiet Tune: no result loggers (the run directory is the record), no console tables
    # (RAY_AIR_NEW_OUTPUT's reporter prints its header even at verbose=0), and no warnings
    # from the experiment analysis about the missing logger files.
    env = {"RAY_AIR_NEW_OUTPUT": "0"}
    if not tune_loggers:
        env["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    analysis_log = logging.getLogger("ray.tune.analysis.experiment_analysis")
    saved_level = analysis_log.level
    if not tune_loggers:
        analysis_log.setLevel(logging.ERROR)
    t0 = time.perf_counter()
    try:
        grid = tuner.fit()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        analysis_log.setLevel(saved_level)
    wall = time.perf_counter() - t0
    finished = batched.finished and not batched.pending
    return RunOutcome(
        finished=finished,
        n_trials=callback.n_trials,
        n_candidates=callback.n_candidates,
        n_failed_candidates=callback.n_failed,
        n_errored_trials=callback.n_errored,
        wall_s=wall,
        startup_s=(callback.first_start - t0) if callback.first_start is not None else math.nan,
        eval_s=callback.eval_s,
        experiment_path=str(grid.experiment_path),
    )
