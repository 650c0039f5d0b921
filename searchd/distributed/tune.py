"""Ray Tune drives the search loop: one Tune trial per batch, scored on the actor pool.

``run_tune(loop, scorer, ...)`` runs a ``SearchLoop`` (``searchd.loop``) under Ray Tune:

- ``LoopSearcher`` is the Tune searcher: ``suggest(trial_id)`` is ``loop.ask`` (the batch's
  candidates to score go to the trial as plain schedule dicts; candidates with a stored
  result are not sent), ``on_trial_complete`` is ``loop.tell``;
- the trial is thin: it decodes its schedules, scores them with the scorer (the pool's
  ``PoolClient``: the scoring protocol on the actors) and reports once, with the results
  under a private key; its function lives in ``searchd.distributed.trial``, so that its
  process does not import torch;
- ``_LoopCallback.on_trial_result`` runs in the driver when a trial's result arrives, pops
  the results and calls ``loop.complete`` (Parquet rows, searcher state, progress) and then
  ``between`` (the pool's growth step). Ray 2.60's TuneController calls the searcher's
  ``on_trial_complete`` later, when the trial function has returned, so every candidate is
  recorded before the searcher learns of it;
- a trial that errors completes its batch with failed results naming the error
  (``loop.fail``), so the search and its record go on; except when the error comes from
  the infrastructure (``pool.is_infrastructure_error``: the evaluators lost, a worker or
  node died): then nothing of the batch is recorded, no more batches are asked, and the
  outcome's ``lost`` says why (the engine stops the search; ``--resume`` scores the batch).

Each result crosses from the trial to the driver once, as the ``CandidateResult`` itself.

The first batch (``prefetch_first``, what the engine does): the driver scores it itself, in
a thread, from the moment Tune asks for it, and its trial only reports; the first trial's
process (Tune starts a new one, then reuses it) is then off the critical path (``Prefetch``).

A trial reserves a small fraction of a CPU and no GPU (Tune rejects ``{"cpu": 0}``), on the
head node (``HEAD_NODE_RESOURCE``); the evaluator actors hold the resources. With
``reuse_actors=True``, one trial in flight and Tune's result loggers off, a trial costs
Tune about 35-50 ms on 2 cores (about 1.3 s with two or more trials in flight, which defeats
actor reuse); see docs/notes-distributed.md.

On SIGINT, ``Tuner.fit()`` returns normally with a partial result; the loop is then not
finished, and a resume continues from the run directory.

``TuneSearcher`` makes any searchd searcher a plain one-candidate-per-trial
``ray.tune.search.Searcher``, for use in a Tune experiment of one's own.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune import Callback
from ray.tune.search import Searcher

from searchd.distributed.pool import is_infrastructure_error
from searchd.distributed.trial import PAYLOAD_KEY, PREFETCHED, best_value, make_trainable
from searchd.loop.loop import SearchLoop
from searchd.loop.scoring import Scorer
from searchd.schedule import Schedule
from searchd.searchers.base import FINISHED, ScheduleSearcher

logger = logging.getLogger(__name__)

# CPU a trial reserves: Tune rejects 0; the actors hold the real resources.
TRIAL_CPUS = 0.01
# Every head node has this resource (1.0); a trial asking for a sliver of it runs on the head,
# next to the driver: Tune's experiment directory is the driver's local scratch directory
# (a trial on another node would fail Tune's storage check), and the thin trials never take
# a CPU slot of a GPU node.
HEAD_NODE_RESOURCE = "node:__internal_head__"
# Ray Tune's loggers whose messages are not for searchd's users: the advice to resume with
# ``Tuner.restore`` (searchd resumes from its run directory; Tune's state is scratch) and the
# experiment analysis's complaints about the result loggers searchd turns off.
QUIET_LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")


@dataclass(frozen=True)
class TuneOutcome:
    """What a ``run_tune`` call did.

    Attributes:
        finished: the loop is finished (the searcher returned FINISHED and every batch was
            told); False after SIGINT, a ``stop`` criterion, or trials Tune removed.
        n_trials: trials whose results reached the loop.
        n_errored_trials: trials Tune reported as errored, and a first batch whose scoring
            by the driver raised (``Prefetch``); their candidates failed.
        wall_s: seconds spent in ``Tuner.fit()``.
        startup_s: seconds from the start of ``fit()`` to the start of the first trial
            (Tune's fixed cost: placement group, the trial's worker process); NaN if none.
        eval_s: seconds the trials spent waiting for the scorer (summed over trials).
        experiment_path: Tune's experiment directory (scratch: the run directory is the
            record).
        score_cpu_s: CPU seconds each trial's process spent in the scorer (sending the
            candidates, gathering the results), in the order the results came.
        lost: the error of a trial failed by the infrastructure (the search stopped there,
            its batch unrecorded); None when there was none.
    """

    finished: bool
    n_trials: int
    n_errored_trials: int
    wall_s: float
    startup_s: float
    eval_s: float
    experiment_path: str
    score_cpu_s: tuple[float, ...] = ()
    lost: str | None = None


class LoopSearcher(Searcher):
    """The Tune searcher of a ``SearchLoop``: a trial per batch (see the module docstring).

    A trial that ends without results and without an error (Tune removed it, or stopped)
    leaves its batch unrecorded: its candidates are told without a value, and a resume asks
    for them again from the run directory's last searcher state.
    """

    def __init__(self, loop: SearchLoop, prefetch: Scorer | None = None) -> None:
        super().__init__(metric=loop.metric, mode=loop.searcher.mode)
        self.loop = loop
        self._errored: set[str] = set()  # trials Tune reported errored, their text to come
        self.lost: str | None = None  # a trial's infrastructure error: ask no more batches
        # The first batch is scored by the driver with this scorer (``Prefetch``), while
        # Tune starts the first trial's process; None: every batch by its trial.
        self._prefetch = prefetch
        self.prefetched: dict[str, Prefetch] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        """The loop's searcher decides the metric and mode."""
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """``loop.ask``: ``{"candidates": [schedule dicts to score]}``, None or FINISHED."""
        if self.lost is not None:
            return FINISHED
        batch = self.loop.ask(trial_id)
        if batch is None or isinstance(batch, str):
            return batch
        config: dict[str, Any] = {"candidates": [s.to_dict() for s in batch.to_score]}
        if self._prefetch is not None and batch.to_score:
            self.prefetched[trial_id] = Prefetch(self._prefetch, list(batch.to_score),
                                                 self.loop.seeds)
            self._prefetch = None  # the first batch only: later trials reuse the process
            config[PREFETCHED] = True
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Nothing: the callback records the results (``loop.complete``)."""

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        """``loop.tell`` for a recorded batch; one Tune removed without results is forgotten.
        An errored one waits for its error text (``note_error``: ray 2.60's controller calls
        the callback's ``on_trial_error`` right after this), then is recorded as failed."""
        batch = self.loop.pending.get(trial_id)
        if batch is None:
            return
        if batch.results is None:
            if error:
                self._errored.add(trial_id)
            else:
                self.loop.forget(trial_id)
            return
        self.loop.tell(trial_id)

    def note_error(self, trial_id: str, error: str, infrastructure: bool | None = None
                   ) -> None:
        """An errored trial (from the callback): its batch is recorded as failed, with the
        error's text, and told. An error of the infrastructure is not its candidates': the
        batch stays unrecorded and the search asks no more (``lost``). ``infrastructure``:
        whether it is one (None: judged from ``error``)."""
        if infrastructure is None:
            infrastructure = is_infrastructure_error(error)
        batch = self.loop.pending.get(trial_id)
        if batch is not None and batch.results is None and infrastructure:
            if self.lost is None:
                self.lost = error
        elif batch is not None and batch.results is None:
            self.loop.fail(trial_id, error)
            self.loop.tell(trial_id)
        self._errored.discard(trial_id)

    def save(self, checkpoint_path: str) -> None:
        """Tune's experiment checkpoint gets a pointer only: the run directory holds the
        searcher's state (``searcher/state-<n>.json``), and a resume reads it from there."""
        import json

        with open(checkpoint_path, "w", encoding="utf-8") as f:
            json.dump({"state": "in the run directory (searcher/state-<n>.json)"}, f)

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("searchd resumes from its run directory, not Tune's state")


class Prefetch:
    """The search's first batch, scored by the driver in a thread from the moment Tune
    asks for it, instead of by its trial.

    The first trial's process is new (Tune starts it once, then reuses it): Ray starts a
    worker, which imports Ray Tune and unpickles the trial's function, about 1.5-3 s on 2
    cores, while the evaluators would wait. Its trial reports at once (``PREFETCHED``) and
    the callback takes the results from here (``result``). The scorer is the one the trials
    use (the pool's client): the same requests to the same actors, so every value is the
    one the trial would have got; an error is the trial's error (``_LoopCallback``)."""

    def __init__(self, scorer: Scorer, schedules: list[Schedule], seeds: Sequence[int]
                 ) -> None:
        self.value: tuple[list[Any], float, float] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(scorer, schedules, list(seeds)),
                                        name="searchd-first-batch", daemon=True)
        self._thread.start()
        logger.info("first batch (%d candidates) sent to the evaluators by the driver",
                    len(schedules))

    def _run(self, scorer: Scorer, schedules: list[Schedule], seeds: list[int]) -> None:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            results = scorer.score(schedules, seeds)
        except BaseException as e:  # handed to the callback, as a trial's error would be
            self.error = e
            return
        self.value = (list(results), time.perf_counter() - t0, time.thread_time() - c0)

    def result(self) -> tuple[list[Any], float, float]:
        """(results, seconds, CPU seconds of the scoring thread); raises the scorer's error."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


def _error_text(trial: Any, whole: bool = False) -> str:
    """The last line of a failed trial's error text (the exception), or a placeholder;
    ``whole``: all of it.

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
    if whole:
        return text or ""
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "the trial errored (no error text)"


