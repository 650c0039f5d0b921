"""Real checkpoints from a configuration: ``model.name: kind:path`` and ``model.spec``, the
driver's one-line errors, the shipped real-checkpoint configs, the evaluator on latent
models, and a tiny random diffusers UNet searched end to end through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from searchd.config import ConfigError, load_config, validate_config
from searchd.loop.factory import load_model
from searchd.models import known_kinds, known_models, load
from searchd.models.adapters import check_spec
from searchd.search import main

diffusers = pytest.importorskip("diffusers")

from diffusers import DDPMScheduler, UNet2DModel  # noqa: E402
from tiny_models import tiny_unet as _tiny_unet  # noqa: E402
from tiny_models import tiny_vae  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


def tiny_unet(channels: int = 1, seed: int = 0) -> UNet2DModel:
    return _tiny_unet(channels, seed)


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 1x8x8 UNet with a 1,000-step linear-beta epsilon scheduler (DDPM's)."""
    root = tmp_path_factory.mktemp("ddpm")
    tiny_unet().save_pretrained(root)
    DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon").save_pretrained(root)
    return root


def quickstart(**model) -> dict:
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    raw["model"] = {**model, "device": "cpu"}
    return raw


# Configuration ----------------------------------------------------------------------------
def test_kinds_and_zoo_names_are_registered():
    assert {"diffusers", "edm", "generic", "gmm"} <= set(known_kinds())
    assert {"digits-unet-s", "digits-unet-m", "digits-unet-l"} <= set(known_models())


def test_kind_path_shorthand_resolves_to_a_spec(ddpm_dir):
    cfg = validate_config(quickstart(name=f"diffusers:{ddpm_dir}"))
    assert cfg.model.name is None
    assert (cfg.model.spec.kind, cfg.model.spec.path) == ("diffusers", str(ddpm_dir))
    # The resolved form loads back unchanged (what a resumed run compares).
    assert validate_config(cfg.resolve()).resolve() == cfg.resolve()
    # The path is everything after the first colon: an entry point keeps its own colon.
    gen = validate_config(quickstart(name="generic:pkg.mod:make")).model.spec
    assert (gen.kind, gen.path) == ("generic", "pkg.mod:make")
    with pytest.raises(ConfigError, match="kind:path"):
        validate_config(quickstart(name="diffusers:"))


