"""What an evaluator is built from, and the host that loads the models once.

``EvaluatorFactory`` is a picklable recipe (the resolved configuration, the reference
statistics once known, a zoo's recorded latencies). ``EvaluatorHost`` is what an evaluator
actor (or the in-process engine) holds: the denoiser and the feature network loaded once,
the model's facts, the exact reference statistics computed on that model, and the
``Evaluator`` built on them once the reference is known. Everything a run needs of the
model goes through a host, so the model is loaded exactly once per evaluator; the loads
are counted (``model_loads``) and the run logs the count.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from searchd.config import SearchConfig, validate_config

logger = logging.getLogger("searchd")

# Models loaded in this process (``load_model``): the driver of a Ray run loads none.
_LOADS = 0


def model_loads() -> int:
    """How many times ``load_model`` loaded a model in this process."""
    return _LOADS


def _dtype(name: str) -> torch.dtype:
    return {
        "float32": torch.float32,
        "float64": torch.float64,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }[name]


def load_model(cfg: SearchConfig) -> Any:
    """The configured denoiser, on the configured device (counted in ``model_loads``)."""
    global _LOADS
    from searchd.models import load

    device = cfg.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.model.zoo is not None:
        from searchd.models.compose import compose

        den = compose(cfg.model.zoo, device=device, dtype=_dtype(cfg.model.dtype))
    else:
        target: Any = cfg.model.name
        if cfg.model.spec is not None:
            from searchd.models.generic import UNTRUSTED_KINDS
            from searchd.models.zoo import ModelSpec

            spec = cfg.model.spec
            options = dict(spec.options)
            if spec.kind in UNTRUSTED_KINDS:  # the loader refuses unless told it is trusted
                options["trust_remote_code"] = cfg.model.trust_remote_code
            target = ModelSpec(name=model_label(cfg), path=spec.path, kind=spec.kind,
                               options=options)
        den = load(target, device=device, dtype=_dtype(cfg.model.dtype))
    _LOADS += 1
    return den


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


def load_feature_net(cfg: SearchConfig) -> Any:
    """The configured feature network (``metric.features``), on the model's device."""
    from searchd.evaluation.features import load_features

    device = cfg.model.device if cfg.model.device != "auto" else None
    opts = dict(cfg.metric.options.get("features", {}))
    if device is not None:
        opts.setdefault("device", device)
    return load_features(cfg.metric.features, **opts)


def metrics_for(cfg: SearchConfig) -> tuple[str, ...]:
    """The metrics every candidate gets: the search metric first, then FID if it is not."""
    names = [cfg.metric.name]
    if cfg.metric.name != "fid" and cfg.metric.reference is not None:
        names.append("fid")
    return tuple(names)


@dataclass
class EvaluatorFactory:
    """Picklable recipe of an evaluator: the resolved configuration, the reference
    statistics (``ReferenceStats.to_dict()``; None until known, or when no metric needs
    one), options of the ``Evaluator``, and a zoo's member latencies (None: measured when the
    evaluator is built, on its device; given: reused as they are, e.g. on resume)."""

    config: dict[str, Any]
    reference: dict[str, Any] | None = None
    evaluator_options: dict[str, Any] = field(default_factory=dict)
    latency_ms: list[float] | None = None

    def host(self) -> EvaluatorHost:
        """Load the models (once) and build what the reference allows."""
        return EvaluatorHost(self)

    def __call__(self) -> Any:
        """A ready ``Evaluator`` (loads the models; the reference must be known)."""
        host = self.host()
        if host.evaluator is None:
            raise ValueError("the factory has no reference statistics; the metric needs them")
        return host.evaluator


