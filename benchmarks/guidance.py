"""Guidance benchmark: searched guidance schedules against constant guidance, held out.

For each class-conditional model (``digits-unet-cond-s``: the digits UNet trained with label
dropout; ``gmm-digits-cond``: the exact per-class Gaussian mixture), the solver (dpmpp_2m)
and each NFE (= steps, the last to 0), the schedules compared are:

- constant guidance w = 1, 2, 4 on EDM's timesteps (polynomial, rho 7);
- the guidance interval of Kynkaanniemi et al. (NeurIPS 2024), their EDM2 setting (w = 2 on
  the steps whose level lies in (0.28, 1.61]) on the same timesteps;
- searched timesteps with constant guidance at the best constant w (chosen on the search
  seeds among 1, 2, 4);
- timesteps and guidance searched jointly: the interval family (w in [0.5, 4] and the
  interval searched) and free per-step weights (w in [0, 4], snapped to 1 within 0.05);
- the ablation of the better joint schedule (by its search objective): its timesteps with
  w = 1 on every step, which says whether its guidance, rather than its timesteps, is what
  makes it better;
- a sweep of constant w around 1 on the searched timesteps (does any guidance help there?).

The searches are searchd's evolution (mixed-scale mutation, no offspring pre-screen: its
predictor does not see the weights), run in-process on the benchmark's own scorer with the
same candidate budget each: the timesteps-only search warm-started from the best constant,
the joint searches from the four non-searched schedules *and* the timesteps-only winner
(so they start where it ended, and their cost adds to its), on the
objective ``searchd.evaluation.conditional.GuidanceObjective``: class-conditional FID
subject to accuracy >= that of the best constant-guidance schedule (the floor), as an
exact penalty. ``--floor`` names another floor (a fixed schedule's accuracy, or a number)
and ``--floor-margin`` raises the searches' threshold above it (a number, or ``<k>se``: k
standard errors of the floor's accuracy at the search's sample count), both resolved by the
library's ``resolve_objective`` exactly as a ``class_fid`` run's ``metric.options``
(``accuracy_floor``, ``floor_margin``) are. Every schedule is then re-scored on held-out
seeds: class-conditional FID (mean over classes of per-class FID), FID of the
class-balanced pool, the digits network's accuracy on the requested class, and network
calls per sample (a step with w != 1 costs two), with 95% intervals from a bootstrap
stratified by class (labels are fixed by the seeds; the same resampled indices for every
schedule, so differences are paired).

References: gmm-digits-cond: exact samples of each class (seeds 2,000,000..); the UNet: the
real digits of each class (scikit-learn's 1,797). Labels: sample i of any seed list has
class ``seed mod 10`` (the same in every schedule).

Targets (issue 23): on digits-unet-cond-s at NFE 6 the jointly searched schedule beats the
best constant-guidance baseline by >= 20% held-out class-conditional FID, at equal or
better accuracy, with an interval excluding 0, and beats the searched-timesteps-only
schedule, showing that searching the guidance adds something (checked twice: the joint
schedule beats the timesteps-only one, and beats its own timesteps at w = 1); on
gmm-digits-cond, whether guidance helps at low NFE at all.

    nice python benchmarks/guidance.py                   # results/guidance.md and .json
    python benchmarks/guidance.py --tiny --out DIR       # a small version (the test suite's)
    # parts side by side (one process per model and NFE), then one table:
    nice python benchmarks/guidance.py --models gmm-digits-cond --nfe 6 --out DIR1 ...
    python benchmarks/guidance.py --merge DIR1/guidance.json DIR2/guidance.json ...
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import run_searcher  # noqa: E402  (the in-process search loop, beside this)

from searchd.evaluation.conditional import (  # noqa: E402
    DEFAULT_FLOOR_MARGIN,
    ClassReference,
    GuidanceObjective,
    conditional_metrics,
    exact_class_reference,
    floor_margin,
    objective_from_dict,
    resolve_objective,
    stratified_counts,
)
from searchd.evaluation.conditional_evaluator import ConditionalEvaluator  # noqa: E402
from searchd.evaluation.digits import digits_images  # noqa: E402
from searchd.evaluation.features import load_features  # noqa: E402
from searchd.evaluation.heldout import bootstrap_conditional, bootstrap_interval  # noqa: E402
from searchd.models import load  # noqa: E402
from searchd.schedule import Schedule  # noqa: E402
from searchd.schedules import baseline  # noqa: E402
from searchd.schedules.guidance_spaces import (  # noqa: E402
    PAPER_INTERVAL,
    ConstantGuidance,
    GuidedSpace,
    IntervalGuidance,
    StepGuidance,
    constant_guidance,
    interval_guidance,
)
from searchd.schedules.spaces import ContinuousSpace, with_meta  # noqa: E402
from searchd.searchers.evolution import EvolutionSearcher  # noqa: E402
from searchd.solvers import network_calls  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEED_BASE = 0
HELDOUT_SEED_BASE = 1_000_000
REFERENCE_SEED_BASE = 2_000_000
CONSTANT_WS = (1.0, 2.0, 4.0)
SEARCHED = ("timesteps", "joint_interval", "joint_steps")
SWEEP_WS = (0.5, 0.75, 1.25, 1.5)  # constant w on the searched timesteps (besides w*)
LABELS = {"interval": "paper interval (w=2, (0.28, 1.61])",
          "timesteps": "searched timesteps, constant w*",
          "joint_interval": "joint: timesteps + interval (w searched)",
          "joint_steps": "joint: timesteps + per-step w",
          "joint_w1": "ablation: the better joint's timesteps, w=1"}


@dataclass
class Settings:
    models: list[str] = field(default_factory=lambda: ["digits-unet-cond-s", "gmm-digits-cond"])
    nfes: list[int] = field(default_factory=lambda: [6, 10])
    solver: str = "dpmpp_2m"
    per_candidate: int = 1000
    heldout: int = 5000
    reference: int = 10000  # exact samples per model (the mixture; the UNet uses the data)
    candidates: int = 60  # per search
    evolution: dict[str, Any] = field(default_factory=lambda: dict(
        population_num=10, select_num=4, mutation_num=6, crossover_num=4, m_prob=0.4,
        mutation_scale=(0.02, 0.3), random_fill=True))
    space: dict[str, Any] = field(default_factory=lambda: dict(
        warp="rho", rho=7.0, free_endpoints=True, gap_ratio=10.0, endpoint_range=0.3))
    interval_w: tuple[float, float] = (0.5, 4.0)
    step_w: tuple[float, float] = (0.0, 4.0)
    one_band: float = 0.05
    resamples: int = 200
    seed: int = 0
    # Constant weights on EDM's timesteps (the constant-guidance baselines).
    constants: tuple[float, ...] = CONSTANT_WS
    # The accuracy floor of the objective: "best" (the best constant's accuracy, the
    # constant chosen by class FID), a fixed schedule's name ("w1.5", "interval": its
    # accuracy on the search seeds), or a number (absolute).
    floor: str = "best"
    # Added to the floor in the searches' objective (metric.options.floor_margin, passed to
    # the library's resolve_objective as a run does): a number, or "<k>se" (k standard
    # errors of the floor's accuracy at per_candidate samples); the library's default.
    floor_margin: float | str = DEFAULT_FLOOR_MARGIN
    joints: tuple[str, ...] = ("interval", "steps")


def const_name(w: float) -> str:
    """The name of constant guidance at ``w`` on EDM's timesteps ("w1", "w1.25", ...)."""
    return f"w{w:g}"


