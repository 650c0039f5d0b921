"""``BatchedSearcher``: several candidates per Ray Tune trial, one-candidate semantics inside.

Every Tune trial has a fixed cost in the driver (tens of ms with one trial in flight,
about 0.3 s with Tune's loggers on, over a second with several trials in flight; see
docs/notes-distributed.md), and one candidate per trial would also keep all but one actor
idle. So one trial carries a batch of candidates (an evolutionary generation is one trial),
which the pool splits over its actors, while the searcher doing the work still sees Tune's
one-candidate-per-trial protocol:

- ``suggest(trial_id)`` asks the inner searcher for up to ``batch_size`` candidates under the
  sub-trial ids ``"<trial_id>/<j>"`` and returns ``{"candidates": [cfg_0, ...],
  "sub_ids": [...]}``. It stops early when the inner searcher returns None (it waits for
  results) or FINISHED, and returns a partial batch then. With no candidate at all it
  returns what the inner searcher said: None (Tune asks again later) or FINISHED.
- the trial reports ``result["per_candidate"][j]``, a dict with the metric, for each
  candidate; ``on_trial_complete`` hands each one to the inner searcher under its sub-id.
  A candidate whose entry says ``status == "failed"`` completes with ``error=True``, as does
  every candidate of an errored trial. A trial that ends without a result (Tune removed it
  before it ran) completes each candidate without a result, exactly as Tune would.
- intermediate results (``on_trial_result``) are not forwarded: they mean nothing per
  candidate without multi-fidelity, and some Tune searchers expect a training iteration;
- ``get_state``/``set_state`` and ``save``/``restore`` are plain JSON: the inner searcher's
  own state (its ``get_state``) plus the trials in flight and a few counters.

With ``batch_size=1`` every trial carries one candidate: plain Tune.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ray.tune.search import Searcher

from searchd.search.base import atomic_write_json, read_json

logger = logging.getLogger(__name__)

STATE_FORMAT = "searchd.batched/1"
FINISHED = Searcher.FINISHED


def sub_trial_id(trial_id: str, j: int) -> str:
    """Id under which the inner searcher sees candidate ``j`` of trial ``trial_id``."""
    return f"{trial_id}/{j}"


class BatchedSearcher(Searcher):
    """A Tune searcher carrying up to ``batch_size`` candidates of ``inner`` per trial.

    Args:
        inner: a per-candidate ``ray.tune.search.Searcher`` (searchd's searchers, or any
            Tune searcher; plain-JSON state needs ``get_state``/``set_state``).
        batch_size: most candidates per trial (>= 1).

    Attributes:
        inner: the wrapped searcher. (Not called ``searcher``: Tune walks ``.searcher``
            attributes to find a ConcurrencyLimiter, and the inner searcher is not a
            wrapper of that kind.)
        finished: True once this searcher has returned FINISHED to Tune.
    """

    def __init__(self, inner: Searcher, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size = {batch_size!r}; it must be an integer >= 1")
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner = inner
        self.batch_size = batch_size
        self._pending: dict[str, list[str]] = {}  # trial id -> sub-trial ids in flight
        self.finished = False
        self.n_trials = 0  # trials suggested
        self.n_candidates = 0  # candidates suggested

    # Tune protocol ------------------------------------------------------------------------
    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        """Pass Tune's metric and mode to the inner searcher, and take them from it."""
        ok = self.inner.set_search_properties(metric, mode, config, **spec)
        self._metric = self.inner.metric
        self._mode = self.inner.mode
        return ok

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """A batch ``{"candidates": [...], "sub_ids": [...]}``, None (wait) or FINISHED."""
        if trial_id in self._pending:
            raise ValueError(f"trial {trial_id!r} was already suggested")
        configs: list[dict[str, Any]] = []
        sub_ids: list[str] = []
        stop: str | None = None
        for j in range(self.batch_size):
            sub = sub_trial_id(trial_id, j)
            cfg = self.inner.suggest(sub)
            if cfg is None or isinstance(cfg, str):
                stop = cfg
                break
            configs.append(cfg)
            sub_ids.append(sub)
        if not configs:
            if stop == FINISHED:
                self.finished = True
            return stop
        self._pending[trial_id] = sub_ids
        self.finished = False
        self.n_trials += 1
        self.n_candidates += len(configs)
        return {"candidates": configs, "sub_ids": sub_ids}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Not forwarded (see the module docstring): candidates complete as a whole."""

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Complete every candidate of the trial in the inner searcher, under its sub-id."""
        subs = self._pending.pop(trial_id, None)
        if subs is None:
            logger.warning("completion of unknown trial %r ignored", trial_id)
            return
        per = result.get("per_candidate") if result else None
        if not error and result and not isinstance(per, list):
            logger.warning("trial %r reported no per_candidate results; its %d candidates "
                           "complete without a result", trial_id, len(subs))
        for j, sub in enumerate(subs):
            if error:
                self.inner.on_trial_complete(sub, None, error=True)
            elif isinstance(per, list) and j < len(per) and isinstance(per[j], Mapping):
                r = dict(per[j])
                if r.get("status") == "failed":
                    self.inner.on_trial_complete(sub, None, error=True)
                else:
                    self.inner.on_trial_complete(sub, r, error=False)
            else:
                self.inner.on_trial_complete(sub, None, error=False)

    # Trials in flight ---------------------------------------------------------------------
    @property
    def pending(self) -> dict[str, list[str]]:
        """Trial id -> sub-trial ids of the trials suggested and not yet completed."""
        return {t: list(s) for t, s in self._pending.items()}

    def requeue_pending(self) -> list[str]:
        """Forget the trials in flight and hand their candidates back to the inner searcher
        for re-issue (its ``requeue_pending``), for a resume in a new Tuner whose trials
        will never complete the old ones. Returns the old trial ids."""
        ids = sorted(self._pending)
        self._pending.clear()
        requeue = getattr(self.inner, "requeue_pending", None)
        if ids and requeue is None:
            raise TypeError(f"{type(self.inner).__name__} cannot re-issue pending candidates")
        if requeue is not None:
            requeue()
        return ids

    # State --------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Plain JSON-able state: ours and the inner searcher's ``get_state()``."""
        try:
            inner = self.inner.get_state()
        except NotImplementedError:  # Tune's Searcher base class
            raise TypeError(f"{type(self.inner).__name__} has no get_state(); it cannot be "
                            "saved as plain data") from None
        return {
            "format": STATE_FORMAT,
            "batch_size": self.batch_size,
            "pending": {t: list(s) for t, s in self._pending.items()},
            "finished": self.finished,
            "n_trials": self.n_trials,
            "n_candidates": self.n_candidates,
            "inner": inner,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from ``get_state``'s data (this searcher's ``batch_size`` is kept, so a
        resume may change it)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a batched searcher state: format {state.get('format')!r}")
        self.inner.set_state(state["inner"])
        self._pending = {t: list(s) for t, s in state["pending"].items()}
        self.finished = bool(state["finished"])
        self.n_trials = int(state["n_trials"])
        self.n_candidates = int(state["n_candidates"])
        self._metric = self.inner.metric
        self._mode = self.inner.mode

    def save(self, checkpoint_path: str) -> None:
        """Write ``get_state()`` as JSON, atomically (temporary file, then rename).

        Raises NotImplementedError (which Tune's experiment checkpoint skips with a warning)
        when the inner searcher has no plain-data state.
        """
        try:
            state = self.get_state()
        except TypeError as e:
            raise NotImplementedError(str(e)) from e
        atomic_write_json(checkpoint_path, state)

    def restore(self, checkpoint_path: str) -> None:
        """Continue from a file written by ``save``."""
        self.set_state(read_json(checkpoint_path))
