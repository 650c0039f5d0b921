"""Quality benchmark: searchd's searched schedules against the published ones, on held-out FID.

For each model, solver (dpmpp_2m by default; ``--solvers``) and NFE, the schedules compared are:

- not searched: polynomial rho = 7 (EDM), logsnr (uniform in log-SNR), time_uniform (VP);
- the published methods, as searchd runs them (``searchd.methods``): GITS (defaults:
  256 warm-up samples, 61-point grid, Heun teacher, ``dev``, coefficient 1.15) and LD3
  (defaults: 64 training samples, 100 Adam iterations, Heun teacher of 64 steps, the loss the
  actors use: the digits feature network's space);
- searchd's searches on FID: evolution warm-started from GITS and LD3
  (``search.evolution.warm_start: [gits, ld3]``, with the product's default pre-screen of
  offspring, ``search.predictor``), Bayesian (TPE) and random search.

Every search scores candidates on the search seeds (0 ..), and is then re-scored with every
other schedule on held-out seeds (1,000,000 ..) that no search saw, against reference
statistics of exact model samples (seeds 2,000,000 ..). For every schedule the table gives
the held-out FID with its 95% bootstrap interval (200 resamples, the same sample indices
for every schedule), the paired difference to the best non-searched schedule (chosen on the
search seeds, as ``python -m searchd.search`` chooses its best baseline) with its interval,
and the search cost: denoiser calls (samples through the network in forward calls: a
candidate scored on n samples at NFE k costs n k; GITS's teacher and LD3's teacher and
training counted by ``counting.CountingDenoiser``) and wall time.

Budget: each search gets ``--budget-factor`` (10) times GITS's denoiser calls in all. The
warm-started evolution pays for GITS and LD3 out of it; Bayes and random spend it all on
candidates. GITS's teacher trajectory and cost matrix do not depend on the number of steps
(for every solver with Euler jumps): they are computed once per model, and the DP is run per
NFE; the cost reported at every NFE is that of the whole computation (what one run costs).

Target (issue 7): warm-started evolution beats both GITS and LD3 by >= 15% held-out FID at
every NFE <= 6, at no more than 10x GITS's denoiser calls.

    nice python benchmarks/quality.py                 # the full run (results/quality.md, .png)
    python benchmarks/quality.py --tiny --out DIR     # a small version (the test suite's)

Flow models (issue 20): ``--baselines flow`` replaces the three non-searched schedules by the
flow-time families flow users run (``BASELINE_SETS["flow"]``), ``--space warp=flow shift=1``
warps the search space in flow time, ``--searches evolution`` runs the warm-started evolution
only. Target (euler, NFE <= 6): the evolution >= 25% better held-out FID than the best flow
baseline and >= 15% better than GITS and LD3, every interval excluding 0
(``flow_target_met``; other solvers' rows show it as not required):

    nice python benchmarks/quality.py --models digits-flow-s --solvers euler --nfe 4 5 6 \
        --baselines flow --searches evolution --space warp=flow shift=1 --threads 1

``--evolution KEY=VALUE`` sets EvolutionSearcher keywords over the benchmark's (e.g.
``mutation=level``, or ``refine=11 refine_batch=1``: the last 11 candidates as a local
search around the incumbent, what the flow target at NFE 6 was measured with);
``--variants evolution race halving`` runs racing and successive halving beside it within
the same budget, each variant's row with its gains over GITS, LD3 and the best
non-searched schedule (``vs_fixed``) and the flow target (``flow_met``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from searchd.config import PredictorSection, steps_for_nfe
from searchd.evaluation import Evaluator, load_features
from searchd.evaluation.frechet import FrechetReference
from searchd.evaluation.heldout import bootstrap_counts, bootstrap_fid, bootstrap_interval
from searchd.evaluation.reference import exact_reference
from searchd.loop import EvaluatorScorer, SearchLoop
from searchd.methods.anchors import compute_anchor
from searchd.methods.counting import CountingDenoiser, warmup_noise
from searchd.methods.gits import gits_dp, gits_plan, path_cost
from searchd.models import load
from searchd.schedule import Schedule
from searchd.schedules import baseline
from searchd.schedules.spaces import ContinuousSpace, with_meta
from searchd.searchers.base import ScheduleSearcher

RESULTS = Path(__file__).resolve().parent / "results"
SEED_BASE = 0
HELDOUT_SEED_BASE = 1_000_000
REFERENCE_SEED_BASE = 2_000_000
FLOOR_SEED_BASE = 3_000_000
# Sets of non-searched schedules (``--baselines``): name -> (family, params) of
# searchd.schedules.baselines. "edm" (the default): the benchmark's three; "flow": what users
# of rectified-flow models run (uniform t, SD3's shift 3, Flux's dynamic shift, the beta
# schedule), each as diffusers' set_timesteps places it and, where users also run it so, with
# the grid run down to t = 0 (Flux's pipeline, ComfyUI).
BASELINE_SETS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "edm": {"polynomial": ("polynomial", {"rho": 7}), "logsnr": ("logsnr", {}),
            "time_uniform": ("time_uniform", {})},
    "flow": {"flow_uniform": ("flow_uniform", {}),
             "flow_uniform_to0": ("flow_uniform", {"to_zero": True}),
             "flow_shift3": ("flow_shift", {"shift": 3.0}),
             "flow_shift3_to0": ("flow_shift", {"shift": 3.0, "to_zero": True}),
             # Flux's mu for 64 tokens (an 8x8 image, one token per pixel).
             "flow_flux": ("flow_flux", {"image_seq_len": 64}),
             "flow_beta": ("flow_beta", {})},
}
FIXED = tuple(BASELINE_SETS["edm"])
SEARCHES = ("evolution", "bayes", "random")
METHODS = (*FIXED, "gits", "ld3", *SEARCHES)
LABELS = {
    "polynomial": "polynomial rho=7", "logsnr": "logSNR", "time_uniform": "time-uniform",
    "flow_uniform": "uniform t", "flow_uniform_to0": "uniform t, to 0",
    "flow_shift3": "SD3 shift 3", "flow_shift3_to0": "SD3 shift 3, to 0",
    "flow_flux": "Flux dynamic shift", "flow_beta": "beta (0.6, 0.6), to 0",
    "gits": "GITS", "ld3": "LD3", "evolution": "evolution (warm start)",
    "bayes": "bayes (TPE)", "random": "random",
}
MODEL_NOTES = ("Models: the embedded Gaussian-mixture zoo (reference: exact samples of the "
               "mixture) and, where listed, the neural digits zoo (digits-unet-s/m/l, and "
               "the rectified-flow digits-flow-s/m, whose levels are shown in flow time t; "
               "reference: the 1,797 training digits, sample i = digit i mod 1797).")


@dataclass
class Settings:
    models: list[str]
    nfes: list[int]
    solver: str = "dpmpp_2m"  # the solver being run (one of ``solvers``)
    solvers: list[str] = field(default_factory=lambda: ["dpmpp_2m"])
    per_candidate: int = 2000
    heldout: int = 10000
    reference: int = 10000
    budget_factor: float = 10.0
    gits: dict[str, Any] = field(default_factory=dict)  # compute_gits keywords
    gits_warmup: int = 256
    ld3: dict[str, Any] = field(default_factory=dict)  # compute_ld3 keywords
    ld3_train: int = 64
    evolution: dict[str, Any] = field(default_factory=dict)  # EvolutionSearcher keywords
    bayes_startup: int = 10
    batch: int = 8  # candidates per evaluate() call for bayes/random
    resamples: int = 200
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)  # ContinuousSpace keywords
    # Issue 19: searcher seeds (a target is met with all of them), the searches run per
    # seed (VARIANTS: today's evolution, with racing, in the solver-schedule space), the
    # race's size, and whether bayes/random run (at searcher seed 0 only).
    searcher_seeds: list[int] = field(default_factory=lambda: [0])
    variants: list[str] = field(default_factory=lambda: ["evolution"])
    racing: dict[str, int] = field(default_factory=lambda: {"top_k": 8, "blocks": 1})
    halving: dict[str, int] = field(default_factory=lambda: {"rungs": 2, "eta": 2})
    others: bool = True  # bayes and random (where ``searches`` names them)
    baselines: str = "edm"  # a key of BASELINE_SETS
    searches: list[str] = field(default_factory=lambda: list(SEARCHES))  # which to run

    @property
    def fixed(self) -> tuple[str, ...]:
        """Names of the non-searched schedules of this run."""
        return tuple(BASELINE_SETS[self.baselines])

    @property
    def methods(self) -> tuple[str, ...]:
        """Every schedule of a row, in table order (the variants of issue 19 follow)."""
        return (*self.fixed, "gits", "ld3", *[s for s in SEARCHES if s in self.searches])


# The evolution's settings without the offspring pre-screen: the benchmark's before issue 7
# made the pre-screen the default (rows of those runs carry no ``evolution_settings``).
OLD_EVOLUTION = dict(population_num=10, select_num=4, mutation_num=6, crossover_num=4,
                     m_prob=0.4, mutation_scale=(0.02, 0.3), random_fill=True)


def full_settings() -> Settings:
    pr = PredictorSection()  # the product's default pre-screen of offspring (OMS-DPM)
    return Settings(
        models=["gmm-digits-k64"], nfes=[4, 5, 6, 8, 10],
        evolution=dict(OLD_EVOLUTION,
                       predictor_top_fraction=pr.top_fraction if pr.enabled else None,
                       predictor_min_train=pr.min_train),
        space=dict(warp="rho", rho=7.0, free_endpoints=True, gap_ratio=10.0,
                   endpoint_range=0.3),
    )


def plain(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON has them (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def _norm(settings: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in plain(settings).items() if v is not None},
                      sort_keys=True)


def evolution_keywords(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items (values parsed as YAML) -> EvolutionSearcher keywords over the
    benchmark's (``--evolution``, and the flow probe's ``--configs``); ValueError names an
    item that is not KEY=VALUE with a KEY the benchmark lets change."""
    import inspect

    import yaml

    from searchd.searchers.evolution import EvolutionSearcher

    known = set(inspect.signature(EvolutionSearcher).parameters) - {
        "space", "metric", "mode", "seed", "seeds", "max_epochs", "max_candidates"}
    out: dict[str, Any] = {}
    for kv in items:
        key, sep, val = kv.partition("=")
        if not sep or key not in known:
            raise ValueError(f"{kv!r} is not KEY=VALUE with KEY an EvolutionSearcher keyword "
                             f"the benchmark lets change: {', '.join(sorted(known))}")
        out[key] = yaml.safe_load(val)
    return out


