"""Frechet distance: the fast path (``FrechetReference``) vs clean-fid's ``frechet_distance``.

For each dimension, one reference and one candidate Gaussian are fitted to random features
with a decaying spectrum (n samples > d), and the per-candidate time of both paths is
measured in the same process, alternating, on the CPU. The fast path's one-off cost (the
reference's square root) is reported apart, since a search pays it once per run.

    python benchmarks/frechet.py                       # d = 2048 and 64, writes results/frechet.md
    python benchmarks/frechet.py --dims 64 --repeats 20 --cleanfid-repeats 20
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from cleanfid.fid import frechet_distance as cleanfid_frechet

from searchd.evaluation import FrechetReference, frechet_distance

RESULTS = Path(__file__).resolve().parent / "results" / "frechet.md"


def gaussian_pair(d: int, n: int, seed: int) -> tuple[np.ndarray, ...]:
    """Means and covariances of two feature sets [n, d] with a decaying spectrum."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d) * np.geomspace(1.0, 0.01, d)
    a = rng.standard_normal((n, d)) @ mix
    b = (rng.standard_normal((n, d)) * 1.1 + 0.05) @ mix
    return a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)


def timed(fn, *args) -> tuple[float, float]:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # clean-fid may print about eps
        value = fn(*args)
    return time.perf_counter() - t0, float(value)


def bench(d: int, n: int, repeats: int, cleanfid_repeats: int) -> dict:
    mu_g, s_g, mu_r, s_r = gaussian_pair(d, n, seed=d)
    t0 = time.perf_counter()
    ref = FrechetReference(mu_r, s_r)
    setup = time.perf_counter() - t0
    fast_t, slow_t, fast_v, slow_v = [], [], None, None
    for i in range(max(repeats, cleanfid_repeats)):
        if i < repeats:
            t, fast_v = timed(ref.distance, mu_g, s_g)
            fast_t.append(t)
        if i < cleanfid_repeats:
            t, slow_v = timed(cleanfid_frechet, mu_g, s_g, mu_r, s_r)
            slow_t.append(t)
    ours_exact = frechet_distance(mu_g, s_g, mu_r, s_r) if d <= 256 else None
    return {
        "d": d,
        "n": n,
        "setup_s": setup,
        "fast_s": statistics.median(fast_t),
        "fast_all": fast_t,
        "cleanfid_s": statistics.median(slow_t),
        "cleanfid_all": slow_t,
        "fast": fast_v,
        "cleanfid": slow_v,
        "exact_ours": ours_exact,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", default="2048,64")
    p.add_argument("--repeats", type=int, default=None,
                   help="fast-path runs per dimension (default: 5 at d >= 1024, else 50)")
    p.add_argument("--cleanfid-repeats", type=int, default=None,
                   help="clean-fid runs per dimension (default: 1 at d >= 1024, else repeats)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    rows = []
    for d in (int(v) for v in args.dims.split(",")):
        n = max(2 * d, 2000)
        fast_reps = args.repeats or (5 if d >= 1024 else 50)
        reps = args.cleanfid_repeats or (1 if d >= 1024 else fast_reps)
        r = bench(d, n, fast_reps, reps)
        rows.append(r)
        print(
            f"d={d:5d}  fast {r['fast_s']:.4f} s  clean-fid {r['cleanfid_s']:.3f} s  "
            f"ratio {r['cleanfid_s'] / r['fast_s']:.1f}x  setup {r['setup_s']:.3f} s  "
            f"rel diff {abs(r['fast'] - r['cleanfid']) / abs(r['cleanfid']):.2e}"
        )
    load = os.getloadavg()
    lines = [
        "# Frechet distance: fast path vs clean-fid",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/frechet.py', *sys.argv[1:]])}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, torch threads "
        f"{torch.get_num_threads()}, load average at the end {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (a shared machine: absolute times are noisy; the ratio is taken in one "
        "process, alternating the two paths).",
        "",
        "Per-candidate time on the CPU, median over runs; the fast path's reference factor "
        "(Cholesky) is paid once per run (setup).",
        "",
        "| d | n | fast path (s) | clean-fid (s) | speed-up | setup once (s) | FD fast "
        "| FD clean-fid | rel. diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = abs(r["fast"] - r["cleanfid"]) / abs(r["cleanfid"])
        lines.append(
            f"| {r['d']} | {r['n']} | {r['fast_s']:.4f} | {r['cleanfid_s']:.4f} | "
            f"**{r['cleanfid_s'] / r['fast_s']:.1f}x** | {r['setup_s']:.3f} | {r['fast']:.6f} | "
            f"{r['cleanfid']:.6f} | {rel:.1e} |"
        )
    lines += ["", "All runs (s):", ""]
    for r in rows:
        fast = ", ".join(f"{t:.4f}" for t in r["fast_all"])
        slow = ", ".join(f"{t:.3f}" for t in r["cleanfid_all"])
        lines.append(f"- d={r['d']}: fast [{fast}]; clean-fid [{slow}]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
