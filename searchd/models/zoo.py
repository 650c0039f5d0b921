"""The model registry: a name (or a small spec) -> a loaded ``Denoiser``.

Two tables, both open for adapters added later:

- names (``register``): fixed models such as the embedded ``gmm-digits-k*`` mixtures, whose
  parameters ship in ``searchd/models/data/``;
- kinds (``register_kind``): families loaded from a path given in the spec, e.g.
  ``ModelSpec(name="my-mixture", kind="gmm", path="mix.npz")``.

Registered here: the names ``gmm-digits-k*`` (and the alias ``gmm-digits``),
``gmm-digits-cond`` (one mixture per digit class, ``searchd.models.conditional``),
``digits-unet-{s,m,l}`` and ``digits-flow-{s,m}`` (the neural digits zoo, EDM-trained and
rectified-flow, ``searchd.models.adapters``) and ``digits-unet-cond-s`` (its
class-conditional member, with an unconditional mode); the kinds
``gmm`` (an ``.npz`` mixture), ``diffusers`` (a diffusers pipeline or model directory, or a
hub id), ``edm`` (an NVlabs EDM pickle) and ``generic`` (an entry point
``module:function``). The neural adapters are imported on first use, so importing this
module stays cheap. A spec with a ``kind`` is looked up by kind; otherwise by name; the
string ``"kind:path"`` (``parse_model_ref``) is a spec with a kind.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from searchd.models.base import Denoiser
from searchd.models.gmm import GaussianMixtureDenoiser
from searchd.models.names import (
    CONDITIONAL_NEURAL_NAMES,
    FLOW_ZOO_NAMES,
    NEURAL_KINDS,
    NEURAL_ZOO_NAMES,
)

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a registered ``name``, or a ``kind`` of model read from ``path``.

    ``options`` are adapter-specific keywords (prediction type, class label, ...); a spec
    with a kind but no name is named after its path.
    """

    name: str | None = None
    path: str | None = None
    kind: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name is None and self.kind is None:
            raise ValueError("a model spec needs a name or a kind (with a path)")
        if self.name is None:
            object.__setattr__(self, "name", Path(str(self.path)).stem if self.path else self.kind)


Factory = Callable[[ModelSpec, torch.device, torch.dtype], Denoiser]

