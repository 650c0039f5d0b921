"""Timestep predictors: small networks that choose a per-sample schedule at sampling time.

Both predictors express their schedule as bounded offsets over a global schedule ``g``
(the global best: searched, LD3, GITS): level j is ``g_j * exp(u_j)`` with
``u_j = b_j tanh(r_j)`` for ``r_j >= 0`` and ``a_j tanh(r_j)`` below, ``r`` the network's raw
output. ``b_j`` is a fraction (``OFFSET_FRACTION``) of the log-gap to the level above and
``a_j`` of the log-gap to the level below (for the lowest positive level: of the log-gap to
``sigma_min``), so every output is a strictly decreasing schedule inside the model's range,
whatever the network says, and a raw output of exactly 0 gives exactly ``g`` (``exp(0)`` is
1; the arithmetic is float64). The networks' last layers start at zero: an untrained
predictor *is* the global schedule, bit for bit.

- ``OneShotPredictor``: one network maps a feature of the sample to all free levels at
  once. Its feature is the first denoiser output ``D(z sigma_max, sigma_max)`` (the first
  evaluation of every solver, so it costs no extra NFE: the policy answers at step 0) or
  the noise ``z`` itself.
- ``DeltaPredictor``: recursive; after the first evaluation of step i a network maps the
  state (``x_i`` scaled to unit variance, ``D(x_i, sigma_i)``, the step, ``log sigma_i``) to
  the offset of level ``i + 1``.

Both are ``torch.nn.Module`` s whose ``forward`` is TorchScript-compatible, and both give a
``SchedulePolicy`` (``policy()``) that ``searchd.solvers.solve`` takes in place of a schedule.
Training (``fit_*``) regresses the offsets of oracle schedules (``searchd.adaptive.oracle``)
fitted on training noises, disjoint from evaluation seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from searchd.models.base import Denoiser
from searchd.schedule import validate_sigmas
from searchd.solvers import solve
from searchd.solvers.policy import SchedulePolicy

# Offsets move a level by at most this fraction of the log-gap to each neighbour (< 0.5, so
# two neighbours can never cross), and the lowest positive level by at most END_FRACTION of
# its log-gap to sigma_min (it has no neighbour below but 0).
OFFSET_FRACTION = 0.49
END_FRACTION = 0.9
INPUTS = ("denoised", "noise")


class OffsetHead(nn.Module):
    """Raw outputs [B, n_free] -> schedules [B, N+1] (float64), bounded around ``g``."""

    def __init__(self, global_sigmas: Any, sigma_min: float) -> None:
        super().__init__()
        g = validate_sigmas(global_sigmas)
        if not 0 < sigma_min <= g[g > 0].min():
            raise ValueError(f"sigma_min = {sigma_min!r}; it must be in (0, lowest level "
                             f"{float(g[g > 0].min())!r}]")
        final_zero = bool(g[-1] == 0.0)
        n_pos = g.size - 1 if final_zero else g.size
        logs = np.log(g[:n_pos])
        up = np.empty(n_pos - 1)
        down = np.empty(n_pos - 1)
        for k, j in enumerate(range(1, n_pos)):
            up[k] = OFFSET_FRACTION * (logs[j - 1] - logs[j])
            if j + 1 < n_pos:
                down[k] = OFFSET_FRACTION * (logs[j] - logs[j + 1])
            else:
                down[k] = END_FRACTION * (logs[j] - math.log(sigma_min))
        self.n_steps = g.size - 1
        self.final_zero = final_zero
        self.n_free = n_pos - 1
        self.register_buffer("sigmas", torch.tensor(np.array(g), dtype=torch.float64))
        self.register_buffer("up", torch.tensor(up, dtype=torch.float64))
        self.register_buffer("down", torch.tensor(down, dtype=torch.float64))

    def offsets(self, raw: Tensor, first: int = 0) -> Tensor:
        """Log-offsets ``u`` [B, k] of free levels ``first + 1 .. first + k`` from raw [B, k]."""
        k = raw.shape[1]
        r = torch.tanh(raw.to(torch.float64))
        up, down = self.up[first : first + k], self.down[first : first + k]
        return torch.where(r >= 0, up * r, down * r)

    def levels(self, raw: Tensor, first: int = 0) -> Tensor:
        """Levels ``first + 1 .. first + k`` [B, k] (float64) from raw outputs [B, k]."""
        k = raw.shape[1]
        return self.sigmas[first + 1 : first + 1 + k] * torch.exp(self.offsets(raw, first))

    def forward(self, raw: Tensor) -> Tensor:
        """The whole schedule [B, N+1]: the top level, the free levels, and a final 0."""
        b = raw.shape[0]
        top = self.sigmas[:1].expand(b, 1)
        parts = [top, self.levels(raw)]
        if self.final_zero:
            parts.append(self.sigmas[-1:].expand(b, 1))
        return torch.cat(parts, dim=1)

    def target_offsets(self, sigmas: Tensor) -> Tensor:
        """The offsets [B, n_free] closest to schedules [B, N+1] that the head can reach."""
        s = torch.as_tensor(sigmas, dtype=torch.float64)[:, 1 : 1 + self.n_free]
        u = torch.log(s / self.sigmas[1 : 1 + self.n_free])
        lim = 0.999
        return torch.minimum(torch.maximum(u, -lim * self.down), lim * self.up)


def _mlp(n_in: int, hidden: int, n_out: int, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    last = nn.Linear(width, n_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


class OneShotPredictor(nn.Module):
    """Feature of one sample -> its whole schedule, as offsets over the global one.

    Args:
        global_sigmas: the global schedule [N+1]; sigma_min: the model's lowest level.
        dim: elements of one sample (``prod(denoiser.shape)``).
        inputs: "denoised" (``D(z sigma_max, sigma_max)``, the solver's first evaluation)
            or "noise" (``z``).
        hidden: width of the two hidden layers.
    """

    def __init__(self, global_sigmas: Any, sigma_min: float, dim: int,
                 inputs: str = "denoised", hidden: int = 64) -> None:
        super().__init__()
        if inputs not in INPUTS:
            raise ValueError(f"inputs = {inputs!r}; allowed: {list(INPUTS)}")
        self.head = OffsetHead(global_sigmas, sigma_min)
        self.inputs = inputs
        self.sigma_min, self.hidden = float(sigma_min), int(hidden)
        self.dim = int(dim)
        self.net = _mlp(self.dim, int(hidden), max(self.head.n_free, 1))
        # Input standardization (set from the training features by fit_one_shot).
        self.register_buffer("in_mean", torch.zeros(self.dim))
        self.register_buffer("in_std", torch.ones(self.dim))

    def raw(self, feature: Tensor) -> Tensor:
        f = feature.reshape(feature.shape[0], -1).to(torch.float32)
        out = self.net((f - self.in_mean) / self.in_std)
        return out[:, : self.head.n_free]

    def forward(self, feature: Tensor) -> Tensor:
        """Schedules [B, N+1] (float64) of features [B, *shape]."""
        return self.head(self.raw(feature))

    def policy(self) -> SchedulePolicy:
        return _OneShotPolicy(self)


class DeltaPredictor(nn.Module):
    """State at level i -> level i + 1, one step at a time (recursive).

    The network sees ``x_i / sqrt(1 + sigma_i^2)``, ``D(x_i, sigma_i)``, the step as a
    one-hot vector and ``log sigma_i``; it has one output per step, the step's own is used.

    Args: as ``OneShotPredictor`` (no ``inputs``).
    """

    def __init__(self, global_sigmas: Any, sigma_min: float, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.head = OffsetHead(global_sigmas, sigma_min)
        self.sigma_min, self.hidden = float(sigma_min), int(hidden)
        self.dim = int(dim)
        self.n_steps = self.head.n_steps
        n_in = 2 * self.dim + self.n_steps + 1
        self.net = _mlp(n_in, int(hidden), max(self.head.n_free, 1))
        # Input standardization (set from the training states by fit_delta).
        self.register_buffer("in_mean", torch.zeros(n_in))
        self.register_buffer("in_std", torch.ones(n_in))

    def features(self, step: int, x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
        b = x.shape[0]
        s = sigma.to(torch.float64).reshape(b, 1)
        xs = (x.reshape(b, -1).to(torch.float64) / torch.sqrt(1 + s * s)).to(torch.float32)
        hot = torch.zeros(b, self.n_steps, dtype=torch.float32, device=x.device)
        hot[:, step] = 1.0
        f = torch.cat([xs, denoised.reshape(b, -1).to(torch.float32), hot,
                       torch.log(s).to(torch.float32)], dim=1)
        return (f - self.in_mean) / self.in_std

    def raw(self, step: int, x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
        """Raw output [B, 1] for level ``step + 1``."""
        out = self.net(self.features(step, x, sigma, denoised))
        return out[:, step : step + 1]

    def forward(self, step: int, x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
        """Level ``step + 1`` [B] (float64), for step < n_free."""
        return self.head.levels(self.raw(step, x, sigma, denoised), step)[:, 0]

    def policy(self) -> SchedulePolicy:
        return _DeltaPolicy(self)


class _OneShotPolicy(SchedulePolicy):
    def __init__(self, model: OneShotPredictor) -> None:
        self.model = model
        self.n_steps = model.head.n_steps
        self.final_zero = model.head.final_zero

    def start(self, noise: Tensor) -> Tensor:
        if self.model.inputs == "noise":
            full = self.model(noise)
            return full[:, :-1] if self.final_zero else full
        return self.model.head.sigmas[:1].expand(noise.shape[0], 1).to(noise.device)

    def advance(self, step: int, x: Tensor, sigmas: Tensor, denoised: Tensor) -> Tensor:
        # Only asked at step 0 with inputs="denoised" (the solver's first evaluation).
        head = self.model.head
        return head.levels(self.model.raw(denoised))


class _DeltaPolicy(SchedulePolicy):
    def __init__(self, model: DeltaPredictor) -> None:
        self.model = model
        self.n_steps = model.head.n_steps
        self.final_zero = model.head.final_zero

    def start(self, noise: Tensor) -> Tensor:
        return self.model.head.sigmas[:1].expand(noise.shape[0], 1).to(noise.device)

    def advance(self, step: int, x: Tensor, sigmas: Tensor, denoised: Tensor) -> Tensor:
        return self.model(step, x, sigmas[:, step], denoised).unsqueeze(1)


class ReplayPolicy(SchedulePolicy):
    """Given per-sample schedules [B, N+1], one level at a time, recording the states.

    ``solve`` with it runs exactly the given schedules; ``records`` holds, per step, the
    ``(x_i, sigma_i, D(x_i, sigma_i))`` the solver reached (the inputs a recursive
    predictor sees along those schedules).
    """

    def __init__(self, sigmas: Tensor | np.ndarray) -> None:
        self.levels = torch.as_tensor(np.asarray(sigmas), dtype=torch.float64)
        if self.levels.ndim != 2:
            raise ValueError(f"sigmas must be [B, N+1]; got shape {tuple(self.levels.shape)}")
        self.n_steps = self.levels.shape[1] - 1
        self.final_zero = bool((self.levels[:, -1] == 0).all())
        self.records: list[tuple[Tensor, Tensor, Tensor]] = []

    def start(self, noise: Tensor) -> Tensor:
        self.records = []
        return self.levels[:, :1].to(noise.device)

    def advance(self, step: int, x: Tensor, sigmas: Tensor, denoised: Tensor) -> Tensor:
        self.records.append((x.detach(), sigmas[:, step].detach(), denoised.detach()))
        return self.levels[:, step + 1 : step + 2].to(x.device)


# Training -------------------------------------------------------------------------------------
def _fit(net: nn.Module, loss_fn: Any, n: int, *, epochs: int, lr: float, weight_decay: float,
         val_fraction: float, seed: int, baseline: float = math.inf) -> dict[str, Any]:
    """Full-batch AdamW on rows ``0..n-1``, keeping the weights of the best validation loss
    (the weights as given count with validation loss ``baseline``)."""
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    n_val = int(round(n * val_fraction)) if n > 4 else 0
    val, train = perm[:n_val], perm[n_val:]
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    best = (baseline, {k: v.detach().clone() for k, v in net.state_dict().items()}, 0)
    for epoch in range(epochs):
        opt.zero_grad()
        loss_fn(train).backward()
        for p in params:
            if p.grad is not None:
                p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        opt.step()
        with torch.no_grad():
            v = float(loss_fn(val if n_val else train))
        if v < best[0]:
            best = (v, {k: t.detach().clone() for k, t in net.state_dict().items()}, epoch + 1)
    net.load_state_dict(best[1])
    return {"val_loss": best[0], "best_epoch": best[2], "n_train": int(train.numel()),
            "n_val": n_val}


def _spread(f: Tensor) -> Tensor:
    """Per-column standard deviation of training inputs, floored (constant columns: 1)."""
    std = f.std(0) if f.shape[0] > 1 else torch.ones_like(f[0])
    return torch.where(std > 1e-6, std, torch.ones_like(std))


def first_denoised(denoiser: Denoiser, noise: Tensor, sigma_max: float) -> Tensor:
    """``D(z sigma_max, sigma_max)``: the first evaluation of every solver [B, *shape]."""
    s = torch.full((noise.shape[0],), float(sigma_max), dtype=noise.dtype, device=noise.device)
    with torch.no_grad():
        return denoiser(noise * s.reshape((-1,) + (1,) * (noise.ndim - 1)), s)


def fit_one_shot(
    denoiser: Denoiser,
    noise: Tensor,
    oracle_sigmas: Tensor | np.ndarray,
    global_sigmas: Any,
    *,
    inputs: str = "denoised",
    hidden: int = 64,
    epochs: int = 400,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[OneShotPredictor, dict[str, Any]]:
    """A one-shot predictor regressed on oracle schedules (MSE of the log-offsets).

    ``noise`` [B, *shape] are the training noises and ``oracle_sigmas`` [B, N+1] their
    oracle schedules. Returns the predictor (weights of the best validation loss on a
    seeded ``val_fraction`` of the rows) and a training record.
    """
    torch.manual_seed(int(seed))
    model = OneShotPredictor(global_sigmas, denoiser.sigma_min, math.prod(denoiser.shape),
                             inputs=inputs, hidden=hidden)
    target = model.head.target_offsets(torch.as_tensor(np.asarray(oracle_sigmas)))
    feats = (first_denoised(denoiser, noise, float(model.head.sigmas[0])) if inputs == "denoised"
             else noise).reshape(noise.shape[0], -1).to(torch.float32)
    model.in_mean.copy_(feats.mean(0))
    model.in_std.copy_(_spread(feats))

    def loss(rows: Tensor) -> Tensor:
        u = model.head.offsets(model.raw(feats[rows]))
        return (u - target[rows]).square().mean()

    record = _fit(model, loss, noise.shape[0], epochs=epochs, lr=lr,
                  weight_decay=weight_decay, val_fraction=val_fraction, seed=seed)
    return model.eval(), record


def fit_delta(
    denoiser: Denoiser,
    noise: Tensor,
    oracle_sigmas: Tensor | np.ndarray,
    global_sigmas: Any,
    solver: str = "dpmpp_2m",
    *,
    hidden: int = 64,
    epochs: int = 400,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    val_fraction: float = 0.2,
    seed: int = 0,
    solver_options: Mapping[str, Any] | None = None,
) -> tuple[DeltaPredictor, dict[str, Any]]:
    """A recursive predictor regressed on oracle schedules, along the oracle's trajectories.

    The states come from running ``solver`` on each training noise with its oracle schedule
    (teacher forcing); the target of step i is the oracle's level i + 1, as an offset.
    """
    torch.manual_seed(int(seed))
    model = DeltaPredictor(global_sigmas, denoiser.sigma_min, math.prod(denoiser.shape),
                           hidden=hidden)
    sig = torch.as_tensor(np.asarray(oracle_sigmas), dtype=torch.float64)
    target = model.head.target_offsets(sig)  # [B, n_free]
    replay = ReplayPolicy(sig)
    with torch.no_grad():
        solve(denoiser, noise, replay, solver=solver, **dict(solver_options or {}))
    n_free = model.head.n_free
    b = noise.shape[0]
    with torch.no_grad():
        feats = torch.stack([model.features(i, *replay.records[i]) for i in range(n_free)])
        flat = feats.reshape(-1, feats.shape[-1])
        model.in_mean.copy_(flat.mean(0))
        model.in_std.copy_(_spread(flat))
        feats = (feats - model.in_mean) / model.in_std  # [steps, B, inputs], standardized

    def loss(rows: Tensor) -> Tensor:
        total = 0.0
        for i in range(n_free):
            raw = model.net(feats[i][rows])[:, i : i + 1]
            u = model.head.offsets(raw, i)[:, 0]
            total = total + (u - target[rows, i]).square().mean()
        return total / max(n_free, 1)

    record = _fit(model, loss, b, epochs=epochs, lr=lr, weight_decay=weight_decay,
                  val_fraction=val_fraction, seed=seed)
    return model.eval(), record


def fine_tune(
    model: OneShotPredictor | DeltaPredictor,
    denoiser: Denoiser,
    noise: Tensor,
    teacher_samples: Tensor,
    solver: str = "dpmpp_2m",
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    val_fraction: float = 0.2,
    seed: int = 0,
    solver_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a predictor end to end: its policy through ``solve`` against the teacher.

    The loss is the mean over noises of the mean squared difference between the sample of
    the predictor's policy and the teacher's sample on the same noise (the oracle's loss,
    with the schedule now a function of the sample). Gradients flow through the policy's
    levels into the network. Full batch; the epoch with the best validation loss (a seeded
    ``val_fraction`` of the noises; epoch 0 = the model as given) is kept. In place.
    """
    opts = dict(solver_options or {})
    target = teacher_samples.detach()

    def loss(rows: Tensor) -> Tensor:
        x = solve(denoiser, noise[rows], model.policy(), solver=solver, **opts)
        return (x - target[rows]).flatten(1).square().mean(1).to(torch.float64).mean()

    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(noise.shape[0], generator=g)
    n_val = int(round(noise.shape[0] * val_fraction)) if noise.shape[0] > 4 else 0
    val = perm[:n_val] if n_val else perm
    with torch.no_grad():
        start = float(loss(val))
    record = _fit(model, loss, noise.shape[0], epochs=epochs, lr=lr,
                  weight_decay=weight_decay, val_fraction=val_fraction, seed=seed,
                  baseline=start)
    record["val_loss_start"] = start
    return record