class _LoopCallback(Callback):
    """Records each trial's results in the driver (``loop.complete``) when they arrive,
    before the searcher learns of them, then runs ``between``."""

    def __init__(self, searcher: LoopSearcher, between: Callable[[], Any] | None) -> None:
        self.searcher = searcher
        self.between = between
        self.n_trials = 0
        self.n_errored = 0
        self.first_start: float | None = None
        self.eval_s = 0.0
        self.score_cpu_s: list[float] = []  # per trial, in the order their results came

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.first_start is None:
            self.first_start = time.perf_counter()
            logger.info("first Tune trial started (batch %s)", trial.trial_id)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        results = result.pop(PAYLOAD_KEY, None)
        if results is None:
            return
        if isinstance(results, str) and results == PREFETCHED:
            results = self._prefetched(trial, result)
            if results is None:
                return
        self.searcher.loop.complete(trial.trial_id, results)
        self.n_trials += 1
        self.eval_s += float(result.get("eval_s", 0.0))
        self.score_cpu_s.append(float(result.get("score_cpu_s", 0.0)))
        if self.between is not None:
            self.between()

    def _prefetched(self, trial: Any, result: dict) -> list[Any] | None:
        """The results of a batch the driver scored (``Prefetch``), with the trial's
        result fields filled in as its trial would have; None when the scoring raised:
        then the batch is handled as an errored trial's (``LoopSearcher.note_error``)."""
        pending = self.searcher.prefetched.pop(trial.trial_id, None)
        if pending is None:  # not this driver's (cannot happen): nothing to record
            return None
        try:
            results, eval_s, cpu_s = pending.result()
        except Exception as e:
            error = f"{type(e).__name__}: {' '.join(str(e).split())}"
            self.n_errored += 1
            logger.error("trial %s errored: %s", trial.trial_id, error)
            self.searcher.note_error(trial.trial_id, f"trial errored: {error}",
                                     is_infrastructure_error(error))
            return None
        loop = self.searcher.loop
        result[loop.metric] = best_value([r.value(loop.metric) for r in results],
                                         loop.searcher.mode)
        result.update({"n_candidates": len(results), "eval_s": eval_s, "score_cpu_s": cpu_s})
        return results

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.n_errored += 1
        error = _error_text(trial)
        logger.error("trial %s errored: %s", trial.trial_id, error)
        self.searcher.note_error(trial.trial_id, f"trial errored: {error}",
                                 is_infrastructure_error(_error_text(trial, whole=True)))