_NAMES: dict[str, Factory] = {}
_KINDS: dict[str, Factory] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Register a model under ``name``; ``factory(spec, device, dtype)`` builds it."""
    if not replace and (name in _NAMES or name in _ALIASES):
        raise ValueError(f"model name {name!r} is already registered")
    _NAMES[name] = factory


def register_kind(kind: str, factory: Factory, *, replace: bool = False) -> None:
    """Register a kind of model loaded from ``spec.path`` by ``factory(spec, device, dtype)``."""
    if not replace and kind in _KINDS:
        raise ValueError(f"model kind {kind!r} is already registered")
    _KINDS[kind] = factory


def register_alias(alias: str, target: str) -> None:
    """Make ``alias`` another name of the registered model ``target``."""
    if target not in _NAMES:
        raise ValueError(f"alias target {target!r} is not a registered model")
    if alias in _NAMES:
        raise ValueError(f"model name {alias!r} is already registered")
    _ALIASES[alias] = target


def known_models() -> list[str]:
    """Every name ``load`` accepts (registered names and aliases), sorted."""
    return sorted([*_NAMES, *_ALIASES])


def known_kinds() -> list[str]:
    """Every kind a spec may name, sorted."""
    return sorted(_KINDS)


def parse_model_ref(ref: str) -> tuple[str, str] | None:
    """``"kind:path"`` -> ``(kind, path)``; None for a plain name (no colon).

    The path is everything after the first colon, so ``"generic:pkg.mod:make"`` is the entry
    point ``pkg.mod:make`` and ``"diffusers:/abs/dir"`` an absolute directory.
    """
    kind, sep, path = ref.partition(":")
    if not sep:
        return None
    if not kind or not path:
        raise ValueError(f"model {ref!r}: expected 'kind:path' with kind one of {known_kinds()}")
    return kind, path


def as_spec(name_or_spec: str | ModelSpec | Any) -> ModelSpec:
    """A ``ModelSpec`` from a name, a ``"kind:path"`` string, a spec, or any object with
    ``name`` and/or ``kind`` and ``path`` (and optional ``options``) attributes, such as a
    configuration model."""
    if isinstance(name_or_spec, ModelSpec):
        return name_or_spec
    if isinstance(name_or_spec, str):
        ref = parse_model_ref(name_or_spec)
        if ref is not None:
            return ModelSpec(kind=ref[0], path=ref[1])
        return ModelSpec(name=name_or_spec)
    name, kind = getattr(name_or_spec, "name", None), getattr(name_or_spec, "kind", None)
    if name is None and kind is None:
        raise TypeError(f"expected a model name or spec; got {type(name_or_spec).__name__}")
    path = getattr(name_or_spec, "path", None)
    return ModelSpec(
        name=None if name is None else str(name),
        path=None if path is None else str(path),
        kind=None if kind is None else str(kind),
        options=dict(getattr(name_or_spec, "options", None) or {}),
    )


def load(
    name_or_spec: str | ModelSpec | Any,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Denoiser:
    """Load a model by name (``"gmm-digits-k64"``, ``"gmm-digits"``) or spec.

    Raises ``ValueError`` listing the known names (or kinds) for an unknown one.
    """
    spec = as_spec(name_or_spec)
    device = torch.device(device)
    if spec.kind is not None:
        if spec.kind not in _KINDS:
            raise ValueError(f"unknown model kind {spec.kind!r}; known kinds: {known_kinds()}")
        if spec.path is None:
            raise ValueError(f"model {spec.name!r} of kind {spec.kind!r} needs a path")
        return _KINDS[spec.kind](spec, device, dtype)
    name = _ALIASES.get(str(spec.name), str(spec.name))
    if name not in _NAMES:
        raise ValueError(f"unknown model {spec.name!r}; known models: {known_models()}")
    return _NAMES[name](spec, device, dtype)


def zoo(
    names: Iterable[str | ModelSpec | Any],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[Denoiser]:
    """Load several models, in order (the members of a model schedule)."""
    return [load(n, device, dtype) for n in names]


# Embedded Gaussian mixtures ---------------------------------------------------------------
def _load_gmm_file(path: Path, name: str, device: torch.device, dtype: torch.dtype) -> Denoiser:
    return GaussianMixtureDenoiser.from_npz(path, device=device, dtype=dtype, name=name)


def _gmm_kind(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Denoiser:
    return _load_gmm_file(Path(str(spec.path)), str(spec.name), device, dtype)


def _embedded(path: Path) -> Factory:
    def factory(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Denoiser:
        return _load_gmm_file(path, path.stem, device, dtype)

    return factory


def _register_embedded() -> None:
    """Register every shipped ``gmm-digits-k{K}.npz``; ``gmm-digits`` is the largest K."""
    members = []
    for path in DATA_DIR.glob("gmm-digits-k*.npz"):
        m = re.fullmatch(r"gmm-digits-k(\d+)", path.stem)
        if m:
            members.append((int(m.group(1)), path))
    for _, path in sorted(members):
        register(path.stem, _embedded(path))
    if members:
        register_alias("gmm-digits", max(members)[1].stem)
    cond = DATA_DIR / "gmm-digits-cond.npz"
    if cond.is_file():
        register(cond.stem, _embedded_conditional(cond))


def _embedded_conditional(path: Path) -> Factory:
    def factory(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Denoiser:
        from searchd.models.conditional import ConditionalGaussianMixture

        return ConditionalGaussianMixture.from_npz(path, device=device, dtype=dtype,
                                                   name=path.stem)

    return factory


# Neural adapters (searchd.models.adapters), imported on first use -----------------------------
def _adapter_kind(kind: str) -> Factory:
    def factory(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Denoiser:
        from searchd.models.adapters import KINDS

        return KINDS[kind](spec, device, dtype)

    return factory


def _neural_zoo_member(name: str) -> Factory:
    def factory(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> Denoiser:
        from searchd.models.adapters import neural_zoo_factory

        return neural_zoo_factory(name)(spec, device, dtype)

    return factory


register_kind("gmm", _gmm_kind)
for _kind in NEURAL_KINDS:
    register_kind(_kind, _adapter_kind(_kind))
_register_embedded()
for _name in (*NEURAL_ZOO_NAMES, *FLOW_ZOO_NAMES, *CONDITIONAL_NEURAL_NAMES):
    register(_name, _neural_zoo_member(_name))
