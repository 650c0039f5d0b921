"""Held-out scoring: FID (or teacher distance) with bootstrap confidence intervals, and
paired differences.

The winner and the baselines of a search are re-scored on seeds the search never saw. Each
FID gets a bootstrap 95% interval: sample indices are resampled with replacement, the
generated statistics recomputed from the per-sample features (the reference stays fixed),
and the interval read from the quantiles of the resampled FIDs (``bootstrap_interval``: by
default centered on the estimate, since FID's bias makes plain percentiles unreliable). The
difference of each schedule to a baseline uses the same resampled indices for both (all
schedules share the noise of each seed), so its interval is that of a paired comparison.

The bootstrap is vectorized. With ``B`` the reference's factor (``B B^T = S_ref``) and
``G = F B`` (F the per-sample features [n, d]), the matrix whose eigenvalues give
``tr sqrt(S_b S_ref)`` for a resample with counts ``c`` is
``(G^T diag(c) G - n m m^T) / (n - 1)`` with ``m = G^T c / n``: one weighted Gram matrix per
resample (``weighted_grams``: on the CPU the resample counts times the per-sample outer
products, one large matrix product, the resample's deviation from the whole set in float32;
on a GPU batched matmuls) and one batched ``eigvalsh``, the rest float64.

Without reference statistics (a teacher_distance search, e.g. Stable Diffusion without
reference images) the table scores the teacher distance instead: the mean over held-out
samples of each sample's distance to the teacher's sample of the same seed
(``Evaluator.per_sample_teacher_distances``), a resample's value the mean under its counts,
with the same resample indices for every schedule, so differences are paired as for FID.
An evaluator with both a reference and a teacher gives the FID table, each row also carrying
the teacher distance (``teacher_distance``, ``teacher_distance_ci``, ``teacher_distance_diff``,
``teacher_distance_diff_ci``): the teacher's held-out samples are made for the table anyway.
The table's ``metric`` names its metric; its rows hold ``<metric>`` and ``<metric>_ci``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.evaluation.conditional import (
    ClassReference,
    conditional_metrics,
    stratified_counts,
)
from searchd.evaluation.frechet import FrechetReference, eigvalsh
from searchd.models.conditional import class_labels
from searchd.schedule import Schedule

DEFAULT_RESAMPLES = 500
# Resamples per batched Gram matrix (bounds memory: chunk * n * d float64 values).
_CHUNK_ELEMENTS = 1 << 24
# Packed outer products (CPU, d <= _PACKED_MAX_DIM): values of the packed Gram matrices of a
# chunk of resamples, and of the outer products of a block of samples (float64).
_PACKED_MAX_DIM = 256
_PACKED_ELEMENTS = 1 << 25
_OUTER_ELEMENTS = 1 << 22
# Samples from which the packed path sums the resample's deviation in float32
# (``_deviation_grams``): its rounding is about 1e-7 / sqrt(n) of the Gram's entries when the
# resampled covariance is well conditioned (n well above d). Below, all float64: a
# class-stratified bootstrap with a few samples per class has near-singular covariances,
# whose square roots turn float32's rounding into visible differences.
_MIXED_MIN_SAMPLES = 4096


def _float64(values: Tensor | np.ndarray | Sequence[float]) -> Tensor:
    """``values`` as a float64 tensor of its own. Bootstrap values that crossed Ray's object
    store arrive as read-only NumPy views, which ``torch.as_tensor`` would share (and warn
    about); a copy is a few KiB."""
    if isinstance(values, Tensor):
        return values.to(torch.float64)
    return torch.from_numpy(np.array(values, dtype=np.float64))


def bootstrap_counts(n: int, resamples: int, seed: int = 0) -> Tensor:
    """Multinomial counts [resamples, n] (float64): how often each sample index is drawn
    when n indices are drawn with replacement, per resample (seeded)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    counts = torch.zeros(resamples, n, dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return counts


def bootstrap_fid(
    features: Tensor | np.ndarray, reference: FrechetReference, counts: Tensor
) -> Tensor:
    """FID of each resample [B] of per-sample features [n, d] against a fixed reference.

    Args:
        features: per-sample features [n, d].
        reference: the fast-path reference (its factor is reused).
        counts: resample counts [B, n] (``bootstrap_counts``); each row sums to n.
    """
    dev = reference.device
    f = torch.as_tensor(features).to(dev, torch.float64)
    n, d = f.shape
    c = counts.to(dev, torch.float64)
    if c.shape[1] != n:
        raise ValueError(f"counts have {c.shape[1]} columns; there are {n} samples")
    g = f @ reference.factor  # [n, d]
    out = []
    chunk = _resample_chunk(g.device, n, d)
    sq_norms = (f * f).sum(1)  # [n]
    for a in range(0, c.shape[0], chunk):
        cb = c[a : a + chunk]  # [b, n]
        mean = cb @ f / n  # [b, d]
        mean_g = cb @ g / n  # [b, d] = R mean
        gram = weighted_grams(g, cb)  # [b, d, d]
        m = (gram - n * mean_g[:, :, None] * mean_g[:, None, :]) / (n - 1)
        ev = eigvalsh(0.5 * (m + m.transpose(1, 2)))
        tr_cross = ev.clamp_min(0).sqrt().sum(1)
        tr_gen = (cb @ sq_norms - n * (mean * mean).sum(1)) / (n - 1)
        diff = mean - reference.mu
        out.append((diff * diff).sum(1) + tr_gen + reference.trace - 2.0 * tr_cross)
    return torch.cat(out).cpu()


def weighted_grams(g: Tensor, counts: Tensor) -> Tensor:
    """``G^T diag(c_b) G`` for every row ``c_b`` of ``counts`` [b, n]; ``g`` [n, d] -> [b, d, d]
    (float64).

    On the CPU with ``d <= 256`` (the digits and pixel feature spaces): resample weights
    applied to per-sample outer products (``_packed_grams``); from ``_MIXED_MIN_SAMPLES``
    samples on, the resample's deviation from the whole set in float32
    (``_deviation_grams``). Otherwise (a GPU, or Inception's d = 2048, where the packed
    products would not fit) one float64 batched product per resample.
    """
    n, d = g.shape
    if not _packed(g.device, d):
        return torch.matmul(g.T, counts[:, :, None] * g)
    if n < _MIXED_MIN_SAMPLES:
        return _packed_grams(g, counts)
    # sum_i c_i g_i g_i^T = G^T G + sum_i w_i g_i g_i^T with w = c - 1 (sum_i w_i = 0), and
    # with g_i = mu + h_i: sum_i w_i g_i g_i^T = sum_i w_i h_i h_i^T + mu s^T + s mu^T,
    # s = sum_i w_i h_i. Only the first term, the resample's deviation, is in float32.
    g = g.to(torch.float64)
    mu = g.mean(0)
    h = g - mu
    w = counts.to(torch.float64) - 1.0
    s = w @ h  # [b, d]
    out = _deviation_grams(h, w)
    out += g.T @ g
    out += mu[None, :, None] * s[:, None, :] + s[:, :, None] * mu[None, None, :]
    return out


def _packed_grams(g: Tensor, counts: Tensor) -> Tensor:
    """``weighted_grams`` in float64: ``counts @ [g_i g_i^T]_i`` with each outer product
    packed to its upper triangle (``d (d + 1) / 2`` values), built for a block of samples at
    a time: one large matrix product per block, half the multiply-adds of the per-resample
    products and far better use of the core."""
    return _packed_products(g, counts, torch.float64)


def _deviation_grams(h: Tensor, w: Tensor) -> Tensor:
    """``sum_i w_bi h_i h_i^T`` for every row of ``w`` [b, n] (``h`` [n, d] centered
    features, ``w`` the resample counts minus one) -> [b, d, d] float64.

    Resample weights applied to per-sample outer products: ``w @ [h_i h_i^T]_i``, each
    outer product packed to its upper triangle (``d (d + 1) / 2`` values), built for a
    block of samples at a time: one large matrix product per block, half the multiply-adds
    of the per-resample products. The products are float32 (``w`` holds small integers,
    exact in float32), each block's sum added to a float64 total: twice the speed of
    float64 on a CPU core. The deviation is about ``1/sqrt(n)`` of the Gram matrix and the
    features are centered, so its rounding is about ``1e-7 / sqrt(n)`` of the Gram's
    entries (n >= ``_MIXED_MIN_SAMPLES``); measured on the quickstart's held-out features
    (n = 10,000, d = 128, 500 resamples): bootstrap FIDs within 2.2e-5 of the float64
    products', the printed intervals unchanged (docs/architecture.md).
    """
    return _packed_products(h, w, torch.float32)


def _packed_products(x: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
    """``sum_i weights_bi x_i x_i^T`` for every row of ``weights`` [b, n]; ``x`` [n, d] ->
    [b, d, d] float64: the packed outer products of a block of samples (upper triangles,
    row by row) times the block's weights, products in ``dtype``, summed in float64 (float64:
    one ``addmm_`` per block; float32: each block's product added to the float64 total)."""
    n, d = x.shape
    iu = torch.triu_indices(d, d)
    size = iu.shape[1]
    acc = torch.zeros(weights.shape[0], size, dtype=torch.float64)
    rows = max(1, _OUTER_ELEMENTS // size)
    outer = torch.empty(min(rows, n), size, dtype=dtype)
    wide = dtype == torch.float64
    part = None if wide else torch.empty(weights.shape[0], size, dtype=dtype)
    xs, ws = (x, weights) if wide else (x.to(dtype), weights.to(dtype))
    for a in range(0, n, rows):
        block = xs[a : a + rows]
        m = block.shape[0]
        # Row j of the block: x_j x_j^T, upper triangle row by row.
        start = 0
        for i in range(d):
            torch.mul(block[:, i : i + 1], block[:, i:], out=outer[:m, start : start + d - i])
            start += d - i
        if part is None:
            acc.addmm_(ws[:, a : a + m], outer[:m])
        else:
            torch.mm(ws[:, a : a + m], outer[:m], out=part)
            acc += part
    out = torch.empty(weights.shape[0], d, d, dtype=torch.float64)
    out[:, iu[0], iu[1]] = acc
    out[:, iu[1], iu[0]] = acc
    return out


def _packed(device: torch.device, d: int) -> bool:
    return device.type == "cpu" and d <= _PACKED_MAX_DIM


def _resample_chunk(device: torch.device, n: int, d: int) -> int:
    """Resamples per call of ``weighted_grams`` (bounds its memory)."""
    if _packed(device, d):
        return max(1, _PACKED_ELEMENTS // (d * (d + 1) // 2))
    return max(1, _CHUNK_ELEMENTS // (n * d))


INTERVALS = ("centered", "basic", "percentile")


def bootstrap_interval(
    values: Tensor | np.ndarray, estimate: float, level: float = 0.95, method: str = "centered"
) -> tuple[float, float]:
    """A ``level`` confidence interval from bootstrap values of a statistic.

    Methods (q are the bootstrap quantiles at (1 - level) / 2 and (1 + level) / 2):

    * ``centered`` (default): the bootstrap distribution shifted so that its mean is the
      estimate, ``estimate + q - mean``: the spread of the statistic at this sample size.
      FID is biased upward by about d / n, and a resample (with its repeated indices) is
      biased once more, so the plain percentile interval can lie entirely above the
      estimate; the centered one always contains it and covers the expected FID at n.
    * ``basic``: ``2 * estimate - q`` (reversed): also subtracts the bootstrap estimate of the
      bias, so it targets the population distance (infinite samples).
    * ``percentile``: ``q`` as it is.
    """
    v = np.asarray(values, dtype=np.float64)
    alpha = (1.0 - level) / 2.0
    lo, hi = (float(q) for q in np.quantile(v, [alpha, 1.0 - alpha]))
    if method == "centered":
        shift = estimate - float(v.mean())
        return lo + shift, hi + shift
    if method == "basic":
        return 2.0 * estimate - hi, 2.0 * estimate - lo
    if method == "percentile":
        return lo, hi
    raise ValueError(f"unknown interval method {method!r}; known: {', '.join(INTERVALS)}")


@dataclass
class HeldoutScore:
    """One schedule's held-out score.

    Attributes:
        candidate_id: the schedule's id.
        status: "ok" or "failed".
        fid: the metric on all held-out samples (``to_dict`` names it after ``metric``).
        fid_ci: bootstrap interval (lo, hi) (``to_dict``: ``<metric>_ci``).
        diff: the value minus the baseline's (0 for the baseline itself).
        diff_ci: paired bootstrap interval of the difference.
        n_samples, seed_base: the held-out samples.
        error: why it failed.
        metric: "fid" or "teacher_distance".
    """

    candidate_id: str
    status: str
    fid: float | None
    fid_ci: tuple[float, float] | None
    diff: float | None
    diff_ci: tuple[float, float] | None
    n_samples: int
    seed_base: int
    error: str | None = None
    metric: str = "fid"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("fid_ci", "diff_ci"):
            d[k] = None if d[k] is None else [float(v) for v in d[k]]
        if self.metric != "fid":
            d[self.metric], d[f"{self.metric}_ci"] = d.pop("fid"), d.pop("fid_ci")
        return d


def check_disjoint(seeds: Sequence[int], search_seeds: Sequence[int] | None) -> None:
    """Refuse held-out seeds that meet the search's seeds (``ValueError``, one line)."""
    if search_seeds is None:
        return
    overlap = {int(s) for s in seeds} & {int(s) for s in search_seeds}
    if overlap:
        raise ValueError(
            f"held-out seeds overlap the search seeds ({len(overlap)} shared, e.g. "
            f"{min(overlap)}); held-out scoring needs a disjoint seed range"
        )


def heldout_scores(
    evaluator: Any,
    schedules: Sequence[Schedule | Mapping[str, Any]],
    seeds: Sequence[int],
    *,
    baseline_index: int = 0,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
    search_seeds: Sequence[int] | None = None,
    interval: str = "centered",
    metric: str | None = None,
) -> dict[str, Any]:
    """Re-score schedules on held-out seeds, with bootstrap intervals and paired differences.

    Args:
        evaluator: an ``Evaluator`` with a reference (FID) or a teacher (teacher distance).
        schedules: the schedules (the winner and the baselines).
        seeds: held-out seeds; must not meet ``search_seeds`` when that is given.
        baseline_index: which schedule the differences are taken against.
        level: confidence level of the intervals.
        resamples: bootstrap resamples.
        bootstrap_seed: seed of the resampling (the same indices for every schedule).
        search_seeds: the search's seeds, to check that the held-out ones are disjoint.
        interval: interval method (``bootstrap_interval``).
        metric: "fid" or "teacher_distance"; None: ``heldout_metric(evaluator)``. With FID
            and a teacher, each row also carries the teacher distance (module docstring).

    Returns:
        ``{"metric", "level", "resamples", "n_samples", "seed_base", "baseline_id",
        "scores": [HeldoutScore.to_dict(), ...]}`` in the order of ``schedules``.
    """
    seeds = [int(s) for s in seeds]
    check_disjoint(seeds, search_seeds)
    if not 0 <= baseline_index < len(schedules):
        raise ValueError(f"baseline_index {baseline_index} is out of range")
    metric = heldout_metric(evaluator) if metric is None else metric
    if metric == "fid_class":
        return combine_parts(heldout_part(evaluator, schedules, seeds, resamples=resamples,
                                          bootstrap_seed=bootstrap_seed),
                             seeds, baseline_index=baseline_index, level=level,
                             resamples=resamples, interval=interval)
    if metric == "teacher_distance" or getattr(evaluator, "teacher", None) is not None:
        return _teacher_heldout(evaluator, schedules, seeds, metric, baseline_index, level,
                                resamples, bootstrap_seed, interval)
    if evaluator.frechet is None:
        raise ValueError("held-out scoring needs an evaluator with reference statistics")
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval method {interval!r}; known: {', '.join(INTERVALS)}")
    results, feats = evaluator.per_sample_features(list(schedules), seeds)
    return scores_from_features(
        evaluator.frechet,
        [f if r.status == "ok" else None for r, f in zip(results, feats)],
        [r.candidate_id for r in results],
        seeds,
        baseline_index=baseline_index,
        level=level,
        resamples=resamples,
        bootstrap_seed=bootstrap_seed,
        interval=interval,
        errors=[r.error for r in results],
    )


def scores_from_features(
    frechet: FrechetReference,
    features: Sequence[Tensor | np.ndarray | None],
    ids: Sequence[str],
    seeds: Sequence[int],
    *,
    baseline_index: int = 0,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
    interval: str = "centered",
    errors: Sequence[str | None] | None = None,
) -> dict[str, Any]:
    """``heldout_scores`` from per-sample features [n, d] already computed (row i: seed i).

    For samplers that are not one ``Schedule`` (per-sample schedules, schedule policies):
    their features on the same seeds are scored, and differenced against the baseline's,
    exactly as ``heldout_scores`` does for schedules. ``None`` marks a failed entry.
    """
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    if not 0 <= baseline_index < len(features):
        raise ValueError(f"baseline_index {baseline_index} is out of range")
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval method {interval!r}; known: {', '.join(INTERVALS)}")
    errors = list(errors) if errors is not None else [None] * len(features)
    counts = bootstrap_counts(n, resamples, bootstrap_seed)
    parts = [score_features(frechet, f, cid, n, counts, err)
             for f, cid, err in zip(features, ids, errors)]
    return combine_parts(parts, seeds, baseline_index=baseline_index, level=level,
                         resamples=resamples, interval=interval)


def score_features(frechet: FrechetReference, features: Tensor | np.ndarray | None,
                   candidate_id: str, n: int, counts: Tensor, error: str | None = None
                   ) -> dict[str, Any]:
    """One schedule's part of held-out scoring: its FID on all samples and the FID of each
    bootstrap resample (``counts`` [B, n]), as plain data that ``combine_parts`` turns into
    intervals and paired differences. ``features`` [n, d] (None: the schedule failed,
    ``error`` says why)."""
    if features is None:
        return {"candidate_id": candidate_id, "status": "failed", "error": error}
    if len(features) != n:
        raise ValueError(f"features have {len(features)} rows; there are {n} seeds")
    return {
        "candidate_id": candidate_id,
        "status": "ok",
        "fid": float(frechet.distance(*_moments(features))),
        "boot": bootstrap_fid(features, frechet, counts).numpy(),
    }


def heldout_part(
    evaluator: Any,
    schedules: Sequence[Schedule | Mapping[str, Any]],
    seeds: Sequence[int],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
) -> list[dict[str, Any]]:
    """``score_features`` of each schedule on the held-out ``seeds``, on one evaluator: the
    share of held-out scoring that one worker of a pool does (the sampling, the features
    and the bootstrap of its schedules). Every part is bitwise what ``heldout_scores``
    computes for that schedule: per-sample features do not depend on which schedules are
    sampled together, and the resample counts depend only on ``(n, resamples,
    bootstrap_seed)``. Join the parts with ``combine_parts``.

    The part's metric is ``heldout_metric(evaluator)``. An evaluator with a teacher also
    puts the teacher distance in each part (``teacher_distance``: the mean of the
    per-sample distances; ``teacher_boot``: ``bootstrap_mean`` on the same counts), from the
    same sampling pass, as ``heldout_scores`` does."""
    metric = heldout_metric(evaluator)
    if metric == "fid_class":  # class_fid: stratified by class (conditional.py)
        return heldout_class_part(evaluator, schedules, seeds, resamples, bootstrap_seed)
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    counts = bootstrap_counts(n, resamples, bootstrap_seed)
    if getattr(evaluator, "teacher", None) is not None:
        results, feats, dists = evaluator.per_sample_teacher_distances(
            list(schedules), seeds, features=metric == "fid")
    else:
        results, feats = evaluator.per_sample_features(list(schedules), seeds)
        dists = [None] * len(results)
    parts = []
    for r, f, d in zip(results, feats, dists):
        ok = r.status == "ok"
        if metric == "fid":
            part = score_features(evaluator.frechet, f if ok else None, r.candidate_id, n,
                                  counts, r.error)
        else:
            part = {"candidate_id": r.candidate_id, "status": "ok" if ok else "failed",
                    "error": r.error}
        part["metric"] = metric
        if ok and d is not None:
            v = torch.as_tensor(d).to(torch.float64).reshape(-1)
            part["teacher_distance"] = float(v.mean())
            part["teacher_boot"] = bootstrap_mean(v, counts).numpy()
        parts.append(part)
    return parts


def combine_parts(
    parts: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    *,
    baseline_index: int = 0,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    interval: str = "centered",
) -> dict[str, Any]:
    """``heldout_scores``' result from each schedule's part (``score_features``, in the
    order of the schedules): the intervals, and the paired differences against
    ``parts[baseline_index]`` (the same resamples for every part)."""
    seeds = [int(s) for s in seeds]
    if not 0 <= baseline_index < len(parts):
        raise ValueError(f"baseline_index {baseline_index} is out of range")
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval method {interval!r}; known: {', '.join(INTERVALS)}")
    ids, errors = [p["candidate_id"] for p in parts], [p.get("error") for p in parts]

    def table(metric: str, value: str, boot: str) -> dict[str, Any]:
        # A part without the value (failed, or made without a teacher) is a failed row.
        ok = [p["status"] == "ok" and value in p for p in parts]
        return paired_table([float(p[value]) if k else None for p, k in zip(parts, ok)],
                            [p[boot] if k else None for p, k in zip(parts, ok)],
                            ids, seeds, errors, metric=metric, baseline_index=baseline_index,
                            level=level, resamples=resamples, interval=interval)

    if parts[0].get("metric", "fid") == "teacher_distance":
        return table("teacher_distance", "teacher_distance", "teacher_boot")
    if parts[0].get("metric") == "fid_class":  # class_fid: pool FID and accuracy beside it
        out = table("fid_class", "fid_class", "boot")
        add_columns(out, table("fid", "fid", "fid_boot"), "fid")
        return add_columns(out, table("accuracy", "accuracy", "accuracy_boot"), "accuracy")
    fid = table("fid", "fid", "boot")
    if any("teacher_boot" in p for p in parts):  # an evaluator with a teacher made the parts
        add_teacher_distance(fid, table("teacher_distance", "teacher_distance", "teacher_boot"))
    return fid


def _moments(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = torch.as_tensor(features).to(torch.float64)
    mu = f.mean(0)
    c = f - mu
    return mu.numpy(), (c.T @ c / (f.shape[0] - 1)).numpy()


# Teacher distance -------------------------------------------------------------------------------
HELDOUT_METRICS = ("fid", "teacher_distance")


def heldout_metric(evaluator: Any) -> str:
    """The metric of an evaluator's held-out table: "fid_class" for the metric class_fid
    (its rows also carry the pool ``fid`` and the ``accuracy``), "fid" when it has
    reference statistics, else "teacher_distance" when it has a teacher (``ValueError``
    when it has neither)."""
    if getattr(evaluator, "class_reference", None) is not None:
        return "fid_class"
    if getattr(evaluator, "frechet", None) is not None:
        return "fid"
    if getattr(evaluator, "teacher", None) is not None:
        return "teacher_distance"
    raise ValueError("held-out scoring needs an evaluator with reference statistics (fid) "
                     "or a teacher (metric teacher_distance)")


def bootstrap_mean(values: Tensor | np.ndarray, counts: Tensor) -> Tensor:
    """The mean of per-sample values [n] under each resample's counts [B, n] -> [B] (float64).

    Row b is ``sum_i counts[b, i] * values[i] / n``: the mean of the resampled values."""
    v = torch.as_tensor(values).to(torch.float64).reshape(-1)
    c = counts.to(torch.float64)
    if c.shape[1] != v.shape[0]:
        raise ValueError(f"counts have {c.shape[1]} columns; there are {v.shape[0]} samples")
    return c @ v / v.shape[0]


def scores_from_distances(
    distances: Sequence[Tensor | np.ndarray | None],
    ids: Sequence[str],
    seeds: Sequence[int],
    *,
    baseline_index: int = 0,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
    interval: str = "centered",
    errors: Sequence[str | None] | None = None,
    metric: str = "teacher_distance",
) -> dict[str, Any]:
    """``heldout_scores``' table of a per-sample metric: per-sample values [n] (row i: seed
    i; ``None`` marks a failed entry) scored by their mean, with bootstrap intervals and
    paired differences against ``distances[baseline_index]`` (the same resample counts,
    ``bootstrap_counts(n, resamples, bootstrap_seed)``, for every entry)."""
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    counts = bootstrap_counts(n, resamples, bootstrap_seed)
    points: list[float | None] = []
    boots: list[Tensor | None] = []
    for d in distances:
        if d is not None and len(d) != n:
            raise ValueError(f"per-sample values have {len(d)} rows; there are {n} seeds")
        v = None if d is None else torch.as_tensor(d).to(torch.float64).reshape(-1)
        points.append(None if v is None else float(v.mean()))
        boots.append(None if v is None else bootstrap_mean(v, counts))
    return paired_table(points, boots, ids, seeds, errors, metric=metric,
                        baseline_index=baseline_index, level=level, resamples=resamples,
                        interval=interval)


def paired_table(
    points: Sequence[float | None],
    boots: Sequence[Tensor | np.ndarray | None],
    ids: Sequence[str],
    seeds: Sequence[int],
    errors: Sequence[str | None] | None = None,
    *,
    metric: str,
    baseline_index: int = 0,
    level: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    interval: str = "centered",
) -> dict[str, Any]:
    """The held-out table from each entry's value on all samples and its bootstrap values
    [B] (the same resamples for every entry; ``None``: the entry failed): intervals, and
    differences against entry ``baseline_index`` whose intervals come from the differences
    of the bootstrap values (paired)."""
    seeds = [int(s) for s in seeds]
    n = len(seeds)
    if not 0 <= baseline_index < len(points):
        raise ValueError(f"baseline_index {baseline_index} is out of range")
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval method {interval!r}; known: {', '.join(INTERVALS)}")
    errors = list(errors) if errors is not None else [None] * len(points)
    base_point, base_boot = points[baseline_index], boots[baseline_index]
    scores = []
    for cid, p, b, err in zip(ids, points, boots, errors):
        if p is None or b is None:
            scores.append(HeldoutScore(cid, "failed", None, None, None, None, n, seeds[0], err,
                                       metric))
            continue
        b = _float64(b)
        diff = diff_ci = None
        if base_point is not None and base_boot is not None:
            diff = p - base_point
            diff_ci = bootstrap_interval(b - _float64(base_boot),
                                         diff, level, interval)
        ci = bootstrap_interval(b, p, level, interval)
        scores.append(HeldoutScore(cid, "ok", p, ci, diff, diff_ci, n, seeds[0], None, metric))
    return {
        "metric": metric,
        "level": level,
        "interval": interval,
        "resamples": resamples,
        "n_samples": n,
        "seed_base": seeds[0],
        "baseline_id": ids[baseline_index],
        "scores": [s.to_dict() for s in scores],
    }


def add_teacher_distance(table: dict[str, Any], teacher: Mapping[str, Any]) -> dict[str, Any]:
    """Each row of a FID ``table`` given the teacher distance of the same schedule from the
    teacher-distance ``teacher`` table (same schedules, same seeds): ``teacher_distance``,
    ``teacher_distance_ci``, ``teacher_distance_diff``, ``teacher_distance_diff_ci``."""
    for row, t in zip(table["scores"], teacher["scores"]):
        row["teacher_distance"] = t.get("teacher_distance")
        row["teacher_distance_ci"] = t.get("teacher_distance_ci")
        row["teacher_distance_diff"] = t.get("diff")
        row["teacher_distance_diff_ci"] = t.get("diff_ci")
    return table


def add_columns(table: dict[str, Any], other: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Each row of ``table`` given the value of another table of the same schedules, seeds
    and resamples (``other``, whose metric is ``name``): ``<name>``, ``<name>_ci``,
    ``<name>_diff`` and ``<name>_diff_ci`` (paired, against the same baseline)."""
    for row, t in zip(table["scores"], other["scores"]):
        row[name] = t.get(name)
        row[f"{name}_ci"] = t.get(f"{name}_ci")
        row[f"{name}_diff"] = t.get("diff")
        row[f"{name}_diff_ci"] = t.get("diff_ci")
    return table


def _teacher_heldout(
    evaluator: Any,
    schedules: Sequence[Schedule | Mapping[str, Any]],
    seeds: Sequence[int],
    metric: str,
    baseline_index: int,
    level: float,
    resamples: int,
    bootstrap_seed: int,
    interval: str,
) -> dict[str, Any]:
    """``heldout_scores`` on an evaluator with a teacher: the teacher-distance table, or the
    FID table with the teacher distance on each row (one sampling pass for both)."""
    if metric not in HELDOUT_METRICS:
        raise ValueError(f"held-out metric {metric!r}; allowed: {', '.join(HELDOUT_METRICS)}")
    if metric == "fid" and evaluator.frechet is None:
        raise ValueError("held-out scoring needs an evaluator with reference statistics")
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval method {interval!r}; known: {', '.join(INTERVALS)}")
    results, feats, dists = evaluator.per_sample_teacher_distances(
        list(schedules), seeds, features=metric == "fid")
    ids, errors = [r.candidate_id for r in results], [r.error for r in results]
    ok = [r.status == "ok" for r in results]
    opts: dict[str, Any] = dict(baseline_index=baseline_index, level=level,
                                resamples=resamples, bootstrap_seed=bootstrap_seed,
                                interval=interval, errors=errors)
    teacher = scores_from_distances([d if k else None for d, k in zip(dists, ok)], ids,
                                    seeds, **opts)
    if metric == "teacher_distance":
        return teacher
    table = scores_from_features(evaluator.frechet,
                                 [f if k else None for f, k in zip(feats, ok)], ids, seeds,
                                 **opts)
    return add_teacher_distance(table, teacher)


# Class-conditional runs (class_fid): stratified by class -------------------------------------
def bootstrap_conditional(features: Tensor, logits: Tensor, labels: Sequence[int] | np.ndarray,
                          reference: ClassReference, counts: Tensor) -> dict[str, np.ndarray]:
    """Bootstrap values [resamples] of ``fid_class``, ``fid`` and ``accuracy`` of one
    candidate, for resample counts from ``stratified_counts`` (same labels)."""
    y = np.asarray(labels, dtype=np.int64)
    f = torch.as_tensor(features)
    per_class, pool = reference.frechet()
    fids = []
    for c, ref in enumerate(per_class):
        idx = torch.as_tensor(np.flatnonzero(y == c))
        fids.append(bootstrap_fid(f[idx], ref, counts[:, idx]).numpy())
    hit = (torch.as_tensor(logits).argmax(1).cpu().numpy() == y).astype(np.float64)
    acc = (counts.numpy() @ hit) / y.size
    return {"fid_class": np.mean(np.stack(fids), axis=0),
            "fid": bootstrap_fid(f, pool, counts).numpy(), "accuracy": acc}


def heldout_class_part(evaluator: Any, schedules: Sequence[Schedule | Mapping[str, Any]],
                       seeds: Sequence[int], resamples: int, bootstrap_seed: int
                       ) -> list[dict[str, Any]]:
    """``heldout.heldout_part`` of a ``class_fid`` run: per schedule, ``fid_class``,
    ``fid`` (pool) and ``accuracy`` on the held-out seeds, each with its bootstrap values
    (``boot``, ``fid_boot``, ``accuracy_boot``) from ``stratified_counts`` (a function of
    the seeds' labels, ``resamples`` and ``bootstrap_seed`` only, so every part, on any
    worker, shares the resamples and ``heldout.combine_parts`` pairs them)."""
    seeds = [int(s) for s in seeds]
    ref: ClassReference = evaluator.class_reference
    labels = class_labels(seeds, ref.n_classes)
    counts = stratified_counts(labels, resamples, bootstrap_seed)
    results, feats, logits = evaluator.per_sample_class_outputs(list(schedules), seeds)
    parts = []
    for r, f, lg in zip(results, feats, logits):
        part: dict[str, Any] = {"candidate_id": r.candidate_id, "metric": "fid_class",
                                "status": "ok" if r.ok else "failed", "error": r.error}
        if r.ok:
            m = conditional_metrics(f, lg, labels, ref)
            boot = bootstrap_conditional(f, lg, labels, ref, counts)
            part.update(fid_class=m["fid_class"], boot=boot["fid_class"], fid=m["fid"],
                        fid_boot=boot["fid"], accuracy=m["accuracy"],
                        accuracy_boot=boot["accuracy"])
        parts.append(part)
    return parts
