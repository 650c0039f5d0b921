"""Prefix sharing with level-local mutations: candidates/s and held-out quality.

Two arms of the same evolution, per case and searcher seed:

- ``today``: the evolution as it ships (the space's own mutation, which moves every level),
  scored by the population-batched evaluator;
- ``level``: the same evolution with the level-local mutation
  (``searchd.schedules.local.mutate_level``: one level moves, the others keep their bits),
  scored by the prefix-tree evaluator (``Evaluator(prefix_sharing=True)``).

Cases: the quickstart (configs/quickstart.yaml: gmm-digits-k64, dpmpp_2m, NFE 5, 2,000
samples per candidate, 24 x 8 generations, pre-screen on) and the quality benchmark's
dpmpp_2m NFE 5 and 6 cells (benchmarks/quality.py: warm-started from GITS and LD3, its
population and budget).

Speed: the populations the level arm actually produced are re-scored generation by
generation by both evaluators, alternately (plain, tree, tree, plain, ...), on one core, and
candidates/s compared; the same on the today arm's populations (where nothing but exact
repeats is shared: the tree's overhead). The work shared is counted (first denoiser calls
of the steps not re-run), and the ceiling it allows is given from the denoiser's share of
a candidate's time.

Quality: every arm's winner is re-scored on 10,000 held-out samples with the others, and the
paired difference level - today gets a 95% bootstrap interval (the same resampled sample
indices for both). Decision rule (issue 22): the level-local operator becomes the default
only if held-out quality is not worse (no interval above 0) and candidates/s >= 1.3x.

    nice python benchmarks/prefix_sharing.py --threads 1                # the full run
    python benchmarks/prefix_sharing.py --tiny --out /tmp/ps            # a small version
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
import quality  # noqa: E402  (benchmarks/quality.py: the in-process search loop, the cases)

from searchd.evaluation import Evaluator, load_features  # noqa: E402
from searchd.evaluation.heldout import (  # noqa: E402
    bootstrap_counts,
    bootstrap_fid,
    bootstrap_interval,
)
from searchd.evaluation.reference import exact_reference  # noqa: E402
from searchd.models import load  # noqa: E402
from searchd.schedule import Schedule  # noqa: E402
from searchd.schedules import baseline  # noqa: E402
from searchd.schedules.local import mutate_level  # noqa: E402
from searchd.schedules.spaces import ContinuousSpace, with_meta  # noqa: E402
from searchd.searchers.evolution import EvolutionSearcher  # noqa: E402
from searchd.solvers import solve  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIXED = ("polynomial", "logsnr", "time_uniform")
# configs/quickstart.yaml, as the driver builds its evolution (search/registry.py).
QUICKSTART_EVOLUTION = dict(population_num=24, select_num=6, mutation_num=12, crossover_num=6,
                            m_prob=0.25, mutation_scale=0.1, max_epochs=8, random_fill=True,
                            predictor_top_fraction=0.1, predictor_min_train=10)
QUICKSTART_SPACE = dict(warp="rho", rho=7.0, free_endpoints=True, gap_ratio=10.0,
                        endpoint_range=0.3)


class LevelMutation:
    """The space, with ``mutate`` replaced by the level-local operator (everything else is
    the space's own). Stands in for the evolution's option until it is wired in."""

    def __init__(self, space: ContinuousSpace) -> None:
        self._space = space

    def __getattr__(self, name: str) -> Any:
        return getattr(self._space, name)

    def mutate(self, schedule: Schedule, rng: np.random.Generator, m_prob: float,
               scale: float = 0.1) -> Schedule:
        del m_prob  # one level moves, whatever the per-parameter probability
        return mutate_level(self._space, schedule, rng, scale)


def search(searcher: EvolutionSearcher, evaluator: Evaluator, seeds: Sequence[int],
           batch: int) -> dict[str, Any]:
    """The library's in-process search loop (``searchd.loop.SearchLoop``, through
    ``quality.run_searcher``): one ``evaluate`` call per generation."""
    return quality.run_searcher(searcher, evaluator, seeds, batch)


def _schedule(s: Schedule | dict[str, Any]) -> Schedule:
    return s if isinstance(s, Schedule) else Schedule.from_dict(s)


def generations(scored: list[tuple[Schedule, float | None]]) -> list[list[Schedule]]:
    """The scored candidates, grouped by the generation that proposed them."""
    out: dict[int, list[Schedule]] = {}
    for s, _ in scored:
        out.setdefault(int(s.meta.get("generation", 0)), []).append(s)
    return [out[g] for g in sorted(out)]


def prefix_counts(gens: list[list[Schedule]]) -> dict[str, float]:
    """Observe phases (first denoiser calls) the populations need: every candidate alone,
    a prefix tree per generation, and a tree that also kept every earlier generation's
    prefixes (an unbounded cache across calls: counted here, not built)."""
    alone = tree = cached = 0
    seen: set[tuple] = set()
    for pop in gens:
        rows = [tuple(float(v) for v in s.sigmas) + (s.solver,) for s in pop]
        n_steps = len(rows[0]) - 2
        batch: set[tuple] = set()
        for r in rows:
            for k in range(n_steps):
                key = r[: k + 1] + (r[-1],)
                alone += 1
                if key not in batch:
                    batch.add(key)
                    tree += 1
                    cached += key not in seen
        seen |= batch
    return {"alone": alone, "tree": tree, "cached": cached,
            "shared_tree": 1 - tree / alone, "shared_cached": 1 - cached / alone}


def time_populations(plain: Evaluator, tree: Evaluator, gens: list[list[Schedule]],
                     seeds: Sequence[int]) -> dict[str, Any]:
    """Seconds to score each generation with each evaluator, alternating which goes first,
    and the checks that both give the same values (to float rounding)."""
    t_plain = t_tree = 0.0
    worst = 0.0
    before = tree.prefix_stats.observes, tree.prefix_stats.observes_alone
    for g, pop in enumerate(gens):
        order = [("plain", plain), ("tree", tree)]
        res = {}
        for name, ev in order if g % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            res[name] = ev.evaluate(pop, seeds)
            dt = time.perf_counter() - t0
            if name == "plain":
                t_plain += dt
            else:
                t_tree += dt
        for a, b in zip(res["plain"], res["tree"]):
            if a.ok and b.ok:
                worst = max(worst, abs(a.metrics["fid"] - b.metrics["fid"])
                            / max(abs(a.metrics["fid"]), 1e-12))
    n = sum(len(p) for p in gens)
    observes = tree.prefix_stats.observes - before[0]
    alone = tree.prefix_stats.observes_alone - before[1]
    counted = prefix_counts(gens)
    if (counted["tree"], counted["alone"]) != (observes, alone):
        raise RuntimeError(f"the tree did {observes} of {alone} observe phases; counting the "
                           f"populations' prefixes gives {counted['tree']} of {counted['alone']}")
    return {"shared_cached": counted["shared_cached"], "candidates": n, "plain_s": t_plain,
            "tree_s": t_tree,
            "plain_cps": n / t_plain, "tree_cps": n / t_tree, "ratio": t_plain / t_tree,
            "observes": observes, "observes_alone": alone,
            "shared": 1 - observes / alone if alone else 0.0, "max_rel_fid_diff": worst}


def denoiser_share(ev: Evaluator, schedule: Schedule, seeds: Sequence[int]) -> float:
    """Fraction of one candidate's evaluation spent in the solver (the denoiser calls)."""
    noise = ev.noise(seeds)
    sig = torch.tensor(np.asarray(schedule.sigmas))
    ev.evaluate([schedule], seeds)
    ts, te = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.no_grad():
            solve(ev.denoiser, noise, sig, solver=schedule.solver)
        ts.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ev.evaluate([schedule], seeds)
        te.append(time.perf_counter() - t0)
    return float(np.median(ts) / np.median(te))


