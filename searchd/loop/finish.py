"""The end of a run: the winner and the baselines re-scored on held-out seeds (a job on one
loaded evaluator), ``best.json``, the plots, and the summary lines.

- ``final_jobs``/``join_final``: the held-out phase as jobs on loaded evaluators (the actors
  of the pool side by side, or the in-process one; the model is not loaded again): each
  worker samples and bootstraps a group of the schedules (``heldout_job``), one more job
  draws the sample grids and scores an adaptive run's predictor (``extras_job``); the
  driver joins them into held-out FIDs with bootstrap CIs and paired differences against
  the best baseline, bitwise those of one evaluator doing it all (``final_scores``).
- ``best_json``: the winner, the baselines, the held-out table and how to use the schedule.
  A held-out difference whose interval crosses 0 is marked ``significant: false``.
- ``summary_lines``: the held-out table as printed at the end of a run; a difference whose
  interval crosses 0 is said to be not significant, never shown as a win.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from searchd.schedule import Schedule
from searchd.storage import REPORT_DIR, RunDir


# The jobs ---------------------------------------------------------------------------------------
def final_scores(
    evaluator: Any,
    schedules: Sequence[Schedule],
    seeds: Sequence[int],
    baseline_index: int,
    ci_level: float,
    grid_seeds: Sequence[int],
    grid_indices: Sequence[int],
    search_seeds: Sequence[int],
    predictor: tuple[dict[str, Any], Schedule] | None = None,
) -> dict[str, Any]:
    """Held-out FID of each schedule with a bootstrap CI and its paired difference against
    ``schedules[baseline_index]`` (same resampled sample indices for both), and sample images
    [B, C, H, W] of ``schedules[grid_indices]``, on one loaded evaluator (the finish stage
    spreads the same jobs over the pool: ``final_jobs``, ``join_final``).

    ``predictor``: ``(predictor_blob, its global schedule)`` of an adaptive run: both are
    scored on the same held-out seeds too (``"adaptive"``: ``predictor_final``'s result, or
    ``{"error": ...}`` if that failed; the other scores are kept either way)."""
    jobs = final_jobs(schedules, seeds, ci_level, grid_seeds, grid_indices, search_seeds,
                      predictor, workers=1)
    return join_final([fn(evaluator, *args) for fn, args in jobs], seeds, baseline_index,
                      ci_level)


def heldout_job(evaluator: Any, schedules: Sequence[Schedule], seeds: Sequence[int]
                ) -> list[dict[str, Any]]:
    """One worker's share of the held-out phase: sampling, features and bootstrap of its
    schedules (``heldout.heldout_part``)."""
    from searchd.evaluation.heldout import heldout_part

    return heldout_part(evaluator, list(schedules), list(seeds))


def extras_job(evaluator: Any, schedules: Sequence[Schedule], seeds: Sequence[int],
               ci_level: float, grid_seeds: Sequence[int], grid_indices: Sequence[int],
               predictor: tuple[dict[str, Any], Schedule] | None) -> dict[str, Any]:
    """The rest of the finish's work on a loaded evaluator: the sample grids' images and an
    adaptive run's predictor scored against its global schedule."""
    adaptive: dict[str, Any] | None = None
    if predictor is not None:
        from searchd.adaptive.product import predictor_final

        try:
            adaptive = predictor_final(evaluator, predictor[0], predictor[1], list(seeds),
                                       ci_level)
        except Exception as e:  # a broken predictor never loses the run's other results
            adaptive = {"error": f"{type(e).__name__}: {e}"}
    images = {}
    if len(grid_seeds):
        import torch  # here: the report imports this module and needs no torch

        for i in grid_indices:
            x = evaluator.generate(schedules[i], list(grid_seeds))
            if evaluator.decode is not None:  # latent models: the decoded images
                with torch.no_grad():
                    x = evaluator.decode(x)
            images[i] = np.asarray(x.detach().cpu(), np.float32)
    return {"images": images, "adaptive": adaptive}


