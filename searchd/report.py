"""``python -m searchd.report RUN_DIR``: what a search's run directory holds, as tables, and
its plots redrawn.

Prints the run's state (finished, running, or interrupted), the evaluations per generation,
the top candidates, the baselines, the held-out scores (once ``best.json`` exists) and the
failures with their reasons; then redraws ``report/metric_per_generation.png`` and
``report/schedules.png`` from the stored evaluations (the sample grids need the model and
are drawn only by the search itself).

A run in progress is read, never locked: the report takes no lock, moves nothing (a part
that fails its integrity check is reported and skipped, not set aside) and writes only its
plots, atomically, so a running search is not disturbed. Local paths and ``s3://...``
run directories (``?region=...&endpoint_override=...``) are read through ``RunDir``.

Exit codes: 0 done; 2 not a run directory (one line on stderr); 1 a storage error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from searchd.storage import (
    BEST_FILE,
    CONFIG_FILE,
    CORRUPT_DIR,
    EVALUATIONS_DIR,
    REPORT_DIR,
    SEARCHER_DIR,
    RunDir,
    StorageError,
    read_lock,
    table_to_rows,
    verify_part,
)
from searchd.storage.errors import SchemaVersionError, one_line
from searchd.storage.lock import pid_alive
from searchd.storage.schema import empty_table

PROG = "python -m searchd.report"
HISTORY_PLOT = "metric_per_generation.png"
SCHEDULES_PLOT = "schedules.png"


class NotARunError(ValueError):
    """The path is not a searchd run directory."""


@dataclass
class RunReport:
    """Everything the report prints, read from one run directory."""

    uri: str
    run_id: str | None
    config: dict[str, Any] | None
    state: str  # "finished" | "running" | "interrupted" | "not started"
    state_detail: str
    rows: list[dict[str, Any]]
    n_parts: int
    bad_parts: list[tuple[str, str]]  # (relative path, reason): skipped, left in place
    set_aside: list[str]  # evaluations/_corrupt/ names
    searcher_states: list[int]
    best: dict[str, Any] | None
    baseline_names: dict[str, str] = field(default_factory=dict)  # candidate id -> name

    @property
    def metric(self) -> str:
        metrics = {r["metric"] for r in self.rows}
        if len(metrics) == 1:
            return metrics.pop()
        if self.config:
            return str(self.config.get("metric", {}).get("name", "value"))
        return "value"

    def ok_rows(self) -> list[dict[str, Any]]:
        """Scored candidates with a value, best first (ties by id, as the driver ranks)."""
        ok = [r for r in self.rows if r["status"] == "ok" and r["value"] is not None]
        return sorted(ok, key=lambda r: (r["value"], r["candidate_id"]))

    def baseline_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["origin"] == "baseline"]

    def baseline_name(self, row: Mapping[str, Any]) -> str:
        return self.baseline_names.get(row["candidate_id"], f"baseline {row['candidate_id']}")


# Reading -------------------------------------------------------------------------------------
def open_run(location: str) -> RunDir:
    """The run directory at ``location``; ``NotARunError`` (one line) when it is not one."""
    if "://" not in location and not os.path.exists(location):
        raise NotARunError(f"{location}: no such directory; expected a searchd run directory "
                           "(one with config.yaml and evaluations/)")
    if "://" not in location and not os.path.isdir(location):
        raise NotARunError(f"{location} is a file, not a searchd run directory")
    run = RunDir(location)
    if not run.exists():
        raise NotARunError(f"{run.uri}: nothing there; expected a searchd run directory "
                           "(one with config.yaml and evaluations/)")
    if not (run.exists(CONFIG_FILE) or run.exists(EVALUATIONS_DIR)):
        raise NotARunError(f"{run.uri} is not a searchd run directory (it has neither "
                           f"{CONFIG_FILE} nor {EVALUATIONS_DIR}/)")
    return run


def read_run(run: RunDir) -> RunReport:
    """Read everything the report shows; takes no lock and changes nothing."""
    import yaml

    config = None
    if run.exists(CONFIG_FILE):
        config = yaml.safe_load(run.read_text(CONFIG_FILE))
    run_id = None
    if run.exists("run.json"):
        run_id = run.read_json("run.json").get("run_id")
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
    rows = table_to_rows(table)
    best = run.read_json(BEST_FILE) if run.exists(BEST_FILE) else None
    states = run.searcher_state_generations()
    state, detail = _run_state(run, best, rows)
    report = RunReport(
        uri=run.uri, run_id=run_id or (rows[0]["run_id"] if rows else None), config=config,
        state=state, state_detail=detail, rows=rows, n_parts=len(parts), bad_parts=bad,
        set_aside=run.listdir(CORRUPT_DIR), searcher_states=states, best=best,
    )
    report.baseline_names = _baseline_names(run, report)
    return report


def _run_state(run: RunDir, best: Any, rows: list) -> tuple[str, str]:
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
                               f"python -m searchd.search --resume {run.uri}")
    if not rows:
        return "not started", "no evaluations yet"
    return "interrupted", (f"no best.json and no lock; resume with: python -m searchd.search "
                           f"--resume {run.uri}")


def _baseline_names(run: RunDir, report: RunReport) -> dict[str, str]:
    """Baseline candidate id -> name: from best.json's held-out scores, else from the newest
    searcher state (the schedules' provenance), else from config order."""
    names: dict[str, str] = {}
    if report.best:
        for s in report.best.get("heldout", {}).get("scores", []):
            if s.get("candidate_id") and s.get("name") and s["name"] != "searched":
                names[s["candidate_id"]] = s["name"]
    wanted = {r["candidate_id"] for r in report.baseline_rows()} - set(names)
    if wanted and report.searcher_states:
        # Read directly (RunDir.latest_searcher_state sets unreadable states aside: a write).
        gen = report.searcher_states[-1]
        try:
            latest = run.read_json(f"{SEARCHER_DIR}/state-{gen:06d}.json").get("state")
        except (ValueError, AttributeError, FileNotFoundError, StorageError):
            latest = None
        for sched in _schedules_in(latest):
            meta = sched.get("meta") or {}
            if sched.get("id") in wanted and meta.get("name"):
                names[sched["id"]] = str(meta["name"])
    return names


def _schedules_in(obj: Any) -> list[dict[str, Any]]:
    """Every schedule dict (with ``id`` and ``sigmas``) nested in a searcher state."""
    out: list[dict[str, Any]] = []
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if "id" in x and "sigmas" in x and "meta" in x:
                out.append(x)
            else:
                stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return out


# Printing ------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 5) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for k, r in enumerate(cells):
        lines.append(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(rep: RunReport, top: int = 10) -> str:
    """The summary tables as text."""
    out: list[str] = []
    metric = rep.metric
    out.append(f"run {rep.run_id or '?'}  {rep.uri}")
    out.append(f"state: {rep.state} ({rep.state_detail})")
    if rep.config:
        c = rep.config
        model = c.get("model", {}).get("name") or (c.get("model", {}).get("spec") or {}).get(
            "path")
        search = c.get("search", {})
        out.append(
            f"model {model}, solver {c.get('solver', {}).get('name')}, NFE {c.get('nfe')}, "
            f"{search.get('algorithm')} search (seed {search.get('seed')}), metric {metric} "
            f"on {c.get('samples', {}).get('per_candidate')} samples per candidate"
        )
    n_failed = sum(r["status"] != "ok" for r in rep.rows)
    out.append(
        f"{len(rep.rows)} evaluations ({n_failed} not ok) in {rep.n_parts} part file(s); "
        f"searcher states: "
        + (f"{len(rep.searcher_states)} (newest state-{rep.searcher_states[-1]:06d}.json)"
           if rep.searcher_states else "none")
    )
    for rel, reason in rep.bad_parts:
        out.append(f"WARNING: {rel} fails its integrity check ({reason}); its rows are not "
                   "shown (a resume sets it aside and scores them again)")
    if rep.set_aside:
        out.append(f"set aside in {CORRUPT_DIR}/: {', '.join(rep.set_aside)}")

    # Per generation.
    out.append("")
    out.append("Evaluations per generation")
    gens = sorted({r["generation"] for r in rep.rows})
    table, best_so_far = [], math.inf
    for g in gens:
        rs = [r for r in rep.rows if r["generation"] == g]
        vals = [r["value"] for r in rs if r["status"] == "ok" and r["value"] is not None]
        best = min(vals) if vals else None
        if best is not None:
            best_so_far = min(best_so_far, best)
        table.append([
            g, len(rs), sum(r["status"] == "ok" for r in rs),
            sum(r["status"] == "failed" for r in rs), sum(r["status"] == "pruned" for r in rs),
            best, best_so_far if math.isfinite(best_so_far) else None,
        ])
    out.append(_table(["generation", "evaluated", "ok", "failed", "pruned", f"best {metric}",
                       "best so far"], table) if table else "  (none yet)")

    # Top candidates.
    ranked = rep.ok_rows()
    out.append("")
    out.append(f"Top {min(top, len(ranked))} candidates (search {metric}, lower is better)")
    if ranked:
        out.append(_table(
            ["rank", "candidate", "gen", "origin", metric, "nfe", "sigmas"],
            [[i + 1, r["candidate_id"], r["generation"],
              rep.baseline_name(r) if r["origin"] == "baseline" else r["origin"],
              r["value"], r["nfe"], " ".join(f"{s:.4g}" for s in r["sigmas"])]
             for i, r in enumerate(ranked[:top])],
        ))
    else:
        out.append("  (no candidate scored yet)")

    # Baselines.
    held = {}
    if rep.best:
        held = {s.get("candidate_id"): s for s in rep.best.get("heldout", {}).get("scores", [])}
    out.append("")
    out.append("Baselines")
    brows = rep.baseline_rows()
    if brows:
        best_value = ranked[0]["value"] if ranked else None
        lines = []
        for r in sorted(brows, key=lambda r: (r["value"] is None, r["value"] or 0.0)):
            h = held.get(r["candidate_id"], {})
            rel = None
            if best_value is not None and r["value"]:
                rel = f"{100.0 * (best_value - r['value']) / r['value']:+.1f}%"
            lines.append([rep.baseline_name(r), r["candidate_id"], r["status"], r["value"],
                          rel, h.get(metric)])
        out.append(_table(["baseline", "candidate", "status", f"search {metric}",
                           "best vs it", f"held-out {metric}"], lines))
    else:
        out.append("  (none evaluated yet)")

    # Held-out scores.
    out.append("")
    if rep.best:
        ho = rep.best.get("heldout", {})
        level = int(round(100 * float(ho.get("level", 0.95))))
        out.append(
            f"Held-out scores ({ho.get('n_samples')} samples, seeds from {ho.get('seed_base')}, "
            f"{level}% bootstrap CIs; differences paired against {rep.best.get('best_baseline')})"
        )
        lines = []
        for s in ho.get("scores", []):
            ci = s.get(f"{metric}_ci")
            dci = s.get("diff_ci")
            lines.append([
                s.get("name"), s.get("candidate_id"), s.get("status"), s.get(metric),
                None if not ci else f"[{ci[0]:.4g}, {ci[1]:.4g}]", s.get("diff"),
                None if not dci else f"[{dci[0]:+.4g}, {dci[1]:+.4g}]",
            ])
        out.append(_table(["schedule", "candidate", "status", metric, "CI", "diff", "diff CI"],
                          lines))
        out.append(f"best schedule: {rep.best.get('solver')}, sigmas "
                   + json.dumps(rep.best.get("sigmas")))
        ad = rep.best.get("adaptive")
        if ad:
            out.extend(["", *_adaptive_lines(ad)])
    else:
        out.append("Held-out scores: none yet (best.json is written when the search ends)")

    # Failures.
    failed = [r for r in rep.rows if r["status"] != "ok"]
    out.append("")
    out.append(f"Failures ({len(failed)})")
    if failed:
        out.append(_table(["candidate", "gen", "origin", "status", "reason"],
                          [[r["candidate_id"], r["generation"], r["origin"], r["status"],
                            (r["error"] or "-").replace("\n", " ")] for r in failed]))
    else:
        out.append("  (none)")
    return "\n".join(out)


def _adaptive_lines(ad: Mapping[str, Any]) -> list[str]:
    """An adaptive run's predictor: its files and its paired held-out score."""
    src = ad.get("global_schedule", {})
    out = [f"Adaptive {ad.get('kind')} predictor over the global schedule "
           f"({src.get('source')}): {ad.get('torchscript')} (TorchScript), "
           f"{ad.get('weights')} (weights)"]
    if ad.get("status") != "ok" or "heldout" not in ad:
        out.append(f"  failed: {ad.get('error')}")
        return out
    h = ad["heldout"]
    rows = []
    for name in ("global", "predictor"):
        s = h[name]
        ci = s.get("fid_ci")
        rows.append([name, s.get("fid"), None if not ci else f"[{ci[0]:.4g}, {ci[1]:.4g}]"])
    out.append(_table(["sampler", "held-out fid", "CI"], rows))
    dci = h.get("diff_ci")
    if h.get("diff") is not None and dci:
        out.append(f"  predictor - global: {h['diff']:+.4g} [{dci[0]:+.4g}, {dci[1]:+.4g}] "
                   f"(same {h.get('n_samples')} held-out seeds; gain {100 * h['gain']:+.1f}%)")
    return out


# Plots ---------------------------------------------------------------------------------------
def draw_plots(
    out_dir: str,
    rows: Sequence[Mapping[str, Any]],
    baseline_values: Mapping[str, float],
    schedules: Mapping[str, Sequence[float]],
    metric: str,
    title: str,
) -> list[str]:
    """``metric_per_generation.png`` and ``schedules.png`` into ``out_dir``; the file names.

    ``schedules``: name -> sigmas, the searched (best) schedule first.
    """
    from searchd.plots import plot_history, plot_schedules

    plot_history([r["generation"] for r in rows],
                 [math.nan if r["value"] is None else r["value"] for r in rows],
                 dict(baseline_values), os.path.join(out_dir, HISTORY_PLOT), metric=metric)
    names = [HISTORY_PLOT]
    if schedules:
        plot_schedules(dict(schedules), os.path.join(out_dir, SCHEDULES_PLOT), title=title)
        names.append(SCHEDULES_PLOT)
    return names


def copy_into_run(run: RunDir, folder: str, names: Sequence[str]) -> list[str]:
    """Write files of a local folder to ``report/`` of the run (atomically, also to S3)."""
    out = []
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            out.append(run.write_bytes(f"{REPORT_DIR}/{name}", f.read()))
    return out


def redraw_plots(run: RunDir, rep: RunReport) -> list[str]:
    """Redraw the run's plots from its evaluations into ``report/``; relative paths written."""
    ranked = rep.ok_rows()
    baseline_values = {
        rep.baseline_name(r): (r["value"] if r["value"] is not None else math.inf)
        for r in rep.baseline_rows()
    }
    schedules: dict[str, Sequence[float]] = {}
    if rep.best and rep.best.get("sigmas"):
        schedules["searched (best)"] = rep.best["sigmas"]
    elif ranked:
        schedules["searched (best so far)"] = ranked[0]["sigmas"]
    for r in rep.baseline_rows():
        schedules.setdefault(rep.baseline_name(r), r["sigmas"])
    solver = ranked[0]["solver"] if ranked else None
    nfe = ranked[0]["nfe"] if ranked else None
    title = f"best schedule vs baselines ({solver}, NFE {nfe})"
    folder = tempfile.mkdtemp(prefix="searchd-report-")
    try:
        names = draw_plots(folder, rep.rows, baseline_values, schedules, rep.metric, title)
        return copy_into_run(run, folder, names)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# Command line ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Summarize a searchd run directory (finished or in progress) and redraw "
        "its plots into RUN_DIR/report/.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a run directory: a local path or s3://bucket/path?region=...")
    p.add_argument("--top", type=int, default=10, help="candidates in the top table (10)")
    p.add_argument("--no-plots", action="store_true", help="print only; write nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top < 1:
        print(f"{PROG}: error: --top = {args.top}; it must be >= 1", file=sys.stderr)
        return 2
    try:
        run = open_run(args.run_dir)
        rep = read_run(run)
    except (NotARunError, ValueError) as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except StorageError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(format_report(rep, top=args.top))
    if args.no_plots:
        return 0
    try:
        written = redraw_plots(run, rep)
    except StorageError as e:
        print(f"{PROG}: error: cannot write the plots: {one_line(e)}", file=sys.stderr)
        return 1
    print("")
    print("plots: " + ", ".join(run.display(p) for p in written))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the output piped into head, less, ...: not an error
        sys.stderr.close()
        sys.exit(0)
