"""Racing and successive halving: spend samples where the ranking is still in doubt.

Near the FID floor the differences between good candidates are of the size of the noise
of one block of search seeds, and the best value of a search is then partly luck: the
winner of the search seeds is not the winner of the held-out seeds
(benchmarks/results/quality.md, NFE 8 and 10). Two remedies, both on search seeds only
(never the held-out ones), both paid from the run's budget, both stored as rows:

- **Racing** (``race``): when the search is over, the ``top_k`` candidates (by search value,
  ties by id) are re-scored on ``blocks`` fresh blocks of search seeds, each of
  ``per_candidate`` seeds, following the search's own range (block b: seeds
  ``seed_base + b * per_candidate + [0, per_candidate)``, b = 1 ..). The winner is the
  lowest mean over the pooled blocks (the search block and the fresh ones). Every block
  has the same number of samples, so every block value estimates the same quantity (FID at
  that sample count, whose bias depends on the count) and their mean is comparable across
  candidates; all candidates see the same seeds (common random numbers). The re-scorings
  are rows of their own: ``trial_id`` ``race/<b>/<rank>``, ``seed_base`` the block's first
  seed, ``fidelity`` the block number b.
- **Successive halving** (``HalvingScorer``): a scorer around the run's scorer. The seeds of
  a candidate are split into ``rungs`` equal blocks; every candidate of a batch is scored on
  block 0, the best ``1/eta`` of them (by mean so far) also on block 1, the best ``1/eta`` of
  those on block 2, and so on. A candidate's value is the mean over the blocks it got (the
  same estimator at every rung, as above); its row has ``seed_base`` the first seed,
  ``n_samples`` the samples it got, ``fidelity`` the number of blocks, and the per-block
  values in ``metrics`` (``<metric>@block<r>``). Halving works within a batch: it pays when a
  batch holds many candidates (an evolution's generation; ``candidates_per_trial``).

Budget: the run's ``search.budget`` counts full candidates (``per_candidate`` samples);
``search_budget`` gives the searcher what is left after the race, and with halving the
number of candidates of the same cost (its cost per candidate is the fraction of blocks
an average candidate gets).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from searchd import faults
from searchd.evaluation import CandidateResult
from searchd.loop.scoring import Scorer
from searchd.schedule import Schedule

RACE_TRIAL = "race"


# Seeds --------------------------------------------------------------------------------------
def race_blocks(seed_base: int, per_candidate: int, blocks: int) -> list[list[int]]:
    """The fresh blocks of search seeds a race uses (block b = 1 .. ``blocks``)."""
    return [list(range(seed_base + b * per_candidate, seed_base + (b + 1) * per_candidate))
            for b in range(1, blocks + 1)]


def check_disjoint(blocks: Sequence[Sequence[int]], others: Mapping[str, Sequence[int]]
                   ) -> None:
    """``ValueError`` (one line) where a race block meets held-out or reference seeds."""
    for b, block in enumerate(blocks, start=1):
        lo, hi = min(block), max(block)
        for name, seeds in others.items():
            if seeds and lo <= max(seeds) and min(seeds) <= hi:
                raise ValueError(f"race block {b} (seeds [{lo}, {hi}]) overlaps the {name} "
                                 f"seeds [{min(seeds)}, {max(seeds)}]; racing uses search "
                                 "seeds only")


def halving_cost(rungs: int, eta: int) -> float:
    """Fraction of a full candidate's samples an average candidate gets under halving (the
    fraction of a batch reaching rung r is ``eta**-r``)."""
    return sum(eta ** -r for r in range(rungs)) / rungs


def search_budget(budget: int, top_k: int, blocks: int, rungs: int = 1, eta: int = 2,
                  floor: int = 1) -> int:
    """Candidates the searcher may score: the run's budget (in full candidates) less the
    race's re-scorings, scaled by halving's cost per candidate; at least ``floor``."""
    left = budget - top_k * blocks
    if rungs > 1:
        left = int(math.floor(left / halving_cost(rungs, eta)))
    return max(int(left), floor)


# Racing -----------------------------------------------------------------------------------
@dataclass
class RaceEntry:
    """One candidate of a race: its search value and its value on every block."""

    schedule: Schedule
    values: list[float | None]  # [search block, block 1, ...]
    results: list[CandidateResult] = field(default_factory=list)  # blocks 1.. (not search)

    @property
    def pooled(self) -> float | None:
        """Mean over the blocks; None where one failed or is not finite."""
        if any(v is None or not math.isfinite(v) for v in self.values):
            return None
        return float(sum(self.values) / len(self.values))  # type: ignore[arg-type]


@dataclass
class RaceOutcome:
    """What a race did: the entries in search order, the winner, the denoiser calls of all
    its re-scorings (``calls``; a resumed race's stored blocks included, so a resumed run
    reports what an uninterrupted one does), and the re-scorings this call made
    (``scored``)."""

    entries: list[RaceEntry]
    winner: Schedule
    search_winner: Schedule
    blocks: list[list[int]]
    calls: int
    scored: int

    def to_json(self, metric: str) -> dict[str, Any]:
        """best.json's ``racing`` section."""
        return {
            "top_k": len(self.entries), "blocks": len(self.blocks),
            "block_seed_bases": [b[0] for b in self.blocks],
            "per_block": len(self.blocks[0]) if self.blocks else 0,
            "search_winner": self.search_winner.id, "winner": self.winner.id,
            "changed": self.winner.id != self.search_winner.id,
            "denoiser_calls": self.calls,
            "rescored": len(self.entries) * len(self.blocks), "metric": metric,
            "candidates": [{"id": e.schedule.id, "values": e.values, "pooled": e.pooled}
                           for e in self.entries],
        }


