"""searchd as a library: ``search(...) -> SearchResult`` and ``open_run(path) -> RunView``.

``searchd.search`` runs (or resumes) a search from a configuration and returns its result;
``searchd.open_run`` reads a run directory (finished or in progress, local or ``s3://``)
without taking its lock. The command-line tools are thin layers over these two. A library
call prints nothing unless given ``progress`` (a callable taking each line), and sets up no
logging of its own beyond the run's ``log.txt``.

Errors: ``BadInput`` (and ``ConfigError``) for bad input, raised before any expensive work
(the checks that need the model: once it is loaded, before the search); ``StorageError``
for a run directory that cannot be written or read; ``RuntimeError`` for a run that fails.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from searchd.config import ConfigError, SearchConfig, load_config, validate_config
from searchd.loop.runs import BadInput, RunPlan, open_location, plan_new, plan_resume
from searchd.schedule import Schedule
from searchd.searchers.base import ranking_key
from searchd.storage import (
    BEST_FILE,
    CONFIG_FILE,
    CORRUPT_DIR,
    EVALUATIONS_DIR,
    LOG_FILE,
    REPORT_DIR,
    RunDir,
    read_lock,
    table_to_rows,
    verify_part,
)
from searchd.storage.errors import SchemaVersionError, one_line
from searchd.storage.lock import pid_alive
from searchd.storage.schema import empty_table

__all__ = ["BadInput", "ConfigError", "HeldoutScore", "NotARunError", "RunView",
           "SearchResult", "open_run", "search"]

Progress = Callable[[str], None]


class NotARunError(BadInput):
    """The path is not a searchd run directory (one line)."""


# Results --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeldoutScore:
    """One row of the held-out table: a schedule re-scored on seeds the search never saw.

    Attributes:
        name: "searched" (the winner) or the baseline's name.
        candidate_id: the schedule's id.
        status: "ok" or "failed" (``error`` says why).
        fid, fid_ci: held-out FID and its bootstrap interval (None when the table scores
            another metric).
        diff, diff_ci: the paired difference against the best baseline and its interval.
        significant: the difference's interval excludes 0 (None: no difference).
        metric: the table's metric: "fid", or "teacher_distance" (a run without reference
            statistics).
        value, ci: the table's metric on the held-out samples and its bootstrap interval.
    """

    name: str
    candidate_id: str
    status: str
    fid: float | None
    fid_ci: tuple[float, float] | None
    diff: float | None
    diff_ci: tuple[float, float] | None
    significant: bool | None
    error: str | None = None
    metric: str = "fid"
    value: float | None = None
    ci: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HeldoutScore:
        from searchd.loop.finish import significant

        def pair(v: Any) -> tuple[float, float] | None:
            return None if v is None else (float(v[0]), float(v[1]))

        metric = str(d.get("metric") or "fid")  # runs written before the key: FID
        return cls(str(d.get("name")), str(d.get("candidate_id")), str(d.get("status")),
                   d.get("fid"), pair(d.get("fid_ci")), d.get("diff"), pair(d.get("diff_ci")),
                   d.get("significant", significant(d)), d.get("error"), metric,
                   d.get(metric), pair(d.get(f"{metric}_ci")))


@dataclass(frozen=True)
class SearchResult:
    """What a search gave: the winning schedule, its search value, the held-out table and
    where everything is.

    Attributes:
        status: "finished", or "interrupted" (resume it: ``search(run_dir, resume=True)``).
        run_id: the run's id (its directory's name).
        run_dir: the run directory (a path or an ``s3://`` URI).
        schedule: the winner (None when interrupted).
        value: its search value (the metric on the search seeds).
        metric: the searched metric's name.
        heldout: the winner and the baselines on the held-out seeds, winner first.
        best_baseline: the baseline the held-out differences are paired against.
        evaluations: candidates scored in the run.
        files: ``best.json``, ``evaluations`` (the Parquet directory), ``config.yaml``,
            ``log.txt``, ``report`` (the plots), as paths or URIs.
        best: ``best.json``'s content (None when interrupted).
    """

    status: str
    run_id: str
    run_dir: str
    schedule: Schedule | None
    value: float | None
    metric: str
    heldout: tuple[HeldoutScore, ...] = ()
    best_baseline: str | None = None
    evaluations: int = 0
    files: Mapping[str, str] = field(default_factory=dict)
    best: Mapping[str, Any] | None = None

    def __repr__(self) -> str:
        # The fields hold whole files (best.json): a REPL shows the gist, not a page of JSON.
        value = "None" if self.value is None else f"{self.value:.6g}"
        sid = self.schedule.id if self.schedule is not None else None
        return (f"SearchResult(status={self.status!r}, run_id={self.run_id!r}, "
                f"run_dir={self.run_dir!r}, schedule={sid!r}, {self.metric}={value}, "
                f"evaluations={self.evaluations})")

    @classmethod
    def of_run(cls, run: RunDir, run_id: str, best: Mapping[str, Any] | None,
               metric: str, evaluations: int) -> SearchResult:
        files = {name: run.display(rel) for name, rel in (
            ("best.json", BEST_FILE), ("evaluations", EVALUATIONS_DIR),
            ("config.yaml", CONFIG_FILE), ("log.txt", LOG_FILE), ("report", REPORT_DIR))}
        if best is None:
            return cls("interrupted", run_id, run.uri, None, None, metric,
                       evaluations=evaluations, files=files)
        try:
            held = tuple(HeldoutScore.from_dict(s) for s in best["heldout"]["scores"])
            return cls("finished", run_id, run.uri, Schedule.from_dict(best["schedule"]),
                       best["search"]["value"], best["search"]["metric"], held,
                       best.get("best_baseline"), int(best["search"]["evaluations"]), files,
                       best)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # not searchd's file
            raise BadInput(f"{run.display(BEST_FILE)} is not a best.json that searchd wrote "
                           f"({type(e).__name__}: {one_line(str(e))})") from None

    @property
    def heldout_value(self) -> float | None:
        """The winner's held-out value (None when interrupted or failed)."""
        return self.heldout[0].value if self.heldout else None


# search() -------------------------------------------------------------------------------------
def search(
    config: str | os.PathLike[str] | Mapping[str, Any] | SearchConfig | None = None,
    overrides: Iterable[str] = (),
    *,
    run_dir: str | None = None,
    resume: bool = False,
    force: bool = False,
    engine: str = "ray",
    address: str | None = None,
    progress: Progress | None = None,
) -> SearchResult:
    """Run a search, or resume one, and return its result.

    Args:
        config: a YAML file, a mapping, or a ``SearchConfig``. With ``resume``: optional
            (the run's own ``config.yaml`` is used; a file given is compared with it).
        overrides: ``key.path=value`` overrides (``--set``).
        run_dir: where the run goes (default: ``config``'s ``run_dir``, else
            ``runs/<run id>``); it must be new or empty. With ``resume``: the run.
        resume: continue the run in ``run_dir``. Keys that shape its numbers cannot change;
            safe ones (workers, report, generations, budget) need ``force``. A finished run
            with nothing to extend is returned as it is, without work.
        force: accept safe changes on resume, and take over a lock left by another host.
        engine: "ray" (Ray Tune and the evaluator actors; the default, and what clusters
            and ``ray job submit`` use) or "local" (everything in this process).
        address: the Ray address (default: ``$RAY_ADDRESS``, else a local Ray).
        progress: called with each progress line (None: silent).

    Raises:
        BadInput / ConfigError: bad input (one line).
        StorageError: the run directory cannot be written or read.
        LockError: another search holds the run.
    """
    plan = _plan(config, overrides, run_dir, resume, force)
    if plan.finished:  # before the imports of a search (torch): a resume of a finished run
        return _finished(plan, progress)
    from searchd.loop import stages
    from searchd.loop.checks import preflight

    eng = _engine(engine, address, progress)
    on_cluster = engine == "ray" and bool(eng.address)  # type: ignore[attr-defined]
    preflight(plan.cfg, on_cluster=on_cluster)
    check = getattr(eng, "check", None)
    if check is not None:
        check()
    outcome = stages.run(plan, eng, progress)
    return SearchResult.of_run(plan.run, plan.run_id, outcome.best, plan.cfg.metric.name,
                               outcome.evaluations)


def _plan(config: Any, overrides: Iterable[str], run_dir: str | None, resume: bool,
          force: bool) -> RunPlan:
    overrides = list(overrides)
    if resume:
        if run_dir is None:
            raise BadInput("resume needs the run directory (run_dir)")
        if config is not None and not isinstance(config, (str, os.PathLike)):
            raise BadInput("resume takes a configuration file, or none (the run's own)")
        return plan_resume(run_dir, None if config is None else os.fspath(config), overrides,
                           force)
    if config is None:
        raise BadInput("give a configuration (a YAML file such as configs/quickstart.yaml)")
    return plan_new(_config(config, overrides), run_dir)


def _config(config: Any, overrides: list[str]) -> SearchConfig:
    from searchd.config import apply_overrides

    if isinstance(config, (str, os.PathLike)):
        return load_config(config, overrides)
    raw = config.resolve() if isinstance(config, SearchConfig) else dict(config)
    return validate_config(apply_overrides(raw, overrides))


def _engine(name: str, address: str | None, progress: Progress | None) -> Any:
    if name == "ray":
        from searchd.distributed.engine import RayEngine

        return RayEngine(address, say=progress)
    if name == "local":
        if address is not None:
            raise BadInput("address goes with engine='ray'")
        from searchd.loop.local import LocalEngine

        return LocalEngine()
    raise BadInput(f"engine = {name!r}; allowed: 'ray', 'local'")


def _finished(plan: RunPlan, progress: Progress | None) -> SearchResult:
    view = open_run(plan.run)
    if progress is not None:
        progress(f"searchd: run {plan.run_id} is finished ({plan.run.display(BEST_FILE)}); "
                 f"nothing to do (python -m searchd.report {plan.run.location})")
    return view.result()


# open_run() -----------------------------------------------------------------------------------
@dataclass
class RunView:
    """A run directory as read (no lock taken, nothing moved).

    Attributes:
        uri: where the run is (for display: an S3 URI without its query).
        opened: what it was opened with (a location, query included, or a ``RunDir``);
            ``run_dir()`` opens it again.
        run_id: its id.
        config: its ``config.yaml`` (plain data), if any.
        state: "finished", "running", "interrupted" or "not started" (``state_detail``
            says why, and how to resume).
        rows: the evaluation rows (plain dicts of ``EVALUATION_SCHEMA``), in write order;
            parts that fail their integrity check are skipped and listed in ``bad_parts``.
        best: ``best.json``'s content once the run has finished.
        searcher_states: numbers of the searcher state files.
        set_aside: parts moved to ``evaluations/_corrupt/`` earlier.
    """

    uri: str
    run_id: str | None
    config: dict[str, Any] | None
    state: str
    state_detail: str
    rows: list[dict[str, Any]]
    n_parts: int
    bad_parts: list[tuple[str, str]]
    set_aside: list[str]
    searcher_states: list[int]
    best: dict[str, Any] | None
    baseline_names: dict[str, str] = field(default_factory=dict)
    opened: str | RunDir = ""

    def __repr__(self) -> str:
        # The fields hold the whole run (every row, best.json): a REPL shows the gist.
        return (f"RunView(uri={self.uri!r}, run_id={self.run_id!r}, state={self.state!r}, "
                f"rows={len(self.rows)}, parts={self.n_parts}, bad_parts={len(self.bad_parts)}, "
                f"best={'yes' if self.best else 'no'})")

    @property
    def metric(self) -> str:
        metrics = {r["metric"] for r in self.rows}
        if len(metrics) == 1:
            return metrics.pop()
        if self.config:
            return str(self.config.get("metric", {}).get("name", "value"))
        return "value"

    def ok_rows(self) -> list[dict[str, Any]]:
        """Scored candidates with a value, best first (ties by id, as the searchers rank);
        the race's re-scorings on fresh seed blocks (``searchd.loop.racing``) are not
        candidates of their own and are left out."""
        from searchd.loop.racing import is_race_row

        ok = [r for r in self.rows if r["status"] == "ok" and r["value"] is not None
              and not is_race_row(r)]
        return sorted(ok, key=lambda r: ranking_key(r["value"], r["candidate_id"]))

    def baseline_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["origin"] == "baseline"]

    def baseline_name(self, row: Mapping[str, Any]) -> str:
        return self.baseline_names.get(row["candidate_id"], f"baseline {row['candidate_id']}")

    def table(self) -> pa.Table:
        """The rows as an Arrow table (``EVALUATION_SCHEMA``)."""
        from searchd.storage import rows_to_table

        return rows_to_table(self.rows) if self.rows else empty_table()

    def evaluations(self, race: bool = False) -> list[tuple[Schedule, Any]]:
        """Every scored candidate as the one result record: ``(Schedule, CandidateResult)``.
        ``race``: also the race's re-scorings of the top candidates on fresh seed blocks
        (rows ``trial_id`` ``race/<block>/<rank>``, ``searchd.loop.racing``), which repeat
        candidate ids."""
        from searchd.loop.racing import is_race_row
        from searchd.loop.record import from_row

        return [from_row(r, check_id=False) for r in self.rows if race or not is_race_row(r)]

    def run_dir(self) -> RunDir:
        """The run directory, opened again (for writing plots beside it, say)."""
        if isinstance(self.opened, RunDir):
            return self.opened
        return RunDir(self.opened or self.uri)

    def result(self) -> SearchResult:
        """The run's result (``SearchResult``; "interrupted" while it has no best.json)."""
        run = self.run_dir()
        n = len(self.rows)
        return SearchResult.of_run(run, self.run_id or "", self.best, self.metric, n)


