"""The search loop: ask a searcher for a batch, score it, record it, tell the searcher.

``SearchLoop`` knows nothing of Ray. Its four steps are methods, so that an engine can run
them where it needs to:

- ``ask(key)``: up to ``batch_size`` candidates from the searcher, under the keys
  ``"<key>/<j>"`` (it stops early when the searcher waits for results or is finished);
- the engine scores ``batch.todo`` with a ``Scorer`` (in-process: ``run``; on Ray: a Tune
  trial on the actor pool, ``searchd.distributed.tune``);
- ``complete(key, results)``: the batch's results are recorded (Parquet rows, the searcher's
  state, progress: ``Recorder``) before the searcher learns of them;
- ``tell(key)``: the searcher learns every value of the batch.

Guarantees (tested in ``tests/test_loop.py``):

- **Scored exactly once.** A candidate whose id has a result already (stored by the run this
  one resumes, or scored earlier in this loop) is not in ``todo``: its stored result stands
  in. A batch's results must match its ``todo`` one to one (same ids, same order), else
  ``complete`` raises and nothing of the batch is recorded.
- **Recorded before told.** ``tell`` refuses a batch that was not completed, so the searcher
  never counts a candidate whose row is not stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from searchd.evaluation import CandidateResult
from searchd.loop.scoring import Scorer
from searchd.schedule import Schedule
from searchd.searchers.base import FINISHED, ScheduleSearcher

logger = logging.getLogger(__name__)


def sub_key(key: str, j: int) -> str:
    """The searcher's key of candidate ``j`` of batch ``key``."""
    return f"{key}/{j}"


@dataclass
class Batch:
    """Candidates asked together, scored together, recorded together.

    Attributes:
        key: the batch's key (a Tune trial id, or ``b<n>`` in-process).
        index: the batch's number over the whole run (its searcher state file's number).
        keys: the searcher's key of each candidate (``"<key>/<j>"``).
        schedules: the candidates, in order.
        todo: indices of the candidates to score (the others have a result already).
        results: one per candidate once completed (None before).
    """

    key: str
    index: int
    keys: list[str]
    schedules: list[Schedule]
    todo: list[int]
    results: list[CandidateResult] | None = None

    @property
    def to_score(self) -> list[Schedule]:
        """The schedules a scorer must score, in order."""
        return [self.schedules[j] for j in self.todo]

    @property
    def generation(self) -> int:
        """The generation recorded with the batch's rows: the highest ``meta["generation"]``
        of its candidates (evolution), else the batch's index."""
        return max((int(s.meta.get("generation", self.index)) for s in self.schedules),
                   default=self.index)


class LoopObserver(Protocol):
    """Events of a loop, for the recorder and for fault injection (all optional)."""

    def scoring(self, batch: Batch) -> None: ...

    def recording(self, batch: Batch) -> None: ...

    def recorded(self, batch: Batch, new: Sequence[int]) -> None: ...


@dataclass
class LoopOutcome:
    """What a loop did.

    Attributes:
        finished: the searcher returned FINISHED and every batch it handed out was told.
        n_batches: batches completed in this loop.
        n_candidates: candidates completed (stored results included).
        n_scored: candidates scored by this loop's scorer.
        n_failed: of the scored ones, those with status "failed".
    """

    finished: bool
    n_batches: int
    n_candidates: int
    n_scored: int
    n_failed: int


