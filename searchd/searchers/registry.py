"""The searcher registry: algorithm name -> searcher class, the one source of the names.

The configuration validates ``search.algorithm`` against ``SEARCHERS`` without importing the
searchers themselves (the evolution's pre-screen needs torch, Bayes needs Optuna): each
entry names its class as ``"module:Class"`` and ``searcher_class`` imports it on first use.
"""

from __future__ import annotations

import importlib

from searchd.searchers.base import ScheduleSearcher

SEARCHERS: dict[str, str] = {
    "evolution": "searchd.searchers.evolution:EvolutionSearcher",
    "random": "searchd.searchers.random_search:RandomSearcher",
    "bayes": "searchd.searchers.bayes:BayesSearcher",
    "gits": "searchd.searchers.precomputed:GitsSearcher",
    "ld3": "searchd.searchers.precomputed:Ld3Searcher",
    "adaptive": "searchd.searchers.precomputed:AdaptiveSearcher",
}


def searcher_class(name: str) -> type[ScheduleSearcher]:
    """The class of algorithm ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in SEARCHERS:
        raise ValueError(f"unknown search algorithm {name!r}; known: {', '.join(SEARCHERS)}")
    module, _, cls = SEARCHERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