def final_jobs(
    schedules: Sequence[Schedule],
    seeds: Sequence[int],
    ci_level: float,
    grid_seeds: Sequence[int],
    grid_indices: Sequence[int],
    search_seeds: Sequence[int],
    predictor: tuple[dict[str, Any], Schedule] | None,
    workers: int,
) -> list[tuple[Any, tuple[Any, ...]]]:
    """The finish's jobs for ``workers`` evaluators side by side: the schedules in
    ``min(len, workers)`` balanced contiguous groups (``heldout_job`` each), then
    ``extras_job``. Held-out seeds that meet the search's are refused here, before any
    work (``ValueError``)."""
    from searchd.evaluation.heldout import check_disjoint

    seeds = [int(s) for s in seeds]
    check_disjoint(seeds, search_seeds)
    k = max(1, min(len(schedules), int(workers)))
    q, r = divmod(len(schedules), k)
    jobs: list[tuple[Any, tuple[Any, ...]]] = []
    start = 0
    for i in range(k):
        stop = start + q + (1 if i < r else 0)
        jobs.append((heldout_job, (list(schedules[start:stop]), seeds)))
        start = stop
    jobs.append((extras_job, (list(schedules), seeds, ci_level, list(grid_seeds),
                              list(grid_indices), predictor)))
    return jobs


def join_final(outputs: Sequence[Any], seeds: Sequence[int], baseline_index: int,
               ci_level: float) -> dict[str, Any]:
    """``final_scores``' result from the outputs of ``final_jobs`` (in their order): the
    held-out table (``heldout.combine_parts``: bitwise that of one evaluator), the images
    and the adaptive score."""
    from searchd.evaluation.heldout import combine_parts

    parts = [p for out in outputs[:-1] for p in out]
    held = combine_parts(parts, seeds, baseline_index=baseline_index, level=ci_level)
    extras = outputs[-1]
    return {"heldout": held, "images": extras["images"], "adaptive": extras["adaptive"]}


def significant(score: Mapping[str, Any], key: str = "diff_ci") -> bool | None:
    """Whether a held-out difference is significant: its interval (``score[key]``) excludes
    0 (None: no difference, e.g. the baseline itself or a failed schedule)."""
    ci = score.get(key)
    if ci is None:
        return None
    lo, hi = ci
    return bool(lo > 0 or hi < 0)


# best.json ---------------------------------------------------------------------------------------
def best_json(
    *,
    run_id: str,
    model: str,
    cfg: Any,
    winner: Schedule,
    winner_result: Any,
    baselines: Sequence[Schedule],
    baseline_values: Mapping[str, float | None],
    best_base: int,
    held: dict[str, Any],
    evaluations: int,
    anchor_results: Sequence[Mapping[str, Any]],
    zoo: Mapping[str, Any] | None,
    space: Any,
    sigma_grid: Sequence[float] | None,
) -> dict[str, Any]:
    """``best.json``: the winner and how to use it, the search value, the anchors, the
    held-out table (each difference marked ``significant``) and the baselines."""
    metric = cfg.metric.name
    sig = [float(x) for x in winner.sigmas]
    held.setdefault("metric", "fid")  # the table's metric (its rows: <metric>, <metric>_ci)
    for i, score in enumerate(held["scores"]):  # the baseline itself: no difference
        score["significant"] = None if i == 1 + best_base else significant(score)
        if "teacher_distance_diff_ci" in score:  # a FID table's rows carry the teacher's too
            score["teacher_distance_significant"] = (
                None if i == 1 + best_base else significant(score, "teacher_distance_diff_ci"))
        for col in ("fid", "accuracy"):  # class_fid: the pool FID and accuracy columns
            if f"{col}_diff_ci" in score:
                score[f"{col}_significant"] = (
                    None if i == 1 + best_base else significant(score, f"{col}_diff_ci"))
    out: dict[str, Any] = {
        "run_id": run_id,
        "model": model,
        "solver": winner.solver,
        "solver_options": dict(cfg.solver.options),
        "n_steps": winner.n_steps,
        "nfe": int(winner_result.nfe),
        "schedule": winner.to_dict(),
        "sigmas": sig,
        "search": {
            "metric": metric,
            "features": cfg.metric.features,
            "value": winner_result.value(metric),
            "n_samples": int(winner_result.n_samples),
            "seed_base": int(winner_result.seed_base),
            "algorithm": cfg.search.algorithm,
            "evaluations": evaluations,
            "warm_start": list(cfg.search.evolution.warm_start)
            if cfg.search.algorithm == "evolution" else [],
        },
        "anchors": {
            r["name"]: {
                "sigmas": [float(x) for x in r["schedule"]["sigmas"]],
                "denoiser_calls": r["denoiser_calls"],
                "wall_s": r["wall_s"],
                "params": r["schedule"].get("meta", {}).get("params"),
            }
            for r in anchor_results
        },
        "heldout": held,
        "baselines": {
            name_of(b): {
                "family": b.meta.get("family"),
                "sigmas": [float(x) for x in b.sigmas],
                "search_value": baseline_values.get(name_of(b)),
            }
            for b in baselines
        },
        "best_baseline": name_of(baselines[best_base]),
    }
    if winner.strategy is not None:
        out["strategy"] = list(winner.strategy)  # the solver's variant per step
    if winner.guidance is not None:
        # The weights per step, and the network passes they cost (a step at w != 1 makes
        # the unconditional call too): searchd.sample runs them, export says where they go.
        from searchd.solvers import network_calls

        out["guidance"] = [float(w) for w in winner.guidance]
        out["network_calls"] = network_calls(winner.solver, winner.n_steps,
                                             winner.final_zero, winner.guidance)
        for b in baselines:
            if b.guidance is not None:
                out["baselines"][name_of(b)]["guidance"] = [float(w) for w in b.guidance]
    if zoo is not None:
        out["model_ids"] = [int(m) for m in winner.model_ids]
        out["zoo"] = {
            "members": list(zoo["members"]),
            "latency_ms": list(zoo["latency_ms"]),
            "budget_ms": float(space.budget_ms),
            "winner_ms": float(space.latency(winner)),
            "winner_models": [zoo["members"][m] for m in winner.model_ids],
        }
    if sigma_grid is not None:
        g = np.asarray(sigma_grid)
        out["timesteps"] = [int(np.argmin(np.abs(np.log(g) - np.log(x)))) for x in sig if x > 0]
    # How to use the schedule elsewhere (diffusers, k-diffusion, ComfyUI, searchd): one place.
    from searchd.export import model_levels, usage_section

    out["usage"] = usage_section(winner, cfg.solver.options,
                                 flow=model_levels(cfg.model) == "flow", sigma_grid=sigma_grid)
    return out