def fixed_names(st: Settings) -> tuple[str, ...]:
    """The non-searched schedules: the constants, then the paper's interval."""
    return (*(const_name(w) for w in st.constants), "interval")


def method_names(row: dict[str, Any]) -> tuple[str, ...]:
    """The table's schedules of one result row (its constants, as it was run)."""
    return (*row.get("fixed", ("w1", "w2", "w4", "interval")), *SEARCHED, "joint_w1")


def label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    return f"constant w={name[1:]}"


def tiny_settings() -> Settings:
    """Every code path on a few hundred samples (the test suite's)."""
    s = Settings(models=["gmm-digits-cond"], nfes=[4], per_candidate=200, heldout=300,
                 reference=1000, candidates=12, resamples=30)
    s.evolution = dict(s.evolution, population_num=6, select_num=2, mutation_num=3,
                       crossover_num=2)
    return s


# The search loop (the only use of the in-process loop: swap it for the library's) -----------
def search(searcher: EvolutionSearcher, scorer: ConditionalEvaluator, seeds: Sequence[int],
           batch: int) -> dict[str, Any]:
    """Run ``searcher`` to the end on ``scorer``'s objective (``run_searcher`` of
    benchmarks/quality.py, which minimizes the results' ``fid``: the objective is handed to
    it under that name). Returns its dict (schedule, value, candidates, scored)."""

    class ObjectiveAsFid:
        def evaluate(self, schedules: Sequence[Schedule], seeds: Sequence[int]) -> list[Any]:
            out = scorer.evaluate(schedules, seeds)
            return [replace(r, metrics={**r.metrics, "fid": r.metrics["objective"]})
                    if r.ok else r for r in out]

    return run_searcher(searcher, ObjectiveAsFid(), seeds, batch)


