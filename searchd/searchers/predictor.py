"""The OMS-DPM performance predictor: ranks candidate schedules before they are scored.

Architecture (OMS-DPM, section 4): each step of a schedule is a token made of

- a learned embedding of the step's zoo member (``n_models`` x ``embed_dim``; a timestep
  schedule without model ids uses member 0 everywhere), and
- a sinusoidal encoding of the step's two noise levels (log sigma of the start and of the
  end of the step; the final 0 is encoded as log of the smallest positive level seen),

- with ``strategies`` (a solver-schedule space, ``searchd.schedules.strategy_space``), the
  step's solver choice: its multistep order one-hot and its corrector flag (a schedule
  without a strategy has the plain solver's own choices),

a GRU over the steps (from the highest noise to the lowest), and an MLP head on its last
hidden state giving one score per schedule (lower = predicted better).

Training is online: ``fit`` re-initializes the network (seeded) and trains it on every
candidate scored so far with a pairwise ranking loss (RankNet: for a pair with values
``y_i < y_j``, ``softplus(s_i - s_j)``), so only the order of the values matters, not their
scale. ``fit(..., init=weights)`` warm-starts instead: it continues from an earlier fit's
weights (``weights()``, plain data) for ``warm_steps`` steps on the new, larger training set
(the evolution's refit at a generation boundary: a fifth of the steps, on the driver's
critical path between generations). Failed candidates (no finite value) are left out.
``rank_screen`` keeps the predicted top fraction of a pool of offspring. Numerical code
only (torch); no Ray.
"""

from __future__ import annotations

import base64
import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from searchd.schedule import Schedule

# A step runs the network on the rows its pairs draw (not on every scored candidate) when
# the training set holds more than this many times the pairs per step (see ``_train``).
DRAWN_ROWS_ABOVE = 2


@dataclass(frozen=True)
class PredictorConfig:
    """Sizes and training of the predictor (see the module docstring)."""

    embed_dim: int = 8
    time_freqs: int = 4  # sin/cos pairs per noise level (4 -> 8 numbers per level)
    hidden: int = 32
    steps: int = 300  # optimizer steps per fit from scratch
    warm_steps: int = 60  # optimizer steps per warm-started fit (``fit(init=...)``)
    pairs_per_step: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the tiny network on one thread: on a busy CPU, torch's intra-op threads cost far
    more than they bring for a model this small (measured 7x slower with 2 threads)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Net(nn.Module):
    def __init__(self, n_models: int, cfg: PredictorConfig, extra: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_models, cfg.embed_dim)
        self.gru = nn.GRU(cfg.embed_dim + 4 * cfg.time_freqs + extra, cfg.hidden,
                          batch_first=True)
        self.head = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
                                  nn.Linear(cfg.hidden, 1))

    def forward(self, ids: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.embed(ids), times], dim=-1)
        _, h = self.gru(tokens)
        return self.head(h[-1]).squeeze(-1)


