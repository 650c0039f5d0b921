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

FAMILIES: tuple[str, ...] = (*CURVES, "discrete", "ays")


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
    if name == "discrete":
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
    import inspect

    return tuple(list(inspect.signature(CURVES[name]).parameters)[3:])
