"""Evaluation benchmarks.

``batching`` (default): candidates/s of population-batched scoring (one ``evaluate`` call
for all candidates) vs one candidate at a time, on the embedded zoo (gmm-digits-k64, digits
features, FID against exact samples), with a breakdown of where the time goes. Writes
results/evaluate.md.

``bootstrap``: time of the vectorized held-out bootstrap (d = 64, 128; n = 2000, 10000).
Writes results/evaluate-bootstrap.md.

``inception``: the Inception preprocessing of ``InceptionFeatures`` (batched, on the device)
against clean-fid's own per-image path (PIL resize per image, then clean-fid's
``InceptionV3W``), on the same images and the same TorchScript file: the feature difference
and the FID difference. Without the real weights (``inception-2015-12-05.pt``) it uses the
random-weight stand-in of ``searchd.evaluation.standin`` and says so. Writes
results/inception.md.

    python benchmarks/evaluate.py batching --candidates 8 --samples 2000
    python benchmarks/evaluate.py inception --samples 1000
    python benchmarks/evaluate.py bootstrap --resamples 500
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from searchd.evaluation import Evaluator, FrechetReference, frechet_distance, load_features
from searchd.evaluation.features import CLEANFID_CACHE
from searchd.evaluation.reference import exact_reference
from searchd.models import load
from searchd.noise import make_noise, seed_range
from searchd.schedule import Schedule
from searchd.schedules import baseline
from searchd.solvers import solve

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_SEED_BASE = 2_000_000


def machine_line() -> str:
    load_avg = os.getloadavg()
    return (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, torch threads "
        f"{torch.get_num_threads()}, load average {load_avg[0]:.1f} / {load_avg[1]:.1f} / "
        f"{load_avg[2]:.1f} at the end (a shared machine: absolute times are noisy)."
    )


def command_line() -> str:
    return "python benchmarks/evaluate.py " + " ".join(sys.argv[1:])


# Batching -------------------------------------------------------------------------------------
def candidates(den, k: int, steps: int) -> list[Schedule]:
    rhos = np.linspace(3.0, 10.0, k)
    return [Schedule(baseline("polynomial", steps, den.sigma_min, den.sigma_max, rho=float(r)))
            for r in rhos]


def batching(args: argparse.Namespace) -> None:
    den = load(args.model)
    feats = load_features("digits")
    t0 = time.perf_counter()
    ref = exact_reference(den, feats, seed_range(REFERENCE_SEED_BASE, args.reference))
    ref_s = time.perf_counter() - t0
    cands = candidates(den, args.candidates, args.steps)
    seeds = list(seed_range(0, args.samples))
    ev = Evaluator(den, feats, ref, batch_size=args.batch_size)
    ev.evaluate(cands[:1], seeds[:64])  # warm-up (kernels, thread pools)
    ev.noise(seeds)  # both ways share the noise cache, so neither pays it

    rounds = []
    for i in range(args.rounds):
        # Alternate which way goes first, so a drift in the machine's load hits both.
        for way in ("batched", "single") if i % 2 == 0 else ("single", "batched"):
            t0 = time.perf_counter()
            if way == "batched":
                together = ev.evaluate(cands, seeds)
                batched = time.perf_counter() - t0
            else:
                alone = [ev.evaluate([c], seeds)[0] for c in cands]
                single = time.perf_counter() - t0
        rounds.append((batched, single))
        assert all(r.status == "ok" for r in together + alone)
    fid_gap = max(abs(a.metrics["fid"] - b.metrics["fid"]) / b.metrics["fid"]
                  for a, b in zip(together, alone))
    batched = statistics.median(r[0] for r in rounds)
    single = statistics.median(r[1] for r in rounds)
    best_ratio = min(r[1] for r in rounds) / min(r[0] for r in rounds)
    k = len(cands)

    # Where the time goes: the same work, phase by phase.
    noise = ev.noise(seeds)
    sig = torch.as_tensor(np.stack([c.sigmas for c in cands]))
    rows_sig = sig.repeat_interleave(len(seeds), 0)
    rows_noise = noise.repeat(k, 1, 1, 1)
    t0 = time.perf_counter()
    with torch.no_grad():
        for a in range(0, rows_sig.shape[0], args.batch_size):
            x = solve(den, rows_noise[a : a + args.batch_size], rows_sig[a : a + args.batch_size])
    solve_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in cands:
            x = solve(den, noise, torch.tensor(c.sigmas))
    solve_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(k):
        f = feats(x)
    feat_s = time.perf_counter() - t0
    fr = FrechetReference(ref.mu, ref.sigma)
    mu, cov = f.double().mean(0).numpy(), np.cov(f.double().numpy().T)
    t0 = time.perf_counter()
    for _ in range(k):
        fr.distance(mu, cov)
    fd_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    make_noise(seeds, den.shape)
    noise_s = time.perf_counter() - t0

    ratio = single / batched
    lines = [
        "# Population-batched scoring vs one candidate at a time",
        "",
        f"Command: `{command_line()}`",
        "",
        machine_line(),
        "",
        f"Model {args.model} (float32, CPU), digits features (d={feats.dim}), FID against "
        f"{args.reference} exact samples (built in {ref_s:.1f} s, once); {k} candidates "
        f"(polynomial, rho 3..10, {args.steps} steps dpmpp_2m) x {args.samples} samples; "
        f"batch_size {args.batch_size} rows; one Evaluator, caches warm for both ways; "
        f"median of {args.rounds} rounds.",
        "",
        "| way | seconds | candidates/s | samples/s |",
        "|---|---|---|---|",
        f"| population-batched (1 call) | {batched:.2f} | {k / batched:.3f} | "
        f"{k * args.samples / batched:.0f} |",
        f"| one candidate at a time ({k} calls) | {single:.2f} | {k / single:.3f} | "
        f"{k * args.samples / single:.0f} |",
        "",
        f"**Ratio (batched / one at a time, candidates/s): {ratio:.2f}x** (goal >= 5x; medians; "
        f"from the fastest round of each way: {best_ratio:.2f}x). Largest relative FID "
        f"difference between the two ways: {fid_gap:.1e}.",
        "",
        "Where the time goes (the same work, phase by phase, one run):",
        "",
        "| phase | seconds | share of the batched call |",
        "|---|---|---|",
        f"| sampling, all rows batched ({k * args.samples} rows) | {solve_batched:.2f} | "
        f"{solve_batched / batched:.0%} |",
        f"| sampling, one candidate per call | {solve_single:.2f} | - |",
        f"| digits features, {k} x {args.samples} images | {feat_s:.2f} | "
        f"{feat_s / batched:.0%} |",
        f"| Frechet distance (fast path), {k} candidates | {fd_s:.3f} | {fd_s / batched:.1%} |",
        f"| noise for {args.samples} seeds (cached by the Evaluator) | {noise_s:.2f} | - |",
        "",
        "All rounds (batched s, one-at-a-time s): "
        + ", ".join(f"({b:.2f}, {s:.2f})" for b, s in rounds),
    ]
    out = args.out or RESULTS / "evaluate.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


# Inception preprocessing ------------------------------------------------------------------------
def inception(args: argparse.Namespace) -> None:
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    from searchd.evaluation.standin import make_standin_inception

    real = CLEANFID_CACHE.is_file()
    tmp = tempfile.mkdtemp()
    folder = CLEANFID_CACHE.parent if real else Path(tmp)
    if not real:
        make_standin_inception(folder, seed=0)
    net = load_features("inception", path=folder, mode="clean", batch_size=args.batch_size)
    theirs_net = InceptionV3W(str(folder), download=False).eval()
    resize = build_resizer("clean")

    den = load(args.model)
    images = {
        "reference (exact samples)": den.sample_data(seed_range(REFERENCE_SEED_BASE,
                                                                args.samples)),
        "generated (euler, 4 steps)": solve(
            den, make_noise(seed_range(0, args.samples), den.shape),
            torch.tensor(baseline("polynomial", 4, den.sigma_min, den.sigma_max)),
            solver="euler",
        ),
    }

    # The preprocessing alone (uint8 levels -> 299x299 float images), both ways.
    x0 = images["reference (exact samples)"][: args.batch_size * 4]
    t0 = time.perf_counter()
    net.preprocess(x0)
    pre_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    u8 = (x0 * 127.5 + 128).clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    [resize(im.permute(1, 2, 0).numpy()) for im in u8]
    pre_theirs = time.perf_counter() - t0

    def ours(x: torch.Tensor) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        f = net(x)
        return f.double().numpy(), time.perf_counter() - t0

    def cleanfid_path(x: torch.Tensor) -> tuple[np.ndarray, float]:
        """clean-fid's get_model_features loop: per image, uint8 HWC -> PIL resize -> CHW."""
        t0 = time.perf_counter()
        u8 = (x * 127.5 + 128).clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
        out = []
        for a in range(0, u8.shape[0], args.batch_size):
            batch = [torch.from_numpy(resize(im.permute(1, 2, 0).numpy()).transpose(2, 0, 1))
                     for im in u8[a : a + args.batch_size]]
            with torch.no_grad():
                out.append(theirs_net(torch.stack(batch)))
        return torch.cat(out).double().numpy(), time.perf_counter() - t0

    feats = {}
    for name, x in images.items():
        feats[name] = {"ours": ours(x), "clean-fid": cleanfid_path(x)}
    ref_name, gen_name = list(images)
    rows = []
    for name in images:
        a, b = feats[name]["ours"][0], feats[name]["clean-fid"][0]
        spread = b.std(0).max()  # largest across-image standard deviation of a feature
        rows.append((name, np.abs(a - b).max(), np.abs(a - b).max() / spread,
                     np.linalg.norm(a - b) / np.linalg.norm(b),
                     feats[name]["ours"][1], feats[name]["clean-fid"][1]))

    def fid(way: str) -> float:
        r, g = feats[ref_name][way][0], feats[gen_name][way][0]
        return frechet_distance(g.mean(0), np.cov(g.T), r.mean(0), np.cov(r.T))

    fid_ours, fid_theirs = fid("ours"), fid("clean-fid")
    fast = FrechetReference(feats[ref_name]["ours"][0].mean(0),
                            np.cov(feats[ref_name]["ours"][0].T))
    g = feats[gen_name]["ours"][0]
    fid_fast = fast.distance(g.mean(0), np.cov(g.T))
    weights = (f"the real weights ({CLEANFID_CACHE})" if real else
               "**a random-weight stand-in** (`searchd.evaluation.standin`, TorchScript, 299x299 "
               "input, 2048 features): the real `inception-2015-12-05.pt` was not available on "
               f"this machine (looked for {CLEANFID_CACHE}; no internet)")
    lines = [
        "# Inception preprocessing: batched on the device vs clean-fid's per-image path",
        "",
        f"Command: `{command_line()}`",
        "",
        machine_line(),
        "",
        f"Network: {weights}. Both paths run the same TorchScript file; ours through "
        "`InceptionFeatures` (mode clean: uint8 levels, PIL-bicubic emulated with two "
        "matmuls, batched), clean-fid's through its own `build_resizer('clean')` per image and "
        "`InceptionV3W`. Images: "
        f"{args.samples} exact samples and {args.samples} generated samples of {args.model} "
        "(8x8 grey, repeated to RGB, resized to 299x299).",
        "",
        "| images | max abs feature diff | max abs diff / largest feature std | rel. L2 diff "
        "| ours, features (s) | clean-fid per image, features (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, mx, rel_max, rel_l2, t_ours, t_theirs in rows:
        lines.append(f"| {name} | {mx:.2e} | {rel_max:.2e} | {rel_l2:.2e} | {t_ours:.1f} | "
                     f"{t_theirs:.1f} |")
    lines += [
        "",
        f"FID (generated vs reference features, exact path): ours {fid_ours:.6f}, clean-fid "
        f"path {fid_theirs:.6f}; **relative difference "
        f"{abs(fid_ours - fid_theirs) / abs(fid_theirs):.1e}** (target <= 5e-3). Fast path on "
        f"our features: {fid_fast:.6f}.",
        "",
        f"Preprocessing alone ({x0.shape[0]} images to 299x299 RGB floats, CPU): batched "
        f"{pre_ours:.2f} s, clean-fid per image {pre_theirs:.2f} s "
        f"({pre_theirs / pre_ours:.1f}x). On the CPU the network dominates either way.",
    ]
    if not real:
        lines += ["", "These numbers measure the preprocessing, not a model: the stand-in's "
                  "features are random projections. Re-run with the real file in place for "
                  "the numbers of the published network."]
    out = args.out or RESULTS / "inception.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


# Bootstrap -----------------------------------------------------------------------------------
def bootstrap(args: argparse.Namespace) -> None:
    from searchd.evaluation.heldout import bootstrap_counts, bootstrap_fid

    rng = np.random.default_rng(0)
    rows = []
    for d in (64, 128):
        mix = rng.standard_normal((d, d)) / np.sqrt(d)
        ref_feats = rng.standard_normal((10000, d)) @ mix
        ref = FrechetReference(ref_feats.mean(0), np.cov(ref_feats.T))
        for n in (2000, 10000):
            f = (rng.standard_normal((n, d)) * 1.05 + 0.02) @ mix
            counts = bootstrap_counts(n, args.resamples, seed=0)
            t0 = time.perf_counter()
            boot = bootstrap_fid(f, ref, counts)
            rows.append((d, n, time.perf_counter() - t0, float(boot.std())))
    lines = [
        "# Held-out bootstrap of FID: time of the vectorized resampling",
        "",
        f"Command: `{command_line()}`",
        "",
        machine_line(),
        "",
        f"{args.resamples} resamples of n per-sample features of dimension d against a fixed "
        "reference (`searchd.evaluation.heldout.bootstrap_fid`), CPU, float64.",
        "",
        "| d | n | seconds | bootstrap std of FID |",
        "|---|---|---|---|",
    ]
    lines += [f"| {d} | {n} | {t:.2f} | {sd:.4g} |" for d, n, t, sd in rows]
    out = args.out or RESULTS / "evaluate-bootstrap.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="?", default="batching",
                   choices=("batching", "inception", "bootstrap"))
    p.add_argument("--resamples", type=int, default=500, help="bootstrap resamples")
    p.add_argument("--model", default="gmm-digits-k64")
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--samples", type=int, default=None,
                   help="samples per candidate (batching: 2000) or per set (inception: 1000)")
    p.add_argument("--steps", type=int, default=10, help="steps of each candidate schedule")
    p.add_argument("--reference", type=int, default=10000, help="exact reference samples")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per solver call (batching: 4096) / images per pass (inception: 50)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.what == "batching":
        args.samples = args.samples or 2000
        args.batch_size = args.batch_size or 4096
        batching(args)
    elif args.what == "bootstrap":
        bootstrap(args)
    else:
        args.samples = args.samples or 1000
        args.batch_size = args.batch_size or 50
        inception(args)


if __name__ == "__main__":
    main()