class SchedulePredictor:
    """Predicts the ranking of schedules of one shape (``n_steps``) over ``n_models`` members.

    Args:
        n_models: zoo size (1 for plain timestep schedules).
        seed: base seed; ``fit(..., round=r)`` seeds the network with (seed, r).
        config: sizes and training (``PredictorConfig``).
        strategies: the tokens carry each step's solver choice (order, corrector).
    """

    def __init__(self, n_models: int, seed: int = 0, config: PredictorConfig | None = None,
                 strategies: bool = False) -> None:
        if n_models < 1:
            raise ValueError(f"n_models = {n_models}; it must be >= 1")
        self.n_models = int(n_models)
        self.seed = int(seed)
        self.cfg = config or PredictorConfig()
        self.net: _Net | None = None
        self.n_train = 0
        self.strategies = bool(strategies)

    @property
    def _extra(self) -> int:
        from searchd.solvers.strategy import MAX_ORDER

        return MAX_ORDER + 1 if self.strategies else 0

    def _strategy_features(self, schedules: Sequence[Schedule]) -> np.ndarray:
        """[B, N, MAX_ORDER + 1]: each step's order one-hot and its corrector flag."""
        from searchd.solvers.strategy import MAX_ORDER, default_strategy, parse_code

        out = np.zeros((len(schedules), schedules[0].n_steps, MAX_ORDER + 1), np.float64)
        for b, s in enumerate(schedules):
            codes = s.strategy or default_strategy(s.solver, s.n_steps, s.final_zero)
            for i, c in enumerate(codes):
                order, corr = parse_code(s.solver, c, i)
                out[b, i, order - 1] = 1.0
                out[b, i, MAX_ORDER] = float(corr)
        return out

    # Encoding -----------------------------------------------------------------------------
    def encode(self, schedules: Sequence[Schedule]) -> tuple[torch.Tensor, torch.Tensor]:
        """(member ids [B, N] int64, time encodings [B, N, 4 * time_freqs] float32)."""
        sig = np.stack([s.sigmas for s in schedules]).astype(np.float64)
        positive = sig[sig > 0]
        floor = float(positive.min()) if positive.size else 1e-3
        logs = np.log(np.maximum(sig, floor))  # final 0 -> log of the smallest level
        pair = np.stack([logs[:, :-1], logs[:, 1:]], axis=-1)  # [B, N, 2]
        freqs = 2.0 ** np.arange(self.cfg.time_freqs) / 8.0
        ang = pair[..., None] * freqs  # [B, N, 2, F]
        enc = np.concatenate([np.sin(ang), np.cos(ang)], axis=-1).reshape(*pair.shape[:2], -1)
        if self.strategies:
            enc = np.concatenate([enc, self._strategy_features(schedules)], axis=-1)
        ids = np.stack([
            np.zeros(s.n_steps, np.int64) if s.model_ids is None else s.model_ids
            for s in schedules
        ])
        if ids.max(initial=0) >= self.n_models:
            raise ValueError(f"a model id {int(ids.max())} is out of range 0..{self.n_models - 1}")
        return torch.as_tensor(ids), torch.as_tensor(enc, dtype=torch.float32)

    # Training -----------------------------------------------------------------------------
    def fit(self, schedules: Sequence[Schedule], values: Sequence[float], round: int = 0,
            init: Mapping[str, object] | None = None) -> SchedulePredictor:
        """Train on the candidates with finite values (lower is better): from scratch for
        ``steps`` steps, or from ``init`` (an earlier fit's ``weights()``, same sizes) for
        ``warm_steps`` steps. The pairs drawn are seeded by (seed, round) either way."""
        keep = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        scheds = [schedules[i] for i in keep]
        y = torch.as_tensor(np.asarray([values[i] for i in keep], dtype=np.float64))
        if len(scheds) < 2:
            raise ValueError(f"the predictor needs >= 2 scored candidates; got {len(scheds)}")
        seed = int(np.random.SeedSequence([self.seed, int(round)]).generate_state(1)[0])
        torch_gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _Net(self.n_models, self.cfg, self._extra)
        if init is not None:
            net.load_state_dict(_tensors(init))
        ids, times = self.encode(scheds)
        with _one_thread():
            self._train(net, ids, times, y, torch_gen,
                        self.cfg.steps if init is None else self.cfg.warm_steps)
        self.net = net.eval()
        self.n_train = len(scheds)
        return self

    def weights(self) -> dict[str, object]:
        """The trained network's weights as plain data (JSON-safe: base64 of the float32
        bytes and the shape per parameter), for ``fit(init=...)`` and a searcher's state."""
        if self.net is None:
            raise ValueError("the predictor is not trained yet; call fit first")
        return {k: {"shape": list(v.shape),
                    "f32": base64.b64encode(v.detach().numpy().astype("<f4").tobytes()
                                            ).decode("ascii")}
                for k, v in self.net.state_dict().items()}

    def _train(self, net: _Net, ids: torch.Tensor, times: torch.Tensor, y: torch.Tensor,
               torch_gen: torch.Generator, steps: int) -> None:
        opt = torch.optim.Adam(net.parameters(), lr=self.cfg.lr,
                               weight_decay=self.cfg.weight_decay)
        n = len(y)
        p = self.cfg.pairs_per_step
        for _ in range(steps):
            i = torch.randint(n, (p,), generator=torch_gen)
            j = torch.randint(n, (p,), generator=torch_gen)
            sign = torch.sign(y[j] - y[i]).to(torch.float32)  # +1: i better than j
            if not bool((sign != 0).any()):
                continue
            if n > DRAWN_ROWS_ABOVE * p:
                # A large training set (a search with hundreds of workers): the network runs
                # on the rows this step's pairs draw only, so a step costs the same however
                # many candidates were scored (the same loss; smaller sets keep the full
                # pass, bit for bit as before).
                rows, inv = torch.unique(torch.cat([i, j]), return_inverse=True)
                sub = net(ids[rows], times[rows])
                si, sj = sub[inv[:p]], sub[inv[p:]]
            else:
                s = net(ids, times)
                si, sj = s[i], s[j]
            loss = (nn.functional.softplus(-sign * (sj - si)) * sign.abs()).sum()
            loss = loss / sign.abs().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def score(self, schedules: Sequence[Schedule]) -> np.ndarray:
        """Predicted scores [B] (lower = predicted better)."""
        if self.net is None:
            raise ValueError("the predictor is not trained yet; call fit first")
        if not schedules:
            return np.zeros(0)
        ids, times = self.encode(schedules)
        with torch.no_grad(), _one_thread():
            return self.net(ids, times).double().numpy()

    def screen(self, schedules: Sequence[Schedule], keep: int) -> list[int]:
        """Indices of the ``keep`` schedules predicted best (ties by position), in order."""
        scores = self.score(schedules)
        order = sorted(range(len(schedules)), key=lambda k: (scores[k], k))
        return sorted(order[: max(0, keep)])


def _tensors(weights: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """``SchedulePredictor.weights()``'s plain data back to a state dict (bit for bit)."""
    out = {}
    for k, v in weights.items():
        if not isinstance(v, Mapping) or "f32" not in v or "shape" not in v:
            raise ValueError(f"predictor weights: entry {k!r} is not {{'shape', 'f32'}}")
        arr = np.frombuffer(base64.b64decode(str(v["f32"])), dtype="<f4")
        out[k] = torch.from_numpy(arr.reshape([int(n) for n in v["shape"]]).copy())  # type: ignore[union-attr]
    return out


def kendall_tau(predicted: Sequence[float], actual: Sequence[float]) -> float:
    """Kendall's tau-b between predicted scores and actual values (NaN if undefined)."""
    from scipy.stats import kendalltau

    p = np.asarray(predicted, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    ok = np.isfinite(p) & np.isfinite(a)
    if ok.sum() < 2:
        return float("nan")
    tau = kendalltau(p[ok], a[ok]).statistic
    return float(tau)
