"""LD3: a time schedule learned by gradient descent through the solver.

Tong et al., "Learning to Discretize Denoising Diffusion ODEs" (ICLR 2025), and their code
(vinhsuhi/LD3). The schedule is a free parameter of the student solver; its output on a
noise is compared with the teacher's sample on the same noise, and the distance is
minimized through ``solve`` (which is differentiable in the noise levels).

- **Parameters** (``Ld3Parameterization``): logits ``theta``; ``softmax(theta)`` are the
  increments of a warped coordinate ``w`` (``log sigma``, i.e. uniform in log-SNR, for
  ``space="logsnr"``; ``sigma^(1/rho)`` for ``space="rho"``), accumulated from sigma_max
  down towards sigma_min. Every ``theta`` gives a valid, strictly decreasing schedule. With
  a final 0 (and ``free_end``, the default) the last softmax share is the unused gap between
  the lowest positive level and sigma_min, so the lowest level is learned too (LD3's own
  schedules end at sigma_min; see ``docs/notes-anchors.md``). Zero logits are the schedule
  uniform in ``w``.
- **Loss**: the mean over samples of the mean squared difference between student and
  teacher, in pixel space or in a feature network's space (LD3's L2 loss; LPIPS, LD3's
  default, where its weights are present: ``compute_ld3(loss="lpips")``), or any per-sample
  ``distance``.
- **Optimizer**: Adam (default) or RMSprop (LD3's, with momentum 0.9); gradient norm
  clipped (LD3: 1.0). The returned schedule is the one with the lowest loss seen.
- **Slack** (LD3's relaxed objective): the student may start from a noise ``z`` within an L2
  ball of radius ``slack`` around the given unit noise, ``min_theta min_z dist(student(z),
  teacher(noise))``. Each iteration takes a gradient step on ``z`` (rate ``slack_lr``,
  LD3: 12 / N), projects it back onto the ball, and keeps it only for the samples whose loss
  it lowers. LD3's radius is ``0.001 * dim / N**2`` (``ld3_slack``).

``compute_ld3`` runs on an evaluator (in an actor, or in-process); ``Ld3Searcher``
(``searchd.searchers.precomputed``) hands its schedule to the search loop like any candidate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.evaluation.teacher import TeacherCache, TeacherSettings
from searchd.methods.counting import denoiser_of, warmup_noise
from searchd.models.base import Denoiser, expand_to
from searchd.schedule import Schedule, validate_sigmas
from searchd.solvers import get as get_solver
from searchd.solvers import solve

logger = logging.getLogger(__name__)

SPACES: tuple[str, ...] = ("logsnr", "rho")
OPTIMIZERS: tuple[str, ...] = ("adam", "rmsprop")
LOSSES: tuple[str, ...] = ("auto", "lpips", "features", "pixels")
# Floor on each softmax share (relative), so that no logits can make two levels equal.
_SHARE_FLOOR = 1e-9

Distance = Callable[[Tensor, Tensor], Tensor]


def ld3_slack(dim: int, n_steps: int) -> float:
    """LD3's default radius of the noise ball: ``0.001 * dim / n_steps**2`` (unit noise)."""
    return 0.001 * dim / n_steps**2


