"""Where the time of a whole search goes: the phase table, before and after, side by side.

    python benchmarks/end_to_end.py [--config configs/quickstart.yaml] [--set KEY=VALUE ...]
        [--before CHECKOUT] [--side NAME=CHECKOUT ...] [--repeats 1] [--plain]
        [--out FILE.md]
    python benchmarks/end_to_end.py --runs RUN_DIR ...      # the table of finished runs

Each side is the real command, ``python -m searchd.search --config CONFIG --run-dir DIR``,
run as a subprocess from a checkout (this one; ``--before``: another one, e.g. a worktree of
an older commit, with its own ``PYTHONPATH``); the sides alternate, ``--repeats`` times.
The phases come from the run's own record, so any config works:

- the timestamps of the run's ``log.txt`` lines (start, Ray and the actors, the model's
  facts, the exact reference, the search, the held-out phase), with the command's own start
  and exit measured here;
- the Parquet rows (``time``: when a batch was recorded; ``wall_s``: each candidate's share
  of its evaluator call; ``worker``): the first evaluation's start is the first batch's
  record time minus the longest call of that batch, and the search phase's *compute
  fraction* is the time the evaluators spent in denoiser and feature calls over the time
  they had (``sum(wall_s) / (workers x span)``, span from the first evaluation to the
  last result).

Beside the phases: the CPU seconds the command reaped (the driver's, and those of Ray's
processes it waited for; the actors' work is not in it: see ``evaluator_cpu.py``), the
evaluators' seconds per candidate, whether the exact reference came from the cache
(``SEARCHD_CACHE_DIR`` is this script's own scratch directory unless set: a checkout that
caches computes it in its first run and reads it in the later ones), and how many of the
search values equal the first run's, candidate by candidate, bit for bit (changes of speed
must not change them).

``--plain`` adds the plain-loop ratio of the last "after" run: the same candidates, in the
same chunks the actors got (the rows of each generation and worker, in order), scored by
``Evaluator.evaluate`` in as many plain processes as the run had actors (one torch thread
each, as the actors), one generation at a time, with no Ray, Tune, Parquet or searcher;
every value is checked equal to the stored one (the same work). The ratio is the search's
candidates/s over the plain loop's, measured right after the run. Target >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# log.txt markers: (event, pattern). Older checkouts name some steps differently; an event
# that a version does not log is left out of its table.
MARKERS = [
    ("run", r"searchd: run \S+ ->"),
    ("ray", r"starting (a local Ray|the Ray cluster)"),
    ("ray_ready", r"Ray ready in"),
    ("facts", r"^model: \{|evaluator\(s\) ready on"),
    ("ref_start", r"reference statistics from \d+ exact samples"),
    ("ref_done", r"reference statistics ready in"),
    ("actors_start", r"searchd: starting evaluator actors"),
    ("actors_ready", r"evaluator actor\(s\) ready on"),
    ("search_start", r"search starts:"),
    ("trial", r"first Tune trial started"),
    ("gen", r"\[gen \d+"),
    ("heldout_start", r"re-scoring the winner"),
    ("heldout_jobs", r"held-out phase: \d+ schedules"),
    ("heldout_done", r"held-out \S+ on \d+ samples"),
]
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+): (.*)$")


def log_events(run_dir: Path) -> dict[str, list[float]]:
    """Each marker's timestamps (seconds since the epoch) in the run's log.txt."""
    out: dict[str, list[float]] = defaultdict(list)
    for line in (run_dir / "log.txt").read_text().splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for name, pat in MARKERS:
            if re.search(pat, m.group(4)):
                out[name].append(t)
    return out


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The run's evaluation rows (pyarrow directly: any schema version), in write order."""
    import pyarrow.parquet as pq

    parts = sorted((run_dir / "evaluations").glob("*.parquet"))
    rows: list[dict[str, Any]] = []
    for p in parts:
        rows.extend(pq.read_table(p).to_pylist())
    return rows


