"""Shared parts of searchd's searchers: ask/tell over plain data, one candidate per key.

A searcher proposes ``Schedule``s of a ``Space`` and learns from their values. It knows
nothing of Ray, Tune, Parquet or the models: the search loop (``searchd.loop``) asks it for
candidates, has them scored and tells it the values; the Ray Tune engine drives that same
loop (``searchd.distributed.tune``). ``ScheduleSearcher`` does the bookkeeping they share:

- ``ask(key)`` returns the next candidate (a ``Schedule``, provenance in its ``meta``),
  ``None`` while the algorithm waits for results, or ``FINISHED``; the candidate stays
  pending under ``key`` until it is told;
- ``tell(key, value)`` turns the value into one to minimize: a failed evaluation
  (``error=True``), a missing value, NaN or +-inf count as +inf (recorded as
  ``value = None``), so they never crash the search and never rank above a finite value;
- ``get_state``/``set_state`` give and take plain JSON data (no pickles), and
  ``save``/``restore`` write and read that JSON atomically (temporary file, then
  ``os.replace``).

A subclass implements ``_next`` (the next candidate), ``_on_result`` (what to learn from a
result) and ``_algo_state``/``_set_algo_state`` (its own plain-data state).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from searchd.schedule import Schedule
from searchd.schedules.spaces import Space, with_meta

logger = logging.getLogger(__name__)

STATE_FORMAT = "searchd.searcher/1"
# What ``ask`` returns once the searcher has nothing more to propose (Tune's spelling).
FINISHED = "FINISHED"

# What ``_next`` returns: a candidate and algorithm data kept with it while it is pending,
# or None (wait for results), or FINISHED.
Next = tuple[Schedule, dict[str, Any]] | None | str


# Plain-data helpers ------------------------------------------------------------------------
def finite_or_none(x: Any) -> float | None:
    """``float(x)`` if it is a finite number, else None (NaN, inf, None, non-numbers)."""
    if isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """JSON-able state of a numpy Generator (its bit generator's state dict)."""
    return json.loads(json.dumps(rng.bit_generator.state))


def rng_from_state(state: Mapping[str, Any]) -> np.random.Generator:
    """A Generator continuing exactly where ``rng_state`` was taken."""
    name = state["bit_generator"]
    bitgen = getattr(np.random, name)()
    bitgen.state = dict(state)
    return np.random.Generator(bitgen)


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as strict JSON to ``path`` through a temporary file and ``os.replace``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, allow_nan=False, sort_keys=True, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file written by ``atomic_write_json``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def ranking_key(value: float, candidate_id: str, mode: str = "min") -> tuple[float, str]:
    """How candidates rank, best first: by value (negated for "max"), ties broken by id, so
    the order never depends on the order in which results arrived. The one ranking of
    searchd: searchers pick parents and the winner by it, reports list candidates by it."""
    return (value if mode == "min" else -value, candidate_id)


# The base searcher ------------------------------------------------------------------------
class ScheduleSearcher:
    """A searcher that proposes one ``Schedule`` of a ``Space`` per key (ask/tell).

    Args:
        space: the search space.
        metric: name of the value optimized (default "fid"; the loop tells its value).
        mode: "min" or "max".
    """

    algorithm: ClassVar[str] = "base"

    def __init__(self, space: Space, metric: str = "fid", mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode = {mode!r}; allowed: 'min' or 'max'")
        self.metric = metric
        self.mode = mode
        self.space = space
        self._pending: dict[str, dict[str, Any]] = {}  # trial id -> {"schedule", "extra"}
        self._retry: list[dict[str, Any]] = []  # pending records handed back for re-issue
        self._history: list[dict[str, Any]] = []  # completed candidates, in completion order
        self._seen: set[str] = set()  # ids of every candidate ever proposed
        self._n_suggested = 0  # distinct candidates handed out

    # Ask / tell -------------------------------------------------------------------------
    def ask(self, key: str) -> Schedule | str | None:
        """The next candidate, pending under ``key`` until told; None (wait for results) or
        ``FINISHED``. Asking again for a pending key returns its candidate again."""
        if key in self._pending:
            return Schedule.from_dict(self._pending[key]["schedule"])
        if self._retry:
            record = self._retry.pop(0)
        else:
            nxt = self._next(key)
            if nxt is None or isinstance(nxt, str):
                return nxt
            schedule, extra = nxt
            self.space.check(schedule)
            self._seen.add(schedule.id)
            self._n_suggested += 1
            record = {"schedule": schedule.to_dict(), "extra": extra}
        self._pending[key] = record
        return Schedule.from_dict(record["schedule"])

    def tell(self, key: str, value: float | None = None, *, error: bool = False) -> None:
        """The value of the candidate pending under ``key``. A failed evaluation
        (``error``), a missing value (None), NaN or inf count as +inf."""
        record = self._pending.pop(key, None)
        if record is None:
            logger.warning("%s: result for unknown key %r ignored", self.algorithm, key)
            return
        finite = None if error else finite_or_none(value)
        if error:
            status = "error"
        elif finite is None:
            status = "missing" if value is None else "nonfinite"
        else:
            status = "ok"
        sched = record["schedule"]
        self._history.append(
            {"trial_id": key, "id": sched["id"], "value": finite, "status": status,
             "schedule": sched}
        )
        self._on_result(key, record, finite)

    # Results -----------------------------------------------------------------------------
    def loss(self, value: float | None) -> float:
        """Value to minimize: +inf for a failure, the value (or its negative for "max")."""
        if value is None:
            return math.inf
        return value if self.mode == "min" else -value

    def ranked(self) -> list[dict[str, Any]]:
        """Completed candidates with finite values, best first (ties broken by id, so the
        order does not depend on the order in which results arrived)."""
        ok = [h for h in self._history if h["value"] is not None]
        return sorted(ok, key=lambda h: ranking_key(h["value"], h["id"], self.mode))

    @property
    def best(self) -> dict[str, Any] | None:
        """Best finite result so far: ``{"schedule": Schedule, "value", "trial_id"}``."""
        ranked = self.ranked()
        if not ranked:
            return None
        h = ranked[0]
        return {"schedule": Schedule.from_dict(h["schedule"]), "value": h["value"],
                "trial_id": h["trial_id"]}

    @property
    def history(self) -> list[dict[str, Any]]:
        """Completed candidates (plain data), in completion order."""
        return list(self._history)

    @property
    def pending(self) -> dict[str, dict[str, Any]]:
        """Key -> schedule dict of the candidates handed out and not yet told."""
        return {tid: rec["schedule"] for tid, rec in self._pending.items()}

    @property
    def num_suggested(self) -> int:
        return self._n_suggested

    def requeue_pending(self) -> list[str]:
        """Hand every pending candidate back for re-issue under new keys (a resumed search
        asks for them again). Returns the old keys."""
        ids = sorted(self._pending)
        self._retry.extend(self._pending.pop(t) for t in ids)
        return ids

    # State -------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Everything needed to continue the search, as plain JSON-able data."""
        return {
            "format": STATE_FORMAT,
            "algorithm": self.algorithm,
            "metric": self.metric,
            "mode": self.mode,
            "space": self.space.describe(),
            "pending": {t: dict(r) for t, r in self._pending.items()},
            "retry": [dict(r) for r in self._retry],
            "history": [dict(h) for h in self._history],
            "seen": sorted(self._seen),
            "n_suggested": self._n_suggested,
            "algo": self._algo_state(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from ``get_state``'s data. The algorithm and the space must match; the
        algorithm's parameters are this searcher's (so a resume may extend a budget)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a searcher state: format {state.get('format')!r}")
        if state["algorithm"] != self.algorithm:
            raise ValueError(
                f"state is of a {state['algorithm']!r} searcher; this is {self.algorithm!r}"
            )
        if state["space"] != self.space.describe():
            raise ValueError(
                f"state was taken over space {state['space']}; this searcher's space is "
                f"{self.space.describe()}"
            )
        self._metric, self._mode = state["metric"], state["mode"]
        self._pending = {t: dict(r) for t, r in state["pending"].items()}
        self._retry = [dict(r) for r in state["retry"]]
        self._history = [dict(h) for h in state["history"]]
        self._seen = set(state["seen"])
        self._n_suggested = int(state["n_suggested"])
        self._set_algo_state(state["algo"])

    def save(self, checkpoint_path: str) -> None:
        """Write ``get_state()`` as JSON, atomically."""
        atomic_write_json(checkpoint_path, self.get_state())

    def restore(self, checkpoint_path: str) -> None:
        """Read a file written by ``save`` and continue from it."""
        self.set_state(read_json(checkpoint_path))

    # For subclasses ------------------------------------------------------------------------
    def _next(self, trial_id: str) -> Next:
        raise NotImplementedError

    def _on_result(self, trial_id: str, record: dict[str, Any], value: float | None) -> None:
        """React to a completed candidate (default: nothing beyond the shared history)."""

    def _algo_state(self) -> dict[str, Any]:
        return {}

    def _set_algo_state(self, state: Mapping[str, Any]) -> None:
        """Restore what ``_algo_state`` returned."""

    def _prepare_seeds(self, seeds: Sequence[Schedule], origin: str) -> list[Schedule]:
        """Check seed schedules against the space, drop repeats, set ``origin`` if unset."""
        out: list[Schedule] = []
        ids: set[str] = set()
        for s in seeds:
            self.space.check(s)
            if s.id in ids:
                continue
            ids.add(s.id)
            out.append(with_meta(s, origin=s.meta.get("origin", origin)))
        return out