def _trial_name(trial: Any) -> str:
    """Short trial names and directories (Tune's default spells out the whole config)."""
    return f"batch_{trial.trial_id}"


def run_tune(
    loop: SearchLoop,
    scorer: Scorer,
    *,
    storage_path: str,
    name: str,
    between: Callable[[], Any] | None = None,
    max_concurrent_trials: int = 1,
    stop: Mapping[str, Any] | Callable[[str, Mapping], bool] | None = None,
    trial_cpus: float = TRIAL_CPUS,
    on_head: bool = True,
    tune_loggers: bool = False,
    prefetch_first: bool = False,
) -> TuneOutcome:
    """Run ``loop`` under Ray Tune until its searcher is finished (or it is interrupted).

    Args:
        loop: the search loop (its recorder records each batch in the driver).
        scorer: the scoring protocol the trials use (``EvaluatorPool.client()``); picklable.
        storage_path, name: where Tune keeps its experiment state (scratch).
        between: called in the driver after each batch is recorded (pool growth).
        max_concurrent_trials: trials in flight at once.
        stop: Tune stopping criteria (``RunConfig.stop``); a stop leaves the loop unfinished.
        trial_cpus: CPU fraction a trial reserves (> 0).
        on_head: run the trials on the head node (``HEAD_NODE_RESOURCE``), where the driver
            and Tune's scratch experiment directory are.
        tune_loggers: keep Tune's CSV/JSON/TensorBoard result loggers (default off: the run
            directory is the record, and they cost time per trial).
        prefetch_first: the driver scores the first batch with ``scorer`` from the moment
            Tune asks for it (``Prefetch``), while the first trial's process starts; its
            trial only reports. The values and the record are the same.
    """
    if max_concurrent_trials < 1:
        raise ValueError(f"max_concurrent_trials = {max_concurrent_trials}; it must be >= 1")
    if not trial_cpus > 0:
        raise ValueError(f"trial_cpus = {trial_cpus}; Tune needs a positive CPU fraction")
    searcher = LoopSearcher(loop, prefetch=scorer if prefetch_first else None)
    resources: dict[str, float] = {"cpu": trial_cpus}
    if on_head:
        resources[HEAD_NODE_RESOURCE] = 0.001
    trainable = tune.with_resources(
        make_trainable(scorer, loop.seeds, loop.metric, loop.searcher.mode), resources)
    callback = _LoopCallback(searcher, between)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            metric=loop.metric,
            mode=loop.searcher.mode,
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
    t0 = time.perf_counter()
    with _quiet_tune(tune_loggers):
        grid = tuner.fit()
    wall = time.perf_counter() - t0
    return TuneOutcome(
        finished=loop.finished,
        n_trials=callback.n_trials,
        n_errored_trials=callback.n_errored,
        wall_s=wall,
        startup_s=(callback.first_start - t0) if callback.first_start is not None else math.nan,
        eval_s=callback.eval_s,
        experiment_path=str(grid.experiment_path),
        score_cpu_s=tuple(callback.score_cpu_s),
        lost=searcher.lost,
    )


