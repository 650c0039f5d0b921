"""Metrics that score conditioning: class-conditional FID, classifier agreement, an objective.

Layering: this module imports neither ``evaluate`` nor ``heldout`` (both call into it); the
stratified held-out bootstrap (``bootstrap_conditional``, ``heldout_class_part``) lives in
``heldout``, and the benchmark's scorer (``ConditionalEvaluator``) in
``conditional_evaluator``.

FID alone rewards a model that ignores its condition (a perfect unconditional sampler has
the pool's FID). Class-conditional models are scored here on three numbers, each from the
samples of a candidate whose class labels are a function of the seeds (``seed mod C``,
``searchd.models.conditional.class_labels``: every candidate gets the same noise and the
same label per seed, and the classes are balanced):

- ``fid_class``: the mean over classes of the FID of the class's samples against the
  class's reference statistics (how well each conditional distribution is matched);
- ``fid``: the FID of all samples (the class-balanced pool) against the class-balanced
  reference pool;
- ``accuracy``: the fraction of samples that the classifier (the digits network's 10-way
  head, standing in for CLIP score) assigns to the requested class.

Statistics are mergeable (``ClassStats``: a ``FeatureStats`` per class and counts of correct
predictions, float64 sums), like every other statistic of searchd.

**The objective** (``GuidanceObjective``) chosen for searches over guidance: FID subject to a
floor on accuracy, ``fid_class + penalty * max(0, floor - accuracy)``, the floor being the
accuracy of a reference schedule (constant guidance at the model's usual scale) measured on
the same seeds, and the penalty ``penalty_per_point`` times that reference's ``fid_class``
per percentage point below the floor. Why a constraint and not a weighted sum: the user's
question is "the best distribution match that follows the condition at least as well as
what I use today"; a weighted sum needs an exchange rate between FID and accuracy that
means nothing to a user and changes with the feature space, while the floor is in the
user's own terms. The penalty (not a hard rejection) keeps the landscape informative for
TPE and the evolution near the boundary; at the default (one reference-FID per point) a
schedule one point below the floor needs a FID better than the reference's by 100% to win,
which is impossible, so feasible schedules always rank first. The search's threshold is the
floor plus a margin (``floor_margin``, default one standard error of the floor's accuracy at
the search's sample count): a search that selects by FID among candidates at the floor keeps
those whose accuracy was estimated high, and they fall below the floor on held-out seeds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.evaluation.features import FeatureNetwork
from searchd.evaluation.frechet import FrechetReference
from searchd.evaluation.reference import ReferenceStats
from searchd.evaluation.stats import FeatureStats
from searchd.models.conditional import class_labels
from searchd.schedule import Schedule

CONDITIONAL_METRICS = ("fid_class", "fid", "accuracy", "objective", "network_calls")


# Reference ----------------------------------------------------------------------------------
@dataclass
class ClassReference:
    """Reference statistics of each class and of the class-balanced pool, in one feature
    space.

    Attributes:
        classes: one ``ReferenceStats`` per class, in class order.
        pool: the class-balanced pool's (equal numbers per class, or as given).
    """

    classes: list[ReferenceStats]
    pool: ReferenceStats
    _frechet: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def from_features(
        cls, features: Tensor | np.ndarray, labels: Sequence[int] | np.ndarray, n_classes: int,
        meta: Mapping[str, Any] | None = None,
    ) -> ClassReference:
        """From per-sample features [n, d] of labelled reference images (labels [n])."""
        f = torch.as_tensor(features).to(torch.float64)
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        if y.shape != (f.shape[0],):
            raise ValueError(f"{y.shape[0]} labels for {f.shape[0]} feature rows")
        refs = []
        for c in range(n_classes):
            fc = f[y == c]
            if fc.shape[0] < 2:
                raise ValueError(f"class {c} has {fc.shape[0]} reference samples; need >= 2")
            refs.append(ReferenceStats.from_stats(FeatureStats.from_features(fc),
                                                  {**dict(meta or {}), "class": c}))
        pool = ReferenceStats.from_stats(FeatureStats.from_features(f),
                                         {**dict(meta or {}), "class": "pool"})
        return cls(refs, pool)

    def frechet(self, device: str | torch.device = "cpu"
                ) -> tuple[list[FrechetReference], FrechetReference]:
        """Fast-path references of each class and of the pool (factored once, cached)."""
        key = str(device)
        if key not in self._frechet:
            self._frechet[key] = ([r.frechet(device) for r in self.classes],
                                  self.pool.frechet(device))
        return self._frechet[key]

    def check(self, network: FeatureNetwork) -> None:
        """Refuse statistics of another feature space (``ReferenceStats.check``)."""
        self.pool.check(network)
        for r in self.classes:
            r.check(network)

    def save(self, path: str | Path) -> Path:
        """One ``.npz``: ``mu`` [C+1, d], ``sigma`` [C+1, d, d] (classes, then the pool)."""
        import os

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ClassReference:
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())

    def to_bytes(self) -> bytes:
        """The ``.npz`` file's content (``save``'s format), for a run directory's storage."""
        import io
        import json

        refs = [*self.classes, self.pool]
        buf = io.BytesIO()
        np.savez(buf, mu=np.stack([r.mu for r in refs]), sigma=np.stack([r.sigma for r in refs]),
                 n=np.asarray([-1 if r.n is None else r.n for r in refs], dtype=np.int64),
                 meta=np.asarray(json.dumps(self.pool.meta, sort_keys=True)))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClassReference:
        """Inverse of ``to_bytes`` (a file ``save`` wrote)."""
        import io
        import json

        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if not {"mu", "sigma", "n", "meta"} <= set(z.files) or z["mu"].ndim != 2:
                raise ValueError("not a class reference (an .npz with mu [C+1, d], sigma "
                                 "[C+1, d, d], n and meta, as ClassReference.save writes)")
            mu, sigma, n = z["mu"], z["sigma"], z["n"]
            meta = json.loads(str(z["meta"]))
        refs = [ReferenceStats(mu[i], sigma[i], int(n[i]) if n[i] >= 0 else None,
                               {**meta, "class": i}) for i in range(mu.shape[0] - 1)]
        pool = ReferenceStats(mu[-1], sigma[-1], int(n[-1]) if n[-1] >= 0 else None, meta)
        return cls(refs, pool)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``kind: "class"``; the statistics as ``ReferenceStats.to_dict()``):
        what a run hands its evaluators, like a plain reference's dict."""
        return {"kind": "class", "classes": [r.to_dict() for r in self.classes],
                "pool": self.pool.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassReference:
        """Inverse of ``to_dict`` (extra keys, e.g. ``objective``, are ignored)."""
        return cls([ReferenceStats.from_dict(r) for r in d["classes"]],
                   ReferenceStats.from_dict(d["pool"]))


def exact_class_reference(
    denoiser: Any, network: FeatureNetwork, seeds: Sequence[int] | range, n_classes: int,
    *, batch_size: int = 2048,
) -> ClassReference:
    """Per-class and pooled reference statistics of a conditional model's exact samples
    (``sample_data``: seed s is a sample of class ``s mod C``; use seeds disjoint from the
    noise seeds and a multiple of C of them for an exactly balanced pool)."""
    sample = getattr(denoiser, "sample_data", None)
    if sample is None:
        raise ValueError(f"{denoiser!r} has no exact samples (no sample_data)")
    seeds = [int(s) for s in seeds]
    feats = []
    for a in range(0, len(seeds), batch_size):
        x = sample(seeds[a : a + batch_size]).to(torch.float32)
        feats.append(network(x.reshape(x.shape[0], *_image_shape(x)).to(network.device)).cpu())
    meta = {"features": network.info["features"], "mode": network.info["mode"],
            "dim": network.info["dim"], "source": f"{getattr(denoiser, 'name', 'model')}-exact",
            "seed_base": seeds[0] if seeds else None, "count": len(seeds)}
    return ClassReference.from_features(torch.cat(feats), class_labels(seeds, n_classes),
                                        n_classes, meta)


def _image_shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape[1:]) if x.ndim == 4 else (1, *x.shape[1:])


