"""Shared helpers of the storage tests (rows, child processes, captured warnings); no tests.

Child processes import this module too (``PYTHONPATH`` includes ``tests/``), so that a
child builds exactly the rows the parent expects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from searchd.schedule import Schedule
from searchd.storage.schema import schedule_json

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
T0 = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)
NOBODY = 65534


# A child that appends one big part (argv: run dir, rows, mode). Modes: "plain"; "sigxfsz":
# RLIMIT_FSIZE 1 MiB and SIGXFSZ's default action (killed mid-write); "efbig": the same
# limit with SIGXFSZ ignored (the write fails with EFBIG). Exit 3 on StorageError.
CHILD_APPEND = """
import sys, resource, signal
from test_storage_support import big_table
from searchd.storage import RunDir, StorageError
run = RunDir(sys.argv[1])
rows = big_table(int(sys.argv[2]), 1000)
mode = sys.argv[3]
if mode != "plain":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL if mode == "sigxfsz" else signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
print("ready", flush=True)
try:
    print(run.append_evaluations(rows), flush=True)
except StorageError as e:
    print("StorageError:", e, flush=True)
    sys.exit(3)
"""


def make_row(i: int, *, generation: int = 0, status: str = "ok", **over: Any) -> dict[str, Any]:
    """A realistic evaluation row: candidate ``i`` is a real Schedule, its id the content hash."""
    rng = random.Random(i)
    n = 3 + i % 5
    sig = sorted((rng.uniform(0.002, 80.0) for _ in range(n)), reverse=True) + [0.0]
    model_ids = [rng.randrange(3) for _ in range(n)] if i % 2 else None
    sched = Schedule(sig, model_ids=model_ids, solver=("euler", "heun", "dpmpp_2m")[i % 3])
    fid = rng.uniform(1.0, 50.0)
    row = {
        "run_id": "run-test",
        "candidate_id": sched.id,
        "generation": generation,
        "trial_id": f"trial_{i:05d}/0",
        "origin": ("random", "mutation", "crossover", "baseline")[i % 4],
        "parent_ids": [f"{j:016x}" for j in range(i % 3)],
        "solver": sched.solver,
        "n_steps": sched.n_steps,
        "nfe": sched.n_steps * (2 if sched.solver == "heun" else 1),
        "sigmas": [float(s) for s in sched.sigmas],
        "model_ids": None if model_ids is None else list(model_ids),
        "metric": "fid",
        "value": fid if status == "ok" else None,
        "metrics": {"fid": fid, "kid": rng.random()} if status == "ok" else {},
        "n_samples": 256,
        "seed_base": 1000 + i,
        "fidelity": None if i % 4 else 1,
        "status": status,
        "error": None if status == "ok" else "RuntimeError: out of memory",
        "wall_s": rng.uniform(0.1, 5.0),
        "worker": f"evaluator-{i % 2}",
        "node": "node-a",
        "time": T0 + timedelta(seconds=i, microseconds=i),
    }
    row["schedule"] = schedule_json(row)  # the candidate with its provenance, as JSON
    row.update(over)
    return row


def make_rows(start: int, n: int, **kw: Any) -> list[dict[str, Any]]:
    return [make_row(i, **kw) for i in range(start, start + n)]


def big_table(n: int, n_sigmas: int) -> pa.Table:
    """An evaluations table whose sigma arrays are long and random: ``8 * n * n_sigmas``
    nearly incompressible bytes (built with numpy: fast enough for a test's child process)."""
    from searchd.storage import EVALUATION_SCHEMA, rows_to_table

    template = rows_to_table([make_row(i, model_ids=None) for i in range(8)])
    table = template.take(pa.array(np.arange(n) % 8))
    values = np.random.default_rng(7).uniform(0.002, 80.0, size=(n, n_sigmas))
    values[:, -1] = 0.0
    values[:, :-1] = -np.sort(-values[:, :-1], axis=1)
    offsets = pa.array(np.arange(0, n * n_sigmas + 1, n_sigmas, dtype=np.int32))
    sigmas = pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)))
    steps = pa.array(np.full(n, n_sigmas - 1, dtype=np.int32))
    for name, col in (("sigmas", sigmas), ("n_steps", steps), ("nfe", steps)):
        i = EVALUATION_SCHEMA.get_field_index(name)
        table = table.set_column(i, EVALUATION_SCHEMA.field(i), col)
    return table


@contextlib.contextmanager
def storage_warnings() -> Iterator[list[logging.LogRecord]]:
    """Collect the warnings ``searchd.storage`` logs (independent of how logging is set up)."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("searchd.storage")
    handler = _Keep(level=logging.WARNING)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_child(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code args...`` with this repository importable."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_child(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def temp_files(folder: Path) -> list[str]:
    """Temporaries of atomic writes under ``folder`` (recursively)."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp-" in p.name
    )