def top_candidates(scored: Sequence[tuple[Schedule, float | None]], k: int) -> list[
        tuple[Schedule, float]]:
    """The ``k`` best distinct candidates with a finite value (value, then id)."""
    seen: dict[str, tuple[Schedule, float]] = {}
    for s, v in scored:
        if v is None or not math.isfinite(v) or s.id in seen:
            continue
        seen[s.id] = (s, float(v))
    return sorted(seen.values(), key=lambda sv: (sv[1], sv[0].id))[:k]


def race(
    scored: Sequence[tuple[Schedule, float | None]],
    scorer: Scorer,
    blocks: Sequence[Sequence[int]],
    metric: str,
    top_k: int,
    *,
    known: Mapping[tuple[str, int], CandidateResult] | None = None,
    record: Callable[[int, list[Schedule], list[CandidateResult]], None] | None = None,
) -> RaceOutcome | None:
    """Re-score the top ``top_k`` of ``scored`` (schedule, search value) on each block and
    pick the lowest mean over the pooled blocks (ties: search value, then id).

    Args:
        scorer: the scoring protocol (``Scorer``).
        blocks: the fresh seed blocks (``race_blocks``), never held-out seeds.
        known: (candidate id, block number) -> result already stored (a resumed run): not
            scored again.
        record: called per block with (block number, schedules, results) of the newly
            scored ones, before they are used (the run's rows).

    Returns:
        The outcome, or None when fewer than two candidates have a finite value.
    """
    top = top_candidates(scored, top_k)
    if len(top) < 2 or not blocks:
        return None
    known = dict(known or {})
    entries = [RaceEntry(s, [v]) for s, v in top]
    calls = scored_n = 0
    for b, seeds in enumerate(blocks, start=1):
        todo = [e.schedule for e in entries if (e.schedule.id, b) not in known]
        fresh = scorer.score(todo, list(seeds)) if todo else []
        if [r.candidate_id for r in fresh] != [s.id for s in todo]:
            raise RuntimeError(f"race block {b}: the scorer answered for "
                               f"{[r.candidate_id for r in fresh]}, not {[s.id for s in todo]}")
        if record is not None and todo:
            record(b, todo, list(fresh))
        got = {r.candidate_id: r for r in fresh}
        scored_n += len(fresh)
        for e in entries:
            r = got.get(e.schedule.id) or known[(e.schedule.id, b)]
            calls += int(r.nfe) * int(r.n_samples)  # the race's cost, stored blocks included
            e.results.append(r)
            e.values.append(r.value(metric) if r.status == "ok" else None)
    ranked = sorted(entries, key=lambda e: (math.inf if e.pooled is None else e.pooled,
                                            e.values[0], e.schedule.id))
    return RaceOutcome(entries, ranked[0].schedule, entries[0].schedule,
                       [list(b) for b in blocks], calls, scored_n)


