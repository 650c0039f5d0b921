"""The driver's side of a large cluster, simulated: candidates/s against 8, 64 and 256 workers.

    python benchmarks/scale.py [--workers 8,64,256] [--latency 1.0] [--batches 6]
        [--processes 8] [--predictor on|off] [--set KEY=VALUE ...] [--suggest 256]
        [--out FILE.md]

A cluster of 256 GPUs cannot be had here; its driver can. Everything on the driver's side
is the real code: the quickstart's evolutionary searcher (with its predictor pre-screen) on
the quickstart's space, ``SearchLoop`` with its ``Recorder`` (a Parquet part and a searcher
state per batch, a real run directory), Ray Tune (``run_tune``: one trial per batch) and the
pool's client (``PoolClient``: split, send, gather). Only the evaluators are stand-ins:
each worker answers a candidate after ``--latency`` seconds (asyncio sleep) with a value
from a fixed function of the schedule, a ``CandidateResult`` like a real actor's.

The workers are slots of ``--processes`` async Ray actors (0.01 CPU each; a slot is a
picklable proxy with the actor handle and its name), so that 256 workers do not need 256
Python processes with torch on a 2-core machine; the client sees 256 workers and sends 256
requests side by side, as it would to 256 actors.

One batch = one generation of ``population_num = workers`` candidates (one per worker), so
the ideal rate is ``workers / latency``. Reported per size: sustained candidates/s over the
batches after the first (Tune's start-up left out), the ideal rate, and the driver's time
per batch: searcher suggest (``loop.ask``), Parquet append, searcher state write, and the
rest (Tune, the trial's sends and gathers, results crossing to the driver).
``--suggest W`` also times the evolution's suggest alone, in-process, per generation (the
predictor's fit, the variation, the rest); ``--set search.predictor.warm_steps=0`` gives the
searcher as it was before its refits were warm-started.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from searchd.config import load_config  # noqa: E402
from searchd.distributed.pool import PoolClient  # noqa: E402
from searchd.distributed.tune import run_tune  # noqa: E402
from searchd.loop import SearchLoop  # noqa: E402
from searchd.loop.plan import make_baselines, make_searcher, make_space  # noqa: E402
from searchd.loop.recorder import Progress, Recorder  # noqa: E402
from searchd.storage import RunDir  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # the embedded gmm-digits model's noise range


@ray.remote(num_cpus=0.01)
class StandinWorkers:
    """Stand-in evaluators: every request is answered after ``latency`` seconds per
    candidate, concurrently (an async actor serves many slots)."""

    def __init__(self, latency: float) -> None:
        self.latency = latency

    async def ready(self, name: str = "") -> dict[str, Any]:
        return {"worker": name, "pid": os.getpid()}

    async def evaluate(self, slot: str, candidates: Sequence[Any], seeds: Sequence[int]
                       ) -> list[Any]:
        from searchd.evaluation import CandidateResult

        await asyncio.sleep(self.latency * len(candidates))
        out = []
        for s in candidates:
            # A fixed landscape: the distance of the schedule's log-levels from EDM's.
            lv = np.log(np.asarray(s.sigmas[:-1], np.float64))
            target = np.linspace(np.log(SIGMA_MAX), np.log(SIGMA_MIN), len(lv))
            value = float(np.mean((lv - target) ** 2))
            out.append(CandidateResult(
                candidate_id=s.id, status="ok", metrics={"fid": value}, nfe=len(lv),
                n_samples=len(seeds), seed_base=int(seeds[0]), wall_s=self.latency,
                samples_per_s=len(seeds) / self.latency, worker=slot, node="standin"))
        return out


class _Method:
    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call

    def remote(self, *args: Any) -> Any:
        return self._call(*args)


class Slot:
    """One simulated worker: what ``PoolClient`` calls on an actor handle (``evaluate`` and
    ``ready``), forwarded to a shared stand-in actor under this slot's name."""

    def __init__(self, handle: Any, name: str) -> None:
        self.handle = handle
        self.name = name

    @property
    def evaluate(self) -> _Method:
        return _Method(lambda c, s: self.handle.evaluate.remote(self.name, c, s))

    @property
    def ready(self) -> _Method:
        return _Method(lambda: self.handle.ready.remote(self.name))


