"""Candidates per second of the Tune-driven search against a plain loop over the same actors.

    python benchmarks/search_overhead.py [--candidates 64] [--batch-sizes 1,32]
        [--samples 2000] [--evaluator auto|real|solver] [--out FILE.md]

Both sides run the same search (searchd's RandomSearcher on the quickstart's continuous
space, in a ``SearchLoop`` with the same batch size) over the same evaluator pool (2 CPU
actors on a 2-core machine, as the quickstart). The plain side runs the loop in-process
(``SearchLoop.run`` with the pool's client as its scorer); the Tune side is ``run_tune``
(one trial per batch, one trial at a time, ``reuse_actors=True``). The ratio is Tune's
candidates/s over the loop's, for each batch size; the goal is >= 0.8.

Per-candidate cost is the quickstart's: gmm-digits-k64, dpmpp_2m, 5 steps, 2,000 samples.
``--evaluator real`` scores with searchd's Evaluator (digits features, FID against exact
reference statistics of 10,000 samples, built as the driver does); ``solver`` with a
stand-in doing the same solver pass and a cheap score (the distance of the sample mean to
the model's exact data mean). ``auto`` takes ``real`` when ``searchd.evaluation`` has an
``Evaluator``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from searchd.distributed import EvaluatorPool, PoolClient
from searchd.distributed.tune import run_tune
from searchd.evaluation import CandidateResult
from searchd.loop import SearchLoop
from searchd.models import load
from searchd.noise import make_noise
from searchd.schedule import Schedule
from searchd.schedules.spaces import ContinuousSpace
from searchd.searchers.random_search import RandomSearcher
from searchd.solvers import nfe, solve

MODEL = "gmm-digits-k64"


# The stand-in evaluator (the solver pass alone) ---------------------------------------------
class SolverPassEvaluator:
    """The quickstart's solver pass, population-batched, scored by ``|mean - data mean|``."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.denoiser = load(MODEL)
        self.target = self.denoiser.data_mean().reshape(-1).double()
        self._noise: tuple[tuple[int, ...], torch.Tensor] | None = None

    def evaluate(self, candidates: list[Schedule], seeds: Any) -> list[CandidateResult]:
        t0 = time.perf_counter()
        key = tuple(int(s) for s in seeds)
        if self._noise is None or self._noise[0] != key:
            self._noise = (key, make_noise(key, self.denoiser.shape))
        noise = self._noise[1]
        b, c = noise.shape[0], len(candidates)
        sig = torch.tensor(np.repeat(np.stack([s.sigmas for s in candidates]), b, axis=0))
        x = solve(self.denoiser, noise.repeat(c, 1, 1, 1), sig, solver=candidates[0].solver)
        dist = (x.reshape(c, b, -1).double().mean(1) - self.target).norm(dim=1).tolist()
        wall = time.perf_counter() - t0
        return [
            CandidateResult(
                s.id, "ok", {"fid": d}, nfe(s.solver, s.n_steps), b, key[0], wall / c, b * c / wall
            )
            for s, d in zip(candidates, dist)
        ]


@dataclass
class QuickstartEvaluator:
    """Evaluator factory of the quickstart's scoring: gmm-digits-k64, digits features, FID
    against exact reference statistics (computed once by the driver and shipped here)."""

    reference: Any

    def __call__(self) -> Any:
        from searchd.evaluation import Evaluator, load_features

        torch.set_num_threads(1)
        return Evaluator(load(MODEL), load_features("digits"), self.reference, metrics=("fid",))


def real_factory(reference_samples: int = 10_000) -> QuickstartEvaluator:
    """The quickstart's evaluator recipe; reference from exact samples at seeds 2,000,000+."""
    from searchd.evaluation import exact_reference, load_features

    seeds = range(2_000_000, 2_000_000 + reference_samples)
    return QuickstartEvaluator(exact_reference(load(MODEL), load_features("digits"), seeds))


def has_real_evaluator() -> bool:
    try:
        from searchd.evaluation import Evaluator  # noqa: F401
    except ImportError:
        return False
    return True


# The two ways of running the same search ---------------------------------------------------
def make_loop(space: ContinuousSpace, seeds: list[int], n: int, batch: int, seed: int
              ) -> SearchLoop:
    return SearchLoop(RandomSearcher(space, "fid", num_samples=n, seed=seed), seeds,
                      batch_size=batch)


class _Timed:
    """The pool's client as the scoring protocol, timing the calls."""

    def __init__(self, client: PoolClient) -> None:
        self.client = client
        self.eval_s = 0.0

    def score(self, schedules: list[Schedule], seeds: list[int]) -> list[CandidateResult]:
        t1 = time.perf_counter()
        out = self.client.score(schedules, seeds)
        self.eval_s += time.perf_counter() - t1
        return out


def plain_loop(
    space: ContinuousSpace, client: PoolClient, seeds: list[int], n: int, batch: int, seed: int
) -> tuple[float, float]:
    """The search without Tune: the loop in-process. (seconds, seconds scoring)"""
    scorer = _Timed(client)
    t0 = time.perf_counter()
    make_loop(space, seeds, n, batch, seed).run(scorer)
    return time.perf_counter() - t0, scorer.eval_s