def tiny_settings() -> Settings:
    """Every code path of the full run, on a few hundred samples (the test suite's)."""
    s = full_settings()
    s.nfes = [4]
    s.per_candidate, s.heldout, s.reference = 150, 300, 600
    s.gits = dict(grid_points=13)
    s.gits_warmup = 16
    s.ld3 = dict(iters=3, teacher_steps=16)
    s.ld3_train = 8
    s.evolution = dict(s.evolution, population_num=5, select_num=2, mutation_num=3,
                       crossover_num=2)
    s.budget_factor = 12.0  # room for a race of 2 after the evolution's seeds
    s.bayes_startup = 2
    s.resamples = 50
    s.searcher_seeds = [0, 1]
    s.variants = ["evolution", "race", "strategy"]
    s.racing = {"top_k": 2, "blocks": 1}
    return s


# Searching in-process -------------------------------------------------------------------------
def run_searcher(searcher: ScheduleSearcher, evaluator: Evaluator, seeds: Sequence[int],
                 batch: int, wrap: Any = None) -> dict[str, Any]:
    """Run a searcher in the in-process search loop (``searchd.loop.SearchLoop``): up to
    ``batch`` candidates per batch (a whole generation for the evolution, which then waits
    for results), each batch scored in one call of the evaluator, until it is FINISHED."""

    class Tally:
        calls = 0
        scored: list[tuple[Schedule, float | None]] = []

        def recorded(self, b: Any, new: Sequence[int]) -> None:
            for j in new:
                r = b.results[j]
                self.calls += int(r.nfe) * int(r.n_samples)
                self.scored.append((b.schedules[j], r.value(searcher.metric)))

    tally = Tally()
    tally.scored = []
    loop = SearchLoop(searcher, seeds, batch_size=batch, observers=[tally], wrap_scorer=wrap)
    loop.run(EvaluatorScorer(evaluator))
    best = searcher.best
    if best is None:
        raise RuntimeError(f"{searcher.algorithm}: no candidate was scored")
    return {"schedule": best["schedule"], "value": best["value"], "candidates": len(tally.scored),
            "calls": tally.calls, "scored": tally.scored}


# The variants of issue 19 ------------------------------------------------------------------
# evolution: today's warm-started evolution (its best on the search seeds wins);
# race: the same with racing (the top k re-scored on a fresh block of search seeds, the
#   winner chosen on the pooled blocks; the race paid from the evolution's budget);
# halving: successive halving on samples per candidate within each generation;
# strategy: the evolution in the solver-schedule space (timesteps and per-step strategy);
# strategy-race: both.
VARIANTS = ("evolution", "race", "halving", "strategy", "strategy-race")
VARIANT_LABELS = {"evolution": "evolution (today)", "race": "evolution + racing",
                  "halving": "evolution + halving", "strategy": "evolution, solver schedules",
                  "strategy-race": "evolution, solver schedules + racing"}


