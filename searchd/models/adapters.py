"""Real checkpoints by spec: one dispatcher over the diffusers, EDM and generic adapters.

``load_spec(spec, device, dtype)`` loads a ``ModelSpec``-like object (``name``, ``kind``,
``path``, ``options``; e.g. ``searchd.models.ModelSpec`` or a config's ``model.spec``):

- ``kind: diffusers``: ``path`` a pipeline/model directory or hub id; options are the
  keywords of ``searchd.models.diffusers.load_diffusers`` (``prompts``, ``guidance_scale``,
  ``prediction_type``, ``parameterization``, ...);
- ``kind: edm``: ``path`` an NVlabs pickle; options of ``searchd.models.edm.load_edm``;
- ``kind: generic``: ``path`` an entry point ``module:function``; options of
  ``searchd.models.generic.load_entry_point`` (``args``, ``parameterization``, ``shape``,...);
- ``edm`` and ``generic`` run code from their file (unpickling, importing): the spec's
  ``options`` must hold ``trust_remote_code: True`` (what a configuration's
  ``model.trust_remote_code`` puts there), else ``UntrustedCodeError``;
- a ``name`` of ``NEURAL_ZOO`` (no kind): the shipped digits UNets.

Every kind takes ``options.runtime`` (``searchd.models.runtime.Runtime`` fields: autocast,
channels_last, compile, batch_size, ...); ``device`` and ``dtype`` come from the caller.
``KINDS`` and ``neural_zoo_factory`` have the ``Factory`` signature of
``searchd.models.zoo`` so the registry can adopt them as they are.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from searchd.models.base import Denoiser
from searchd.models.diffusers import load_diffusers
from searchd.models.edm import load_edm
from searchd.models.generic import load_entry_point
from searchd.models.names import (
    CONDITIONAL_NEURAL_NAMES,
    FLOW_ZOO_NAMES,
    NEURAL_KINDS,
    NEURAL_ZOO_NAMES,
)
from searchd.models.runtime import Runtime

DATA_DIR = Path(__file__).resolve().parent / "data"

# The neural digits zoo (scripts/train_digits_unet.py): name -> diffusers model directory.
NEURAL_ZOO: dict[str, Path] = {name: DATA_DIR / name for name in NEURAL_ZOO_NAMES}
# Its rectified-flow members (scripts/train_digits_flow.py): diffusers flow checkpoints whose
# parameterization comes from their FlowMatchEulerDiscreteScheduler config, as a user's
# SD3-style checkpoint's does.
FLOW_ZOO: dict[str, Path] = {name: DATA_DIR / name for name in FLOW_ZOO_NAMES}
# Class-conditional digits UNets (scripts/train_digits_unet_cond.py): name -> directory.
CONDITIONAL_ZOO: dict[str, Path] = {name: DATA_DIR / name for name in CONDITIONAL_NEURAL_NAMES}
_SHIPPED: dict[str, Path] = {**NEURAL_ZOO, **FLOW_ZOO, **CONDITIONAL_ZOO}

# Options of kind "generic" (searchd.models.generic.load_entry_point).
GENERIC_OPTIONS = (
    "args", "parameterization", "shape", "call", "guidance_scale", "cost",
    "num_classes", "labels", "one_hot", "null_label",
)
# A hub id: "org/name" (one slash, no path-like start).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

SpecFactory = Callable[[Any, torch.device, torch.dtype], Denoiser]


def _runtime(options: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> Runtime:
    """The runtime of a spec: its ``options.runtime`` with the caller's device and dtype."""
    rt_opts = dict(options.pop("runtime", None) or {})
    rt_opts.setdefault("device", device)
    rt_opts.setdefault("dtype", dtype)
    return Runtime.from_options(rt_opts)


def _check_options(
    kind: str, fn: Callable[..., Any], options: Mapping[str, Any], reserved: tuple[str, ...]
) -> None:
    """Unknown option keys -> ``ValueError`` naming the allowed ones."""
    allowed = [p for p in inspect.signature(fn).parameters if p not in reserved]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for model kind {kind!r}; "
            f"allowed: {', '.join(allowed)}, runtime"
        )


