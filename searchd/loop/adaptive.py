"""``search.algorithm: adaptive`` in a run: the global schedule, the predictor's training
job's parameters, its files in the run directory, and its section of ``best.json``.

The run goes like a GITS/LD3 run, with one step more:

1. The global schedule: the anchor named by ``search.adaptive.global_schedule`` (``ld3``,
   ``gits``; computed at run start like any anchor, stored in ``anchors.json``) or the
   schedule of an earlier run's ``best.json`` (``global_from_best``).
2. The search: ``AdaptiveSearcher`` proposes the global schedule, then the baselines; each
   is scored on the search seeds like any candidate (Tune, Parquet).
3. ``compute_predictor`` (``searchd.adaptive.product``, on one evaluator): the oracle
   schedules of the training noises (the first ``train`` search seeds), the predictor fitted
   on them; the cost counted like an anchor's. The run writes ``predictor/predictor.pt``
   (weights), ``predictor.ts`` (TorchScript: a user loads it beside their sampler without
   searchd) and ``predictor.json``; a resumed run reads them back instead of training again.
4. At the end, ``predictor_final`` scores the predictor and its global schedule on the
   held-out seeds, the same noise for both (paired), on the evaluator that re-scores the
   winner and the baselines. ``best.json`` gets an ``adaptive`` section: the files, the
   global schedule, both FIDs with their intervals and the paired difference.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from searchd.config import AdaptiveConfig, ConfigError, SearchConfig
from searchd.schedule import Schedule
from searchd.schedules.spaces import Space
from searchd.storage import RunDir

PREDICTOR_DIR = "predictor"
FILES = ("predictor.pt", "predictor.ts", "predictor.json")


def check_global_best(cfg: SearchConfig) -> None:
    """Before Ray starts: an earlier run's best.json as the global schedule has this run's
    solver, steps and ending (the noise range is checked against the model once it is
    loaded). ``ConfigError`` (one line) otherwise."""
    a = cfg.search.adaptive
    if cfg.search.algorithm != "adaptive" or a.global_anchor is not None:
        return
    key, path = "search.adaptive.global_schedule", a.global_schedule
    try:
        best = json.loads(Path(path).read_text())
        sigmas = [float(x) for x in best["sigmas"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError([f"{key}: got {path!r}; not a best.json with sigmas "
                           f"({type(e).__name__})"]) from None
    solver = best.get("solver", cfg.solver.name)
    if solver != cfg.solver.name:
        raise ConfigError([f"{key}: got {path!r}; its schedule is for solver {solver!r}; this "
                           f"run's solver.name is {cfg.solver.name!r}"])
    if best.get("model_ids") is not None:
        raise ConfigError([f"{key}: got {path!r}; it is a model schedule; allowed: a timestep "
                           "schedule"])
    if best.get("guidance") is not None:
        raise ConfigError([f"{key}: got {path!r}; it has guidance weights per step, which the "
                           "adaptive predictor does not carry; allowed: a timestep schedule"])
    want = cfg.n_steps + 1
    if len(sigmas) != want or (sigmas[-1] == 0.0) != cfg.space.final_zero:
        raise ConfigError([f"{key}: got {path!r}; {len(sigmas)} levels ending in "
                           f"{sigmas[-1]:g}; this run needs {want} levels (steps = "
                           f"{cfg.n_steps}, final_zero = {cfg.space.final_zero})"])


def global_from_best(path: str | Path, space: Space) -> Schedule:
    """The schedule of an earlier run's ``best.json``, checked against this run's space
    (the same number of steps, ending and solver)."""
    try:
        best = json.loads(Path(path).read_text())
        sigmas = np.asarray(best["sigmas"], dtype=np.float64)
        solver = str(best.get("solver") or space.solver)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"search.adaptive.global_schedule: {path}: not a best.json with "
                         f"sigmas ({type(e).__name__}: {e})") from None
    if solver != space.solver:
        raise ValueError(f"search.adaptive.global_schedule: {path} was searched for solver "
                         f"{solver!r}; this run's solver is {space.solver!r}")
    if best.get("model_ids") is not None:
        raise ValueError(f"search.adaptive.global_schedule: {path} is a model schedule; "
                         "allowed: a timestep schedule of one model")
    schedule = Schedule(sigmas, solver=solver, meta={"origin": "best.json", "path": str(path)})
    try:
        return space.check(schedule)
    except ValueError as e:
        raise ValueError(f"search.adaptive.global_schedule: {path}: {e}") from None


def global_schedule(adaptive: AdaptiveConfig, space: Space,
                    anchors: Mapping[str, Schedule] | None) -> Schedule:
    """The global schedule the run's predictor offsets (an anchor or a best.json)."""
    source = adaptive.global_schedule
    anchor = adaptive.global_anchor
    if anchor is None:
        return global_from_best(source, space)
    if not anchors or anchor not in anchors:
        raise ValueError(f"the {anchor} schedule must be computed before the adaptive "
                         "searcher is built (searchd.methods.compute_anchor)")
    return anchors[anchor]


