"""Fault injection at the search loop's points (``SEARCHD_FAULT``, ``searchd.faults``).

``FaultHooks`` observes a ``SearchLoop`` and SIGKILLs the process at the point
``SEARCHD_FAULT`` names, for the resume tests; it is not installed unless the variable is
set, so the stages of a run never see it:

- ``mid_generation:n``: the n-th batch of this session is being scored and none of its rows
  is stored. In-process, the loop says when scoring starts (``scoring``). On Ray the trial
  scores elsewhere, so the engine runs ``watch`` in a thread: it compares the actors' call
  counter (``counter``) with its value when the previous batch was recorded. If the results
  reach the driver first, ``recording`` kills before anything is stored.
- ``after_generation:n``: the n-th batch's rows and the searcher state after it are stored,
  and the searcher has not yet learned of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from searchd import faults


class FaultHooks:
    """The loop's fault points (see the module docstring).

    Args:
        counter: the scorer's count of evaluator calls started so far (the Ray engine's
            actors' counters), for ``watch``; None in-process.
    """

    def __init__(self, counter: Callable[[], int] | None = None) -> None:
        self.mid = faults.armed("mid_generation")
        self.counter = counter
        self.n_recorded = 0  # batches recorded by this session
        self.calls_before: int | None = None
        if self.mid == 1 and counter is not None:
            self.calls_before = counter()

    @staticmethod
    def wanted() -> bool:
        """Whether ``SEARCHD_FAULT`` names a point of the loop."""
        return faults.armed("mid_generation") is not None or \
            faults.armed("after_generation") is not None

    def _scoring_now(self) -> bool:
        return self.mid is not None and self.mid == self.n_recorded + 1

    def scoring(self, batch: Any) -> None:
        if self._scoring_now():
            faults.kill("mid_generation", self.mid, f"batch {self.mid} of this session is "
                        "being scored; none of its rows stored")

    def recording(self, batch: Any) -> None:
        if self._scoring_now():
            faults.kill("mid_generation", self.mid,
                        "the batch's results reached the driver before the actors' counters "
                        "showed its scoring; none of them stored")

    def recorded(self, batch: Any, new: Sequence[int]) -> None:
        self.n_recorded += 1
        faults.hit("after_generation")
        if self._scoring_now() and self.counter is not None:
            self.calls_before = self.counter()  # the next batch's scoring has not started

    def watch(self, running: Callable[[], bool]) -> None:
        """Poll the counter while ``running()``; kill once the watched batch's scoring has
        started on the actors (the body of the Ray engine's watcher thread)."""
        while running():
            time.sleep(0.01)
            if self._scoring_now() and self.calls_before is not None and \
                    self.counter is not None and self.counter() > self.calls_before:
                faults.kill("mid_generation", self.mid, "an evaluator actor is scoring batch "
                            f"{self.mid} of this session; none of its rows stored")