def open_run(location: str | os.PathLike[str] | RunDir) -> RunView:
    """Read the run at ``location`` (a path, ``s3://...?region=...`` or an open ``RunDir``):
    its state, its rows, ``best.json``. Takes no lock and changes nothing, so a run in
    progress can be read.

    Raises ``NotARunError`` (one line) when the location is not a run directory,
    ``StorageError`` when it cannot be read.
    """
    if isinstance(location, RunDir):
        run = _check_run(location)
    else:
        location = os.fspath(location)
        run = _run_dir(location)
    config = _read_config(run)
    run_id = None
    if run.exists("run.json"):
        run_id = run.read_json("run.json").get("run_id")
    rows, n_parts, bad = _read_rows(run)
    best = run.read_json(BEST_FILE) if run.exists(BEST_FILE) else None
    state, detail = _run_state(run, best, rows)
    view = RunView(
        uri=run.uri, run_id=run_id or (rows[0]["run_id"] if rows else None), config=config,
        state=state, state_detail=detail, rows=rows, n_parts=n_parts, bad_parts=bad,
        set_aside=run.listdir(CORRUPT_DIR), searcher_states=run.searcher_state_generations(),
        best=best, opened=location,
    )
    view.baseline_names = _baseline_names(view)
    return view


def _run_dir(location: str) -> RunDir:
    if "://" not in location and not os.path.exists(location):
        raise NotARunError(f"{location}: no such directory; expected a searchd run directory "
                           "(one with config.yaml and evaluations/)")
    if "://" not in location and not os.path.isdir(location):
        raise NotARunError(f"{location} is a file, not a searchd run directory")
    return _check_run(open_location(location))