@dataclass
class SearchLoop:
    """Ask / score / record / tell over one searcher.

    Args:
        searcher: the searcher (``ScheduleSearcher``: ask/tell over plain data).
        seeds: the noise seeds every candidate is scored on.
        batch_size: most candidates per batch (an evolutionary generation: population_num).
        known: candidate id -> stored result (a resumed run's rows): never scored again.
        observers: told of each batch's scoring and recording (``Recorder``, fault hooks).
        first_index: number of this loop's first batch (a resumed run continues the count).
        wrap_scorer: None, or what every engine scores through instead of its scorer
            (``searchd.loop.racing.HalvingScorer``: successive halving per batch).
    """

    searcher: ScheduleSearcher
    seeds: Sequence[int]
    batch_size: int
    known: Mapping[str, CandidateResult] = field(default_factory=dict)
    observers: Sequence[Any] = ()
    first_index: int = 0
    wrap_scorer: Callable[[Scorer], Scorer] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size = {self.batch_size!r}; it must be an integer >= 1")
        self.seeds = [int(s) for s in self.seeds]
        self._results: dict[str, CandidateResult] = dict(self.known)
        self._batches: dict[str, Batch] = {}  # asked, not yet told
        self._next_index = self.first_index
        self._searcher_done = False
        self.n_batches = 0
        self.n_candidates = 0
        self.n_scored = 0
        self.n_failed = 0
        self.race: Any = None  # a RaceOutcome (searchd.loop.racing) once raced

    # State --------------------------------------------------------------------------------
    @property
    def metric(self) -> str:
        return self.searcher.metric

    @property
    def pending(self) -> dict[str, Batch]:
        """Batches asked and not yet told, by key."""
        return dict(self._batches)

    @property
    def finished(self) -> bool:
        """The searcher said FINISHED and every batch it handed out was told."""
        return self._searcher_done and not self._batches

    def result_of(self, candidate_id: str) -> CandidateResult | None:
        """The result of a candidate scored by this loop or stored before, if any."""
        return self._results.get(candidate_id)

    # The steps ----------------------------------------------------------------------------
    def ask(self, key: str) -> Batch | str | None:
        """Up to ``batch_size`` candidates under the keys ``"<key>/<j>"``; None when the
        searcher waits for results of batches in flight, FINISHED when it has nothing more."""
        if key in self._batches:
            raise ValueError(f"batch {key!r} was already asked")
        keys: list[str] = []
        schedules: list[Schedule] = []
        stop: str | None = None
        for j in range(self.batch_size):
            s = self.searcher.ask(sub_key(key, j))
            if s is None or isinstance(s, str):
                stop = s
                break
            keys.append(sub_key(key, j))
            schedules.append(s)
        if not schedules:
            if stop == FINISHED:
                self._searcher_done = True
            return stop
        self._searcher_done = False
        todo, ids = [], set()
        for j, s in enumerate(schedules):
            if s.id not in self._results and s.id not in ids:
                todo.append(j)
                ids.add(s.id)
        batch = Batch(key, self._next_index, keys, schedules, todo)
        self._next_index += 1
        self._batches[key] = batch
        return batch

    def complete(self, key: str, results: Sequence[CandidateResult]) -> Batch:
        """Record the results of ``batch.todo`` (one per candidate to score, in order):
        every candidate of the batch gets its result, the new ones are recorded (observers'
        ``recorded``) before the searcher may learn of them (``tell``)."""
        batch = self._batch(key)
        if batch.results is not None:
            raise ValueError(f"batch {key!r} was already completed")
        results = list(results)
        want = [batch.schedules[j].id for j in batch.todo]
        got = [r.candidate_id for r in results]
        if got != want:
            raise ValueError(f"batch {key!r}: results for {got}, expected one for each of "
                             f"{want} in order")
        for obs in self.observers:
            _event(obs, "recording", batch)
        fresh = dict(zip(want, results))
        for cid, r in fresh.items():
            self._results[cid] = r
        batch.results = [self._results[s.id] for s in batch.schedules]
        for obs in self.observers:
            _event(obs, "recorded", batch, list(batch.todo))
        self.n_batches += 1
        self.n_candidates += len(batch.schedules)
        self.n_scored += len(results)
        self.n_failed += sum(r.status != "ok" for r in results)
        return batch

    def fail(self, key: str, error: str) -> Batch:
        """Complete a batch whose scoring raised (every candidate to score fails with
        ``error``): the failure is recorded, and the search goes on."""
        batch = self._batch(key)
        n = len(self.seeds)
        failed = [CandidateResult(candidate_id=s.id, status="failed", metrics={}, nfe=0,
                                  n_samples=n, seed_base=self.seeds[0] if n else 0,
                                  wall_s=0.0, samples_per_s=0.0, error=error)
                  for s in batch.to_score]
        return self.complete(key, failed)

    def tell(self, key: str) -> None:
        """The searcher learns every value of a completed batch."""
        batch = self._batch(key)
        if batch.results is None:
            raise ValueError(f"batch {key!r} is not completed: its results are not recorded")
        for k, r in zip(batch.keys, batch.results):
            # The raw value: the searcher counts a missing, NaN or inf one as a failure.
            raw = r.metrics.get(self.metric) if r.status == "ok" else None
            self.searcher.tell(k, raw, error=r.status != "ok")
        del self._batches[key]

    def forget(self, key: str) -> None:
        """Drop a batch that will never be scored (an engine that removed it): its
        candidates are told without a value."""
        batch = self._batches.pop(key, None)
        if batch is not None:
            for k in batch.keys:
                self.searcher.tell(k, None)

    def _batch(self, key: str) -> Batch:
        if key not in self._batches:
            raise ValueError(f"unknown batch {key!r}")
        return self._batches[key]

    # In-process -------------------------------------------------------------------------------
    def run(self, scorer: Scorer, *, max_batches: int | None = None,
            between: Callable[[], Any] | None = None) -> LoopOutcome:
        """Run the loop in this process until the searcher is finished (or ``max_batches``
        batches are done): ask, score ``todo`` with ``scorer``, complete, tell.

        ``between``: called after every batch (the engine's growth step)."""
        done = 0
        scorer = self.scorer_for(scorer)
        while max_batches is None or done < max_batches:
            key = f"b{self._next_index}"
            batch = self.ask(key)
            if batch is None:
                raise RuntimeError(f"{self.searcher.algorithm}: the searcher waits for results "
                                   "but every batch was told")
            if isinstance(batch, str):
                break
            for obs in self.observers:
                _event(obs, "scoring", batch)
            results = scorer.score(batch.to_score, self.seeds) if batch.todo else []
            self.complete(key, results)
            self.tell(key)
            done += 1
            if between is not None:
                between()
        return self.outcome()

    def scorer_for(self, scorer: Scorer) -> Scorer:
        """The scorer an engine scores batches with (``wrap_scorer`` applied)."""
        return scorer if self.wrap_scorer is None else self.wrap_scorer(scorer)

    def scored(self) -> list[tuple[Schedule, float | None]]:
        """(schedule, search value) of every candidate the searcher was told of."""
        return [(Schedule.from_dict(h["schedule"]), h["value"])
                for h in self.searcher.history]

    def outcome(self) -> LoopOutcome:
        return LoopOutcome(self.finished, self.n_batches, self.n_candidates, self.n_scored,
                           self.n_failed)

    def best(self) -> tuple[Schedule, CandidateResult] | None:
        """The best candidate the searcher knows (its ranking: value, then id), or the
        race's winner where the top candidates were raced (``searchd.loop.racing``)."""
        best = self.searcher.best
        if best is None:
            return None
        s = best["schedule"]
        if self.race is not None:
            s = self.race.winner
        return s, self._results[s.id]


def _event(observer: Any, name: str, *args: Any) -> None:
    fn = getattr(observer, name, None)
    if fn is not None:
        fn(*args)
