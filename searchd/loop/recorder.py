"""The recorder: each batch's new results as Parquet rows, the searcher's state, progress.

``Recorder`` observes a ``SearchLoop``. When a batch completes (before the searcher learns
of it) it appends one row per newly scored candidate to ``evaluations/`` (durable when the
append returns), writes ``searcher/state-<n>.json`` (the batch's candidates still pending in
it: a resume replays them from the rows just written), and updates the progress line. The
first failed candidate's reason is logged as a warning; failures are counted in the line.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from searchd.loop.loop import Batch
from searchd.loop.record import to_row
from searchd.searchers.base import ScheduleSearcher
from searchd.storage import RunDir, StorageError

logger = logging.getLogger("searchd")


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """The progress line: generation, best so far against the best baseline, failures,
    candidates/s, samples/s and time left.

    Args:
        total_generations: generations of the search, if it has any (evolution).
        total_candidates: candidates of the whole search, if known.
        metric: the searched metric's name.
        baselines: baseline name -> search value known before (a resumed run's rows).
    """

    def __init__(self, total_generations: int | None, total_candidates: int | None,
                 metric: str, baselines: Mapping[str, float] | None = None) -> None:
        self.total_generations = total_generations
        self.total_candidates = total_candidates
        self.metric = metric
        self.start = time.monotonic()
        self.n_candidates = 0
        self.n_samples = 0
        self.n_failed = 0
        self.best: float = math.inf
        self.baselines: dict[str, float] = dict(baselines or {})

    def update(self, generation: int, values: Sequence[float | None], samples: int,
               failed: int = 0, baselines: Mapping[str, float] | None = None) -> str:
        """Count a batch (its values: None for a failed candidate) and return the line."""
        self.n_candidates += len(values)
        self.n_samples += samples
        self.n_failed += failed
        self.baselines.update(baselines or {})
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if finite:
            self.best = min(self.best, min(finite))
        elapsed = time.monotonic() - self.start
        cps = self.n_candidates / max(elapsed, 1e-9)
        sps = self.n_samples / max(elapsed, 1e-9)
        left = math.nan
        if self.total_candidates:
            left = (self.total_candidates - self.n_candidates) / max(cps, 1e-9)
        gen = f"gen {generation + 1}"
        if self.total_generations:
            gen += f"/{self.total_generations}"
        best = f"{self.best:.4g}" if math.isfinite(self.best) else "none yet"
        line = f"[{gen}] best {self.metric} {best}"
        base = {k: v for k, v in self.baselines.items() if math.isfinite(v)}
        if base:
            name = min(base, key=base.__getitem__)
            val = base[name]
            line += f" (best baseline {name} {val:.4g}"
            if math.isfinite(self.best) and val:
                line += f", {100.0 * (self.best - val) / val:+.1f}%"
            line += ")"
        if self.n_failed:
            line += f" | {self.n_failed} failed"
        line += (
            f" | {self.n_candidates} cand, {cps:.2f} cand/s, {sps / 1000:.1f}k samples/s"
            f" | {format_duration(elapsed)} elapsed, ~{format_duration(left)} left"
        )
        return line


class Recorder:
    """Writes each completed batch of a ``SearchLoop`` to the run directory.

    Args:
        run: the run directory.
        run_id: the run's id (every row carries it).
        searcher: the loop's searcher (its state is saved after every batch).
        progress: the progress line's state.
        say: where progress lines go (it logs them too; None: the log only). The first
            failed candidate's reason is a warning of the ``searchd`` logger.
    """

    def __init__(self, run: RunDir, run_id: str, searcher: ScheduleSearcher,
                 progress: Progress, say: Callable[[str], None] | None = None) -> None:
        self.run = run
        self.run_id = run_id
        self.searcher = searcher
        self.progress = progress
        self.say = say
        self.n_rows = 0
        self.first_failure: str | None = None

    def recorded(self, batch: Batch, new: Sequence[int]) -> None:
        """Rows for the batch's new results, then the searcher's state, then progress."""
        assert batch.results is not None
        gen = batch.generation
        rows = [to_row(batch.schedules[j], batch.results[j], run_id=self.run_id,
                       metric=self.searcher.metric, generation=gen, trial_id=batch.keys[j])
                for j in new]
        if rows:
            self.run.append_evaluations(rows)
            self.n_rows += len(rows)
        # The searcher has not learned this batch's results yet: its state holds them as
        # pending, and a resume replays them from the rows just written.
        self.run.save_searcher_state(batch.index, self.searcher.get_state())
        if rows:
            self._compact()
        self._report(batch, new)

    def _compact(self) -> None:
        """Merge the parts when there are many (``RunDir.compact_parts``). The rows are
        already durable: a compaction that cannot be written is retried after a later batch."""
        try:
            self.run.compact_parts()
        except StorageError as e:
            logger.warning("evaluation parts not compacted (tried again later): %s", e)

    def _report(self, batch: Batch, new: Sequence[int]) -> None:
        assert batch.results is not None
        metric = self.searcher.metric
        failed = [j for j in new if batch.results[j].status != "ok"]
        if failed and self.first_failure is None:
            r = batch.results[failed[0]]
            self.first_failure = f"candidate {r.candidate_id}: {r.error}"
            logger.warning("a candidate failed (%s); failed candidates count as +inf, and "
                           "`python -m searchd.report` lists every reason",
                           self.first_failure)
        baselines = {str(s.meta.get("name", s.id)): _search_value(r, metric)
                     for s, r in zip(batch.schedules, batch.results)
                     if s.meta.get("origin") == "baseline"}
        line = self.progress.update(
            batch.generation, [r.value(metric) for r in batch.results],
            sum(int(r.n_samples) for r in batch.results), len(failed), baselines)
        if self.say is not None:
            self.say(line)
        else:
            logger.info(line)


def _search_value(result: Any, metric: str) -> float:
    v = result.value(metric)
    return math.inf if v is None else float(v)