# Successive halving -----------------------------------------------------------------------
class HalvingScorer:
    """Successive halving on samples per candidate, around a scorer (module docstring).

    Picklable when the inner scorer is (it runs inside Tune trials).
    """

    def __init__(self, inner: Scorer, metric: str, rungs: int, eta: int = 2) -> None:
        if rungs < 1 or eta < 2:
            raise ValueError(f"halving: rungs = {rungs!r} must be >= 1 and eta = {eta!r} >= 2")
        self.inner = inner
        self.metric = metric
        self.rungs = int(rungs)
        self.eta = int(eta)

    def blocks(self, seeds: Sequence[int]) -> list[list[int]]:
        """The seeds split into ``rungs`` equal consecutive blocks (a remainder unused)."""
        size = len(seeds) // self.rungs
        if size < 2:
            raise ValueError(f"halving: {len(seeds)} seeds cannot make {self.rungs} blocks "
                             "of >= 2 samples; lower search.halving.rungs")
        return [list(seeds[r * size:(r + 1) * size]) for r in range(self.rungs)]

    def score(self, schedules: Sequence[Schedule], seeds: Sequence[int]
              ) -> list[CandidateResult]:
        """One pooled result per schedule, in order (see the module docstring)."""
        blocks = self.blocks(seeds)
        per: list[list[CandidateResult]] = [[] for _ in schedules]
        alive = list(range(len(schedules)))
        for r, block in enumerate(blocks):
            if r > 0:
                ok = [j for j in alive if _mean(per[j], self.metric) is not None]
                ok.sort(key=lambda j: (_mean(per[j], self.metric), schedules[j].id))
                alive = ok[: max(1, math.ceil(len(ok) / self.eta))] if ok else []
            if not alive:
                break
            results = self.inner.score([schedules[j] for j in alive], block)
            for j, res in zip(alive, results):
                per[j].append(res)
        return [self._pooled(s, rs, seeds[0]) for s, rs in zip(schedules, per)]

    def _pooled(self, schedule: Schedule, results: list[CandidateResult], seed_base: int
                ) -> CandidateResult:
        first = results[0]
        n = sum(int(r.n_samples) for r in results)
        wall = sum(float(r.wall_s) for r in results)
        bad = next((r for r in results if r.status != "ok"), None)
        metrics: dict[str, float] = {}
        if bad is None:
            for name in first.metrics:
                vals = [float(r.metrics[name]) for r in results if name in r.metrics]
                metrics[name] = float(sum(vals) / len(vals))
            for r, res in enumerate(results):
                if self.metric in res.metrics:
                    metrics[f"{self.metric}@block{r}"] = float(res.metrics[self.metric])
        return dataclasses.replace(
            first, candidate_id=schedule.id, status="ok" if bad is None else bad.status,
            metrics=metrics, n_samples=n, seed_base=int(seed_base), wall_s=wall,
            samples_per_s=n / wall if wall > 0 else 0.0,
            error=None if bad is None else bad.error, stats=None)


def _mean(results: list[CandidateResult], metric: str) -> float | None:
    vals = [r.value(metric) if r.status == "ok" else None for r in results]
    if not vals or any(v is None or not math.isfinite(v) for v in vals):
        return None
    return float(sum(vals) / len(vals))  # type: ignore[arg-type]


