"""The stages of a run: setup, search, finish, on an engine that supplies the evaluators.

``run(plan, engine, say)`` takes the run's lock, then:

1. **setup**: the engine starts its evaluators (each loads the model once); the checks that
   need the model run (noise range, grid, the reference's dimension against the feature
   network, exact samples); the exact reference statistics are computed on one evaluator
   and handed to all; a zoo's latencies measured; the space, the anchors (GITS, LD3, on the
   evaluators, side by side), the baselines and the searcher built; a resumed run restores
   its searcher and its stored results.
2. **search**: a ``SearchLoop`` with a ``Recorder``, driven by the engine (Ray Tune, or
   in-process); an adaptive run then trains its predictor on an evaluator.
3. **finish**: the winner and the baselines re-scored on held-out seeds on the evaluators
   (a group of schedules each, side by side), ``best.json``, the plots and the summary
   lines.

The engine is the only thing that knows about Ray (``searchd.distributed.engine``;
``searchd.loop.local`` runs everything in this process). Fault injection is the engine's
(``searchd.loop.hooks``), not the stages'.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from searchd import faults
from searchd.config import SearchConfig
from searchd.evaluation import CandidateResult, reference_cache
from searchd.loop import adaptive as adaptive_run
from searchd.loop import finish as fin
from searchd.loop.factory import EvaluatorFactory, model_label, model_loads, zoo_latency
from searchd.loop.loop import SearchLoop
from searchd.loop.plan import (
    anchor_job,
    make_baselines,
    make_searcher,
    make_space,
    predictor_params,
    timestep_space,
)
from searchd.loop.record import from_row
from searchd.loop.recorder import Progress, Recorder, format_duration
from searchd.loop.runs import RUN_FILE, BadInput, RunPlan, record
from searchd.schedule import Schedule
from searchd.searchers.base import ScheduleSearcher
from searchd.storage import BEST_FILE, CONFIG_FILE, LOG_FILE, RunDir, RunLock

logger = logging.getLogger("searchd")

ANCHORS_FILE = "anchors.json"
REFERENCE_FILE = "reference.npz"
OBJECTIVE_FILE = "objective.json"  # class_fid: the objective with its floor resolved


class Engine(Protocol):
    """What runs the evaluators and drives the loop (``RayEngine``, ``LocalEngine``)."""

    name: str

    def start(self, factory: EvaluatorFactory, workers_config: Any) -> Any: ...

    def drive(self, loop: SearchLoop, workers: Any, *, name: str,
              between: Callable[[], Any] | None = None) -> bool: ...

    def close(self) -> None: ...


@dataclass
class RunOutcome:
    """What a run did: ``status`` "finished" (``best`` is ``best.json``'s content) or
    "interrupted" (the rows so far are stored; resume it)."""

    status: str
    run_id: str
    run: RunDir
    best: dict[str, Any] | None = None
    evaluations: int = 0


@dataclass
class Setup:
    """What the setup stage built for the search and the finish."""

    workers: Any
    facts: dict[str, Any]
    space: Any
    baselines: list[Schedule]
    searcher: ScheduleSearcher
    anchor_results: list[dict[str, Any]]
    zoo: dict[str, Any] | None
    known: dict[str, CandidateResult] = field(default_factory=dict)
    known_rows: int = 0
    first_index: int = 0
    predictor: dict[str, Any] | None = None
    predictor_error: str | None = None
    race_known: dict[tuple[str, int], CandidateResult] = field(default_factory=dict)


Say = Callable[[str], None]


def _say_to(say: Say | None) -> Say:
    def out(text: str) -> None:
        logger.info(text)
        if say is not None:
            say(text)

    return out


def run(plan: RunPlan, engine: Engine, say: Say | None = None) -> RunOutcome:
    """Run (or resume) the search a plan describes; see the module docstring."""
    out = _say_to(say)
    t0 = time.monotonic()
    prepared = False
    try:
        with RunLock(plan.run) as lock, _run_log(plan.run):
            if lock.taken_over is not None:
                logger.info("took over the stale lock of %s", lock.taken_over.describe())
            if lock.removed_temps:
                logger.info("removed %d temporary file(s) of interrupted writes: %s",
                            len(lock.removed_temps), ", ".join(lock.removed_temps))
            setup = prepare(plan, engine, out)
            prepared = True
            outcome = search_and_finish(plan, engine, setup, out)
    except BaseException:
        # A new run that stops before its search (bad input found once the model is loaded,
        # a model that does not load) leaves nothing behind.
        if not prepared and plan.created and not plan.resume:
            _remove_new_run(plan.run)
        raise
    finally:
        engine.close()
    if outcome.status == "finished":
        out(f"searchd: done in {format_duration(time.monotonic() - t0)}; "
            f"{plan.run.display(BEST_FILE)} written")
    return outcome


def search_and_finish(plan: RunPlan, engine: Engine, setup: Setup, say: Say) -> RunOutcome:
    """The search stage, the adaptive predictor if any, and the finish stage."""
    loop = search(plan, engine, setup, say)
    n = _evaluations(loop, setup)
    if not loop.finished:
        say(f"searchd: search interrupted; {n} evaluations are stored. Resume with: "
            f"python -m searchd.search --resume {plan.run.location}")
        return RunOutcome("interrupted", plan.run_id, plan.run, evaluations=n)
    if plan.cfg.search.algorithm == "adaptive":
        train_predictor(plan, setup, say)
    best = finish(plan, setup, loop, say)
    loads = setup.workers.model_loads
    logger.info("model loads: %s (driver: %d)", loads, model_loads())
    return RunOutcome("finished", plan.run_id, plan.run, best=best, evaluations=n)


class _run_log:
    """The run's ``log.txt`` (local run directories): INFO and above of the ``searchd``
    logger, for the length of the run (the logger's level restored after)."""

    def __init__(self, run: RunDir) -> None:
        self.path = run.local_path(LOG_FILE)

    def __enter__(self) -> None:
        self.handler = None
        self.level = logger.level
        if self.path is None:
            return
        self.handler = logging.FileHandler(self.path)
        self.handler.setLevel(logging.INFO)
        self.handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(self.handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)

    def __exit__(self, *exc: object) -> None:
        if self.handler is not None:
            logger.removeHandler(self.handler)
            self.handler.close()
        logger.setLevel(self.level)


def _remove_new_run(run: RunDir) -> None:
    """The files a new run wrote before its search (its lock released), and its directory
    if it is then empty and local."""
    import os

    for name in (LOG_FILE, CONFIG_FILE, RUN_FILE, REFERENCE_FILE, ANCHORS_FILE, OBJECTIVE_FILE):
        run.delete(name)
    path = run.local_path()
    if path is not None:
        try:
            os.rmdir(path)  # only if empty
        except OSError:
            pass


# Setup --------------------------------------------------------------------------------------------
def prepare(plan: RunPlan, engine: Engine, say: Say) -> Setup:
    """The setup stage (see the module docstring)."""
    cfg, run = plan.cfg, plan.run
    say(f"searchd: run {plan.run_id} -> {run.uri}" + (" (resumed)" if plan.resume else ""))
    _warm_optimizer(cfg)
    meta = json.loads(run.read_text(RUN_FILE)) if plan.resume else {}
    stored_zoo = meta.get("zoo") if cfg.model.zoo is not None else None
    reference = _known_reference(cfg, run)
    cached = _cached_reference(cfg) if reference is None else None
    if cached is not None:
        reference = cached[0]
    factory = EvaluatorFactory(
        cfg.resolve(), reference, evaluator_options=_evaluator_options(cfg),
        latency_ms=None if stored_zoo is None else list(stored_zoo["latency_ms"]),
    )
    workers = engine.start(factory, cfg.workers)
    facts = workers.facts
    loads = workers.model_loads
    say(f"searchd: {len(loads)} evaluator(s) ready on {', '.join(workers.nodes)}; the model "
        f"was loaded {sum(loads.values())} time(s), once per evaluator "
        f"({', '.join(f'{k} {v}' for k, v in loads.items())}); in the driver: {model_loads()}")
    check_model(cfg, facts, reference)
    if not plan.resume or plan.changed:
        run.write_text(CONFIG_FILE, cfg.to_yaml())
        run.write_text(RUN_FILE, json.dumps({**meta, **record(cfg, plan.run_id)}))
    if cached is not None:
        _store_reference(cfg, run, cached, say)
    if reference is None and cfg.metric.exact_reference is not None:
        reference = _exact_reference(cfg, run, workers, say)
    zoo = stored_zoo if stored_zoo is not None else _zoo(cfg, run, workers, say)
    space = make_space(cfg, facts["sigma_min"], facts["sigma_max"], facts["sigma_grid"],
                       zoo=zoo)
    results = _anchors(plan, timestep_space(space), workers, say)
    from searchd.methods.anchors import anchors_from_results

    anchors = anchors_from_results(results, timestep_space(space))
    baselines = make_baselines(cfg, space, anchors)
    if cfg.metric.name == "class_fid" and reference is not None:
        _class_objective(cfg, run, workers, baselines, reference, say)
    searcher = make_searcher(cfg.search, space, baselines, cfg.metric.name, cfg.mode, anchors)
    setup = Setup(workers, facts, space, baselines, searcher, results, zoo)
    if plan.resume:
        _restore(run, setup, say)
    return setup


def _evaluator_options(cfg: SearchConfig) -> dict[str, Any]:
    """The evaluators' options a configuration asks for: the prefix tree with the
    level-local mutation (its mutants share their parent's leading levels; every value is
    bitwise that of scoring the candidate alone)."""
    ev = cfg.search.evolution
    if cfg.search.algorithm == "evolution" and ev.mutation == "level":
        return {"prefix_sharing": True}
    return {}


def _warm_optimizer(cfg: SearchConfig) -> None:
    """An evolution with the predictor pre-screen trains it in the driver from the second
    generation on; torch's first optimizer imports ``torch._dynamo`` (1-2 s on a quiet core,
    6 s on a busy one), which would stall the search between two generations. Done here in
    a thread, while Ray and the actors start and the driver only waits."""
    if cfg.search.algorithm != "evolution" or not cfg.search.predictor.enabled:
        return
    import threading

    def warm() -> None:
        try:
            p = [torch.zeros(1, requires_grad=True)]
            torch.optim.Adam(p)
        except Exception:  # only a warm-up: the real use reports its own errors
            pass

    threading.Thread(target=warm, name="searchd-warm-optimizer", daemon=True).start()


def _known_reference(cfg: SearchConfig, run: RunDir) -> dict[str, Any] | None:
    """Reference statistics known before the model is loaded: a reference file, or a
    resumed run's ``reference.npz`` (so a resume uses the very same reference)."""
    from searchd.evaluation.reference import ReferenceStats

    if cfg.metric.name == "class_fid":  # per-class statistics, and a resumed run's objective
        from searchd.evaluation.conditional import ClassReference

        if run.exists(REFERENCE_FILE):
            ref = ClassReference.from_bytes(run.read_bytes(REFERENCE_FILE)).to_dict()
        elif cfg.metric.exact_reference is None:
            try:
                ref = ClassReference.load(cfg.metric.reference).to_dict()  # type: ignore[arg-type]
            except ValueError as e:
                raise BadInput(f"metric.reference: {e}") from None
        else:
            return None
        if run.exists(OBJECTIVE_FILE):
            ref["objective"] = json.loads(run.read_text(OBJECTIVE_FILE))
        return ref
    if cfg.metric.exact_reference is not None:
        if run.exists(REFERENCE_FILE):
            return ReferenceStats.from_bytes(run.read_bytes(REFERENCE_FILE)).to_dict()
        return None
    if cfg.metric.reference is None:
        return None
    return ReferenceStats.load(cfg.metric.reference).to_dict()


def check_model(cfg: SearchConfig, facts: dict[str, Any],
                reference: dict[str, Any] | None) -> None:
    """The checks that need the model's facts (``BadInput``, one line each): the space's
    noise range within the model's, a grid for a discrete space, exact samples for an
    ``exact:<n>`` reference, the reference's dimension against the feature network."""
    sc = cfg.space
    lo, hi = facts["sigma_min"], facts["sigma_max"]
    for key, v in (("space.sigma_min", sc.sigma_min), ("space.sigma_max", sc.sigma_max)):
        if v is not None and not lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9):
            raise BadInput(f"{key}: got {v!r}; the model's noise range is [{lo:g}, {hi:g}]")
    s_lo = sc.sigma_min if sc.sigma_min is not None else lo
    s_hi = sc.sigma_max if sc.sigma_max is not None else hi
    if not s_lo < s_hi:
        raise BadInput(f"space.sigma_min = {s_lo!r} is not below space.sigma_max = {s_hi!r} "
                       f"(the model's noise range is [{lo:g}, {hi:g}])")
    if sc.kind == "discrete" and sc.grid is None and facts["sigma_grid"] is None:
        raise BadInput(f"space.kind: got 'discrete'; the model {facts['name']!r} has no "
                       "sigma grid: set space.grid (a named grid) or use space.kind continuous")
    if sc.guidance.kind != "none" and not facts.get("guidance", False):
        raise BadInput(f"space.guidance.kind: got {sc.guidance.kind!r}; the model "
                       f"{facts['name']!r} takes no guidance weights (it is not class- or "
                       "text-conditional with an unconditional mode, e.g. gmm-digits-cond, "
                       "digits-unet-cond-s)")
    if cfg.metric.name == "class_fid":
        from searchd.evaluation.conditional import check_class_run

        why = check_class_run(cfg, facts)
        if why is not None:
            raise BadInput(why)
    n = cfg.metric.exact_reference
    if n is not None and reference is None and not facts.get("exact_samples"):
        raise BadInput(f"metric.reference: got 'exact:{n}'; the model {facts['name']!r} has no "
                       "exact samples (the embedded gmm-digits and digits-unet zoos do): give "
                       "a reference .npz")
    if reference is not None:
        from searchd.evaluation.conditional import check_reference

        try:
            check_reference(reference, facts["features"])
        except ValueError as e:
            raise BadInput(f"metric.reference: {e}") from None


def _exact_reference(cfg: SearchConfig, run: RunDir, workers: Any, say: Say
                     ) -> dict[str, Any]:
    """Exact reference statistics, on one evaluator's loaded model; stored in the run and
    handed to every evaluator."""
    from searchd.evaluation.conditional import reference_to_bytes

    n = cfg.metric.exact_reference
    say(f"searchd: reference statistics from {n} exact samples ...")
    t0 = time.monotonic()
    ref = workers.exact_reference(n, cfg.samples.reference_seed_base)
    run.write_bytes(REFERENCE_FILE, reference_to_bytes(ref))
    workers.set_reference(ref)
    logger.info("reference statistics ready in %.1f s", time.monotonic() - t0)
    reference_cache.store(cfg, ref)
    return ref


def _cached_reference(cfg: SearchConfig) -> tuple[dict[str, Any], Any] | None:
    """A new run's exact reference from the user's cache (``reference_cache``): the very
    file an evaluator would compute; handed to the evaluators as they start."""
    if cfg.metric.exact_reference is None:
        return None
    return reference_cache.load(cfg)


def _store_reference(cfg: SearchConfig, run: RunDir, cached: tuple[dict[str, Any], Any],
                     say: Say) -> None:
    """A cached exact reference stored in the run (``reference.npz``: a resume uses it)."""
    from searchd.evaluation.conditional import reference_to_bytes

    t0 = time.monotonic()
    say(f"searchd: reference statistics from {cfg.metric.exact_reference} exact samples: "
        f"cached ({cached[1]})")
    run.write_bytes(REFERENCE_FILE, reference_to_bytes(cached[0]))
    logger.info("reference statistics ready in %.1f s", time.monotonic() - t0)


def _class_objective(cfg: SearchConfig, run: RunDir, workers: Any, baselines: list[Schedule],
                     reference: dict[str, Any], say: Say) -> None:
    """class_fid: the objective with its accuracy floor resolved (a named baseline scored
    once on the search seeds), written to ``objective.json`` and handed to every evaluator
    with the reference; a resumed run keeps the one it recorded."""
    from searchd.evaluation.conditional import resolve_objective

    if "objective" in reference:
        return
    s = cfg.samples
    seeds = list(range(s.seed_base, s.seed_base + s.per_candidate))
    try:
        obj = resolve_objective(cfg.metric.class_objective,
                                {fin.name_of(b): b for b in baselines},
                                lambda b: workers.score([b], seeds)[0], samples=len(seeds))
    except ValueError as e:
        raise BadInput(str(e)) from None
    run.write_text(OBJECTIVE_FILE, json.dumps(obj, indent=2) + "\n")
    reference["objective"] = obj
    if obj["floor"] is not None:
        workers.set_reference(reference)
        src = obj["floor_from"]
        src = "absolute" if src == "absolute" else f"{src}'s accuracy on the search seeds"
        say(f"searchd: class_fid = {obj['formula']}; floor {obj['floor']:.4f} ({src})")


def _zoo(cfg: SearchConfig, run: RunDir, workers: Any, say: Say) -> dict[str, Any] | None:
    """A zoo's member latencies: measured by every evaluator when built (median across
    them), recorded in run.json; a resume reuses the recorded ones, so its space (and budget
    repairs) are those of the interrupted run."""
    if cfg.model.zoo is None:
        return None
    reports = workers.call_all(zoo_latency)
    lat = [float(np.median([r["latency_ms"][i] for r in reports]))
           for i in range(len(reports[0]["latency_ms"]))]
    zoo = {"members": list(reports[0]["members"]), "latency_ms": lat,
           "per_worker": [{**r, "worker": w} for r, w in zip(reports, workers.names)]}
    meta = json.loads(run.read_text(RUN_FILE))
    meta["zoo"] = zoo
    run.write_text(RUN_FILE, json.dumps(meta))
    say("searchd: zoo latency (ms per sample per call, median of "
        f"{len(reports)} evaluator(s)): " + ", ".join(
            f"{n} {v:.4g}" for n, v in zip(zoo["members"], lat)))
    return zoo


def _anchors(plan: RunPlan, space: Any, workers: Any, say: Say) -> list[dict[str, Any]]:
    """The GITS/LD3 schedules this run needs (algorithm, baselines, warm start), computed
    on the evaluators, one job each, side by side, and stored in anchors.json; a resumed run
    reads them back so that it continues with the very same schedules."""
    from searchd.methods.anchors import compute_anchor

    cfg, run = plan.cfg, plan.run
    names = cfg.anchors
    if not names:
        return []
    if plan.resume and run.exists(ANCHORS_FILE):
        results = json.loads(run.read_text(ANCHORS_FILE))["anchors"]
    else:
        say(f"searchd: computing {' and '.join(names)} on the evaluators ...")
        results = workers.call_each([(compute_anchor, anchor_job(cfg, space, n))
                                     for n in names])
        faults.hit("during_anchors")  # SEARCHD_FAULT: computed, not stored (faults.py)
        run.write_text(ANCHORS_FILE, json.dumps({"anchors": results}, indent=1) + "\n")
    for r in results:
        sig = ", ".join(f"{x:.4g}" for x in r["schedule"]["sigmas"])
        say(f"searchd: {r['name']}: [{sig}] ({r['denoiser_calls']} denoiser calls, "
            f"{format_duration(r['wall_s'])})")
    return list(results)


def _restore(run: RunDir, setup: Setup, say: Say) -> None:
    """A resumed run: the searcher from its newest state, its pending candidates asked for
    again, and every stored result (never scored again)."""
    from searchd.loop.racing import is_race_row, race_known
    from searchd.storage import table_to_rows

    rows = table_to_rows(run.read_evaluations())
    setup.race_known = race_known(rows)  # a race's rows: not search results
    rows = [r for r in rows if not is_race_row(r)]
    try:
        records = [from_row(r) for r in rows]
    except ValueError as e:
        raise BadInput(f"--resume {run.uri}: {e}") from None
    setup.known = {r.candidate_id: r for _, r in records}
    setup.known_rows = len(rows)
    last = run.latest_searcher_state()
    if last is not None:
        index, state = last
        setup.searcher.set_state(state)
        logger.info("searcher restored from state-%06d.json", index)
        # States continue after the newest one: a resumed run never overwrites a state of
        # the run it continues (a second interruption resumes from the newest).
        setup.first_index = max(run.searcher_state_generations()) + 1
    setup.searcher.requeue_pending()
    say(f"searchd: resuming with {len(setup.known)} stored evaluations")


# Search ------------------------------------------------------------------------------------------
def search(plan: RunPlan, engine: Engine, setup: Setup, say: Say) -> SearchLoop:
    """The search stage: the loop, its recorder, driven by the engine to its end."""
    cfg = plan.cfg
    algorithm = cfg.search.algorithm
    ev = cfg.search.evolution
    total = cfg.search.budget if algorithm in ("evolution", "random", "bayes") else \
        1 + len(setup.baselines)
    # The local phase (refine) adds steps that count as generations: no total then.
    gens = ev.generations if algorithm == "evolution" and not ev.refine else None
    progress = Progress(gens, total, cfg.metric.name, _stored_baseline_values(setup))
    recorder = Recorder(plan.run, plan.run_id, setup.searcher, progress, say)
    s = cfg.samples
    from searchd.loop import racing

    h = cfg.search.halving
    loop = SearchLoop(setup.searcher, range(s.seed_base, s.seed_base + s.per_candidate),
                      batch_size=int(cfg.search.candidates_per_trial), known=setup.known,
                      observers=[recorder], first_index=setup.first_index,
                      wrap_scorer=racing.halving_wrapper(cfg.metric.name, h.rungs, h.eta))
    workers = setup.workers

    def between() -> None:
        added = workers.grow()
        if added:
            say(f"searchd: evaluator pool grew to {len(workers.names)} actor(s) on "
                f"{', '.join(workers.nodes)}")

    logger.info("search starts: %s on %d evaluator(s), %d candidates per batch", algorithm,
                len(workers.names), loop.batch_size)
    engine.drive(loop, workers, name=f"searchd-{plan.run_id}", between=between)
    logger.info("search done: %d candidates scored in %d batches", loop.n_scored,
                loop.n_batches)
    if loop.finished and cfg.search.race_k:
        racing.run_race(loop, workers, top_k=cfg.search.race_k,
                        blocks=racing.race_blocks(s.seed_base, s.per_candidate,
                                                  cfg.search.race_blocks),
                        run=plan.run, run_id=plan.run_id, known=setup.race_known, say=say)
    elif loop.finished and racing.skip_reason(cfg.search):
        logger.info("racing skipped: %s", racing.skip_reason(cfg.search))
    return loop


def _stored_baseline_values(setup: Setup) -> dict[str, float]:
    """Search values of the baselines stored by the run this one resumes (a resumed search
    may never see generation 0 again)."""
    out = {}
    for b in setup.baselines:
        r = setup.known.get(b.id)
        if r is not None:
            v = r.value(setup.searcher.metric)
            out[fin.name_of(b)] = float("inf") if v is None else v
    return out


def train_predictor(plan: RunPlan, setup: Setup, say: Say) -> None:
    """An adaptive run's predictor, trained on an evaluator and stored in ``predictor/``; a
    resumed run that has it reads it back. A failed training is logged and reported in
    best.json; the search's results are kept."""
    from searchd.adaptive.product import compute_predictor

    cfg, run = plan.cfg, plan.run
    global_schedule = setup.searcher.schedule  # type: ignore[attr-defined]
    stored = adaptive_run.read_predictor(run) if plan.resume else None
    if stored is not None:
        blob, info = stored
        setup.predictor = {"blob": blob, "info": info, "training": info["meta"]}
        say("searchd: predictor read back from predictor/predictor.pt")
        return
    a = cfg.search.adaptive
    seeds = adaptive_run.train_seeds(cfg)
    say(f"searchd: training the {a.kind} predictor on {len(seeds)} noises "
        f"(oracle schedules, {a.oracle_iters} steps each) ...")
    try:
        out = setup.workers.call(compute_predictor, global_schedule.to_dict(), seeds,
                                 predictor_params(cfg, setup.space))
    except Exception as e:  # the search's results stay; best.json reports the failure
        setup.predictor_error = f"{type(e).__name__}: {e}"
        logger.error("training the predictor failed: %s", setup.predictor_error)
        return
    rec = out["record"]
    training = {
        "n_train": rec["n_train"], "first_seed": rec["first_seed"],
        "denoiser_calls": out["denoiser_calls"], "wall_s": out["wall_s"],
        "oracle_loss": rec["oracle_loss"], "global_loss": rec["global_loss"],
        "solver": rec["solver"], "teacher": rec["teacher"],
        "global_sigmas": [float(x) for x in global_schedule.sigmas],
        "global_source": a.global_schedule, "run_id": plan.run_id,
    }
    info = adaptive_run.write_predictor(run, out["blob"], training)
    setup.predictor = {"blob": out["blob"], "info": info, "training": training}
    say(f"searchd: predictor trained ({out['denoiser_calls']} denoiser calls, "
        f"{format_duration(out['wall_s'])}; oracle loss {rec['oracle_loss']:.4g} "
        f"vs global {rec['global_loss']:.4g} on its noises) -> "
        f"{run.display('predictor/predictor.ts')}")


# Finish ------------------------------------------------------------------------------------------
def finish(plan: RunPlan, setup: Setup, loop: SearchLoop, say: Say) -> dict[str, Any]:
    """The finish stage: the winner (the searcher's best: value, then id) and the baselines
    re-scored on the held-out seeds, on an evaluator; best.json; the plots; the summary."""
    cfg, run = plan.cfg, plan.run
    best = loop.best()
    if best is None:
        raise RuntimeError("no candidate was scored successfully (every one failed; "
                           f"`python -m searchd.report {run.location}` lists the reasons)")
    winner, winner_result = best
    metric = cfg.metric.name
    scored = [b for b in setup.baselines if loop.result_of(b.id) is not None]
    baselines = scored or list(setup.baselines)
    values = {fin.name_of(b): _value(loop, b, metric) for b in baselines}
    best_base = min(range(len(baselines)),
                    key=lambda i: _rank(values[fin.name_of(baselines[i])]))
    s = cfg.samples
    heldout_seeds = list(range(s.heldout_seed_base, s.heldout_seed_base + s.heldout))
    grid_seeds = heldout_seeds[: cfg.report.grid_samples if cfg.report.plots else 0]
    say(f"searchd: re-scoring the winner and {len(baselines)} baselines on {s.heldout} "
        "held-out seeds ...")
    predictor = None if setup.predictor is None else (setup.predictor["blob"],
                                                      setup.searcher.schedule)  # type: ignore
    # The held-out phase on the evaluators side by side (a group of schedules each), joined
    # here: bitwise what one evaluator doing it all gives.
    t0 = time.monotonic()
    jobs = fin.final_jobs(
        [winner, *baselines], heldout_seeds, cfg.report.ci_level, grid_seeds,
        [0, 1 + best_base], list(range(s.seed_base, s.seed_base + s.per_candidate)),
        predictor, workers=len(setup.workers.names))
    # The search's plots are drawn in the driver meanwhile (it only waits for the jobs).
    plots = fin.SearchPlots(winner, baselines, lambda: _plot_rows(run), values, metric,
                            cfg.nfe) if cfg.report.plots else None
    try:
        final = fin.join_final(setup.workers.call_each(jobs), heldout_seeds, 1 + best_base,
                               cfg.report.ci_level)
        logger.info("held-out phase: %d schedules on %d evaluator(s) in %.1f s",
                    1 + len(baselines), len(jobs) - 1, time.monotonic() - t0)
        faults.hit("during_heldout")  # SEARCHD_FAULT: scored, best.json not written
        held = final["heldout"]
        for name, score in zip(["searched", *map(fin.name_of, baselines)], held["scores"]):
            score["name"] = name
        out = fin.best_json(
            run_id=plan.run_id, model=model_label(cfg), cfg=cfg, winner=winner,
            winner_result=winner_result, baselines=baselines, baseline_values=values,
            best_base=best_base, held=held, evaluations=_evaluations(loop, setup),
            anchor_results=setup.anchor_results, zoo=setup.zoo, space=setup.space,
            sigma_grid=setup.facts.get("sigma_grid"),
        )
        if run.exists(OBJECTIVE_FILE):  # class_fid: the objective and its parameters
            out["search"]["objective"] = json.loads(run.read_text(OBJECTIVE_FILE))
        if cfg.search.algorithm == "adaptive":
            out["adaptive"] = _adaptive_json(cfg, setup, final.get("adaptive"))
        if loop.race is not None:
            out["racing"] = loop.race.to_json(metric)
        run.write_text(BEST_FILE, json.dumps(out, indent=2) + "\n")
        if plots is not None:
            plots.finish(run, final["images"], best_base)
    finally:
        if plots is not None:  # the drawing's scratch directory, whatever happened
            plots.discard()
    for line in fin.summary_lines(out):
        say(line)
    if "adaptive" in out and out["adaptive"].get("status") == "ok":
        say(f"  load it beside your sampler: {run.display(out['adaptive']['torchscript'])}")
    return out


def _plot_rows(run: RunDir) -> list[dict[str, Any]]:
    """The search's scored rows the plots show (not the race's re-scorings)."""
    from searchd.loop.racing import is_race_row
    from searchd.storage import table_to_rows

    return [r for r in table_to_rows(run.read_evaluations())
            if r["status"] == "ok" and r["value"] is not None and not is_race_row(r)]


def _evaluations(loop: SearchLoop, setup: Setup) -> int:
    """Evaluations of the run: the search's and the race's re-scorings (stored or new)."""
    raced = 0 if loop.race is None else loop.race.scored
    return loop.n_scored + setup.known_rows + len(setup.race_known) + raced


def _value(loop: SearchLoop, schedule: Schedule, metric: str) -> float | None:
    r = loop.result_of(schedule.id)
    return None if r is None else r.value(metric)


def _rank(v: float | None) -> float:
    return float("inf") if v is None else v


def _adaptive_json(cfg: SearchConfig, setup: Setup, final: dict[str, Any] | None
                   ) -> dict[str, Any]:
    p = setup.predictor
    error = setup.predictor_error if p is None else None
    held = None
    if final is not None and "error" in final:
        error = f"held-out scoring of the predictor failed: {final['error']}"
    elif final is not None:
        held = final
    return adaptive_run.adaptive_section(
        p["info"] if p else {}, p["training"] if p else {}, held,
        setup.searcher.schedule, cfg.search.adaptive.global_schedule, error)  # type: ignore
