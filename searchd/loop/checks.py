"""The checks that run before anything starts (no Ray, no model): names against their
registries, files that must exist and what they must hold, the environment.

``preflight(cfg, on_cluster)`` raises ``BadInput`` (or ``ConfigError``), one line each:

- the model: a zoo name, the zoo's members, or a checkpoint spec (kind, options, path);
- model schedules: a solver that makes 1 or 2 calls per step;
- the feature network: a known one, and for Inception its weights present (not checked on a
  cluster: they are on the nodes);
- the reference file: it exists, holds ``mu`` and ``sigma`` of matching shapes, and was
  made in the configured feature network's space where it says so (its dimension is checked
  against the network once the model is loaded: ``stages.check_model``);
- an earlier run's ``best.json`` as an adaptive run's global schedule;
- ``SEARCHD_FAULT``, when set, names a fault point.

The checks that need the model (noise range, grid, reference dimension, exact samples) run
once the evaluators have loaded it, before the search: ``searchd.loop.stages.check_model``.
"""

from __future__ import annotations

import zipfile

from searchd.config import SearchConfig
from searchd.loop.runs import BadInput


def preflight(cfg: SearchConfig, *, on_cluster: bool = False) -> None:
    """Cheap checks of names, files and the environment; see the module docstring."""
    from searchd import faults

    try:
        faults.configured()
    except ValueError as e:
        raise BadInput(str(e)) from None
    _check_model(cfg)
    _check_features(cfg, on_cluster)
    _check_reference(cfg)
    from searchd.loop.adaptive import check_global_best

    check_global_best(cfg)


def _check_model(cfg: SearchConfig) -> None:
    from searchd.models import known_models

    if cfg.model.name is not None and cfg.model.spec is None:
        if cfg.model.name not in known_models():
            raise BadInput(
                f"model.name = {cfg.model.name!r} is not a known model; known: {known_models()} "
                "(or a checkpoint: 'diffusers:DIR', 'edm:FILE.pkl', 'generic:module:function')"
            )
    for i, member in enumerate(cfg.model.zoo or []):
        if member not in known_models():
            raise BadInput(f"model.zoo.{i} = {member!r} is not a known model; known: "
                           f"{known_models()}")
    if cfg.space.kind in ("models", "joint"):
        from searchd.schedules.cost import calls_per_step

        try:
            calls_per_step(cfg.solver.name, cfg.n_steps, cfg.space.final_zero)
        except ValueError as e:
            raise BadInput(f"solver.name: {e}") from None
    if cfg.model.spec is not None:
        from searchd.models.adapters import check_spec

        spec = cfg.model.spec
        try:
            check_spec(spec.kind, spec.path, spec.options)
        except (ValueError, OSError) as e:  # OSError: a path the OS refuses (too long)
            raise BadInput(str(e)) from None
        _check_trust(cfg)


def _check_trust(cfg: SearchConfig) -> None:
    """A model whose loading runs code from a file (an EDM pickle, a generic entry point, a
    diffusers text encoder named by entry point) needs ``model.trust_remote_code``."""
    from searchd.models.generic import UntrustedCodeError, require_trust

    spec = cfg.model.spec
    assert spec is not None
    what = {"edm": f"the EDM pickle {spec.path!r} (unpickling runs the code it names)",
            "generic": f"the entry point {spec.path!r} (imported and called)"}.get(spec.kind)
    encoder = spec.options.get("text_encoder")
    if what is None and spec.kind == "diffusers" and isinstance(encoder, str):
        what = f"the text encoder entry point {encoder!r} (imported and called)"
    if what is not None:
        try:
            require_trust(f"model kind {spec.kind!r}: {what}", cfg.model.trust_remote_code)
        except UntrustedCodeError as e:
            raise BadInput(str(e)) from None


def _check_features(cfg: SearchConfig, on_cluster: bool) -> None:
    from searchd.evaluation.features import FEATURES, inception_path, missing_inception_message

    name = cfg.metric.features
    if name not in FEATURES:
        raise BadInput(f"metric.features = {name!r}; known feature networks: {sorted(FEATURES)}")
    opts = dict(cfg.metric.options.get("features", {}))
    if name == "inception" and not on_cluster and not opts.get("download"):
        file = inception_path(opts.get("path"))
        if not file.is_file():
            raise BadInput(f"metric.features = 'inception': {missing_inception_message(file)}")


def _check_reference(cfg: SearchConfig) -> None:
    from searchd.evaluation.reference import ReferenceStats

    ref = cfg.metric.reference
    if ref is None or cfg.metric.exact_reference is not None or "://" in ref:
        return
    try:
        stats = ReferenceStats.load(ref)
    except FileNotFoundError:
        raise BadInput(f"metric.reference = {ref!r} does not exist") from None
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise BadInput(f"metric.reference = {ref!r}: {' '.join(str(e).split())}") from None
    try:
        stats.check(features=cfg.metric.features)
    except ValueError as e:
        raise BadInput(f"metric.reference: {e}") from None
