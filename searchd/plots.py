"""Figures of a run: metric per generation, schedules in log sigma, sample grids.

Matplotlib is imported lazily with the Agg backend, so nothing here needs a display.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: np.ndarray, ncols: int = 8, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile images [B, C, H, W] in [-1, 1] into one uint8 picture [H', W'] or [H', W', 3].

    Each image is enlarged ``scale`` times by pixel repetition (nearest neighbour), so 8x8
    digits stay legible.
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W]; got shape {x.shape}")
    b, c, h, w = x.shape
    x = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    x = x.repeat(scale, axis=2).repeat(scale, axis=3)
    h, w = h * scale, w * scale
    ncols = max(1, min(ncols, b))
    nrows = (b + ncols - 1) // ncols
    canvas = np.full((c, nrows * (h + pad) + pad, ncols * (w + pad) + pad), 255, np.uint8)
    for i in range(b):
        r, q = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        canvas[:, top : top + h, left : left + w] = x[i]
    return canvas[0] if c == 1 else canvas[:3].transpose(1, 2, 0)


def save_image_grid(images: np.ndarray, path: str | Path, ncols: int = 8, scale: int = 4) -> Path:
    """Write a PNG grid of images [B, C, H, W] in [-1, 1]."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, ncols=ncols, scale=scale)).save(path)
    return path


def plot_history(
    generations: Sequence[int],
    values: Sequence[float],
    baselines: Mapping[str, float],
    path: str | Path,
    metric: str = "fid",
) -> Path:
    """Scatter of every scored candidate's metric per generation, the running best, and
    horizontal lines at the baseline families' values."""
    plt = _pyplot()
    g = np.asarray(generations, dtype=np.int64)
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.scatter(g[ok], v[ok], s=10, alpha=0.45, color="tab:blue", label="candidates")
    if ok.any():
        gens = np.unique(g[ok])
        best = np.minimum.accumulate([v[ok & (g == k)].min() for k in gens])
        ax.step(gens, best, where="post", color="tab:red", lw=2, label="best so far")
    colors = ["tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:gray", "tab:olive"]
    for i, (name, val) in enumerate(sorted(baselines.items(), key=lambda kv: kv[1])):
        if np.isfinite(val):
            ax.axhline(val, ls="--", lw=1.2, color=colors[i % len(colors)], label=name)
    ax.set_xlabel("generation")
    ax.set_ylabel(metric)
    if ok.any() and v[ok].max() / max(v[ok].min(), 1e-12) > 20:
        ax.set_yscale("log")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"{metric} per generation")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_schedules(
    schedules: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str = "schedules",
) -> Path:
    """Noise levels per step in log sigma, one line per named schedule (a final 0 is drawn
    at the bottom of the axis, marked as 'denoise')."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    positive = [s for sig in schedules.values() for s in sig if s > 0]
    floor = min(positive) / 3 if positive else 1e-3
    for i, (name, sig) in enumerate(schedules.items()):
        s = np.asarray(sig, dtype=np.float64)
        shown = np.where(s > 0, s, floor)
        lw, style = (2.4, "-o") if i == 0 else (1.3, "--.")
        ax.plot(np.arange(s.size), shown, style, lw=lw, label=name)
    ax.set_yscale("log")
    ax.axhline(floor, color="k", lw=0.5)
    ax.text(0, floor * 1.15, "0 (denoise)", fontsize=7)
    ax.set_xlabel("step index")
    ax.set_ylabel("sigma")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


HISTORY_PLOT = "metric_per_generation.png"
SCHEDULES_PLOT = "schedules.png"


def draw_plots(
    out_dir: str,
    rows: Sequence[Mapping[str, Any]],
    baseline_values: Mapping[str, float],
    schedules: Mapping[str, Sequence[float]],
    metric: str,
    title: str,
) -> list[str]:
    """``metric_per_generation.png`` and ``schedules.png`` into ``out_dir``; the file names.

    ``schedules``: name -> sigmas, the searched (best) schedule first.
    """
    plot_history([r["generation"] for r in rows],
                 [math.nan if r["value"] is None else r["value"] for r in rows],
                 dict(baseline_values), os.path.join(out_dir, HISTORY_PLOT), metric=metric)
    names = [HISTORY_PLOT]
    if schedules:
        plot_schedules(dict(schedules), os.path.join(out_dir, SCHEDULES_PLOT), title=title)
        names.append(SCHEDULES_PLOT)
    return names