def name_of(schedule: Schedule) -> str:
    """A baseline's name (its ``meta["name"]``, else its id)."""
    return str(schedule.meta.get("name", schedule.id))


# Summary --------------------------------------------------------------------------------------
def summary_lines(best: Mapping[str, Any]) -> list[str]:
    """The held-out table of a run's ``best.json``, as printed when the run ends."""
    held = best["heldout"]
    metric = held.get("metric", "fid")  # runs written before the key: FID
    level = int(round(100 * held["level"]))
    out = [f"searchd: held-out {metric} on {held['n_samples']} samples (seeds from "
           f"{held['seed_base']}), {level}% bootstrap CIs; differences are paired against "
           f"{best['best_baseline']}:"]
    out.extend(_score_lines(held["scores"], metric, "diff", best["best_baseline"]))
    if metric != "teacher_distance" and any("teacher_distance" in sc for sc in held["scores"]):
        out.append("searchd: held-out teacher_distance (the searched metric), same samples and "
                   "resamples:")
        out.extend(_score_lines(held["scores"], "teacher_distance", "teacher_distance_diff",
                                best["best_baseline"]))
    if metric == "fid_class":  # class_fid: the accuracy floor and the other columns
        obj = best["search"].get("objective") or {}
        if obj.get("floor") is not None:
            out.append(f"searchd: searched {obj['metric']} = {obj['formula']}, accuracy floor "
                       f"{obj['floor']:.4f} ({obj['floor_from']})")
        for col, what in (("accuracy", "classifier accuracy on the requested class"),
                          ("fid", "FID of the class-balanced pool")):
            out.append(f"searchd: held-out {col} ({what}), same samples and resamples:")
            out.extend(_score_lines(held["scores"], col, f"{col}_diff",
                                    best["best_baseline"]))
    ad = best.get("adaptive")
    if ad is not None:
        out.extend(adaptive_lines(ad))
    return out


def _score_lines(scores: Sequence[Mapping[str, Any]], metric: str, diff: str,
                 best_baseline: str) -> list[str]:
    """One line per held-out row: ``row[metric]`` and its interval, and the paired difference
    ``row[diff]`` (said to be not significant when its interval contains 0)."""
    out = []
    for sc in scores:
        if sc["status"] != "ok":
            out.append(f"  {sc['name']:<26} failed: {sc['error']}")
            continue
        lo, hi = sc[f"{metric}_ci"]
        line = f"  {sc['name']:<26} {sc[metric]:.4f} [{lo:.4f}, {hi:.4f}]"
        if sc.get(f"{diff}_ci") is not None and sc["name"] != best_baseline:
            dlo, dhi = sc[f"{diff}_ci"]
            line += f"   diff {sc[diff]:+.4f} [{dlo:+.4f}, {dhi:+.4f}]"
            if not significant(sc, f"{diff}_ci"):
                line += " not significant (the interval contains 0)"
        out.append(line)
    return out