class EvaluatorHost:
    """The models of one evaluator, loaded once.

    Holds the denoiser and the feature network, gives the model's ``facts``, computes exact
    reference statistics on that model, and builds the ``Evaluator`` once the reference
    statistics are known (at once if the factory has them or no metric needs them).

    Attributes:
        evaluator: the ``Evaluator`` (None until ``set_reference`` when a metric needs a
            reference the factory did not have).
        loads: models loaded by this host (1).
        load_s: seconds the denoiser and the feature network took to load.
    """

    def __init__(self, factory: EvaluatorFactory) -> None:
        self.factory = factory
        self.cfg = validate_config(factory.config)
        t0 = time.perf_counter()
        before = model_loads()
        self.denoiser = load_model(self.cfg)
        self.features = load_feature_net(self.cfg)
        self.loads = model_loads() - before
        self.load_s = time.perf_counter() - t0
        self.evaluator: Any = None
        if factory.reference is not None or self.cfg.metric.reference is None:
            self.set_reference(factory.reference)

    # Facts ------------------------------------------------------------------------------
    def facts(self) -> dict[str, Any]:
        """The model facts a run needs (plain data): sample ``shape``, ``sigma_min``,
        ``sigma_max``, ``sigma_grid`` (or None), ``cost``, ``name``, ``zoo`` members (or
        None), ``exact_samples`` (whether ``exact:<n>`` references work), ``guidance``
        (whether it takes guidance weights per step), and the feature network's
        ``features`` info (name, mode, dim)."""
        from searchd.models.conditional import supports_guidance

        d = self.denoiser
        grid = getattr(d, "sigma_grid", None)
        return {
            "shape": [int(s) for s in d.shape],
            "sigma_min": float(d.sigma_min),
            "sigma_max": float(d.sigma_max),
            "sigma_grid": None if grid is None else np.asarray(
                torch.as_tensor(grid).cpu(), np.float64).tolist(),
            "cost": float(getattr(d, "cost", 1.0)),
            "name": str(getattr(d, "name", self.cfg.model.name)),
            "zoo": list(getattr(d, "names", [])) if self.cfg.model.zoo is not None else None,
            "exact_samples": hasattr(d, "sample_data"),
            "guidance": bool(supports_guidance(d)),
            "conditional": bool(getattr(d, "conditional", False)),
            "n_classes": getattr(d, "n_classes", None) or getattr(self.features, "n_classes",
                                                                  None),
            "classifier_classes": getattr(self.features, "n_classes", None),
            "features": dict(self.features.info),
            "load_s": self.load_s,
        }

    # Reference --------------------------------------------------------------------------
    def exact_reference(self, n: int, seed_base: int) -> dict[str, Any]:
        """Reference statistics of ``n`` exact samples of the model (its data distribution)
        in the feature space, as plain data (``ReferenceStats.to_dict()``)."""
        from searchd.evaluation.reference import exact_reference

        self._check_exact(n)
        if self.cfg.metric.name == "class_fid":  # per class and the class-balanced pool
            from searchd.evaluation.conditional import exact_class_reference

            return exact_class_reference(self.denoiser, self.features,
                                         range(seed_base, seed_base + n),
                                         int(self.facts()["n_classes"])).to_dict()
        ref = exact_reference(self.denoiser, self.features, range(seed_base, seed_base + n))
        return ref.to_dict()

    def _check_exact(self, n: int) -> None:
        if not hasattr(self.denoiser, "sample_data"):
            raise ValueError(
                f"metric.reference = 'exact:{n}' needs a model with exact samples (the "
                f"embedded gmm-digits and digits-unet zoos); {model_label(self.cfg)!r} has "
                "none: give a reference .npz"
            )

    def exact_reference_part(self, lo: int, hi: int) -> dict[str, Any]:
        """Exact samples of seeds ``[lo, hi)`` and their features: one worker's share of
        ``exact_reference`` (``reference.exact_reference_part``; joined with
        ``reference.exact_reference_join``). Plain FID references only (a ``class_fid``
        reference is computed whole, ``exact_reference``)."""
        from searchd.evaluation.reference import exact_reference_part

        self._check_exact(hi - lo)
        if self.cfg.metric.name == "class_fid":
            raise ValueError("a class_fid reference is computed whole (exact_reference)")
        return exact_reference_part(self.denoiser, self.features, range(int(lo), int(hi)))

    def set_reference(self, reference: Mapping[str, Any] | None) -> None:
        """Build the ``Evaluator`` over the loaded models and these reference statistics."""
        from searchd.evaluation import Evaluator
        from searchd.evaluation.reference import ReferenceStats

        cfg = self.cfg
        ref = None
        kwargs: dict[str, Any] = dict(self.factory.evaluator_options)
        if cfg.metric.name == "class_fid":  # per-class statistics, and the run's objective
            from searchd.evaluation.conditional import ClassReference, objective_from_dict

            kwargs["class_reference"] = ClassReference.from_dict(reference)  # type: ignore
            kwargs["objective"] = objective_from_dict(reference.get("objective"))  # type: ignore
        elif reference is not None:
            ref = ReferenceStats.from_dict(reference)
            ref.check(self.features)
        if cfg.metric.options.get("teacher"):
            kwargs["teacher"] = cfg.metric.options["teacher"]
        evaluator = Evaluator(
            self.denoiser, self.features, ref, metrics=metrics_for(cfg),
            solver_options=dict(cfg.solver.options), **kwargs,
        )
        if cfg.model.zoo is not None and not getattr(self, "_latency_set", False):
            if self.factory.latency_ms is not None:
                self.denoiser.set_latency(self.factory.latency_ms, {"source": "run"})
            else:
                self.denoiser.measure_latency(cfg.model.latency_batch_size
                                              or evaluator.batch_size)
            self._latency_set = True
        self.evaluator = evaluator

    # Work -------------------------------------------------------------------------------
    def _ready(self) -> Any:
        if self.evaluator is None:
            raise RuntimeError("the evaluator has no reference statistics yet (set_reference)")
        return self.evaluator

    def evaluate(self, candidates: Any, seeds: Any) -> list[Any]:
        """``Evaluator.evaluate`` (one result per candidate, in order)."""
        return self._ready().evaluate(candidates, seeds)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(evaluator, *args, **kwargs)``: a job on the loaded evaluator."""
        return fn(self._ready(), *args, **kwargs)


def zoo_latency(evaluator: Any) -> dict[str, Any]:
    """The zoo's latencies as this evaluator measured them when it was built (a job)."""
    return evaluator.denoiser.latency_report()
