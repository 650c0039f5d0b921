"""A flow run's best.json and ``python -m searchd.export`` on the shipped digits-flow zoo.

The reference is diffusers itself: the shipped checkpoint's UNet2DModel and its own
FlowMatchEulerDiscreteScheduler config (``from_pretrained`` on the zoo folder), run in an
SD3-style pipeline loop (diffusers' ``retrieve_timesteps``, ``step``) with the exported
scheduler and ``sigmas`` in flow time t. searchd runs ``solve`` on the same folder loaded
through its diffusers adapter, from the same noise. They agree within 1e-5 relative.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel  # noqa: E402

try:  # diffusers' retrieve_timesteps (SD3's module needs transformers; this copy does not)
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        retrieve_timesteps,
    )
except ImportError:  # pragma: no cover - depends on the installation
    from diffusers.pipelines.kandinsky6.pipeline_kandinsky6_sr import retrieve_timesteps

from searchd import export  # noqa: E402
from searchd.config import load_config  # noqa: E402
from searchd.models import load  # noqa: E402
from searchd.models.adapters import FLOW_ZOO  # noqa: E402
from searchd.schedule import Schedule  # noqa: E402
from searchd.solvers import solve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
# The digits-flow-s euler NFE 5 schedule the quality benchmark's evolution found (sigma).
SEARCHED = np.array([80.0, 1.991091939965556, 1.1425356463335992, 0.719830840513779,
                     0.3743592011886443, 0.0])

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class SD3StyleLoop:
    """What an SD3/Flux pipeline does with ``sigmas=``: ``retrieve_timesteps`` then the
    scheduler's ``step`` on the network's velocity, from the given latents."""

    def __init__(self, unet: UNet2DModel, scheduler: FlowMatchEulerDiscreteScheduler):
        self.unet, self.scheduler = unet, scheduler

    @torch.no_grad()
    def __call__(self, num_inference_steps: int = 28, sigmas=None, latents=None,
                 mu: float | None = None) -> torch.Tensor:
        kw = {} if mu is None else {"mu": mu}
        steps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, "cpu",
                                      sigmas=sigmas, **kw)
        x = latents
        for t in steps:
            v = self.unet(x, t.expand(x.shape[0])).sample
            x = self.scheduler.step(v, t, x).prev_sample
        return x


@pytest.fixture(scope="module")
def zoo_s():
    path = FLOW_ZOO["digits-flow-s"]
    return {"path": path, "den": load("digits-flow-s"),
            "unet": UNet2DModel.from_pretrained(path).eval(),
            "noise": torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))}


def write_run(tmp_path: Path, sigmas: np.ndarray, solver: str) -> Path:
    """A run directory as a digits-flow search leaves it: its config.yaml and a best.json
    whose usage is built as the session builds it (flow read from the config's model)."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(ROOT / "configs" / "digits-flow.yaml")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    flow = export.model_levels(cfg.model) == "flow"
    sched = Schedule(sigmas, solver=solver)
    best = {"sigmas": [float(x) for x in sigmas], "solver": solver,
            "usage": export.usage_section(sched, {}, flow=flow)}
    (run / "best.json").write_text(json.dumps(best))
    return run


def test_the_digits_flow_config_is_read_as_a_flow_model():
    cfg = load_config(ROOT / "configs" / "digits-flow.yaml")
    assert export.model_levels(cfg.model) == "flow"
    assert export.model_levels({"name": "digits-flow-m"}) == "flow"
    assert export.model_levels({"name": "digits-unet-s"}) == "sigma"
    assert cfg.space.warp == "flow" and cfg.solver.name == "euler"


def test_best_json_gives_t_and_the_export_reproduces_searchd_in_an_sd3_loop(
        zoo_s, tmp_path, capsys):
    run = write_run(tmp_path, SEARCHED, "euler")
    usage = json.loads((run / "best.json").read_text())["usage"]
    t = SEARCHED / (1 + SEARCHED)
    assert usage["flow"] and usage["t"] == pytest.approx(list(t), rel=1e-15)
    # The command a user runs: the snippet, and its JSON form.
    assert export.main([str(run), "--to", "diffusers"]) == 0
    code = capsys.readouterr().out
    assert "FlowMatchEulerDiscreteScheduler" in code
    assert export.main([str(run), "--to", "diffusers", "--json"]) == 0
    form = json.loads(capsys.readouterr().out)
    assert form["levels"] == "flow time t" and form["route"] == "sigmas"
    np.testing.assert_allclose(form["sigmas"], t, rtol=1e-15)

    # The snippet runs verbatim against the checkpoint's own scheduler, as a pipeline's.
    pipe = SD3StyleLoop(zoo_s["unet"], FlowMatchEulerDiscreteScheduler.from_pretrained(
        zoo_s["path"]))
    ns = {"pipe": pipe}
    exec(code, ns)
    x = pipe(latents=zoo_s["noise"] * form["init_noise_sigma"], **ns["pipeline_kwargs"])
    ours = solve(zoo_s["den"], zoo_s["noise"], SEARCHED, solver="euler")
    assert rel(x * form["output_scale"], ours) < TOL
    # Independent of the export: diffusers' flow Euler at these t is searchd's sample.
    plain = SD3StyleLoop(zoo_s["unet"], FlowMatchEulerDiscreteScheduler.from_pretrained(
        zoo_s["path"]))
    y = plain(num_inference_steps=5, sigmas=list(t[:-1]), latents=zoo_s["noise"] * t[0])
    assert rel(y, ours) < TOL


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_multistep_export_of_a_flow_run(zoo_s, tmp_path, capsys, solver):
    run = write_run(tmp_path, SEARCHED, solver)
    assert export.main([str(run), "--to", "diffusers", "--json"]) == 0
    form = json.loads(capsys.readouterr().out)
    assert form["levels"] == "flow time t"
    base = FlowMatchEulerDiscreteScheduler.load_config(zoo_s["path"])
    sched = getattr(diffusers, form["scheduler"]).from_config(base, **form["arguments"])
    if form["route"] == "pinned":
        sched = export.pin_schedule(sched, form["sigmas"])
    else:
        sched.set_timesteps(**form["pipeline_kwargs"])
    x = zoo_s["noise"] * form["init_noise_sigma"]
    with torch.no_grad():
        for tt in sched.timesteps:
            v = zoo_s["unet"](sched.scale_model_input(x, tt), tt.expand(x.shape[0])).sample
            x = sched.step(v, tt, x).prev_sample
    ours = solve(zoo_s["den"], zoo_s["noise"], SEARCHED, solver=solver)
    assert rel(x * form["output_scale"], ours) < TOL

