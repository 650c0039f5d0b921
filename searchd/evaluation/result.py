"""``CandidateResult``: the score of one candidate, as plain data.

A module of its own that imports neither torch nor the evaluator: the results cross
processes that only pass them on (a Ray Tune trial gathers them from the evaluator actors
and reports them to the driver), and unpickling one there must not import torch (1.5-3 s of
a trial's start, measured on the 2-core development machine). ``searchd.evaluation.evaluate``
re-exports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from searchd.evaluation.stats import FeatureStats


def _feature_stats(d: Mapping[str, Any]) -> FeatureStats:
    """``FeatureStats.from_dict`` (imported on use: it needs torch)."""
    from searchd.evaluation.stats import FeatureStats

    return FeatureStats.from_dict(d)


@dataclass
class CandidateResult:
    """The score of one candidate: plain data, nothing of Ray or the network.

    Attributes:
        candidate_id: the schedule's content hash.
        status: "ok" or "failed".
        metrics: name -> value ("fid", "kid", "is", "sfid", "teacher_distance").
        nfe: network evaluations per sample (``searchd.solvers.nfe``).
        n_samples: samples scored (the number of seeds).
        seed_base: the first seed (sample i uses seeds[i], normally seed_base + i).
        wall_s: seconds attributed to this candidate (its share of a batched pass, by rows,
            plus its own metric computation).
        samples_per_s: n_samples / wall_s.
        error: why it failed (None when ok).
        stats: the candidate's FeatureStats (for merging across workers), or None.
        worker, node: who scored it (an evaluator actor's name, and ``host/Ray node``);
            empty when scored in-process.

    This is the one record of a scored candidate: the evaluator makes it, an actor adds
    ``worker`` and ``node``, the search loop hands it to the searcher and the recorder, and
    a resumed run reads it back from its Parquet row (``searchd.storage.schema``).
    """

    candidate_id: str
    status: str
    metrics: dict[str, float]
    nfe: int
    n_samples: int
    seed_base: int
    wall_s: float
    samples_per_s: float
    error: str | None = None
    stats: FeatureStats | None = None
    worker: str = ""
    node: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, metric: str) -> float | None:
        """The metric's value when the candidate is ok and it is finite, else None (what a
        searcher is told, and the ``value`` column of its row)."""
        if self.status != "ok":
            return None
        v = self.metrics.get(metric)
        return float(v) if v is not None and math.isfinite(v) else None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``stats`` as ``FeatureStats.to_dict()`` or None)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["metrics"] = {k: float(v) for k, v in self.metrics.items()}
        d["stats"] = None if self.stats is None else self.stats.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CandidateResult:
        stats = d.get("stats")
        return cls(
            candidate_id=str(d["candidate_id"]),
            status=str(d["status"]),
            metrics={str(k): float(v) for k, v in (d.get("metrics") or {}).items()},
            nfe=int(d["nfe"]),
            n_samples=int(d["n_samples"]),
            seed_base=int(d["seed_base"]),
            wall_s=float(d["wall_s"]),
            samples_per_s=float(d["samples_per_s"]),
            error=d.get("error"),
            stats=None if stats is None else _feature_stats(stats),
            worker=str(d.get("worker") or ""),
            node=str(d.get("node") or ""),
        )