# One model --------------------------------------------------------------------------------------
def class_reference(model: str, den: Any, feats: Any, st: Settings) -> ClassReference:
    """Per-class and pool statistics: exact samples of the mixture, real digits for the UNet."""
    if hasattr(den, "class_mixture"):
        return exact_class_reference(den, feats, range(REFERENCE_SEED_BASE,
                                                       REFERENCE_SEED_BASE + st.reference), 10)
    images, labels = digits_images()
    f = feats(torch.from_numpy(images))
    return ClassReference.from_features(f, labels, 10, {
        **feats.info, "source": "sklearn-digits", "count": int(len(labels))})


def heldout(scorer: ConditionalEvaluator, schedules: dict[str, Schedule], seeds: Sequence[int],
            st: Settings) -> dict[str, dict[str, Any]]:
    """Held-out metrics of every schedule, with stratified bootstrap values (shared)."""
    labels = scorer.labels(seeds)
    counts = stratified_counts(labels, st.resamples, seed=0)
    out = {}
    for name, s in schedules.items():
        feats, logits = scorer.outputs(s, seeds)
        m = conditional_metrics(feats, logits, labels, scorer.reference)
        boot = bootstrap_conditional(feats, logits, labels, scorer.reference, counts)
        out[name] = {"metrics": m, "boot": boot, "calls": scorer.network_calls(s)}
    return out


def _ci(v: np.ndarray, point: float) -> list[float]:
    return [float(x) for x in bootstrap_interval(v, point, 0.95, "centered")]