def chunks_of(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """generation -> worker -> that worker's rows of the generation, in order (one evaluator
    call each, as the pool split the batch)."""
    out: dict[int, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[int(r["generation"])][str(r["worker"])].append(r)
    return out


def phases(run_dir: Path, start: float, end: float) -> dict[str, Any]:
    """The phase table of one run: seconds per phase and the search's facts."""
    ev = log_events(run_dir)
    rows = [r for r in read_rows(run_dir) if r["status"] == "ok"]
    first = {k: v[0] for k, v in ev.items()}
    by_gen = chunks_of(rows)
    g0 = min(by_gen)
    rec0 = max(r["time"].timestamp() for w in by_gen[g0].values() for r in w)
    call0 = max(sum(float(r["wall_s"]) for r in w) for w in by_gen[g0].values())
    first_eval = rec0 - call0
    last_result = max(r["time"].timestamp() for r in rows)  # (older versions log no
    # progress lines: the rows' record times serve both)
    workers = sorted({str(r["worker"]) for r in rows})
    busy = sum(float(r["wall_s"]) for r in rows)
    span = last_result - first_eval
    setup_end = max(first.get(k, 0.0) for k in ("facts", "ref_start", "ref_done",
                                                  "actors_ready", "search_start"))
    if "ref_done" not in first and "ref_start" in first:
        # Versions without the line: the reference ends at the next step's line.
        nxt = [t for k in ("actors_start", "search_start", "trial") for t in ev.get(k, [])
               if t > first["ref_start"]]
        first["ref_done"] = min(nxt) if nxt else first["ref_start"]
    p: dict[str, float | None] = {
        "python start, config (command -> first log line)": first["run"] - start,
        "Ray start, model facts (and actors)": first["facts"] - first["run"],
        "  of it: Ray start": (first["ray_ready"] - first["ray"]) if "ray_ready" in first
        else None,
        "exact reference": (first["ref_done"] - first["ref_start"]) if "ref_start" in first
        else None,
        "actors ready (separately)": (first["actors_ready"] - first["actors_start"])
        if "actors_start" in first else None,
        "search": last_result - setup_end,
        "  of it: to the first evaluation (Tune start)": first_eval - setup_end,
        "held-out": first["heldout_done"] - first["heldout_start"],
        "  of it: the evaluators' jobs (sampling, features, bootstrap)":
        (first["heldout_jobs"] - first["heldout_start"]) if "heldout_jobs" in first else None,
        "after the held-out table (best.json, plots, shutdown)": end - first["heldout_done"],
    }
    return {
        "run_dir": str(run_dir),
        "wall_s": end - start,
        "first_eval_s": first_eval - start,
        "phases": p,
        "candidates": len(rows),
        "workers": len(workers),
        "search_cand_s": len(rows) / (last_result - setup_end),
        "steady_cand_s": len(rows) / span,
        "compute_fraction": busy / (len(workers) * span),
        "generations": len(by_gen),
        "heldout": heldout_of(run_dir),
        "evaluator_s_per_candidate": busy / len(rows),
        "reference_cached": "exact samples: cached" in (run_dir / "log.txt").read_text(),
        "values": {str(r["candidate_id"]): r["value"] for r in rows},
    }


def same_values(run: dict[str, Any], first: dict[str, Any]) -> str:
    """How many of ``run``'s candidates the first run also scored, and how many of those
    have the very same value (bit for bit)."""
    shared = [c for c in run["values"] if c in first["values"]]
    equal = sum(run["values"][c] == first["values"][c] for c in shared)
    return f"{equal} / {len(shared)}"


def heldout_of(run_dir: Path) -> list[str]:
    """The held-out table of best.json, one line per schedule."""
    best = json.loads((run_dir / "best.json").read_text())
    out = []
    for s in best["heldout"]["scores"]:
        if s["status"] != "ok":
            out.append(f"{s.get('name', s['candidate_id'])}: failed")
            continue
        lo, hi = s["fid_ci"]
        out.append(f"{s.get('name', s['candidate_id'])} {s['fid']:.4f} [{lo:.4f}, {hi:.4f}]")
    return out


def run_side(checkout: Path, config: str, overrides: Sequence[str], run_dir: Path
             ) -> tuple[float, float]:
    """The command from ``checkout`` (its own code and config); returns (start, end)."""
    cfg = Path(config)
    if not cfg.is_absolute() and (checkout / cfg).exists():
        cfg = checkout / cfg
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    # A cache of exact references of this script's own (unless one is set): the first run
    # of a checkout that caches computes it, the later ones read it.
    env.setdefault("SEARCHD_CACHE_DIR", str(run_dir.parent / "cache"))
    cmd = [sys.executable, "-m", "searchd.search", "--config", str(cfg), "--run-dir",
           str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    end = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    (run_dir.parent / f"{run_dir.name}.cpu.json").write_text(json.dumps(cpu))
    return start, end


# The plain loop ------------------------------------------------------------------------------
_EV: Any = None


def _init_plain(run_dir: str) -> None:
    """A plain process: the run's evaluator (its config and reference.npz), one thread."""
    global _EV
    import torch
    import yaml

    from searchd.evaluation.reference import ReferenceStats
    from searchd.loop.factory import EvaluatorFactory

    torch.set_num_threads(1)
    cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    ref = ReferenceStats.from_bytes((Path(run_dir) / "reference.npz").read_bytes()).to_dict()
    _EV = EvaluatorFactory(cfg, ref)()


def _score_plain(job: tuple[list[dict[str, Any]], list[int], str]
                 ) -> tuple[list[float | None], float]:
    """One chunk, one ``evaluate`` call: its values of ``metric`` and the call's seconds."""
    from searchd.schedule import Schedule

    schedules, seeds, metric = job
    t0 = time.perf_counter()
    results = _EV.evaluate([Schedule.from_dict(s) for s in schedules], seeds)
    return [r.value(metric) for r in results], time.perf_counter() - t0


def _seed_key(row: dict[str, Any]) -> tuple[int, int]:
    """(seed_base, n_samples) of a stored row: the seeds it was scored on."""
    return int(row["seed_base"]), int(row["n_samples"])


def plain_loop(run_dir: Path) -> dict[str, Any]:
    """The run's candidates, chunk by chunk as the actors got them, in plain processes."""
    rows = [r for r in read_rows(run_dir) if r["status"] == "ok"]
    by_gen = chunks_of(rows)
    workers = sorted({w for g in by_gen.values() for w in g})
    ctx = mp.get_context("spawn")
    with ctx.Pool(len(workers), initializer=_init_plain, initargs=(str(run_dir),)) as pool:
        pool.map(time.sleep, [0.2] * len(workers))  # every process initialized
        mismatched = 0
        t0 = time.perf_counter()
        busy = 0.0
        for g in sorted(by_gen):
            # A chunk's rows on their own seeds (a race re-scores on a fresh block).
            chunks = [[r for r in c if _seed_key(r) == k] for c in by_gen[g].values()
                      for k in dict.fromkeys(_seed_key(r) for r in c)]
            jobs = [([json.loads(r["schedule"]) if isinstance(r["schedule"], str)
                      else r["schedule"] for r in c],
                     list(range(_seed_key(c[0])[0], sum(_seed_key(c[0])))),
                     str(c[0]["metric"]))
                    for c in chunks]
            for c, (values, secs) in zip(chunks, pool.map(_score_plain, jobs)):
                busy += secs
                mismatched += sum(v != r["value"] for v, r in zip(values, c))
        wall = time.perf_counter() - t0
    return {"candidates": len(rows), "workers": len(workers), "wall_s": wall,
            "cand_s": len(rows) / wall, "compute_fraction": busy / (len(workers) * wall),
            "values_differing": mismatched}


# Report ------------------------------------------------------------------------------------
def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def table(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """The phase table, one column per run."""
    head = "| phase | " + " | ".join(name for name, _ in runs) + " |"
    lines = [head, "| --- |" + " ---: |" * len(runs)]
    keys = list(runs[0][1]["phases"])
    for k in keys:
        cells = []
        for _, r in runs:
            v = r["phases"].get(k)
            cells.append("-" if v is None else f"{v:.1f} s")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    extra = [
        ("**wall (command to exit)**", lambda r: f"**{r['wall_s']:.1f} s**"),
        ("first evaluation after the command", lambda r: f"{r['first_eval_s']:.1f} s"),
        ("candidates scored / workers", lambda r: f"{r['candidates']} / {r['workers']}"),
        ("search cand/s (whole phase)", lambda r: f"{r['search_cand_s']:.2f}"),
        ("search cand/s (first evaluation to last result)",
         lambda r: f"{r['steady_cand_s']:.2f}"),
        ("compute fraction of the search (denoiser + features)",
         lambda r: f"{r['compute_fraction']:.2f}"),
        ("held-out share of the wall", lambda r: f"{r['phases']['held-out'] / r['wall_s']:.0%}"),
        ("exact reference read from the cache", lambda r: "yes" if r.get("reference_cached")
         else "no"),
        ("evaluator seconds per candidate (its share of the actor's calls)",
         lambda r: f"{r['evaluator_s_per_candidate']:.3f} s"),
        ("CPU seconds the command reaped (the driver and Ray's own processes, not the actors)",
         lambda r: "-" if r.get("cpu_s") is None else f"{r['cpu_s']:.0f} s"),
        (f"search values equal to {runs[0][0]}'s (same candidate, bit for bit)",
         lambda r: same_values(r, runs[0][1])),
    ]
    for label, fn in extra:
        lines.append(f"| {label} | " + " | ".join(fn(r) for _, r in runs) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--before", type=Path, help="a checkout to compare against")
    ap.add_argument("--side", action="append", default=[], metavar="NAME=CHECKOUT",
                    help="more checkouts to compare, run before this one (repeatable)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="the plain-loop ratio")
    ap.add_argument("--runs", type=Path, nargs="*", help="only tabulate finished runs "
                    "(the command's start and exit from <run>.times.json beside a run of this "
                    "script, else the first and last log lines)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cmdline = "python benchmarks/end_to_end.py " + " ".join(sys.argv[1:] if argv is None
                                                            else argv)
    runs: list[tuple[str, dict[str, Any]]] = []
    plain: dict[str, Any] | None = None
    scratch = Path(tempfile.mkdtemp(prefix="searchd-e2e-"))
    if args.runs:
        for rd in args.runs:
            times = rd.parent / f"{rd.name}.times.json"
            if times.exists():  # written by a run of this script
                start, end = json.loads(times.read_text())
            else:
                ev = log_events(rd)
                start, end = ev["run"][0], max(max(v) for v in ev.values())
            runs.append((rd.name, phases(rd, start, end)))
    else:
        sides = [] if args.before is None else [("before", args.before.resolve())]
        for item in args.side:
            name, _, path = item.partition("=")
            sides.append((name, Path(path).resolve()))
        sides.append(("after", ROOT))
        for i in range(args.repeats):
            for name, checkout in sides:
                rd = scratch / f"{name}-{i}"
                print(f"{name} #{i + 1}: {checkout} -> {rd} (load {load_average()})",
                      flush=True)
                start, end = run_side(checkout, args.config, args.overrides, rd)
                (scratch / f"{rd.name}.times.json").write_text(json.dumps([start, end]))
                ph = phases(rd, start, end)
                ph["cpu_s"] = json.loads((scratch / f"{rd.name}.cpu.json").read_text())
                runs.append((f"{name} #{i + 1}", ph))
                print(f"  wall {end - start:.1f} s", flush=True)
                if args.plain and name == "after" and i == args.repeats - 1:
                    plain = plain_loop(rd)
                    plain["search_run"] = f"{name} #{i + 1}"
                    print(f"  plain loop: {plain['cand_s']:.2f} cand/s", flush=True)
    md = [f"Command: `{cmdline}`", "",
          f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, shared with "
          f"other users' jobs; load average at the end {load_average()}.", "",
          table(runs), ""]
    for name, r in runs:
        md.append(f"Held-out ({name}): " + "; ".join(r["heldout"]))
    if plain is not None:
        search = dict(runs)[plain["search_run"]]
        md += ["", "Plain loop (the same chunks, plain processes, no Ray/Tune/Parquet), right "
               f"after {plain['search_run']}: {plain['candidates']} candidates on "
               f"{plain['workers']} processes in {plain['wall_s']:.1f} s = "
               f"{plain['cand_s']:.2f} cand/s (compute fraction "
               f"{plain['compute_fraction']:.2f}); values differing from the stored ones: "
               f"{plain['values_differing']}.",
               "Search / plain: whole search phase "
               f"{search['search_cand_s'] / plain['cand_s']:.2f}, "
               f"first evaluation to last result "
               f"{search['steady_cand_s'] / plain['cand_s']:.2f} (target >= 0.85)."]
    text = "\n".join(md) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
        (args.out.with_suffix(".json")).write_text(json.dumps(
            {"runs": runs, "plain": plain}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
