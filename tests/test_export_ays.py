"""Align Your Steps: the tables are read from diffusers' ``AysSchedules`` when diffusers is
installed, and the copy in ``searchd/schedules/baselines.py`` (the fallback) equals them."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from searchd.schedules.baselines import AYS_TABLES, ays_table, baseline, sd_scaled_linear_grid

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import AysSchedules  # noqa: E402

KEYS = {"sd15": "StableDiffusionTimesteps", "sdxl": "StableDiffusionXLTimesteps"}


@pytest.mark.parametrize("model", ["sd15", "sdxl", "svd"])
def test_tables_from_diffusers_equal_the_copy(model):
    read = ays_table(model)
    copy = np.asarray(AYS_TABLES[model])
    assert read.shape == (11,) and np.all(np.diff(read) < 0)
    # The copy holds the same levels to the 10 decimals they are published with.
    assert read.tolist() == list(copy)
    if model != "svd":  # unrounded: the SD grid at diffusers' published timesteps
        grid = sd_scaled_linear_grid()[list(AysSchedules[KEYS[model]]) + [0]]
        np.testing.assert_allclose(grid, copy, rtol=2e-9, atol=0)
    assert ays_table(model, use_diffusers=False).tolist() == list(copy)


def test_the_copy_agrees_with_diffusers_published_lists():
    """diffusers also ships the authors' 3-decimal sigma lists (ending in 0 for a final
    denoising step). SD's grid levels at the published timesteps differ from them by at most
    0.0035; SVD's are the same numbers."""
    for model, key in (("sd15", "StableDiffusionSigmas"), ("sdxl", "StableDiffusionXLSigmas"),
                       ("svd", "StableDiffusionVideoSigmas")):
        published = np.asarray(AysSchedules[key])
        assert published[-1] == 0.0
        gap = np.abs(np.asarray(AYS_TABLES[model])[:-1] - published[:-1])
        assert gap.max() <= (0.0035 if model != "svd" else 0.0), (model, gap)
    # The grid is Stable Diffusion's own (diffusers' scheduler, float32 alphas_cumprod).
    sd = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                 beta_end=0.012)
    abar = sd.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(sd_scaled_linear_grid(), np.sqrt((1 - abar) / abar), rtol=1e-4)


def test_ays_baseline_uses_the_read_tables_and_falls_back_to_the_copy(monkeypatch):
    ten = baseline("ays", 10, 0.03, 14.6, final_zero=False, model="sd15")
    np.testing.assert_array_equal(ten, ays_table("sd15"))
    zero = baseline("ays", 10, 0.03, 14.6, model="sdxl")
    assert zero[-1] == 0.0 and np.array_equal(zero[:-1], ays_table("sdxl")[:-1])
    monkeypatch.setitem(sys.modules, "diffusers.schedulers", None)  # diffusers not installed
    assert ays_table("svd").tolist() == list(AYS_TABLES["svd"])
    np.testing.assert_array_equal(baseline("ays", 10, 0.03, 14.6, final_zero=False), ten)
    with pytest.raises(ValueError, match="unknown AYS table 'sd3'"):
        ays_table("sd3")