# Parameterization ---------------------------------------------------------------------------
class Ld3Parameterization:
    """Logits -> schedule, differentiably, so that every logit vector is a valid schedule.

    Args:
        n_steps: steps N of the schedule.
        sigma_min, sigma_max: the range; the top level is sigma_max.
        final_zero: the schedule ends in 0 after N positive levels; else it ends exactly at
            sigma_min after N + 1 levels (N logits).
        space: "logsnr" (w = log sigma) or "rho" (w = sigma^(1/rho)).
        rho: exponent of the "rho" space.
        free_end: with ``final_zero``, the lowest positive level is learned too (one logit
            per positive level; default); False pins it to sigma_min (LD3's own ending).
    """

    def __init__(
        self,
        n_steps: int,
        sigma_min: float,
        sigma_max: float,
        final_zero: bool = True,
        space: str = "logsnr",
        rho: float = 7.0,
        free_end: bool = True,
    ) -> None:
        if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
            raise ValueError(f"n_steps = {n_steps!r}; it must be an integer >= 1")
        if not 0 < sigma_min < sigma_max < math.inf:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        if space not in SPACES:
            raise ValueError(f"space = {space!r}; allowed: {list(SPACES)}")
        if not rho > 0:
            raise ValueError(f"rho = {rho!r}; it must be > 0")
        self.n_steps = int(n_steps)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.final_zero = bool(final_zero)
        self.space, self.rho = space, float(rho)
        self.free_end = self.final_zero and bool(free_end)
        self.n_levels = self.n_steps if self.final_zero else self.n_steps + 1
        self.n_params = self.n_levels if self.free_end else self.n_levels - 1
        self._w_hi = float(self._w(torch.tensor(self.sigma_max, dtype=torch.float64)))
        self._w_lo = float(self._w(torch.tensor(self.sigma_min, dtype=torch.float64)))

    @property
    def n_free(self) -> int:
        """Noise levels the logits move (0: the schedule is fixed)."""
        return self.n_levels - 1 if self.free_end else max(self.n_levels - 2, 0)

    def _w(self, sigma: Tensor) -> Tensor:
        return sigma.log() if self.space == "logsnr" else sigma.pow(1.0 / self.rho)

    def _w_inv(self, w: Tensor) -> Tensor:
        return w.exp() if self.space == "logsnr" else w.pow(self.rho)

    def shares(self, theta: Tensor) -> Tensor:
        """Softmax of the logits, floored so that every share is positive [n_params]."""
        n = self.n_params
        return (torch.softmax(theta, dim=-1) + _SHARE_FLOOR) / (1.0 + n * _SHARE_FLOOR)

    def sigmas(self, theta: Tensor) -> Tensor:
        """The schedule of logits ``theta`` [n_params]: float64 [N + 1], differentiable."""
        theta = torch.as_tensor(theta, dtype=torch.float64)
        if theta.shape != (self.n_params,):
            raise ValueError(f"theta has shape {tuple(theta.shape)}; expected ({self.n_params},)")
        frac = torch.cumsum(self.shares(theta), dim=0)[: self.n_levels - 1]
        w = self._w_hi - (self._w_hi - self._w_lo) * torch.cat([frac.new_zeros(1), frac])
        levels = self._w_inv(w)
        top = levels.new_full((1,), self.sigma_max)
        zero = levels.new_zeros(1 if self.final_zero else 0)
        if self.free_end:
            return torch.cat([top, levels[1:], zero])
        if self.n_levels == 1:  # one step to 0: nothing between sigma_max and 0
            return torch.cat([top, zero])
        bottom = levels.new_full((1,), self.sigma_min)
        return torch.cat([top, levels[1:-1], bottom, zero])

    def encode(self, sigmas: np.ndarray | Sequence[float]) -> Tensor:
        """Logits whose schedule is ``sigmas`` (up to the share floor) [n_params].

        ``sigmas`` must have this parameterization's shape and run from sigma_max; with a
        free end its lowest positive level may lie anywhere above sigma_min (at sigma_min,
        the unused share gets the floor), else it is taken to be sigma_min.
        """
        s = validate_sigmas(sigmas, self.sigma_min, self.sigma_max)
        if s.size != self.n_steps + 1 or (s[-1] == 0.0) != self.final_zero:
            raise ValueError(
                f"schedule of {s.size - 1} steps ending at {s[-1]!r}; this parameterization "
                f"holds {self.n_steps} steps, final_zero={self.final_zero}"
            )
        pos = torch.as_tensor(np.array(s[: self.n_levels]), dtype=torch.float64)
        pos[0] = self.sigma_max
        w = torch.cat([self._w(pos), torch.tensor([self._w_lo], dtype=torch.float64)])
        if not self.free_end and self.n_levels >= 2:
            w[-2] = self._w_lo  # the lowest positive level is sigma_min itself
        gaps = (w[:-1] - w[1:]).clamp_min(0.0)
        if not self.free_end:
            gaps = gaps[:-1]  # no unused share below the lowest level
        share = gaps / (self._w_hi - self._w_lo)
        n = self.n_params
        soft = (share * (1.0 + n * _SHARE_FLOOR) - _SHARE_FLOOR).clamp_min(1e-30)
        theta = soft.log()
        return theta - theta.mean()


