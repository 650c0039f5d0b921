"""CPU seconds of the evaluators' work, side by side: the same candidates scored by two
checkouts, in alternating fresh processes, one torch thread each.

    python benchmarks/evaluator_cpu.py RUN_DIR --before CHECKOUT [--generations 3 5]
        [--repeats 2] [--out FILE.md]

``RUN_DIR`` is a finished run of the quickstart (its ``config.yaml``, ``reference.npz`` and
Parquet rows); each process scores the chunks the run's actors got in ``--generations``
(``Evaluator.evaluate`` per chunk, as an actor does, after one warm-up call) and reports its
process CPU seconds (user and system) and wall seconds, and how many values differ from
the stored ones. On a
machine shared with other jobs the wall says little; the CPU seconds of the same work are
the comparison (cache contention from other jobs still adds noise: the sides alternate).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def score(run_dir: Path, generations: list[int]) -> dict[str, float]:
    """In this process: the chunks of ``generations``; CPU and wall seconds, values differing."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import end_to_end as e

    from searchd.schedule import Schedule

    e._init_plain(str(run_dir))
    torch.set_num_threads(1)
    rows = [r for r in e.read_rows(run_dir) if r["status"] == "ok"]
    by_gen = e.chunks_of(rows)
    first = int(rows[0]["seed_base"])
    seeds = list(range(first, first + int(rows[0]["n_samples"])))
    chunks = [c for g in generations for c in by_gen[g].values()]

    def sched(r: dict) -> Schedule:
        s = r["schedule"]
        return Schedule.from_dict(json.loads(s) if isinstance(s, str) else s)

    e._EV.evaluate([sched(chunks[0][0])], seeds)  # warm-up: noise cache, first calls
    t0, wall0 = os.times(), time.perf_counter()
    differing = 0
    for c in chunks:
        res = e._EV.evaluate([sched(r) for r in c], seeds)
        differing += sum(x.value(str(c[0]["metric"])) != r["value"] for x, r in zip(res, c))
    t1 = os.times()
    user, system = t1.user - t0.user, t1.system - t0.system
    return {"cpu_s": user + system, "user_s": user, "sys_s": system,
            "wall_s": time.perf_counter() - wall0,
            "candidates": sum(len(c) for c in chunks), "differing": differing}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--generations", type=int, nargs="+", default=[3])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(score(args.run_dir, args.generations)))
        return
    sides = [("before", args.before.resolve()), ("after", ROOT)]
    out: dict[str, list[dict[str, float]]] = {n: [] for n, _ in sides}
    for i in range(args.repeats):
        for name, checkout in sides:
            env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, str(Path(__file__).resolve()), str(args.run_dir.resolve()),
                   "--before", str(checkout), "--child", "--generations",
                   *map(str, args.generations)]
            r = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True,
                                          check=True).stdout.splitlines()[-1])
            out[name].append(r)
            print(f"{name} #{i + 1}: {r['candidates']} candidates, {r['cpu_s']:.2f} CPU s "
                  f"(user {r['user_s']:.2f}, system {r['sys_s']:.2f}), "
                  f"{r['wall_s']:.2f} wall s, {r['differing']} values differing "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    n = out["before"][0]["candidates"]
    parts = []
    for key in ("cpu_s", "user_s"):
        best = {name: min(r[key] for r in v) for name, v in out.items()}
        parts.append(f"{key[:-2]} seconds per candidate (best of {args.repeats}): before "
                     f"{best['before'] / n:.3f}, after {best['after'] / n:.3f}, after / "
                     f"before {best['after'] / best['before']:.2f}")
    line = "; ".join(parts)
    print(line)
    if args.out:
        args.out.write_text(json.dumps({"runs": out, "summary": line}, indent=1) + "\n")


if __name__ == "__main__":
    main()