def blocks_reached(result: CandidateResult, metric: str) -> int:
    """How many halving blocks a pooled result holds (0: not a halving result)."""
    return sum(1 for k in result.metrics if k.startswith(f"{metric}@block"))


# The run's hooks ---------------------------------------------------------------------------
def is_race_row(row: Mapping[str, Any]) -> bool:
    """A stored row of a race re-scoring (not a search evaluation)."""
    return str(row.get("trial_id") or "").startswith(RACE_TRIAL + "/")


def race_known(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], CandidateResult]:
    """(candidate id, block) -> result of the race rows a resumed run stored."""
    from searchd.loop.record import from_row

    out = {}
    for row in rows:
        if is_race_row(row):
            _, result = from_row(row)
            out[(result.candidate_id, int(row.get("fidelity") or 0))] = result
    return out


def halving_wrapper(metric: str, rungs: int, eta: int) -> Callable[[Scorer], Scorer] | None:
    """``SearchLoop.wrap_scorer`` for successive halving (None when ``rungs`` is 1)."""
    if rungs <= 1:
        return None
    return _Wrap(metric, rungs, eta)


@dataclass(frozen=True)
class _Wrap:
    """A picklable ``scorer -> HalvingScorer(scorer)``."""

    metric: str
    rungs: int
    eta: int

    def __call__(self, scorer: Scorer) -> Scorer:
        return HalvingScorer(scorer, self.metric, self.rungs, self.eta)


def skip_reason(search: Any) -> str | None:
    """Why a run with ``search.racing.top_k > 0`` races nothing (``SearchSection``), or None
    when it races."""
    if search.race_k or not search.racing.top_k:
        return None
    if search.algorithm not in ("evolution", "random", "bayes"):
        return (f"search.algorithm {search.algorithm!r} has no search of its own to race "
                "(evolution, random and bayes race)")
    k = min(search.racing.top_k, int(search.budget or 0) // 4)
    return (f"search.budget {search.budget} allows a race of {k} candidate(s) (at most a "
            "quarter of the budget); a race needs 2")


def run_race(loop: Any, scorer: Scorer, *, top_k: int, blocks: Sequence[Sequence[int]],
             run: Any = None, run_id: str = "", known: Mapping[tuple[str, int],
                                                                 CandidateResult] | None = None,
             say: Callable[[str], None] | None = None) -> RaceOutcome | None:
    """Race a finished ``SearchLoop``'s top candidates on ``scorer`` and set its winner
    (``loop.race``); each block's new results are appended to ``run`` (a ``RunDir``) as
    rows before they are used."""
    from searchd.loop.record import to_row

    metric = loop.metric
    generation = loop._next_index

    def record(b: int, schedules: list[Schedule], results: list[CandidateResult]) -> None:
        if run is None:
            return
        rows = []
        for rank, (s, r) in enumerate(zip(schedules, results)):
            row = to_row(s, r, run_id=run_id, metric=metric, generation=generation,
                         trial_id=f"{RACE_TRIAL}/{b}/{rank}")
            row["fidelity"] = b
            rows.append(row)
        run.append_evaluations(rows)
        faults.hit("during_race")  # SEARCHD_FAULT: block b stored, later blocks not scored

    if say is not None:
        say(f"searchd: racing the top {top_k} candidates on {len(blocks)} fresh block(s) of "
            f"{len(blocks[0]) if blocks else 0} search seeds ...")
    outcome = race(loop.scored(), scorer, blocks, metric, top_k, known=known, record=record)
    loop.race = outcome
    if outcome is None and say is not None:
        say("searchd: race skipped: fewer than two candidates have a finite value; the "
            "search's best stands")
    if outcome is not None and say is not None:
        w = next(e for e in outcome.entries if e.schedule.id == outcome.winner.id)
        change = ("kept the search's best" if outcome.winner.id == outcome.search_winner.id
                  else f"replaced the search's best {outcome.search_winner.id}")
        say(f"searchd: race winner {outcome.winner.id} ({metric} {w.pooled:.4g} pooled over "
            f"{len(w.values)} blocks; {change})")
    return outcome
