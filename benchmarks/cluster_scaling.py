"""Candidates per second of a search on a one-node vs a two-node Ray cluster, on loopback.

Each configuration is a real cluster of ``ray start`` nodes on this machine
(``searchd.distributed.loopback``) and a real ``ray job submit`` of the quickstart search at
its own cost per candidate (2,000 samples, 5 evaluations), with one evaluator actor per node.
The rate is measured from the run's own record: candidates stored after the first generation
divided by the time between the first and the last stored generation (the ``time`` column of
the Parquet rows), so start-up (Ray workers, model, reference statistics) and the final held-out
re-scoring are left out.

    python benchmarks/cluster_scaling.py --out benchmarks/results/cluster_scaling.md

A node advertises ``--cpus-per-node`` logical CPUs (default 1), and its actor takes 0.9 of
them. On a machine with fewer free cores than nodes the nodes compete for the same cores, and
the ratio says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from searchd.distributed.loopback import LoopbackCluster

ROOT = Path(__file__).resolve().parents[1]


def overrides(generations: int, population: int, workers: int) -> list[str]:
    """The quickstart at its per-candidate cost; a shorter search, no plots."""
    return [
        f"search.evolution.generations={generations}",
        f"search.evolution.population_num={population}",
        f"search.evolution.select_num={max(1, population // 4)}",
        f"search.evolution.mutation_num={population // 2}",
        f"search.evolution.crossover_num={population // 4}",
        "samples.heldout=1000",
        f"workers.num_workers={workers}",
        "workers.cpus_per_worker=0.9",
        "report.plots=false",
    ]


def search_rate(run_dir: Path) -> dict[str, Any]:
    """Candidates/s between the first and the last stored generation, from the Parquet rows."""
    from searchd.storage import RunDir, table_to_rows

    rows = table_to_rows(RunDir(str(run_dir)).read_evaluations(move_corrupt=False))
    by_gen: dict[int, list[Any]] = {}
    for r in rows:
        by_gen.setdefault(r["generation"], []).append(r)
    gens = sorted(by_gen)
    first = max(r["time"] for r in by_gen[gens[0]])
    last = max(r["time"] for r in by_gen[gens[-1]])
    n = sum(len(by_gen[g]) for g in gens[1:])
    seconds = (last - first).total_seconds()
    return {"candidates": n, "seconds": seconds, "rate": n / seconds,
            "nodes": sorted({r["node"] for r in rows}),
            "workers": sorted({r["worker"] for r in rows})}


def run_once(nodes: int, cpus_per_node: int, args: argparse.Namespace) -> dict[str, Any]:
    with LoopbackCluster(nodes, cpus_per_node) as cluster, \
            tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        run_dir = Path(tmp) / "run"
        sets = [a for o in overrides(args.generations, args.population, nodes)
                for a in ("--set", o)]
        command = [sys.executable, "-m", "searchd.search", "--config",
                   "configs/quickstart.yaml", *sets, "--run-dir", str(run_dir), "--quiet"]
        load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        job = cluster.submit(command, working_dir=ROOT)
        status = cluster.wait_job(job, timeout_s=args.timeout)
        wall = time.monotonic() - t0
        if status != "SUCCEEDED":
            raise RuntimeError(f"{nodes}-node job {status}:\n{cluster.job_logs(job)[-4000:]}")
        out = search_rate(run_dir)
        out.update(nodes_in_cluster=len(cluster.nodes()), job_wall_s=wall,
                   load_before=load_before, load_after=os.getloadavg()[0])
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--population", type=int, default=32)
    p.add_argument("--cpus-per-node", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="runs of each configuration")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per job")
    p.add_argument("--out", type=Path, help="write the results as Markdown here")
    args = p.parse_args(argv)

    results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for rep in range(args.repeats):
        for nodes in (1, 2):  # alternated, so that a change of load hits both
            r = run_once(nodes, args.cpus_per_node, args)
            results[nodes].append(r)
            print(f"repeat {rep + 1}, {nodes} node(s): {r['rate']:.2f} candidates/s "
                  f"({r['candidates']} in {r['seconds']:.1f} s; job {r['job_wall_s']:.0f} s; "
                  f"load {r['load_before']:.1f} -> {r['load_after']:.1f})", flush=True)
    rate = {n: statistics.median(r["rate"] for r in rs) for n, rs in results.items()}
    ratio = rate[2] / rate[1]
    print(f"two nodes / one node: {ratio:.2f}")
    if args.out:
        args.out.write_text(report(results, rate, ratio, args))
    return 0


def report(results: dict[int, list[dict[str, Any]]], rate: dict[int, float], ratio: float,
           args: argparse.Namespace) -> str:
    import ray

    lines = [
        "# Cluster scaling on loopback: one node vs two",
        "",
        "```",
        "python benchmarks/cluster_scaling.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in
            [("generations", args.generations), ("population", args.population),
             ("cpus_per_node", args.cpus_per_node), ("repeats", args.repeats)]),
        "```",
        "",
        f"Machine: {os.cpu_count()} cores ({platform.machine()}), shared with other work; "
        f"Python {platform.python_version()}, ray {ray.__version__}. Each node is a "
        f"`ray start` process with {args.cpus_per_node} logical CPU and one evaluator actor "
        "(0.9 CPU); the search is the quickstart at its cost per candidate (2,000 samples, "
        f"5 evaluations), {args.population} candidates x {args.generations} generations, "
        "submitted with `ray job submit`. Rate: candidates stored after generation 0 over the "
        "time from the end of generation 0 to the end of the last one (Parquet `time`).",
        "",
        "| nodes | run | candidates | seconds | candidates/s | job wall s | load avg before -> "
        "after | workers |",
        "|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for n, rs in results.items():
        for i, r in enumerate(rs, 1):
            lines.append(
                f"| {n} | {i} | {r['candidates']} | {r['seconds']:.1f} | {r['rate']:.2f} | "
                f"{r['job_wall_s']:.0f} | {r['load_before']:.1f} -> {r['load_after']:.1f} | "
                f"{', '.join(r['workers'])} |")
    lines += [
        "",
        f"Median candidates/s: one node {rate[1]:.2f}, two nodes {rate[2]:.2f}; "
        f"**ratio {ratio:.2f}**.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
