"""The search loop, Ray-free: searchers asked and told, candidates scored through a protocol,
every result recorded; and the stages of a run around it.

- ``SearchLoop`` (``loop``): ask / score / record / tell over one searcher; ``run(scorer)``
  in-process.
- ``Scorer`` / ``Workers`` (``scoring``): the scoring protocol ``score(schedules, seeds) ->
  results`` and what a run asks of the loaded models; ``EvaluatorScorer`` in-process.
- ``Recorder`` (``recorder``): each batch's rows to Parquet, the searcher's state, progress.
- ``to_row`` / ``from_row`` (``record``): the one result record and its Parquet row.
- ``EvaluatorFactory`` / ``EvaluatorHost`` (``factory``): the models loaded once per
  evaluator.
- the run: ``runs`` (run directories), ``checks`` (before anything starts), ``plan``
  (configuration -> space, baselines, searcher, anchors), ``stages`` (setup, search,
  finish), ``finish``, ``adaptive``, ``local`` (the in-process engine), ``hooks`` (fault
  injection).

Names are imported on first use: ``searchd.loop.runs`` (what the report and ``open_run``
need) must not pull in torch through the loop and the evaluator.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Batch": "searchd.loop.loop", "LoopOutcome": "searchd.loop.loop",
    "SearchLoop": "searchd.loop.loop", "Progress": "searchd.loop.recorder",
    "Recorder": "searchd.loop.recorder", "EvaluatorScorer": "searchd.loop.scoring",
    "Scorer": "searchd.loop.scoring", "Workers": "searchd.loop.scoring",
}

__all__ = ["Batch", "EvaluatorScorer", "LoopOutcome", "Progress", "Recorder", "Scorer",
           "SearchLoop", "Workers"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'searchd.loop' has no attribute {name!r}")
