"""EDM networks (NVlabs/edm pickles) as denoisers.

An EDM snapshot (``network-snapshot-*.pkl``, or the published ``edm-cifar10-32x32-*.pkl``)
is a pickled dict whose ``"ema"`` entry is an ``EDMPrecond`` (or ``VPPrecond``,
``VEPrecond``, ``iDDPMPrecond``): ``net(x, sigma, class_labels) -> D(x, sigma)`` already
in the EDM convention, so it is wrapped with the ``edm`` parameterization and nothing is
converted. NVlabs' pickles embed their classes' source code through ``torch_utils.persistence``
and need NVlabs' ``torch_utils`` and ``dnnlib`` packages importable to load: if they are
not, loading stops with one line saying what to install. The file is only read (and
unpickled) after that check.

Unpickling runs whatever code the file names, so ``load_edm`` (and a ``kind: edm`` model of a
configuration) needs ``trust_remote_code=True`` (the command's ``--trust-remote-code``, the
configuration's ``model.trust_remote_code``); without it the file is not opened
(``UntrustedCodeError``, one line). ``read_edm_pickle`` is the raw read: it trusts its file.

Class-conditional networks (``label_dim > 0``, e.g. the conditional CIFAR-10 model) get
one-hot labels; row r (or sample ``sample_index[r]``) uses class ``r mod label_dim`` unless a
label table is given, so a block of samples covers the classes evenly. The zero vector is
the unconditional input (for guidance with networks trained with label dropout).
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from torch import nn

from searchd.models.generic import (
    EDM_SIGMA_MAX,
    EDM_SIGMA_MIN,
    ClassLabels,
    EDMDirect,
    NetworkDenoiser,
    call_positional,
    module_shape,
    require_trust,
)
from searchd.models.runtime import Runtime

NVLABS_PACKAGES = ("torch_utils", "dnnlib")
INSTALL_HINT = (
    "EDM pickles need NVlabs' code: git clone https://github.com/NVlabs/edm (or edm2) and "
    "add that directory to PYTHONPATH (export PYTHONPATH=/path/to/edm:$PYTHONPATH)"
)


class MissingNVlabsCode(ImportError):
    """NVlabs' ``torch_utils``/``dnnlib`` are needed by the pickle and cannot be imported."""


class _CheckedUnpickler(pickle.Unpickler):
    """An unpickler that turns a missing NVlabs package into ``MissingNVlabsCode``."""

    def find_class(self, module: str, name: str) -> Any:
        top = module.split(".", 1)[0]
        if top in NVLABS_PACKAGES:
            try:
                importlib.import_module(top)
            except ImportError:
                raise MissingNVlabsCode(INSTALL_HINT) from None
        return super().find_class(module, name)


def nvlabs_code_available() -> bool:
    """True if NVlabs' ``torch_utils`` and ``dnnlib`` can be imported."""
    for pkg in NVLABS_PACKAGES:
        try:
            importlib.import_module(pkg)
        except ImportError:
            return False
    return True


def read_edm_pickle(file: str | Path | BinaryIO, key: str = "ema") -> nn.Module:
    """The network stored in an EDM pickle: ``data[key]`` of a dict, or the object itself.
    Unpickles ``file`` as it is (it runs the code the file names): call it on trusted files
    only (``load_edm`` asks for ``trust_remote_code``).

    Raises:
        MissingNVlabsCode: the pickle refers to NVlabs' packages and they are not importable.
        ValueError: the pickle holds no torch module under ``key``.
    """
    if isinstance(file, (str, Path)):
        with open(file, "rb") as f:
            data = _CheckedUnpickler(f).load()
    else:
        data = _CheckedUnpickler(file).load()
    net = data.get(key) if isinstance(data, Mapping) else data
    if not isinstance(net, nn.Module):
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"the pickle holds no torch module under {key!r} (found: {keys})")
    return net


def load_edm(
    path: str | Path,
    *,
    key: str = "ema",
    labels: Sequence[int] | None = None,
    guidance_scale: float = 1.0,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    shape: Sequence[int] | None = None,
    cost: float = 1.0,
    runtime: Runtime | Mapping[str, Any] | None = None,
    name: str | None = None,
    trust_remote_code: bool = False,
) -> NetworkDenoiser:
    """Load an EDM pickle as a denoiser (unpickling runs code: ``trust_remote_code=True``
    is required, else ``UntrustedCodeError`` before the file is opened).

    Args:
        path: the ``.pkl`` file (local; download the published ones first).
        key: entry of the pickled dict holding the network (``"ema"``).
        labels: label table for class-conditional networks (default: every class in turn).
        guidance_scale: classifier-free guidance weight (1: none); the zero label vector is
            the unconditional input.
        sigma_min, sigma_max: the noise range to sample over (EDM: 0.002, 80).
        shape: sample shape; default ``(img_channels, img_resolution, img_resolution)``.
        cost: relative cost of one call per sample (doubled with guidance).
        runtime: a ``Runtime`` or its options.
        name: for messages (default: the file name without extension).
        trust_remote_code: the caller trusts the file (its unpickling runs code).
    """
    path = Path(path)
    require_trust(f"the EDM pickle {str(path)!r} (unpickling runs the code it names)",
                  trust_remote_code)
    if not path.is_file():
        raise ValueError(f"EDM pickle {path} does not exist (download it first)")
    net = read_edm_pickle(path, key)
    rt = runtime if isinstance(runtime, Runtime) else Runtime.from_options(runtime)
    sample_shape = tuple(shape) if shape is not None else module_shape(net)
    if sample_shape is None:
        raise ValueError(f"{path}: the network has no img_channels/img_resolution; give shape")
    label_dim = int(getattr(net, "label_dim", 0) or 0)
    cond = ClassLabels(label_dim, labels, one_hot=True) if label_dim > 0 else None
    if cond is None and labels is not None:
        raise ValueError(f"{path}: labels given for an unconditional network")
    return NetworkDenoiser(
        net,
        EDMDirect(sigma_min, sigma_max),
        sample_shape,
        call=call_positional,
        conditioning=cond,
        guidance_scale=guidance_scale,
        runtime=rt,
        cost=cost * (2.0 if guidance_scale != 1.0 else 1.0),
        name=name or path.stem,
    )
