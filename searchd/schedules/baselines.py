"""Schedule families: the non-searched baselines, in one registry.

Every continuous family is a decreasing curve ``u in [0, 1] -> sigma`` from sigma_max to
sigma_min. ``baseline(name, n_steps, ...)`` samples that curve at n_steps points and appends
0 (``final_zero=True``, EDM's sampler with num_steps = n_steps), or at n_steps + 1 points
(``final_zero=False``, the sample is taken at sigma_min as it stands).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# VP-SDE with a linear beta schedule (Song et al.), used for the VP-time families.
VP_BETA_MIN = 0.1
VP_BETA_D = 19.9


def vp_sigma_to_t(sigma: np.ndarray) -> np.ndarray:
    """VP time t of an EDM noise level: inverse of sigma(t) = sqrt(exp(bd t^2/2 + bmin t) - 1)."""
    return (np.sqrt(VP_BETA_MIN**2 + 2 * VP_BETA_D * np.log1p(sigma**2)) - VP_BETA_MIN) / VP_BETA_D


def vp_t_to_sigma(t: np.ndarray) -> np.ndarray:
    """EDM noise level of VP time t."""
    return np.sqrt(np.expm1(0.5 * VP_BETA_D * t**2 + VP_BETA_MIN * t))


# Discrete-time training grids ---------------------------------------------------------------
def ddpm_linear_grid(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ascending sigmas of DDPM's linear-beta discrete schedule (index t -> sigma_t)."""
    betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - abar) / abar)


def iddpm_cosine_grid(n: int = 4000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Ascending sigmas of IDDPM's cosine discrete schedule (betas clipped at ``max_beta``)."""

    def f(t: np.ndarray) -> np.ndarray:
        return np.cos((t / n + s) / (1 + s) * np.pi / 2) ** 2

    t = np.arange(n + 1, dtype=np.float64)
    betas = np.minimum(1.0 - f(t[1:]) / f(t[:-1]), max_beta)
    abar = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - abar) / abar)


GRIDS: dict[str, Callable[[], np.ndarray]] = {
    "ddpm_linear": ddpm_linear_grid,
    "iddpm_cosine": iddpm_cosine_grid,
}