class _quiet_tune:
    """Quiet Tune for the length of a ``fit()``: no result loggers (the run directory is the
    record), no console tables (RAY_AIR_NEW_OUTPUT's reporter prints its header even at
    verbose=0), and no messages of ``QUIET_LOGGERS``."""

    def __init__(self, keep_loggers: bool) -> None:
        self.env = {"RAY_AIR_NEW_OUTPUT": "0"}
        if not keep_loggers:
            self.env["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"

    def __enter__(self) -> None:
        self.saved_env = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        self.saved_levels = {}
        for name in QUIET_LOGGERS:
            log = logging.getLogger(name)
            self.saved_levels[name] = log.level
            log.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name, level in self.saved_levels.items():
            logging.getLogger(name).setLevel(level)


class TuneSearcher(Searcher):
    """A searchd searcher as a plain ``ray.tune.search.Searcher``: one candidate per trial,
    the config ``{"schedule": Schedule.to_dict()}``, the trial's reported ``metric`` told
    back (a failed trial, or one without the metric, counts as +inf)."""

    def __init__(self, searcher: ScheduleSearcher) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher = searcher

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict,
                              **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        s = self.searcher.ask(trial_id)
        if s is None or s == FINISHED:
            return s
        return {"schedule": s.to_dict()}  # type: ignore[union-attr]

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        value = None if (error or not result) else result.get(self.searcher.metric)
        self.searcher.tell(trial_id, value, error=error)

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)
