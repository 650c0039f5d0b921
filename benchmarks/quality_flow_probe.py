"""Probes of the flow target's misses (digits-flow-s, euler): is the search or the space the limit?

``benchmarks/quality.py`` holds the warm-started evolution on digits-flow-s with euler to
the flow target at NFE 4-6 within 10x GITS's denoiser calls. Where it misses, this script
looks at the schedules themselves, on the benchmark's evaluator and search seeds
(0 .. ``--samples`` - 1), with the top level at the model's sigma_max (t = 0.988) and a final 0:

- ``--points``: FID of given schedules (flow times of the positive levels below the top);
- ``--grid``: a coarse grid over the free levels (NFE 4: the last level, then the two gaps
  above it), every point's FID, best first;
- ``--nelder-mead``: a local search (scipy's Nelder-Mead, no budget) from ``--start``: the
  space's local ceiling near a searched winner.

``--replay`` runs the benchmark's warm-started evolution (``quality.run_variant``: the same
space, anchors, search seeds and budget) for ``--searcher-seeds`` under each of
``--configs`` (EvolutionSearcher keywords over the benchmark's, e.g. ``refine=11``; ``-``
for the benchmark's own), and re-scores each winner on a validation block of search-range
seeds (``--validation``: 5,000 .. 8,999 by default, disjoint from the search and held-out
seeds): the numbers a searcher option is chosen on. Candidates are scored once per process
(by schedule id), so configs that share a prefix of their search share its cost.

``--heldout`` re-scores the best schedule found (and the ``--points``) on the benchmark's
held-out seeds beside uniform t to 0 and GITS, with paired bootstrap intervals as in
``quality.md``: for the report only; no choice is made on those numbers.

    nice python benchmarks/quality_flow_probe.py --nfe 6 --nelder-mead \\
        --start 0.78 0.659 0.521 0.354 0.165 --max-evals 80 --heldout --threads 1
    nice python benchmarks/quality_flow_probe.py --nfe 6 --replay --searcher-seeds 0 1 2 \\
        --configs - "refine=11 refine_batch=1" --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from searchd.evaluation import Evaluator
from searchd.schedule import Schedule
from searchd.schedules import baseline
from searchd.schedules.baselines import flow_sigma

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as Q  # noqa: E402  (the benchmark beside this script: its settings and parts)

MODEL = "digits-flow-s"


def schedule_of(ts: Sequence[float], sigma_max: float) -> Schedule:
    """An euler schedule from the flow times ``ts`` of the levels below the top one: the top
    at ``sigma_max``, then sigma = t / (1 - t) of each, then the final 0 (NFE = len(ts) + 1)."""
    sig = np.concatenate([[sigma_max], flow_sigma(np.asarray(ts, dtype=np.float64)), [0.0]])
    return Schedule(sig, solver="euler")


def valid(ts: Sequence[float], t_top: float, t_min: float) -> bool:
    """Strictly decreasing below the top and above the model's lowest level."""
    t = np.concatenate([[t_top], np.asarray(ts, dtype=np.float64)])
    return bool(np.all(np.diff(t) < 0) and t[-1] > t_min)


def grid_points(nfe: int) -> list[list[float]]:
    """NFE 4's coarse grid: the last level in {0.22, 0.26, 0.30, 0.34}, the gap above it in
    {0.12, 0.2, 0.28}, the next in {0.1, 0.17, 0.25} (points with the highest level < 0.95)."""
    if nfe != 4:
        raise ValueError(f"--grid: nfe = {nfe}; the grid is defined for NFE 4 only")
    pts = []
    for t3, d2, d1 in itertools.product([0.22, 0.26, 0.30, 0.34], [0.12, 0.2, 0.28],
                                        [0.1, 0.17, 0.25]):
        t2 = t3 + d2
        if t2 + d1 < 0.95:
            pts.append([t2 + d1, t2, t3])
    return pts


def nelder_mead(ev: Evaluator, start: Sequence[float], seeds: Sequence[int], max_evals: int,
                log: Any) -> dict[str, Any]:
    """Nelder-Mead on the free flow times from ``start``; an invalid point scores 50."""
    from scipy.optimize import minimize

    den = ev.denoiser
    t_top, t_min = den.sigma_max / (1 + den.sigma_max), den.sigma_min / (1 + den.sigma_min)
    best: dict[str, Any] = {"fid": float("inf"), "t": list(start), "evals": 0}

    def f(x: np.ndarray) -> float:
        if not valid(x, t_top, t_min):
            return 50.0
        v = float(ev.evaluate([schedule_of(x, den.sigma_max)], seeds)[0].metrics["fid"])
        best["evals"] += 1
        if v < best["fid"]:
            best.update(fid=v, t=[float(a) for a in x])
        log(f"  {best['evals']}: {np.round(x, 4).tolist()} {v:.4f} (best {best['fid']:.4f})")
        return v

    minimize(f, np.asarray(start, dtype=np.float64), method="Nelder-Mead",
             options={"maxfev": max_evals, "xatol": 1e-3, "fatol": 1e-4})
    return best