def adaptive_lines(ad: Mapping[str, Any]) -> list[str]:
    """An adaptive run's predictor against its global schedule, as printed at the end."""
    if ad["status"] != "ok":
        return [f"searchd: adaptive predictor failed: {ad.get('error')}"]
    h = ad["heldout"]
    g, p = h["global"], h["predictor"]
    out = [f"searchd: adaptive {ad['kind']} predictor vs its global schedule "
           f"({ad['global_schedule']['source']}), same held-out seeds:",
           f"  {'global schedule':<26} {g['fid']:.4f} "
           f"[{g['fid_ci'][0]:.4f}, {g['fid_ci'][1]:.4f}]"]
    if p["fid"] is None:
        return [*out, f"  {'predictor':<26} failed"]
    dlo, dhi = h["diff_ci"]
    line = (f"  {'predictor':<26} {p['fid']:.4f} [{p['fid_ci'][0]:.4f}, "
            f"{p['fid_ci'][1]:.4f}]   diff {h['diff']:+.4f} [{dlo:+.4f}, {dhi:+.4f}]")
    if dlo <= 0 <= dhi:
        line += "   not significant (the interval contains 0)"
    else:
        line += f"   ({100 * h['gain']:+.1f}% gain)"
    return [*out, line]


# Plots ------------------------------------------------------------------------------------------
def write_plots(run: RunDir, winner: Schedule, baselines: Sequence[Schedule], best_base: int,
                rows: Sequence[Mapping[str, Any]], baseline_values: Mapping[str, float],
                images: Mapping[int, Any], metric: str, nfe: int) -> list[str]:
    """The run's plots (metric per generation, schedules, sample grids) into ``report/``:
    drawn in a scratch directory and copied in atomically (also to ``s3://``)."""
    plots = SearchPlots(winner, baselines, lambda: rows, baseline_values, metric, nfe,
                        background=False)
    return plots.finish(run, images, best_base)


class SearchPlots:
    """The run's plots, the search's drawn first (``background``: in a thread, while the
    evaluators do the held-out phase and the driver only waits), the sample grids and the
    copy into ``report/`` at ``finish`` (once the grids' images are there).

    ``rows``: a callable returning the search's scored rows (read in the thread too).
    ``finish`` re-raises an error of the drawing; ``discard`` drops the scratch directory
    of plots that will not be written (the held-out phase failed)."""

    def __init__(self, winner: Schedule, baselines: Sequence[Schedule],
                 rows: Callable[[], Sequence[Mapping[str, Any]]],
                 baseline_values: Mapping[str, float | None], metric: str, nfe: int, *,
                 background: bool = True) -> None:
        self.folder = tempfile.mkdtemp(prefix="searchd-report-")
        self.error: BaseException | None = None
        named = {"searched (best)": winner.sigmas}
        for b in baselines:
            named[name_of(b)] = b.sigmas
        values = {k: (math.inf if v is None else v) for k, v in baseline_values.items()}
        title = f"best schedule vs baselines ({winner.solver}, NFE {nfe})"
        args = (rows, values, named, metric, title)
        self.thread: threading.Thread | None = None
        if background:
            self.thread = threading.Thread(target=self._draw, args=args,
                                           name="searchd-plots", daemon=True)
            self.thread.start()
        else:
            self._draw(*args)

    def _draw(self, rows: Callable[[], Sequence[Mapping[str, Any]]], values: dict[str, float],
              named: dict[str, Any], metric: str, title: str) -> None:
        from searchd.plots import draw_plots

        try:
            draw_plots(self.folder, rows(), values, named, metric, title)
        except BaseException as e:  # re-raised by finish, in the driver's thread
            self.error = e

    def finish(self, run: RunDir, images: Mapping[int, Any], best_base: int) -> list[str]:
        """Wait for the search's plots, draw the sample grids, copy all into ``report/``."""
        from searchd.plots import save_image_grid

        try:
            if self.thread is not None:
                self.thread.join()
            if self.error is not None:
                raise self.error
            labels = {0: "best", 1 + best_base: "best_baseline"}
            for i, x in images.items():
                save_image_grid(x, os.path.join(self.folder, f"samples_{labels[i]}.png"))
            return run.write_files(self.folder, sorted(os.listdir(self.folder)), REPORT_DIR)
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the scratch directory (after ``finish``, or instead of it); waits for the
        drawing thread first."""
        if self.thread is not None:
            self.thread.join()
        shutil.rmtree(self.folder, ignore_errors=True)