# Gradients with respect to sigma --------------------------------------------------------------
class FiniteDifferenceSigma:
    """A denoiser whose derivative in ``sigma`` is taken by central differences.

    For models that autograd cannot differentiate in ``sigma`` (non-differentiable ops in
    their noise-level path). The value is the model's own, ``D(x, sigma)``, and the gradient
    with respect to ``x`` flows through it; the derivative in ``sigma`` is
    ``(D(x, s(1+h)) - D(x, s(1-h))) / (2 s h)`` (two more calls, without a graph). The
    default ``h`` is the cube root of the sample dtype's epsilon (5e-3 in float32, 6e-6 in
    float64), which balances rounding against the O(h^2) truncation error.
    """

    def __init__(self, denoiser: Denoiser, rel_step: float | None = None) -> None:
        self.denoiser = denoiser
        self.rel_step = rel_step
        self.shape = denoiser.shape
        self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max
        self.sigma_grid = getattr(denoiser, "sigma_grid", None)
        self.cost = getattr(denoiser, "cost", 1.0)

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        s0 = sigma.detach()
        out = self.denoiser(x, s0, **cond)
        if not sigma.requires_grad:
            return out
        with torch.no_grad():
            rel = self.rel_step or torch.finfo(x.dtype).eps ** (1 / 3)
            h = s0 * rel
            xd = x.detach()
            up = self.denoiser(xd, s0 + h, **cond)
            down = self.denoiser(xd, s0 - h, **cond)
            slope = (up - down) / expand_to(2 * h, xd)
        return out + expand_to(sigma - s0, out) * slope


def differentiable_in_sigma(denoiser: Denoiser, device: Any, dtype: torch.dtype) -> bool:
    """Whether autograd gives ``dD/dsigma`` for ``denoiser`` (one probe call on one sample)."""
    x = torch.zeros((1, *denoiser.shape), device=device, dtype=dtype)
    s = torch.ones(1, device=device, dtype=dtype, requires_grad=True)
    try:
        out = denoiser(x, s)
        if not out.requires_grad:
            return False
        (g,) = torch.autograd.grad(out.sum(), s)
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.isfinite(g).all())


def with_sigma_gradient(
    denoiser: Denoiser, device: Any, dtype: torch.dtype, mode: str = "auto"
) -> Denoiser:
    """``denoiser`` itself when autograd differentiates it in sigma ("autograd"), else
    wrapped in ``FiniteDifferenceSigma`` ("fd"); "auto" probes which."""
    if mode not in ("auto", "autograd", "fd"):
        raise ValueError(f"sigma_grad = {mode!r}; allowed: 'auto', 'autograd', 'fd'")
    if mode == "autograd" or (mode == "auto" and differentiable_in_sigma(denoiser, device, dtype)):
        return denoiser
    if mode == "auto":
        logger.info("ld3: %s is not differentiable in sigma by autograd; using central "
                    "differences", type(denoiser).__name__)
    return FiniteDifferenceSigma(denoiser)


# Losses -------------------------------------------------------------------------------------
def feature_distance(features: Callable[[Tensor], Any] | None) -> Distance:
    """Per-sample mean squared difference [B], in ``features``' space or in pixels.

    ``features`` maps samples [B, *shape] to [B, F] (a tuple output's first entry is used);
    it must be differentiable.
    """

    def embed(x: Tensor) -> Tensor:
        if features is None:
            return x.reshape(x.shape[0], -1)
        f = features(x)
        if isinstance(f, (tuple, list)):
            f = f[0]
        return f.reshape(f.shape[0], -1)

    def dist(x: Tensor, y: Tensor) -> Tensor:
        return (embed(x) - embed(y)).square().mean(dim=1)

    dist.embed = embed  # type: ignore[attr-defined]
    return dist


