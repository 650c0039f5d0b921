"""Variants of the warm-started evolution at the quality benchmark's budget, over searcher seeds.

``benchmarks/quality.py`` runs each searcher once (searcher seed 0), so one run's margin over
LD3 mixes the algorithm with the luck of its seed. This script replays only the evolution,
on the benchmark's exact settings (space, anchors, search and held-out seeds, budget: 10x
GITS's denoiser calls with GITS and LD3 paid from it), for several variants of its settings
and several searcher seeds, and re-scores every winner on the held-out seeds against LD3
(paired bootstrap, as in ``quality.md``). Variants are given as ``name=JSON`` (keywords of
``EvolutionSearcher`` over the benchmark's own); ``benchmark`` (no change) is always run.

    nice python benchmarks/quality_variants.py --solver ipndm --nfe 4 5 --seeds 0 1 2 \\
        --variant 'screened={"predictor_top_fraction": 0.25}' --out DIR
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
from searchd.searchers.evolution import EvolutionSearcher

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (the benchmark beside this script: its settings and parts)

RESULTS = Path(__file__).resolve().parent / "results"


def replay(model: str, solver: str, nfes: Sequence[int], variants: dict[str, dict[str, Any]],
           seeds: Sequence[int], st: Any, log: Any) -> list[dict[str, Any]]:
    case = Q.open_case(model, solver, nfes, st)
    st, ev, g = case["st"], case["ev"], case["gits"]
    search_seeds, held_seeds = case["search_seeds"], case["held_seeds"]
    rows = []
    for nfe in nfes:
        a = Q.case_anchors(case, nfe)
        space, bases, gits, ld3 = a["space"], a["bases"], a["gits"], a["ld3"]
        warm = [with_meta(gits, origin="gits"), with_meta(ld3, origin="ld3")]
        n_evo = Q.evolution_candidates(st, g["calls"], a["ld3_calls"], nfe)
        winners: dict[str, Schedule] = {}
        runs = []
        for name, kw in variants.items():
            for seed in seeds:
                t0 = time.perf_counter()
                params = {**st.evolution, **kw}
                searcher = EvolutionSearcher(
                    space, "fid", "min", max_epochs=10_000, seed=seed, seeds=bases + warm,
                    max_candidates=max(n_evo, len(bases) + 2), **params)
                out = Q.run_searcher(searcher, ev, search_seeds,
                                     int(params.get("population_num", 32)))
                key = f"{name}/{seed}"
                winners[key] = out["schedule"]
                runs.append({"variant": name, "seed": seed, "candidates": out["candidates"],
                             "search_fid": out["value"], "wall_s": time.perf_counter() - t0,
                             "sigmas": [float(x) for x in out["schedule"].sigmas]})
                log(f"  {solver} NFE {nfe}: {key}: {out['candidates']} candidates, best "
                    f"search FID {out['value']:.4f}")
        held = Q.heldout(ev, {"ld3": ld3, **winners}, held_seeds, st)
        ref = held["ld3"]
        for run in runs:
            h = held[f"{run['variant']}/{run['seed']}"]
            rel = 1.0 - h["fid"] / ref["fid"]
            run.update(fid=h["fid"], vs_ld3=rel,
                       vs_ld3_ci=Q._ci(1.0 - h["boot"] / ref["boot"], rel))
        rows.append({"model": model, "solver": solver, "nfe": nfe, "budget_candidates": n_evo,
                     "ld3": {"fid": ref["fid"], "sigmas": [float(x) for x in ld3.sigmas]},
                     "runs": runs})
        for name in variants:
            rel = [x["vs_ld3"] for x in runs if x["variant"] == name]
            log(f"  {solver} NFE {nfe}: {name}: better than LD3 by "
                + ", ".join(f"{100 * v:.1f}%" for v in rel) + f" (mean {100 * np.mean(rel):.1f}%)")
    return rows


def markdown(rows: Sequence[dict[str, Any]], variants: dict[str, dict[str, Any]],
             st: Any, command: str, wall: float, threads: int) -> str:
    seeds = sorted({x["seed"] for r in rows for x in r["runs"]})
    lines = [
        "# Variants of the warm-started evolution at the benchmark's budget, over seeds",
        "",
        f"Command: `{command}`",
        "",
        "Settings: those of `benchmarks/quality.py` (budget 10x GITS's calls with GITS and "
        f"LD3 paid from it, {st.per_candidate} samples per candidate, {st.heldout} held-out "
        "samples). Variants (the evolution's settings in full; **benchmark** is "
        "`quality.py`'s evolution when the first run listed in the command was made): "
        + "; ".join(f"**{k}**: `{json.dumps(v)}`" for k, v in variants.items()) + ". "
        "Cells: how much better than LD3 the winner's held-out FID is (1 - FID / FID(LD3)), "
        f"per searcher seed ({', '.join(map(str, seeds))}), then the mean and the count of "
        "seeds reaching the 15% target.",
        "",
        "| model | solver | NFE | candidates | LD3 held-out | variant | per seed | mean | "
        ">= 15% |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for name in variants:
            rel = [x["vs_ld3"] for x in r["runs"] if x["variant"] == name]
            if not rel:
                continue
            lines.append(
                f"| {r['model']} | {r['solver']} | {r['nfe']} | {r['budget_candidates']} | "
                f"{r['ld3']['fid']:.4f} | {name} | "
                + ", ".join(f"{100 * v:.1f}%" for v in rel)
                + f" | {100 * np.mean(rel):.1f}% | {sum(v >= 0.15 for v in rel)}/{len(rel)} |")
    merged = " (summed over the runs merged)" if " ; " in command else ""
    lines += ["", f"Total wall time {wall / 60:.1f} min{merged}. Machine: "
              f"{platform.machine()}, torch {torch.__version__}, {threads} thread(s) per "
              "process, shared with other jobs.", ""]
    return "\n".join(lines)


def merge(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Runs in one table. A variant is its full settings: equal settings under two names are
    one variant (the first name), one name with other settings gets a suffix. Runs of the
    same variant, seed and case are kept once (the first: a replay is deterministic).
    Parts written before the settings were stored list only the changes, made to the
    benchmark's evolution of that time (``quality.OLD_EVOLUTION``)."""
    canon: dict[str, str] = {}  # settings (JSON) -> name
    variants: dict[str, dict[str, Any]] = {}
    rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for part in parts:
        full = part["variants"] if part.get("full_settings") else {
            k: Q.plain({**Q.OLD_EVOLUTION, **kw}) for k, kw in part["variants"].items()}
        rename = {}
        for name, settings in full.items():
            key = Q._norm(settings)
            if key not in canon:
                new = name if name not in variants else f"{name}-{len(variants)}"
                canon[key], variants[new] = new, settings
            rename[name] = canon[key]
        for r in part["rows"]:
            cur = rows.setdefault((r["model"], r["solver"], r["nfe"]), {**r, "runs": []})
            have = {(x["variant"], x["seed"]) for x in cur["runs"]}
            for x in r["runs"]:
                x = {**x, "variant": rename[x["variant"]]}
                if (x["variant"], x["seed"]) not in have:
                    cur["runs"].append(x)
    return {"rows": [rows[k] for k in sorted(rows)], "variants": variants,
            "full_settings": True, "wall_s": sum(x["wall_s"] for x in parts),
            "command": " ; ".join(x["command"] for x in parts),
            "threads": max(int(x.get("threads", 1)) for x in parts)}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant {text!r}: expected name=JSON, e.g. "
                         "'screened={\"predictor_top_fraction\": 0.25}'")
    kw = json.loads(body)
    if not isinstance(kw, dict):
        raise ValueError(f"--variant {text!r}: the JSON must be an object of keywords")
    return name, kw


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gmm-digits-k64")
    p.add_argument("--solver", default="dpmpp_2m")
    p.add_argument("--nfe", nargs="+", type=int, default=[4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON")
    p.add_argument("--tiny", action="store_true", help="a small, fast version (tests)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                   help="compute nothing: merge these quality_variants.json files into <out>")
    a = p.parse_args(argv)
    st = Q.tiny_settings() if a.tiny else Q.full_settings()
    try:
        variants = {"benchmark": {}, **dict(parse_variant(v) for v in a.variant)}
    except ValueError as e:
        p.error(str(e))
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = ("python benchmarks/quality_variants.py "
               + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    if a.merge is not None:
        res = merge([json.loads(Path(f).read_text()) for f in a.merge])
    else:
        t0 = time.perf_counter()

        def log(msg: str) -> None:
            print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

        rows = replay(a.model, a.solver, a.nfe, variants, a.seeds, st, log)
        full = {k: Q.plain({**st.evolution, **kw}) for k, kw in variants.items()}
        res = {"rows": rows, "variants": full, "full_settings": True,
               "wall_s": time.perf_counter() - t0, "command": command,
               "threads": torch.get_num_threads()}
    (out / "quality_variants.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (out / "quality_variants.md").write_text(markdown(res["rows"], res["variants"], st,
                                                      res["command"], res["wall_s"],
                                                      res["threads"]))
    print(f"wrote {out / 'quality_variants.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