class Timed:
    """Seconds spent in a method of an object (wrapped in place)."""

    def __init__(self, obj: Any, name: str) -> None:
        self.seconds = 0.0
        self.calls = 0
        fn = getattr(obj, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        setattr(obj, name, wrapper)


def simulate(workers: int, latency: float, batches: int, processes: int, scratch: Path,
             samples: int = 2000, predictor: bool = True, sets: Sequence[str] = ()
             ) -> dict[str, Any]:
    """One search of ``batches`` generations of ``workers`` candidates on stand-ins
    (``sets``: more configuration overrides, ``KEY=VALUE``)."""
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"search.evolution.population_num={workers}",
        f"search.evolution.select_num={max(1, workers // 4)}",
        f"search.evolution.mutation_num={workers // 2}",
        f"search.evolution.crossover_num={workers // 4}",
        f"search.evolution.generations={batches}",
        f"samples.per_candidate={samples}",
        f"search.predictor.enabled={str(predictor).lower()}",
        *sets,
    ])
    space = make_space(cfg, SIGMA_MIN, SIGMA_MAX)
    baselines = make_baselines(cfg, space)
    searcher = make_searcher(cfg.search, space, baselines, cfg.metric.name, cfg.mode, {})
    run_dir = scratch / f"run-{workers}-{int(predictor)}"
    run = RunDir(str(run_dir))
    progress = Progress(batches, workers * batches, cfg.metric.name)
    recorder = Recorder(run, f"scale-{workers}", searcher, progress, None)
    seeds = range(samples)
    loop = SearchLoop(searcher, seeds, batch_size=workers, observers=[recorder])
    t_ask = Timed(loop, "ask")
    t_append = Timed(run, "append_evaluations")
    t_state = Timed(run, "save_searcher_state")
    recorded: list[float] = []
    cpu: list[float] = []  # the driver process's CPU seconds at each record
    complete = loop.complete

    def complete_timed(key: str, results: Any) -> Any:
        out = complete(key, results)
        recorded.append(time.perf_counter())
        cpu.append(time.process_time())
        return out

    loop.complete = complete_timed  # type: ignore[method-assign]
    actors = [StandinWorkers.remote(latency) for _ in range(min(processes, workers))]
    ray.get([a.ready.remote() for a in actors])
    slots = [Slot(actors[i % len(actors)], f"standin-{i}") for i in range(workers)]
    client = PoolClient(slots, [s.name for s in slots])
    t0 = time.perf_counter()
    outcome = run_tune(loop, client, storage_path=str(scratch / "tune"), name=f"scale{workers}")
    wall = time.perf_counter() - t0
    for a in actors:
        ray.kill(a)
    if not outcome.finished or len(recorded) != batches:
        raise RuntimeError(f"{workers} workers: the search did not finish ({outcome})")
    sustained = workers * (batches - 1) / (recorded[-1] - recorded[0])
    per_batch = (recorded[-1] - recorded[0]) / (batches - 1)
    n = batches
    out = {
        "workers": workers, "processes": len(actors), "latency_s": latency,
        "batches": batches, "candidates": workers * batches, "wall_s": wall,
        "tune_startup_s": outcome.startup_s,
        "sustained_cand_s": sustained, "ideal_cand_s": workers / latency,
        "per_batch_s": per_batch,
        "ask_s": t_ask.seconds / n, "append_s": t_append.seconds / n,
        "state_s": t_state.seconds / n,
        "state_bytes": max(p.stat().st_size for p in (run_dir / "searcher").glob("*.json")),
    }
    out["rest_s"] = per_batch - latency - out["ask_s"] - out["append_s"] - out["state_s"]
    # Load-robust: CPU seconds per batch of the driver's process (searcher, recorder, Tune's
    # controller, all its threads) and of the trial's process (sends and gathers), over the
    # sustained batches; capacity = candidates per batch / those seconds (one core each).
    out["driver_cpu_s"] = (cpu[-1] - cpu[0]) / (batches - 1)
    out["trial_cpu_s"] = float(np.mean(outcome.score_cpu_s[1:]))
    out["capacity_cand_s"] = workers / max(out["driver_cpu_s"], out["trial_cpu_s"])
    return out