# The method ---------------------------------------------------------------------------------
def ld3_schedule(
    denoiser: Denoiser,
    noise: Tensor,
    teacher_samples: Tensor,
    n_steps: int,
    solver: str = "dpmpp_2m",
    *,
    iters: int = 100,
    lr: float = 0.1,
    optimizer: str = "adam",
    space: str = "logsnr",
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_zero: bool = True,
    free_end: bool = True,
    features: Callable[[Tensor], Any] | None = None,
    distance: Distance | None = None,
    slack: float = 0.0,
    slack_lr: float | None = None,
    batch_size: int | None = None,
    init: np.ndarray | Sequence[float] | None = None,
    clip: float | None = 1.0,
    patience: int | None = 5,
    lr_decay: float = 0.8,
    solver_options: Mapping[str, Any] | None = None,
    sigma_grad: str = "auto",
    seed: int = 0,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """LD3's learned schedule of ``n_steps`` steps for ``solver``.

    Args:
        denoiser: ``D(x [B, *shape], sigma [B]) -> x0_hat``.
        noise: unit Gaussian noise [B, *shape] (the training set).
        teacher_samples: the teacher's samples on the same noise [B, *shape].
        n_steps: steps N; solver, solver_options: the student.
        iters: iterations (one optimizer step each, but for plateau resets); lr: learning
            rate; optimizer: "adam" or "rmsprop".
        space: "logsnr" or "rho" (``rho``): the coordinate the logits' shares divide.
        sigma_min, sigma_max: the range (default: the denoiser's).
        final_zero: end in 0, else at sigma_min. free_end: with ``final_zero``, learn the
            lowest positive level (default) or pin it to sigma_min.
        features: a differentiable feature map [B, *shape] -> [B, F]; the loss is then L2 in
            its space (default: pixels). distance: a per-sample distance ``(x, y) -> [B]``
            instead (e.g. LPIPS); overrides ``features``.
        slack: radius of the L2 ball (unit-noise units) the student's noise may move in
            (0: none). slack_lr: step on the noise (default 12 / N, LD3's).
        batch_size: samples per step (default all); with fewer, minibatches are drawn by a
            generator seeded with ``seed``, and every iteration's full-batch loss is
            evaluated without a graph to pick the best schedule.
        init: the initial schedule (default: uniform in the space, zero logits).
        clip: max gradient norm of the logits (None: no clipping).
        patience, lr_decay: LD3's plateau rule: after ``patience`` evaluations without a
            new best loss, the logits go back to the best ones and the learning rate is
            multiplied by ``lr_decay`` (None: constant rate, no restarts).
        sigma_grad: "auto", "autograd" or "fd" (see ``with_sigma_gradient``).

    Returns:
        (sigmas float64 [N + 1], history): the schedule with the lowest loss seen, and one
        record per evaluated schedule ``{"iter", "loss", "sigmas"}`` (``iter``: the
        iteration; ``iters`` iterations evaluate ``iters + 1`` schedules; with slack, also
        ``"max_shift"``: the largest distance of a student noise from its given noise).
    """
    get_solver(solver)
    _check_arguments(optimizer, iters, patience, lr_decay, slack, noise, teacher_samples)
    lo = denoiser.sigma_min if sigma_min is None else sigma_min
    hi = denoiser.sigma_max if sigma_max is None else sigma_max
    param = Ld3Parameterization(n_steps, lo, hi, final_zero, space, rho, free_end)
    b = noise.shape[0]
    bs = b if batch_size is None else min(int(batch_size), b)
    if bs < 1:
        raise ValueError(f"batch_size = {batch_size!r}; it must be >= 1")
    theta = (torch.zeros(param.n_params, dtype=torch.float64) if init is None
             else param.encode(init)).requires_grad_(True)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam([theta], lr=lr)
    else:
        opt = torch.optim.RMSprop([theta], lr=lr, momentum=0.9)
    run = _Ld3Run(
        param=param, theta=theta, opt=opt, noise=noise, target=teacher_samples.detach(),
        model=with_sigma_gradient(denoiser, noise.device, noise.dtype, sigma_grad),
        solver=solver, opts=dict(solver_options or {}),
        dist=distance or feature_distance(features), batch_size=bs, clip=clip,
        patience=patience, lr_decay=lr_decay, slack=slack,
        step_z=(12.0 / n_steps) if slack_lr is None else float(slack_lr), seed=seed,
    )
    return run.fit(iters)


def _check_arguments(optimizer: str, iters: int, patience: int | None, lr_decay: float,
                     slack: float, noise: Tensor, teacher_samples: Tensor) -> None:
    """``ld3_schedule``'s checks of its arguments (``ValueError``, one line)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer = {optimizer!r}; allowed: {list(OPTIMIZERS)}")
    if iters < 0:
        raise ValueError(f"iters = {iters}; it must be >= 0")
    if patience is not None and patience < 1:
        raise ValueError(f"patience = {patience!r}; it must be >= 1 or None")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay = {lr_decay!r}; it must be in (0, 1]")
    if not (math.isfinite(slack) and slack >= 0):
        raise ValueError(f"slack = {slack!r}; it must be a finite radius >= 0")
    if noise.shape != teacher_samples.shape:
        raise ValueError(f"noise {tuple(noise.shape)} and teacher samples "
                         f"{tuple(teacher_samples.shape)} differ in shape")


class _Ld3Run:
    """One LD3 optimization (``ld3_schedule``'s loop): the logits ``theta`` and their
    optimizer, the student's noise ``z`` (moved only with slack), the best schedule seen, the
    plateau counter and the history."""

    def __init__(self, *, param: Ld3Parameterization, theta: Tensor,
                 opt: torch.optim.Optimizer, noise: Tensor, target: Tensor, model: Any,
                 solver: str, opts: dict[str, Any], dist: Distance, batch_size: int,
                 clip: float | None, patience: int | None, lr_decay: float, slack: float,
                 step_z: float, seed: int) -> None:
        self.param, self.theta, self.opt = param, theta, opt
        self.noise, self.target, self.model = noise, target, model
        self.solver, self.opts, self.dist = solver, opts, dist
        self.b, self.bs = noise.shape[0], batch_size
        self.clip, self.patience, self.lr_decay = clip, patience, lr_decay
        self.slack, self.step_z = slack, step_z
        self.z = noise.detach().clone()  # the student's noise (moves only with slack)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.history: list[dict[str, Any]] = []
        self.best: tuple[float, np.ndarray, Tensor] | None = None
        self.worse = 0

    def losses(self, zz: Tensor, sig: Tensor, rows: Tensor | slice) -> Tensor:
        """Per-sample distances [len(rows)] of the student from noise ``zz`` along ``sig``."""
        x = solve(self.model, zz, sig, solver=self.solver, **self.opts)
        return self.dist(x, self.target[rows])

    def record(self, step: int, loss: float, sig: Tensor) -> bool:
        """Keep the loss of the current logits; True if they were reset to the best."""
        s = sig.detach().cpu().numpy().astype(np.float64)
        self.history.append({"iter": step, "loss": loss, "sigmas": [float(v) for v in s]})
        if math.isfinite(loss) and (self.best is None or loss < self.best[0]):
            self.best, self.worse = (loss, s, self.theta.detach().clone()), 0
            return False
        self.worse += 1
        if self.patience is None or self.worse < self.patience or self.best is None:
            return False
        # LD3's plateau rule: back to the best logits, smaller steps.
        with torch.no_grad():
            self.theta.copy_(self.best[2])
        for group in self.opt.param_groups:
            group["lr"] *= self.lr_decay
        self.worse = 0
        return True

    def fit(self, iters: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """``iters`` iterations; the best schedule seen and the history."""
        full_batch = self.bs == self.b
        for step in range(iters + 1):
            sig = self.param.sigmas(self.theta)
            last = step == iters or self.param.n_free == 0
            if full_batch:
                rows: Tensor | slice = slice(None)
            else:
                rows = torch.randperm(self.b, generator=self.gen)[:self.bs].to(
                    self.noise.device)
                with torch.no_grad():
                    full = float(self.losses(self.z, sig.detach(), slice(None)).mean())
                if self.record(step, full, sig) and not last:
                    continue
            if last:
                if full_batch:
                    with torch.no_grad():
                        self.record(step, float(self.losses(self.z, sig.detach(), rows).mean()),
                                    sig)
                break
            if not self._step(step, sig, rows, full_batch):
                break
        if self.best is None:
            raise ValueError("LD3 found no schedule with a finite loss")
        return self.best[1], self.history

    def _step(self, step: int, sig: Tensor, rows: Tensor | slice, full_batch: bool) -> bool:
        """One optimizer step on the logits (and, with slack, on the noise); False to stop
        (a non-finite gradient)."""
        zz = self.z[rows].clone().requires_grad_(self.slack > 0)
        loss = self.losses(zz, sig, rows).mean()
        if full_batch and self.record(step, float(loss.detach()), sig):
            return True
        if not loss.requires_grad:
            raise ValueError("the loss has no gradient: is the feature network or distance "
                             "differentiable?")
        self.opt.zero_grad()
        loss.backward()
        if not torch.isfinite(self.theta.grad).all():
            logger.warning("ld3: non-finite gradient at iteration %d; stopping", step)
            return False
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_([self.theta], self.clip)
        self.opt.step()
        if self.slack > 0:
            # The gradient of each sample's own loss: the batch mean's, times the batch.
            new_sig = self.param.sigmas(self.theta).detach()
            idx = torch.arange(self.b, device=self.noise.device)[rows]
            idx2 = torch.cat([idx, idx])
            self.z[rows] = relax_noise(
                lambda zs, s=new_sig, i=idx2: self.losses(zs, s, i),
                zz.detach(), zz.grad * zz.shape[0], self.noise[rows], self.step_z, self.slack,
            )
            self.history[-1]["max_shift"] = float(
                (self.z - self.noise).flatten(1).norm(dim=1).max())
        return True


def relax_noise(
    per_sample_loss: Callable[[Tensor], Tensor],
    z: Tensor,
    grad: Tensor,
    noise: Tensor,
    step: float,
    radius: float,
) -> Tensor:
    """LD3's update of the student's noise (the slack).

    A gradient step ``z - step * grad``, projected onto the L2 ball of ``radius`` around
    ``noise`` (per sample), kept only for the samples whose loss it lowers.

    Args:
        per_sample_loss: maps noises [2b, *shape] (``z`` then the candidate) to losses [2b].
        z, grad, noise: the current noise, the gradient of each sample's own loss with
            respect to it, and the given noise, [b, *shape].
        step, radius: step size and ball radius (unit-noise units).

    Returns:
        The new noise [b, *shape]: the candidate where its loss is lower, else ``z``.
    """
    with torch.no_grad():
        cand = z - step * grad
        delta = (cand - noise).reshape(cand.shape[0], -1)
        norm = delta.norm(dim=1, keepdim=True)
        delta = delta * torch.clamp(radius / norm.clamp_min(1e-30), max=1.0)
        cand = noise + delta.reshape(cand.shape)
        both = per_sample_loss(torch.cat([z, cand]))
        better = both[z.shape[0]:] < both[: z.shape[0]]
        return torch.where(expand_to(better, z), cand, z)


# In an actor ----------------------------------------------------------------------------------
def _differentiable(net: Callable[[Tensor], Any]) -> Callable[[Tensor], Any]:
    """The feature path of a ``FeatureNetwork`` with autograd: its ``__call__`` runs under
    ``torch.inference_mode`` (scoring needs no graph), so the loss would have no gradient;
    its ``_forward`` is the same computation on one batch, without that guard."""
    forward = getattr(net, "_forward", None)
    if forward is None:
        return net
    device = getattr(net, "device", None)

    def f(images: Tensor) -> Tensor:
        x = images if device is None else images.to(device)
        return forward(x, frozenset({"features"}))["features"]

    return f


def _image_features(net: Callable[[Tensor], Any], shape: tuple[int, ...]) -> Callable:
    """A feature network taking images [B, C, H, W] applied to samples [B, *shape]."""
    net = _differentiable(net)
    if len(shape) == 3:
        return net
    side = int(round(math.sqrt(math.prod(shape))))

    def f(x: Tensor) -> Any:
        return net(x.reshape(x.shape[0], 1, side, side))

    return f


def lpips_distance(device: Any) -> Distance:
    """LPIPS (VGG) as a per-sample distance, from the ``lpips`` package and its weights.

    Raises ``ValueError`` when the package or its weights are not available (they are not
    shipped with searchd, and cannot be downloaded on machines without network access).
    """
    try:
        import lpips  # type: ignore[import-not-found]

        net = lpips.LPIPS(net="vgg", verbose=False).to(device).eval()
    except Exception as e:  # ImportError, or a failed weight download
        raise ValueError(f"LPIPS is not available here ({type(e).__name__}: {e}); "
                         "use loss='features' or 'pixels'") from None
    for p in net.parameters():
        p.requires_grad_(False)

    def dist(x: Tensor, y: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError("LPIPS needs images [B, C, H, W]")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return net(x, y).reshape(x.shape[0])

    return dist


def _loss_for(evaluator_or_denoiser: Any, den: Denoiser, loss: str) -> tuple[str, dict]:
    """The loss ``compute_ld3`` uses: its name and the keyword for ``ld3_schedule``."""
    if loss not in LOSSES:
        raise ValueError(f"loss = {loss!r}; allowed: {list(LOSSES)}")
    device = getattr(den, "device", "cpu")
    if loss in ("auto", "lpips"):
        try:
            return "lpips", {"distance": lpips_distance(device)}
        except ValueError:
            if loss == "lpips":
                raise
    net = getattr(evaluator_or_denoiser, "features", None)
    if loss in ("auto", "features") and net is not None:
        return "features", {"features": _image_features(net, tuple(den.shape))}
    if loss == "features":
        raise ValueError("loss = 'features' needs an evaluator with a feature network")
    return "pixels", {}


def compute_ld3(
    evaluator_or_denoiser: Any,
    n_steps: int,
    solver: str,
    seeds: Sequence[int] | range,
    *,
    loss: str = "auto",
    teacher_solver: str = "heun",
    teacher_steps: int = 64,
    teacher_cache: TeacherCache | None = None,
    solver_options: Mapping[str, Any] | None = None,
    **params: Any,
) -> Schedule:
    """LD3's schedule as a ``Schedule`` for ``solver`` (meta origin "ld3").

    Meant to run inside an evaluator actor (``pool.call(compute_ld3, ...)``): the first
    argument is the evaluator (its ``denoiser`` and, for the feature loss, ``features``) or
    a denoiser.

    Args:
        n_steps, solver, solver_options: the schedule's shape and the student.
        seeds: training noise seeds (LD3 uses about 100 samples).
        loss: "auto" (LPIPS if available, else the evaluator's feature network, else
            pixels), "lpips", "features" or "pixels".
        teacher_solver, teacher_steps: the teacher (polynomial rho = 7 schedule over the same
            range and ending). teacher_cache: reuse teacher samples (default: the
            evaluator's ``teacher_cache`` attribute, else a new one).
        **params: ``ld3_schedule``'s keyword arguments (iters, lr, optimizer, space, rho,
            final_zero, free_end, sigma_min, sigma_max, slack, slack_lr, batch_size, init, clip,
            sigma_grad, seed).
    """
    den = denoiser_of(evaluator_or_denoiser)
    seeds = [int(s) for s in seeds]
    final_zero = bool(params.get("final_zero", True))
    settings = TeacherSettings(
        solver=teacher_solver, n_steps=teacher_steps, final_zero=final_zero,
        sigma_min=params.get("sigma_min"), sigma_max=params.get("sigma_max"),
    )
    cache = teacher_cache  # (an empty cache is falsy: compare with None)
    if cache is None:
        cache = getattr(evaluator_or_denoiser, "teacher_cache", None)
    if cache is None:
        cache = TeacherCache(den)
    target = cache.samples(seeds, settings)
    noise = warmup_noise(den, seeds).to(target.device, target.dtype)
    loss_name, loss_kw = _loss_for(evaluator_or_denoiser, den, loss)
    sigmas, history = ld3_schedule(den, noise, target, n_steps, solver,
                                   solver_options=solver_options, **loss_kw, **params)
    record = {k: (list(map(float, v)) if k == "init" else v) for k, v in params.items()}
    best = min(history, key=lambda h: h["loss"] if math.isfinite(h["loss"]) else math.inf)
    meta = {
        "origin": "ld3", "family": "ld3", "name": "ld3",
        "params": {**record, "loss": loss_name, "teacher": settings.to_dict()},
        "train": {"n": len(seeds), "first_seed": seeds[0] if seeds else None},
        "loss_first": history[0]["loss"], "loss_best": best["loss"],
        "iters_run": history[-1]["iter"],
    }
    return Schedule(sigmas, solver=solver, meta=meta)