# Cases ------------------------------------------------------------------------------------------
def quickstart_case(args: argparse.Namespace) -> dict[str, Any]:
    den = load("gmm-digits-k64")
    feats = load_features("digits")
    ref = exact_reference(den, feats, range(quality.REFERENCE_SEED_BASE,
                                            quality.REFERENCE_SEED_BASE + args.reference))
    space = ContinuousSpace(5, den.sigma_min, den.sigma_max, True, solver="dpmpp_2m",
                            **QUICKSTART_SPACE)
    bases = [Schedule(baseline(f, 5, den.sigma_min, den.sigma_max, True,
                               **({"rho": 7} if f == "polynomial" else {})),
                      solver="dpmpp_2m", meta={"origin": "baseline", "family": f})
             for f in FIXED]
    evo = dict(QUICKSTART_EVOLUTION)
    if args.tiny:
        evo.update(population_num=6, select_num=2, mutation_num=3, crossover_num=2,
                   max_epochs=3, predictor_min_train=4)
    return {"name": "quickstart (gmm-digits-k64, dpmpp_2m, NFE 5)", "short": "quickstart",
            "den": den,
            "feats": feats, "ref": ref, "space": space, "seeds_sched": bases,
            "evolution": evo, "max_candidates": None}


def quality_case(args: argparse.Namespace, nfe: int, opened: dict[str, Any]
                 ) -> dict[str, Any]:
    anchors = quality.case_anchors(opened, nfe)
    st, ev, g = opened["st"], opened["ev"], opened["gits"]
    warm = [with_meta(anchors["gits"], origin="gits"), with_meta(anchors["ld3"], origin="ld3")]
    n_evo = quality.evolution_candidates(st, g["calls"], anchors["ld3_calls"], nfe)
    evo = dict(st.evolution, max_epochs=10_000)
    return {"name": f"quality cell (gmm-digits-k64, dpmpp_2m, NFE {nfe}, warm start)",
            "short": f"quality NFE {nfe}",
            "den": ev.denoiser, "feats": ev.features, "ref": ev.reference,
            "space": anchors["space"], "seeds_sched": anchors["bases"] + warm,
            "evolution": evo, "max_candidates": max(n_evo, len(anchors["bases"]) + 2)}