class CachedEvaluator:
    """An ``Evaluator`` that scores each (schedule, seeds) once per process: replays of
    searches that share their first candidates pay for them once. ``fresh`` counts the
    candidates actually scored."""

    def __init__(self, ev: Evaluator) -> None:
        self.ev, self.denoiser = ev, ev.denoiser
        self._cache: dict[tuple[str, int, int, int], Any] = {}
        self.fresh = 0

    def evaluate(self, schedules: Sequence[Schedule], seeds: Sequence[int]) -> list[Any]:
        """``Evaluator.evaluate``, from the cache where the same candidate was scored."""
        key = (len(seeds), int(seeds[0]), int(seeds[-1]))
        todo = [s for s in schedules if (s.id, *key) not in self._cache]
        uniq = list({s.id: s for s in todo}.values())
        if uniq:
            for s, r in zip(uniq, self.ev.evaluate(uniq, seeds)):
                self._cache[(s.id, *key)] = r
            self.fresh += len(uniq)
        return [self._cache[(s.id, *key)] for s in schedules]


def parse_config(text: str) -> dict[str, Any]:
    """``"KEY=VALUE KEY=VALUE"`` (values as YAML; ``-``: none) -> EvolutionSearcher
    keywords (``quality.evolution_keywords``); a key the benchmark does not let change is
    refused."""
    try:
        return Q.evolution_keywords([kv for kv in text.split() if kv != "-"])
    except ValueError as e:
        raise ValueError(f"config {text!r}: {e}") from None