def _check_run(run: RunDir) -> RunDir:
    if not run.exists():
        raise NotARunError(f"{run.uri}: nothing there; expected a searchd run directory "
                           "(one with config.yaml and evaluations/)")
    if not (run.exists(CONFIG_FILE) or run.exists(EVALUATIONS_DIR)):
        raise NotARunError(f"{run.uri} is not a searchd run directory (it has neither "
                           f"{CONFIG_FILE} nor {EVALUATIONS_DIR}/)")
    return run


def _read_config(run: RunDir) -> dict[str, Any] | None:
    import yaml

    if not run.exists(CONFIG_FILE):
        return None
    try:
        config = yaml.safe_load(run.read_text(CONFIG_FILE))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = run.display(CONFIG_FILE) + (f":{mark.line + 1}:{mark.column + 1}" if mark else "")
        raise BadInput(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    return config if isinstance(config, dict) else None


def _read_rows(run: RunDir) -> tuple[list[dict[str, Any]], int, list[tuple[str, str]]]:
    tables, bad = [], []
    parts = run.list_parts()
    for rel in parts:
        try:
            data = run.read_bytes(rel)
        except FileNotFoundError:  # set aside by the running search meanwhile
            continue
        try:
            tables.append(verify_part(data, rel))
        except SchemaVersionError:
            raise
        except (pa.ArrowException, OSError, ValueError, KeyError, TypeError, IndexError) as e:
            bad.append((rel, one_line(e)))
    table = pa.concat_tables(tables) if tables else empty_table()
    return table_to_rows(table), len(parts), bad


def _run_state(run: RunDir, best: Any, rows: Sequence[Any]) -> tuple[str, str]:
    lock = read_lock(run)
    if best is not None and lock is None:
        return "finished", "best.json written"
    if lock is not None:
        alive = lock.host != socket.gethostname() or pid_alive(lock.pid)
        if alive:
            where = "" if lock.host == socket.gethostname() else " (another host: liveness " \
                "not checked)"
            return "running", f"lock held by {lock.describe()}{where}"
        return "interrupted", (f"stale lock of {lock.describe()}, process gone; resume with: "
                               f"python -m searchd.search --resume {run.location}")
    if not rows:
        return "not started", "no evaluations yet"
    return "interrupted", (f"no best.json and no lock; resume with: python -m searchd.search "
                           f"--resume {run.location}")


def _baseline_names(view: RunView) -> dict[str, str]:
    """Baseline candidate id -> name: from best.json's held-out scores, else from the
    schedule stored with the row (its provenance)."""
    import json

    names: dict[str, str] = {}
    if view.best:
        for s in view.best.get("heldout", {}).get("scores", []):
            if s.get("candidate_id") and s.get("name") and s["name"] != "searched":
                names[s["candidate_id"]] = s["name"]
    for r in view.baseline_rows():
        if r["candidate_id"] not in names:
            meta = (json.loads(r.get("schedule") or "{}").get("meta") or {})
            if meta.get("name"):
                names[r["candidate_id"]] = str(meta["name"])
    return names
