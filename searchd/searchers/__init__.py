"""Searchers: ask/tell over plain data, one candidate per key, state as plain JSON.

- ``ScheduleSearcher`` (``base``): the shared bookkeeping and the protocol;
- ``EvolutionSearcher`` (O2TDM/AutoDiffusion, with OMS-DPM's pre-screen), ``RandomSearcher``,
  ``BayesSearcher`` (Optuna TPE/GP), and ``GitsSearcher``/``Ld3Searcher``/
  ``AdaptiveSearcher`` (``precomputed``: a schedule computed before the search, then the
  baselines);
- ``SEARCHERS`` (``registry``): algorithm name -> class, the one source of the names.

Searchers know nothing of Ray, Tune, Parquet or the models; ``searchd.loop`` runs them.
Names are imported lazily (the evolution needs torch, Bayes needs Optuna).
"""

from __future__ import annotations

import importlib
from typing import Any

from searchd.searchers.base import FINISHED, ScheduleSearcher
from searchd.searchers.registry import SEARCHERS, searcher_class

_LAZY = {
    "EvolutionSearcher": "searchd.searchers.evolution",
    "RandomSearcher": "searchd.searchers.random_search",
    "BayesSearcher": "searchd.searchers.bayes",
    "PrecomputedSearcher": "searchd.searchers.precomputed",
    "GitsSearcher": "searchd.searchers.precomputed",
    "Ld3Searcher": "searchd.searchers.precomputed",
    "AdaptiveSearcher": "searchd.searchers.precomputed",
}

__all__ = ["FINISHED", "SEARCHERS", "ScheduleSearcher", "searcher_class", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'searchd.searchers' has no attribute {name!r}")
