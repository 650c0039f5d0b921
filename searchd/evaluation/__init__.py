"""Scoring of candidate schedules: feature networks, mergeable statistics, Frechet distance,
reference statistics, KID / IS / sFID, population-batched evaluation and held-out scoring.

Decisions are recorded in docs/notes-eval.md.

The names below are imported on first use (PEP 562), not with the package: a process that
needs only ``CandidateResult`` (``searchd.evaluation.result``), such as a Ray Tune trial
that passes results on, must not import torch through this package. The function
``evaluate`` is ``searchd.evaluation.evaluate.evaluate`` (``searchd.evaluation.evaluate`` is
the submodule).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from searchd.evaluation.evaluate import METRICS, Evaluator
    from searchd.evaluation.features import FEATURES, FeatureNetwork, load_features
    from searchd.evaluation.frechet import (
        FrechetReference,
        frechet_distance,
        frechet_distance_fast,
    )
    from searchd.evaluation.heldout import HeldoutScore, bootstrap_fid, heldout_scores
    from searchd.evaluation.metrics import KIDReference, inception_score, kid, mmd2_unbiased
    from searchd.evaluation.reference import (
        ReferenceStats,
        compute_reference,
        exact_reference,
        reference_name,
    )
    from searchd.evaluation.result import CandidateResult
    from searchd.evaluation.stats import FeatureStats
    from searchd.evaluation.teacher import TeacherCache, TeacherSettings

# Public name -> the submodule that defines it.
_WHERE = {
    "METRICS": "evaluate", "Evaluator": "evaluate",
    "CandidateResult": "result",
    "FEATURES": "features", "FeatureNetwork": "features", "load_features": "features",
    "FrechetReference": "frechet", "frechet_distance": "frechet",
    "frechet_distance_fast": "frechet",
    "HeldoutScore": "heldout", "bootstrap_fid": "heldout", "heldout_scores": "heldout",
    "KIDReference": "metrics", "inception_score": "metrics", "kid": "metrics",
    "mmd2_unbiased": "metrics",
    "ReferenceStats": "reference", "compute_reference": "reference",
    "exact_reference": "reference", "reference_name": "reference",
    "FeatureStats": "stats",
    "TeacherCache": "teacher", "TeacherSettings": "teacher",
}

__all__ = [
    "FEATURES",
    "METRICS",
    "CandidateResult",
    "Evaluator",
    "FeatureNetwork",
    "FeatureStats",
    "FrechetReference",
    "HeldoutScore",
    "KIDReference",
    "ReferenceStats",
    "TeacherCache",
    "TeacherSettings",
    "bootstrap_fid",
    "compute_reference",
    "exact_reference",
    "frechet_distance",
    "frechet_distance_fast",
    "heldout_scores",
    "inception_score",
    "kid",
    "load_features",
    "mmd2_unbiased",
    "reference_name",
]


def __getattr__(name: str) -> Any:
    """A public name, or a submodule, imported on first use."""
    where = _WHERE.get(name)
    if where is None:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
