"""How a neural denoiser runs: device, precision, memory layout, compilation and batch size.

One ``Runtime`` value describes the execution of a network; ``prepare_module`` applies it to
a ``torch.nn.Module`` once, and ``Runtime.context`` is entered around every forward pass.
The same code runs on a CPU (float32, no autocast, a configured batch size) and on a GPU
(bf16/fp16 autocast, channels_last, ``torch.compile``, the largest batch that fits).

Nothing here knows about noise levels: the parameterization lives in ``generic.py``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

Autocast = Literal["bf16", "fp16"] | None
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Batch size used on devices where out-of-memory cannot be detected by trying (CPU, MPS).
DEFAULT_CPU_BATCH = 256
# Upper end of the doubling search on CUDA (rows of one network call).
MAX_AUTO_BATCH = 1 << 14


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else MPS if available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


@dataclass(frozen=True)
class Runtime:
    """Execution settings of one network.

    Attributes:
        device: where the network runs (``"auto"`` is resolved by ``resolve``).
        dtype: dtype of the parameters (float32 unless a half-precision copy is wanted).
        autocast: None, ``"bf16"`` or ``"fp16"``: run the forward pass under
            ``torch.autocast`` (parameters stay in ``dtype``). Ignored on the CPU unless
            ``autocast_on_cpu`` is set, so CPU results are float32.
        autocast_on_cpu: allow autocast on the CPU too (bf16 only is well supported there).
        channels_last: store 4-D weights and inputs in channels-last memory format (faster
            convolutions with tensor cores; harmless elsewhere).
        compile: compile the network with ``torch.compile`` (once, lazily).
        compile_mode: ``torch.compile`` mode (e.g. ``"max-autotune"``), or None.
        compile_backend: ``torch.compile`` backend (``"inductor"``; ``"eager"`` for tests).
        inference_mode: run under ``torch.inference_mode`` when no input requires a gradient
            (outputs are then inference tensors); otherwise under ``torch.no_grad``.
        batch_size: rows per network call: an int, or ``"auto"``: on CUDA the largest power
            of two (refined by bisection) that runs without running out of memory, found once;
            elsewhere ``cpu_batch_size``.
        cpu_batch_size: rows per call where ``"auto"`` cannot probe memory.
    """

    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    autocast: Autocast = None
    autocast_on_cpu: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    inference_mode: bool = True
    batch_size: int | Literal["auto"] = "auto"
    cpu_batch_size: int = DEFAULT_CPU_BATCH

    def __post_init__(self) -> None:
        if self.autocast not in (None, *AUTOCAST_DTYPES):
            raise ValueError(
                f"autocast = {self.autocast!r}; allowed: None, {', '.join(AUTOCAST_DTYPES)}"
            )
        if self.batch_size != "auto" and (
            not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ValueError(f"batch_size = {self.batch_size!r}; allowed: an int >= 1 or 'auto'")
        if self.cpu_batch_size < 1:
            raise ValueError(f"cpu_batch_size = {self.cpu_batch_size!r}; must be >= 1")
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype = {self.dtype}; a floating-point dtype is required")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None = None, **defaults: Any) -> Runtime:
        """A Runtime from plain options (a config's ``model.spec.options.runtime``).

        ``dtype`` may be a string (``"float32"``, ``"bfloat16"``, ...); unknown keys raise
        ``ValueError`` naming the allowed ones.
        """
        merged = {**defaults, **(options or {})}
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(merged) - allowed)
        if unknown:
            raise ValueError(f"unknown runtime options {unknown}; allowed: {sorted(allowed)}")
        if isinstance(merged.get("dtype"), str):
            merged["dtype"] = parse_dtype(merged["dtype"])
        return cls(**merged)

    def resolve(self) -> Runtime:
        """This runtime with ``device`` resolved to a ``torch.device``."""
        return replace(self, device=resolve_device(self.device))

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype actually used on this device, or None (plain ``dtype``)."""
        if self.autocast is None:
            return None
        if self.torch_device.type == "cpu" and not self.autocast_on_cpu:
            return None
        return AUTOCAST_DTYPES[self.autocast]

    @contextlib.contextmanager
    def context(self, *, grad: bool = False) -> Iterator[None]:
        """Enter around a forward pass: autocast (if any) and inference mode / no_grad.

        ``grad=True`` keeps autograd on (gradient-based schedule searches).
        """
        with contextlib.ExitStack() as stack:
            if not grad:
                stack.enter_context(
                    torch.inference_mode() if self.inference_mode else torch.no_grad()
                )
            ac = self.autocast_dtype
            if ac is not None:
                stack.enter_context(torch.autocast(device_type=self.torch_device.type, dtype=ac))
            yield

    @property
    def io_dtype(self) -> torch.dtype:
        """dtype of time values fed to, and outputs taken from, the network: float64 for a
        float64 network, else float32."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def input_tensor(self, x: Tensor) -> Tensor:
        """Move a network input to the device, in the parameters' dtype (float32 under
        autocast), in channels-last layout when set and ``x`` is 4-D."""
        dtype = torch.float32 if self.autocast_dtype is not None else self.dtype
        x = x.to(device=self.torch_device, dtype=dtype if x.is_floating_point() else x.dtype)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"fp32"``, ``"float16"``/``"fp16"``, ``"bfloat16"``/``"bf16"``,
    ``"float64"`` -> the torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float64": torch.float64,
        "fp64": torch.float64,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; allowed: {sorted(table)}")
    return table[name]


def prepare_module(module: nn.Module, runtime: Runtime) -> nn.Module:
    """Put a network in inference shape: eval mode, no parameter gradients, on the device in
    the runtime's dtype, channels-last if asked, compiled if asked. Returns the module to
    call (the compiled wrapper when compiling; the original module is modified in place)."""
    module.eval().requires_grad_(False)
    floats = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if floats and floats != {runtime.dtype}:
        module.to(dtype=runtime.dtype)
    module.to(device=runtime.torch_device)
    if runtime.channels_last:
        module.to(memory_format=torch.channels_last)
    if runtime.compile:
        return torch.compile(module, mode=runtime.compile_mode, backend=runtime.compile_backend)
    return module


def is_out_of_memory(err: BaseException) -> bool:
    """True for CUDA/MPS out-of-memory errors (the exception type, or its message)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def find_max_batch(
    try_batch: Callable[[int], Any],
    *,
    start: int = 1,
    limit: int = MAX_AUTO_BATCH,
    refine_steps: int = 3,
    on_oom: Callable[[], None] | None = None,
) -> int:
    """The largest batch size that ``try_batch(b)`` runs without running out of memory.

    Doubles from ``start`` until a size fails (or ``limit`` is reached), then bisects between
    the last size that ran and the first that failed for ``refine_steps`` steps. Only
    out-of-memory errors (``is_out_of_memory``) count as "does not fit"; anything else is
    raised. ``on_oom`` runs after each failure (e.g. ``torch.cuda.empty_cache``).

    Raises:
        RuntimeError: if even ``start`` rows do not fit.
    """

    def fits(b: int) -> bool:
        try:
            try_batch(b)
        except Exception as err:  # noqa: BLE001 - filtered below
            if not is_out_of_memory(err):
                raise
            if on_oom is not None:
                on_oom()
            return False
        return True

    if not fits(start):
        raise RuntimeError(f"a batch of {start} rows does not fit in memory")
    ok, bad = start, None
    while ok < limit:
        b = min(2 * ok, limit)
        if fits(b):
            ok = b
        else:
            bad = b
            break
    for _ in range(refine_steps if bad is not None else 0):
        mid = (ok + bad) // 2
        if mid <= ok:
            break
        if fits(mid):
            ok = mid
        else:
            bad = mid
    return ok


def auto_batch_size(
    forward: Callable[[int], Any], runtime: Runtime, *, limit: int = MAX_AUTO_BATCH
) -> int:
    """Rows per network call for ``runtime``: its ``batch_size`` if an int; on CUDA with
    ``"auto"``, ``find_max_batch(forward)`` (``forward(b)`` runs one call of b rows);
    otherwise ``runtime.cpu_batch_size``."""
    if isinstance(runtime.batch_size, int):
        return runtime.batch_size
    device = runtime.torch_device
    if device.type != "cuda":
        return runtime.cpu_batch_size

    def run(b: int) -> None:
        forward(b)
        torch.cuda.synchronize(device)

    size = find_max_batch(run, limit=limit, on_oom=torch.cuda.empty_cache)
    torch.cuda.empty_cache()
    log.info("automatic batch size on %s: %d rows per call", device, size)
    return size
