"""``python -m searchd.report RUN_DIR``: what a search's run directory holds, as tables, and
its plots redrawn.

A thin layer over ``searchd.open_run``: prints the run's state (finished, running, or
interrupted), the evaluations per generation, the top candidates, the baselines, the
held-out scores (once ``best.json`` exists; a difference whose interval contains 0 is
marked not significant) and the failures with their reasons; then redraws
``report/metric_per_generation.png`` and ``report/schedules.png`` from the stored
evaluations (the sample grids need the model and are drawn only by the search itself).

A run in progress is read, never locked: the report takes no lock, moves nothing (a part
that fails its integrity check is reported and skipped, not set aside) and writes only its
plots, atomically, so a running search is not disturbed. Local paths and ``s3://...``
run directories (``?region=...&endpoint_override=...``) are read through ``RunDir``.

Exit codes: 0 done; 2 bad input: not a run directory, a broken config.yaml (one line on
stderr); 1 a storage error.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from searchd.api import NotARunError, RunView, open_run
from searchd.loop.finish import significant
from searchd.storage import CORRUPT_DIR, REPORT_DIR, RunDir

PROG = "python -m searchd.report"

__all__ = ["NotARunError", "RunView", "format_report", "main", "open_run", "redraw_plots"]


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


def format_report(rep: RunView, top: int = 10) -> str:
    """The summary tables as text: the run, its generations, the top candidates, the
    baselines, the held-out scores and the failures."""
    sections = [_header(rep), _generations(rep), _top(rep, top), _baselines(rep),
                _heldout(rep), _failures(rep)]
    return "\n\n".join("\n".join(lines) for lines in sections)


def _header(rep: RunView) -> list[str]:
    out = [f"run {rep.run_id or '?'}  {rep.uri}", f"state: {rep.state} ({rep.state_detail})"]
    if rep.config:
        c = rep.config
        model = c.get("model", {}).get("name") or (c.get("model", {}).get("spec") or {}).get(
            "path")
        search = c.get("search", {})
        out.append(
            f"model {model}, solver {c.get('solver', {}).get('name')}, NFE {c.get('nfe')}, "
            f"{search.get('algorithm')} search (seed {search.get('seed')}), metric "
            f"{rep.metric} on {c.get('samples', {}).get('per_candidate')} samples per candidate"
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
    return out


def _generations(rep: RunView) -> list[str]:
    table, best_so_far = [], math.inf
    for g in sorted({r["generation"] for r in rep.rows}):
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
    body = _table(["generation", "evaluated", "ok", "failed", "pruned", f"best {rep.metric}",
                   "best so far"], table) if table else "  (none yet)"
    return ["Evaluations per generation", body]


def _top(rep: RunView, top: int) -> list[str]:
    ranked = rep.ok_rows()
    out = [f"Top {min(top, len(ranked))} candidates (search {rep.metric}, lower is better)"]
    if not ranked:
        return [*out, "  (no candidate scored yet)"]
    out.append(_table(
        ["rank", "candidate", "gen", "origin", rep.metric, "nfe", "sigmas"],
        [[i + 1, r["candidate_id"], r["generation"],
          rep.baseline_name(r) if r["origin"] == "baseline" else r["origin"],
          r["value"], r["nfe"], " ".join(f"{s:.4g}" for s in r["sigmas"])]
         for i, r in enumerate(ranked[:top])],
    ))
    return out


def _baselines(rep: RunView) -> list[str]:
    metric = rep.metric
    held = {}
    if rep.best:
        held = {s.get("candidate_id"): s for s in rep.best.get("heldout", {}).get("scores", [])}
    brows = rep.baseline_rows()
    if not brows:
        return ["Baselines", "  (none evaluated yet)"]
    ranked = rep.ok_rows()
    best_value = ranked[0]["value"] if ranked else None
    lines = []
    for r in sorted(brows, key=lambda r: (r["value"] is None, r["value"] or 0.0)):
        h = held.get(r["candidate_id"], {})
        rel = None
        if best_value is not None and r["value"]:
            rel = f"{100.0 * (best_value - r['value']) / r['value']:+.1f}%"
        lines.append([rep.baseline_name(r), r["candidate_id"], r["status"], r["value"],
                      rel, h.get(metric)])
    return ["Baselines", _table(["baseline", "candidate", "status", f"search {metric}",
                                 "best vs it", f"held-out {metric}"], lines)]


def _heldout(rep: RunView) -> list[str]:
    if not rep.best:
        return ["Held-out scores: none yet (best.json is written when the search ends)"]
    ho = rep.best.get("heldout", {})
    metric = ho.get("metric", "fid")  # the table's metric (runs written before the key: FID)
    level = int(round(100 * float(ho.get("level", 0.95))))
    out = [f"Held-out scores, {metric} ({ho.get('n_samples')} samples, seeds from "
           f"{ho.get('seed_base')}, {level}% bootstrap CIs; differences paired against "
           f"{rep.best.get('best_baseline')})"]
    out.append(_heldout_table(rep, ho.get("scores", []), metric, "diff"))
    if metric != "teacher_distance" and any("teacher_distance" in s for s in ho.get("scores", [])):
        out.append("Held-out teacher_distance (the searched metric; same samples and resamples)")
        out.append(_heldout_table(rep, ho["scores"], "teacher_distance", "teacher_distance_diff"))
    if metric == "fid_class":  # class_fid: the objective, then accuracy and pool FID
        obj = rep.best.get("search", {}).get("objective") or {}
        if obj.get("floor") is not None:
            out.append(f"Searched class_fid = {obj['formula']}; accuracy floor "
                       f"{obj['floor']:.4f} ({obj['floor_from']})")
        for col in ("accuracy", "fid"):
            out.append(f"Held-out {col} (same samples and resamples)")
            out.append(_heldout_table(rep, ho["scores"], col, f"{col}_diff"))
    out.append(f"best schedule: {rep.best.get('solver')}, sigmas "
               + json.dumps(rep.best.get("sigmas")))
    ad = rep.best.get("adaptive")
    if ad:
        out.extend(["", *_adaptive_lines(ad)])
    return out


def _heldout_table(rep: RunView, scores: Sequence[Mapping[str, Any]], metric: str,
                   diff: str) -> str:
    """The held-out rows' ``metric`` with its interval and the paired difference ``diff``."""
    lines = []
    for s in scores:
        ci = s.get(f"{metric}_ci")
        dci = s.get(f"{diff}_ci")
        base = s.get("name") == rep.best.get("best_baseline")
        sig = None if base else significant(s, f"{diff}_ci")
        lines.append([
            s.get("name"), s.get("candidate_id"), s.get("status"), s.get(metric),
            None if not ci else f"[{ci[0]:.4g}, {ci[1]:.4g}]", s.get(diff),
            None if not dci else f"[{dci[0]:+.4g}, {dci[1]:+.4g}]",
            None if sig is None else ("yes" if sig else "no (CI contains 0)"),
        ])
    return _table(["schedule", "candidate", "status", metric, "CI", "diff", "diff CI",
                   "significant"], lines)


