"""The evolution's predictor refit, warm-started or from scratch: held-out quality and cost.

Two arms of the quickstart's evolution (configs/quickstart.yaml: gmm-digits-k64, dpmpp_2m,
NFE 5, 2,000 samples per candidate, 24 x 8 generations, OMS-DPM pre-screen on), per
searcher seed:

- ``scratch``: every screening fits the predictor from scratch (300 steps): the search as
  it was before the warm start (``PredictorConfig(warm_steps=0)``);
- ``warm``: the first screening fits from scratch, every later one continues from the last
  one's weights for ``warm_steps`` steps (the default, 60).

Each arm runs the library's in-process search loop (``quality.run_searcher``); the
predictor's fits are timed (CPU seconds, the driver's critical path between generations),
and its Kendall tau on the candidates it kept (``predictor_log``) is kept. Every winner is
then re-scored on 10,000 held-out samples with the others, and the paired difference
warm - scratch gets a 95% bootstrap interval (the same resampled sample indices for both).
Rule: warm stays the default only if no interval (per seed, and on the mean) lies above 0.

    nice python benchmarks/predictor_warm.py                      # 3 seeds, the full run
    python benchmarks/predictor_warm.py --tiny --out /tmp/pw      # a small version
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prefix_sharing  # noqa: E402  (its quickstart case)
import quality  # noqa: E402  (the in-process search loop)

from searchd.evaluation import Evaluator  # noqa: E402
from searchd.evaluation.heldout import bootstrap_interval  # noqa: E402
from searchd.schedule import Schedule  # noqa: E402
from searchd.searchers import predictor as pm  # noqa: E402
from searchd.searchers.evolution import EvolutionSearcher  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("scratch", "warm")


class FitTimer:
    """CPU seconds of every ``SchedulePredictor.fit`` (wrapped for the benchmark)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._fit = pm.SchedulePredictor.fit
        timer = self

        def fit(pred: pm.SchedulePredictor, *args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            try:
                return timer._fit(pred, *args, **kwargs)
            finally:
                timer.seconds.append(time.process_time() - t0)

        pm.SchedulePredictor.fit = fit  # type: ignore[method-assign]

    def close(self) -> None:
        pm.SchedulePredictor.fit = self._fit  # type: ignore[method-assign]


def run(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    case = prefix_sharing.quickstart_case(args)
    ev = Evaluator(case["den"], case["feats"], case["ref"])
    seeds = list(range(quality.SEED_BASE, quality.SEED_BASE + args.samples))
    held = list(range(quality.HELDOUT_SEED_BASE, quality.HELDOUT_SEED_BASE + args.heldout))
    evo = case["evolution"]
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    for s in args.searcher_seeds:
        for arm in ARMS:
            cfg = pm.PredictorConfig(warm_steps=0 if arm == "scratch" else args.warm_steps)
            searcher = EvolutionSearcher(case["space"], "fid", "min", seed=s,
                                         seeds=case["seeds_sched"], predictor_config=cfg,
                                         max_candidates=case["max_candidates"], **evo)
            timer = FitTimer()
            t0 = time.perf_counter()
            try:
                out = quality.run_searcher(searcher, ev, seeds, evo["population_num"])
            finally:
                timer.close()
            wall = time.perf_counter() - t0
            taus = [e["tau"] for e in searcher.predictor_log]
            best = out["schedule"]
            runs[arm].append({
                "seed": s, "best": best if isinstance(best, Schedule)
                else Schedule.from_dict(best), "search_fid": out["value"],
                "candidates": out["candidates"], "wall_s": wall, "fit_cpu_s": timer.seconds,
                "tau": taus})
            log(f"  {arm} seed {s}: {out['candidates']} candidates, best search FID "
                f"{out['value']:.4f}, fits {sum(timer.seconds):.2f} s CPU, {wall:.0f} s")
    winners = [r["best"] for arm in ARMS for r in runs[arm]]
    # quality.heldout: FID and bootstrap FIDs per schedule, the same resampled indices.
    scored = quality.heldout(ev, {str(i): w for i, w in enumerate(winners)}, held,
                             argparse.Namespace(resamples=args.resamples))
    points = [scored[str(i)]["fid"] for i in range(len(winners))]
    boots = [scored[str(i)]["boot"] for i in range(len(winners))]
    k = len(args.searcher_seeds)
    pairs = []
    for i in range(k):
        d = points[k + i] - points[i]
        pairs.append({"seed": args.searcher_seeds[i], "scratch": points[i],
                      "warm": points[k + i], "same_winner": winners[i].id == winners[k + i].id,
                      "scratch_ci": bootstrap_interval(boots[i], points[i]),
                      "warm_ci": bootstrap_interval(boots[k + i], points[k + i]),
                      "diff": d, "diff_ci": bootstrap_interval(boots[k + i] - boots[i], d)})
    mean_d = float(np.mean([p["diff"] for p in pairs]))
    mean_boot = np.mean([boots[k + i] - boots[i] for i in range(k)], axis=0)
    return {"pairs": pairs, "mean_diff": mean_d,
            "mean_diff_ci": bootstrap_interval(mean_boot, mean_d),
            "runs": {arm: [{k_: v for k_, v in r.items() if k_ != "best"}
                           | {"best": r["best"].sigmas.tolist()} for r in rs]
                     for arm, rs in runs.items()}}


def _ci(ci: Sequence[float]) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def markdown(res: dict[str, Any], args: argparse.Namespace, wall: float) -> str:
    load_avg = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "# The predictor's refit: warm-started (60 steps) or from scratch (300 steps)", "",
        f"Command: `python benchmarks/predictor_warm.py {' '.join(args.argv)}` "
        f"({wall / 60:.0f} min, {time.strftime('%Y-%m-%d', time.gmtime())})", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, shared with other "
        f"users' jobs; load average {load_avg} at the end. The quickstart's evolution "
        f"(24 x 8 generations, pre-screen top 10%), {args.samples} samples per candidate; "
        f"held-out {args.heldout} samples (seeds 1,000,000..) against {args.reference} exact "
        f"samples; intervals: 95% bootstrap, {args.resamples} resamples, paired. "
        f"Arms: `scratch` = every refit from scratch, 300 steps (as before); `warm` = the "
        f"first fit from scratch, every later one {args.warm_steps} steps from the last "
        f"one's weights.", "",
        "## Held-out quality: warm - scratch (paired)", "",
        "| searcher seed | scratch held-out FID [95% CI] | warm held-out FID [95% CI] | "
        "same winner | warm - scratch [95% CI] |", "| --- | --- | --- | --- | --- |"]
    for p in res["pairs"]:
        lines.append(
            f"| {p['seed']} | {p['scratch']:.4f} [{p['scratch_ci'][0]:.4f}, "
            f"{p['scratch_ci'][1]:.4f}] | {p['warm']:.4f} [{p['warm_ci'][0]:.4f}, "
            f"{p['warm_ci'][1]:.4f}] | {'yes' if p['same_winner'] else 'no'} | "
            f"{p['diff']:+.4f} {_ci(p['diff_ci'])} |")
    lines.append(f"| mean over seeds | | | | {res['mean_diff']:+.4f} "
                 f"{_ci(res['mean_diff_ci'])} |")
    lines += ["", "## The fits (the driver's critical path between generations) and the "
              "predictor's Kendall tau on the candidates it kept", "",
              "| arm | seed | fits | fit CPU s (all) | fit CPU s (median) | mean tau | "
              "best search FID | search wall s |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm in ARMS:
        for r in res["runs"][arm]:
            taus = [t for t in r["tau"] if t is not None]
            lines.append(
                f"| {arm} | {r['seed']} | {len(r['fit_cpu_s'])} | {sum(r['fit_cpu_s']):.2f} | "
                f"{float(np.median(r['fit_cpu_s'])):.3f} | "
                f"{float(np.mean(taus)) if taus else float('nan'):.3f} | "
                f"{r['search_fid']:.4f} | {r['wall_s']:.0f} |")
    worse = [str(p["seed"]) for p in res["pairs"] if p["diff_ci"][0] > 0]
    worse_mean = res["mean_diff_ci"][0] > 0
    verdict = ("not worse: no interval above 0" if not worse and not worse_mean else
               "worse (an interval above 0): seeds " + ", ".join(worse)
               + (" and the mean" if worse_mean else ""))
    lines += ["", f"Held-out quality, warm against scratch: **{verdict}**."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--searcher-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--warm-steps", type=int, default=pm.PredictorConfig().warm_steps)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--heldout", type=int, default=10000)
    p.add_argument("--reference", type=int, default=10000)
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a small run (seconds, not an hour)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.tiny:
        args.samples, args.heldout, args.reference, args.resamples = 150, 300, 600, 50
        args.searcher_seeds = args.searcher_seeds[:1]
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = run(args, lambda m: print(m, flush=True))
    wall = time.perf_counter() - t0
    (args.out / "predictor_warm.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items() if k != "out"}, "wall_s": wall,
         **res}, indent=1, default=str))
    text = markdown(res, args, wall)
    (args.out / "predictor_warm.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