def _spec_fields(spec: Any) -> tuple[str | None, str | None, str | None, dict[str, Any]]:
    name = getattr(spec, "name", None)
    kind = getattr(spec, "kind", None)
    path = getattr(spec, "path", None)
    options = dict(getattr(spec, "options", None) or {})
    return name, kind, None if path is None else str(path), options


def _load_path_spec(
    spec: Any, kind: str, loader: Any, what: str, device: torch.device | str,
    dtype: torch.dtype,
) -> Denoiser:
    """A spec whose ``path`` goes to ``loader(path, runtime=..., **options)``."""
    name, _, path, options = _spec_fields(spec)
    if path is None:
        raise ValueError(f"model {name!r} of kind {kind!r} needs a path ({what})")
    rt = _runtime(options, device, dtype)
    _check_options(kind, loader, options, ("path", "runtime"))
    options.setdefault("name", name)
    return loader(path, runtime=rt, **options)


def load_diffusers_spec(
    spec: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Denoiser:
    """``kind: diffusers``."""
    return _load_path_spec(spec, "diffusers", load_diffusers, "directory or hub id", device,
                           dtype)


def load_edm_spec(
    spec: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Denoiser:
    """``kind: edm``."""
    return _load_path_spec(spec, "edm", load_edm, "the .pkl file", device, dtype)


def load_generic_spec(
    spec: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Denoiser:
    """``kind: generic``: ``path`` is the entry point ``module:function``."""
    name, _, path, options = _spec_fields(spec)
    if path is None:
        raise ValueError(f"model {name!r} of kind 'generic' needs path: 'module:function'")
    rt = _runtime(options, device, dtype)
    trust = bool(options.pop("trust_remote_code", False))
    return load_entry_point(path, options, runtime=rt, name=name, trust_remote_code=trust)


KINDS: dict[str, SpecFactory] = {
    "diffusers": load_diffusers_spec,
    "edm": load_edm_spec,
    "generic": load_generic_spec,
}


class DigitsData:
    """The data a neural digits model was trained on, as its "exact samples".

    ``sample_data(seeds)`` returns scikit-learn digit number ``seed mod 1797`` for each seed,
    scaled to [-1, 1] (``x / 8 - 1``), as [len(seeds), 1, 8, 8]. Any 1,797 consecutive seeds
    give every digit exactly once, so an ``exact:1797`` reference is the exact statistics of
    the whole dataset, whatever the seed base; larger n repeat the dataset.
    """

    def __init__(self) -> None:
        self._images: torch.Tensor | None = None

    @property
    def images(self) -> torch.Tensor:
        """All digits, float64 [1797, 1, 8, 8] in [-1, 1] (loaded once)."""
        if self._images is None:
            from sklearn.datasets import load_digits

            x = torch.from_numpy(load_digits().images).to(torch.float64)
            self._images = (x / 8.0 - 1.0).unsqueeze(1)
        return self._images

    def __call__(
        self,
        seeds: Any,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        idx = torch.as_tensor([int(s) for s in seeds], dtype=torch.int64)
        if (idx < 0).any():
            raise ValueError("seeds must be >= 0")
        out = self.images[idx % self.images.shape[0]]
        return out.to(device=device or "cpu", dtype=dtype or torch.float32)


def load_neural_zoo(
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> Denoiser:
    """A shipped digits UNet by name (``digits-unet-s``, ``-m``, ``-l``, ``-cond-s``; the
    flow members ``digits-flow-s``, ``-m``), loaded by ``load_diffusers`` like any diffusers
    folder.

    Its ``sample_data`` (``DigitsData``) gives the training digits as exact samples, so
    ``metric.reference: exact:1797`` scores against the dataset's own statistics; the
    class-conditional member's (``ClassDigitsData``) gives real digits of each seed's class.
    """
    if name not in _SHIPPED:
        raise ValueError(f"unknown neural zoo member {name!r}; known: {sorted(_SHIPPED)}")
    path = _SHIPPED[name]
    if not (path / "config.json").is_file():
        script = ("train_digits_flow" if name in FLOW_ZOO else
                  "train_digits_unet_cond" if name in CONDITIONAL_ZOO else "train_digits_unet")
        raise ValueError(f"{name}: weights missing at {path} (run scripts/{script}.py)")
    rt = _runtime(options, device, dtype)
    den = load_diffusers(path, runtime=rt, name=name, **options)
    if den.conditional:
        from searchd.models.conditional import ClassDigitsData

        # Exact samples of the class each seed asks for (seed mod 10): real digits.
        den.sample_data = ClassDigitsData()  # type: ignore[attr-defined]
    else:
        den.sample_data = DigitsData()  # type: ignore[attr-defined]
    return den


def neural_zoo_factory(name: str) -> SpecFactory:
    """A registry factory ``(spec, device, dtype) -> Denoiser`` for one neural zoo member
    (the spec's options, e.g. ``runtime``, are passed on)."""

    def factory(spec: Any, device: torch.device, dtype: torch.dtype) -> Denoiser:
        return load_neural_zoo(name, device, dtype, **_spec_fields(spec)[3])

    return factory


def check_spec(
    kind: str, path: str, options: Mapping[str, Any] | None = None, *, check_path: bool = True
) -> None:
    """Cheap checks of a checkpoint spec before anything is loaded (the search driver's
    preflight): a known kind, known option keys and runtime options, and (``check_path``) a
    path that can exist for the kind. Raises ``ValueError`` / ``FileNotFoundError`` with one
    line naming the problem."""
    known = ["gmm", *NEURAL_KINDS]
    if kind not in known:
        raise ValueError(f"model kind {kind!r} is unknown; known kinds: {', '.join(known)}")
    opts = dict(options or {})
    runtime = opts.pop("runtime", None)
    if runtime is not None and not isinstance(runtime, Mapping):
        raise ValueError("model options.runtime must be a mapping of Runtime fields")
    Runtime.from_options({k: v for k, v in (runtime or {}).items() if k != "device"})
    if kind == "gmm":
        if opts:
            raise ValueError(f"model kind 'gmm' takes no options; got {sorted(opts)}")
        if check_path and not Path(path).is_file():
            raise FileNotFoundError(f"model path {path!r} (kind gmm) is not a file")
    elif kind == "edm":
        _check_options("edm", load_edm, opts, ("path", "runtime", "trust_remote_code"))
        if check_path and "://" not in path and not Path(path).is_file():
            raise FileNotFoundError(
                f"model path {path!r} (kind edm) is not a file: give the .pkl (see "
                "configs/cifar10-edm.yaml for where to get one)"
            )
    elif kind == "diffusers":
        _check_options("diffusers", load_diffusers, opts, ("path", "runtime"))
        prompts = opts.get("prompts")
        if check_path and isinstance(prompts, str) and not Path(prompts).is_file():
            raise FileNotFoundError(f"model options.prompts {prompts!r} is not a file")
        p = Path(path).expanduser()
        if not check_path:
            pass
        elif p.exists():
            if not p.is_dir():
                raise ValueError(f"model path {path!r} (kind diffusers) must be a directory")
        elif not _HUB_ID.fullmatch(path):
            raise FileNotFoundError(
                f"model path {path!r} (kind diffusers) is neither a directory nor a hub id "
                "('org/name')"
            )
    elif kind == "generic":
        unknown = sorted(set(opts) - set(GENERIC_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown options {unknown} for model kind 'generic'; "
                f"allowed: {', '.join(GENERIC_OPTIONS)}, runtime"
            )
        module, sep, fn = path.rpartition(":")
        if not sep or not module or not fn:
            raise ValueError(
                f"model path {path!r} (kind generic) must be 'module:function' or "
                "'file.py:function'"
            )
        is_file = module.endswith(".py") or "/" in module
        if check_path and is_file and not Path(module).expanduser().is_file():
            raise FileNotFoundError(f"model entry point file {module!r} does not exist")


def load_spec(
    spec: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Denoiser:
    """Load a real checkpoint or a neural zoo member from a spec (see the module docstring).

    Raises ``ValueError`` naming the known kinds (or zoo names) for an unknown one.
    """
    name, kind, _, options = _spec_fields(spec)
    if kind is None:
        if name in _SHIPPED:
            return load_neural_zoo(str(name), device, dtype, **options)
        raise ValueError(
            f"unknown model {name!r}: give a kind ({', '.join(KINDS)}) or one of "
            f"{', '.join(sorted(_SHIPPED))}"
        )
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[kind](spec, device, dtype)
