"""Scoring of candidate schedules: feature networks, mergeable statistics, Frechet distance,
reference statistics, KID / IS / sFID, population-batched evaluation and held-out scoring.

Decisions are recorded in docs/notes-eval.md.
"""

from searchd.evaluation.evaluate import METRICS, CandidateResult, Evaluator, evaluate
from searchd.evaluation.features import FEATURES, FeatureNetwork, load_features
from searchd.evaluation.frechet import FrechetReference, frechet_distance, frechet_distance_fast
from searchd.evaluation.heldout import HeldoutScore, bootstrap_fid, heldout_scores
from searchd.evaluation.metrics import KIDReference, inception_score, kid, mmd2_unbiased
from searchd.evaluation.reference import (
    ReferenceStats,
    compute_reference,
    exact_reference,
    reference_name,
)
from searchd.evaluation.stats import FeatureStats
from searchd.evaluation.teacher import TeacherCache, TeacherSettings

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
