"""Per-sample adaptive schedules on the embedded model: oracle, one-shot, delta, global best.

For each NFE: the global best schedule (LD3, fitted on the first ``--global-train`` training
noises), the per-sample oracle (``searchd.adaptive.oracle_schedules``) fitted on the
evaluation noises themselves (an upper bound) and on the training noises (the predictors'
targets), the one-shot predictor (input: the solver's first denoiser output, no extra NFE)
and the recursive (delta) predictor, both trained on the training noises' oracle schedules.
Everything is scored on the evaluation seeds (disjoint from the training seeds; the same
noise for every sampler, so differences are paired): teacher distance (mean L2 norm to a
Heun teacher) and FID (digits features, against exact samples of the model), with paired
bootstrap 95% intervals of the difference to the global schedule. Overheads: the predictor
networks' time per sample against one denoiser call per sample, on the same batch.

Writes results/adaptive.md and results/adaptive.png (the spread of the oracle's schedules).

    nice python benchmarks/adaptive.py     # the committed results (~30 min, loaded 2 cores)
    python benchmarks/adaptive.py --nfe 4 --train 16 --eval 16 --oracle-iters 2 \\
        --ld3-iters 2 --reference 500 --out /tmp/adaptive-smoke   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from searchd.adaptive import (
    fine_tune,
    first_denoised,
    fit_delta,
    fit_one_shot,
    oracle_schedules,
)
from searchd.adaptive.product import sample_features
from searchd.evaluation import Evaluator
from searchd.evaluation.heldout import bootstrap_counts, scores_from_features
from searchd.evaluation.reference import exact_reference
from searchd.evaluation.teacher import TeacherCache, TeacherSettings
from searchd.methods.ld3 import ld3_schedule
from searchd.models import load
from searchd.noise import make_noise, seed_range
from searchd.schedule import Schedule
from searchd.schedules import baseline
from searchd.solvers import nfe as nfe_of
from searchd.solvers import solve

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 1_000_000
REFERENCE_SEED_BASE = 2_000_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def teacher_distance(x: torch.Tensor, teacher: torch.Tensor) -> np.ndarray:
    return (x.double() - teacher.double()).flatten(1).norm(dim=1).numpy()


def mean_diff_ci(d: np.ndarray, counts: torch.Tensor) -> tuple[float, float, float]:
    """Mean of paired differences and its bootstrap 95% percentile interval."""
    boot = (counts @ torch.as_tensor(d, dtype=torch.float64)) / d.size
    lo, hi = np.quantile(boot.numpy(), [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


def timed(fn, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def run(args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    torch.manual_seed(0)
    den = load(args.model)
    ev = Evaluator(den, "digits", None, metrics=("teacher_distance",))
    log(f"reference: {args.reference} exact samples")
    ref = exact_reference(den, ev.features, seed_range(REFERENCE_SEED_BASE, args.reference))
    ev = Evaluator(den, ev.features, ref, metrics=("fid",), solver=args.solver)
    train_seeds = list(seed_range(TRAIN_SEED_BASE, args.train))
    eval_seeds = list(seed_range(EVAL_SEED_BASE, args.eval))
    z_train = make_noise(train_seeds, den.shape)
    z_eval = make_noise(eval_seeds, den.shape)
    settings = TeacherSettings(solver="heun", n_steps=args.teacher_steps)
    cache = TeacherCache(den)
    log(f"teacher: Heun {args.teacher_steps} steps on {args.train} + {args.eval} noises")
    t_train = cache.samples(train_seeds, settings)
    t_eval = cache.samples(eval_seeds, settings)
    counts = bootstrap_counts(args.eval, args.resamples, 0)
    rows, spreads, timings, feature_gaps = [], {}, [], []
    for nfe in args.nfe:
        n_steps = nfe  # dpmpp_2m and the other one-evaluation solvers: N steps = N NFE
        if nfe_of(args.solver, n_steps) != nfe:
            raise SystemExit(f"--solver {args.solver}: NFE {nfe} is not N steps; use a "
                             "one-evaluation-per-step solver")
        log(f"NFE {nfe}: global schedule (LD3, {args.global_train} noises, {args.ld3_iters} it)")
        t0 = time.perf_counter()
        g, _ = ld3_schedule(den, z_train[: args.global_train], t_train[: args.global_train],
                            n_steps, args.solver, iters=args.ld3_iters)
        t_ld3 = time.perf_counter() - t0
        log(f"NFE {nfe}: oracle on {args.eval} evaluation noises ({args.oracle_iters} it)")
        t0 = time.perf_counter()
        o_eval = oracle_schedules(den, z_eval, t_eval, g, args.solver, iters=args.oracle_iters,
                                  lr=args.oracle_lr)
        log(f"NFE {nfe}: oracle on {args.train} training noises")
        o_train = oracle_schedules(den, z_train, t_train, g, args.solver,
                                   iters=args.oracle_iters, lr=args.oracle_lr)
        t_oracle = time.perf_counter() - t0
        log(f"NFE {nfe}: predictors")
        t0 = time.perf_counter()
        one, rec_one = fit_one_shot(den, z_train, o_train.sigmas, g, epochs=args.epochs,
                                    hidden=args.hidden)
        delta, rec_delta = fit_delta(den, z_train, o_train.sigmas, g, args.solver,
                                     epochs=args.epochs, hidden=args.hidden)
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        one_ft, delta_ft = copy.deepcopy(one), copy.deepcopy(delta)
        rec_one_ft = fine_tune(one_ft, den, z_train, t_train, args.solver, epochs=args.ft_epochs)
        rec_delta_ft = fine_tune(delta_ft, den, z_train, t_train, args.solver,
                                 epochs=args.ft_epochs)
        t_ft = time.perf_counter() - t0
        one_ft.eval()
        delta_ft.eval()

        # Control: one global schedule moved by the mean oracle offset of the training
        # noises (what a predictor that ignores its input would learn at best).
        with torch.no_grad():
            u_mean = one.head.target_offsets(torch.as_tensor(o_train.sigmas)).mean(0)
            shifted = g.copy()
            shifted[1 : 1 + u_mean.numel()] = g[1 : 1 + u_mean.numel()] * np.exp(u_mean.numpy())
        # Samples on the evaluation seeds.
        poly = baseline("polynomial", n_steps, den.sigma_min, den.sigma_max)
        results, feats = ev.per_sample_features([Schedule(g, solver=args.solver),
                                                 Schedule(poly, solver=args.solver)], eval_seeds)
        with torch.no_grad():
            x = {
                "global (LD3)": solve(den, z_eval, g, solver=args.solver),
                "polynomial rho 7": solve(den, z_eval, poly, solver=args.solver),
                "global + mean oracle offset (control)": solve(den, z_eval, shifted,
                                                                solver=args.solver),
                "oracle (fitted per noise)": solve(den, z_eval, o_eval.sigmas, solver=args.solver),
                "one-shot predictor": solve(den, z_eval, one.policy(), solver=args.solver),
                "delta predictor": solve(den, z_eval, delta.policy(), solver=args.solver),
                "one-shot, fine-tuned end to end": solve(den, z_eval, one_ft.policy(),
                                                         solver=args.solver),
                "delta, fine-tuned end to end": solve(den, z_eval, delta_ft.policy(),
                                                      solver=args.solver),
            }
        f = {k: sample_features(ev, v) for k, v in x.items()}
        # Our feature path is the evaluator's (checked on the two fixed schedules; the
        # evaluator runs both in one batch, so the mixture's float32 rounding may differ).
        gap = max(float((f["global (LD3)"] - feats[0]).abs().max()),
                  float((f["polynomial rho 7"] - feats[1]).abs().max()))
        scale = float(feats[0].abs().max())
        if not gap <= 1e-4 * scale:
            raise SystemExit(f"per-sample features differ from the evaluator's by {gap:.3g} "
                             f"(scale {scale:.3g})")
        feature_gaps.append(gap / scale)
        names = list(x)
        scores = scores_from_features(ev.frechet, [f[k] for k in names], names, eval_seeds,
                                      resamples=args.resamples)["scores"]
        td = {k: teacher_distance(v, t_eval) for k, v in x.items()}
        for k, s in zip(names, scores):
            d, lo, hi = mean_diff_ci(td[k] - td[names[0]], counts)
            rows.append({"nfe": nfe, "name": k, "td": float(td[k].mean()), "td_diff": d,
                         "td_ci": (lo, hi), "fid": s["fid"], "fid_ci": s["fid_ci"],
                         "diff": s["diff"], "diff_ci": s["diff_ci"]})
        # How far the per-sample schedules spread (log sigma offsets from the global one).
        with torch.no_grad():
            f0 = first_denoised(den, z_eval, g[0])
            pred = one(f0).numpy()
        offs = np.log(o_eval.sigmas[:, 1:n_steps] / g[None, 1:n_steps])
        spreads[nfe] = {"global": g, "oracle": o_eval.sigmas, "one_shot": pred,
                        "oracle_std": offs.std(0), "oracle_train_loss": o_train.loss.mean(),
                        "oracle_eval_gain": 1 - o_eval.loss.mean() / o_eval.global_loss.mean(),
                        "one_std": np.log(pred[:, 1:n_steps] / g[None, 1:n_steps]).std(0),
                        "rec_one": rec_one, "rec_delta": rec_delta,
                        "t_ld3": t_ld3, "t_oracle": t_oracle, "t_fit": t_fit, "t_ft": t_ft,
                        "rec_one_ft": rec_one_ft, "rec_delta_ft": rec_delta_ft}

        # Overheads, per sample, on the evaluation batch.
        timings.append({"nfe": nfe, **overheads(den, z_eval, g, o_eval.sigmas, one, delta, f0,
                                                args.solver)})
        log(f"NFE {nfe}: done ({time.perf_counter() - t_start:.0f} s so far)")
    plot(spreads, args.out.with_suffix(".png"))
    write(args, rows, spreads, timings, time.perf_counter() - t_start, max(feature_gaps))


def overheads(den, z, g, oracle, one, delta, f0, solver: str) -> dict[str, float]:
    """Median wall time per sample: one denoiser call (a shared level, a level per sample),
    the predictor networks alone, and whole samplings (fixed, one-shot, delta)."""
    b, n_steps = z.shape[0], g.size - 1
    xs = z * float(g[0])
    s_shared = torch.full((b,), float(g[1]))
    s_rows = torch.as_tensor(oracle[:, 1], dtype=torch.float32)
    st = (2, xs, torch.full((b,), float(g[2])), f0)
    with torch.no_grad():
        return {
            "call": timed(lambda: den(xs, s_shared)) / b,
            "call_rows": timed(lambda: den(xs, s_rows)) / b,
            "one": timed(lambda: one(f0)) / b,
            "delta": (n_steps - 1) * timed(lambda: delta(*st)) / b,
            "fixed": timed(lambda: solve(den, z, g, solver=solver), 3) / b,
            "pol_one": timed(lambda: solve(den, z, one.policy(), solver=solver), 3) / b,
            "pol_delta": timed(lambda: solve(den, z, delta.policy(), solver=solver), 3) / b,
        }


def plot(spreads: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(spreads), figsize=(4 * len(spreads), 3.6), squeeze=False)
    for ax, (nfe, s) in zip(axes[0], spreads.items()):
        g = s["global"]
        n = g.size - 1
        steps = np.arange(1, n)
        for row in s["oracle"]:
            ax.plot(steps, np.log(row[1:n] / g[1:n]), color="C0", alpha=0.12, lw=0.8)
        for row in s["one_shot"][:64]:
            ax.plot(steps, np.log(row[1:n] / g[1:n]), color="C1", alpha=0.25, lw=0.8)
        ax.axhline(0, color="k", lw=1.5)
        ax.set_title(f"NFE {nfe}: per-sample levels")
        ax.set_xlabel("level index")
        ax.set_xticks(steps)
        ax.set_ylabel("log(sigma / global sigma)")
    axes[0][0].plot([], [], color="C0", label="oracle (eval noises)")
    axes[0][0].plot([], [], color="C1", label="one-shot predictor")
    axes[0][0].plot([], [], color="k", label="global (LD3)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_ci(ci) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def write(args, rows, spreads, timings, seconds: float, feature_gap: float) -> None:
    out = args.out.with_suffix(".md")
    la = os.getloadavg()
    lines = [
        "# Per-sample adaptive schedules (oracle, one-shot, delta) vs the global best",
        "",
        f"`{' '.join(['python benchmarks/adaptive.py', *sys.argv[1:]])}` "
        f"({seconds / 60:.1f} min). Model {args.model}, solver {args.solver} (final step to "
        f"0), CPU float32. Machine: {platform.machine()}, {os.cpu_count()} cores, torch "
        f"threads {torch.get_num_threads()}, load average {la[0]:.1f} / {la[1]:.1f} / "
        f"{la[2]:.1f} at the end (shared: times are noisy).",
        "",
        "- **Seeds.** Training noises: seeds "
        f"{TRAIN_SEED_BASE}..{TRAIN_SEED_BASE + args.train - 1} (the global LD3 schedule uses "
        f"the first {args.global_train}; the predictors' oracle targets all {args.train}). "
        f"Evaluation: seeds {EVAL_SEED_BASE}..{EVAL_SEED_BASE + args.eval - 1}, disjoint, the "
        "same noise for every row (paired). FID: digits features against "
        f"{args.reference} exact samples of the model (seeds {REFERENCE_SEED_BASE}+). Teacher: "
        f"Heun {args.teacher_steps} steps (polynomial rho 7); teacher distance = mean L2 norm.",
        "- **Global best**: LD3 (log-SNR start, Adam lr 0.1, "
        f"{args.ld3_iters} iterations, pixel MSE) on the training noises. The polynomial "
        "(EDM, rho 7) row is for scale. The control row is one global schedule: the LD3 "
        "schedule moved by the mean (over training noises) of the oracle's offsets, i.e. the "
        "best a predictor that ignores its input could learn; a predictor that beats it "
        "adapts per sample, one that only beats LD3 may just have found a better global "
        "schedule.",
        "- **Oracle**: each evaluation noise's own schedule, by "
        f"{args.oracle_iters} Adam steps (lr {args.oracle_lr}, cosine) through the solver "
        "against the teacher's sample *of that noise*, from the global schedule. It is "
        "fitted on the very noise it is scored on, so its rows are an **upper bound** on "
        "what a predictor can reach, not a result a user gets; 'held-out' applies to it "
        "only in that the global schedule never saw these noises.",
        "- **Predictors** (trained on the training noises' oracle schedules, "
        f"{args.epochs} full-batch AdamW epochs, hidden width {args.hidden}, 20% of the "
        "training noises held out to pick the epoch): one-shot from the solver's first "
        "denoiser output (no extra NFE); delta: the next level from the state at each step. "
        "Both are offsets over the global schedule, bounded to 0.49 of the neighbouring "
        "log-gaps. These rows are genuinely held out. 'Fine-tuned end to end': the same "
        f"predictors then trained {args.ft_epochs} full-batch epochs through the solver "
        "against the teacher's samples of the training noises (`fine_tune`; the epoch "
        "picked on the same 20% split, epoch 0 included).",
        "- Differences are to the global (LD3) row; 95% intervals are paired bootstrap "
        f"({args.resamples} resamples of the evaluation seeds; FID: centered intervals as "
        "`heldout_scores`, via `scores_from_features`). Negative = better than the global "
        "schedule. The per-sample features come from the evaluator's feature network in its "
        "blocks; for the two fixed schedules they match `Evaluator.per_sample_features` to "
        f"{feature_gap:.1e} (relative; float32 rounding of differently batched solves).",
        "",
        f"| NFE | sampler | teacher dist. | diff. [95% CI] | FID (n={args.eval}) | "
        "FID diff. [95% CI] |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['nfe']} | {r['name']} | {r['td']:.4f} | {r['td_diff']:+.4f} "
            f"{fmt_ci(r['td_ci'])} | {r['fid']:.3f} | {r['diff']:+.3f} "
            f"[{r['diff_ci'][0]:+.3f}, {r['diff_ci'][1]:+.3f}] |"
        )
    lines += [
        "",
        "## Spread of the per-sample schedules",
        "",
        f"![spread]({args.out.with_suffix('.png').name}) Per level (1 .. N-1): standard "
        "deviation over noises of log(sigma / global sigma).",
        "",
        "| NFE | global schedule | oracle std per level | one-shot std per level | "
        "oracle loss gain (eval, MSE) | predictor val. loss (one-shot / delta) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for nfe, s in spreads.items():
        gl = ", ".join(f"{v:.4g}" for v in s["global"])
        lines.append(
            f"| {nfe} | [{gl}] | {', '.join(f'{v:.3f}' for v in s['oracle_std'])} | "
            f"{', '.join(f'{v:.3f}' for v in s['one_std'])} | "
            f"{100 * s['oracle_eval_gain']:.1f}% | {s['rec_one']['val_loss']:.4f} / "
            f"{s['rec_delta']['val_loss']:.4f} |"
        )
    lines += [
        "",
        "## Overhead per sample",
        "",
        f"Median wall time per sample on a batch of {args.eval}. 'call': one denoiser call "
        "with one shared level (the fixed schedule's case) and with a level per sample (the "
        "adaptive case: this mixture then takes its slower per-row path; a neural denoiser "
        "costs the same either way). Predictor: the network alone (one-shot: one forward; "
        "delta: N - 1 forwards). Sampling: a whole `solve` (median of 3; on this shared "
        "machine these vary by 2x or more between runs).",
        "",
        "| NFE | call, shared level | call, per-sample level | one-shot net | delta nets | "
        "one-shot / call | delta / call | sampling: fixed / one-shot / delta |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in timings:
        lines.append(
            f"| {t['nfe']} | {1e6 * t['call']:.1f} us | {1e6 * t['call_rows']:.1f} us | "
            f"{1e6 * t['one']:.2f} us | {1e6 * t['delta']:.2f} us | "
            f"{t['one'] / t['call']:.3f} | {t['delta'] / t['call']:.3f} | "
            f"{1e6 * t['fixed']:.0f} / {1e6 * t['pol_one']:.0f} / {1e6 * t['pol_delta']:.0f} us |"
        )
    lines += ["", "Wall time per part (s): " + "; ".join(
        f"NFE {n}: LD3 {s['t_ld3']:.0f}, oracles {s['t_oracle']:.0f}, predictors "
        f"{s['t_fit']:.0f}, fine-tuning {s['t_ft']:.0f}" for n, s in spreads.items()), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    log(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gmm-digits-k64")
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8])
    p.add_argument("--train", type=int, default=512, help="training noises (oracle targets)")
    p.add_argument("--global-train", type=int, default=64, help="noises for the global LD3")
    p.add_argument("--eval", type=int, default=384, help="evaluation noises")
    p.add_argument("--teacher-steps", type=int, default=24)
    p.add_argument("--ld3-iters", type=int, default=60)
    p.add_argument("--oracle-iters", type=int, default=16)
    p.add_argument("--oracle-lr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ft-epochs", type=int, default=30, help="end-to-end fine-tuning epochs")
    p.add_argument("--reference", type=int, default=10000)
    p.add_argument("--resamples", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a loaded machine)")
    p.add_argument("--out", type=Path, default=RESULTS / "adaptive")
    args = p.parse_args()
    if args.global_train > args.train:
        raise SystemExit(f"--global-train {args.global_train} exceeds --train {args.train}")
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