def predictor_fits(sizes: Sequence[int], repeats: int = 2) -> list[dict[str, Any]]:
    """Seconds of one predictor fit (the evolution's suggest cost per generation) on ``n``
    scored candidates of the quickstart's space: every step on all candidates (before) and
    on the rows its pairs draw (after), alternating, median of ``repeats``."""
    import statistics

    from searchd.searchers import predictor as pm

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    space = make_space(cfg, SIGMA_MIN, SIGMA_MAX)
    rng = np.random.default_rng(0)
    warm = [space.sample(rng) for _ in range(8)]  # torch's first optimizer: imports
    pm.SchedulePredictor(1, seed=0, config=pm.PredictorConfig(steps=2)).fit(
        warm, list(range(8)))
    out = []
    for n in sizes:
        scheds = [space.sample(rng) for _ in range(n)]
        values = [float(np.mean(np.log(np.asarray(s.sigmas[:-1])) ** 2)) for s in scheds]
        times: dict[str, list[float]] = {"all rows": [], "drawn rows": []}
        for _ in range(repeats):
            for arm, above in (("all rows", 10**9), ("drawn rows", pm.DRAWN_ROWS_ABOVE)):
                saved, pm.DRAWN_ROWS_ABOVE = pm.DRAWN_ROWS_ABOVE, above
                try:
                    t0 = time.process_time()
                    pm.SchedulePredictor(1, seed=0).fit(scheds, values)
                    times[arm].append(time.process_time() - t0)
                finally:
                    pm.DRAWN_ROWS_ABOVE = saved
        out.append({"n": n, **{k: statistics.median(v) for k, v in times.items()}})
        print(f"predictor fit on {n}: " + ", ".join(
            f"{k} {statistics.median(v):.2f} s CPU" for k, v in times.items()), flush=True)
    return out