def test_spec_options_reach_the_adapter(ddpm_dir):
    """model.spec.options are passed on: the scheduler says epsilon, the option says v."""
    base = load_model(validate_config(quickstart(name=f"diffusers:{ddpm_dir}")))
    cfg = validate_config(quickstart(spec={
        "kind": "diffusers", "path": str(ddpm_dir),
        "options": {"prediction_type": "v_prediction", "runtime": {"batch_size": 7}},
    }))
    den = load_model(cfg)
    assert base.describe()["prediction"] == "epsilon"
    assert den.describe()["prediction"] == "v_prediction"
    assert den.batch_size == 7 and den.name == ddpm_dir.name
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 2.0, 10.0])
    assert not torch.allclose(den(x, sigma), base(x, sigma))
    # The grid of the discrete model is exposed, and "kind:path" strings load directly.
    grid = load(f"diffusers:{ddpm_dir}").sigma_grid
    assert grid.shape == (1000,) and float(grid[0]) == pytest.approx(0.0100, abs=1e-4)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("diffusers:/nonexistent/ckpt", "neither a directory nor a hub id"),
        ("edm:/nonexistent/edm.pkl", "is not a file"),
        ("generic:no_colon_here", "module:function"),
        ("generic:/nonexistent/file.py:make", "does not exist"),
        ("sdxl:/tmp/x", "known kinds"),
    ],
)
def test_bad_checkpoint_is_one_line_before_ray(model, message, capsys):
    code = main(["--config", "configs/quickstart.yaml", "--set", f"model.name={model}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err


def test_unknown_adapter_option_is_one_line(ddpm_dir, capsys):
    over = f"model.spec={{kind: diffusers, path: {ddpm_dir}, options: {{guidance: 2}}}}"
    code = main(["--config", "configs/quickstart.yaml", "--set", "model.name=null",
                 "--set", over])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown options ['guidance']" in err and len(err.splitlines()) == 1


@pytest.mark.ray
def test_model_that_fails_to_load_in_the_worker_is_one_line(tmp_path):
    """An EDM pickle that exists but is not one: the actor that loads it fails, and the error
    comes back as one line, not a remote traceback; the new run directory is not left
    behind."""
    bad = tmp_path / "broken.pkl"
    bad.write_bytes(b"not a pickle")
    p = subprocess.run(
        [sys.executable, "-m", "searchd.search", "--config", "configs/quickstart.yaml",
         "--set", f"model.name=edm:{bad}", "--set", "workers.num_workers=1",
         "--run-dir", str(tmp_path / "run"), "--quiet", "--trust-remote-code"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    err = p.stderr.strip()
    assert p.returncode == 1 and "cannot load the model (broken.pkl)" in err, err[-3000:]
    assert len([ln for ln in err.splitlines() if "searchd.search" in ln]) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.startswith("python -m searchd.search: error: cannot load the model (broken.pkl):")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["cifar10-edm", "ddpm-cifar10", "sd15", "sd3"])
def test_real_checkpoint_configs_validate_without_weights(name, tmp_path, monkeypatch):
    # The validator checks that a reference file exists: stand in empty files for the
    # downloads the comments describe, in a scratch working directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "cifar10-32x32.npz").write_bytes(b"")
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    spec = cfg.model.spec
    assert spec is not None and cfg.model.device == "cuda"
    check_spec(spec.kind, spec.path, spec.options, check_path=False)
    text = (ROOT / "configs" / f"{name}.yaml").read_text()
    # Each says where the checkpoint and the reference come from, and what to expect.
    assert "Checkpoint" in text and "Published" in text
    if name == "sd15":
        prompts = ROOT / spec.options["prompts"]
        assert prompts.is_file()
        from searchd.models.diffusers import read_prompts

        assert len(read_prompts(prompts)) == 32
        assert spec.options["guidance_scale"] > 1


# Latent models: features of the decoded images --------------------------------------------
def test_evaluator_takes_features_of_decoded_latents(tmp_path):
    root = tmp_path / "ldm"
    tiny_unet(channels=4, seed=3).save_pretrained(root / "unet")
    tiny_vae(seed=4).save_pretrained(root / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  ).save_pretrained(root / "scheduler")
    den = load(f"diffusers:{root}")
    assert den.shape == (4, 8, 8) and den.decode is not None
    from searchd.evaluation import Evaluator
    from searchd.evaluation.features import load_features
    from searchd.schedule import Schedule

    ev = Evaluator(den, "pixels", None, metrics=("teacher_distance",), solver="euler",
                   teacher={"solver": "euler", "steps": 6})
    assert ev.image_shape == (3, 16, 16)
    sched = Schedule(np.array([14.0, 3.0, 0.7, 0.0]), solver="euler")
    seeds = list(range(6))
    res, feats = ev.per_sample_features([sched], seeds)
    assert res[0].ok, res[0]
    images = den.decode(ev.generate(sched, seeds))
    assert images.shape == (6, 3, 16, 16)
    expect = load_features("pixels", shape=(3, 16, 16))(images)
    torch.testing.assert_close(feats[0], expect.cpu().float(), rtol=1e-4, atol=1e-4)


# The real CLI on a tiny random diffusers UNet ----------------------------------------------
@pytest.mark.ray
def test_tiny_diffusers_unet_search_end_to_end(ddpm_dir, tmp_path):
    """``python -m searchd.search`` on ``model.name: diffusers:<dir>``: a discrete space on
    the checkpoint's own 1,000-level grid, FID in the digits feature space against a small
    reference. Every searched schedule must be made of the model's grid levels."""
    from searchd.evaluation.features import load_features
    from searchd.evaluation.reference import exact_reference

    ref = tmp_path / "ref.npz"
    exact_reference(load("gmm-digits-k8"), load_features("digits"), range(500)).save(ref)
    run = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-m", "searchd.search", "--config", "configs/quickstart.yaml",
         "--set", f"model.name=diffusers:{ddpm_dir}", "--set", "space.kind=discrete",
         "--set", "space.endpoints=fixed", "--set", "nfe=4",
         "--set", "search.evolution.population_num=5", "--set", "search.evolution.select_num=2",
         "--set", "search.evolution.mutation_num=2", "--set", "search.evolution.crossover_num=1",
         "--set", "search.evolution.generations=2", "--set", "samples.per_candidate=64",
         "--set", "samples.heldout=128", "--set", f"metric.reference={ref}",
         "--set", "report.grid_samples=4", "--set", "report.plots=false",
         "--set", "workers.num_workers=1", "--run-dir", str(run), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    best = json.loads((run / "best.json").read_text())
    assert best["model"] == ddpm_dir.name
    grid = load(f"diffusers:{ddpm_dir}").sigma_grid.numpy()
    sig = np.asarray(best["sigmas"])
    assert sig[-1] == 0 and len(sig) == 5
    # Every nonzero level is one of the checkpoint's 1,000 training levels.
    assert np.abs(grid[None, :] - sig[:-1, None]).min(1).max() < 1e-9 * grid.max()
    # Every candidate ran on the network and was scored; the held-out re-scoring too.
    import pyarrow.parquet as pq

    rows = pq.read_table(run / "evaluations").to_pylist()
    assert len(rows) == 10 and all(r["status"] == "ok" and r["nfe"] == 4 for r in rows)
    assert all(np.isfinite(r["value"]) for r in rows)
    held = best["heldout"]
    assert held["n_samples"] == 128 and all(np.isfinite(s["fid"]) for s in held["scores"])
