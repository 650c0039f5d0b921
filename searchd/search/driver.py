"""The search driver behind ``python -m searchd.search``.

configuration (validated before Ray starts) -> run directory and lock -> model description
and reference statistics -> evaluator actor pool -> Ray Tune over a searcher -> every
evaluation appended to Parquet before the searcher learns of it -> held-out re-scoring of
the winner and the baselines -> ``best.json`` and plots.

The run directory is the source of truth: Tune's own experiment state is scratch, and a
resumed search builds a new Tuner whose searcher is restored from the run directory.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from searchd.config import ConfigError, SearchConfig, load_config, validate_config
from searchd.schedule import Schedule

logger = logging.getLogger("searchd")

# Keys of a run's configuration that a resume may change (with --force): they change how
# fast the search runs or how long it goes on, not what it computes.
FORCEABLE_KEYS = (
    "workers.",
    "search.evolution.generations",
    "search.budget",
    "report.",
    "run_dir",
)


# Command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m searchd.search",
        description="Search the best sampling schedule of a diffusion model (Ray Tune + actors).",
    )
    p.add_argument("--config", help="YAML configuration (e.g. configs/quickstart.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one configuration key, e.g. --set search.algorithm=random (repeatable)",
    )
    p.add_argument("--run-dir", help="where the run is written (default: a new dir under runs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the search stored in RUN_DIR")
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: accept changed keys that are safe to change (workers, "
        "generations), and take over a run lock left by another host (a lost head node)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--quiet", action="store_true", help="no live progress display")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, resume = resolve_config(args)
        preflight(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"searchd.search: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from searchd.search.session import SearchSession

    session = SearchSession(cfg, resume=resume, address=args.address, quiet=args.quiet,
                            force=args.force)
    return session.run()


def resolve_config(args: argparse.Namespace) -> tuple[SearchConfig, bool]:
    """The configuration to run, and whether it resumes a stored run."""
    overrides = list(args.overrides)
    if args.resume:
        from searchd.storage import RunDir

        run = RunDir(args.resume)
        if not run.exists("config.yaml"):
            raise FileNotFoundError(f"{args.resume} has no config.yaml; it is not a searchd run")
        import yaml

        stored = yaml.safe_load(run.read_text("config.yaml"))
        stored["run_dir"] = args.resume
        if args.config or overrides:
            new_raw = load_config(args.config, overrides).resolve() if args.config else None
            if new_raw is None:
                from searchd.config import apply_overrides

                new_raw = validate_config(apply_overrides(dict(stored), overrides)).resolve()
            new_raw["run_dir"] = args.resume
            diff = config_diff(stored, new_raw)
            if diff:
                unsafe = [k for k in diff if not k.startswith(FORCEABLE_KEYS)]
                if not args.force or unsafe:
                    what = unsafe if args.force else diff
                    hint = "" if args.force else "; pass --force to accept safe changes"
                    raise ValueError(
                        f"the configuration differs from the run's in {', '.join(what)}"
                        + (" (these cannot be forced)" if args.force else hint)
                    )
            stored = new_raw
        return validate_config(stored), True
    if not args.config:
        raise ValueError("give --config FILE (for example configs/quickstart.yaml) or --resume")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    return load_config(args.config, overrides), False


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain-data configurations."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def preflight(cfg: SearchConfig) -> None:
    """Cheap checks of names and files, so that bad input fails before Ray starts."""
    from searchd import faults
    from searchd.evaluation.features import FEATURES
    from searchd.models import known_models

    faults.configured()  # a SEARCHD_FAULT that names no fault point is refused here
    if cfg.model.name is not None and cfg.model.spec is None:
        if cfg.model.name not in known_models():
            raise ValueError(
                f"model.name = {cfg.model.name!r} is not a known model; known: {known_models()} "
                "(or a checkpoint: 'diffusers:DIR', 'edm:FILE.pkl', 'generic:module:function')"
            )
    for i, member in enumerate(cfg.model.zoo or []):
        if member not in known_models():
            raise ValueError(
                f"model.zoo.{i} = {member!r} is not a known model; known: {known_models()}"
            )
    if cfg.space.kind in ("models", "joint"):
        from searchd.models.compose import calls_per_step

        calls_per_step(cfg.solver.name, cfg.n_steps, cfg.space.final_zero)
    if cfg.model.spec is not None:
        from searchd.models.adapters import check_spec

        spec = cfg.model.spec
        check_spec(spec.kind, spec.path, spec.options)
    if cfg.metric.features not in FEATURES:
        raise ValueError(
            f"metric.features = {cfg.metric.features!r}; known feature networks: {sorted(FEATURES)}"
        )
    ref = cfg.metric.reference
    if ref is not None and cfg.metric.exact_reference is None and "://" not in ref:
        if not os.path.exists(ref):
            raise FileNotFoundError(f"metric.reference = {ref!r} does not exist")


# Rows ----------------------------------------------------------------------------------------
def evaluation_row(
    run_id: str,
    schedule: Schedule,
    result: Any,
    *,
    metric: str,
    trial_id: str,
    generation: int,
) -> dict[str, Any]:
    """One Parquet row (DESIGN.md schema) for a scored candidate."""
    r = result.result if hasattr(result, "result") else result
    meta = schedule.meta
    value = r.metrics.get(metric) if r.status == "ok" else None
    if value is not None and not math.isfinite(value):
        value = None
    return {
        "run_id": run_id,
        "candidate_id": schedule.id,
        "generation": int(generation),
        "trial_id": str(trial_id),
        "origin": str(meta.get("origin", "unknown")),
        "parent_ids": [str(p) for p in meta.get("parents", []) or []],
        "solver": schedule.solver,
        "n_steps": schedule.n_steps,
        "nfe": int(r.nfe),
        "sigmas": [float(s) for s in schedule.sigmas],
        "model_ids": None if schedule.model_ids is None else schedule.model_ids.tolist(),
        "metric": metric,
        "value": value,
        "metrics": {k: float(v) for k, v in r.metrics.items()},
        "n_samples": int(r.n_samples),
        "seed_base": int(r.seed_base),
        "fidelity": None,
        "status": r.status,
        "error": r.error,
        "wall_s": float(r.wall_s),
        "worker": str(getattr(result, "worker", "") or ""),
        "node": str(getattr(result, "node", "") or socket.gethostname()),
        "time": datetime.now(timezone.utc),
    }


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """The live progress line: generation, best so far against the best baseline,
    candidates/s, samples/s and time left."""

    def __init__(self, total_generations: int | None, total_candidates: int | None,
                 metric: str, enabled: bool = True) -> None:
        self.total_generations = total_generations
        self.total_candidates = total_candidates
        self.metric = metric
        self.enabled = enabled
        self.start = time.monotonic()
        self.n_candidates = 0
        self.n_samples = 0
        self.best: float = math.inf
        self.best_baseline: tuple[str, float] | None = None

    def update(self, generation: int, values: Sequence[float | None], samples: int,
               baselines: dict[str, float]) -> str:
        self.n_candidates += len(values)
        self.n_samples += samples
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if finite:
            self.best = min(self.best, min(finite))
        if baselines:
            name = min(baselines, key=baselines.get)
            self.best_baseline = (name, baselines[name])
        elapsed = time.monotonic() - self.start
        cps = self.n_candidates / max(elapsed, 1e-9)
        sps = self.n_samples / max(elapsed, 1e-9)
        left = math.nan
        if self.total_candidates:
            left = (self.total_candidates - self.n_candidates) / max(cps, 1e-9)
        gen = f"gen {generation + 1}"
        if self.total_generations:
            gen += f"/{self.total_generations}"
        line = f"[{gen}] best {self.metric} {self.best:.4g}"
        if self.best_baseline is not None:
            name, val = self.best_baseline
            rel = 100.0 * (self.best - val) / val if val else math.nan
            line += f" (best baseline {name} {val:.4g}, {rel:+.1f}%)"
        line += (
            f" | {self.n_candidates} cand, {cps:.2f} cand/s, {sps / 1000:.1f}k samples/s"
            f" | {format_duration(elapsed)} elapsed, ~{format_duration(left)} left"
        )
        if self.enabled:
            print(line, flush=True)
        return line


def setup_logging(log_path: str | None) -> None:
    """Log to ``log_path`` (the run's log file) at INFO, and warnings to stderr."""
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    if log_path is not None:
        fh = logging.FileHandler(log_path)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.WARNING)
    sh.setFormatter(logging.Formatter("searchd: %(levelname)s: %(message)s"))
    logger.addHandler(sh)
    logger.propagate = False


def scratch_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix)


def as_float_array(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)
