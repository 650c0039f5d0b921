"""Where the held-out phase's time goes, and its bootstrap before and after, side by side.

The end of a quickstart search re-scores 4 schedules (the winner and 3 baselines) on 10,000
held-out samples and gives each FID a 500-resample bootstrap interval and a paired
difference (``searchd.evaluation.heldout.heldout_scores``, in one worker). This script runs
that phase on the quickstart's model (gmm-digits-k64, dpmpp_2m, 5 steps, digits features,
reference: 10,000 exact samples) and times its parts:

- sampling + features: ``Evaluator.per_sample_features`` of the 4 schedules;
- bootstrap before: the batched product ``G^T diag(c) G`` over all rows for every resample
  (the implementation before this change, kept here as ``grams_before``);
- bootstrap after: the library's ``weighted_grams`` (the resample counts times the
  per-sample outer products, packed to their upper triangles: one large matrix product);

alternating before/after ``--rounds`` times on the same features and resample counts, and
checks that both give the same bootstrap values (float64 rounding) and so the same
intervals. The bootstrap's own Monte Carlo noise is shown beside that difference: the
interval endpoints moved by a different resampling seed; and, for fewer resamples, how much
the endpoints of the winner's interval vary over resampling seeds (the accuracy a smaller
``resamples`` would give).

    nice python benchmarks/heldout.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.evaluation import Evaluator, load_features
from searchd.evaluation import heldout as H
from searchd.evaluation.reference import exact_reference
from searchd.models import load
from searchd.schedule import Schedule
from searchd.schedules import baseline

RESULTS = Path(__file__).resolve().parent / "results"
HELDOUT_SEED_BASE = 1_000_000
REFERENCE_SEED_BASE = 2_000_000
# A searched schedule of the quality benchmark (gmm-digits-k64, dpmpp_2m, NFE 5), as winner.
WINNER = [41.8, 3.47, 1.88, 0.66, 0.251, 0.0]


def grams_before(g: Tensor, counts: Tensor) -> Tensor:
    """The weighted Gram matrices as computed before: one batched product over all rows."""
    return torch.matmul(g.T, counts[:, :, None] * g)


def bootstrap_all(feats: list[Tensor], ev: Evaluator, counts: Tensor, grams: Any
                  ) -> tuple[list[Tensor], float]:
    """Bootstrap FIDs [B] of every feature set with the given Gram routine, and seconds."""
    saved = H.weighted_grams
    H.weighted_grams = grams
    try:
        t0 = time.perf_counter()
        out = [H.bootstrap_fid(f, ev.frechet, counts) for f in feats]
        return out, time.perf_counter() - t0
    finally:
        H.weighted_grams = saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heldout", type=int, default=10000)
    p.add_argument("--resamples", type=int, default=H.DEFAULT_RESAMPLES)
    p.add_argument("--reference", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=2, help="before/after pairs timed")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a worker: 1)")
    p.add_argument("--mc-seeds", type=int, default=5,
                   help="resampling seeds for the accuracy-vs-resamples table")
    p.add_argument("--out", type=Path, default=RESULTS / "heldout.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    den, feats_net = load("gmm-digits-k64"), load_features("digits")
    ref = exact_reference(den, feats_net, range(REFERENCE_SEED_BASE,
                                                 REFERENCE_SEED_BASE + args.reference))
    ev = Evaluator(den, feats_net, ref)
    setup_s = time.perf_counter() - t0
    lo, hi = den.sigma_min, den.sigma_max
    schedules = [Schedule(WINNER)] + [
        Schedule(baseline(f, 5, lo, hi, True, **({"rho": 7} if f == "polynomial" else {})))
        for f in ("polynomial", "logsnr", "time_uniform")]
    seeds = list(range(HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + args.heldout))

    t0 = time.perf_counter()
    results, feats = ev.per_sample_features(schedules, seeds)
    sampling_s = time.perf_counter() - t0
    assert all(r.ok for r in results)
    counts = H.bootstrap_counts(len(seeds), args.resamples, 0)
    before_s, after_s = [], []
    for r in range(args.rounds):
        order = [("before", grams_before), ("after", H.weighted_grams)]
        for name, grams in order if r % 2 == 0 else order[::-1]:
            boot, sec = bootstrap_all(feats, ev, counts, grams)
            (before_s if name == "before" else after_s).append(sec)
            if name == "before":
                boot_before = boot
            else:
                boot_after = boot
    # Same values, same intervals; the bootstrap's own noise for scale.
    points = [float(ev.frechet.distance(*H._moments(f))) for f in feats]
    max_diff = max(float((a - b).abs().max()) for a, b in zip(boot_before, boot_after))
    ci_before = [H.bootstrap_interval(b, pt) for b, pt in zip(boot_before, points)]
    ci_after = [H.bootstrap_interval(b, pt) for b, pt in zip(boot_after, points)]
    ci_diff = max(abs(x - y) for a, b in zip(ci_before, ci_after) for x, y in zip(a, b))
    other = H.bootstrap_counts(len(seeds), args.resamples, 1)
    boot_other, _ = bootstrap_all(feats, ev, other, H.weighted_grams)
    ci_other = [H.bootstrap_interval(b, pt) for b, pt in zip(boot_other, points)]
    ci_noise = max(abs(x - y) for a, b in zip(ci_after, ci_other) for x, y in zip(a, b))
    # Accuracy against the number of resamples: endpoint spread over resampling seeds.
    accuracy = []
    for b_count in sorted({100, 200, args.resamples}):
        ends = []
        for seed in range(args.mc_seeds):
            c = H.bootstrap_counts(len(seeds), b_count, 100 + seed)
            ends.append(H.bootstrap_interval(H.bootstrap_fid(feats[0], ev.frechet, c),
                                             points[0]))
        ends_a = np.asarray(ends)
        accuracy.append((b_count, ends_a.std(0, ddof=1), float(np.mean(np.diff(ends_a, axis=1)))))
    t0 = time.perf_counter()
    held = H.heldout_scores(ev, schedules, seeds, baseline_index=1, resamples=args.resamples)
    whole_s = time.perf_counter() - t0

    med_b, med_a = float(np.median(before_s)), float(np.median(after_s))
    ratios = [b / a for b, a in zip(before_s, after_s)]
    load_avg = os.getloadavg()
    lines = [
        "# The held-out phase: where its time goes, and the bootstrap before and after",
        "",
        f"Command: `python benchmarks/heldout.py {' '.join(sys.argv[1:] if argv is None else argv)}`",  # noqa: E501
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible (shared by several "
        f"users), torch threads {args.threads}, load average {load_avg[0]:.1f} / "
        f"{load_avg[1]:.1f} / {load_avg[2]:.1f} at the end: absolute times are noisy; the "
        "before/after pairs ran alternately on the same data.",
        "",
        f"The quickstart's held-out phase: 4 schedules (a searched one and the 3 baselines) on "
        f"{args.heldout} held-out samples of gmm-digits-k64 (dpmpp_2m, 5 steps), digits "
        f"features (d = {feats[0].shape[1]}), FID against {args.reference} exact samples, "
        f"{args.resamples} bootstrap resamples per schedule (the same counts for all, so "
        "differences are paired).",
        "",
        "| part | seconds |",
        "| --- | --- |",
        f"| evaluator set-up (model, features, {args.reference} exact reference samples) | "
        f"{setup_s:.1f} |",
        f"| sampling + features, 4 x {args.heldout} samples | {sampling_s:.1f} |",
        f"| bootstrap before, 4 x {args.resamples} resamples (median of {args.rounds}) | "
        f"{med_b:.1f} |",
        f"| bootstrap after (median of {args.rounds}) | {med_a:.1f} |",
        f"| whole `heldout_scores` after (sampling, features, bootstrap, differences) | "
        f"{whole_s:.1f} |",
        "",
        f"Bootstrap before / after, pair by pair: {', '.join(f'{r:.2f}' for r in ratios)} "
        f"(before: {', '.join(f'{s:.1f}' for s in before_s)} s; after: "
        f"{', '.join(f'{s:.1f}' for s in after_s)} s).",
        "",
        f"Before the change the bootstrap was {med_b / (med_b + sampling_s):.0%} of sampling + "
        f"bootstrap; after, {med_a / (med_a + sampling_s):.0%}.",
        "",
        "Same definition, same values: largest difference of a bootstrap FID between before "
        f"and after {max_diff:.2e}; of an interval endpoint {ci_diff:.2e}. The bootstrap's own "
        f"noise (endpoints with another resampling seed): up to {ci_noise:.2e}.",
    ]
    lines += [
        "",
        f"Accuracy of the interval against the number of resamples (the searched schedule's "
        f"interval over {args.mc_seeds} resampling seeds): standard deviation of each "
        "endpoint, against the interval's mean width.",
        "",
        "| resamples | std of lower end | std of upper end | mean width | std / width |",
        "| --- | --- | --- | --- | --- |",
    ]
    for b_count, sd, width in accuracy:
        lines.append(f"| {b_count} | {sd[0]:.4f} | {sd[1]:.4f} | {width:.4f} | "
                     f"{max(sd) / width:.1%} |")
    lines += ["", "Held-out scores (after):", "",
              "| schedule | held-out FID [95% CI] | diff to polynomial rho=7 [95% CI] |",
              "| --- | --- | --- |"]
    names = ["searched (quality.md, NFE 5)", "polynomial rho=7", "logSNR", "time-uniform"]
    for name, sc in zip(names, held["scores"]):
        lines.append(f"| {name} | {sc['fid']:.4f} [{sc['fid_ci'][0]:.4f}, {sc['fid_ci'][1]:.4f}]"
                     f" | {sc['diff']:+.4f} [{sc['diff_ci'][0]:+.4f}, {sc['diff_ci'][1]:+.4f}] |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
