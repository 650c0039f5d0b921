"""Model schedules (OMS-DPM) on the gmm-digits zoo: quality/latency frontier, the best
single-model schedule at equal latency, and what the predictor is worth.

    python benchmarks/model_schedules.py [--budgets 3 4 6] [--out benchmarks/results]

1. Latency: each member timed by ``ComposedDenoiser.measure_latency`` (batch 4096, warm-up,
   median of repeats) on this machine; budgets are in NFE-equivalents of the slowest member.
2. Quality of each member alone (polynomial rho=7 schedules, 5..20 steps), to see which
   budgets make the comparison meaningful.
3. For every budget B:
   - model-schedule search: evolution over a ``JointSpace`` (timesteps + a member per step,
     B + 2 steps, budget B) with the predictor pre-screen;
   - single-model, largest member: the same evolution over its timesteps alone
     (``ContinuousSpace``, B steps: all the budget allows), same candidate budget;
   - single-model, smaller members: the most steps the budget allows (capped), best of the
     baseline families on the search seeds (their floors are far above; see 2.);
   then every winner is re-scored on held-out seeds (bootstrap CIs, paired differences
   against the best single-model schedule).
4. Predictor: at one budget, the joint evolution without the predictor (same seed and
   candidate budget); actor calls saved = calls the plain run needed for its final best
   minus the calls the predictor run needed to reach that value; Kendall tau of the online
   predictions (each generation's kept offspring, scored after) and offline (trained on the
   first half of the plain run's candidates, tested on the second half).

Writes ``model_schedules.md``, ``model_schedules.json`` and ``model_schedules.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from searchd.evaluation import Evaluator
from searchd.evaluation.features import load_features
from searchd.evaluation.heldout import heldout_scores
from searchd.evaluation.reference import exact_reference
from searchd.loop import EvaluatorScorer, SearchLoop
from searchd.models.compose import compose
from searchd.schedule import Schedule
from searchd.schedules.baselines import baseline
from searchd.schedules.model_spaces import JointSpace
from searchd.schedules.spaces import ContinuousSpace, with_meta
from searchd.searchers.base import FINISHED
from searchd.searchers.evolution import EvolutionSearcher
from searchd.searchers.predictor import PredictorConfig, SchedulePredictor, kendall_tau

ZOO = ["gmm-digits-k1", "gmm-digits-k8", "gmm-digits-k64"]
SMIN, SMAX = 0.002, 80.0
FAMILIES = [("polynomial", {"rho": 7.0}), ("logsnr", {}), ("time_uniform", {})]
MAX_STEPS_SMALL = 24  # most steps tried for a small member alone


def run_search(searcher, evaluator: Evaluator, seeds: list[int]) -> list[dict[str, Any]]:
    """Run a searcher in the in-process search loop, a generation per batch (one batched
    evaluation each); returns every scored candidate in order."""
    out: list[dict[str, Any]] = []

    class Rows:
        def recorded(self, batch: Any, new: Any) -> None:
            for s, r in zip(batch.schedules, batch.results):
                v = r.value("fid")
                out.append({"schedule": s, "fid": math.inf if v is None else float(v)})

    SearchLoop(searcher, seeds, batch_size=1 << 20, observers=[Rows()]).run(
        EvaluatorScorer(evaluator))
    return out


def best_so_far(rows: list[dict[str, Any]]) -> np.ndarray:
    return np.minimum.accumulate([r["fid"] for r in rows])


def evolution(space, seeds_sched, *, pop: int, gens: int, seed: int,
              predictor: float | None, pred_steps: int) -> EvolutionSearcher:
    return EvolutionSearcher(
        space, "fid", "min", population_num=pop, select_num=max(2, pop // 4),
        mutation_num=pop // 2, crossover_num=pop // 4, m_prob=0.25, max_epochs=gens,
        seed=seed, seeds=seeds_sched, mutation_scale=0.1, predictor_top_fraction=predictor,
        predictor_min_train=pop, predictor_config=PredictorConfig(steps=pred_steps),
    )


def joint_space(n_steps: int, latency: Any, budget: float, big: int
                ) -> tuple[JointSpace, list[Schedule]]:
    """The joint space of ``n_steps`` at a latency budget, and its seeds: the fixed families,
    every step on the largest model (``big``)."""
    tspace = ContinuousSpace(n_steps, SMIN, SMAX, True, "rho", free_endpoints=True,
                             gap_ratio=10.0)
    jspace = JointSpace(tspace, latency, budget, names=ZOO)
    seeds = [with_meta(jspace.with_models(Schedule(baseline(fam, n_steps, SMIN, SMAX, True,
                                                            **params)),
                                          np.full(n_steps, big)), origin="baseline")
             for fam, params in FAMILIES]
    return jspace, seeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[3.0, 4.0, 6.0])
    p.add_argument("--predictor-budget", type=float, default=4.0)
    p.add_argument("--samples", type=int, default=1000, help="search samples per candidate")
    p.add_argument("--heldout", type=int, default=5000)
    p.add_argument("--reference", type=int, default=10000)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--pred-steps", type=int, default=150)
    p.add_argument("--extra-steps", type=int, default=2, help="joint: steps beyond B")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    log = print

    denoiser = compose(ZOO)
    lat = denoiser.measure_latency(batch_size=4096, warmup=2, repeats=7)
    log("latency ms/sample/call:", dict(zip(ZOO, lat)))
    feats = load_features("digits")
    ref = exact_reference(denoiser, feats, range(2_000_000, 2_000_000 + a.reference))
    ev = Evaluator(denoiser, feats, ref)
    seeds = list(range(a.samples))
    held = list(range(1_000_000, 1_000_000 + a.heldout))
    big = int(np.argmax(lat))
    unit = lat[big]
    res: dict[str, Any] = {"latency_ms": dict(zip(ZOO, lat)), "latency_info": {
        k: v for k, v in denoiser.latency_info.items() if k != "call_s"}, "args": vars(a),
        "machine": {"cpus": os.cpu_count(), "load": os.getloadavg(),
                    "python": platform.python_version(), "torch": torch.__version__}}

    # 2. Each member alone.
    alone = {}
    for m, name in enumerate(ZOO):
        scheds = [Schedule(baseline("polynomial", n, SMIN, SMAX, True, rho=7.0),
                           np.full(n, m), meta={"n": n}) for n in (5, 8, 12, 20)]
        rs = ev.evaluate(scheds, seeds)
        alone[name] = {s.meta["n"]: float(r.metrics["fid"]) for s, r in zip(scheds, rs)}
        log("alone", name, alone[name])
    res["alone"] = alone

    # 3. Frontier.
    frontier = []
    runs: dict[float, dict[str, Any]] = {}
    for B in a.budgets:
        budget = B * unit
        n_joint = int(round(B)) + a.extra_steps
        jspace, jseeds = joint_space(n_joint, lat, budget, big)
        t0 = time.perf_counter()
        jsearch = evolution(jspace, jseeds, pop=a.population, gens=a.generations,
                            seed=a.seed, predictor=0.5, pred_steps=a.pred_steps)
        jrows = run_search(jsearch, ev, seeds)
        log(f"B={B}: joint search {len(jrows)} candidates in {time.perf_counter() - t0:.0f} s,"
            f" best {min(r['fid'] for r in jrows):.4f}")
        # Largest member alone: timestep evolution with all the steps the budget allows.
        n_big = max(2, int(math.floor(B + 1e-9)))
        bspace = ContinuousSpace(n_big, SMIN, SMAX, True, "rho", free_endpoints=True,
                                 gap_ratio=10.0)
        bseeds = [Schedule(baseline(f, n_big, SMIN, SMAX, True, **pp),
                           meta={"origin": "baseline"}) for f, pp in FAMILIES]
        t0 = time.perf_counter()
        bsearch = evolution(bspace, bseeds, pop=a.population, gens=a.generations,
                            seed=a.seed, predictor=None, pred_steps=a.pred_steps)
        brows = run_search(_ModelIds(bsearch, big), ev, seeds)
        log(f"B={B}: {ZOO[big]} timestep search {len(brows)} in {time.perf_counter() - t0:.0f}"
            f" s, best {min(r['fid'] for r in brows):.4f}")
        singles: dict[str, dict[str, Any]] = {}
        bwin = min(brows, key=lambda r: (r["fid"], r["schedule"].id))
        singles[ZOO[big]] = {"schedule": bwin["schedule"], "search_fid": bwin["fid"],
                             "how": f"evolution over timesteps, {n_big} steps"}
        for m, name in enumerate(ZOO):
            if m == big:
                continue
            n_m = min(MAX_STEPS_SMALL, int(math.floor(budget / lat[m] + 1e-9)))
            cands = []
            for n in sorted({n_m, max(2, n_m // 2), min(n_m, 12)}):
                for f, pp in FAMILIES:
                    cands.append(Schedule(baseline(f, n, SMIN, SMAX, True, **pp),
                                          np.full(n, m), meta={"family": f, "n": n}))
            rs = ev.evaluate(cands, seeds)
            k = int(np.argmin([r.metrics.get("fid", math.inf) if r.ok else math.inf
                               for r in rs]))
            singles[name] = {"schedule": cands[k], "search_fid": float(rs[k].metrics["fid"]),
                             "how": f"best of {len(cands)} baseline schedules, "
                                    f"<= {n_m} steps"}
        best_single = min(singles, key=lambda k: singles[k]["search_fid"])
        jwin = min(jrows, key=lambda r: (r["fid"], r["schedule"].id))
        names = ["model schedule"] + list(singles)
        scheds = [jwin["schedule"]] + [singles[k]["schedule"] for k in singles]
        h = heldout_scores(ev, scheds, held, baseline_index=1 + list(singles).index(best_single),
                           search_seeds=seeds)
        row = {"budget_nfe": B, "budget_ms": budget, "best_single": best_single,
               "entries": []}
        for nm, s, sc in zip(names, scheds, h["scores"]):
            ms = float(np.sum(_calls(s) * np.asarray(lat)[s.model_ids]))
            entry = {"name": nm, "ms": ms, "nfe_equiv": ms / unit, "fid": sc["fid"],
                     "fid_ci": sc["fid_ci"], "diff": sc["diff"], "diff_ci": sc["diff_ci"],
                     "n_steps": s.n_steps, "models": [ZOO[i] for i in s.model_ids],
                     "sigmas": [float(x) for x in s.sigmas],
                     "how": "joint evolution + predictor" if nm == "model schedule"
                     else singles[nm]["how"],
                     "search_fid": jwin["fid"] if nm == "model schedule"
                     else singles[nm]["search_fid"]}
            assert ms <= budget * (1 + 1e-9), (nm, ms, budget)
            row["entries"].append(entry)
            log(f"  {nm:16s} {ms:.4f} ms  held-out FID {sc['fid']:.4f} {sc['fid_ci']}"
                f"  diff {sc['diff']} {sc['diff_ci']}")
        frontier.append(row)
        runs[B] = {"joint": jrows, "joint_searcher": jsearch}
    res["frontier"] = frontier

    # 4. Predictor value.
    B = a.predictor_budget
    if B in runs:
        with_rows = runs[B]["joint"]
        jsearch = runs[B]["joint_searcher"]
        budget = B * unit
        n_joint = int(round(B)) + a.extra_steps
        jspace, jseeds = joint_space(n_joint, lat, budget, big)
        t0 = time.perf_counter()
        plain = evolution(jspace, jseeds, pop=a.population, gens=a.generations, seed=a.seed,
                          predictor=None, pred_steps=a.pred_steps)
        plain_rows = run_search(plain, ev, seeds)
        log(f"predictor off: {len(plain_rows)} candidates in {time.perf_counter() - t0:.0f} s")
        cw, cp = best_so_far(with_rows), best_so_far(plain_rows)
        target = float(cp[-1])
        reach = int(np.argmax(cw <= target)) + 1 if (cw <= target).any() else None
        # Offline tau: train on the first half of the plain run, test on the second half.
        half = len(plain_rows) // 2
        tr, te = plain_rows[:half], plain_rows[half:]
        pred = SchedulePredictor(len(ZOO), seed=a.seed,
                                 config=PredictorConfig(steps=a.pred_steps)).fit(
            [r["schedule"] for r in tr], [r["fid"] for r in tr])
        tau_off = kendall_tau(pred.score([r["schedule"] for r in te]), [r["fid"] for r in te])
        online = jsearch.predictor_log
        res["predictor"] = {
            "budget_nfe": B, "calls": len(plain_rows),
            "final_best_without": target, "final_best_with": float(cw[-1]),
            "calls_with_to_reach_final_best_without": reach,
            "calls_saved": None if reach is None else len(plain_rows) - reach,
            "tau_offline": tau_off, "tau_offline_train": half, "tau_offline_test": len(te),
            "tau_online": online,
            "tau_online_mean": float(np.mean([e["tau"] for e in online
                                              if e["tau"] is not None] or [np.nan])),
            "curve_with": cw.tolist(), "curve_without": cp.tolist(),
        }
        log("predictor:", {k: v for k, v in res["predictor"].items()
                           if not k.startswith("curve")})
    res["wall_s"] = time.perf_counter() - t_start
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_schedules.json").write_text(json.dumps(res, indent=1, default=_plain))
    _plot(res, out / "model_schedules.png")
    log(f"done in {res['wall_s']:.0f} s")


class _ModelIds:
    """A timestep searcher whose schedules all run on one member (single-model search)."""

    def __init__(self, inner: EvolutionSearcher, member: int) -> None:
        self.inner, self.member = inner, member

    def __getattr__(self, name: str) -> Any:  # metric, mode, algorithm, best, ...
        return getattr(self.inner, name)

    def ask(self, key: str):
        s = self.inner.ask(key)
        if s is None or s == FINISHED:
            return s
        return Schedule(s.sigmas, np.full(s.n_steps, self.member), s.solver, s.meta)

    def tell(self, key, value=None, *, error=False):
        self.inner.tell(key, value, error=error)


def _calls(s: Schedule) -> np.ndarray:
    from searchd.schedules.cost import calls_per_step

    return calls_per_step(s.solver, s.n_steps, s.final_zero)


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Schedule):
        return x.to_dict()
    return str(x)


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if "predictor" in res else 1, figsize=(11, 4.2),
                             squeeze=False)
    ax = axes[0, 0]
    names = sorted({e["name"] for r in res["frontier"] for e in r["entries"]},
                   key=lambda n: (n != "model schedule", n))
    for k, name in enumerate(names):
        pts = [(e["ms"], e["fid"], e["fid_ci"]) for r in res["frontier"]
               for e in r["entries"] if e["name"] == name and e["fid"] is not None]
        if not pts:
            continue
        pts.sort()
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        err = np.array([[p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts]])
        ax.errorbar(x, y, yerr=err, marker="os^v"[k % 4], capsize=3, label=name)
    for r in res["frontier"]:
        ax.axvline(r["budget_ms"], color="0.85", lw=0.8, zorder=0)
    ax.set_yscale("log")
    ax.set_xlabel("latency, ms per sample (measured)")
    ax.set_ylabel("held-out FID (digits features), 95% CI")
    ax.set_title("quality / latency on the gmm-digits zoo")
    ax.legend(fontsize=8)
    if "predictor" in res:
        ax = axes[0, 1]
        pr = res["predictor"]
        ax.plot(np.arange(1, len(pr["curve_with"]) + 1), pr["curve_with"], label="predictor on")
        ax.plot(np.arange(1, len(pr["curve_without"]) + 1), pr["curve_without"],
                label="predictor off")
        ax.set_xlabel("actor calls (candidates scored)")
        ax.set_ylabel("best search FID so far")
        ax.set_yscale("log")
        ax.set_title(f"joint search at {pr['budget_nfe']:g} NFE-equivalents")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
