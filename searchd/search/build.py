"""What the evaluator actors build from a configuration, and the jobs they run for the
driver besides scoring (describing the model, exact reference statistics, held-out scoring,
sample grids).

Everything here runs inside an actor or a Ray task: the driver never loads a model, so a
search of a GPU checkpoint can be driven from a CPU-only head node.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from searchd.config import SearchConfig, validate_config
from searchd.schedule import Schedule


def _dtype(name: str) -> torch.dtype:
    return {
        "float32": torch.float32,
        "float64": torch.float64,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }[name]


def load_model(cfg: SearchConfig):
    """The configured denoiser, on the configured device."""
    from searchd.models import load

    device = cfg.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.model.zoo is not None:
        from searchd.models.compose import compose

        return compose(cfg.model.zoo, device=device, dtype=_dtype(cfg.model.dtype))
    target: Any = cfg.model.name
    if cfg.model.spec is not None:
        from searchd.models.zoo import ModelSpec

        spec = cfg.model.spec
        target = ModelSpec(
            name=model_label(cfg), path=spec.path, kind=spec.kind, options=dict(spec.options)
        )
    return load(target, device=device, dtype=_dtype(cfg.model.dtype))


def model_label(cfg: SearchConfig) -> str:
    """A short name of the configured model for reports: the zoo name, or the checkpoint's
    file or directory name (a hub id or entry point as given)."""
    if cfg.model.zoo is not None:
        return "+".join(cfg.model.zoo)
    if cfg.model.spec is None:
        return str(cfg.model.name)
    spec = cfg.model.spec
    if spec.kind == "generic":
        return spec.path
    path = spec.path.rstrip("/")
    if os.path.exists(path):
        return os.path.basename(path) or path
    return path


def load_feature_net(cfg: SearchConfig):
    from searchd.evaluation.features import load_features

    device = cfg.model.device if cfg.model.device != "auto" else None
    opts = dict(cfg.metric.options.get("features", {}))
    if device is not None:
        opts.setdefault("device", device)
    return load_features(cfg.metric.features, **opts)


@dataclass
class EvaluatorFactory:
    """Picklable recipe of an actor's evaluator: the resolved configuration and the
    reference statistics (computed or read once by the driver)."""

    config: dict[str, Any]
    reference: dict[str, Any] | None = None
    evaluator_options: dict[str, Any] = field(default_factory=dict)
    # A zoo's member latencies: None measures them when the evaluator is built (on the
    # actor's device, at its batch size); given (from the run), they are reused as they are.
    latency_ms: list[float] | None = None

    def __call__(self):
        from searchd.evaluation import Evaluator
        from searchd.evaluation.reference import ReferenceStats

        cfg = validate_config(self.config)
        denoiser = load_model(cfg)
        features = load_feature_net(cfg)
        reference = None
        if self.reference is not None:
            reference = ReferenceStats.from_dict(self.reference)
            reference.check(features)
        kwargs: dict[str, Any] = dict(self.evaluator_options)
        if cfg.metric.options.get("teacher"):
            kwargs["teacher"] = cfg.metric.options["teacher"]
        evaluator = Evaluator(
            denoiser, features, reference, metrics=metrics_for(cfg),
            solver_options=dict(cfg.solver.options), **kwargs,
        )
        if cfg.model.zoo is not None:
            if self.latency_ms is not None:
                denoiser.set_latency(self.latency_ms, {"source": "run"})
            else:
                denoiser.measure_latency(cfg.model.latency_batch_size or evaluator.batch_size)
        return evaluator


def zoo_latency(evaluator: Any) -> dict[str, Any]:
    """The zoo's latencies as this actor measured them at start-up (``EvaluatorPool.call``)."""
    return evaluator.denoiser.latency_report()


def metrics_for(cfg: SearchConfig) -> tuple[str, ...]:
    """The metrics every candidate gets: the search metric first, then FID if it is not."""
    names = [cfg.metric.name]
    if cfg.metric.name != "fid" and cfg.metric.reference is not None:
        names.append("fid")
    return tuple(names)


# Jobs run by an actor (through EvaluatorPool.call) or a Ray task --------------------------------
def describe_model(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model facts the driver needs: shape, noise range, grid, cost."""
    cfg = validate_config(config)
    d = load_model(cfg)
    grid = getattr(d, "sigma_grid", None)
    return {
        "shape": list(d.shape),
        "sigma_min": float(d.sigma_min),
        "sigma_max": float(d.sigma_max),
        "sigma_grid": None if grid is None else np.asarray(grid.cpu(), np.float64).tolist(),
        "cost": float(getattr(d, "cost", 1.0)),
        "name": str(getattr(d, "name", cfg.model.name)),
        "zoo": list(getattr(d, "names", [])) if cfg.model.zoo is not None else None,
    }


def exact_reference_stats(config: Mapping[str, Any], n: int, seed_base: int) -> dict[str, Any]:
    """Reference statistics from ``n`` exact samples of an embedded model (its data
    distribution), in the configured feature space, as plain data."""
    from searchd.evaluation.reference import exact_reference

    cfg = validate_config(config)
    d = load_model(cfg)
    if not hasattr(d, "sample_data"):
        raise ValueError(
            f"metric.reference = 'exact:{n}' needs a model with exact samples (the embedded "
            f"gmm-digits and digits-unet zoos); {model_label(cfg)!r} has none: give a "
            "reference .npz"
        )
    ref = exact_reference(d, load_feature_net(cfg), range(seed_base, seed_base + n))
    return ref.to_dict()


def _image_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) == 3:
        return shape
    if len(shape) == 1:
        side = int(round(np.sqrt(shape[0])))
        return (1, side, side)
    return (1, *shape)


def final_scores(
    factory: EvaluatorFactory,
    schedules: Sequence[Schedule],
    seeds: Sequence[int],
    baseline_index: int,
    ci_level: float,
    grid_seeds: Sequence[int],
    grid_indices: Sequence[int],
    search_seeds: Sequence[int],
    predictor: tuple[dict[str, Any], Schedule] | None = None,
) -> dict[str, Any]:
    """The end of a search, in one worker: held-out FID of each schedule with a bootstrap CI
    and its paired difference against ``schedules[baseline_index]`` (same resampled sample
    indices for both), and sample images [B, C, H, W] of ``schedules[grid_indices]``.

    ``predictor``: ``(predictor_blob, its global schedule)`` of an adaptive run: both are
    scored on the same held-out seeds too (``"adaptive"``: ``predictor_final``'s result, or
    ``{"error": ...}`` if that failed; the other scores are kept either way)."""
    from searchd.evaluation.heldout import heldout_scores

    evaluator = factory()
    held = heldout_scores(
        evaluator, list(schedules), list(seeds), baseline_index=baseline_index, level=ci_level,
        search_seeds=search_seeds,
    )
    adaptive: dict[str, Any] | None = None
    if predictor is not None:
        from searchd.adaptive.run import predictor_final

        try:
            adaptive = predictor_final(evaluator, predictor[0], predictor[1], list(seeds),
                                       ci_level)
        except Exception as e:  # a broken predictor never loses the run's other results
            adaptive = {"error": f"{type(e).__name__}: {e}"}
    images = {}
    if len(grid_seeds):
        for i in grid_indices:
            x = evaluator.generate(schedules[i], list(grid_seeds))
            if evaluator.decode is not None:  # latent models: the decoded images
                with torch.no_grad():
                    x = evaluator.decode(x)
            images[i] = np.asarray(x.detach().cpu(), np.float32)
    return {"heldout": held, "images": images, "adaptive": adaptive}