def run_variant(variant: str, st: Settings, space: ContinuousSpace, ev: Evaluator,
                search_seeds: Sequence[int], seeds: Sequence[Schedule], n_evo: int,
                searcher_seed: int, nfe: int) -> dict[str, Any]:
    """One search of a variant (VARIANTS) within the evolution's budget of ``n_evo``
    candidates (GITS's and LD3's cost already taken out): its winner, search value, calls."""
    from searchd.loop import racing
    from searchd.schedules.strategy_space import StrategySpace
    from searchd.searchers.evolution import EvolutionSearcher

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    raced = variant.endswith("race")
    blocks = int(st.racing["blocks"])
    # The race is paid from the budget; it never leaves the evolution fewer candidates than
    # its seeds and two more (a budget too small for a race of 2 runs none).
    k = min(int(st.racing["top_k"]), (n_evo - len(seeds) - 2) // blocks) if raced else 0
    raced = raced and k >= 2
    n = n_evo - (k * blocks if raced else 0)
    wrap = None
    if variant == "halving":
        rungs, eta = int(st.halving["rungs"]), int(st.halving["eta"])
        n = int(n / racing.halving_cost(rungs, eta))
        wrap = racing.halving_wrapper("fid", rungs, eta)
    sp: Any = StrategySpace(space) if variant.startswith("strategy") else space
    searcher = EvolutionSearcher(sp, "fid", "min", max_epochs=10_000, seed=searcher_seed,
                                 seeds=list(seeds), max_candidates=max(n, len(seeds) + 2),
                                 **st.evolution)
    out = run_searcher(searcher, ev, search_seeds, st.evolution.get("population_num", 32),
                       wrap)
    if raced:
        from searchd.loop import EvaluatorScorer

        blk = racing.race_blocks(SEED_BASE, st.per_candidate, blocks)
        racing.check_disjoint(blk, {"held-out": range(HELDOUT_SEED_BASE,
                                                      HELDOUT_SEED_BASE + st.heldout)})
        res = racing.race(out["scored"], EvaluatorScorer(ev), blk, "fid", k)
        if res is not None:
            win = next(e for e in res.entries if e.schedule.id == res.winner.id)
            out.update(schedule=res.winner, value=win.pooled, calls=out["calls"] + res.calls,
                       race={"changed": res.winner.id != res.search_winner.id,
                             "rescored": res.scored, "calls": res.calls,
                             "search_winner": res.search_winner.id})
    return out


def exact_floor(ev: Evaluator, n: int, st: Settings) -> dict[str, Any] | None:
    """The FID of ``n`` exact samples of the model (seeds 3,000,000 ..) against the
    reference, with bootstrap resamples: what a perfect sampler scores at that count."""
    den = ev.denoiser
    sample = getattr(den, "sample_data", None)
    if sample is None:
        return None
    seeds = list(range(FLOOR_SEED_BASE, FLOOR_SEED_BASE + n))
    parts = []
    with torch.no_grad():
        for a in range(0, n, 1000):
            x = sample(seeds[a:a + 1000])
            parts.append(ev.features(x.reshape(x.shape[0], *ev.image_shape)).to(torch.float64))
    f = torch.cat(parts)
    point = float(ev.frechet.distance(f.mean(0).numpy(), np.cov(f.numpy(), rowvar=False)))
    boot = bootstrap_fid(f.to(torch.float32), ev.frechet,
                         bootstrap_counts(n, st.resamples, 0)).cpu().numpy()
    return {"fid": point, "boot": boot, "n": n}


# One model --------------------------------------------------------------------------------------
def make_evaluator(model: str, st: Settings) -> Evaluator:
    den = load(model)
    feats = load_features("digits")
    ref = exact_reference(den, feats, range(REFERENCE_SEED_BASE,
                                            REFERENCE_SEED_BASE + st.reference))
    return Evaluator(den, feats, ref, metrics=("fid",))


def gits_all(evaluator: Evaluator, st: Settings, space0: ContinuousSpace) -> dict[str, Any]:
    """GITS's teacher and cost matrix once (they do not depend on the number of steps)."""
    den = CountingDenoiser(evaluator.denoiser)
    seeds = list(range(SEED_BASE, SEED_BASE + st.gits_warmup))
    t0 = time.perf_counter()
    params = dict(grid_points=61, teacher_solver="heun", metric="dev", coeff=1.15)
    params.update(st.gits)
    res = gits_plan(den, warmup_noise(den, seeds), 1, sigma_min=space0.sigma_min,
                    sigma_max=space0.sigma_max, final_zero=True, free_end=True,
                    student_solver=st.solver, **params)
    return {"grid": res.grid, "cost": res.cost, "calls": den.rows,
            "wall_s": time.perf_counter() - t0, "params": params, "warmup": len(seeds)}


def gits_for(g: dict[str, Any], n_steps: int, solver: str) -> Schedule:
    idx = gits_dp(g["cost"], n_steps, g["params"]["coeff"])
    return Schedule(g["grid"][idx], solver=solver,
                    meta={"origin": "gits", "objective": path_cost(g["cost"], idx,
                                                                   g["params"]["coeff"])})


def heldout(evaluator: Evaluator, schedules: dict[str, Schedule], seeds: Sequence[int],
            st: Settings) -> dict[str, dict[str, Any]]:
    """Held-out FID of every schedule with bootstrap resamples (shared sample indices)."""
    names = list(schedules)
    results, feats = evaluator.per_sample_features([schedules[n] for n in names], seeds)
    ref: FrechetReference = evaluator.frechet
    counts = bootstrap_counts(len(seeds), st.resamples, 0)
    out = {}
    for n, r, f in zip(names, results, feats):
        if r.status != "ok" or f is None:
            raise RuntimeError(f"{n}: held-out scoring failed: {r.error}")
        f64 = f.to(torch.float64)
        mu = f64.mean(0).numpy()
        cov = np.cov(f64.numpy(), rowvar=False)
        point = float(ref.distance(mu, cov))
        out[n] = {"fid": point, "boot": bootstrap_fid(f, ref, counts).cpu().numpy()}
    return out


def bench_model(model: str, st: Settings, log: Any, done: Sequence[dict[str, Any]] = (),
                on_row: Any = None) -> dict[str, Any]:
    torch.manual_seed(0)
    case = open_case(model, st.solver, st.nfes, st)
    ev, g = case["ev"], case["gits"]
    log(f"{model}: evaluator and reference ({st.reference} exact samples) in "
        f"{case['evaluator_s']:.0f} s")
    search_seeds, held_seeds = case["search_seeds"], case["held_seeds"]
    log(f"{model}: GITS teacher + cost matrix: {g['calls']} denoiser calls, "
        f"{g['wall_s']:.0f} s")
    rows = [r for r in done if r["nfe"] in st.nfes]
    have = {r["nfe"] for r in rows}
    gits_info = {"calls": g["calls"], "wall_s": g["wall_s"], "params": g["params"],
                 "warmup": g["warmup"]}
    for nfe in st.nfes:
        if nfe in have:
            log(f"  NFE {nfe}: kept from the earlier partial run")
            continue
        anchors = case_anchors(case, nfe)
        n, space, r = anchors["n"], anchors["space"], anchors["ld3_result"]
        fixed = st.fixed
        sched: dict[str, Schedule] = dict(zip(fixed, anchors["bases"]))
        cost: dict[str, dict[str, Any]] = {
            f: {"calls": 0, "wall_s": 0.0, "candidates": 0} for f in fixed}
        sched["gits"], sched["ld3"] = anchors["gits"], anchors["ld3"]
        cost["gits"] = {"calls": g["calls"], "wall_s": g["wall_s"], "candidates": 0}
        cost["ld3"] = {"calls": r["denoiser_calls"], "wall_s": r["wall_s"], "candidates": 0,
                       "loss": r["schedule"]["meta"]["params"]["loss"]}
        log(f"  NFE {nfe}: LD3 {r['denoiser_calls']} calls, {r['wall_s']:.0f} s")
        budget = st.budget_factor * g["calls"]
        per_cand = st.per_candidate * nfe
        bases = [sched[f] for f in fixed]
        # Fixed schedules on the search seeds: the best one is the comparison point.
        base_vals = {f: res.metrics["fid"] for f, res in
                     zip(fixed, ev.evaluate(bases, search_seeds))}
        best_fixed = min(fixed, key=lambda f: base_vals[f])
        n_evo = evolution_candidates(st, g["calls"], r["denoiser_calls"], nfe)
        n_free = int(budget // per_cand)
        warm = [with_meta(sched["gits"], origin="gits"), with_meta(sched["ld3"], origin="ld3")]
        anchor_calls = cost["gits"]["calls"] + cost["ld3"]["calls"]
        anchor_wall = cost["gits"]["wall_s"] + cost["ld3"]["wall_s"]
        from searchd.solvers.strategy import FAMILIES

        variants = [v for v in st.variants
                    if not (v.startswith("strategy") and st.solver not in FAMILIES)]
        if variants != list(st.variants):
            log(f"  NFE {nfe}: {st.solver} has no per-step strategy: variants "
                f"{', '.join(v for v in st.variants if v not in variants)} not run")
        for seed in st.searcher_seeds if "evolution" in st.searches else ():
            for variant in variants:
                t1 = time.perf_counter()
                out = run_variant(variant, st, space, ev, search_seeds, bases + warm,
                                  n_evo, seed, nfe)
                own = time.perf_counter() - t1
                key = f"{variant}@{seed}"
                sched[key] = out["schedule"]
                cost[key] = {"calls": out["calls"] + anchor_calls,
                             "wall_s": own + anchor_wall, "search_wall_s": own,
                             "candidates": out["candidates"], "search_fid": out["value"],
                             **({"race": out["race"]} if "race" in out else {})}
                log(f"  NFE {nfe}: {key}: {out['candidates']} candidates, best search FID "
                    f"{out['value']:.4f}, {cost[key]['calls']} calls, {own:.0f} s")
        first = f"evolution@{st.searcher_seeds[0]}"
        if first in sched:
            sched["evolution"], cost["evolution"] = sched[first], cost[first]
        if st.others:
            from searchd.searchers.bayes import BayesSearcher
            from searchd.searchers.random_search import RandomSearcher

            for name, searcher in (
                ("bayes", BayesSearcher(space, "fid", "min", num_samples=n_free, seed=st.seed,
                                        seeds=bases, n_startup_trials=st.bayes_startup)),
                ("random", RandomSearcher(space, "fid", "min", num_samples=n_free,
                                          seed=st.seed, seeds=bases)),
            ):
                if name not in st.searches:
                    continue
                t1 = time.perf_counter()
                out = run_searcher(searcher, ev, search_seeds, st.batch)
                sched[name] = out["schedule"]
                own = time.perf_counter() - t1
                cost[name] = {"calls": out["calls"], "wall_s": own, "search_wall_s": own,
                              "candidates": out["candidates"], "search_fid": out["value"]}
                log(f"  NFE {nfe}: {name}: {out['candidates']} candidates, best search FID "
                    f"{out['value']:.4f}, {cost[name]['calls']} calls, {own:.0f} s")
        t1 = time.perf_counter()
        held = heldout(ev, sched, held_seeds, st)
        log(f"  NFE {nfe}: held-out scoring of {len(sched)} schedules in "
            f"{time.perf_counter() - t1:.0f} s")
        row = summarize(model, nfe, n, sched, cost, held, best_fixed, base_vals,
                        case.get("floor"), st)
        row["evolution_settings"] = dict(st.evolution)
        row["settings"] = {"baselines": st.baselines, "space": plain(st.space)}
        rows.append(row)
        rows.sort(key=lambda r: r["nfe"])
        if on_row is not None:
            on_row({"model": model, "solver": st.solver, "rows": rows, "gits": gits_info})
    return {"model": model, "solver": st.solver, "rows": rows, "gits": gits_info}


# One case for the companion scripts (quality_ceiling.py, quality_variants.py) ------------------
def open_case(model: str, solver: str, nfes: Sequence[int], st: Settings) -> dict[str, Any]:
    """The evaluator, the seeds and GITS's teacher and cost matrix of one model and solver,
    on the benchmark's settings."""
    st = replace(st, solver=solver)
    t0 = time.perf_counter()
    ev = make_evaluator(model, st)
    evaluator_s = time.perf_counter() - t0
    den = ev.denoiser

    def space_for(n_steps: int) -> ContinuousSpace:
        return ContinuousSpace(n_steps, den.sigma_min, den.sigma_max, True, solver=solver,
                               **st.space)

    return {"st": st, "ev": ev, "space_for": space_for, "evaluator_s": evaluator_s,
            "floor": exact_floor(ev, st.heldout, st),
            "search_seeds": list(range(SEED_BASE, SEED_BASE + st.per_candidate)),
            "held_seeds": list(range(HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + st.heldout)),
            "gits": gits_all(ev, st, space_for(steps_for_nfe(solver, min(nfes))))}


def case_anchors(case: dict[str, Any], nfe: int) -> dict[str, Any]:
    """At one NFE: the space, the three baselines, GITS's and LD3's schedules (LD3 computed
    as in the benchmark) and LD3's denoiser calls."""
    st, ev, solver = case["st"], case["ev"], case["st"].solver
    n = steps_for_nfe(solver, nfe)
    space = case["space_for"](n)
    bases = [Schedule(baseline(fam, n, space.sigma_min, space.sigma_max, True, **params),
                      solver=solver, meta={"origin": "baseline", "family": fam, "name": name})
             for name, (fam, params) in BASELINE_SETS[st.baselines].items()]
    gits = space.check(gits_for(case["gits"], n, solver))
    ld3_params = dict(final_zero=True, free_end=True, sigma_min=space.sigma_min,
                      sigma_max=space.sigma_max, seed=st.seed, loss="auto")
    ld3_params.update(st.ld3)
    r = compute_anchor(ev, "ld3", n, solver, range(SEED_BASE, SEED_BASE + st.ld3_train),
                       ld3_params)
    return {"n": n, "space": space, "bases": bases, "gits": gits,
            "ld3": space.check(Schedule.from_dict(r["schedule"])),
            "ld3_calls": r["denoiser_calls"], "ld3_result": r}


def evolution_candidates(st: Settings, gits_calls: int, ld3_calls: int, nfe: int) -> int:
    """Candidates the warm-started evolution can score: the budget (``budget_factor`` x
    GITS's calls) less GITS's and LD3's calls, over one candidate's calls."""
    return int((st.budget_factor * gits_calls - gits_calls - ld3_calls)
               // (st.per_candidate * nfe))


def _ci(boot: np.ndarray, point: float) -> list[float]:
    return [float(x) for x in bootstrap_interval(boot, point, 0.95, "centered")]


def summarize(model: str, nfe: int, n_steps: int, sched: dict[str, Schedule],
              cost: dict[str, dict[str, Any]], held: dict[str, dict[str, Any]],
              best_fixed: str, base_vals: dict[str, float],
              floor: dict[str, Any] | None = None, st: Settings | None = None
              ) -> dict[str, Any]:
    ref = held[best_fixed]
    out: dict[str, Any] = {"model": model, "nfe": nfe, "n_steps": n_steps,
                           "best_fixed": best_fixed, "fixed_search_fid": base_vals,
                           "methods": {}, "variants": {}}
    if floor is not None:
        out["floor"] = {"fid": floor["fid"], "fid_ci": _ci(floor["boot"], floor["fid"]),
                        "n": floor["n"]}

    def entry(name: str) -> dict[str, Any]:
        h = held[name]
        diff = h["fid"] - ref["fid"]
        e = {"sigmas": [float(x) for x in sched[name].sigmas],
             "fid": h["fid"], "fid_ci": _ci(h["boot"], h["fid"]),
             "diff": diff, "diff_ci": _ci(h["boot"] - ref["boot"], diff), **cost[name]}
        if sched[name].strategy is not None:
            e["strategy"] = list(sched[name].strategy)
        if floor is not None:
            ex = h["fid"] - floor["fid"]
            e["excess"], e["excess_ci"] = ex, _ci(h["boot"] - floor["boot"], ex)
        return e

    for m in sched:
        if "@" not in m:
            out["methods"][m] = entry(m)
    gits, ld3 = held["gits"], held["ld3"]
    for key in [k for k in sched if "@" in k]:
        variant, seed = key.split("@")
        e = entry(key)
        h = held[key]
        for name, o in (("gits", gits), ("ld3", ld3)):
            rel = 1.0 - h["fid"] / o["fid"]
            e[f"vs_{name}"] = {"improvement": rel, "ci": _ci(1.0 - h["boot"] / o["boot"], rel)}
        d = h["fid"] - ld3["fid"]  # paired: the same held-out samples
        e["minus_ld3"] = {"diff": d, "ci": _ci(h["boot"] - ld3["boot"], d)}
        rel = 1.0 - h["fid"] / ref["fid"]  # over the best non-searched schedule
        e["vs_fixed"] = {"improvement": rel, "ci": _ci(1.0 - h["boot"] / ref["boot"], rel)}
        e["cost_over_gits"] = cost[key]["calls"] / cost["gits"]["calls"]
        e["met"] = bool(all(e[f"vs_{o}"]["improvement"] >= 0.15 and e[f"vs_{o}"]["ci"][0] > 0
                            for o in ("gits", "ld3"))
                        and e["cost_over_gits"] <= 10.0 + 1e-9)
        # The flow target (issue 20) on top: >= 25% over the best flow baseline, CI above 0.
        e["flow_met"] = bool(e["met"] and rel >= 0.25 and e["vs_fixed"]["ci"][0] > 0)
        out["variants"].setdefault(variant, {})[seed] = e
    if "evolution" in held:
        evo = held["evolution"]
        for other in ("gits", "ld3"):
            o = held[other]
            rel = 1.0 - evo["fid"] / o["fid"]  # relative improvement of evolution over it
            rel_boot = 1.0 - evo["boot"] / o["boot"]
            out[f"evolution_vs_{other}"] = {"improvement": rel, "ci": _ci(rel_boot, rel)}
        # ... and over the best non-searched schedule (chosen on the search seeds).
        fx = held[best_fixed]
        out["evolution_vs_fixed"] = {"improvement": 1.0 - evo["fid"] / fx["fid"],
                                     "ci": _ci(1.0 - evo["boot"] / fx["boot"],
                                               1.0 - evo["fid"] / fx["fid"])}
        out["evolution_cost_over_gits"] = cost["evolution"]["calls"] / cost["gits"]["calls"]
        out["target_met"] = bool(
            out["evolution_vs_gits"]["improvement"] >= 0.15
            and out["evolution_vs_ld3"]["improvement"] >= 0.15
            and out["evolution_cost_over_gits"] <= 10.0 + 1e-9
        )
        # The flow models' target (issue 20): >= 25% over the best flow baseline and >= 15%
        # over the better of GITS and LD3, every interval excluding 0.
        out["flow_target_met"] = bool(
            out["target_met"] and out["evolution_vs_fixed"]["improvement"] >= 0.25
            and all(out[k]["ci"][0] > 0 for k in ("evolution_vs_gits", "evolution_vs_ld3",
                                                   "evolution_vs_fixed"))
        )
    return out


# Report -------------------------------------------------------------------------------------------
def _pct(d: dict[str, Any]) -> str:
    return f"{100 * d['improvement']:.1f}% [{100 * d['ci'][0]:.1f}, {100 * d['ci'][1]:.1f}]"


def best_anchor_gain(e: dict[str, Any]) -> dict[str, Any]:
    """The improvement over the better (held-out) of GITS and LD3: the smaller of the two."""
    return min((e["vs_gits"], e["vs_ld3"]), key=lambda d: d["improvement"])


def _kept(row: dict[str, Any], e: dict[str, Any]) -> str:
    """`` (LD3's)`` where a search's winner is one of its seeds (an anchor, a baseline)."""
    if "strategy" in e:
        return ""
    for m in [k for k in row["methods"] if k not in SEARCHES]:
        if row["methods"][m]["sigmas"] == e["sigmas"]:
            return f" ({LABELS.get(m, m)}'s)"
    return ""


def variant_lines(mres: dict[str, Any]) -> list[str]:
    """Issue 19's tables: per variant and searcher seed, the gain over the best of GITS and
    LD3 (NFE <= 6: target 15%, CI excluding 0, every seed) and the paired difference to LD3
    (NFE 8, 10: never significantly worse; better where the CI is below 0)."""
    rows = [r for r in mres["rows"] if r.get("variants")]
    if not rows:
        return []
    out = ["### Over searcher seeds (issue 19)", ""]
    if any(r["nfe"] <= 6 for r in rows):
        out += ["Gain = 1 - FID / FID of the better of GITS and LD3, held out, 95% CI; a cell "
                "is met when every seed gains >= 15% over both with a CI above 0 (and costs "
                "<= 10x GITS's calls). Excess: FID minus the floor of exact samples at the "
                "same count.", "",
                "| NFE | search | per seed: gain [95% CI] | mean gain (min .. max) | "
                "excess over floor, mean | calls / GITS's | met (all seeds) |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["nfe"] > 6:
            continue
        for v, per in r["variants"].items():
            gains = [best_anchor_gain(e) for e in per.values()]
            g = [d["improvement"] for d in gains]
            ex = [e["excess"] for e in per.values() if "excess" in e]
            met = all(e["met"] for e in per.values())
            out.append(
                f"| {r['nfe']} | {VARIANT_LABELS.get(v, v)} | "
                + "; ".join(f"s{sd}: {_pct(d)}{_kept(r, per[sd])}"
                            for sd, d in zip(per, gains))
                + f" | {100 * np.mean(g):.1f}% ({100 * min(g):.1f} .. {100 * max(g):.1f}) | "
                + (f"{np.mean(ex):.4f}" if ex else "-")
                + f" | {np.mean([e['cost_over_gits'] for e in per.values()]):.2f} | "
                + (("yes" if met else "**no**") + f" ({len(per)} seed(s))") + " |")
    late = [r for r in rows if r["nfe"] > 6]
    if late:
        out += ["", "NFE 8 and 10: paired difference to LD3 (FID - LD3's FID, held out, 95% "
                "CI): better where the CI lies below 0, worse where above.", "",
                "| NFE | search | per seed: FID - LD3 [95% CI] | better / not different / "
                "worse | race changed the pick |", "| --- | --- | --- | --- | --- |"]
        for r in late:
            for v, per in r["variants"].items():
                cells, verdict = [], {"better": 0, "same": 0, "worse": 0}
                for sd, e in per.items():
                    d = e["minus_ld3"]
                    kept = _kept(r, e)
                    cells.append(f"s{sd}: {d['diff']:+.4f} [{d['ci'][0]:+.4f}, "
                                 f"{d['ci'][1]:+.4f}]{kept}")
                    key = ("better" if d["ci"][1] < 0 else "worse" if d["ci"][0] > 0
                           else "same")
                    verdict[key] += 1
                changed = [e["race"]["changed"] for e in per.values() if "race" in e]
                out.append(f"| {r['nfe']} | {VARIANT_LABELS.get(v, v)} | " + "; ".join(cells)
                           + f" | {verdict['better']} / {verdict['same']} / {verdict['worse']}"
                           + " | " + (f"{sum(changed)} of {len(changed)}" if changed else "-")
                           + " |")
    return out + [""]



def _f(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def _flow_rows(mres: dict[str, Any]) -> bool:
    return any(r.get("settings", {}).get("baselines") == "flow" for r in mres["rows"])


def _case_settings(mres: dict[str, Any], st: Settings) -> list[str]:
    """A line naming a case's baselines and space where they are not the header's."""
    out = []
    for r in mres["rows"]:
        cs = r.get("settings")
        if cs is None or (cs["baselines"] == "edm" and _norm(cs["space"]) == _norm(st.space)):
            continue
        fams = "; ".join(f"{LABELS.get(k, k)}: `{f}` {p or ''}".rstrip()
                         for k, (f, p) in BASELINE_SETS[cs["baselines"]].items())
        space = {k: v for k, v in cs["space"].items()
                 if not (k == "rho" and cs["space"].get("warp") != "rho")}
        line = (f"NFE {r['nfe']}: non-searched schedules `--baselines {cs['baselines']}` "
                f"({fams}); space: continuous, "
                + ", ".join(f"{k}={v}" for k, v in space.items()) + ".")
        if line not in out:
            out.append(line)
    # One line for all NFEs when they share their settings.
    if len(out) > 1 and len({o.split(": ", 1)[1] for o in out}) == 1:
        out = ["Every NFE: " + out[0].split(": ", 1)[1]]
    return [x for o in out for x in (o, "")]


def _flow_required(mres: dict[str, Any], row: dict[str, Any]) -> bool:
    """The flow target is set for euler at NFE <= 6 (what flow users run); other solvers'
    rows show it, not required."""
    return row["nfe"] <= 6 and mres.get("solver") == "euler"


def _flow_target(mres: dict[str, Any], pct: Any) -> list[str]:
    """The flow target table (issue 20): the searched schedule against the best flow baseline
    (chosen on the search seeds) and GITS and LD3, every interval excluding 0."""
    lines = ["### Target (flow): evolution >= 25% better than the best flow baseline, >= 15% "
             "better than GITS and LD3, intervals excluding 0 (required: euler, NFE <= 6)", "",
             "| NFE | evolution | best flow baseline | better than it by [95% CI] | "
             "better than GITS by [95% CI] | better than LD3 by [95% CI] | calls / GITS's | "
             "target met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in mres["rows"]:
        if "evolution_vs_fixed" not in row:
            continue
        m, bf = row["methods"], row["best_fixed"]
        need = _flow_required(mres, row)
        ok = row.get("flow_target_met", False)
        met = ("yes" if ok else "**no**") if need else (
            "(not required) " + ("yes" if ok else "no"))
        lines.append(
            f"| {row['nfe']} | {_f(m['evolution']['fid'])} | {LABELS.get(bf, bf)} "
            f"{_f(m[bf]['fid'])} | {pct(row['evolution_vs_fixed'])} | "
            f"{pct(row['evolution_vs_gits'])} | {pct(row['evolution_vs_ld3'])} | "
            f"{row['evolution_cost_over_gits']:.2f} | {met} |")
    return [*lines, ""]


def markdown(res: dict[str, Any], st: Settings, command: str, wall: float) -> str:
    lines = [
        "# Quality: searched schedules vs the published ones (held-out FID)", "",
        f"Command: `{command}`", "",
        f"{MODEL_NOTES} Solver(s): "
        + ", ".join(dict.fromkeys(m.get("solver", res["solver"]) for m in res["models"]))
        + "; schedules end in 0 (the last step denoises). "
        f"Every search scores candidates on {st.per_candidate} samples (seeds "
        f"{SEED_BASE}..); every schedule is then re-scored on {st.heldout} held-out samples "
        f"(seeds {HELDOUT_SEED_BASE}..) against {st.reference} exact samples of the model "
        f"(seeds {REFERENCE_SEED_BASE}..), FID on the embedded digits features. Intervals: "
        f"95% bootstrap ({st.resamples} resamples, the same sample indices for every "
        "schedule, so differences are paired; centered intervals, see "
        "searchd/evaluation/heldout.py). The difference is to the best non-searched "
        "schedule (chosen on the search seeds). Cost: denoiser calls = samples through the "
        "network in forward calls (LD3's backward passes are not counted as calls; its wall "
        "time includes them); wall time on this machine, shared with other jobs. The "
        "evolution's wall time includes GITS's and LD3's (it pays for them); its own search "
        "time is in parentheses.", "",
        f"Budget: each search gets {st.budget_factor:g}x GITS's denoiser calls; the "
        "warm-started evolution pays for GITS and LD3 from it. Evolution: "
        + ", ".join(f"{k}={v}" for k, v in st.evolution.items())
        + f". Bayes: TPE, {st.bayes_startup} startup trials. Space: continuous, "
        + ", ".join(f"{k}={v}" for k, v in st.space.items())
        + f". GITS: {st.gits_warmup} warm-up samples, "
        + ", ".join(f"{k}={v}" for k, v in (res["models"][0]["gits"]["params"].items()))
        + f"; its teacher and cost matrix are computed once per model and reported at every "
        f"NFE. LD3: {st.ld3_train} training samples, "
        + (", ".join(f"{k}={v}" for k, v in st.ld3.items()) or "defaults")
        + " (Adam, lr 0.1, 100 iterations, Heun teacher 64 steps unless listed), loss "
        "as the actors run it (`auto`: LPIPS if present, else the digits feature space).", "",
        "What limits the search, measured (FID floor, noise of the rankings, mutation steps, "
        "long searches: `quality_ceiling.md`, the offspring pre-screen over searcher seeds: "
        "`quality_variants.md`): `benchmarks/results/quality-diagnosis.md`.", "",
    ]
    for mres in res["models"]:
        lines += [f"## {mres['model']}, {mres.get('solver', res['solver'])}", ""]
        lines += _case_settings(mres, st)
        pct = lambda d: (f"{100 * d['improvement']:.1f}% [{100 * d['ci'][0]:.1f}, "  # noqa: E731
                         f"{100 * d['ci'][1]:.1f}]")
        flow_case = _flow_rows(mres)
        if flow_case:
            # The flow table holds the GITS and LD3 comparisons too: no second table.
            lines += _flow_target(mres, pct)
        else:
            lines += ["### Target: warm-started evolution vs GITS and LD3", "",
                      "| NFE | evolution | GITS | LD3 | better than GITS by [95% CI] | "
                      "better than LD3 by [95% CI] | calls / GITS's | target met |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for row in mres["rows"]:
                if "evolution_vs_gits" not in row:
                    continue
                m = row["methods"]
                vg, vl = row["evolution_vs_gits"], row["evolution_vs_ld3"]
                need = row["nfe"] <= 6
                met = ("yes" if row["target_met"] else "**no**") if need else (
                    "(not required) " + ("yes" if row["target_met"] else "no"))
                lines.append(
                    f"| {row['nfe']} | {_f(m['evolution']['fid'])} | {_f(m['gits']['fid'])} | "
                    f"{_f(m['ld3']['fid'])} | {pct(vg)} | {pct(vl)} | "
                    f"{row['evolution_cost_over_gits']:.2f} | {met} |")
            lines.append("")
        # Rows merged from runs with other evolution settings (rows written before the
        # settings were kept have none: they ran without the offspring pre-screen).
        other: dict[str, list[str]] = {}
        for r in mres["rows"]:
            es = r.get("evolution_settings", OLD_EVOLUTION)
            if _norm(es) != _norm(st.evolution):
                key = ", ".join(f"{k}={v}" for k, v in es.items())
                other.setdefault(key, []).append(str(r["nfe"]))
        for key, nfes in other.items():
            lines += [f"NFE {', '.join(nfes)}: the evolution ran with other settings ({key}); "
                      "see the command line and `quality-diagnosis.md`.", ""]
        lines += variant_lines(mres)
        key = "flow_target_met" if flow_case else "target_met"
        missed = [str(r["nfe"]) for r in mres["rows"]
                  if (_flow_required(mres, r) if flow_case else r["nfe"] <= 6)
                  and not r.get(key, True)]
        if missed and flow_case:
            # The mixture's diagnosis does not cover flow models; the converged model's
            # floor beside these rows does (benchmarks/quality_floor.py).
            lines += [f"**Flow target not met at NFE {', '.join(missed)}.** The converged "
                      f"model's floor beside these schedules: "
                      "`benchmarks/results/quality_floor.md`.", ""]
        elif missed:
            lines += [f"**Target not met at NFE {', '.join(missed)}.** What limits it: "
                      "`benchmarks/results/quality-diagnosis.md`.", ""]
        for row in mres["rows"]:
            fl = row.get("floor")
            # Flow rows: the levels in flow time t = sigma / (1 + sigma), as flow users set them.
            flow = row.get("settings", {}).get("baselines") == "flow"
            lines += [f"### NFE {row['nfe']} ({row['n_steps']} steps + final 0)", "",
                      f"Best non-searched schedule: {LABELS.get(row['best_fixed'])}."
                      + ("" if fl is None else
                         f" Floor (FID of {fl['n']:,} exact samples of the model): "
                         f"{_f(fl['fid'])} [{_f(fl['fid_ci'][0])}, {_f(fl['fid_ci'][1])}]; "
                         "excess = FID - floor."), "",
                      "| schedule | held-out FID [95% CI] | excess over floor [95% CI] | "
                      "diff to best non-searched "
                      "[95% CI] | denoiser calls | wall s | candidates | "
                      + ("t |" if flow else "sigmas |"),
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            entries = [(LABELS.get(k, k), k, row["methods"][k]) for k in row["methods"]]
            entries += [(f"{VARIANT_LABELS.get(v, v)}, seed {sd}", v, e)
                        for v, per in row.get("variants", {}).items() for sd, e in per.items()]
            for label, meth, m in entries:
                sig = ", ".join(f"{x / (1 + x) if flow else x:.3g}" for x in m["sigmas"])
                if "strategy" in m:
                    sig += "; strategy " + " ".join(m["strategy"])
                diff = ("-" if meth == row["best_fixed"] else
                        f"{m['diff']:+.4f} [{m['diff_ci'][0]:+.4f}, {m['diff_ci'][1]:+.4f}]")
                excess = ("-" if "excess" not in m else
                          f"{_f(m['excess'])} [{_f(m['excess_ci'][0])}, "
                          f"{_f(m['excess_ci'][1])}]")
                wall_txt = f"{m['wall_s']:.0f}"
                if "search_wall_s" in m and m["search_wall_s"] != m["wall_s"]:
                    wall_txt += f" ({m['search_wall_s']:.0f} own)"
                lines.append(
                    f"| {label} | {_f(m['fid'])} [{_f(m['fid_ci'][0])}, "
                    f"{_f(m['fid_ci'][1])}] | {excess} | {diff} | {m['calls']:,} | {wall_txt} | "
                    f"{m['candidates'] or '-'} | [{sig}] |")
            lines.append("")
    lines += [
        f"Total wall time {wall / 60:.1f} min"
        + (f" (summed over {len(res['parts'])} processes run side by side)"
           if len(res.get("parts", [])) > 1 else "")
        + f". Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, torch "
        + ("threads as in the commands (--threads; default: torch's)"
           if len(res.get("parts", [])) > 1 else f"threads {torch.get_num_threads()}")
        + ", load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
        + (" when merged." if len(res.get("parts", [])) > 1 else " at the end."), "",
    ]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = res["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 5), squeeze=False)
    for ax, mres in zip(axes[0], models):
        nfes = [r["nfe"] for r in mres["rows"]]
        methods = [k for k in (mres["rows"][0]["methods"] if mres["rows"] else ())
                   if all(k in r["methods"] for r in mres["rows"])]
        for k, meth in enumerate(methods):
            fid = np.array([r["methods"][meth]["fid"] for r in mres["rows"]])
            ci = np.array([r["methods"][meth]["fid_ci"] for r in mres["rows"]])
            err = np.abs(np.stack([fid - ci[:, 0], ci[:, 1] - fid]))
            x = np.array(nfes) + (k - len(methods) / 2) * 0.04
            style = "-" if meth in ("gits", "ld3", "evolution") else ":"
            ax.errorbar(x, fid, yerr=err, marker="o", ms=3, capsize=2, ls=style,
                        label=LABELS.get(meth, meth))
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("held-out FID (digits features), 95% CI")
        ax.set_title(f"{mres['model']}, {mres.get('solver', res['solver'])}")
        ax.set_xticks(nfes)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _recorded_command(json_path: Path) -> str | None:
    """The command line of the quality.md beside a quality.json (a merged result written
    before merged files kept their command), or None."""
    md = json_path.with_suffix(".md")
    if not md.is_file():
        return None
    for line in md.read_text().splitlines():
        if line.startswith("Command: `") and line.endswith("`"):
            return line[len("Command: `"):-1]
    return None


def merge(out: Path, others: Sequence[Path], st: Settings, command: str) -> int:
    """Rows of several runs (same settings, other NFEs) in one result; wall times add up."""
    files = [out / "quality.json", *others]
    runs = [json.loads(f.read_text()) for f in files if f.exists()]
    models: dict[str, dict[str, Any]] = {}
    for r in runs:
        for m in r["models"]:
            key = f"{m['model']}/{m.get('solver', r['solver'])}"
            cur = models.setdefault(key, {**m, "solver": m.get("solver", r["solver"]),
                                          "rows": []})
            have = {row["nfe"] for row in cur["rows"]}
            cur["rows"] += [row for row in m["rows"] if row["nfe"] not in have]
            cur["rows"].sort(key=lambda row: row["nfe"])
    commands, parts = [], []
    for f, r in zip([f for f in files if f.exists()], runs):
        nfes = sorted({row["nfe"] for m in r["models"] for row in m["rows"]})
        commands.append(r.get("command") or _recorded_command(f)
                        or "nice python benchmarks/quality.py --nfe " + " ".join(map(str, nfes)))
        # A merged result counts the processes it was merged from, not itself.
        parts += r.get("parts") or [str(f)]
    command = " ; ".join(commands)
    res = {"solver": runs[0]["solver"], "models": list(models.values()),
           "wall_s": sum(float(r.get("wall_s", 0.0)) for r in runs),
           "parts": parts, "command": command}
    (out / "quality.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (out / "quality.md").write_text(markdown(res, st, command, res["wall_s"]))
    plot(res, out / "quality.png")
    print(f"merged {len(runs)} runs into {out / 'quality.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a small, fast version (tests)")
    p.add_argument("--models", nargs="+", default=None,
                   help="zoo names (default gmm-digits-k64; e.g. digits-unet-s)")
    p.add_argument("--solvers", nargs="+", default=None,
                   help="solvers (default dpmpp_2m; e.g. euler dpmpp_2m unipc ipndm)")
    p.add_argument("--nfe", nargs="+", type=int, default=None)
    p.add_argument("--per-candidate", type=int, default=None)
    p.add_argument("--heldout", type=int, default=None)
    p.add_argument("--reference", type=int, default=None)
    p.add_argument("--budget-factor", type=float, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(RESULTS), help="directory of quality.md/.png/.json")
    p.add_argument("--resume", action="store_true",
                   help="keep the NFEs already in <out>/quality.json (same settings)")
    p.add_argument("--resamples", type=int, default=None, help="bootstrap resamples")
    p.add_argument("--searcher-seeds", nargs="+", type=int, default=None,
                   help="searcher seeds of every variant (default 0; issue 19: 0 1 2)")
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS,
                   help="searches per seed (default: evolution)")
    p.add_argument("--race-k", type=int, default=None, help="racing: candidates re-scored")
    p.add_argument("--no-others", action="store_true",
                   help="skip bayes and random (issue 19's runs: the evolution variants only)")
    p.add_argument("--baselines", choices=sorted(BASELINE_SETS), default=None,
                   help="the non-searched schedules: edm (default: polynomial, logSNR, "
                   "time-uniform) or flow (the flow-time families flow users run)")
    p.add_argument("--searches", nargs="+", choices=SEARCHES, default=None,
                   help="which searches to run (default: all three)")
    p.add_argument("--space", nargs="+", default=None, metavar="KEY=VALUE",
                   help="ContinuousSpace keywords over the defaults, e.g. warp=flow shift=3 "
                   "(values parsed as YAML)")
    p.add_argument("--evolution", nargs="+", default=None, metavar="KEY=VALUE",
                   help="EvolutionSearcher keywords over the benchmark's, e.g. "
                   "mutation=level population_num=6 (values parsed as YAML)")
    p.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                   help="compute nothing: merge the rows of these quality.json files (runs "
                        "of the same settings over other NFEs, e.g. in parallel processes) "
                        "into <out>/quality.json and rewrite quality.md and quality.png")
    a = p.parse_args(argv)
    st = tiny_settings() if a.tiny else full_settings()
    for key, val in (("models", a.models), ("solvers", a.solvers), ("nfes", a.nfe),
                     ("per_candidate", a.per_candidate),
                     ("heldout", a.heldout), ("reference", a.reference),
                     ("budget_factor", a.budget_factor), ("resamples", a.resamples),
                     ("searcher_seeds", a.searcher_seeds), ("variants", a.variants)):
        if val is not None:
            setattr(st, key, val)
    if a.race_k is not None:
        st.racing = dict(st.racing, top_k=a.race_k)
    if a.no_others:
        st.others = False
    if a.baselines is not None:
        st.baselines = a.baselines
    if a.searches is not None:
        st.searches = list(a.searches)
    for kv in a.space or ():
        key, sep, val = kv.partition("=")
        if not sep or not key:
            p.error(f"--space {kv!r}: expected KEY=VALUE")
        import yaml

        st.space = {**st.space, key: yaml.safe_load(val)}
    try:
        st.evolution = {**st.evolution, **evolution_keywords(a.evolution or ())}
    except ValueError as e:
        p.error(f"--evolution {e}")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.merge is not None:
        return merge(out, [Path(m) for m in a.merge], st, command.strip())
    earlier: dict[str, list[dict[str, Any]]] = {}
    if a.resume and (out / "quality.json").exists():
        prev = json.loads((out / "quality.json").read_text())
        earlier = {(m["model"], m.get("solver", prev["solver"])): m["rows"]
                   for m in prev["models"]}
        t0 -= float(prev.get("wall_s", 0.0))
    res: dict[str, Any] = {"solver": st.solver, "models": []}

    def write(partial: dict[str, Any] | None = None) -> None:
        """Results so far (after every NFE, so an interrupted run leaves its rows)."""
        models = list(res["models"]) + ([partial] if partial is not None else [])
        cur = {"solver": st.solver, "models": models, "wall_s": time.perf_counter() - t0,
               "command": command.strip()}
        (out / "quality.json").write_text(json.dumps(cur, indent=1, default=float) + "\n")
        (out / "quality.md").write_text(markdown(cur, st, command.strip(), cur["wall_s"]))
        plot(cur, out / "quality.png")

    for solver in st.solvers:
        for m in st.models:
            res["models"].append(bench_model(m, replace(st, solver=solver), log,
                                             earlier.get((m, solver), ()), write))
    write()
    log(f"wrote {out / 'quality.md'}, quality.json, quality.png")
    key = "flow_target_met" if st.baselines == "flow" else "target_met"
    met = all(r.get(key, False) for m in res["models"] for r in m["rows"] if r["nfe"] <= 6)
    log("target " + ("met" if met else "NOT met") + " at every NFE <= 6")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