# Mergeable statistics -----------------------------------------------------------------------
@dataclass
class ClassStats:
    """A candidate's samples per class: features' ``FeatureStats`` and classifier hits.

    Attributes:
        stats: one ``FeatureStats`` per class.
        correct: samples of each class the classifier assigned to it, int64 [C].
    """

    stats: list[FeatureStats]
    correct: np.ndarray

    @classmethod
    def zeros(cls, n_classes: int, dim: int) -> ClassStats:
        return cls([FeatureStats.zeros(dim) for _ in range(n_classes)],
                   np.zeros(n_classes, dtype=np.int64))

    def add(self, features: Tensor, logits: Tensor, labels: Tensor | np.ndarray) -> ClassStats:
        """Add samples: features [n, d], classifier logits [n, C], requested labels [n]."""
        y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        hit = (logits.argmax(1).cpu() == y)
        for c in range(len(self.stats)):
            sel = (y == c).nonzero().squeeze(1)
            if sel.numel():
                self.stats[c].add(features[sel.to(features.device)])
                self.correct[c] += int(hit[sel].sum())
        return self

    def merge(self, other: ClassStats) -> ClassStats:
        """Add another part's statistics (disjoint samples) in place; returns self."""
        if len(other.stats) != len(self.stats):
            raise ValueError(f"cannot merge {len(other.stats)} classes into {len(self.stats)}")
        self.stats = [s.merge(o) for s, o in zip(self.stats, other.stats)]
        self.correct = self.correct + other.correct
        return self

    @property
    def counts(self) -> np.ndarray:
        return np.asarray([s.n for s in self.stats], dtype=np.int64)

    def metrics(self, reference: ClassReference) -> dict[str, float]:
        """``fid_class`` (mean per-class FID), ``fid`` (pool), ``accuracy``, and
        ``fid_class_<c>`` per class."""
        per_class, pool = reference.frechet()
        fids = [float(ref(s)) for ref, s in zip(per_class, self.stats)]
        pooled = FeatureStats.merge_all(self.stats)
        out = {"fid_class": float(np.mean(fids)), "fid": float(pool(pooled)),
               "accuracy": float(self.correct.sum() / max(1, self.counts.sum()))}
        out.update({f"fid_class_{c}": v for c, v in enumerate(fids)})
        return out