def bench_model(model: str, st: Settings, log: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    den = load(model)
    feats = load_features("digits")
    ref = class_reference(model, den, feats, st)
    scorer = ConditionalEvaluator(den, ref, feats, solver=st.solver)
    log(f"{model}: reference and scorer in {time.perf_counter() - t0:.0f} s")
    search_seeds = list(range(SEED_BASE, SEED_BASE + st.per_candidate))
    held_seeds = list(range(HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + st.heldout))
    rows = []
    for nfe in st.nfes:
        n = nfe  # dpmpp_2m: one call per step
        times = ContinuousSpace(n, den.sigma_min, den.sigma_max, True, solver=st.solver,
                                **st.space)
        poly = Schedule(baseline("polynomial", n, den.sigma_min, den.sigma_max, True, rho=7),
                        solver=st.solver, meta={"origin": "baseline", "family": "polynomial"})
        fixed_n = fixed_names(st)
        sched: dict[str, Schedule] = {
            const_name(w): constant_guidance(poly, w) for w in st.constants}
        sched["interval"] = interval_guidance(poly, **PAPER_INTERVAL)
        fixed = [sched[f] for f in fixed_n]
        search_vals = {f: r.metrics for f, r in zip(fixed_n, scorer.evaluate(fixed,
                                                                             search_seeds))}
        consts = [f for f in fixed_n if f != "interval"]
        best, objective = choose_floor(st.floor, consts, search_vals, sched,
                                       st.floor_margin, st.per_candidate)
        obj_scorer = scorer.with_objective(objective)
        w_star = float(sched[best].guidance[0])
        log(f"  NFE {nfe}: best constant {best} (search fid_class "
            f"{search_vals[best]['fid_class']:.4f}, accuracy {search_vals[best]['accuracy']:.4f})")
        spaces = {
            "timesteps": GuidedSpace(times, ConstantGuidance(w_star)),
            "joint_interval": GuidedSpace(times, IntervalGuidance(st.interval_w, den.sigma_min,
                                                                  den.sigma_max)),
            "joint_steps": GuidedSpace(times, StepGuidance(n, st.step_w, st.one_band)),
        }
        spaces = {k: v for k, v in spaces.items()
                  if k == "timesteps" or k.removeprefix("joint_") in st.joints}
        cost: dict[str, dict[str, Any]] = {f: {"candidates": 0, "search_calls": 0,
                                               "wall_s": 0.0} for f in fixed_n}
        for name, space in spaces.items():
            # The joint searches start from the fixed schedules and the timesteps-only
            # winner (projected: its weights w* are in every joint family).
            seeds = [sched[best]] if name == "timesteps" else [
                with_meta(space.project(s), origin="baseline")
                for s in (*fixed, sched["timesteps"])]
            t1 = time.perf_counter()
            searcher = EvolutionSearcher(space, "fid", "min", max_epochs=10_000, seed=st.seed,
                                         seeds=seeds, max_candidates=st.candidates,
                                         **st.evolution)
            out = search(searcher, obj_scorer, search_seeds,
                         st.evolution.get("population_num", 10))
            sched[name] = out["schedule"]
            calls = sum(network_calls(st.solver, s.n_steps, s.final_zero, s.guidance)
                        for s, _ in out["scored"]) * st.per_candidate
            cost[name] = {"candidates": out["candidates"], "search_calls": int(calls),
                          "wall_s": time.perf_counter() - t1, "search_objective": out["value"]}
            log(f"  NFE {nfe}: {name}: {out['candidates']} candidates, best objective "
                f"{out['value']:.4f}, {cost[name]['wall_s']:.0f} s")
        joint = min((k for k in ("joint_interval", "joint_steps") if k in spaces),
                    key=lambda k: cost[k]["search_objective"])
        sched["joint_w1"] = constant_guidance(sched[joint], 1.0)
        cost["joint_w1"] = {"candidates": 0, "search_calls": 0, "wall_s": 0.0}
        for w in SWEEP_WS:
            sched[f"sweep_{w:g}"] = constant_guidance(sched["timesteps"], w)
        t1 = time.perf_counter()
        held = heldout(scorer, sched, held_seeds, st)
        log(f"  NFE {nfe}: held-out scoring of {len(sched)} schedules in "
            f"{time.perf_counter() - t1:.0f} s")
        rows.append(summarize(model, nfe, sched, cost, held, best, search_vals, objective,
                              joint, fixed_n, st.floor))
        if isinstance(st.floor_margin, str):  # as resolve_objective records it
            rows[-1]["objective"]["margin_from"] = (f"{st.floor_margin.strip()} at "
                                                    f"{st.per_candidate} search samples")
    return {"model": model, "solver": st.solver, "rows": rows}


def choose_floor(floor: str, consts: Sequence[str], search_vals: dict[str, Any],
                 sched: dict[str, Schedule] | None = None, margin: float | str = 0.0,
                 samples: int | None = None) -> tuple[str, GuidanceObjective]:
    """The best constant and the searches' objective for ``Settings.floor``, resolved by the
    library's ``resolve_objective`` from the ``metric.options`` a run would have
    (``accuracy_floor``, ``floor_margin``), so the benchmark and a ``class_fid`` run share
    one floor logic.

    "best": the constant with the lowest class FID on the search seeds is the floor's
    baseline (its accuracy the floor, its class FID the penalty's scale). A fixed
    schedule's name: that schedule is. A number: an absolute floor (penalty in class-FID
    units per point, as in a run). The best constant is the one with the lowest objective
    *without the margin* on the search seeds (a constant that meets the user's floor ranks
    first): the margin is the searches' guard against their own selection, not a stricter
    floor for the baselines. ``search_vals``: name -> metrics on the search seeds;
    ``sched``: name -> schedule (the baselines); ``samples``: search samples (for "<k>se").
    """
    names = list(search_vals)
    baselines = sched if sched is not None else {n: n for n in names}
    by_id = {id(baselines[n]): n for n in names if n in baselines}

    class _Scored:  # the CandidateResult shape resolve_objective reads
        def __init__(self, name: str) -> None:
            self.ok, self.error, self.metrics = True, None, search_vals[name]

    if floor == "best":
        floor = min(consts, key=lambda f: search_vals[f]["fid_class"])
    options: dict[str, Any] = {"floor_margin": margin}
    if floor in search_vals:
        options["accuracy_floor"] = floor
    else:
        try:
            value = float(floor)
        except ValueError:
            raise SystemExit(f"--floor {floor!r}: give best, a number in [0, 1], or one of "
                             f"{', '.join(search_vals)}") from None
        if not 0.0 <= value <= 1.0:
            raise SystemExit(f"--floor {floor!r}: an absolute floor is in [0, 1]")
        options["accuracy_floor"] = value
    try:
        described = resolve_objective(options, {n: baselines[n] for n in names},
                                      lambda s: _Scored(by_id[id(s)]), samples=samples)
    except ValueError as e:
        raise SystemExit(f"--floor-margin: {e}") from None
    objective = objective_from_dict(described)
    assert objective is not None
    plain = replace(objective, margin=0.0)
    return min(consts, key=lambda f: plain(search_vals[f])), objective


def summarize(model: str, nfe: int, sched: dict[str, Schedule], cost: dict[str, Any],
              held: dict[str, Any], best: str, search_vals: dict[str, Any],
              objective: GuidanceObjective, joint: str, fixed_n: Sequence[str] = (),
              floor: str = "best") -> dict[str, Any]:
    ref = held[best]
    out: dict[str, Any] = {"model": model, "nfe": nfe, "best_constant": best,
                           "fixed": list(fixed_n), "floor_from": floor,
                           "objective": objective.describe(),
                           "search_metrics": {f: {k: v for k, v in m.items()
                                                  if not k.startswith("fid_class_")}
                                              for f, m in search_vals.items()},
                           "methods": {}}
    for name in method_names(out):
        if name not in held:  # a joint search not run (--joint)
            continue
        h, s = held[name], sched[name]
        m, b = h["metrics"], h["boot"]
        entry = {"sigmas": [float(x) for x in s.sigmas],
                 "guidance": [float(x) for x in s.guidance],
                 "network_calls": h["calls"], **cost[name]}
        for k in ("fid_class", "fid", "accuracy"):
            entry[k] = m[k]
            entry[f"{k}_ci"] = _ci(b[k], m[k])
            d = m[k] - ref["metrics"][k]
            entry[f"{k}_diff"] = d
            entry[f"{k}_diff_ci"] = _ci(b[k] - ref["boot"][k], d)
        rel = 1.0 - m["fid_class"] / ref["metrics"]["fid_class"]
        entry["improvement"] = rel
        entry["improvement_ci"] = _ci(1.0 - b["fid_class"] / ref["boot"]["fid_class"], rel)
        out["methods"][name] = entry
    out["joint"] = joint  # the joint search with the better search objective
    j = held[joint]
    for other in ("timesteps", "joint_w1"):
        t = held[other]
        d = j["metrics"]["fid_class"] - t["metrics"]["fid_class"]
        out[f"joint_vs_{other}"] = {"diff": d, "diff_ci": _ci(j["boot"]["fid_class"]
                                                             - t["boot"]["fid_class"], d)}
    out["joint_guided_steps"] = int(np.sum(np.asarray(sched[joint].guidance) != 1.0))
    w_star = float(sched["timesteps"].guidance[0])
    out["sweep"] = {}
    for w in sorted({w_star, *SWEEP_WS}):
        h = held["timesteps"] if w == w_star else held[f"sweep_{w:g}"]
        m = h["metrics"]
        out["sweep"][f"{w:g}"] = {
            **{k: m[k] for k in ("fid_class", "fid", "accuracy")},
            "fid_class_ci": _ci(h["boot"]["fid_class"], m["fid_class"]),
            "accuracy_ci": _ci(h["boot"]["accuracy"], m["accuracy"]),
            "network_calls": h["calls"]}
    e = out["methods"][joint]
    out["target"] = {
        "improvement_ge_20pct": e["improvement"] >= 0.20,
        "ci_excludes_0": e["improvement_ci"][0] > 0,
        "accuracy_not_worse": e["accuracy_diff_ci"][1] >= 0,
        "beats_timesteps_only": out["joint_vs_timesteps"]["diff_ci"][1] < 0,
        "guidance_contributes": out["joint_vs_joint_w1"]["diff_ci"][1] < 0,
    }
    out["target_met"] = all(out["target"].values())
    return out


# Report -----------------------------------------------------------------------------------------
def _f(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def _ci_txt(v: float, ci: Sequence[float], signed: bool = False) -> str:
    fmt = (lambda x: f"{x:+.4f}") if signed else _f
    return f"{fmt(v)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def markdown(res: dict[str, Any], st: Settings, command: str, wall: float) -> str:
    lines = [
        "# Guidance: searched guidance schedules vs constant guidance (held out)", "",
        f"Command: `{command}`", "",
        f"Solver {st.solver}, NFE = steps (the last step goes to 0). Each search scores its "
        f"candidates on {st.per_candidate} samples (seeds {SEED_BASE}..); every schedule is "
        f"then re-scored on {st.heldout} held-out samples (seeds {HELDOUT_SEED_BASE}..). Sample "
        "i's class is seed mod 10 (class-balanced, the same in every schedule). FID on the "
        "digits network's features; **class FID** = mean over the 10 classes of each class's "
        "FID against the class's reference; **pool FID** = FID of all samples against the "
        "class-balanced reference; **accuracy** = the digits network's top-1 agreement with "
        "the requested class. References: gmm-digits-cond, "
        f"{st.reference} exact samples (seeds {REFERENCE_SEED_BASE}..); digits-unet-cond-s, "
        "the 1,797 real digits, per class. Intervals: 95%, bootstrap stratified by class "
        f"({st.resamples} resamples, the same for every schedule: paired), centered. "
        "Differences are to the best constant-guidance schedule (chosen on the search seeds "
        "by class FID). Network calls: forward passes per sample (a step with w != 1 costs "
        "two).", "",
        f"Searches: evolution ({', '.join(f'{k}={v}' for k, v in st.evolution.items())}), "
        f"{st.candidates} candidates each, no offspring pre-screen; the timesteps-only search "
        "warm-started from the best constant, the joint ones from the four non-searched "
        "schedules and the timesteps-only winner (their cost adds to its); space: "
        f"continuous, {', '.join(f'{k}={v}' for k, v in st.space.items())}; "
        f"interval family w in {list(st.interval_w)}; per-step w in {list(st.step_w)} "
        f"(within {st.one_band} of 1 -> 1). Objective: class FID + penalty below the "
        "accuracy floor (`GuidanceObjective`: one reference class-FID per accuracy point "
        "below; the floor and its source per row below, with the searches' margin above it "
        "if any; the best constant is the constant with the lowest objective without the "
        "margin on the search seeds, so one that meets the floor when any does).", "",
    ]
    for mres in res["models"]:
        lines += [f"## {mres['model']}", "",
                  "| NFE | best constant | its class FID | joint (kind) | joint class FID | "
                  "better by [95% CI] | accuracy diff [95% CI] | joint - timesteps-only "
                  "[95% CI] | joint - its timesteps at w=1 [95% CI] | guided steps | "
                  "target met |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in mres["rows"]:
            b = row["methods"][row["best_constant"]]
            j = row["methods"][row["joint"]]
            jt, jw = row["joint_vs_timesteps"], row["joint_vs_joint_w1"]
            lines.append(
                f"| {row['nfe']} | {label(row['best_constant'])} | {_f(b['fid_class'])} | "
                f"{row['joint']} | {_f(j['fid_class'])} | {100 * j['improvement']:.1f}% "
                f"[{100 * j['improvement_ci'][0]:.1f}, {100 * j['improvement_ci'][1]:.1f}] | "
                f"{_ci_txt(j['accuracy_diff'], j['accuracy_diff_ci'], True)} | "
                f"{_ci_txt(jt['diff'], jt['diff_ci'], True)} | "
                f"{_ci_txt(jw['diff'], jw['diff_ci'], True)} | "
                f"{row['joint_guided_steps']} of {row['nfe']} | "
                + ("yes" if row["target_met"] else "**no** ("
                   + ", ".join(k for k, v in row["target"].items() if not v) + ")") + " |")
        lines.append("")
        for row in mres["rows"]:
            o = row["objective"]
            src = row.get("floor_from", "best")
            src_txt = ("the best constant's (by class FID) accuracy on the search seeds"
                       if src == "best" else
                       f"{label(src)}'s accuracy on the search seeds"
                       if src in row["search_metrics"] else "absolute")
            lines += [f"NFE {row['nfe']}: accuracy floor {o['floor']:.4f} ({src_txt}), "
                      f"penalty scale {o['reference_fid']:.4f} "
                      "class FID per point below"
                      + (f"; the searches' objective adds a margin of {o['margin']:.4f} "
                         f"({o.get('margin_from', 'given')}): floor + margin = "
                         f"{o['floor'] + o['margin']:.4f}" if o.get("margin") else "")
                      + ".", ""]
        for row in mres["rows"]:
            lines += [f"### NFE {row['nfe']}", "",
                      "| schedule | class FID [95% CI] | diff [95% CI] | pool FID [95% CI] | "
                      "accuracy [95% CI] | accuracy diff [95% CI] | network calls | "
                      "candidates | guidance per step | sigmas |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for name in method_names(row):
                if name not in row["methods"]:
                    continue
                m = row["methods"][name]
                diff = ("-" if name == row["best_constant"]
                        else _ci_txt(m["fid_class_diff"], m["fid_class_diff_ci"], True))
                adiff = ("-" if name == row["best_constant"]
                         else _ci_txt(m["accuracy_diff"], m["accuracy_diff_ci"], True))
                g = ", ".join(f"{x:.2g}" for x in m["guidance"])
                sig = ", ".join(f"{x:.3g}" for x in m["sigmas"])
                lines.append(
                    f"| {label(name)} | {_ci_txt(m['fid_class'], m['fid_class_ci'])} | {diff} | "
                    f"{_ci_txt(m['fid'], m['fid_ci'])} | "
                    f"{_ci_txt(m['accuracy'], m['accuracy_ci'])} | {adiff} | "
                    f"{m['network_calls']} | {m['candidates'] or '-'} | [{g}] | [{sig}] |")
            lines += ["", "Constant w on the searched timesteps (held out):", "",
                      "| w | class FID [95% CI] | pool FID | accuracy [95% CI] | network calls |",
                      "| --- | --- | --- | --- | --- |"]
            for w, m in row["sweep"].items():
                lines.append(f"| {w} | {_ci_txt(m['fid_class'], m['fid_class_ci'])} | "
                             f"{_f(m['fid'])} | {_ci_txt(m['accuracy'], m['accuracy_ci'])} | "
                             f"{m['network_calls']} |")
            lines.append("")
    parts = len(res.get("parts", []))
    lines += [f"Total wall time {wall / 60:.1f} min"
              + (f" (summed over {parts} processes run side by side)" if parts > 1 else "")
              + f". Machine: {platform.machine()}, "
              f"{os.cpu_count()} CPU cores visible, torch threads {torch.get_num_threads()}, "
              "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())
              + " at the end.", ""]
    return "\n".join(lines)


def merge(out: Path, files: Sequence[Path], st: Settings) -> int:
    """Rows of several runs (one process per model and NFE) in one result; the commands are
    listed and the wall times added up."""
    runs = [json.loads(f.read_text()) for f in files]
    models: dict[str, dict[str, Any]] = {}
    for r in runs:
        for m in r["models"]:
            cur = models.setdefault(m["model"], {**m, "rows": []})
            have = {row["nfe"] for row in cur["rows"]}
            cur["rows"] = sorted(cur["rows"] + [row for row in m["rows"]
                                                if row["nfe"] not in have],
                                 key=lambda row: row["nfe"])
    command = " ; ".join(r.get("command", "?") for r in runs)
    res = {"models": list(models.values()), "wall_s": sum(r.get("wall_s", 0.0) for r in runs),
           "command": command, "parts": [str(f) for f in files]}
    (out / "guidance.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (out / "guidance.md").write_text(markdown(res, st, command, res["wall_s"]))
    print(f"merged {len(runs)} runs into {out / 'guidance.md'}")
    return 0


def _margin_arg(v: str | None) -> float | str | None:
    """--floor-margin as metric.options.floor_margin takes it: a number, or '<k>se'."""
    if v is None:
        return None
    try:
        return float(v)
    except ValueError:
        return v


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a small, fast version (tests)")
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--nfe", nargs="+", type=int, default=None)
    p.add_argument("--per-candidate", type=int, default=None)
    p.add_argument("--heldout", type=int, default=None)
    p.add_argument("--candidates", type=int, default=None, help="candidates per search")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--constants", nargs="+", type=float, default=None,
                   help="constant weights on EDM's timesteps (default 1 2 4)")
    p.add_argument("--floor", default=None,
                   help="the objective's accuracy floor: best (the best constant's accuracy, "
                        "default), a fixed schedule's name (w1.5, interval: its accuracy on "
                        "the search seeds), or a number")
    p.add_argument("--floor-margin", default=None,
                   help="added to the floor in the searches' objective, as "
                        "metric.options.floor_margin: a number (e.g. 0.002) or '<k>se' (k "
                        "standard errors of the floor's accuracy at --per-candidate samples); "
                        f"default {DEFAULT_FLOOR_MARGIN}, the library's")
    p.add_argument("--joint", nargs="+", choices=("interval", "steps"), default=None,
                   help="which joint searches to run (default both)")
    p.add_argument("--out", default=str(RESULTS), help="directory of guidance.md/.json")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="compute nothing: merge these guidance.json files (runs of the same "
                        "settings over other models or NFEs) into <out>/guidance.md/.json")
    a = p.parse_args(argv)
    st = tiny_settings() if a.tiny else Settings()
    for key, val in (("models", a.models), ("nfes", a.nfe), ("per_candidate", a.per_candidate),
                     ("heldout", a.heldout), ("candidates", a.candidates),
                     ("constants", None if a.constants is None else tuple(a.constants)),
                     ("floor", a.floor), ("floor_margin", _margin_arg(a.floor_margin)),
                     ("joints", None if a.joint is None else tuple(a.joint))):
        if val is not None:
            setattr(st, key, val)
    try:  # a bad margin fails now, not after the references are built
        floor_margin(st.floor_margin, 0.5, st.per_candidate)
    except ValueError as e:
        raise SystemExit(f"--floor-margin: {e}") from None
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    command = "python benchmarks/guidance.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if a.merge:
        return merge(out, [Path(m) for m in a.merge], st)
    res: dict[str, Any] = {"models": []}
    for m in st.models:
        res["models"].append(bench_model(m, st, log))
        cur = {**res, "wall_s": time.perf_counter() - t0, "command": command.strip()}
        (out / "guidance.json").write_text(json.dumps(cur, indent=1, default=float) + "\n")
        (out / "guidance.md").write_text(markdown(cur, st, command.strip(), cur["wall_s"]))
    log(f"wrote {out / 'guidance.md'} and guidance.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
