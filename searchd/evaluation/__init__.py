"""Scoring of candidate schedules: feature networks, mergeable statistics, Frechet distance,
reference statistics, KID / IS / sFID, population-batched evaluation and held-out scoring.

Decisions are recorded in docs/notes-eval.md.

The names below are imported on first use (PEP 562), not with the package: a process that
needs only ``CandidateResult`` (``searchd.evaluation.result``), such as a Ray Tune trial
that passes results on, must not import torch through this package. As before, the
package's attribute ``evaluate`` is the function ``searchd.evaluation.evaluate.evaluate``,
not the submodule of that name (``_Package``).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from searchd.evaluation.evaluate import METRICS, Evaluator, evaluate
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
    "evaluate",
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
    return sorted({*globals(), *_WHERE, "evaluate"})


class _Package(types.ModuleType):
    """This package's module type. Its ``evaluate`` is the function of the submodule of the
    same name, imported on first use; the import system's binding of the submodule to that
    attribute (when anything imports ``searchd.evaluation.evaluate``) is ignored, so that the
    attribute stays the function, as when this package imported it eagerly."""

    @property
    def evaluate(self) -> Any:
        return importlib.import_module(f"{__name__}.evaluate").evaluate

    @evaluate.setter
    def evaluate(self, value: Any) -> None:
        pass


sys.modules[__name__].__class__ = _Package