def replay(ev: Evaluator, st: Q.Settings, nfe: int, configs: Sequence[str],
           searcher_seeds: Sequence[int], validation: Sequence[int], log: Any
           ) -> list[dict[str, Any]]:
    """The benchmark's warm-started evolution per config and searcher seed, its winner
    re-scored on the validation seeds."""
    from searchd.config import steps_for_nfe

    cached = CachedEvaluator(ev)
    den = ev.denoiser
    parsed = [(c, parse_config(c)) for c in configs]

    def space_for(n_steps: int) -> Q.ContinuousSpace:
        return Q.ContinuousSpace(n_steps, den.sigma_min, den.sigma_max, True,
                                 solver=st.solver, **st.space)

    case = {"st": st, "ev": ev, "space_for": space_for,
            "gits": Q.gits_all(ev, st, space_for(steps_for_nfe(st.solver, nfe)))}
    anchors = Q.case_anchors(case, nfe)
    seeds = anchors["bases"] + [Q.with_meta(anchors["gits"], origin="gits"),
                                Q.with_meta(anchors["ld3"], origin="ld3")]
    n_evo = Q.evolution_candidates(st, case["gits"]["calls"], anchors["ld3_calls"], nfe)
    search_seeds = list(range(Q.SEED_BASE, Q.SEED_BASE + st.per_candidate))
    rows = []
    for text, kw in parsed:
        cfg = replace(st, evolution={**st.evolution, **kw})
        for seed in searcher_seeds:
            out = Q.run_variant("evolution", cfg, anchors["space"], cached, search_seeds,
                                seeds, n_evo, seed, nfe)
            val = float(cached.evaluate([out["schedule"]], validation)[0].metrics["fid"])
            t = [round(float(x / (1 + x)), 4) for x in out["schedule"].sigmas]
            rows.append({"config": text, "searcher_seed": seed, "search_fid": out["value"],
                         "validation_fid": val, "candidates": out["candidates"],
                         "n_evo": n_evo, "t": t})
            log(f"replay [{text}] seed {seed}: search {out['value']:.4f}, validation "
                f"{val:.4f}, {out['candidates']} candidates, t = {t} "
                f"({cached.fresh} scored so far)")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nfe", type=int, default=4)
    p.add_argument("--samples", type=int, default=2000, help="search seeds 0 .. samples - 1")
    p.add_argument("--points", type=str, default="[]",
                   help="JSON list of schedules, each the flow times below the top level")
    p.add_argument("--grid", action="store_true")
    p.add_argument("--nelder-mead", action="store_true")
    p.add_argument("--start", type=float, nargs="+", default=None)
    p.add_argument("--max-evals", type=int, default=80)
    p.add_argument("--heldout", action="store_true")
    p.add_argument("--replay", action="store_true",
                   help="the benchmark's evolution per --configs and --searcher-seeds, "
                   "winners re-scored on the validation seeds")
    p.add_argument("--configs", nargs="+", default=["-"],
                   help="each a space-separated list of EvolutionSearcher KEY=VALUE ('-': "
                   "the benchmark's settings)")
    p.add_argument("--searcher-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--validation", type=int, nargs=2, default=[5000, 4000],
                   metavar=("FIRST", "COUNT"), help="validation seeds (search range)")
    p.add_argument("--tiny", action="store_true", help="a small, fast version (tests)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    points = json.loads(a.points)
    if not isinstance(points, list) or any(len(x) != a.nfe - 1 for x in points):
        p.error(f"--points {a.points!r}: a JSON list of lists of {a.nfe - 1} flow times")
    if a.nelder_mead and (a.start is None or len(a.start) != a.nfe - 1):
        p.error(f"--nelder-mead needs --start with {a.nfe - 1} flow times")
    try:
        for c in a.configs:
            parse_config(c)
    except ValueError as e:
        p.error(str(e))
    first, count = a.validation
    if a.replay and (count < 1 or first < a.samples
                     or first + count > Q.HELDOUT_SEED_BASE):
        p.error(f"--validation {first} {count}: the block must lie after the search seeds "
                f"(>= {a.samples}) and before the held-out ones ({Q.HELDOUT_SEED_BASE})")
    if a.threads:
        torch.set_num_threads(a.threads)
    st = Q.tiny_settings() if a.tiny else Q.full_settings()
    st.solver, st.solvers = "euler", ["euler"]
    ev = Q.make_evaluator(MODEL, st)
    den = ev.denoiser
    seeds = list(range(a.samples))
    out: dict[str, Any] = {"nfe": a.nfe, "samples": a.samples,
                           "command": "python benchmarks/quality_flow_probe.py "
                           + " ".join(sys.argv[1:] if argv is None else argv)}

    def score(pts: list[list[float]]) -> list[dict[str, Any]]:
        res = ev.evaluate([schedule_of(x, den.sigma_max) for x in pts], seeds)
        return sorted(({"t": x, "fid": float(r.metrics["fid"])} for x, r in zip(pts, res)),
                      key=lambda e: e["fid"])

    if points:
        out["points"] = score(points)
    if a.grid:
        out["grid"] = score(grid_points(a.nfe))
    if a.nelder_mead:
        out["nelder_mead"] = nelder_mead(ev, a.start, seeds, a.max_evals, print)
    for key in ("points", "grid"):
        for e in out.get(key, []):
            print(f"{key}: {np.round(e['t'], 4).tolist()} {e['fid']:.4f}")
    if a.replay:  # the benchmark's flow case: --baselines flow --space warp=flow shift=1
        st.per_candidate, st.baselines = a.samples, "flow"
        st.space = dict(st.space, warp="flow", shift=1.0)
        out["replay"] = replay(ev, st, a.nfe, a.configs, a.searcher_seeds,
                               list(range(first, first + count)), print)
    if "nelder_mead" in out:
        nm = out["nelder_mead"]
        print(f"nelder-mead: {nm['evals']} evaluations, best {np.round(nm['t'], 4).tolist()} "
              f"{nm['fid']:.4f}")
    if a.heldout:
        out["heldout"] = heldout(ev, st, a.nfe, out)
        for name, e in out["heldout"].items():
            print(f"held out: {name}: {json.dumps(e)}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def heldout(ev: Evaluator, st: Q.Settings, nfe: int, out: dict[str, Any]
            ) -> dict[str, dict[str, Any]]:
    """Held-out FID of the probes' schedules beside uniform t to 0 and GITS (paired bootstrap
    over the benchmark's held-out seeds; gains as 1 - FID / FID of the other)."""
    den = ev.denoiser
    case = {"gits": Q.gits_all(ev, st, Q.ContinuousSpace(nfe, den.sigma_min, den.sigma_max,
                                                            True, solver="euler"))}
    sched = {"uniform t, to 0": Schedule(baseline("flow_uniform", nfe, den.sigma_min,
                                                   den.sigma_max, True, to_zero=True),
                                          solver="euler"),
             "GITS": Q.gits_for(case["gits"], nfe, "euler")}
    if "nelder_mead" in out:
        sched["nelder-mead best"] = schedule_of(out["nelder_mead"]["t"], den.sigma_max)
    for i, e in enumerate(out.get("points", [])):
        sched[f"point {i}"] = schedule_of(e["t"], den.sigma_max)
    held_seeds = range(Q.HELDOUT_SEED_BASE, Q.HELDOUT_SEED_BASE + st.heldout)
    held = Q.heldout(ev, sched, list(held_seeds), st)
    res = {}
    for name, h in held.items():
        e: dict[str, Any] = {"fid": h["fid"], "fid_ci": Q._ci(h["boot"], h["fid"]),
                             "t": [float(s / (1 + s)) for s in sched[name].sigmas]}
        for other in ("uniform t, to 0", "GITS"):
            rel = 1.0 - h["fid"] / held[other]["fid"]
            e[f"vs {other}"] = {"improvement": rel,
                                "ci": Q._ci(1.0 - h["boot"] / held[other]["boot"], rel)}
        res[name] = e
    return res


if __name__ == "__main__":
    raise SystemExit(main())
