"""The converged model's held-out FID beside a quality row's schedules: where is the floor?

The quality benchmark's FIDs are against the data (the digits zoo's reference is the 1,797
training digits), so a neural model's FID has two parts: the model's own error, which no
schedule removes, and the sampling error of a few steps, which a schedule can trade against
it. This script scores, on the benchmark's held-out seeds and evaluator, a many-step solution
(Heun, ``--heun-steps`` steps, on EDM's polynomial schedule or ``--floor`` families) with
the schedules of ``quality.json`` rows (the evolution's, the best baseline's, GITS's), with
paired bootstrap intervals of each difference to the many-step solution.

    nice python benchmarks/quality_floor.py --json DIR/quality.json --model digits-flow-s \\
        --solver euler --nfe 4 6 --threads 1 --out DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from searchd.schedule import Schedule
from searchd.schedules import baseline


def _quality():
    """benchmarks/quality.py (beside this script)."""
    path = Path(__file__).resolve().parent / "quality.py"
    spec = importlib.util.spec_from_file_location("quality", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="a quality.py result")
    p.add_argument("--model", required=True)
    p.add_argument("--solver", required=True)
    p.add_argument("--nfe", nargs="+", type=int, required=True)
    p.add_argument("--heun-steps", type=int, default=18, help="18: 35 NFE")
    p.add_argument("--floor", nargs="+", default=["polynomial"],
                   help="schedule families of the many-step solutions (first: the reference)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    Q = _quality()
    st = Q.full_settings()
    res = json.loads(a.json.read_text())
    (case,) = [m for m in res["models"] if m["model"] == a.model and m["solver"] == a.solver]
    t0 = time.perf_counter()
    ev = Q.make_evaluator(a.model, st)
    den = ev.denoiser
    sched: dict[str, Schedule] = {
        f"heun {a.heun_steps} steps, {fam}": Schedule(
            baseline(fam, a.heun_steps, den.sigma_min, den.sigma_max), solver="heun")
        for fam in a.floor
    }
    for row in case["rows"]:
        if row["nfe"] not in a.nfe:
            continue
        for meth in ("evolution", row["best_fixed"], "gits"):
            sched[f"NFE {row['nfe']} {Q.LABELS.get(meth, meth)}"] = Schedule(
                np.array(row["methods"][meth]["sigmas"]), solver=a.solver)
    held_seeds = list(range(Q.HELDOUT_SEED_BASE, Q.HELDOUT_SEED_BASE + st.heldout))
    held = Q.heldout(ev, sched, held_seeds, st)
    ref = held[next(iter(sched))]
    args = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# {a.model}: the many-step FID floor beside the quality rows ({a.solver})", "",
        f"Command: `python benchmarks/quality_floor.py {args}`", "",
        f"Held-out FID on the quality benchmark's {st.heldout} held-out seeds against its "
        f"reference; 95% bootstrap intervals ({st.resamples} resamples, the same sample indices "
        "for every schedule); the difference is paired, to the first row.", "",
        "| schedule | NFE | held-out FID [95% CI] | minus the first row [95% CI] |",
        "| --- | ---: | --- | --- |",
    ]
    from searchd.solvers import nfe as count_nfe

    for name, s in sched.items():
        h = held[name]
        d = h["fid"] - ref["fid"]
        dci = Q._ci(h["boot"] - ref["boot"], d)
        ci = Q._ci(h["boot"], h["fid"])
        lines.append(f"| {name} | {count_nfe(s.solver, s.n_steps)} | {h['fid']:.4f} "
                     f"[{ci[0]:.4f}, {ci[1]:.4f}] | {d:+.4f} [{dci[0]:+.4f}, {dci[1]:+.4f}] |")
    lines += ["", f"Wall time {(time.perf_counter() - t0) / 60:.1f} min (a shared machine).", ""]
    a.out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    (a.out / "quality_floor.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