def conditional_metrics(features: Tensor, logits: Tensor, labels: Sequence[int] | np.ndarray,
                        reference: ClassReference) -> dict[str, float]:
    """The class-conditional metrics of one candidate's samples (see ``ClassStats``)."""
    st = ClassStats.zeros(reference.n_classes, features.shape[1])
    return st.add(features, logits, labels).metrics(reference)


# Paired bootstrap -----------------------------------------------------------------------------
def stratified_counts(labels: Sequence[int] | np.ndarray, resamples: int, seed: int = 0
                      ) -> Tensor:
    """Bootstrap counts [resamples, n] (float64) drawn within each class: the labels are
    fixed by the seeds (a design, not a random draw), so each class keeps its size in every
    resample. Shared by all schedules of a comparison, the resamples are paired."""
    y = np.asarray(labels, dtype=np.int64)
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(resamples, y.size, dtype=torch.float64)
    for c in np.unique(y):
        idx = torch.as_tensor(np.flatnonzero(y == c))
        draw = torch.randint(0, idx.numel(), (resamples, idx.numel()), generator=g)
        sub = torch.zeros(resamples, idx.numel(), dtype=torch.float64)
        sub.scatter_add_(1, draw, torch.ones_like(draw, dtype=torch.float64))
        counts[:, idx] = sub
    return counts


# The objective ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GuidanceObjective:
    """``fid_class + penalty * max(0, floor - accuracy)`` (see the module docstring).

    Attributes:
        floor: the accuracy to keep (that of the reference schedule on the same seeds).
        reference_fid: the reference schedule's ``fid_class`` (sets the penalty's scale).
        penalty_per_point: reference-FIDs of penalty per percentage point below the floor.
        margin: added to the floor (accuracy points as a fraction, e.g. 0.005).
    """

    floor: float
    reference_fid: float
    penalty_per_point: float = 1.0
    margin: float = 0.0

    def __post_init__(self) -> None:
        for k in ("floor", "reference_fid", "penalty_per_point", "margin"):
            v = getattr(self, k)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"objective {k} = {v!r}; it must be finite and >= 0")

    def __call__(self, metrics: Mapping[str, float]) -> float:
        short = max(0.0, self.floor + self.margin - float(metrics["accuracy"]))
        return float(metrics["fid_class"]) + self.penalty_per_point * self.reference_fid * (
            100.0 * short)

    def describe(self) -> dict[str, Any]:
        """What the run records about its objective."""
        return {"kind": "fid_class subject to accuracy >= floor (exact penalty)",
                "formula": "fid_class + penalty_per_point * reference_fid * 100 * "
                           "max(0, floor + margin - accuracy)",
                "floor": self.floor, "reference_fid": self.reference_fid,
                "penalty_per_point": self.penalty_per_point, "margin": self.margin}


# The run's metric: metric.name class_fid ------------------------------------------------------
RUN_METRIC = "class_fid"
OBJECTIVE_FILE = "objective.json"


