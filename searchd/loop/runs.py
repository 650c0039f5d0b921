"""Run directories that cannot be mixed: a new run, a resumed one, and what each may change.

- A new run needs a new or empty directory (``plan_new``); its id is the directory's name
  (``runs/<time>-<hex>`` when none is given).
- A run records, in ``run.json``, its id, the version of its schedule ids, and a
  fingerprint of everything in its configuration that shapes its numbers, with the
  configuration itself (``record``).
- ``plan_resume`` compares the run's ``config.yaml`` (a user may have edited it) and any
  ``--config``/``--set`` with what the run recorded: a change of a key that shapes the
  numbers is refused, naming the keys; a change of a safe key (``SAFE_KEYS``: the workers,
  the report, the budget: ``search.evolution.generations``, ``search.budget``) needs
  ``force``. A budget extended that way really extends the run. A finished run
  (``best.json`` written, no lock) with nothing to extend is reported finished, without work.

Every refusal is a ``BadInput`` (one line) raised before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import yaml

from searchd.config import SearchConfig, apply_overrides, load_config, validate_config
from searchd.schedule import ID_SCHEME
from searchd.storage import BEST_FILE, CONFIG_FILE, LOCK_FILE, RunDir, StorageError

RUN_FILE = "run.json"
# Keys a resume may change (with force): how fast the search runs, how long it goes on, what
# the end shows; never what a candidate's number is.
SAFE_KEYS = ("workers.", "report.", "run_dir", "search.evolution.generations", "search.budget")
# Keys that extend a finished run when they grow.
BUDGET_KEYS = ("search.evolution.generations", "search.budget")
# Trust in the model's code is given by each invocation (--trust-remote-code, or the
# configuration file passed with --resume), never taken from the run directory's own files.
TRUST_KEY = "model.trust_remote_code"


class BadInput(ValueError):
    """Bad input: reported on one line, exit status 2, before anything is written."""


def new_run_id() -> str:
    """A new run's id: UTC time and 6 random hex digits."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def run_id_of(location: str) -> str:
    """A run's id: its directory's name (the last component of the path or URI)."""
    path = location.split("?", 1)[0].rstrip("/")
    return posixpath.basename(path) or path


def open_location(location: str) -> RunDir:
    """The ``RunDir`` at ``location``; an unusable location (an ``s3://`` URI without a
    findable region, an unknown query key, ...) is a ``BadInput``."""
    try:
        return RunDir(location)
    except (ValueError, StorageError) as e:
        text = str(e)
        if location not in text:
            text = f"run directory {location}: {text}"
        raise BadInput(text) from None