# Align Your Steps: the published 10-step schedules (Sabour et al., 2024). SD 1.5 and SDXL:
# the Stable Diffusion training grid's levels at the authors' published timesteps, plus its
# lowest level (what ComfyUI's AlignYourStepsScheduler uses; the authors' 3-decimal sigma list
# differs from these by at most 0.0035); SVD: the published sigmas. Other step counts are
# log-linear interpolations. ``ays_table`` reads them from diffusers' ``AysSchedules`` when
# diffusers is installed; this copy is the fallback (tests/test_export_ays.py checks both agree).
AYS_TABLES: dict[str, tuple[float, ...]] = {
    "sd15": (
        14.6146412293,
        6.4745760956,
        3.8636745985,
        2.6946151520,
        1.8841921177,
        1.3943805092,
        0.9642583904,
        0.6523686016,
        0.3977456272,
        0.1515232662,
        0.0291671582,
    ),
    "sdxl": (
        14.6146412293,
        6.3184485287,
        3.7681790315,
        2.1811480769,
        1.3405244945,
        0.8620721141,
        0.5550693289,
        0.3798540708,
        0.2332364134,
        0.1114188177,
        0.0291671582,
    ),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


# diffusers' AysSchedules keys of each table, and the SD grid the timesteps index.
AYS_DIFFUSERS_KEYS = {"sd15": "StableDiffusionTimesteps", "sdxl": "StableDiffusionXLTimesteps",
                      "svd": "StableDiffusionVideoSigmas"}


def sd_scaled_linear_grid(n: int = 1000, beta_start: float = 0.00085,
                          beta_end: float = 0.012) -> np.ndarray:
    """Ascending sigmas of Stable Diffusion's "scaled_linear" discrete schedule (float64)."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - abar) / abar)


def ays_table(model: str, *, use_diffusers: bool = True) -> np.ndarray:
    """The 11 published AYS levels of ``model`` (sd15, sdxl, svd), float64, decreasing.

    With diffusers installed (and ``use_diffusers``) they are read from its
    ``AysSchedules``: SD 1.5 / SDXL as the SD grid at its published timesteps plus the
    grid's lowest level, rounded to the 10 decimals the tables are published with (so a
    baseline is the same with or without diffusers); SVD as its published sigmas with the
    table's own last level (diffusers ends it in 0, for a final denoising step). Otherwise
    ``AYS_TABLES``.
    """
    if model not in AYS_TABLES:
        raise ValueError(f"unknown AYS table {model!r}; known: {sorted(AYS_TABLES)}")
    copy = np.asarray(AYS_TABLES[model], dtype=np.float64)
    if not use_diffusers:
        return copy
    try:
        from diffusers.schedulers import AysSchedules
    except ImportError:
        return copy
    published = AysSchedules.get(AYS_DIFFUSERS_KEYS[model])
    if published is None:  # an older diffusers without this table
        return copy
    if model == "svd":
        return np.concatenate([np.asarray(published[:-1], dtype=np.float64), copy[-1:]])
    grid = sd_scaled_linear_grid()
    return np.round(grid[np.asarray(list(published) + [0], dtype=np.int64)], 10)


def loglinear_interp(levels: np.ndarray, num: int) -> np.ndarray:
    """Resample a decreasing array of levels to ``num`` points, linearly in log(level)."""
    levels = np.asarray(levels, dtype=np.float64)
    xs = np.linspace(0.0, 1.0, levels.size)
    new = np.interp(np.linspace(0.0, 1.0, num), xs, np.log(levels[::-1]))
    return np.exp(new)[::-1].copy()


# Continuous families: u in [0, 1] -> sigma -------------------------------------------------
def _polynomial(u: np.ndarray, smin: float, smax: float, rho: float = 7.0) -> np.ndarray:
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    return (a + u * (b - a)) ** rho


def _logsnr(u: np.ndarray, smin: float, smax: float) -> np.ndarray:
    return np.exp(np.log(smax) + u * (np.log(smin) - np.log(smax)))


def _time_uniform(u: np.ndarray, smin: float, smax: float) -> np.ndarray:
    t0, t1 = vp_sigma_to_t(np.float64(smax)), vp_sigma_to_t(np.float64(smin))
    return vp_t_to_sigma(t0 + u * (t1 - t0))


def _time_quadratic(u: np.ndarray, smin: float, smax: float) -> np.ndarray:
    t0, t1 = np.sqrt(vp_sigma_to_t(np.float64(smax))), np.sqrt(vp_sigma_to_t(np.float64(smin)))
    return vp_t_to_sigma((t0 + u * (t1 - t0)) ** 2)


CURVES: dict[str, Callable[..., np.ndarray]] = {
    "polynomial": _polynomial,
    "logsnr": _logsnr,
    "time_uniform": _time_uniform,
    "time_quadratic": _time_quadratic,
}


# Flow-time families: what users of rectified-flow models run ---------------------------------
# A rectified-flow model x_t = (1 - t) x0 + t n is the EDM model x = x_t / (1 - t) at
# sigma = t / (1 - t) (searchd.models.generic.Flow), so its users' schedules, set in t, are
# schedules in sigma like any other. Each family below is uniform in a base time s in [0, 1],
# or at beta-distribution quantiles of it, mapped to t by SD3's time shift
# t = shift s / (1 + (shift - 1) s) (Flux: shift = e^mu). The base range runs from the s of
# sigma_max down to the s of sigma_min (diffusers' ``set_timesteps``, with a final 0 after it)
# or, with ``to_zero``, down to s = 0, the final 0 being the grid's own last point (Flux's
# pipeline, ComfyUI's schedulers): then the lowest positive level is the grid's last point
# before 0, not sigma_min.
def flow_t(sigma: np.ndarray | float) -> np.ndarray:
    """Flow time t = sigma / (1 + sigma) of EDM noise levels (t in [0, 1), noise at t = 1)."""
    s = np.asarray(sigma, dtype=np.float64)
    return s / (1.0 + s)


def flow_sigma(t: np.ndarray | float) -> np.ndarray:
    """EDM noise level sigma = t / (1 - t) of flow times t in [0, 1) (t = 1 is sigma = inf)."""
    tt = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return tt / (1.0 - tt)


def shift_t(s: np.ndarray | float, shift: float) -> np.ndarray:
    """SD3's time shift ``shift s / (1 + (shift - 1) s)`` (diffusers' ``shift``); Flux's
    exponential dynamic shift with mu is this with ``shift = exp(mu)``."""
    s = np.asarray(s, dtype=np.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


def unshift_t(t: np.ndarray | float, shift: float) -> np.ndarray:
    """Inverse of ``shift_t``: the base time s of a shifted time t."""
    t = np.asarray(t, dtype=np.float64)
    return t / (shift - (shift - 1.0) * t)


def scheduler_sigmas(
    sigmas: np.ndarray,
    shift: float = 1.0,
    mu: float | None = None,
    time_shift_type: str = "exponential",
) -> np.ndarray:
    """The ``sigmas=`` to give a diffusers ``FlowMatchEulerDiscreteScheduler`` (or an SD3 /
    Flux pipeline, which passes them on) so that it samples at searchd's noise levels
    ``sigmas`` [N+1] ending in 0.

    Such a scheduler shifts the ``sigmas`` it is given like its own grid: by its config's
    ``shift`` (SD3: 3), or with ``use_dynamic_shifting`` by ``mu`` (Flux: the pipeline
    computes mu from the image size; ``flux_mu``): shift e^mu for ``time_shift_type``
    "exponential", mu for "linear". So the values to pass are the schedule's flow times
    ``t = sigma / (1 + sigma)`` un-shifted by that shift; the final 0 is left out (the
    scheduler appends it). Not for schedulers configured with ``shift_terminal`` or
    ``use_karras/exponential/beta_sigmas``, which remap given sigmas further.
    """
    levels = np.asarray(sigmas, dtype=np.float64)
    if levels.ndim != 1 or levels.size < 2 or levels[-1] != 0.0:
        raise ValueError("sigmas must be a schedule [N+1] ending in 0 (a flow scheduler "
                         "appends its final 0 itself)")
    if mu is None:
        eff = float(shift)
    elif time_shift_type == "exponential":
        eff = float(np.exp(mu))
    elif time_shift_type == "linear":
        eff = float(mu)
    else:
        raise ValueError(f"time_shift_type = {time_shift_type!r}; allowed: exponential, linear")
    if not eff > 0:
        raise ValueError(f"the scheduler's shift must be > 0; got {eff!r}")
    return unshift_t(flow_t(levels[:-1]), eff)


def flux_mu(
    image_seq_len: float,
    base_seq_len: float = 256,
    max_seq_len: float = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent shift exponent: linear in the number of image tokens from
    (base_seq_len, base_shift) to (max_seq_len, max_shift), as diffusers' Flux and SD3
    pipelines compute it (``calculate_shift``) from the scheduler config's values."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(base_shift + slope * (image_seq_len - base_seq_len))


def flux_image_seq_len(
    height: int, width: int, vae_scale_factor: int = 8, patch_size: int = 2
) -> int:
    """Image tokens of a Flux-style latent transformer at a pixel size: the VAE's latents
    (``vae_scale_factor`` smaller) cut into ``patch_size``-square patches."""
    f = vae_scale_factor * patch_size
    return (int(height) // f) * (int(width) // f)


def flow_times(
    n_points: int,
    t_min: float,
    t_max: float,
    *,
    shift: float = 1.0,
    alpha: float | None = None,
    beta: float | None = None,
    to_zero: bool = False,
) -> np.ndarray:
    """Decreasing flow times [n_points]: a base grid in s, shifted.

    The base runs from ``s_max = unshift(t_max)`` down to ``s_lo``: ``unshift(t_min)`` (the
    grid's last point, at t_min) or, with ``to_zero``, 0 (a grid of n_points + 1 points whose
    last, t = 0, is left out: the caller appends the final 0). The base points are uniform, or
    with ``alpha``/``beta`` at the quantiles ``ppf(1 - u)`` of a Beta(alpha, beta)
    distribution (the "beta" schedule of Lee et al. 2024, as ComfyUI and diffusers'
    ``use_beta_sigmas`` place it). Accepts t_max = 1 (what diffusers starts from).
    """
    s_max = float(unshift_t(t_max, shift))
    if to_zero:
        s_lo, u = 0.0, np.arange(n_points, dtype=np.float64) / n_points
    else:
        s_lo = float(unshift_t(t_min, shift))
        u = np.linspace(0.0, 1.0, n_points) if n_points > 1 else np.zeros(1)
    if alpha is None and beta is None:
        q = 1.0 - u
    else:
        from scipy.stats import beta as beta_dist  # lazy: the config imports this module

        q = beta_dist.ppf(1.0 - u, 0.6 if alpha is None else alpha, 0.6 if beta is None else beta)
    return shift_t(s_lo + q * (s_max - s_lo), shift)


def _flow_params(name: str, params: dict) -> dict:
    """``flow_times`` keywords of a flow family from its parameters (popped)."""
    def num(key: str, default: float) -> float:
        v = params.pop(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ValueError(f"family {name!r}: {key} = {v!r}; it must be a finite number")
        return float(v)

    to_zero = params.pop("to_zero", FLOW_TO_ZERO[name])
    if not isinstance(to_zero, (bool, np.bool_)):
        raise ValueError(f"family {name!r}: to_zero = {to_zero!r}; it must be true or false")
    kw: dict = {"to_zero": bool(to_zero)}
    if name == "flow_shift":
        kw["shift"] = num("shift", 3.0)
    elif name == "flow_flux":
        if "mu" in params:
            mu = num("mu", 0.0)
            if any(k in params for k in FLUX_KEYS):
                raise ValueError(f"family 'flow_flux': give mu or {FLUX_KEYS[0]}, not both")
        else:
            mu = flux_mu(num("image_seq_len", 256), num("base_seq_len", 256),
                         num("max_seq_len", 4096), num("base_shift", 0.5),
                         num("max_shift", 1.15))
        kw["shift"] = float(np.exp(mu))
    elif name == "flow_beta":
        kw.update(alpha=num("alpha", 0.6), beta=num("beta", 0.6), shift=num("shift", 1.0))
        if not (kw["alpha"] > 0 and kw["beta"] > 0):
            raise ValueError(f"family 'flow_beta': alpha and beta must be > 0; got {kw}")
    if not kw.get("shift", 1.0) > 0:
        raise ValueError(f"family {name!r}: shift = {kw['shift']!r}; it must be > 0")
    if params:
        raise ValueError(f"unknown parameters {sorted(params)} for family {name!r}; "
                         f"allowed: {', '.join(FLOW_FAMILY_PARAMS[name])}")
    return kw


def _flow(name: str, n_points: int, smin: float, smax: float, final_zero: bool,
          params: dict) -> np.ndarray:
    """Positive levels [n_points] (sigma) of a flow family."""
    kw = _flow_params(name, dict(params))
    if kw["to_zero"] and not final_zero:
        raise ValueError(f"family {name!r} with to_zero=True needs final_zero=True (its grid "
                         "ends in 0)")
    t = flow_times(n_points, float(flow_t(smin)), float(flow_t(smax)), **kw)
    pts = flow_sigma(t)
    if not kw["to_zero"] and n_points > 1:
        pts[-1] = smin  # exact endpoints
    pts[0] = smax
    if pts[-1] < smin * (1 - 1e-12):
        raise ValueError(f"family {name!r}: its lowest level {pts[-1]!r} is below sigma_min = "
                         f"{smin!r} (too many steps for to_zero)")
    return pts


# Parameters of the flow families (besides n_steps, sigma_min, sigma_max, final_zero), and
# whether each runs its base grid to 0 by default (what its users run).
FLUX_KEYS = ("image_seq_len", "base_seq_len", "max_seq_len", "base_shift", "max_shift")
FLOW_FAMILY_PARAMS: dict[str, tuple[str, ...]] = {
    "flow_uniform": ("to_zero",),
    "flow_shift": ("shift", "to_zero"),
    "flow_flux": ("mu", *FLUX_KEYS, "to_zero"),
    "flow_beta": ("alpha", "beta", "shift", "to_zero"),
}
FLOW_TO_ZERO: dict[str, bool] = {
    "flow_uniform": False,  # diffusers' set_timesteps
    "flow_shift": False,  # diffusers' SD3 pipeline
    "flow_flux": True,  # diffusers' Flux pipeline: sigmas = linspace(1, 1/N, N)
    "flow_beta": True,  # ComfyUI's "beta" scheduler
}
FLOW_FAMILIES: tuple[str, ...] = tuple(FLOW_FAMILY_PARAMS)

FAMILIES: tuple[str, ...] = (*CURVES, "discrete", "ays", *FLOW_FAMILIES)


def _discrete(n_points: int, smin: float, smax: float, grid: str | np.ndarray) -> np.ndarray:
    """Evenly spaced indices of a discrete grid, restricted to [smin, smax], high to low."""
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; known grids: {sorted(GRIDS)}")
        g = GRIDS[grid]()
    else:
        g = np.sort(np.asarray(grid, dtype=np.float64))
    inside = np.flatnonzero((g >= smin * (1 - 1e-9)) & (g <= smax * (1 + 1e-9)))
    if inside.size < n_points:
        raise ValueError(
            f"the grid has {inside.size} levels in [{smin}, {smax}]; {n_points} are needed"
        )
    idx = np.round(np.linspace(inside[-1], inside[0], n_points)).astype(np.int64)
    return g[idx]


def baseline(
    name: str,
    n_steps: int,
    sigma_min: float,
    sigma_max: float,
    final_zero: bool = True,
    **params,
) -> np.ndarray:
    """A schedule of ``n_steps`` steps from family ``name``, as a float64 array [n_steps+1].

    Families: polynomial (``rho``, default 7, EDM), logsnr (uniform in log-SNR), time_uniform
    and time_quadratic (VP time, linear beta), discrete (``grid``: "ddpm_linear",
    "iddpm_cosine" or an array of sigmas), ays (``model``: sd15, sdxl, svd; its own range).
    Flow-time families (``flow_times``): flow_uniform (uniform in t = sigma / (1 + sigma)),
    flow_shift (SD3: ``shift``, default 3), flow_flux (Flux: ``mu``, or ``image_seq_len`` and
    the scheduler's ``base_seq_len``, ``max_seq_len``, ``base_shift``, ``max_shift``),
    flow_beta (``alpha``, ``beta``, default 0.6, and ``shift``, default 1); each takes
    ``to_zero`` (the base grid runs to t = 0 instead of sigma_min; needs final_zero).
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown schedule family {name!r}; known families: {list(FAMILIES)}")
    if not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps = {n_steps!r}; it must be an integer >= 1")
    if not (0 < sigma_min < sigma_max) or not np.isfinite(sigma_max):
        raise ValueError(
            f"sigma_min = {sigma_min!r}, sigma_max = {sigma_max!r}; need 0 < sigma_min < sigma_max"
        )
    n_points = n_steps if final_zero else n_steps + 1
    if name == "ays":
        table = ays_table(params.pop("model", "sd15"))
        # As the authors' how-to and ComfyUI do: interpolate to n_steps + 1 levels; with a final
        # 0 the table's last level (its sigma_min) is replaced by 0.
        levels = table if table.size == n_steps + 1 else loglinear_interp(table, n_steps + 1)
        if final_zero:
            levels = levels.copy()
            levels[-1] = 0.0
        return levels.astype(np.float64)
    if name in FLOW_FAMILIES:
        pts = _flow(name, n_points, float(sigma_min), float(sigma_max), final_zero, params)
        params = {}
    elif name == "discrete":
        grid = params.pop("grid", "ddpm_linear")
        pts = _discrete(n_points, sigma_min, sigma_max, grid)
    else:
        if n_points == 1:
            pts = np.array([sigma_max], dtype=np.float64)
        else:
            u = np.linspace(0.0, 1.0, n_points)
            try:
                pts = CURVES[name](u, float(sigma_min), float(sigma_max), **params)
            except TypeError as e:
                raise ValueError(f"bad parameters {params} for family {name!r}: {e}") from None
            pts[0], pts[-1] = sigma_max, sigma_min  # exact endpoints
    if params and name == "discrete":
        raise ValueError(f"unknown parameters {sorted(params)} for family 'discrete'")
    out = np.concatenate([pts, [0.0]]) if final_zero else pts
    return out.astype(np.float64)


def family_params(name: str) -> tuple[str, ...]:
    """The parameters family ``name`` takes besides the steps, range and ending (what a
    configuration may set under ``params``), from the family's own definition."""
    if name not in FAMILIES:
        raise ValueError(f"unknown schedule family {name!r}; known families: {list(FAMILIES)}")
    if name == "discrete":
        return ("grid",)
    if name == "ays":
        return ("model",)
    if name in FLOW_FAMILY_PARAMS:
        return FLOW_FAMILY_PARAMS[name]
    import inspect

    return tuple(list(inspect.signature(CURVES[name]).parameters)[3:])
