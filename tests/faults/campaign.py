"""What the fault tests and benchmarks/reliability.py share: a tiny search, and the
comparison of a run directory with an uninterrupted run of the same seed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from searchd.storage import RunDir, table_to_rows
from searchd.storage.rundir import is_temp_name

# A tiny evolutionary search on the embedded mixture: 3 generations of 6 (18 candidates).
TINY = [
    "--config", "configs/quickstart.yaml",
    "--set", "search.evolution.population_num=6",
    "--set", "search.evolution.select_num=3",
    "--set", "search.evolution.mutation_num=2",
    "--set", "search.evolution.crossover_num=1",
    "--set", "search.evolution.generations=3",
    "--set", "search.predictor.enabled=false",
    "--set", "samples.per_candidate=200",
    "--set", "samples.heldout=200",
    "--set", "metric.reference=exact:500",
    "--set", "report.plots=false",
]
# Warm-started from GITS and LD3 (the anchors), kept small.
ANCHORED = [*TINY,
            "--set", "search.evolution.warm_start=[gits, ld3]",
            "--set", "search.gits.warmup=64", "--set", "search.gits.grid_points=21",
            "--set", "search.ld3.train=16", "--set", "search.ld3.iters=10"]
# Fields of best.json that differ between two runs of the same seed (times, places).
VOLATILE = {"wall_s", "time", "created", "started", "finished", "duration_s", "run_dir",
            "run_id", "samples_per_s", "worker", "node", "host", "log", "files", "command",
            "resume", "python"}


def rows(run: str | Path) -> list[dict[str, Any]]:
    """Every evaluation row of a run (parts that fail their check are an error here)."""
    return table_to_rows(RunDir(str(run)).read_evaluations(move_corrupt=False))


def strip(obj: Any) -> Any:
    """``obj`` without the fields that name times and places."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def row_key(row: dict[str, Any]) -> str:
    """A row's identity: its candidate id, and for a race's re-scoring of a candidate on a
    fresh seed block (``searchd.loop.racing``, trial ``race/<block>/<rank>``) the block."""
    if str(row.get("trial_id") or "").startswith("race/"):
        return f"{row['candidate_id']}@race{row['fidelity']}"
    return str(row["candidate_id"])


def compare(run: str | Path, reference: str | Path) -> dict[str, Any]:
    """Rows lost and duplicated in ``run`` against the uninterrupted ``reference`` (by
    candidate id), rows whose sigmas or metrics differ, and whether the two best.json are
    equal (less times and places)."""
    got, ref = rows(run), rows(reference)
    count = Counter(row_key(r) for r in got)
    ref_ids = {row_key(r) for r in ref}
    by_id = {row_key(r): r for r in got}
    differ = [row_key(r) for r in ref if row_key(r) in by_id and (
        by_id[row_key(r)]["sigmas"] != r["sigmas"]
        or by_id[row_key(r)]["metrics"] != r["metrics"])]
    best_a = json.loads((Path(run) / "best.json").read_text())
    best_b = json.loads((Path(reference) / "best.json").read_text())
    return {
        "rows": len(got), "reference_rows": len(ref),
        "lost": sorted(ref_ids - set(count)), "extra": sorted(set(count) - ref_ids),
        "duplicated": sorted(k for k, v in count.items() if v > 1),
        "differ": differ, "best_equal": strip(best_a) == strip(best_b),
        "temporaries": [str(p) for p in Path(run).rglob("*") if is_temp_name(p.name)],
    }