def run_case(case: dict[str, Any], args: argparse.Namespace, log: Any) -> dict[str, Any]:
    plain = Evaluator(case["den"], case["feats"], case["ref"])
    tree = Evaluator(case["den"], case["feats"], case["ref"], prefix_sharing=True)
    seeds = list(range(quality.SEED_BASE, quality.SEED_BASE + args.samples))
    held = list(range(quality.HELDOUT_SEED_BASE, quality.HELDOUT_SEED_BASE + args.heldout))
    evo = case["evolution"]
    runs: dict[str, list[dict[str, Any]]] = {"today": [], "level": []}
    for s in args.searcher_seeds:
        for arm in ("today", "level"):
            space = case["space"] if arm == "today" else LevelMutation(case["space"])
            searcher = EvolutionSearcher(space, "fid", "min", seed=s, seeds=case["seeds_sched"],
                                         max_candidates=case["max_candidates"], **evo)
            ev = plain if arm == "today" else tree
            t0 = time.perf_counter()
            out = search(searcher, ev, seeds, evo["population_num"])
            wall = time.perf_counter() - t0
            gens = generations(out["scored"])
            origins = [s_.meta.get("origin") for s_, _ in out["scored"]]
            runs[arm].append({"seed": s, "best": _schedule(out["schedule"]),
                              "search_fid": out["value"], "candidates": out["candidates"],
                              "wall_s": wall, "gens": gens,
                              "mutants": origins.count("mutation")})
            log(f"  {arm} seed {s}: {out['candidates']} candidates, best search FID "
                f"{out['value']:.4f}, {wall:.0f} s")
    # Speed on the populations each arm produced (searcher seed 0's).
    speed = {}
    for arm in ("level", "today"):
        speed[arm] = time_populations(plain, tree, runs[arm][0]["gens"], seeds)
        log(f"  speed on {arm} populations: plain {speed[arm]['plain_cps']:.2f} cand/s, tree "
            f"{speed[arm]['tree_cps']:.2f} cand/s, ratio {speed[arm]['ratio']:.2f}, shared "
            f"{speed[arm]['shared']:.1%}")
    share = denoiser_share(plain, case["seeds_sched"][0], seeds)
    # Held-out: every winner and the seed schedules, on the same samples and resamples.
    winners = [r["best"] for arm in ("today", "level") for r in runs[arm]]
    named = winners + list(case["seeds_sched"])
    results, feats = plain.per_sample_features(named, held)
    counts = bootstrap_counts(len(held), args.resamples, 0)
    boots, points = [], []
    for r, f in zip(results, feats):
        if not r.ok:
            raise RuntimeError(f"held-out scoring failed: {r.error}")
        f64 = f.to(torch.float64)
        points.append(float(plain.frechet.distance(f64.mean(0).numpy(),
                                                   np.cov(f64.numpy(), rowvar=False))))
        boots.append(bootstrap_fid(f, plain.frechet, counts).numpy())
    k = len(args.searcher_seeds)
    pairs = []
    for i in range(k):
        t, lv = i, k + i
        d = points[lv] - points[t]
        ci = bootstrap_interval(boots[lv] - boots[t], d)
        pairs.append({"seed": args.searcher_seeds[i], "today": points[t], "level": points[lv],
                      "today_ci": bootstrap_interval(boots[t], points[t]),
                      "level_ci": bootstrap_interval(boots[lv], points[lv]),
                      "diff": d, "diff_ci": ci})
    mean_d = float(np.mean([p["diff"] for p in pairs]))
    mean_boot = np.mean([boots[k + i] - boots[i] for i in range(k)], axis=0)
    seed_scores = {s.meta.get("family", s.meta.get("origin")): points[2 * k + j]
                   for j, s in enumerate(case["seeds_sched"])}
    return {"name": case["name"], "short": case["short"], "speed": speed,
            "denoiser_share": share, "pairs": pairs,
            "mean_diff": mean_d, "mean_diff_ci": bootstrap_interval(mean_boot, mean_d),
            "seed_scores": seed_scores,
            "runs": {arm: [{k_: v for k_, v in r.items() if k_ not in ("gens", "best")}
                           | {"best": r["best"].sigmas.tolist(),
                              "generation_sizes": [len(g) for g in r["gens"]]}
                           for r in rs] for arm, rs in runs.items()}}


