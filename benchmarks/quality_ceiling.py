"""How much better than LD3 can a schedule get at all? Long searches, re-scored held out.

The quality benchmark (``benchmarks/quality.py``) holds the warm-started evolution to a
target: 15% better held-out FID than GITS and LD3 at every NFE <= 6, within 10x GITS's
denoiser calls. Where it misses, the question is whether the search or the problem is the
limit. This script answers it for one model and solver at given NFEs, on the quality
benchmark's exact settings (space, seeds, samples per candidate, held-out and reference
seeds, GITS and LD3 as anchors):

1. a long warm-started evolution (``--candidates``, by default 400: ~8-13x the benchmark's
   budget; population 20, mixed mutation step [0.02, 0.3], random fill) and a long Bayesian
   search (TPE, as many candidates, seeded with the baselines, GITS and LD3), both on the
   search seeds;
2. the ``--top`` best distinct schedules of both searches (by search FID) re-scored with LD3
   and GITS on the held-out seeds; paired bootstrap intervals as in ``quality.md``.

The best held-out schedule of the long searches is an estimate (from below) of how much
better than LD3 a schedule of this space can be: if it is short of 15%, the target is out of
reach of any search of the benchmark's size in this space.

    nice python benchmarks/quality_ceiling.py --solver ipndm --nfe 4 5 --out DIR
    python benchmarks/quality_ceiling.py --merge DIR1/quality_ceiling.json ... --out DIR
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from searchd.schedule import Schedule
from searchd.schedules.spaces import with_meta
from searchd.searchers.bayes import BayesSearcher
from searchd.searchers.evolution import EvolutionSearcher

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (the benchmark beside this script: its settings and parts)

RESULTS = Path(__file__).resolve().parent / "results"
LONG_EVOLUTION = dict(population_num=20, select_num=8, mutation_num=12, crossover_num=8,
                      m_prob=0.4, mutation_scale=(0.02, 0.3), random_fill=True)


def _same(a: Schedule, b: Schedule) -> bool:
    return len(a.sigmas) == len(b.sigmas) and bool(
        np.allclose(a.sigmas, b.sigmas, rtol=1e-6, atol=1e-9))


def ceiling(model: str, solver: str, nfes: Sequence[int], candidates: int, top: int,
            st: Any, log: Any) -> list[dict[str, Any]]:
    case = Q.open_case(model, solver, nfes, st)
    st, ev = case["st"], case["ev"]
    search_seeds, held_seeds = case["search_seeds"], case["held_seeds"]
    rows = []
    for nfe in nfes:
        t0 = time.perf_counter()
        a = Q.case_anchors(case, nfe)
        n, space, bases, gits, ld3 = a["n"], a["space"], a["bases"], a["gits"], a["ld3"]
        warm = [with_meta(gits, origin="gits"), with_meta(ld3, origin="ld3")]
        runs = {
            "evolution": (EvolutionSearcher(space, "fid", "min", max_epochs=10_000,
                                            seed=st.seed, seeds=bases + warm,
                                            max_candidates=candidates, **LONG_EVOLUTION),
                          LONG_EVOLUTION["population_num"]),
            "bayes": (BayesSearcher(space, "fid", "min", num_samples=candidates,
                                    seed=st.seed, seeds=bases + warm,
                                    n_startup_trials=st.bayes_startup), st.batch),
        }
        scored: list[tuple[float, str, Schedule]] = []
        search = {}
        for name, (searcher, batch) in runs.items():
            t1 = time.perf_counter()
            out = Q.run_searcher(searcher, ev, search_seeds, batch)
            scored += [(v, name, s) for s, v in out["scored"] if v is not None]
            search[name] = {"candidates": out["candidates"], "best_search_fid": out["value"],
                            "wall_s": time.perf_counter() - t1}
            log(f"  {solver} NFE {nfe}: {name}: {out['candidates']} candidates, best search "
                f"FID {out['value']:.4f} in {search[name]['wall_s']:.0f} s")
        # The anchors come back through the space's encode/decode: match them by sigmas.
        ld3_search = next(v for v, _, s in scored if _same(s, ld3))
        best: dict[str, Schedule] = {}
        for v, name, s in sorted(scored, key=lambda t: t[0]):
            if s.id not in best and not _same(s, ld3) and not _same(s, gits):
                best[s.id] = with_meta(s, found_by=name, search_fid=v)
            if len(best) == top:
                break
        sched = {"ld3": ld3, "gits": gits, **{f"top{i + 1}": s
                                               for i, s in enumerate(best.values())}}
        held = Q.heldout(ev, sched, held_seeds, st)
        ref = held["ld3"]
        tops = []
        for i, s in enumerate(best.values()):
            h = held[f"top{i + 1}"]
            rel = 1.0 - h["fid"] / ref["fid"]
            tops.append({"sigmas": [float(x) for x in s.sigmas], "found_by": s.meta["found_by"],
                         "search_fid": float(s.meta["search_fid"]), "fid": h["fid"],
                         "fid_ci": Q._ci(h["boot"], h["fid"]), "vs_ld3": rel,
                         "vs_ld3_ci": Q._ci(1.0 - h["boot"] / ref["boot"], rel)})
        k = int(np.argmin([t["fid"] for t in tops]))
        rows.append({
            "model": model, "solver": solver, "nfe": nfe, "n_steps": n,
            "candidates": candidates, "search": search,
            "ld3": {"fid": ref["fid"], "fid_ci": Q._ci(ref["boot"], ref["fid"]),
                    "search_fid": ld3_search, "sigmas": [float(x) for x in ld3.sigmas]},
            "gits": {"fid": held["gits"]["fid"],
                     "fid_ci": Q._ci(held["gits"]["boot"], held["gits"]["fid"])},
            "top": tops, "best": k, "wall_s": time.perf_counter() - t0,
        })
        b = tops[k]
        log(f"  {solver} NFE {nfe}: best held-out {b['fid']:.4f} vs LD3 {ref['fid']:.4f}: "
            f"{100 * b['vs_ld3']:.1f}% better [{100 * b['vs_ld3_ci'][0]:.1f}, "
            f"{100 * b['vs_ld3_ci'][1]:.1f}]")
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(rows: Sequence[dict[str, Any]], st: Any, command: str, wall: float,
             threads: int) -> str:
    lines = [
        "# How much better than LD3 can a schedule get? Long searches, held out",
        "",
        f"Command: `{command}`",
        "",
        "Settings: those of `benchmarks/quality.py` (space, search seeds 0.. with "
        f"{st.per_candidate} samples per candidate, {st.heldout} held-out samples from seeds "
        f"{Q.HELDOUT_SEED_BASE}.., {st.reference} reference samples, GITS and LD3 as there). "
        "Searches: a warm-started evolution (population 20, select 8, 12 mutants + 8 "
        "children, mutation step [0.02, 0.3], random fill) and TPE, each seeded with the "
        "three baselines, GITS and LD3, each scoring the number of candidates listed. The "
        "best distinct schedules of both (by search FID) are re-scored held out with LD3; "
        "'better than LD3' = 1 - FID / FID(LD3), with a paired 95% bootstrap interval "
        f"({st.resamples} resamples). The benchmark's target is 15%.",
        "",
        "| model | solver | NFE | candidates (each search) | LD3 held-out | best held-out "
        "[95% CI] | better than LD3 [95% CI] | found by | top schedules' range vs LD3 | "
        "sigmas of the best |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        b = r["top"][r["best"]]
        rels = [t["vs_ld3"] for t in r["top"]]
        lines.append(
            f"| {r['model']} | {r['solver']} | {r['nfe']} | {r['candidates']} | "
            f"{r['ld3']['fid']:.4f} | {b['fid']:.4f} [{b['fid_ci'][0]:.4f}, "
            f"{b['fid_ci'][1]:.4f}] | {_pct(b['vs_ld3'])} [{100 * b['vs_ld3_ci'][0]:.1f}, "
            f"{100 * b['vs_ld3_ci'][1]:.1f}] | {b['found_by']} | {_pct(min(rels))} to "
            f"{_pct(max(rels))} | [{', '.join(f'{x:.3g}' for x in b['sigmas'])}] |")
    lines += [
        "",
        "Search FID (search seeds) of each search's best against LD3's:",
        "",
        "| model | solver | NFE | LD3 | evolution | bayes | wall s (evolution, bayes) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        s = r["search"]
        lines.append(
            f"| {r['model']} | {r['solver']} | {r['nfe']} | {r['ld3']['search_fid']:.4f} | "
            f"{s['evolution']['best_search_fid']:.4f} | {s['bayes']['best_search_fid']:.4f} | "
            f"{s['evolution']['wall_s']:.0f}, {s['bayes']['wall_s']:.0f} |")
    lines += [
        "",
        f"Total wall time {wall / 60:.1f} min"
        + (" (summed over the runs merged)" if " ; " in command else "")
        + f". Machine: {platform.machine()}, "
        f"torch {torch.__version__}, {threads} thread(s) per process, shared with other "
        "jobs.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gmm-digits-k64")
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--nfe", nargs="+", type=int, default=[4])
    p.add_argument("--candidates", type=int, default=400,
                   help="candidates each long search scores (default 400)")
    p.add_argument("--top", type=int, default=5, help="schedules re-scored held out")
    p.add_argument("--tiny", action="store_true", help="a small, fast version (tests)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                   help="compute nothing: merge these quality_ceiling.json files into <out>")
    a = p.parse_args(argv)
    st = Q.tiny_settings() if a.tiny else Q.full_settings()
    if a.candidates < 1 or a.top < 1:
        p.error(f"--candidates {a.candidates} and --top {a.top}: both must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = ("python benchmarks/quality_ceiling.py "
               + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    if a.merge is not None:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        rows = [r for part in parts for r in part["rows"]]
        rows.sort(key=lambda r: (r["model"], r["solver"], r["nfe"]))
        res = {"rows": rows, "wall_s": sum(p_["wall_s"] for p_ in parts),
               "command": " ; ".join(p_["command"] for p_ in parts),
               "threads": max(int(p_.get("threads", 1)) for p_ in parts)}
    else:
        t0 = time.perf_counter()

        def log(msg: str) -> None:
            print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

        rows = ceiling(a.model, a.solver, a.nfe, a.candidates, a.top, st, log)
        res = {"rows": rows, "wall_s": time.perf_counter() - t0, "command": command,
               "threads": torch.get_num_threads()}
    (out / "quality_ceiling.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (out / "quality_ceiling.md").write_text(markdown(res["rows"], st, res["command"],
                                                     res["wall_s"], res["threads"]))
    print(f"wrote {out / 'quality_ceiling.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