def tune_search(space: ContinuousSpace, client: PoolClient, seeds: list[int], n: int, batch: int,
                seed: int, concurrency: int) -> tuple[float, float, float]:
    """The search under Tune. (seconds in ``fit()``, of which start-up before the first
    trial, seconds the trials waited for the pool)"""
    loop = make_loop(space, seeds, n, batch, seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = run_tune(loop, client, storage_path=tmp, name="overhead",
                       max_concurrent_trials=concurrency)
    assert out.finished and loop.n_scored == n, out
    return out.wall_s, out.startup_s, out.eval_s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--candidates", type=int, default=64, help="candidates per search")
    p.add_argument("--batch-sizes", default="1,32", help="candidates per trial, comma-separated")
    p.add_argument("--concurrency", type=int, default=1, help="Tune's max_concurrent_trials")
    p.add_argument("--samples", type=int, default=2000, help="samples per candidate")
    p.add_argument("--repeats", type=int, default=1, help="runs per side and batch size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--evaluator", choices=["auto", "real", "solver"], default="auto")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)

    kind = args.evaluator
    if kind == "auto":
        kind = "real" if has_real_evaluator() else "solver"
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    factory = real_factory() if kind == "real" else SolverPassEvaluator
    t0 = time.perf_counter()
    pool = EvaluatorPool(
        factory,
        num_workers=args.workers,
        cpus_per_worker=min(0.9, (args.cpus - 0.1) / args.workers),
    )
    start_s = time.perf_counter() - t0
    client = pool.client()
    space = ContinuousSpace(5, 0.002, 80.0, True, "rho", 7.0, True, gap_ratio=10.0)
    seeds = list(range(args.samples))
    client.score([space.sample(np.random.default_rng(99))], seeds)  # warm-up

    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        runs: dict[str, list[tuple[float, ...]]] = {"loop": [], "tune": []}
        for r in range(args.repeats):
            # Alternate the order, so that drifting machine load hits both sides alike.
            for side in (("loop", "tune") if r % 2 == 0 else ("tune", "loop")):
                seed = 1000 * batch + r
                if side == "loop":
                    runs[side].append(plain_loop(space, client, seeds, args.candidates, batch,
                                                 seed))
                else:
                    runs[side].append(tune_search(space, client, seeds, args.candidates,
                                                  batch, seed, args.concurrency))
        rows.append((batch, runs))
        n = args.candidates
        print(f"batch {batch}: loop {[round(n / x[0], 3) for x in runs['loop']]} cand/s, tune "
              f"{[round(n / x[0], 3) for x in runs['tune']]} cand/s", flush=True)
    stats = pool.stats()
    pool.shutdown()
    ray.shutdown()

    lines = [
        "# Search overhead: Tune-driven search vs a plain loop over the same actors",
        "",
        f"Command: `python benchmarks/search_overhead.py --candidates {args.candidates} "
        f"--batch-sizes {args.batch_sizes} --samples {args.samples} --repeats {args.repeats} "
        f"--evaluator {kind}"
        + (f" --concurrency {args.concurrency}" if args.concurrency != 1 else "")
        + "`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(local Ray with {args.cpus} CPUs), torch {torch.__version__}, ray {ray.__version__}.",
        f"Evaluator: `{kind}` ({MODEL}, dpmpp_2m, 5 steps, {args.samples} samples per "
        f"candidate); {args.workers} CPU actors, started in {start_s:.1f} s.",
        f"Search: RandomSearcher, {args.candidates} candidates, Tune max_concurrent_trials = "
        f"{args.concurrency}.",
        "",
        "| candidates per trial | trials | loop cand/s | Tune cand/s | ratio (Tune/loop) "
        "| busy ratio | Tune start-up s | runs (loop; Tune cand/s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    n = args.candidates
    for batch, runs in rows:
        trials = math.ceil(n / batch)
        loop_s = statistics.median(x[0] for x in runs["loop"])
        fit_s = statistics.median(x[0] for x in runs["tune"])
        startup_s = statistics.median(x[1] for x in runs["tune"])
        # Fraction of the wall time spent waiting for the pool, Tune's over the loop's.
        busy = statistics.median(x[2] / x[0] for x in runs["tune"]) / statistics.median(
            x[1] / x[0] for x in runs["loop"])
        each = (", ".join(f"{n / x[0]:.2f}" for x in runs["loop"]) + "; "
                + ", ".join(f"{n / x[0]:.2f}" for x in runs["tune"]))
        lines.append(f"| {batch} | {trials} | {n / loop_s:.2f} | {n / fit_s:.2f} | "
                     f"{loop_s / fit_s:.3f} | {busy:.3f} | {startup_s:.1f} | {each} |")
    lines += [
        "",
        f"Medians of {args.repeats} run(s) per side, loop and Tune alternating. Tune's time is "
        "the whole `Tuner.fit()`, its start-up included (from `fit()` to the first trial's "
        "start: placement group and the trial's worker process, paid once per search). The "
        "loop runs the same SearchLoop and pool without Tune.",
        "",
        "The *busy ratio* is the fraction of the wall time spent waiting for the pool under "
        "Tune over the same fraction in the loop: the throughput ratio the two would have at "
        "equal evaluation speed. It is insensitive to other load on the machine changing "
        "between runs, which moves the raw cand/s of single runs a lot on a shared 2-core "
        "machine.",
        "",
        f"Actors' batching counters at the end: {stats}",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