def suggest_costs(workers: int, generations: int = 5, sets: Sequence[str] = ()
                  ) -> list[dict[str, float]]:
    """CPU seconds of the evolution's suggest per generation, in-process (no Ray, no Tune):
    the quickstart's searcher at ``population_num = workers`` on the stand-ins' landscape,
    split into the predictor's fit, the pool's variation (mutants, children, random fill)
    and the rest (scoring the pool, bookkeeping)."""
    from searchd.searchers import predictor as pm
    from searchd.searchers.evolution import EvolutionSearcher

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"search.evolution.population_num={workers}",
        f"search.evolution.select_num={max(1, workers // 4)}",
        f"search.evolution.mutation_num={workers // 2}",
        f"search.evolution.crossover_num={workers // 4}",
        f"search.evolution.generations={generations}", *sets])
    space = make_space(cfg, SIGMA_MIN, SIGMA_MAX)
    searcher = make_searcher(cfg.search, space, make_baselines(cfg, space), cfg.metric.name,
                             cfg.mode, {})
    spent = {"fit": 0.0, "vary": 0.0}

    def timed(cls: Any, name: str, key: str) -> Callable[[], None]:
        fn = getattr(cls, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            c0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.process_time() - c0

        setattr(cls, name, wrapper)
        return lambda: setattr(cls, name, fn)

    undo = [timed(pm.SchedulePredictor, "fit", "fit"),
            timed(EvolutionSearcher, "_vary", "vary")]
    out = []
    try:
        for g in range(generations):
            spent.update(fit=0.0, vary=0.0)
            c0 = time.process_time()
            keys = []
            while True:
                key = f"g{g}-{len(keys)}"
                s = searcher.ask(key)
                if s is None or isinstance(s, str):
                    break
                keys.append((key, s))
            total = time.process_time() - c0
            for key, s in keys:
                lv = np.log(np.asarray(s.sigmas[:-1], np.float64))
                target = np.linspace(np.log(SIGMA_MAX), np.log(SIGMA_MIN), len(lv))
                searcher.tell(key, float(np.mean((lv - target) ** 2)))
            out.append({"generation": g, "candidates": len(keys), "suggest_cpu_s": total,
                        "fit_cpu_s": spent["fit"], "vary_cpu_s": spent["vary"],
                        "other_cpu_s": total - spent["fit"] - spent["vary"]})
            print(f"suggest at {workers} workers, generation {g}: {total:.2f} s CPU (fit "
                  f"{spent['fit']:.2f}, variation {spent['vary']:.2f})", flush=True)
    finally:
        for u in undo:
            u()
    return out


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="8,64,256")
    ap.add_argument("--latency", type=float, default=1.0, help="seconds per candidate")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--predictor", choices=["on", "off"], default="on",
                    help="the evolution's predictor pre-screen (the quickstart's: on)")
    ap.add_argument("--profile", type=Path, help="cProfile the driver into this file")
    ap.add_argument("--fits", default="", help="also time one predictor fit on these "
                    "numbers of scored candidates, before/after (e.g. 256,1280,2560)")
    ap.add_argument("--suggest", type=int, default=0, help="also time the evolution's "
                    "suggest in-process (no Ray) at this many workers, per generation")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a configuration override for the searcher, e.g. "
                    "search.predictor.warm_steps=0 (every fit from scratch, as before)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.workers.split(",") if x]
    fits = predictor_fits([int(x) for x in args.fits.split(",") if x]) if args.fits else []
    suggest = suggest_costs(args.suggest, args.batches, args.sets) if args.suggest else []
    scratch = Path(tempfile.mkdtemp(prefix="searchd-scale-"))
    if sizes:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    rows = []
    try:
        for w in sizes:
            prof = None
            if args.profile is not None:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            r = simulate(w, args.latency, args.batches, args.processes, scratch,
                         predictor=args.predictor == "on", sets=args.sets)
            if prof is not None:
                prof.disable()
                prof.dump_stats(f"{args.profile}.{w}")
            rows.append(r)
            print(f"{w} workers: {r['sustained_cand_s']:.1f} cand/s sustained (ideal "
                  f"{r['ideal_cand_s']:.0f}); per batch {r['per_batch_s']:.2f} s: ask "
                  f"{r['ask_s']:.3f}, append {r['append_s']:.3f}, state {r['state_s']:.3f}, "
                  f"rest {r['rest_s']:.3f}; CPU per batch: driver {r['driver_cpu_s']:.2f}, "
                  f"trial {r['trial_cpu_s']:.2f}", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    cmd = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = [f"Command: `{cmd}`", "",
          f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, shared with other "
          f"users' jobs; load average at the end {load_average()}. Stand-in latency "
          f"{args.latency:g} s per candidate, one candidate per worker per batch, "
          f"predictor pre-screen {args.predictor}, "
          f"{args.batches} batches per size (sustained rate over the last "
          f"{args.batches - 1}).", "",
          "| workers | stand-in processes | sustained cand/s | ideal cand/s | per batch s | "
          "suggest s | Parquet append s | state write s | state file KiB | rest s "
          "(Tune, sends, gathers, waiting) | driver CPU s per batch | trial CPU s per batch | "
          "driver capacity cand/s | Tune start-up s |",
          "| ---: " * 14 + "|"]
    for r in rows:
        md.append(f"| {r['workers']} | {r['processes']} | **{r['sustained_cand_s']:.1f}** | "
                  f"{r['ideal_cand_s']:.0f} | {r['per_batch_s']:.2f} | {r['ask_s']:.3f} | "
                  f"{r['append_s']:.3f} | {r['state_s']:.3f} | {r['state_bytes'] / 1024:.0f} | "
                  f"{r['rest_s']:.3f} | {r['driver_cpu_s']:.2f} | {r['trial_cpu_s']:.2f} | "
                  f"**{r['capacity_cand_s']:.0f}** | "
                  f"{r['tune_startup_s'] if math.isfinite(r['tune_startup_s']) else 0:.1f} |")
    if fits:
        md += ["", "The searcher's suggest at a generation boundary is one predictor fit (300 "
               "steps of 256 pairs); CPU seconds of one fit on n scored candidates, each step's "
               "network pass on all n candidates (before) or on the rows its pairs draw (after; "
               "the same loss, and the same bits below 2 x 256 candidates), median of 2, "
               "alternating:", "",
               "| scored candidates | all rows s | drawn rows s | ratio |",
               "| ---: | ---: | ---: | ---: |"]
        md += [f"| {f['n']} | {f['all rows']:.2f} | {f['drawn rows']:.2f} | "
               f"{f['all rows'] / f['drawn rows']:.2f}x |" for f in fits]
    if suggest:
        md += ["", f"The evolution's suggest alone at {args.suggest} workers (in-process, no Ray "
               "or Tune; the stand-ins' landscape), CPU seconds per generation (generation 1's "
               "fit is the first, from scratch, with torch's optimizer imports):", "",
               "| generation | candidates | suggest s | predictor fit s | variation s | other s |",
               "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        md += [f"| {s['generation']} | {s['candidates']} | {s['suggest_cpu_s']:.2f} | "
               f"{s['fit_cpu_s']:.2f} | {s['vary_cpu_s']:.2f} | {s['other_cpu_s']:.2f} |"
               for s in suggest]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