def is_class_reference(reference: Any) -> bool:
    """Whether a run's reference (plain data) is a ``ClassReference.to_dict()``."""
    return isinstance(reference, Mapping) and reference.get("kind") == "class"


def reference_to_bytes(reference: Mapping[str, Any]) -> bytes:
    """The run directory's ``reference.npz`` of a plain or class reference (plain data)."""
    if is_class_reference(reference):
        return ClassReference.from_dict(reference).to_bytes()
    return ReferenceStats.from_dict(reference).to_bytes()


def check_reference(reference: Mapping[str, Any], features: Any) -> None:
    """``ReferenceStats.check`` of a plain or class reference (plain data) against a feature
    network or its info dict (``ValueError``, one line)."""
    if is_class_reference(reference):
        ref = ClassReference.from_dict(reference)
        for r in (*ref.classes, ref.pool):
            r.check(features)
    else:
        ReferenceStats.from_dict(reference).check(features)


def objective_from_dict(d: Mapping[str, Any] | None) -> GuidanceObjective | None:
    """The ``GuidanceObjective`` a run recorded (``objective.json``, ``resolve_objective``),
    or None when it has no accuracy floor (the value is then ``fid_class``)."""
    if not d or d.get("floor") is None:
        return None
    return GuidanceObjective(floor=float(d["floor"]), reference_fid=float(d["reference_fid"]),
                             penalty_per_point=float(d["penalty_per_point"]),
                             margin=float(d.get("margin", 0.0)))


# The default floor margin: one standard error of the floor's accuracy at the search's sample
# count (benchmarks/results/guidance.md, "Under an accuracy floor, with a margin": without a
# margin the searched winners sit on the floor on the search seeds and fall below it held
# out; with 1se their held-out accuracy rose at no cost in class FID).
DEFAULT_FLOOR_MARGIN = "1se"
MARGIN_SE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*se\s*$")


def floor_margin(spec: float | str, floor: float, samples: int | None) -> float:
    """The margin added to an accuracy floor, from ``metric.options.floor_margin``.

    ``spec`` is a number (the margin itself, an accuracy fraction) or ``"<k>se"``: k binomial
    standard errors of an accuracy equal to the floor measured on ``samples`` samples,
    ``k * sqrt(floor * (1 - floor) / samples)``. Why a margin at all: a search keeps the
    candidates with the lowest class FID among those whose accuracy, estimated on the
    search seeds, clears the floor; near the floor it keeps those whose accuracy was
    estimated high, and their held-out accuracy falls below the floor (the winner's curse).

    Raises:
        ValueError: a spec that is neither, or ``"<k>se"`` without a sample count.
    """
    if isinstance(spec, str):
        m = MARGIN_SE.match(spec)
        if not m:
            raise ValueError(f"metric.options.floor_margin: got {spec!r}; give a number >= 0 "
                             "or '<k>se' (k standard errors of the floor's accuracy)")
        if not samples or samples < 1:
            raise ValueError(f"metric.options.floor_margin: {spec!r} needs the search's sample "
                             f"count; got {samples!r}")
        p = min(max(float(floor), 0.0), 1.0)
        return float(m.group(1)) * math.sqrt(p * (1.0 - p) / samples)
    v = float(spec)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"metric.options.floor_margin: got {spec!r}; it must be >= 0")
    return v


