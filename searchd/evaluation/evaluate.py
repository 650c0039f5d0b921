"""Scoring candidate schedules: population-batched sampling, features, FID and friends.

``Evaluator`` holds everything that is loaded once (the denoiser, the feature network, the
reference's factor for the fast Frechet path, the KID reference terms, the noise and
the teacher samples of the seeds it has seen) and scores candidates:

1. Candidates are grouped by (solver, n_steps, final_zero, model schedule or not, guidance
   schedule or not, per-step solver strategy: the strategy itself, or with the prefix tree
   whether there is one). A group
   of K candidates scored on n seeds is one solver run over K * n rows with per-sample
   sigmas [K * n, N + 1], cut into chunks of ``batch_size`` rows. Row ``k * n + i`` is
   sample i of candidate k and starts from the noise of ``seeds[i]`` (common random
   numbers: every candidate sees the same noise); a conditional model also gets
   ``sample_index = seeds[i]``, which fixes the row's class or prompt (the same in every
   candidate; ``searchd.models.conditional``).
2. Each chunk's samples are checked: a candidate with a non-finite sample (or a solver
   error on its rows) is marked failed with the reason and its remaining rows are dropped;
   the other candidates go on.
3. Features are computed per candidate on blocks of ``feature_block`` consecutive samples
   aligned to the sample index (a last partial block zero-padded, so the network always
   runs at one batch shape), and statistics accumulated on blocks of ``DEFAULT_CHUNK``
   samples. A candidate's statistics are therefore bitwise independent of the batch size
   and of the other candidates of the call (as far as the denoiser's outputs are), and
   partial statistics of several workers merge to the whole up to float64 summation order.
4. Per candidate: FID through the fast Frechet path, and on request KID, Inception Score,
   sFID and the teacher distance.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.evaluation.features import FeatureNetwork, load_features
from searchd.evaluation.frechet import FrechetReference
from searchd.evaluation.metrics import (
    DEFAULT_SUBSET_SIZE,
    DEFAULT_SUBSETS,
    KIDReference,
    inception_score,
)
from searchd.evaluation.prefix import run_group_tree
from searchd.evaluation.reference import ReferenceStats
from searchd.evaluation.result import CandidateResult
from searchd.evaluation.stats import DEFAULT_CHUNK, FeatureStats
from searchd.evaluation.teacher import TeacherCache, TeacherSettings
from searchd.models.conditional import row_conditioning, supports_guidance
from searchd.noise import make_noise
from searchd.schedule import Schedule
from searchd.solvers.prefix import PrefixStats

METRICS = ("fid", "kid", "is", "sfid", "teacher_distance", "class_fid")
_NEEDS_REFERENCE = frozenset({"fid", "kid", "sfid"})
# Cached noise / teacher sample sets (one per distinct seed list).
_CACHE_ENTRIES = 4
# Largest default feature block (samples per feature-network pass, padded to this shape).
_FEATURE_BLOCK = 256


# Results: ``CandidateResult`` (``searchd.evaluation.result``, a module without torch) --------


# Per-candidate accumulation -----------------------------------------------------------------------
class _Accumulator:
    """One candidate's outputs, in sample order: samples are buffered and sent through the
    feature network in blocks aligned to the sample index, and statistics are accumulated
    on blocks of ``DEFAULT_CHUNK`` samples, whatever the chunking of the solver run."""

    def __init__(self, ev: Evaluator, n: int) -> None:
        self.ev = ev
        self.n = n
        self.samples: list[Tensor] = []
        self.n_buffered = 0
        self.n_done = 0
        self.feat_pending: dict[str, list[Tensor]] = {k: [] for k in ev._stat_outputs}
        self.n_feat_pending = 0
        self.stats = {k: None for k in ev._stat_outputs}
        self.kept: dict[str, list[Tensor]] = {k: [] for k in ev._kept_outputs}
        self.teacher_dist = torch.zeros(n, dtype=torch.float64)
        self.rows = 0
        self.error: str | None = None

    def push(self, x: Tensor, first: int) -> None:
        """Samples [m, *shape] of sample indices first .. first + m - 1 (in order)."""
        if self.error is not None:
            return
        if first != self.n_done + self.n_buffered:
            raise RuntimeError("samples of a candidate must arrive in sample order")
        if self.ev._teacher_cache_key is not None:
            t = self.ev._teacher_now[first : first + x.shape[0]].to(x.device)
            d = (x.to(torch.float64) - t.to(torch.float64)).flatten(1).norm(dim=1)
            self.teacher_dist[first : first + x.shape[0]] = d.cpu()
        self.samples.append(x)
        self.n_buffered += x.shape[0]
        self.rows += x.shape[0]
        self._run_features(final=False)

    def _run_features(self, final: bool) -> None:
        # The block depends only on n, never on the chunking: no padding when n is small.
        block = min(self.ev.feature_block, self.n)
        while self.error is None and (self.n_buffered >= block or (final and self.n_buffered > 0)):
            cat = torch.cat(self.samples)
            take = min(block, self.n_buffered)
            if self.ev.decode is not None:
                with torch.no_grad():
                    images = self.ev.decode(cat[:take])
            else:
                images = cat[:take].reshape(take, *self.ev.image_shape)
            self.samples = [cat[take:]]
            self.n_buffered -= take
            if take < block:
                # Pad a last partial block to the full block: the network always runs at one
                # batch shape, so a sample's features do not depend on how many came with it.
                pad = images.new_zeros((block - take, *images.shape[1:]))
                images = torch.cat([images, pad])
            out = {
                k: v[:take] for k, v in self.ev.features.extract(images, self.ev._outputs).items()
            }
            for k, v in out.items():
                if not torch.isfinite(v).all():
                    first = self.n_done + int((~torch.isfinite(v).flatten(1).all(1)).nonzero()[0])
                    self.error = (
                        f"non-finite {k} for sample {first} (seed {self.ev._seeds_now[first]})"
                    )
                    return
            self.n_done += take
            for k in self.ev._kept_outputs:
                self.kept[k].append(out[k].cpu())
            for k in self.ev._stat_outputs:
                self.feat_pending[k].append(out[k])
            self.n_feat_pending += take
            self._accumulate(final=False)

    def _accumulate(self, final: bool) -> None:
        while self.n_feat_pending >= DEFAULT_CHUNK or (final and self.n_feat_pending > 0):
            take = min(DEFAULT_CHUNK, self.n_feat_pending)
            for k in self.ev._stat_outputs:
                cat = torch.cat(self.feat_pending[k])
                if self.stats[k] is None:
                    self.stats[k] = FeatureStats.zeros(cat.shape[1])
                self.stats[k].add(cat[:take])
                self.feat_pending[k] = [cat[take:]]
            self.n_feat_pending -= take

    def finish(self) -> None:
        self._run_features(final=True)
        if self.error is None:
            self._accumulate(final=True)
        self.samples = []


# The evaluator -----------------------------------------------------------------------------------
class Evaluator:
    """Scores candidate schedules of one denoiser against one reference, loaded once.

    Args:
        denoiser: a ``Denoiser`` (or a zoo name for ``searchd.models.load``).
        features: a ``FeatureNetwork`` or a name for ``load_features``.
        reference: ``ReferenceStats``, a path to an ``.npz``, a ``FeatureStats``, or None
            (allowed when no metric needs one, e.g. teacher_distance only).
        metrics: any of "fid", "kid", "is", "sfid", "teacher_distance".
        solver: run every candidate with this solver (None: each Schedule's own).
        solver_options: options for ``solve`` (applied to every candidate).
        batch_size: rows (samples of any candidates) per solver call.
        feature_block: samples per feature-network pass, aligned to the sample index; a
            last partial block is zero-padded, so the network always sees one batch shape,
            min(feature_block, n) (default: the network's batch size, at most 256).
        device: where features and metrics are computed (default: the denoiser's device).
        teacher: the teacher solution for teacher_distance (``TeacherSettings`` or its
            plain-data form, ``TeacherSettings.coerce``).
        kid_subsets, kid_subset_size, kid_seed: KID as clean-fid (100 subsets of <= 1000).
        is_splits: splits of the Inception Score.
        keep_stats: attach each candidate's FeatureStats to its result.
        prefix_sharing: sample each group of candidates through a tree of shared prefixes
            (``searchd.evaluation.prefix``): candidates agreeing on their first levels share
            those steps' solver work, and every result is bitwise that of scoring the
            candidate alone; ``prefix_stats`` sums the work done and saved.
        class_reference: per-class and pool statistics (``conditional.ClassReference``) for
            the metric ``class_fid`` of a class-conditional model: its pool is the
            reference (``fid`` is the pool FID), and every candidate also gets the
            class-conditional metrics (``conditional.class_metrics``).
        objective: the ``conditional.GuidanceObjective`` that ``class_fid`` is (None: the
            mean per-class FID).
    """

    def __init__(
        self,
        denoiser: Any,
        features: FeatureNetwork | str,
        reference: ReferenceStats | FeatureStats | str | Path | None,
        *,
        metrics: Sequence[str] = ("fid",),
        solver: str | None = None,
        solver_options: Mapping[str, Any] | None = None,
        batch_size: int = 4096,
        feature_block: int | None = None,
        device: str | torch.device | None = None,
        teacher: TeacherSettings | Mapping[str, Any] | None = None,
        kid_subsets: int = DEFAULT_SUBSETS,
        kid_subset_size: int = DEFAULT_SUBSET_SIZE,
        kid_seed: int = 0,
        is_splits: int = 10,
        keep_stats: bool = True,
        prefix_sharing: bool = False,
        class_reference: Any = None,
        objective: Any = None,
    ) -> None:
        from searchd.solvers import get as solver_spec

        if isinstance(denoiser, str):
            from searchd.models import load

            denoiser = load(denoiser)
        self.denoiser = denoiser
        self.sample_shape = tuple(int(s) for s in denoiser.shape)
        self.sample_device = torch.device(getattr(denoiser, "device", "cpu"))
        # Latent models: features are taken of decode(x) (images in [-1, 1]), not of x.
        self.decode = getattr(denoiser, "decode", None)
        if self.decode is not None:
            with torch.no_grad():
                probe = self.decode(torch.zeros((1, *self.sample_shape), device=self.sample_device))
            self.image_shape = tuple(int(s) for s in probe.shape[1:])
        else:
            self.image_shape = _image_shape(self.sample_shape)
        self.sample_dtype = getattr(denoiser, "dtype", torch.float32)
        self.device = torch.device(device) if device is not None else self.sample_device
        if isinstance(features, str):
            opts: dict[str, Any] = {"device": self.device}
            if features == "pixels":
                opts["shape"] = self.image_shape
            features = load_features(features, **opts)
        self.features = features

        self.metrics = tuple(metrics)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"unknown metric(s) {unknown}; known metrics: {', '.join(METRICS)}")
        if solver is not None:
            solver_spec(solver)
        self.solver = solver
        self.solver_options = dict(solver_options or {})
        if batch_size < 1:
            raise ValueError(f"batch_size = {batch_size}; it must be >= 1")
        self.batch_size = int(batch_size)
        self.feature_block = int(feature_block or min(features.batch_size, _FEATURE_BLOCK))
        if self.feature_block > features.batch_size:
            raise ValueError(
                f"feature_block {self.feature_block} exceeds the network's batch_size "
                f"{features.batch_size}"
            )
        self.keep_stats = keep_stats
        self.is_splits = is_splits

        # class_fid: the class-conditional metrics on the digits classifier's logits.
        self.class_reference = class_reference
        self.objective = objective
        if ("class_fid" in self.metrics) != (class_reference is not None):
            raise ValueError("the metric class_fid and class reference statistics go together")
        if class_reference is not None:
            if "logits" not in features.outputs:
                raise ValueError(f"class_fid needs a classifier; {features.name!r} has no "
                                 "logits (use the digits features)")
            class_reference.check(features)
            reference = class_reference.pool if reference is None else reference
        # Reference: loaded, checked against the feature space, factored once.
        if isinstance(reference, str | Path):
            reference = ReferenceStats.load(reference)
        elif isinstance(reference, FeatureStats):
            reference = ReferenceStats.from_stats(reference, dict(features.info))
        self.reference = reference
        if reference is None and _NEEDS_REFERENCE & set(self.metrics):
            raise ValueError(
                f"metrics {sorted(_NEEDS_REFERENCE & set(self.metrics))} need reference statistics"
            )
        self.frechet: FrechetReference | None = None
        self.kid_reference: KIDReference | None = None
        self.spatial_frechet: FrechetReference | None = None
        if reference is not None:
            reference.check(features)
            self.frechet = reference.frechet(self.device)
        if "kid" in self.metrics:
            if reference.features is None or len(reference.features) < 2:
                raise ValueError(
                    "kid needs per-sample reference features; rebuild the reference with "
                    "`python -m searchd.stats ... --kid-features N`"
                )
            self.kid_reference = KIDReference(
                reference.features,
                num_subsets=kid_subsets,
                max_subset_size=kid_subset_size,
                seed=kid_seed,
                device=self.device,
            )
        if "is" in self.metrics and "logits" not in features.outputs:
            raise ValueError(f"is (Inception Score) needs logits; {features.name!r} has none")
        if "sfid" in self.metrics:
            if "spatial" not in features.outputs:
                raise ValueError(f"sfid needs spatial features; {features.name!r} has none")
            if reference.spatial_mu is None:
                raise ValueError(
                    "sfid needs spatial reference statistics; rebuild the reference with "
                    "`python -m searchd.stats ... --spatial`"
                )
            self.spatial_frechet = FrechetReference(
                reference.spatial_mu, reference.spatial_sigma, device=self.device
            )
        self.teacher = (TeacherSettings.coerce(teacher) if "teacher_distance" in self.metrics
                        else None)
        # The teacher's samples of the seeds this evaluator has seen (the one teacher
        # implementation; GITS, LD3 and the adaptive oracle use this cache too).
        self.teacher_cache = TeacherCache(
            denoiser, device=self.sample_device, dtype=self.sample_dtype,
            max_entries=_CACHE_ENTRIES, batch_size=self.batch_size,
        )

        # What the feature network computes, what is accumulated, what is kept per sample.
        self._stat_outputs = ["features"] + (["spatial"] if "sfid" in self.metrics else [])
        self._kept_outputs: list[str] = []
        if "kid" in self.metrics:
            self._kept_outputs.append("features")
        if "is" in self.metrics or "class_fid" in self.metrics:
            self._kept_outputs.append("logits")
        if "class_fid" in self.metrics and "features" not in self._kept_outputs:
            self._kept_outputs.append("features")
        self._outputs = tuple(dict.fromkeys(self._stat_outputs + self._kept_outputs))
        self._noise_cache: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()
        self._teacher_cache_key: tuple[int, ...] | None = None
        self._teacher_now: Tensor | None = None
        self._seeds_now: list[int] = []
        # Prefix-tree sampling (searchd.evaluation.prefix): on request, and its work counts.
        self.prefix_sharing = bool(prefix_sharing)
        self.prefix_stats = PrefixStats()

    # Caches ------------------------------------------------------------------------------------
    def noise(self, seeds: Sequence[int]) -> Tensor:
        """Initial noise [n, *shape] of the seeds (``make_noise``), cached per seed list."""
        key = tuple(int(s) for s in seeds)
        if key not in self._noise_cache:
            self._noise_cache[key] = make_noise(
                key, self.sample_shape, device=self.sample_device, dtype=self.sample_dtype
            )
            while len(self._noise_cache) > _CACHE_ENTRIES:
                self._noise_cache.popitem(last=False)
        self._noise_cache.move_to_end(key)
        return self._noise_cache[key]

    def teacher_samples(self, seeds: Sequence[int]) -> Tensor:
        """The teacher's samples [n, *shape] on the seeds' noise, computed once and cached."""
        if self.teacher is None:
            raise ValueError("this evaluator has no teacher (metric teacher_distance not set)")
        return self.teacher_cache.samples(seeds, self.teacher)

    # Sampling ------------------------------------------------------------------------------------
    def generate(self, schedule: Schedule, seeds: Sequence[int]) -> Tensor:
        """Samples [n, *shape] of one schedule on the seeds' noise (e.g. for sample grids)."""
        from searchd.solvers import solve

        solver = self.solver or schedule.solver
        noise = self.noise(seeds)
        sigmas = torch.tensor(schedule.sigmas)
        mids = None if schedule.model_ids is None else torch.tensor(schedule.model_ids)
        guid = None if schedule.guidance is None else torch.tensor(schedule.guidance)
        parts = []
        with torch.no_grad():
            for a in range(0, noise.shape[0], self.batch_size):
                x = solve(
                    self.denoiser,
                    noise[a : a + self.batch_size],
                    sigmas,
                    solver=solver,
                    model_ids=mids,
                    strategy=schedule.strategy,
                    guidance=guid,
                    cond=row_conditioning(self.denoiser, seeds[a : a + self.batch_size]),
                    **self.solver_options,
                )
                parts.append(x.detach())
        return torch.cat(parts)

    # Scoring -------------------------------------------------------------------------------------
    def evaluate(
        self, candidates: Sequence[Schedule | Mapping[str, Any]], seeds: Sequence[int]
    ) -> list[CandidateResult]:
        """Score every candidate on the samples of ``seeds``; one result per candidate, in order.

        Never raises for a bad candidate: it gets status "failed" and the reason.
        """
        results, _ = self._score(candidates, seeds, keep=False)
        return results

    def feature_stats(
        self, candidates: Sequence[Schedule | Mapping[str, Any]], seeds: Sequence[int]
    ) -> list[FeatureStats | None]:
        """Each candidate's FeatureStats on ``seeds`` (None for a failed one), for merging
        the partial statistics of several workers that share the seeds between them."""
        results, _ = self._score(candidates, seeds, keep=False, stats_only=True)
        return [r.stats if r.ok else None for r in results]

    def per_sample_features(
        self, candidates: Sequence[Schedule | Mapping[str, Any]], seeds: Sequence[int]
    ) -> tuple[list[CandidateResult], list[Tensor | None]]:
        """Results and per-sample features [n, d] (float32, CPU; None when failed)."""
        return self._score(candidates, seeds, keep=True)

    def per_sample_teacher_distances(
        self,
        candidates: Sequence[Schedule | Mapping[str, Any]],
        seeds: Sequence[int],
        *,
        features: bool = False,
    ) -> tuple[list[CandidateResult], list[Tensor | None], list[Tensor | None]]:
        """Results, per-sample features [n, d] (float32, CPU; only with ``features``, else
        None) and per-sample teacher distances [n] (float64, CPU: ``||x_i - teacher_i||``,
        whose mean is the ``teacher_distance`` metric), one of each per candidate (None
        when failed), from one sampling pass. Needs the metric ``teacher_distance``."""
        if self.teacher is None:
            raise ValueError("per-sample teacher distances need the metric teacher_distance")
        dists: list[Tensor | None] = []
        results, feats = self._score(candidates, seeds, keep=features, teacher_out=dists)
        return results, feats, dists

    def per_sample_class_outputs(
        self, candidates: Sequence[Schedule | Mapping[str, Any]], seeds: Sequence[int]
    ) -> tuple[list[CandidateResult], list[Tensor | None], list[Tensor | None]]:
        """Results, per-sample features [n, d] and classifier logits [n, C] (CPU; None when
        failed) of a ``class_fid`` evaluator, from one sampling pass."""
        if self.class_reference is None:
            raise ValueError("per-sample class outputs need the metric class_fid")
        logits: list[Tensor | None] = []
        results, feats = self._score(candidates, seeds, keep=True, logits_out=logits)
        return results, feats, logits

    def _score(
        self,
        candidates: Sequence[Schedule | Mapping[str, Any]],
        seeds: Sequence[int],
        *,
        keep: bool,
        stats_only: bool = False,
        teacher_out: list[Tensor | None] | None = None,
        logits_out: list[Tensor | None] | None = None,
    ) -> tuple[list[CandidateResult], list[Tensor | None]]:
        """Score the candidates: results, and per-sample features when ``keep``. Given a list
        ``teacher_out``, each candidate's per-sample teacher distances [n] (None when failed)
        are appended to it."""
        from searchd.solvers import nfe

        seeds = [int(s) for s in seeds]
        n = len(seeds)
        if n < 2:
            raise ValueError(f"scoring needs at least 2 seeds; got {n}")
        seed_base = seeds[0]
        self._seeds_now = seeds
        extra_kept = keep and "features" not in self._kept_outputs
        if extra_kept:
            self._kept_outputs.append("features")
            self._outputs = tuple(dict.fromkeys(self._stat_outputs + self._kept_outputs))
        try:
            noise = self.noise(seeds)
            self._teacher_now = None
            self._teacher_cache_key = None
            if self.teacher is not None and not stats_only:
                self._teacher_now = self.teacher_samples(seeds)
                self._teacher_cache_key = tuple(seeds)

            # Validate candidates; a bad one fails alone.
            prepared: list[tuple[Schedule, str, int] | str] = []
            for c in candidates:
                prepared.append(self._prepare(c, nfe))
            groups: dict[tuple, list[int]] = {}
            for j, p in enumerate(prepared):
                if isinstance(p, tuple):
                    s, solver, _ = p
                    key = (solver, s.n_steps, s.final_zero, s.model_ids is not None,
                           s.guidance is not None)
                    if s.strategy is not None:
                        # One batched solve per per-step strategy; the prefix tree keys
                        # each step's code itself, so its group holds every strategy.
                        key = (*key, True if self.prefix_sharing else s.strategy)
                    groups.setdefault(key, []).append(j)

            accs: dict[int, _Accumulator] = {}
            walls: dict[int, float] = {}
            for (solver, *_), js in groups.items():
                t0 = time.perf_counter()
                group_accs = {j: _Accumulator(self, n) for j in js}
                accs.update(group_accs)
                sched = [prepared[j][0] for j in js]  # type: ignore[index]
                if self.prefix_sharing:
                    stats = run_group_tree(self, solver, sched, js, group_accs, noise)
                    self.prefix_stats.add(stats)
                else:
                    self._run_group(solver, sched, js, group_accs, noise)
                for acc in group_accs.values():
                    acc.finish()
                seconds = time.perf_counter() - t0
                total_rows = sum(a.rows for a in group_accs.values()) or 1
                for j, a in group_accs.items():
                    walls[j] = seconds * a.rows / total_rows

            results: list[CandidateResult] = []
            kept: list[Tensor | None] = []
            for j, c in enumerate(candidates):
                p = prepared[j]
                if isinstance(p, str):
                    results.append(self._failed(_candidate_id(c), 0, n, seed_base, p, 0.0))
                    kept.append(None)
                    if teacher_out is not None:
                        teacher_out.append(None)
                    if logits_out is not None:
                        logits_out.append(None)
                    continue
                s, _, cost = p
                r, feats = self._finish(s, cost, accs[j], walls[j], n, seed_base, stats_only)
                results.append(r)
                kept.append(feats if keep else None)
                if teacher_out is not None:
                    teacher_out.append(accs[j].teacher_dist.clone() if r.ok else None)
                if logits_out is not None:
                    logits_out.append(torch.cat(accs[j].kept["logits"]) if r.ok else None)
            return results, kept
        finally:
            if extra_kept:
                self._kept_outputs.remove("features")
                self._outputs = tuple(dict.fromkeys(self._stat_outputs + self._kept_outputs))
            self._teacher_now = None
            self._teacher_cache_key = None

    def _prepare(self, c: Any, nfe: Any) -> tuple[Schedule, str, int] | str:
        """(schedule, solver, nfe) of a valid candidate, or the reason it is not."""
        try:
            s = c if isinstance(c, Schedule) else Schedule.from_dict(c)
            solver = self.solver or s.solver
            s.check_range(self.denoiser.sigma_min, self.denoiser.sigma_max)
            n_models = getattr(self.denoiser, "n_models", None)
            if s.model_ids is not None and n_models is not None:
                s.check_models(int(n_models))
            if s.guidance is not None and not supports_guidance(self.denoiser):
                raise ValueError(
                    "the schedule has guidance weights; this model takes none (it is not "
                    "class- or text-conditional with an unconditional mode)"
                )
            return s, solver, nfe(solver, s.n_steps, final_zero=s.final_zero)
        except (ValueError, TypeError, KeyError) as e:
            return f"invalid candidate: {e}"

    def _run_group(
        self,
        solver: str,
        schedules: list[Schedule],
        js: list[int],
        accs: dict[int, _Accumulator],
        noise: Tensor,
    ) -> None:
        """One solver run over all rows of the group, in chunks of ``batch_size`` rows."""
        n = noise.shape[0]
        k = len(schedules)
        sig = torch.as_tensor(np.stack([s.sigmas for s in schedules]), dtype=torch.float64)
        mids = None
        if schedules[0].model_ids is not None:
            mids = torch.as_tensor(np.stack([s.model_ids for s in schedules]), dtype=torch.int64)
        guid = None
        if schedules[0].guidance is not None:
            guid = torch.as_tensor(np.stack([s.guidance for s in schedules]), dtype=torch.float64)
        strategy = schedules[0].strategy  # a group shares its strategy (see _score)
        start = 0
        total = k * n
        while start < total:
            # Rows of candidates that have not failed, up to batch_size of them.
            rows = []
            r = start
            while r < total and len(rows) < self.batch_size:
                cand = r // n
                if accs[js[cand]].error is not None:
                    r = (cand + 1) * n  # skip the rest of a failed candidate
                    continue
                stop = min((cand + 1) * n, r + self.batch_size - len(rows), total)
                rows.extend(range(r, stop))
                r = stop
            start = r
            if not rows:
                continue
            idx = torch.as_tensor(rows)
            cand_idx, sample_idx = idx // n, idx % n
            x = self._solve_rows(solver, noise, sig, mids, cand_idx, sample_idx, js, accs, guid,
                                 strategy)
            # Hand each candidate its rows (consecutive samples), checking finiteness.
            for c in torch.unique(cand_idx).tolist():
                acc = accs[js[c]]
                sel = (cand_idx == c).nonzero().squeeze(1)
                if acc.error is not None or x is None:
                    continue
                xc = x[sel]
                bad = ~torch.isfinite(xc.flatten(1)).all(1)
                if bad.any():
                    i = int(sample_idx[sel][bad.nonzero()[0, 0]])
                    acc.error = f"non-finite sample {i} (seed {self._seeds_now[i]})"
                    continue
                acc.push(xc, int(sample_idx[sel[0]]))

    def _solve_rows(
        self,
        solver: str,
        noise: Tensor,
        sig: Tensor,
        mids: Tensor | None,
        cand_idx: Tensor,
        sample_idx: Tensor,
        js: list[int],
        accs: dict[int, _Accumulator],
        guid: Tensor | None = None,
        strategy: tuple[str, ...] | None = None,
    ) -> Tensor | None:
        """Samples of the given rows; a solver error is isolated to the candidates it hits."""
        from searchd.solvers import solve

        def run(sel: Tensor) -> Tensor:
            m = None if mids is None else mids[cand_idx[sel]]
            g = None if guid is None else guid[cand_idx[sel]]
            seeds = [self._seeds_now[i] for i in sample_idx[sel].tolist()]
            with torch.no_grad():
                return solve(
                    self.denoiser,
                    noise[sample_idx[sel]],
                    sig[cand_idx[sel]],
                    solver=solver,
                    model_ids=m,
                    strategy=strategy,
                    guidance=g,
                    cond=row_conditioning(self.denoiser, seeds),
                    **self.solver_options,
                ).detach()

        everything = torch.arange(cand_idx.numel())
        try:
            return run(everything)
        except Exception as e:  # noqa: BLE001 - isolate the failure to its candidates
            cands = torch.unique(cand_idx).tolist()
            if len(cands) == 1:
                accs[js[cands[0]]].error = f"solver error: {type(e).__name__}: {e}"
                return None
        # Several candidates shared the chunk: retry each alone.
        out = torch.empty(
            (cand_idx.numel(), *self.sample_shape),
            dtype=self.sample_dtype,
            device=self.sample_device,
        )
        for c in torch.unique(cand_idx).tolist():
            sel = (cand_idx == c).nonzero().squeeze(1)
            try:
                out[sel] = run(sel).to(out.dtype)
            except Exception as e:  # noqa: BLE001
                accs[js[c]].error = f"solver error: {type(e).__name__}: {e}"
        return out

    def _finish(
        self,
        s: Schedule,
        cost: int,
        acc: _Accumulator,
        wall: float,
        n: int,
        seed_base: int,
        stats_only: bool,
    ) -> tuple[CandidateResult, Tensor | None]:
        t0 = time.perf_counter()
        if acc.error is not None:
            return self._failed(s.id, cost, n, seed_base, acc.error, wall), None
        stats = acc.stats["features"]
        metrics: dict[str, float] = {}
        try:
            if not stats_only:
                if "fid" in self.metrics:
                    metrics["fid"] = self.frechet(stats)
                if "sfid" in self.metrics:
                    metrics["sfid"] = self.spatial_frechet(acc.stats["spatial"])
                if "kid" in self.metrics:
                    metrics["kid"] = self.kid_reference(torch.cat(acc.kept["features"]))
                if "is" in self.metrics:
                    mean, std = inception_score(torch.cat(acc.kept["logits"]), self.is_splits)
                    metrics["is"], metrics["is_std"] = mean, std
                if "teacher_distance" in self.metrics:
                    metrics["teacher_distance"] = float(acc.teacher_dist.mean())
                if "class_fid" in self.metrics:
                    from searchd.evaluation.conditional import class_metrics

                    metrics.update(class_metrics(self, s, torch.cat(acc.kept["features"]),
                                                 torch.cat(acc.kept["logits"]), self._seeds_now))
        except (ValueError, RuntimeError) as e:
            return self._failed(s.id, cost, n, seed_base, f"metric error: {e}", wall), None
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            return self._failed(s.id, cost, n, seed_base, f"non-finite {bad}", wall), None
        wall += time.perf_counter() - t0
        feats = torch.cat(acc.kept["features"]) if "features" in acc.kept else None
        result = CandidateResult(
            candidate_id=s.id,
            status="ok",
            metrics=metrics,
            nfe=cost,
            n_samples=n,
            seed_base=seed_base,
            wall_s=wall,
            samples_per_s=n / wall if wall > 0 else float("inf"),
            error=None,
            stats=stats if (self.keep_stats or stats_only) else None,
        )
        return result, feats

    @staticmethod
    def _failed(
        cid: str, cost: int, n: int, seed_base: int, error: str, wall: float
    ) -> CandidateResult:
        return CandidateResult(
            candidate_id=cid,
            status="failed",
            metrics={},
            nfe=cost,
            n_samples=n,
            seed_base=seed_base,
            wall_s=wall,
            samples_per_s=0.0,
            error=error,
            stats=None,
        )


def _candidate_id(c: Any) -> str:
    if isinstance(c, Schedule):
        return c.id
    if isinstance(c, Mapping) and "id" in c:
        return str(c["id"])
    return "invalid"


def _image_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """How samples of ``shape`` are seen by feature networks: [C, H, W] images."""
    if len(shape) == 3:
        return shape
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side == shape[0]:
            return (1, side, side)
        return (1, 1, shape[0])
    raise ValueError(f"samples of shape {shape} cannot be seen as images")


def evaluate(
    denoiser: Any,
    candidates: Iterable[Schedule | Mapping[str, Any]],
    solver: str | None,
    seeds: Sequence[int],
    features: FeatureNetwork | str,
    reference: ReferenceStats | FeatureStats | str | Path | None,
    **kw: Any,
) -> list[CandidateResult]:
    """Score candidates once (builds an ``Evaluator``; ``solver=None``: each schedule's own)."""
    ev = Evaluator(denoiser, features, reference, solver=solver, **kw)
    return ev.evaluate(list(candidates), seeds)
