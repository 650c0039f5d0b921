"""A trained predictor as a product: files in a run directory, and paired held-out scores.

- ``save_predictor(model, directory, meta)`` writes ``predictor.pt`` (the weights and what
  rebuilds the module), ``predictor.ts`` (a TorchScript export a user loads beside their
  sampler, no searchd needed) and ``predictor.json`` (kind, global schedule, usage, meta).
- ``load_predictor(directory)`` rebuilds the module from ``predictor.pt``.
- ``train_predictor(evaluator_or_denoiser, global_schedule, seeds, kind=...)``: oracle
  schedules of the training seeds' noises, then the predictor fitted on them (meant to run
  in an evaluator actor, like ``compute_ld3``).
- ``sample_features(evaluator, x)``: per-sample features of samples, in the evaluator's
  blocks (as its accumulator computes them).
- ``predictor_heldout(evaluator, model, global_schedule, seeds)``: the predictor and the
  global schedule scored on the same seeds (the same noise), FID with bootstrap intervals
  and the paired difference, in ``heldout_scores``' format.
- ``compute_predictor`` and ``predictor_final``: the two jobs a run sends to an evaluator
  (training, its cost counted like an anchor's; the held-out score of a trained predictor).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.adaptive.oracle import oracle_schedules
from searchd.adaptive.predictors import (
    DeltaPredictor,
    OneShotPredictor,
    fine_tune,
    fit_delta,
    fit_one_shot,
)
from searchd.evaluation.heldout import DEFAULT_RESAMPLES, scores_from_features
from searchd.evaluation.teacher import TeacherCache, TeacherSettings
from searchd.methods.counting import Counted, denoiser_of, warmup_noise
from searchd.schedule import Schedule
from searchd.solvers import solve

KINDS = {"one_shot": OneShotPredictor, "delta": DeltaPredictor}

USAGE = {
    "one_shot": (
        "m = torch.jit.load('predictor.ts'); d0 = D(z * sigma_max, sigma_max)  # the "
        "solver's first evaluation (inputs='denoised'; with inputs='noise' pass z); "
        "sigmas = m(d0)  # [B, N+1], one schedule per sample"
    ),
    "delta": (
        "m = torch.jit.load('predictor.ts'); after the first denoiser call of step i "
        "(i < N - 1 with a final 0): sigma_next = m(i, x_i, sigma_i, D(x_i, sigma_i))  # [B]"
    ),
}


def kind_of(model: Any) -> str:
    for name, cls in KINDS.items():
        if isinstance(model, cls):
            return name
    raise ValueError(f"not a predictor: {type(model).__name__}; allowed: "
                     f"{', '.join(c.__name__ for c in KINDS.values())}")


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def predictor_blob(model: Any) -> dict[str, Any]:
    """What rebuilds the predictor anywhere: ``{"kind", "args", "state_dict"}`` (CPU tensors;
    ``predictor.pt`` holds exactly this)."""
    kind = kind_of(model)
    head = model.head
    args: dict[str, Any] = {
        "global_sigmas": [float(v) for v in head.sigmas.tolist()],
        "sigma_min": float(model.sigma_min),
        "dim": int(model.dim),
        "hidden": int(model.hidden),
    }
    if kind == "one_shot":
        args["inputs"] = model.inputs
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"kind": kind, "args": args, "state_dict": state}


def predictor_from_blob(blob: Mapping[str, Any]) -> OneShotPredictor | DeltaPredictor:
    """The predictor ``predictor_blob`` describes (eval mode)."""
    kind = blob.get("kind")
    if kind not in KINDS:
        raise ValueError(f"predictor kind = {kind!r}; allowed: {', '.join(KINDS)}")
    model = KINDS[kind](**blob["args"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def save_predictor(model: Any, directory: str | Path, meta: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Write the predictor's weights, TorchScript export and description into ``directory``.

    Returns the description (also ``predictor.json``), with the file names.
    """
    blob = predictor_blob(model)
    kind, args = blob["kind"], blob["args"]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / "predictor.pt", lambda p: torch.save(blob, p))
    with warnings.catch_warnings():
        # torch >= 2.5 marks TorchScript deprecated; it is still what loads anywhere.
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model.eval())
    _atomic_write(d / "predictor.ts", lambda p: scripted.save(str(p)))
    head = model.head
    info = {
        "kind": kind, "weights": "predictor.pt", "torchscript": "predictor.ts",
        "n_steps": int(head.n_steps), "final_zero": bool(head.final_zero), **args,
        "usage": USAGE[kind], "meta": dict(meta or {}),
    }
    text = json.dumps(info, indent=2)
    _atomic_write(d / "predictor.json", lambda p: p.write_text(text))
    return info