def safe(key: str) -> bool:
    return key.startswith(SAFE_KEYS)


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain-data configurations."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def fingerprint(resolved: Mapping[str, Any]) -> str:
    """SHA-256 of the resolved configuration without ``SAFE_KEYS``: what shapes the
    numbers of a run."""
    def strip(d: Any, prefix: str = "") -> Any:
        if not isinstance(d, dict):
            return d
        return {k: strip(v, f"{prefix}{k}.") for k, v in sorted(d.items())
                if not safe(f"{prefix}{k}") and not safe(f"{prefix}{k}.")}

    text = json.dumps(strip(dict(resolved)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def record(cfg: SearchConfig, run_id: str) -> dict[str, Any]:
    """``run.json``: the run's id, its schedule-id scheme, its fingerprint and its
    configuration as run."""
    resolved = cfg.resolve()
    return {"run_id": run_id, "id_scheme": ID_SCHEME, "fingerprint": fingerprint(resolved),
            "config": resolved}


@dataclass
class RunPlan:
    """What a run will do, decided before anything starts.

    Attributes:
        cfg: the configuration to run (``run_dir`` set).
        run: its directory.
        run_id: its id (the directory's name).
        resume: it continues a stored run.
        created: the directory did not exist, or was empty (a new run cleans up after a
            bad-input failure).
        finished: a resumed run that is already finished, with nothing to extend.
        changed: keys that differ from what the run recorded (accepted with ``force``).
    """

    cfg: SearchConfig
    run: RunDir
    run_id: str
    resume: bool
    created: bool = False
    finished: bool = False
    changed: tuple[str, ...] = ()


def plan_new(cfg: SearchConfig, run_dir: str | None = None) -> RunPlan:
    """A new run: in ``run_dir`` (or ``cfg.run_dir``, or ``runs/<new id>``), which must not
    exist or be empty."""
    location = run_dir or cfg.run_dir or f"runs/{new_run_id()}"
    run = open_location(location)
    entries = _entries(run)
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        hint = (f"; to continue the run in it: --resume {location}"
                if CONFIG_FILE in entries else "")
        raise BadInput(f"--run-dir {location} is not empty ({shown}); a new run needs a new "
                       f"or empty directory{hint}")
    cfg = cfg.model_copy(update={"run_dir": location})
    return RunPlan(cfg, run, run_id_of(location), resume=False, created=True)


def _entries(run: RunDir) -> list[str]:
    try:
        return run.listdir() if run.exists() else []
    except StorageError as e:
        raise BadInput(f"run directory {run.uri}: {e}") from None


def _with_new_defaults(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded configuration with the keys added to searchd since it was run, at their
    defaults (so that a key that did not exist then is not a change); as recorded if it
    does not validate any more."""
    try:
        full = validate_config(_undo_derived(dict(recorded))).resolve()
    except Exception:
        return dict(recorded)
    return _merge_missing(dict(recorded), full)


def _merge_missing(recorded: dict[str, Any], full: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in full.items():
        if k not in recorded:
            recorded[k] = v
        elif isinstance(v, Mapping) and isinstance(recorded[k], Mapping):
            recorded[k] = _merge_missing(dict(recorded[k]), v)
    return recorded


def plan_resume(location: str, config: str | None = None, overrides: Iterable[str] = (),
                force: bool = False) -> RunPlan:
    """Continue the run at ``location`` (see the module docstring for what may change)."""
    run = open_location(location)
    if not run.exists(CONFIG_FILE):
        raise BadInput(f"--resume {location}: not a searchd run directory (no {CONFIG_FILE})")
    stored = _read_yaml(run, CONFIG_FILE)
    meta = _read_run_json(run)
    if meta.get("id_scheme") != ID_SCHEME:
        raise BadInput(
            f"--resume {location}: the run was written by an earlier searchd, which "
            "identified schedules differently; it cannot be continued (read it with "
            f"python -m searchd.report {location})")
    recorded = _with_new_defaults(meta.get("config") or stored)
    raw = _undo_derived(dict(stored))
    if isinstance(raw.get("model"), dict):
        raw["model"] = {**raw["model"], "trust_remote_code": False}
    overrides = list(overrides)
    if config is not None:
        new = load_config(config, overrides).resolve()
    else:
        new = validate_config(apply_overrides(raw, overrides)).resolve()
    new["run_dir"] = location
    recorded = {**recorded, "run_dir": location}
    changed = [k for k in config_diff(recorded, new) if k != TRUST_KEY]
    unsafe = [k for k in changed if not safe(k)]
    where = "config.yaml or the command line"
    if unsafe:
        raise BadInput(
            f"--resume {location}: the configuration differs from the run's in "
            f"{', '.join(unsafe)} ({where}); these keys shape the run's numbers and cannot "
            f"change (only {', '.join(k.rstrip('.') for k in SAFE_KEYS)} can, with --force)")
    if changed and not force:
        raise BadInput(
            f"--resume {location}: the configuration differs from the run's in "
            f"{', '.join(changed)} ({where}); pass --force to accept these changes")
    cfg = validate_config(new)
    finished = run.exists(BEST_FILE) and not run.exists(LOCK_FILE)
    extends = any(k.startswith(BUDGET_KEYS) for k in changed)
    return RunPlan(cfg, run, str(meta.get("run_id") or run_id_of(location)), resume=True,
                   finished=finished and not extends, changed=tuple(changed))


def _read_yaml(run: RunDir, name: str) -> dict[str, Any]:
    try:
        text = run.read_text(name)
    except (OSError, StorageError) as e:
        raise BadInput(f"{run.display(name)}: cannot read it ({e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{run.display(name)}:{mark.line + 1}:{mark.column + 1}" if mark else \
            run.display(name)
        raise BadInput(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{run.display(name)}: not a configuration (a mapping of sections)")
    return raw


def _read_run_json(run: RunDir) -> dict[str, Any]:
    if not run.exists(RUN_FILE):
        return {}
    try:
        meta = json.loads(run.read_text(RUN_FILE))
    except (ValueError, StorageError) as e:
        raise BadInput(f"{run.display(RUN_FILE)}: unreadable ({e})") from None
    return meta if isinstance(meta, dict) else {}


def _undo_derived(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored configuration with its derived values cleared where they still equal their
    derivation, so that they follow an override of what they derive from (generations)."""
    search = raw.get("search")
    if not isinstance(search, dict):
        return raw
    ev = search.get("evolution") or {}
    pop, gens = ev.get("population_num"), ev.get("generations")
    if isinstance(pop, int) and isinstance(gens, int):
        search = dict(search)
        if search.get("budget") == pop * gens:
            search["budget"] = None
        if search.get("candidates_per_trial") == pop:
            search["candidates_per_trial"] = None
        raw = {**raw, "search": search}
    return raw