# Report -----------------------------------------------------------------------------------------
def _ci(ci: Sequence[float]) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def markdown(cases: list[dict[str, Any]], args: argparse.Namespace, wall: float) -> str:
    load_avg = getattr(args, "load", None) or os.getloadavg()
    lines = [
        "# Prefix sharing with level-local mutations: candidates/s and held-out quality",
        "",
        f"Command: `python benchmarks/prefix_sharing.py {' '.join(args.argv)}` ({wall / 60:.0f} "
        "min)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, shared with other "
        f"users' jobs; torch threads {args.threads}; load average {load_avg[0]:.1f} / "
        f"{load_avg[1]:.1f} / {load_avg[2]:.1f} at the end. Times are noisy: each ratio comes "
        "from the two evaluators scoring the same generations alternately in one process.",
        "",
        f"Arms: `today` = the evolution as shipped (the space's mutation), batched evaluator; "
        f"`level` = the same evolution with `mutate_level` (one level moves), prefix-tree "
        f"evaluator. {args.samples} samples per candidate (seeds 0..), held-out "
        f"{args.heldout} samples (seeds 1,000,000..) against {args.reference} exact samples, "
        f"digits features; intervals: 95% bootstrap, {args.resamples} resamples, paired. "
        f"Searcher seeds: {', '.join(map(str, args.searcher_seeds))}.",
        "",
        "## Speed: candidates/s, prefix tree vs population-batched (the same populations)",
        "",
        "| case | populations of | candidates | plain cand/s | tree cand/s | tree / plain | "
        "first calls shared | ceiling from sharing | shared with a cache across generations "
        "(counted) | its ceiling |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cases:
        for arm in ("level", "today"):
            sp = c["speed"][arm]
            ceiling = 1 / (1 - sp["shared"] * c["denoiser_share"])
            ceiling_c = 1 / (1 - sp["shared_cached"] * c["denoiser_share"])
            lines.append(
                f"| {c['short']} | {arm} | {sp['candidates']} | {sp['plain_cps']:.2f} | "
                f"{sp['tree_cps']:.2f} | **{sp['ratio']:.2f}x** | {sp['shared']:.1%} | "
                f"{ceiling:.2f}x | {sp['shared_cached']:.1%} | {ceiling_c:.2f}x |")
    lines += [
        "",
        "First calls shared: the fraction of the candidates' steps whose state the tree did not "
        "recompute (one denoiser call each). Ceiling: the speed-up if the shared steps cost "
        "nothing and everything else (features, statistics, FID) stayed: "
        "`1 / (1 - shared x denoiser share)`, with the denoiser's share of one candidate's "
        "scoring time measured here: " + ", ".join(
            f"{c['short']}: {c['denoiser_share']:.0%}" for c in cases) + ". A cache across "
        "generations (a mutant continuing its parent's stored states) is not built; its "
        "column counts what it would share on the same populations, with every earlier "
        "prefix kept.",
        "Largest relative FID difference between the two evaluators on the same candidate: "
        + ", ".join(f"{max(c['speed'][a]['max_rel_fid_diff'] for a in c['speed']):.1e}"
                    for c in cases)
        + " (the tree's values are bitwise those of scoring each candidate alone; the batched "
        "pass groups two candidates' rows per call).",
        "",
        "## Held-out quality: level - today (paired)",
        "",
        "| case | searcher seed | today held-out FID [95% CI] | level held-out FID [95% CI] | "
        "level - today [95% CI] |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in cases:
        for p in c["pairs"]:
            lines.append(
                f"| {c['short']} | {p['seed']} | {p['today']:.4f} [{p['today_ci'][0]:.4f}, "
                f"{p['today_ci'][1]:.4f}] | {p['level']:.4f} [{p['level_ci'][0]:.4f}, "
                f"{p['level_ci'][1]:.4f}] | {p['diff']:+.4f} {_ci(p['diff_ci'])} |")
        lines.append(f"| {c['short']} | mean over seeds | | | {c['mean_diff']:+.4f} "
                     f"{_ci(c['mean_diff_ci'])} |")
    lines += ["", "Search cost and best search value per run:", "",
              "| case | arm | seed | candidates | of them mutants | best search FID | "
              "search wall s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in cases:
        for arm in ("today", "level"):
            for r in c["runs"][arm]:
                lines.append(f"| {c['short']} | {arm} | {r['seed']} | {r['candidates']} | "
                             f"{r['mutants']} | {r['search_fid']:.4f} | {r['wall_s']:.0f} |")
    lines += ["", "Baselines and warm starts on the held-out samples: " + "; ".join(
        c["short"] + ": " + ", ".join(f"{k} {v:.4f}" for k, v in c["seed_scores"].items())
        for c in cases) + "."]
    lines += ["", "Cases: " + "; ".join(f"{c['short']} = {c['name']}" for c in cases) + "."]
    worse = [f"{c['short']} seed {p['seed']}" for c in cases for p in c["pairs"]
             if p["diff_ci"][0] > 0]
    worse_mean = [c["short"] for c in cases if c["mean_diff_ci"][0] > 0]
    fast = [c["speed"]["level"]["ratio"] >= 1.3 for c in cases]
    lines += ["", "## Decision (issue 22's rule)", ""]
    verdict = ("met: the level-local operator may become the default"
               if not worse and not worse_mean and all(fast)
               else "not met: the level-local operator stays an option")
    not_worse = ("yes" if not worse and not worse_mean else
                 "no: worse (interval above 0) in " + "; ".join(worse)
                 + (" and on the mean over seeds in " + "; ".join(worse_mean)
                    if worse_mean else ""))
    lines.append(
        f"Rule: default only if held-out quality is not worse (no paired interval above 0) and "
        f"candidates/s >= 1.3x. Not worse: {not_worse}. Speed on the level arm's populations "
        "(>= 1.3x needed): " + ", ".join(f"{c['short']} {c['speed']['level']['ratio']:.2f}x"
                                         for c in cases)
        + f". Verdict: **{verdict}**.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=["quickstart", "5", "6"],
                   help="quickstart and/or quality-benchmark NFEs (dpmpp_2m)")
    p.add_argument("--searcher-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--heldout", type=int, default=10000)
    p.add_argument("--reference", type=int, default=10000)
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a small run (seconds, not an hour)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--render", type=Path, default=None,
                   help="only write the report again from a run's prefix_sharing.json")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        run_args = argparse.Namespace(**saved["args"])
        (args.out / "prefix_sharing.md").write_text(
            markdown(saved["cases"], run_args, saved["wall_s"]))
        return 0
    if args.tiny:
        args.samples, args.heldout, args.reference, args.resamples = 150, 300, 600, 50
        args.searcher_seeds = args.searcher_seeds[:1]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.0f} s] {msg}", flush=True)

    cases = []
    nfes = [int(c) for c in args.cases if c != "quickstart"]
    if "quickstart" in args.cases:
        log("quickstart")
        cases.append(run_case(quickstart_case(args), args, log))
    if nfes:
        st = quality.tiny_settings() if args.tiny else quality.full_settings()
        st.per_candidate, st.heldout, st.reference = args.samples, args.heldout, args.reference
        opened = quality.open_case("gmm-digits-k64", "dpmpp_2m", nfes, st)
        for nfe in nfes:
            log(f"quality cell NFE {nfe}")
            cases.append(run_case(quality_case(args, nfe, opened), args, log))
    wall = time.perf_counter() - t_start
    args.load = list(os.getloadavg())
    md = markdown(cases, args, wall)
    (args.out / "prefix_sharing.md").write_text(md)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / "prefix_sharing.json").write_text(json.dumps(
        {"args": settings, "wall_s": wall, "cases": cases}, indent=1, default=float))
    print(md)
    log(f"wrote {args.out / 'prefix_sharing.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