def load_predictor(directory: str | Path) -> OneShotPredictor | DeltaPredictor:
    """The predictor saved by ``save_predictor`` in ``directory`` (eval mode)."""
    path = Path(directory) / "predictor.pt"
    if not path.is_file():
        raise ValueError(f"no predictor at {path} (expected predictor.pt from save_predictor)")
    blob = torch.load(path, weights_only=True)  # plain data and tensors: no code runs
    try:
        return predictor_from_blob(blob)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def train_predictor(
    evaluator_or_denoiser: Any,
    global_schedule: Schedule,
    seeds: Sequence[int],
    *,
    kind: str = "one_shot",
    solver: str | None = None,
    teacher_solver: str = "heun",
    teacher_steps: int = 64,
    teacher_cache: Any = None,
    oracle: Mapping[str, Any] | None = None,
    fit: Mapping[str, Any] | None = None,
    tune: Mapping[str, Any] | None = None,
) -> tuple[OneShotPredictor | DeltaPredictor, dict[str, Any]]:
    """A predictor of ``kind`` for ``global_schedule``, trained on the seeds' oracle schedules.

    Args:
        evaluator_or_denoiser: an evaluator (its ``denoiser``, ``teacher_cache``) or a denoiser.
        global_schedule: the global best schedule (the start of the oracle, and the
            schedule the predictor's offsets are taken over).
        seeds: training noise seeds; keep them disjoint from evaluation seeds.
        kind: "one_shot" or "delta". solver: default the schedule's.
        teacher_solver, teacher_steps, teacher_cache: the teacher (polynomial schedule).
        oracle: keywords of ``oracle_schedules`` (iters, lr, ...).
        fit: keywords of ``fit_one_shot`` / ``fit_delta`` (epochs, hidden, ...).
        tune: if given, keywords of ``fine_tune`` (epochs, lr, ...): the fitted predictor is
            then trained end to end through the solver against the same teacher samples.

    Returns:
        (predictor, record): the record holds the oracle's mean losses and the fit's.
    """
    if kind not in KINDS:
        raise ValueError(f"kind = {kind!r}; allowed: {', '.join(KINDS)}")
    den = denoiser_of(evaluator_or_denoiser)
    solver = solver or global_schedule.solver
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2:
        raise ValueError(f"{len(seeds)} training seeds; a predictor needs at least 2")
    settings = TeacherSettings(solver=teacher_solver, n_steps=teacher_steps,
                               final_zero=global_schedule.final_zero)
    cache = teacher_cache
    if cache is None:
        cache = getattr(evaluator_or_denoiser, "teacher_cache", None)
    if cache is None:
        cache = TeacherCache(den)
    target = cache.samples(seeds, settings)
    noise = warmup_noise(den, seeds).to(target.device, target.dtype)
    result = oracle_schedules(den, noise, target, global_schedule.sigmas, solver,
                              **dict(oracle or {}))
    if kind == "one_shot":
        model, rec = fit_one_shot(den, noise, result.sigmas, global_schedule.sigmas,
                                  **dict(fit or {}))
    else:
        model, rec = fit_delta(den, noise, result.sigmas, global_schedule.sigmas, solver,
                               **dict(fit or {}))
    tuned = None
    if tune is not None:
        tuned = fine_tune(model, den, noise, target, solver, **dict(tune))
        model.eval()
    record = {
        "tune": tuned,
        "kind": kind, "solver": solver, "n_train": len(seeds), "first_seed": seeds[0],
        "teacher": settings.to_dict(), "oracle": dict(oracle or {}),
        "oracle_loss": float(result.loss.mean()),
        "global_loss": float(result.global_loss.mean()), "fit": rec,
    }
    return model, record


