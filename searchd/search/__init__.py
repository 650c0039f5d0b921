"""Searchers (evolution, random, bayes) and the Ray Tune glue.

Names are imported lazily, so that importing one submodule (the driver's, the batching
wrapper's) does not pull in Optuna or every searcher.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ScheduleSearcher": "searchd.search.base",
    "EvolutionSearcher": "searchd.search.evolution",
    "RandomSearcher": "searchd.search.random_search",
    "BayesSearcher": "searchd.search.bayes",
    "SEARCHERS": "searchd.search.registry",
    "make_searcher": "searchd.search.registry",
    "make_space": "searchd.search.registry",
    "make_baselines": "searchd.search.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'searchd.search' has no attribute {name!r}")
