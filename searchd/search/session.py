"""One search session: everything between a validated configuration and ``best.json``."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from searchd import faults
from searchd.config import SearchConfig
from searchd.schedule import Schedule
from searchd.search import build
from searchd.search.driver import (
    Progress,
    evaluation_row,
    format_duration,
    new_run_id,
    scratch_dir,
    setup_logging,
)

logger = logging.getLogger("searchd")


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded (reported on one line)."""

EXIT_INTERRUPTED = 130


class SearchSession:
    """Runs (or resumes) the search a configuration describes.

    Args:
        cfg: the validated configuration.
        resume: continue the run stored in ``cfg.run_dir``.
        address: Ray address; None: ``$RAY_ADDRESS``, else a local Ray.
        quiet: no live progress display.
    """

    def __init__(
        self, cfg: SearchConfig, *, resume: bool = False, address: str | None = None,
        quiet: bool = False, force: bool = False,
    ) -> None:
        self.cfg = cfg
        self.force = force
        self.resume = resume
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.quiet = quiet or not cfg.report.progress
        self.metric = cfg.metric.name
        self.started_ray = False
        self.first_state_index = 0  # number of the first searcher state this session writes
        self.known: dict[str, Any] = {}

    # The whole run ------------------------------------------------------------------------
    def run(self) -> int:
        from searchd.storage import RunDir, RunLock, StorageError

        cfg = self.cfg
        t0 = time.monotonic()
        self.run_dir = RunDir(cfg.run_dir)
        try:
            # The lock stays out of ``self``: Tune pickles the session with its callback.
            with RunLock(self.run_dir, force=self.force) as lock:
                return self._run_locked(t0, lock)
        except (StorageError, ModelLoadError) as e:
            print(f"searchd.search: error: {e}", file=sys.stderr)
            return 1
        finally:
            self._shutdown()

    def _run_locked(self, t0: float, lock: Any) -> int:
        cfg, run = self.cfg, self.run_dir
        log_path = run.local_path("log.txt")
        setup_logging(log_path)
        if lock.taken_over is not None:
            logger.info("took over the stale lock of %s", lock.taken_over.describe())
        if lock.removed_temps:
            logger.info("removed %d temporary file(s) of interrupted writes: %s",
                        len(lock.removed_temps), ", ".join(lock.removed_temps))
        if self.resume:
            state = json.loads(run.read_text("run.json"))
            self.run_id = state["run_id"]
            logger.info("resuming run %s in %s", self.run_id, cfg.run_dir)
        else:
            self.run_id = new_run_id()
            run.write_text("config.yaml", cfg.to_yaml())
            run.write_text("run.json", json.dumps({"run_id": self.run_id}))
        self._say(f"searchd: run {self.run_id} -> {cfg.run_dir}")

        self._start_ray()
        self.model = self._describe_model()
        self.reference = self._reference()
        self._start_pool()
        self.zoo = self._zoo_latency()

        from searchd.search.registry import make_baselines, make_searcher, make_space

        self.space = make_space(cfg, self.model["sigma_min"], self.model["sigma_max"],
                                self.model["sigma_grid"], zoo=self.zoo)
        self.anchors = self._anchors()
        self.baselines = make_baselines(cfg, self.space, self.anchors)
        self.searcher = make_searcher(cfg.search, self.space, self.baselines, self.metric,
                                      cfg.mode, self.anchors)
        self.known = self._restore() if self.resume else {}
        finished = self._search()
        if finished and cfg.search.algorithm == "adaptive":
            self._train_predictor()
        if not finished:
            self._say(
                f"searchd: search interrupted; {self.n_rows} evaluations are stored. "
                f"Resume with: python -m searchd.search --resume {cfg.run_dir}"
            )
            return EXIT_INTERRUPTED
        best = self._finish()
        self._say(f"searchd: done in {format_duration(time.monotonic() - t0)}; "
                  f"{best} written")
        return 0

    # Setup --------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        logger.info(text)
        print(text, flush=True)

    def _start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.address:
            ray.init(address=self.address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        self.started_ray = True

    def _shutdown(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown()
        if self.started_ray:
            import ray

            ray.shutdown()

    def _worker_options(self) -> dict[str, Any]:
        w = self.cfg.workers
        return {"num_cpus": w.cpus_per_worker, "num_gpus": w.num_gpus_per_worker}

    def _describe_model(self) -> dict[str, Any]:
        import ray

        task = ray.remote(build.describe_model).options(**self._worker_options())
        try:
            info = ray.get(task.remote(self.cfg.resolve()))
        except ray.exceptions.RayTaskError as e:
            # A checkpoint that cannot be loaded (a missing file, NVlabs' code not importable,
            # a bad option): one line, not a remote traceback.
            cause = getattr(e, "cause", None)
            if isinstance(cause, (ValueError, ImportError, OSError, TypeError, KeyError,
                                  pickle.UnpicklingError)):
                raise ModelLoadError(
                    f"cannot load the model ({build.model_label(self.cfg)}): "
                    f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
                ) from None
            raise
        logger.info("model: %s", info)
        return info

    def _reference(self) -> dict[str, Any] | None:
        cfg, run = self.cfg, self.run_dir
        from searchd.evaluation.reference import ReferenceStats

        n = cfg.metric.exact_reference
        if n is not None:
            if run.exists("reference.npz"):
                return ReferenceStats.from_bytes(run.read_bytes("reference.npz")).to_dict()
            import ray

            self._say(f"searchd: reference statistics from {n} exact samples ...")
            task = ray.remote(build.exact_reference_stats).options(**self._worker_options())
            ref = ray.get(task.remote(cfg.resolve(), n, cfg.samples.reference_seed_base))
            run.write_bytes("reference.npz", ReferenceStats.from_dict(ref).to_bytes())
            return ref
        if cfg.metric.reference is None:
            return None
        return ReferenceStats.load(cfg.metric.reference).to_dict()

    def _stored_zoo(self) -> dict[str, Any] | None:
        if self.cfg.model.zoo is None or not self.resume:
            return None
        return json.loads(self.run_dir.read_text("run.json")).get("zoo")

    def _zoo_latency(self) -> dict[str, Any] | None:
        """A zoo's member latencies: measured by every actor at start-up (median across
        actors), recorded in run.json; a resume reuses the recorded ones, so its space (and
        budget repairs) are those of the interrupted run."""
        if self.cfg.model.zoo is None:
            return None
        stored = self._stored_zoo()
        if stored is not None:
            return stored
        import ray

        reports = ray.get([a.call.remote(build.zoo_latency) for a in self.pool.actors])
        lat = [float(np.median([r["latency_ms"][i] for r in reports]))
               for i in range(len(reports[0]["latency_ms"]))]
        zoo = {"members": list(reports[0]["members"]), "latency_ms": lat,
               "per_worker": [{**r, "worker": w["worker"], "node": w["node"]}
                              for r, w in zip(reports, self.pool.workers)]}
        self.factory.latency_ms = lat  # the held-out worker reuses them
        state = json.loads(self.run_dir.read_text("run.json"))
        state["zoo"] = zoo
        self.run_dir.write_text("run.json", json.dumps(state))
        self._say("searchd: zoo latency (ms per sample per call, median of "
                  f"{len(reports)} actor(s)): " + ", ".join(
                      f"{n} {v:.4g}" for n, v in zip(zoo["members"], lat)))
        return zoo

    def _start_pool(self) -> None:
        from searchd.distributed import EvaluatorPool

        w = self.cfg.workers
        stored = self._stored_zoo()
        factory = build.EvaluatorFactory(
            self.cfg.resolve(), self.reference,
            latency_ms=None if stored is None else list(stored["latency_ms"]),
        )
        self.factory = factory
        self._say("searchd: starting evaluator actors ...")
        self.pool = EvaluatorPool(
            factory, num_workers=w.num_workers, num_gpus_per_worker=w.num_gpus_per_worker,
            cpus_per_worker=w.cpus_per_worker,
        )
        nodes = sorted({i["node"] for i in self.pool.workers})
        self._say(f"searchd: {len(self.pool)} evaluator actor(s) ready on {', '.join(nodes)}")

    # Anchors (GITS, LD3) --------------------------------------------------------------------
    def _anchors(self) -> dict[str, Schedule]:
        """The GITS/LD3 schedules this run needs (algorithm, baselines, warm start), computed
        on the evaluator actors, one job per actor at once, and stored in anchors.json; a
        resumed run reads them back so that it continues with the very same schedules."""
        from searchd.search.anchors import anchor_job, anchors_from_results

        names = self.cfg.anchors
        self.anchor_results: list[dict[str, Any]] = []
        if not names:
            return {}
        run = self.run_dir
        if self.resume and run.exists("anchors.json"):
            results = json.loads(run.read_text("anchors.json"))["anchors"]
        else:
            self._say(f"searchd: computing {' and '.join(names)} on the evaluator actors ...")
            results = self._run_jobs([anchor_job(self.cfg, self.space, n) for n in names])
            run.write_text("anchors.json", json.dumps({"anchors": results}, indent=1) + "\n")
        for r in results:
            sig = ", ".join(f"{x:.4g}" for x in r["schedule"]["sigmas"])
            self._say(f"searchd: {r['name']}: [{sig}] ({r['denoiser_calls']} denoiser calls, "
                      f"{format_duration(r['wall_s'])})")
        self.anchor_results = list(results)
        return anchors_from_results(results, self.space)

    def _run_jobs(self, jobs: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """``compute_anchor(evaluator, *job)`` for each job, spread over the actors; a job
        whose actor died is re-sent through the pool (which waits for a live actor)."""
        import ray
        from ray.exceptions import RayActorError

        from searchd.search.anchors import compute_anchor

        actors = self.pool.actors
        refs = [actors[i % len(actors)].call.remote(compute_anchor, *job)
                for i, job in enumerate(jobs)]
        out = []
        for ref, job in zip(refs, jobs):
            try:
                out.append(ray.get(ref))
            except RayActorError:
                out.append(self.pool.call(compute_anchor, *job))
        return out

    # Resume ---------------------------------------------------------------------------------
    def _restore(self) -> dict[str, Any]:
        """Restore the searcher from its last state file plus the evaluations after it;
        return the stored results by candidate id so nothing is scored twice."""
        from searchd.storage import table_to_rows as rows_from_table

        run = self.run_dir
        rows = rows_from_table(run.read_evaluations())
        known = {r["candidate_id"]: r for r in rows}
        last = run.latest_searcher_state()
        if last is not None:
            gen, state = last
            self.searcher.set_state(state)
            logger.info("searcher restored from state-%06d.json", gen)
            # State files continue after the newest one: a resumed run never overwrites a
            # state of the run it continues (a second interruption resumes from the newest).
            self.first_state_index = max(run.searcher_state_generations()) + 1
        self.searcher.requeue_pending()
        self._say(f"searchd: resuming with {len(known)} stored evaluations")
        return known

    # Search ---------------------------------------------------------------------------------
    def _search(self) -> bool:
        from searchd.search.runner import run_tune_search

        cfg = self.cfg
        ev = cfg.search.evolution
        per_trial = cfg.search.candidates_per_trial or (
            ev.population_num if cfg.search.algorithm == "evolution" else 16
        )
        total = cfg.search.budget or (ev.population_num * ev.generations
                                      if cfg.search.algorithm == "evolution" else None)
        if cfg.search.algorithm in ("gits", "ld3", "adaptive"):
            total = 1 + len(self.baselines)  # the computed schedule and the baselines
        gens = ev.generations if cfg.search.algorithm == "evolution" else None
        self.progress = Progress(gens, total, self.metric, enabled=not self.quiet)
        self.baseline_values = self._stored_baseline_values()
        self.n_rows = 0
        self.batch_index = self.first_state_index
        self.n_trials = 0  # trials whose results reached this session
        self._arm_mid_generation_fault()
        base = cfg.samples.seed_base
        seeds = list(range(base, base + cfg.samples.per_candidate))
        tune_dir = scratch_dir("searchd-tune-")
        try:
            outcome = run_tune_search(
                self.searcher, self.space.decode, self.pool.client(), seeds,
                metric=self.metric, mode=cfg.mode, batch_size=per_trial,
                on_results=self._on_results, storage_path=tune_dir,
                name=f"searchd-{self.run_id}", known=self.known,
            )
        finally:
            shutil.rmtree(tune_dir, ignore_errors=True)
        return bool(outcome.finished)

    # Adaptive: the predictor ------------------------------------------------------------------
    def _train_predictor(self) -> None:
        """Train the predictor of an adaptive run on an actor and store its files in
        ``predictor/``; a resumed run that has them reads them back. A failed training is
        logged and reported in best.json; the search's results are kept."""
        from searchd.adaptive.run import (
            compute_predictor,
            predictor_params,
            read_predictor,
            train_seeds,
            write_predictor,
        )

        cfg, run = self.cfg, self.run_dir
        self.global_schedule = self.searcher.schedule
        self.predictor: dict[str, Any] | None = None
        self.predictor_error: str | None = None
        stored = read_predictor(run) if self.resume else None
        if stored is not None:
            blob, info = stored
            self.predictor = {"blob": blob, "info": info, "training": info["meta"]}
            self._say("searchd: predictor read back from predictor/predictor.pt")
            return
        a = cfg.search.adaptive
        seeds = train_seeds(cfg)
        self._say(f"searchd: training the {a.kind} predictor on {len(seeds)} noises "
                  f"(oracle schedules, {a.oracle_iters} steps each) ...")
        try:
            out = self.pool.call(compute_predictor, self.global_schedule.to_dict(), seeds,
                                 predictor_params(cfg, self.space))
        except Exception as e:  # the search's results stay; best.json reports the failure
            self.predictor_error = f"{type(e).__name__}: {e}"
            logger.error("training the predictor failed: %s", self.predictor_error)
            return
        rec = out["record"]
        training = {
            "n_train": rec["n_train"], "first_seed": rec["first_seed"],
            "denoiser_calls": out["denoiser_calls"], "wall_s": out["wall_s"],
            "oracle_loss": rec["oracle_loss"], "global_loss": rec["global_loss"],
            "solver": rec["solver"], "teacher": rec["teacher"],
            "global_sigmas": [float(x) for x in self.global_schedule.sigmas],
            "global_source": a.global_schedule, "run_id": self.run_id,
        }
        info = write_predictor(run, out["blob"], training)
        self.predictor = {"blob": out["blob"], "info": info, "training": training}
        self._say(f"searchd: predictor trained ({out['denoiser_calls']} denoiser calls, "
                  f"{format_duration(out['wall_s'])}; oracle loss {rec['oracle_loss']:.4g} "
                  f"vs global {rec['global_loss']:.4g} on its noises) -> "
                  f"{run.display('predictor/predictor.ts')}")

    def _stored_baseline_values(self) -> dict[str, float]:
        """Search values of the baselines stored by the run this session resumes (a resumed
        search may never see generation 0 again)."""
        names = {b.id: str(b.meta.get("name", b.id)) for b in self.baselines}
        out: dict[str, float] = {}
        for cid, row in self.known.items():
            if cid in names and row.get("origin") == "baseline":
                v = row.get("value")
                out[names[cid]] = float(v) if row.get("status") == "ok" and v is not None \
                    else math.inf
        return out

    # Fault injection (searchd/faults.py) -----------------------------------------------------
    def _actor_calls(self) -> int:
        """Evaluator calls started so far, over all actors."""
        return sum(int(st["calls"]) for st in self.pool.stats())

    def _arm_mid_generation_fault(self) -> None:
        """``SEARCHD_FAULT=mid_generation:n``: a thread that SIGKILLs this process as soon as
        an actor starts scoring the n-th trial of this session (before its rows are stored)."""
        self._mid_generation_fault = faults.armed("mid_generation")
        self._fault_calls: int | None = None
        n = self._mid_generation_fault
        if n is None:
            return
        if n == 1:
            self._fault_calls = self._actor_calls()

        def watch() -> None:
            while getattr(self, "pool", None) is not None:  # ends with the actor pool
                time.sleep(0.01)
                if self.n_trials == n - 1 and self._fault_calls is not None:
                    if self._actor_calls() > self._fault_calls:
                        faults.kill("mid_generation", n, "an evaluator actor is scoring "
                                    f"trial {n} of this session; none of its rows stored")

        threading.Thread(target=watch, name="searchd-fault-watch", daemon=True).start()

    def _on_results(self, trial_id: str, schedules: Sequence[Schedule], results: Sequence[Any],
                    ) -> None:
        """Append a trial's evaluations to Parquet (durable before the searcher learns of
        them), save the searcher state, and update the progress display."""
        if self._mid_generation_fault == self.n_trials + 1:
            # SEARCHD_FAULT=mid_generation:n: the results came before the watcher saw the
            # scoring start; die here, before any of them is stored.
            faults.kill("mid_generation", self._mid_generation_fault,
                        "the trial's results reached the driver before the actors' counters "
                        "showed its scoring; none of them stored")
        gen = max((int(s.meta.get("generation", self.batch_index)) for s in schedules),
                  default=self.batch_index)
        rows = []
        for s, r in zip(schedules, results):
            if s.id in self.known:
                continue  # stored by the interrupted run; not written twice
            rows.append(evaluation_row(self.run_id, s, r, metric=self.metric,
                                       trial_id=trial_id, generation=gen))
        if rows:
            self.run_dir.append_evaluations(rows)
            self.n_rows += len(rows)
        # The searcher has not learned this trial's results yet: its state holds them as
        # pending, and a resume replays them from the rows just written.
        self.run_dir.save_searcher_state(self.batch_index, self.searcher.get_state())
        self.n_trials += 1
        faults.hit("after_generation")  # SEARCHD_FAULT=after_generation[:n] (faults.py)
        if self._mid_generation_fault == self.n_trials + 1:
            self._fault_calls = self._actor_calls()  # the next trial's scoring not started
        for s, r in zip(schedules, results):
            if s.meta.get("origin") == "baseline":
                res = r.result if hasattr(r, "result") else r
                v = res.metrics.get(self.metric, math.inf) if res.status == "ok" else math.inf
                self.baseline_values[str(s.meta.get("name", s.id))] = float(v)
        values = []
        for r in results:
            res = r.result if hasattr(r, "result") else r
            values.append(res.metrics.get(self.metric) if res.status == "ok" else None)
        n_samples = sum(int((r.result if hasattr(r, "result") else r).n_samples)
                        for r in results)
        self.progress.update(gen, values, n_samples, self.baseline_values)
        self.batch_index += 1
        self._grow_pool()

    def _grow_pool(self) -> None:
        """Between trials: start actors for capacity that joined (GPU nodes the autoscaler
        added) and admit those that have loaded; never waits, never stops the search."""
        try:
            added = self.pool.refresh(wait=False)
        except Exception as e:  # an actor that died while loading: the others serve
            logger.warning("evaluator pool refresh failed: %s: %s", type(e).__name__, e)
            return
        if added:
            nodes = sorted({i["node"] for i in self.pool.workers})
            self._say(f"searchd: evaluator pool grew to {len(self.pool)} actor(s) on "
                      f"{', '.join(nodes)}")

    # Finish ---------------------------------------------------------------------------------
    def _finish(self) -> str:
        """Held-out re-scoring of the winner and the baselines, best.json and the plots."""
        from searchd.storage import table_to_rows as rows_from_table

        cfg = self.cfg
        rows = [r for r in rows_from_table(self.run_dir.read_evaluations())
                if r["status"] == "ok" and r["value"] is not None]
        if not rows:
            raise RuntimeError("no candidate was scored successfully; see the log")
        best_row = min(rows, key=lambda r: (r["value"], r["candidate_id"]))
        winner = Schedule(np.asarray(best_row["sigmas"]), best_row.get("model_ids"),
                          solver=best_row["solver"], meta={"origin": best_row["origin"]})
        base_rows = {r["candidate_id"]: r for r in rows if r["origin"] == "baseline"}
        baselines = [b for b in self.baselines if b.id in base_rows] or list(self.baselines)
        best_base = min(
            range(len(baselines)),
            key=lambda i: base_rows.get(baselines[i].id, {"value": math.inf})["value"],
        )
        schedules = [winner, *baselines]
        s = cfg.samples
        heldout_seeds = list(range(s.heldout_seed_base, s.heldout_seed_base + s.heldout))
        n_grid = cfg.report.grid_samples if cfg.report.plots else 0
        grid_seeds = heldout_seeds[:n_grid]
        self._say(f"searchd: re-scoring the winner and {len(baselines)} baselines on "
                  f"{s.heldout} held-out seeds ...")
        # The actors hold the workers' resources; the last job runs in one fresh worker.
        self.pool.shutdown()
        self.pool = None
        import ray

        task = ray.remote(build.final_scores).options(**self._worker_options())
        search_seeds = range(s.seed_base, s.seed_base + s.per_candidate)
        predictor = getattr(self, "predictor", None)
        final = ray.get(task.remote(
            self.factory, schedules, heldout_seeds, 1 + best_base, cfg.report.ci_level,
            grid_seeds, [0, 1 + best_base], list(search_seeds),
            None if predictor is None else (predictor["blob"], self.global_schedule),
        ))
        held = final["heldout"]
        names = ["searched"] + [str(b.meta.get("name", b.id)) for b in baselines]
        for name, score in zip(names, held["scores"]):
            score["name"] = name
        best = self._best_json(winner, best_row, baselines, base_rows, best_base, held)
        if cfg.search.algorithm == "adaptive":
            best["adaptive"] = self._adaptive_json(final.get("adaptive"))
        self.run_dir.write_text("best.json", json.dumps(best, indent=2) + "\n")
        if cfg.report.plots:
            self._plots(winner, baselines, best_base, rows, final["images"])
        self._print_summary(best)
        return self.run_dir.display("best.json")

    def _best_json(self, winner: Schedule, best_row: dict[str, Any],
                   baselines: Sequence[Schedule], base_rows: dict[str, Any], best_base: int,
                   held: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        sig = [float(x) for x in winner.sigmas]
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "model": build.model_label(cfg),
            "solver": winner.solver,
            "solver_options": dict(cfg.solver.options),
            "n_steps": winner.n_steps,
            "nfe": int(best_row["nfe"]),
            "schedule": winner.to_dict(),
            "sigmas": sig,
            "search": {
                "metric": self.metric,
                "features": cfg.metric.features,
                "value": best_row["value"],
                "n_samples": best_row["n_samples"],
                "seed_base": best_row["seed_base"],
                "algorithm": cfg.search.algorithm,
                "evaluations": self.n_rows + len(self.known),
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
                for r in self.anchor_results
            },
            "heldout": held,
            "baselines": {
                str(b.meta.get("name", b.id)): {
                    "family": b.meta.get("family"),
                    "sigmas": [float(x) for x in b.sigmas],
                    "search_value": base_rows.get(b.id, {}).get("value"),
                }
                for b in baselines
            },
            "best_baseline": str(baselines[best_base].meta.get("name")),
        }
        if self.zoo is not None:
            out["model_ids"] = [int(m) for m in winner.model_ids]
            out["zoo"] = {
                "members": list(self.zoo["members"]),
                "latency_ms": list(self.zoo["latency_ms"]),
                "budget_ms": float(self.space.budget_ms),
                "winner_ms": float(self.space.latency(winner)),
                "winner_models": [self.zoo["members"][m] for m in winner.model_ids],
            }
        grid = self.model.get("sigma_grid")
        if grid is not None:
            g = np.asarray(grid)
            idx = [int(np.argmin(np.abs(np.log(g) - np.log(x)))) for x in sig if x > 0]
            out["timesteps"] = idx
        from searchd.export import model_levels, usage_section

        out["usage"] = usage_section(winner, cfg.solver.options,
                                     flow=model_levels(cfg.model) == "flow", sigma_grid=grid)
        return out

    def _adaptive_json(self, final: dict[str, Any] | None) -> dict[str, Any]:
        from searchd.adaptive.run import adaptive_section

        p = getattr(self, "predictor", None)
        source = self.cfg.search.adaptive.global_schedule
        error = self.predictor_error if p is None else None
        held = None
        if final is not None and "error" in final:
            error = f"held-out scoring of the predictor failed: {final['error']}"
        elif final is not None:
            held = final
        return adaptive_section(p["info"] if p else {}, p["training"] if p else {}, held,
                                self.global_schedule, source, error)

    def _plots(self, winner: Schedule, baselines: Sequence[Schedule], best_base: int,
               rows: Sequence[dict[str, Any]], images: dict[int, Any]) -> None:
        from searchd.plots import save_image_grid
        from searchd.report import copy_into_run, draw_plots

        # Plots are drawn in a scratch directory and copied in (atomically, also to s3://);
        # python -m searchd.report redraws the first two the same way.
        report = scratch_dir("searchd-report-")
        named = {"searched (best)": winner.sigmas}
        for b in baselines:
            named[str(b.meta.get("name", b.id))] = b.sigmas
        draw_plots(report, rows, self.baseline_values, named, self.metric,
                   f"best schedule vs baselines ({winner.solver}, NFE {self.cfg.nfe})")
        labels = {0: "best", 1 + best_base: "best_baseline"}
        for i, x in images.items():
            save_image_grid(x, os.path.join(report, f"samples_{labels[i]}.png"))
        copy_into_run(self.run_dir, report, sorted(os.listdir(report)))
        shutil.rmtree(report, ignore_errors=True)

    def _print_summary(self, best: dict[str, Any]) -> None:
        held = best["heldout"]
        level = int(round(100 * held["level"]))
        self._say(f"searchd: held-out {self.metric} on {held['n_samples']} samples "
                  f"(seeds from {held['seed_base']}), {level}% bootstrap CIs; differences are "
                  f"paired against {best['best_baseline']}:")
        for sc in held["scores"]:
            if sc["status"] != "ok":
                self._say(f"  {sc['name']:<26} failed: {sc['error']}")
                continue
            lo, hi = sc["fid_ci"]
            line = f"  {sc['name']:<26} {sc['fid']:.4f} [{lo:.4f}, {hi:.4f}]"
            if sc["diff_ci"] is not None and sc["name"] != best["best_baseline"]:
                dlo, dhi = sc["diff_ci"]
                line += f"   diff {sc['diff']:+.4f} [{dlo:+.4f}, {dhi:+.4f}]"
            self._say(line)
        ad = best.get("adaptive")
        if ad is not None:
            self._print_adaptive(ad)

    def _print_adaptive(self, ad: dict[str, Any]) -> None:
        if ad["status"] != "ok":
            self._say(f"searchd: adaptive predictor failed: {ad.get('error')}")
            return
        h = ad["heldout"]
        g, p = h["global"], h["predictor"]
        self._say(f"searchd: adaptive {ad['kind']} predictor vs its global schedule "
                  f"({ad['global_schedule']['source']}), same held-out seeds:")
        self._say(f"  {'global schedule':<26} {g['fid']:.4f} "
                  f"[{g['fid_ci'][0]:.4f}, {g['fid_ci'][1]:.4f}]")
        if p["fid"] is None:
            self._say(f"  {'predictor':<26} failed")
            return
        dlo, dhi = h["diff_ci"]
        self._say(f"  {'predictor':<26} {p['fid']:.4f} [{p['fid_ci'][0]:.4f}, "
                  f"{p['fid_ci'][1]:.4f}]   diff {h['diff']:+.4f} [{dlo:+.4f}, {dhi:+.4f}]"
                  f"   ({100 * h['gain']:+.1f}% gain)")
        self._say(f"  load it beside your sampler: {self.run_dir.display(ad['torchscript'])}")