def sample_features(evaluator: Any, x: Tensor) -> Tensor:
    """Per-sample features [n, d] of samples [n, *shape], in the evaluator's blocks
    (``min(feature_block, n)``, a zero-padded last block), as its accumulator runs them."""
    n = x.shape[0]
    block = min(evaluator.feature_block, n)
    out = []
    for a in range(0, n, block):
        images = x[a : a + block].reshape(-1, *evaluator.image_shape)
        take = images.shape[0]
        if take < block:
            images = torch.cat([images, images.new_zeros((block - take, *images.shape[1:]))])
        feats = evaluator.features.extract(images, evaluator._outputs)["features"]
        out.append(feats[:take].cpu())
    return torch.cat(out)


def predictor_samples(evaluator: Any, model: Any, seeds: Sequence[int],
                      solver: str) -> Tensor:
    """Samples [n, *shape] of the predictor's policy on the seeds' noise (evaluator batches)."""
    noise = evaluator.noise(seeds)
    parts = []
    with torch.no_grad():
        for a in range(0, noise.shape[0], evaluator.batch_size):
            parts.append(solve(evaluator.denoiser, noise[a : a + evaluator.batch_size],
                               model.policy(), solver=solver, **evaluator.solver_options))
    return torch.cat(parts)


def predictor_heldout(
    evaluator: Any,
    model: Any,
    global_schedule: Schedule,
    seeds: Sequence[int],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
) -> dict[str, Any]:
    """FID of the global schedule and of the predictor on the same seeds, with the paired
    difference (predictor minus global) and bootstrap intervals (``heldout_scores``' format;
    scores[0] is the global schedule, scores[1] the predictor)."""
    head = model.head
    if not np.array_equal(head.sigmas.numpy(), global_schedule.sigmas):
        raise ValueError("the predictor's global schedule is not global_schedule "
                         f"({head.sigmas.tolist()} vs {list(global_schedule.sigmas)})")
    solver = evaluator.solver or global_schedule.solver
    seeds = [int(s) for s in seeds]
    results, feats = evaluator.per_sample_features([global_schedule], seeds)
    if results[0].status != "ok":
        raise ValueError(f"the global schedule failed: {results[0].error}")
    x = predictor_samples(evaluator, model, seeds, solver)
    if not torch.isfinite(x).all():
        raise ValueError("the predictor's samples are not finite")
    f = sample_features(evaluator, x)
    ids = [results[0].candidate_id, f"{kind_of(model)}-predictor"]
    return scores_from_features(evaluator.frechet, [feats[0], f], ids, seeds,
                                resamples=resamples, level=level)


# Jobs of a run (on an evaluator) ----------------------------------------------------------------
def compute_predictor(evaluator_or_denoiser: Any, global_schedule: Mapping[str, Any],
                      seeds: Sequence[int], params: Mapping[str, Any]) -> dict[str, Any]:
    """Train a run's predictor (in an evaluator actor) and measure what it cost.

    ``params``: ``kind``, ``solver``, ``teacher_solver``, ``teacher_steps``, ``oracle``,
    ``fit``, ``tune`` (``train_predictor``'s keywords). Returns ``{"blob":
    predictor_blob(...), "record": train_predictor's record, "denoiser_calls" (samples
    through the network in forward calls, the teacher's included), "forward_calls",
    "wall_s"}``.
    """
    import time

    counted = Counted(evaluator_or_denoiser)
    schedule = Schedule.from_dict(dict(global_schedule))
    p = dict(params)
    t0 = time.perf_counter()
    model, record = train_predictor(
        counted, schedule, seeds, kind=p["kind"], solver=p.get("solver"),
        teacher_solver=p["teacher_solver"], teacher_steps=p["teacher_steps"],
        oracle=p.get("oracle"), fit=p.get("fit"), tune=p.get("tune"),
    )
    wall = time.perf_counter() - t0
    return {"blob": predictor_blob(model), "record": record, **counted.cost(), "wall_s": wall}


def predictor_final(evaluator: Any, blob: Mapping[str, Any], global_schedule: Schedule,
                    seeds: Sequence[int], level: float) -> dict[str, Any]:
    """The predictor and its global schedule on the held-out seeds (the same noise), FID
    with intervals and the paired difference, in ``heldout_scores``' format (scores[0]:
    the global schedule, scores[1]: the predictor)."""
    model = predictor_from_blob(blob).to(getattr(evaluator.denoiser, "device", "cpu"))
    return predictor_heldout(evaluator, model, global_schedule, seeds, level=level)