def _failures(rep: RunView) -> list[str]:
    failed = [r for r in rep.rows if r["status"] != "ok"]
    out = [f"Failures ({len(failed)})"]
    if not failed:
        return [*out, "  (none)"]
    out.append(_table(["candidate", "gen", "origin", "status", "reason"],
                      [[r["candidate_id"], r["generation"], r["origin"], r["status"],
                        (r["error"] or "-").replace("\n", " ")] for r in failed]))
    return out


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
def redraw_plots(run: RunDir, rep: RunView) -> list[str]:
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
    from searchd.plots import draw_plots

    folder = tempfile.mkdtemp(prefix="searchd-report-")
    try:
        names = draw_plots(folder, rep.rows, baseline_values, schedules, rep.metric, title)
        return run.write_files(folder, names, REPORT_DIR)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# Command line --------------------------------------------------------------------------------
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
    """The command; returns its exit status."""
    from searchd import cli
    from searchd.storage import StorageError

    args = build_parser().parse_args(argv)
    return cli.run_command(PROG, lambda: _run(args), bad=(ValueError,),
                           failure=(StorageError,))


def _run(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ValueError(f"--top = {args.top}; it must be >= 1")
    rep = open_run(args.run_dir)
    print(format_report(rep, top=args.top))
    if args.no_plots:
        return 0
    run = rep.run_dir()
    written = redraw_plots(run, rep)
    print("")
    print("plots: " + ", ".join(run.display(p) for p in written))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # the output piped into head, less, ...: not an error
        sys.stderr.close()
        sys.exit(0)