def resolve_objective(options: Mapping[str, Any], baselines: Mapping[str, Schedule],
                      score: Any, samples: int | None = None) -> dict[str, Any]:
    """What a ``class_fid`` run records about its objective (``objective.json``,
    best.json's ``search.objective``), with the floor resolved to a number.

    ``options`` is ``metric.options``: ``accuracy_floor`` (None: no floor; a number in
    [0, 1]: absolute; a baseline's name: that baseline's accuracy on the search seeds),
    ``floor_margin`` (added to the floor: a number, or ``"<k>se"``, k standard errors of
    the floor's accuracy on ``samples`` search samples, see ``floor_margin``; default
    ``DEFAULT_FLOOR_MARGIN``),
    ``penalty_per_point`` (penalty per accuracy
    percentage point below the floor, in class-FID units for an absolute floor, in units of
    the named baseline's class FID for a baseline's floor). ``score(schedule)`` scores one
    schedule on the search seeds (a ``CandidateResult`` with ``accuracy`` and
    ``fid_class``).

    Raises:
        ValueError: a baseline name the run does not have, the baseline failed, or a bad
            ``floor_margin``.
    """
    floor = options.get("accuracy_floor")
    margin_spec = options.get("floor_margin", DEFAULT_FLOOR_MARGIN)
    penalty = float(options.get("penalty_per_point", 1.0))
    if floor is None:
        return {"metric": RUN_METRIC, "kind": "fid_class (mean over classes of per-class FID), "
                "no accuracy floor", "formula": "fid_class", "floor": None}
    if isinstance(floor, str):
        if floor not in baselines:
            raise ValueError(f"metric.options.accuracy_floor: got {floor!r}; the run's "
                             f"baselines are {', '.join(map(repr, baselines))} (or give a "
                             "number in [0, 1])")
        r = score(baselines[floor])
        if not r.ok:
            raise ValueError(f"metric.options.accuracy_floor: the baseline {floor!r} failed on "
                             f"the search seeds: {r.error}")
        value, scale, source = float(r.metrics["accuracy"]), float(r.metrics["fid_class"]), floor
    else:
        value, scale, source = float(floor), 1.0, "absolute"
    obj = GuidanceObjective(floor=value, reference_fid=scale, penalty_per_point=penalty,
                            margin=floor_margin(margin_spec, value, samples))
    out = {"metric": RUN_METRIC, **obj.describe(), "floor_from": source}
    if isinstance(margin_spec, str):
        out["margin_from"] = f"{margin_spec.strip()} at {samples} search samples"
    return out


def class_metrics(evaluator: Any, schedule: Schedule, features: Tensor, logits: Tensor,
                  seeds: Sequence[int]) -> dict[str, float]:
    """A ``class_fid`` run's metrics of one candidate from its per-sample features [n, d]
    and classifier logits [n, C] (row i: seed i): ``fid_class``, ``accuracy``, the
    per-class ``fid_class_<c>``, ``class_fid`` (the searched value: the objective, which
    is ``fid_class`` without a floor), ``objective_penalty`` (``class_fid - fid_class``)
    and ``network_calls`` (forward passes per sample, guidance counted). The pool FID is
    the evaluator's ``fid`` (its reference is the class-balanced pool)."""
    from searchd.solvers import network_calls

    ref: ClassReference = evaluator.class_reference
    m = conditional_metrics(features, logits, class_labels(seeds, ref.n_classes), ref)
    m.pop("fid")  # the evaluator's own fid, on the same samples and reference
    objective = evaluator.objective
    m[RUN_METRIC] = objective(m) if objective is not None else m["fid_class"]
    m["objective_penalty"] = m[RUN_METRIC] - m["fid_class"]
    solver = evaluator.solver or schedule.solver
    m["network_calls"] = float(network_calls(
        solver, schedule.n_steps, schedule.final_zero, schedule.guidance,
        guided=bool(getattr(evaluator.denoiser, "guided", False))))
    return m


def check_class_run(cfg: Any, facts: Mapping[str, Any]) -> str | None:
    """Why a run's configuration cannot use ``class_fid`` on this model (one line), or None:
    the model must be class-conditional with as many classes as the classifier has, and
    the search, held-out and exact-reference sample counts multiples of the class count
    (every class equally often)."""
    name = facts.get("name")
    if not facts.get("conditional") or not facts.get("n_classes"):
        return (f"metric.name: got 'class_fid'; the model {name!r} is not class-conditional "
                "(class_fid scores each sample against the class its seed asks for: e.g. "
                "gmm-digits-cond, digits-unet-cond-s)")
    c = int(facts["n_classes"])
    k = facts.get("classifier_classes")
    if k is None or int(k) != c:
        return (f"metric.name: got 'class_fid'; the model {name!r} has {c} classes, the "
                f"classifier of features {facts['features'].get('features')!r} has "
                f"{k or 'none'}")
    counts = [("samples.per_candidate", cfg.samples.per_candidate),
              ("samples.heldout", cfg.samples.heldout)]
    if cfg.metric.exact_reference is not None:
        counts.append(("metric.reference", cfg.metric.exact_reference))
    rungs = int(getattr(getattr(cfg.search, "halving", None), "rungs", 1) or 1)
    if rungs > 1:  # successive halving scores blocks of per_candidate // rungs seeds
        counts.append(("samples.per_candidate / search.halving.rungs",
                       cfg.samples.per_candidate // rungs))
    for key, n in counts:
        if n % c:
            return (f"{key}: got {n}; class_fid needs a multiple of the model's {c} classes "
                    "(each class equally often)")
    return None
