"""``ConditionalEvaluator``: the guidance benchmark's independent scorer of class-conditional
models (``benchmarks/guidance.py``), on ``searchd.evaluation.conditional``'s metrics. A module
of its own so that ``conditional`` stays below ``evaluate`` and ``heldout`` (no import cycle).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.evaluation.conditional import (
    ClassReference,
    GuidanceObjective,
    conditional_metrics,
)
from searchd.evaluation.evaluate import CandidateResult, Evaluator
from searchd.evaluation.features import FeatureNetwork
from searchd.models.conditional import class_labels
from searchd.schedule import Schedule


# The evaluator ----------------------------------------------------------------------------------
class ConditionalEvaluator:
    """Scores schedules of a class-conditional model on the metrics above.

    Args:
        denoiser: a conditional denoiser (``is_conditional``) or a zoo name.
        reference: per-class and pool statistics in the classifier's feature space.
        features: the feature network, which must also give class logits (``digits``).
        objective: a ``GuidanceObjective``, or None (then ``objective`` = ``fid_class``).
        solver, solver_options, batch_size: as ``Evaluator``.

    ``evaluate(candidates, seeds)`` returns ``CandidateResult``s whose metrics hold
    ``fid_class``, ``fid``, ``accuracy``, ``objective``, ``network_calls`` (forward passes
    per sample, guidance counted: ``searchd.solvers.network_calls``) and the per-class FIDs;
    a failing candidate fails alone. Samples come from ``Evaluator.generate`` (one solver run
    per candidate, each row conditioned on its seed's class).
    """

    def __init__(self, denoiser: Any, reference: ClassReference,
                 features: FeatureNetwork | str = "digits", *,
                 objective: GuidanceObjective | None = None, solver: str | None = None,
                 solver_options: Mapping[str, Any] | None = None, batch_size: int = 4096,
                 n_classes: int | None = None) -> None:
        from searchd.models.conditional import is_conditional

        # The plain evaluator (pool FID, population-batched) does the sampling.
        self.evaluator = Evaluator(denoiser, features, reference.pool, metrics=("fid",),
                                   solver=solver, solver_options=solver_options,
                                   batch_size=batch_size)
        self.denoiser = self.evaluator.denoiser
        if not is_conditional(self.denoiser):
            raise ValueError(f"{getattr(self.denoiser, 'name', self.denoiser)!r} is not a "
                             "conditional model; class-conditional metrics need one")
        self.features = self.evaluator.features
        if "logits" not in self.features.outputs:
            raise ValueError(f"feature network {self.features.name!r} has no class logits")
        self.n_classes = int(n_classes or getattr(self.denoiser, "n_classes", None)
                             or self.features.n_classes)
        if reference.n_classes != self.n_classes:
            raise ValueError(f"reference has {reference.n_classes} classes; the model "
                             f"{self.n_classes}")
        reference.check(self.features)
        self.reference = reference
        self.objective = objective

    def with_objective(self, objective: GuidanceObjective | None) -> ConditionalEvaluator:
        """The same evaluator scoring another objective (everything loaded is shared)."""
        other = object.__new__(ConditionalEvaluator)
        other.__dict__.update(self.__dict__)
        other.objective = objective
        return other

    def samples(self, schedule: Schedule, seeds: Sequence[int]) -> Tensor:
        """Samples [n, *shape] of one schedule (row i: seed i's noise and class)."""
        return self.evaluator.generate(schedule, seeds)

    def outputs(self, schedule: Schedule, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Features [n, d] and classifier logits [n, C] of one schedule's samples (CPU)."""
        x = self.samples(schedule, seeds)
        ev = self.evaluator
        images = ev.decode(x) if ev.decode is not None else x.reshape(x.shape[0],
                                                                      *ev.image_shape)
        out = self.features.extract(images.to(self.features.device), ("features", "logits"))
        feats, logits = out["features"].cpu(), out["logits"].cpu()
        if not (torch.isfinite(feats).all() and torch.isfinite(logits).all()):
            bad = int((~torch.isfinite(feats).all(1)).nonzero()[0]) if not torch.isfinite(
                feats).all() else 0
            raise ValueError(f"non-finite features for sample {bad} (seed {seeds[bad]})")
        return feats, logits

    def labels(self, seeds: Sequence[int]) -> np.ndarray:
        """The class asked of each seed, int64 [n]."""
        return class_labels(seeds, self.n_classes)

    def network_calls(self, schedule: Schedule) -> int:
        from searchd.solvers import network_calls

        solver = self.evaluator.solver or schedule.solver
        return network_calls(solver, schedule.n_steps, schedule.final_zero, schedule.guidance,
                             guided=bool(getattr(self.denoiser, "guided", False)))

    def evaluate(self, candidates: Sequence[Schedule | Mapping[str, Any]],
                 seeds: Sequence[int]) -> list[CandidateResult]:
        """Score each candidate on the samples of ``seeds`` (one result each, in order)."""
        from searchd.solvers import nfe

        seeds = [int(s) for s in seeds]
        labels = self.labels(seeds)
        results = []
        for c in candidates:
            t0 = time.perf_counter()
            cid = c.id if isinstance(c, Schedule) else str(dict(c).get("id", "invalid"))
            try:
                s = c if isinstance(c, Schedule) else Schedule.from_dict(c)
                s.check_range(self.denoiser.sigma_min, self.denoiser.sigma_max)
                solver = self.evaluator.solver or s.solver
                cost = nfe(solver, s.n_steps, s.final_zero)
                feats, logits = self.outputs(s, seeds)
                m = conditional_metrics(feats, logits, labels, self.reference)
                m["objective"] = self.objective(m) if self.objective else m["fid_class"]
                m["network_calls"] = float(self.network_calls(s))
                bad = [k for k, v in m.items() if not math.isfinite(v)]
                if bad:
                    raise ValueError(f"non-finite {bad}")
                wall = time.perf_counter() - t0
                results.append(CandidateResult(s.id, "ok", m, cost, len(seeds), seeds[0], wall,
                                               len(seeds) / wall if wall > 0 else math.inf))
            except Exception as e:  # noqa: BLE001 - a failure stays with its candidate
                results.append(CandidateResult(cid, "failed", {}, 0, len(seeds), seeds[0],
                                               time.perf_counter() - t0, 0.0,
                                               f"{type(e).__name__}: {e}"))
        return results
