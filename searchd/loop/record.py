"""The one result record and its Parquet row.

A scored candidate is a ``CandidateResult`` (``searchd.evaluation``) next to its
``Schedule``: the evaluator makes the result, an actor stamps ``worker`` and ``node`` on it,
the search loop tells the searcher its value and hands both to the recorder, which writes
one row of ``searchd.storage.EVALUATION_SCHEMA``; a resumed run reads the row back into the
same pair (``from_row``). Nothing else carries a result.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from searchd.evaluation import CandidateResult
from searchd.schedule import Schedule
from searchd.storage.schema import utc_now


def to_row(
    schedule: Schedule,
    result: CandidateResult,
    *,
    run_id: str,
    metric: str,
    generation: int,
    trial_id: str,
    time: datetime | None = None,
) -> dict[str, Any]:
    """The Parquet row of one scored candidate (``EVALUATION_SCHEMA``'s columns).

    ``schedule`` column: the whole ``Schedule.to_dict()`` as JSON, so that every field of a
    schedule (and its provenance) comes back on resume without a schema change.
    """
    if result.candidate_id != schedule.id:
        raise ValueError(f"result of candidate {result.candidate_id} paired with schedule "
                         f"{schedule.id}")
    meta = schedule.meta
    return {
        "run_id": run_id,
        "candidate_id": schedule.id,
        "generation": int(generation),
        "trial_id": str(trial_id),
        "origin": str(meta.get("origin", "unknown")),
        "parent_ids": [str(p) for p in meta.get("parents", []) or []],
        "solver": schedule.solver,
        "n_steps": schedule.n_steps,
        "nfe": int(result.nfe),
        "sigmas": [float(s) for s in schedule.sigmas],
        "model_ids": None if schedule.model_ids is None else schedule.model_ids.tolist(),
        "schedule": json.dumps(schedule.to_dict()),
        "metric": metric,
        "value": result.value(metric),
        "metrics": {k: float(v) for k, v in result.metrics.items()},
        "n_samples": int(result.n_samples),
        "seed_base": int(result.seed_base),
        "fidelity": _fidelity(result, metric),
        "status": result.status,
        "error": result.error,
        "wall_s": float(result.wall_s),
        "worker": result.worker,
        "node": result.node or socket.gethostname(),
        "time": time or utc_now(),
    }


def _fidelity(result: CandidateResult, metric: str) -> int | None:
    """The halving blocks a pooled result holds (``searchd.loop.racing``), else None."""
    blocks = sum(1 for k in result.metrics if k.startswith(f"{metric}@block"))
    return blocks or None


def from_row(row: Mapping[str, Any], *, check_id: bool = True
             ) -> tuple[Schedule, CandidateResult]:
    """A stored row back into the record: its ``Schedule`` (every field, meta included) and
    its ``CandidateResult`` (without feature statistics, which are not stored).

    ``check_id``: refuse a row whose ``candidate_id`` is not its schedule's id (a row written
    by a searchd that hashed schedules differently cannot be resumed; it can be read)."""
    d = json.loads(row["schedule"])
    d.pop("id", None)
    schedule = Schedule.from_dict(d)
    if check_id and schedule.id != row["candidate_id"]:
        raise ValueError(
            f"stored candidate {row['candidate_id']} has the content of {schedule.id}: the run "
            "was written by a searchd that identified schedules differently"
        )
    wall = float(row.get("wall_s") or 0.0)
    n = int(row.get("n_samples") or 0)
    result = CandidateResult(
        candidate_id=str(row["candidate_id"]),
        status=str(row["status"]),
        metrics={str(k): float(v) for k, v in (row.get("metrics") or {}).items()},
        nfe=int(row.get("nfe") or 0),
        n_samples=n,
        seed_base=int(row.get("seed_base") or 0),
        wall_s=wall,
        samples_per_s=n / wall if wall > 0 else 0.0,
        error=row.get("error"),
        worker=str(row.get("worker") or ""),
        node=str(row.get("node") or ""),
    )
    return schedule, result