def train_seeds(cfg: SearchConfig) -> list[int]:
    """Training noises: the first ``search.adaptive.train`` search seeds (held-out seeds stay
    unseen)."""
    base = cfg.samples.seed_base
    return list(range(base, base + cfg.search.adaptive.train))


def write_predictor(run: RunDir, blob: Mapping[str, Any], meta: Mapping[str, Any]
                    ) -> dict[str, Any]:
    """Write ``predictor/predictor.{pt,ts,json}`` into the run (atomically, also to S3);
    returns the description (``predictor.json``)."""
    from searchd.adaptive.product import predictor_from_blob, save_predictor

    model = predictor_from_blob(blob)
    with tempfile.TemporaryDirectory(prefix="searchd-predictor-") as tmp:
        info = save_predictor(model, tmp, meta)
        # The description last: a run whose predictor.json exists has the other two.
        for name in FILES:
            run.write_bytes(f"{PREDICTOR_DIR}/{name}", (Path(tmp) / name).read_bytes())
    return info


def read_predictor(run: RunDir) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(blob, description)`` of the predictor stored in the run, or None if there is none."""
    import io

    import torch

    if not run.exists(f"{PREDICTOR_DIR}/predictor.json"):
        return None
    info = json.loads(run.read_text(f"{PREDICTOR_DIR}/predictor.json"))
    blob = torch.load(io.BytesIO(run.read_bytes(f"{PREDICTOR_DIR}/predictor.pt")),
                      weights_only=False)
    return blob, info


def adaptive_section(info: Mapping[str, Any], training: Mapping[str, Any],
                     held: Mapping[str, Any] | None, global_schedule: Schedule,
                     source: str, error: str | None = None) -> dict[str, Any]:
    """``best.json``'s ``adaptive`` section."""
    out: dict[str, Any] = {
        "kind": info.get("kind"),
        "weights": f"{PREDICTOR_DIR}/predictor.pt",
        "torchscript": f"{PREDICTOR_DIR}/predictor.ts",
        "description": f"{PREDICTOR_DIR}/predictor.json",
        "usage": info.get("usage"),
        "global_schedule": {"source": source,
                            "sigmas": [float(x) for x in global_schedule.sigmas]},
        "training": {k: training.get(k) for k in
                     ("n_train", "first_seed", "denoiser_calls", "wall_s", "oracle_loss",
                      "global_loss")},
        "status": "ok" if error is None else "failed",
    }
    if error is not None:
        out["error"] = error
    if held is not None:
        g, p = held["scores"][0], held["scores"][1]
        out["heldout"] = {
            "n_samples": held["n_samples"], "seed_base": held["seed_base"],
            "level": held["level"], "resamples": held["resamples"],
            "global": {"fid": g["fid"], "fid_ci": g["fid_ci"]},
            "predictor": {"fid": p["fid"], "fid_ci": p["fid_ci"], "status": p["status"]},
            "diff": p["diff"], "diff_ci": p["diff_ci"],
            "gain": (None if not g["fid"] or p["fid"] is None
                     else float((g["fid"] - p["fid"]) / g["fid"])),
        }
    return out
