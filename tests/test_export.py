"""searchd.export: a searched schedule reproduced sample for sample by the samplers people use.

The reference is diffusers itself: a tiny UNet2DModel saved with ``save_pretrained`` runs in
diffusers' standard scheduler loop (``scale_model_input``, the network, ``step``) and in a
pipeline that follows Stable Diffusion's protocol with diffusers' own ``retrieve_timesteps``,
with the exported scheduler; searchd runs ``solve`` on the same checkpoint loaded through its
diffusers adapter, from the same noise. They must agree within 1e-5 relative (float32).
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import DiffusionPipeline, UNet2DModel  # noqa: E402
from tiny_models import tiny_unet  # noqa: E402

from searchd.export import (  # noqa: E402
    ExportError,
    comfy_export,
    diffusers_export,
    diffusers_scheduler,
    flow_time,
    kdiffusion_export,
    model_levels,
    pin_schedule,
    usage_section,
)
from searchd.models.diffusers import load_diffusers  # noqa: E402
from searchd.schedule import Schedule  # noqa: E402
from searchd.solvers import solve  # noqa: E402

try:  # diffusers' retrieve_timesteps (SD's copy needs transformers; this copy does not)
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        retrieve_timesteps,
    )
except ImportError:  # pragma: no cover - depends on the installation
    from diffusers.pipelines.kandinsky6.pipeline_kandinsky6_sr import retrieve_timesteps

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py

TOL = 1e-5
# Two searched-looking schedules of 5 steps, one ending in 0 and one above 0.
ZERO = np.array([61.3, 9.37, 2.14, 0.683, 0.157, 0.0])
ABOVE = np.array([61.3, 9.37, 2.14, 0.683, 0.157, 0.0411])
ENDINGS = {"zero": ZERO, "above": ABOVE}
SOLVERS = [("euler", {}), ("heun", {}), ("dpmpp_2m", {}), ("unipc", {}),
           ("ipndm", {"variable_step": True}), ("ipndm", {"variable_step": True, "order": 2})]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def vp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddpm")
    tiny_unet(3, seed=0).save_pretrained(root / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flowmatch")
    tiny_unet(3, seed=1).save_pretrained(root / "unet")
    # SD3's shift; the export must take t as given anyway.
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    return root


class Checkpoint:
    """One saved checkpoint, seen by searchd (adapter) and by diffusers (raw UNet, config)."""

    def __init__(self, root: Path):
        self.root = root
        self.den = load_diffusers(root)
        self.unet = UNet2DModel.from_pretrained(root / "unet").eval()
        cls = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        self.config = getattr(diffusers, cls["_class_name"]).load_config(root / "scheduler")
        self.noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vp(vp_dir: Path) -> Checkpoint:
    return Checkpoint(vp_dir)


@pytest.fixture(scope="module")
def flow(flow_dir: Path) -> Checkpoint:
    return Checkpoint(flow_dir)


def scheduler_loop(scheduler, unet, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' standard denoising loop (set_timesteps already called)."""
    scale = getattr(type(scheduler), "scale_model_input", None)  # FlowMatch has none
    x = latents
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t) if scale is not None else x
            out = unet(x_in, t.expand(x.shape[0])).sample
            x = scheduler.step(out, t, x).prev_sample
    return x


def run_export(ck: Checkpoint, form) -> torch.Tensor:
    """The exported scheduler in the standard loop, started as the export says; the result
    in searchd's units (times output_scale)."""
    sched = form.make_scheduler(ck.config)
    sched.set_timesteps(**form.pipeline_kwargs())
    x = scheduler_loop(sched, ck.unet, ck.noise * sched.init_noise_sigma if not form.flow
                       else ck.noise * form.init_noise_sigma)
    return x * form.output_scale


# Continuous schedules ----------------------------------------------------------------------
@pytest.mark.parametrize("ending", ["zero", "above"])
@pytest.mark.parametrize("solver,opts", SOLVERS, ids=lambda v: str(v))
def test_exported_scheduler_reproduces_solve(vp, solver, opts, ending):
    sig = ENDINGS[ending]
    form = diffusers_export(sig, solver, opts)
    ours = solve(vp.den, vp.noise, sig, solver=solver, **opts)
    theirs = run_export(vp, form)
    assert rel(theirs, ours) < TOL, (form.scheduler, form.route)
    # The scheduler ran exactly N steps of the searched levels.
    assert form.n_steps == 5 and form.sigmas == tuple(sig)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_diffusers_scheduler_runs_in_a_plain_loop(vp, solver):
    sched = diffusers_scheduler(ABOVE, solver, config=vp.config)
    assert type(sched).__name__ == diffusers_export(ABOVE, solver).scheduler
    sched.set_timesteps()
    x = scheduler_loop(sched, vp.unet, vp.noise * sched.init_noise_sigma)
    assert rel(x, solve(vp.den, vp.noise, ABOVE, solver=solver)) < TOL


def test_routes_and_start_scales():
    e = diffusers_export(ZERO, "euler")
    assert (e.scheduler, e.route) == ("EulerDiscreteScheduler", "sigmas")
    assert e.pipeline_kwargs() == {"sigmas": list(ZERO)} and e.init_noise_sigma == 61.3
    d = diffusers_export(ABOVE, "dpmpp_2m")
    assert (d.scheduler, d.route) == ("DPMSolverMultistepScheduler", "pinned")
    assert d.arguments["final_sigmas_type"] == "sigma_min"
    assert not d.arguments["lower_order_final"] and d.arguments["solver_order"] == 2
    assert d.init_noise_sigma == pytest.approx(61.3 / math.sqrt(1 + 61.3**2), rel=1e-15)
    assert d.output_scale == pytest.approx(math.sqrt(1 + 0.0411**2), rel=1e-15)
    assert diffusers_export(ZERO, "dpmpp_2m").arguments["final_sigmas_type"] == "zero"
    u = diffusers_export(ZERO, "unipc", {"order": 3})
    assert u.arguments["solver_order"] == 3 and u.arguments["solver_type"] == "bh2"
    lms = diffusers_export(ZERO, "ipndm", {"variable_step": True, "order": 3})
    assert lms.scheduler == "LMSDiscreteScheduler" and lms.step_kwargs == {"order": 3}


def test_the_start_scale_matters(vp):
    """A VP scheduler started from the usual z * 1.0 misses searchd's sample by far more than
    the tolerance (so the tolerance does test the start)."""
    form = diffusers_export(ZERO, "dpmpp_2m")
    sched = form.make_scheduler(vp.config)
    sched.set_timesteps()
    ours = solve(vp.den, vp.noise, ZERO, solver="dpmpp_2m")
    assert rel(scheduler_loop(sched, vp.unet, vp.noise * 1.0), ours) > 10 * TOL


def test_a_default_configured_scheduler_differs(vp):
    """Without the exported arguments (diffusers' defaults: lower_order_final) the same
    levels give another sample: the arguments are needed, and the test can fail."""
    form = diffusers_export(ABOVE, "dpmpp_2m")
    plain = diffusers.DPMSolverMultistepScheduler.from_config(vp.config)
    sched = pin_schedule(plain, form.sigmas)  # pinned levels, default arguments
    sched.set_timesteps(5)
    x = scheduler_loop(sched, vp.unet, vp.noise * sched.init_noise_sigma) * form.output_scale
    assert rel(x, solve(vp.den, vp.noise, ABOVE, solver="dpmpp_2m")) > 10 * TOL


# Discrete grids: timesteps= ------------------------------------------------------------------
@pytest.mark.parametrize("ending", ["zero", "above"])
@pytest.mark.parametrize("solver,opts", SOLVERS[:5], ids=lambda v: str(v))
def test_discrete_grid_schedules_use_timesteps(vp, solver, opts, ending):
    grid = vp.den.sigma_grid.numpy()
    idx = [990, 700, 400, 200, 60]
    sig = np.concatenate([grid[idx], [0.0]]) if ending == "zero" else grid[idx + [0]]
    form = diffusers_export(sig, solver, opts, sigma_grid=grid)
    public = {"euler": True, "heun": ending == "zero", "dpmpp_2m": True}
    if public.get(solver, False):
        assert form.route == "timesteps"
        assert form.pipeline_kwargs() == {"timesteps": idx}
        sched = form.make_scheduler(vp.config)
        sched.set_timesteps(timesteps=form.pipeline_kwargs()["timesteps"])
        # The scheduler's own levels are the grid's (diffusers keeps them in float32).
        np.testing.assert_allclose(sched.sigmas.numpy()[:2], grid[idx[:2]], rtol=1e-6)
    else:
        assert form.route == "pinned"
    ours = solve(vp.den, vp.noise, sig, solver=solver, **opts)
    assert rel(run_export(vp, form), ours) < TOL


# Pipelines: the literal usage text, executed --------------------------------------------------
class TinyPipeline(DiffusionPipeline):
    """A pipeline with Stable Diffusion's protocol: diffusers' ``retrieve_timesteps``, latents
    ``randn * scheduler.init_noise_sigma`` (or given latents times it), ``scale_model_input``,
    the network, ``scheduler.step``."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, num_inference_steps=None, timesteps=None, sigmas=None, latents=None):
        steps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, "cpu", timesteps,
                                      sigmas)
        x = latents * self.scheduler.init_noise_sigma
        for t in steps:
            out = self.unet(self.scheduler.scale_model_input(x, t), t).sample
            x = self.scheduler.step(out, t, x).prev_sample
        return x


class TinyFlowPipeline(DiffusionPipeline):
    """SD3's protocol: ``retrieve_timesteps`` with the pipeline's default sigmas
    ``linspace(1, 1/N, N)`` unless given, latents used as given, ``step``."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, num_inference_steps=28, sigmas=None, latents=None):
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        steps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, "cpu", sigmas=sigmas)
        x = latents
        for t in steps:
            x = self.scheduler.step(self.unet(x, t.expand(x.shape[0])).sample, t, x).prev_sample
        return x


def best_json_usage(tmp_path: Path, sig: np.ndarray, solver: str, opts: dict, *,
                    flow: bool = False, grid=None) -> dict:
    """The usage section as best.json stores it: written to JSON and read back."""
    sched = Schedule(sig, solver=solver)
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"usage": usage_section(sched, opts, flow=flow,
                                                        sigma_grid=grid)}))
    return json.loads(path.read_text())["usage"]


# (solver, options, ending, grid index of the final level or None: continuous, route)
PIPELINE_CASES = [
    ("euler", {}, "zero", None, "sigmas"),
    ("euler", {}, "above", 0, "timesteps"),  # ends at the grid's lowest level: sigma_min
    ("euler", {}, "above", 4, "sigmas"),  # ends elsewhere on the grid: timesteps= cannot
    ("heun", {}, "above", None, "pinned"),
    ("dpmpp_2m", {}, "zero", 0, "timesteps"),
    ("dpmpp_2m", {}, "above", 4, "pinned"),
    ("dpmpp_2m", {}, "above", None, "pinned"),
    ("unipc", {}, "zero", None, "pinned"),
    ("ipndm", {"variable_step": True}, "above", None, "pinned"),
]


@pytest.mark.parametrize("solver,opts,ending,last,route", PIPELINE_CASES)
def test_best_json_usage_code_runs_verbatim_in_a_pipeline(vp, tmp_path, solver, opts, ending,
                                                          last, route):
    grid = vp.den.sigma_grid.numpy()
    sig = ENDINGS[ending]
    if last is not None:  # a discrete schedule: every level on the model's grid
        sig = np.concatenate([grid[[980, 650, 300, 120, 30]],
                              [0.0] if ending == "zero" else grid[[last]]])
    usage = best_json_usage(tmp_path, sig, solver, opts, grid=grid)
    assert usage["sigmas"] == [float(x) for x in sig]  # full precision, the final 0 kept
    assert usage["discrete"] == (last is not None)
    d = usage["diffusers"]
    assert d["route"] == route
    assert f"diffusers.{d['scheduler']}.from_config(" in d["code"]
    for key, value in d["arguments"].items():
        assert f"{key}={value!r}" in d["code"]
    pipe = TinyPipeline(vp.unet, diffusers.DDPMScheduler.from_config(vp.config))
    ns = {"pipe": pipe}
    exec(d["code"], ns)  # the literal text of best.json
    assert type(pipe.scheduler).__name__ == d["scheduler"]
    x = pipe(latents=vp.noise, **ns["pipeline_kwargs"]) * d["output_scale"]
    assert rel(x, solve(vp.den, vp.noise, sig, solver=solver, **opts)) < TOL


def test_pinned_scheduler_contract(vp, tmp_path):
    form = diffusers_export(ABOVE, "unipc")
    sched = form.make_scheduler(vp.config)
    # A pipeline asking for the pinned step count, or for none, gets the pinned levels.
    sched.set_timesteps(5)
    assert len(sched.timesteps) == 5 and sched.sigmas.numpy()[-1] == np.float32(0.0411)
    with pytest.raises(ValueError, match="pinned schedule of 5 steps"):
        sched.set_timesteps(20)
    with pytest.raises(ValueError, match="custom timesteps"):
        sched.set_timesteps(timesteps=[999, 500])
    # Saved, it is the plain diffusers class (the levels are not part of a diffusers config).
    sched.save_pretrained(tmp_path / "s")
    saved = json.loads((tmp_path / "s" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "UniPCMultistepScheduler" and saved["solver_type"] == "bh2"
    assert type(diffusers.UniPCMultistepScheduler.from_pretrained(tmp_path / "s")) is (
        diffusers.UniPCMultistepScheduler)
    # The model times are the adapter's: the network sees what searchd's denoiser feeds it.
    np.testing.assert_array_equal(
        sched.timesteps.numpy(),
        vp.den.model_time(torch.tensor(ABOVE[:-1], dtype=torch.float32)).float().numpy())
    with pytest.raises(ExportError, match="not supported"):
        pin_schedule(diffusers.DDIMScheduler(), ZERO)
    # A pipeline holding it can be copied and pickled (the levels come along).
    back = pickle.loads(pickle.dumps(sched))
    assert type(back).__name__ == "UniPCMultistepScheduler" and back.init_noise_sigma == (
        sched.init_noise_sigma)
    torch.testing.assert_close(back.sigmas, sched.sigmas)
    torch.testing.assert_close(copy.deepcopy(sched).timesteps, sched.timesteps)


# Flow models --------------------------------------------------------------------------------
@pytest.mark.parametrize("ending", ["zero", "above"])
@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "unipc"])
def test_flow_model_export_in_t(flow, solver, ending):
    sig = ENDINGS[ending]
    form = diffusers_export(sig, solver, flow=True)
    np.testing.assert_allclose(form.sigmas, sig / (1 + sig), rtol=1e-15)
    if solver == "euler":
        assert form.scheduler == "FlowMatchEulerDiscreteScheduler"
        assert form.route == ("sigmas" if ending == "zero" else "pinned")
        assert form.arguments["shift"] == 1.0 and not form.arguments["use_dynamic_shifting"]
    ours = solve(flow.den, flow.noise, sig, solver=solver)
    assert rel(run_export(flow, form), ours) < TOL


def test_flow_usage_runs_verbatim_in_an_sd3_style_pipeline(flow, tmp_path):
    usage = best_json_usage(tmp_path, ZERO, "euler", {}, flow=True)
    d = usage["diffusers"]
    assert usage["flow"] and d["levels"] == "flow time t"
    pipe = TinyFlowPipeline(flow.unet,
                            diffusers.FlowMatchEulerDiscreteScheduler.from_config(flow.config))
    ns = {"pipe": pipe}
    exec(d["code"], ns)
    # The pipeline's sigmas are t without the final 0 (the scheduler appends it).
    np.testing.assert_allclose(ns["pipeline_kwargs"]["sigmas"], flow_time(ZERO)[:-1], rtol=0)
    x = pipe(latents=flow.noise * d["init_noise_sigma"], **ns["pipeline_kwargs"])
    assert rel(x, solve(flow.den, flow.noise, ZERO, solver="euler")) < TOL
    # The checkpoint's own shift = 3 would have moved the levels: the export turns it off.
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flow.config)
    shifted = pipe(latents=flow.noise * d["init_noise_sigma"], **ns["pipeline_kwargs"])
    assert rel(shifted, solve(flow.den, flow.noise, ZERO, solver="euler")) > 10 * TOL


def test_flow_heun_is_refused_and_really_differs(flow):
    with pytest.raises(ExportError, match="FlowMatchHeunDiscreteScheduler"):
        diffusers_export(ZERO, "heun", flow=True)
    # Measured: Heun in t (diffusers' flow Heun) is not searchd's Heun in sigma.
    t = flow_time(ZERO)
    sched = diffusers.FlowMatchHeunDiscreteScheduler.from_config(flow.config, shift=1.0)
    sched.set_timesteps(5)
    levels = torch.tensor(t, dtype=torch.float32)
    sched.sigmas = torch.cat([levels[:1], levels[1:-1].repeat_interleave(2), levels[-1:]])
    sched.timesteps = sched.sigmas[:-1] * 1000
    x = scheduler_loop(sched, flow.unet, flow.noise * float(t[0]))
    assert rel(x, solve(flow.den, flow.noise, ZERO, solver="heun")) > 1e-3


# Solvers without a counterpart --------------------------------------------------------------
def test_solvers_without_a_counterpart_name_the_nearest():
    with pytest.raises(ExportError, match="deis.*nearest is DEISMultistepScheduler"):
        diffusers_export(ZERO, "deis")
    with pytest.raises(ExportError, match="nearest is LMSDiscreteScheduler"):
        diffusers_export(ZERO, "ipndm")
    with pytest.raises(ExportError, match=r"DPMSolverMultistepScheduler\(solver_order=3\)"):
        diffusers_export(ZERO, "dpmpp_3m")
    long = np.concatenate([np.geomspace(80, 0.01, 16), [0.0]])
    with pytest.raises(ExportError, match="lower_order_final"):
        diffusers_export(long, "unipc", {"order": 3})
    with pytest.raises(ValueError, match="unknown solver"):
        diffusers_export(ZERO, "rk45")


def test_dpmpp_3m_really_differs_from_diffusers_third_order(vp):
    """The refusal is earned: DPMSolverMultistepScheduler(solver_order=3) on the same levels
    is not searchd's dpmpp_3m."""
    form = diffusers_export(ABOVE, "dpmpp_2m")
    args = {**form.arguments, "solver_order": 3}
    sched = pin_schedule(diffusers.DPMSolverMultistepScheduler.from_config(vp.config, **args),
                         ABOVE)
    x = scheduler_loop(sched, vp.unet, vp.noise * sched.init_noise_sigma) * form.output_scale
    assert rel(x, solve(vp.den, vp.noise, ABOVE, solver="dpmpp_3m")) > 10 * TOL


# k-diffusion (its documented contract; the package is not installed here) ------------------
def _kdiffusion_stand_in() -> types.ModuleType:
    """``k_diffusion.sampling``'s deterministic samplers, written from k-diffusion's published
    algorithms (Karras et al. 2022 Alg. 1; DPM-Solver++(2M); LMS with Lagrange coefficients
    integrated by scipy): ``sample_x(model, x, sigmas)``, x starting at noise * sigmas[0]."""
    from scipy import integrate

    def s_in(x, s):
        return s * x.new_ones([x.shape[0]])

    def sample_euler(model, x, sigmas):
        for i in range(len(sigmas) - 1):
            d = (x - model(x, s_in(x, sigmas[i]))) / sigmas[i]
            x = x + d * (sigmas[i + 1] - sigmas[i])
        return x

    def sample_heun(model, x, sigmas):
        for i in range(len(sigmas) - 1):
            d = (x - model(x, s_in(x, sigmas[i]))) / sigmas[i]
            dt = sigmas[i + 1] - sigmas[i]
            if sigmas[i + 1] == 0:
                x = x + d * dt
            else:
                x2 = x + d * dt
                d2 = (x2 - model(x2, s_in(x, sigmas[i + 1]))) / sigmas[i + 1]
                x = x + (d + d2) / 2 * dt
        return x

    def sample_dpmpp_2m(model, x, sigmas):
        old = None
        for i in range(len(sigmas) - 1):
            den = model(x, s_in(x, sigmas[i]))
            t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
            h = t_next - t
            if old is None or sigmas[i + 1] == 0:
                x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * den
            else:
                r = (t - (-sigmas[i - 1].log())) / h
                dd = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
                x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * dd
            old = den
        return x

    def sample_lms(model, x, sigmas, order=4):
        s = sigmas.detach().cpu().numpy()
        ds = []
        for i in range(len(sigmas) - 1):
            ds.append((x - model(x, s_in(x, sigmas[i]))) / sigmas[i])
            ds = ds[-order:]
            k = min(i + 1, order)

            def coeff(j, i=i, k=k):
                def f(tau):
                    return math.prod((tau - s[i - m]) / (s[i - j] - s[i - m])
                                     for m in range(k) if m != j)
                return integrate.quad(f, s[i], s[i + 1], epsrel=1e-4)[0]

            x = x + sum(coeff(j) * d for j, d in enumerate(reversed(ds)))
        return x

    mod = types.ModuleType("k_diffusion")
    mod.sampling = types.ModuleType("k_diffusion.sampling")
    for fn in (sample_euler, sample_heun, sample_dpmpp_2m, sample_lms):
        setattr(mod.sampling, fn.__name__, fn)
    return mod


@pytest.mark.parametrize("ending", ["zero", "above"])
@pytest.mark.parametrize("solver,opts", [("euler", {}), ("heun", {}), ("dpmpp_2m", {}),
                                         ("ipndm", {"variable_step": True})])
def test_kdiffusion_usage_runs_verbatim(vp, tmp_path, monkeypatch, solver, opts, ending):
    mod = _kdiffusion_stand_in()
    monkeypatch.setitem(sys.modules, "k_diffusion", mod)
    monkeypatch.setitem(sys.modules, "k_diffusion.sampling", mod.sampling)
    sig = ENDINGS[ending]
    kd = best_json_usage(tmp_path, sig, solver, opts)["kdiffusion"]
    assert kd["sigmas"] == [float(x) for x in sig]
    ns = {"model": vp.den, "noise": vp.noise}
    exec(kd["code"], ns)
    assert rel(ns["samples"], solve(vp.den, vp.noise, sig, solver=solver, **opts)) < TOL


def test_kdiffusion_without_an_exact_sampler_says_so():
    kd = kdiffusion_export(ZERO, "unipc")
    assert kd.sampler is None and "no UniPC" in kd.note and "samples =" not in kd.code()
    compile(kd.code(), "<usage>", "exec")
    assert kdiffusion_export(ZERO, "dpmpp_2m", flow=True).sampler is None
    assert kdiffusion_export(ZERO, "euler", flow=True).sigmas == tuple(flow_time(ZERO))


# ComfyUI / A1111 ------------------------------------------------------------------------------
COMFY_NUMBER = r"[-+]?(?:\d*\.*\d+)"  # what ComfyUI's ManualSigmas node reads


def test_comfy_text_and_json_read_back_exactly(tmp_path):
    sig = np.array([14.614641229343414, 3.0371881234567e-1, 1.2e-5, 0.0])
    c = best_json_usage(tmp_path, sig, "dpmpp_2m", {})["comfy"]
    assert c["node"] == "ManualSigmas" and c["sampler"] == "dpmpp_2m" and c["exact_sampler"]
    parsed = [float(v) for v in re.findall(COMFY_NUMBER, c["text"])]
    assert parsed == [float(x) for x in sig]  # no exponents: 1.2e-5 is written 0.000012
    assert c["json"] == [float(x) for x in sig]
    assert c["workflow_node"] == {"class_type": "ManualSigmas", "inputs": {"sigmas": c["text"]}}
    p = types.SimpleNamespace()
    exec(c["a1111"], {"p": p, "torch": torch})
    torch.testing.assert_close(p.sampler_noise_scheduler_override(3),
                               torch.tensor([float(x) for x in sig]))
    assert comfy_export(ZERO, "euler", flow=True).text.startswith(repr(61.3 / 62.3)[:10])


# best.json usage and the model's kind ---------------------------------------------------------
def test_usage_section_of_a_solver_without_counterpart_keeps_the_other_forms():
    usage = usage_section(Schedule(ZERO, solver="deis"), {})
    assert "nearest" in usage["diffusers"]["error"]
    assert usage["kdiffusion"]["sigmas"] == list(ZERO) and usage["comfy"]["json"] == list(ZERO)
    assert "solver='deis'" in usage["searchd"]["code"]
    ids = usage_section(Schedule(ZERO, model_ids=[0, 1, 1, 0, 1], solver="euler"))
    assert "model schedule" in ids["diffusers"]["error"]


def test_model_levels_reads_the_scheduler_config(vp_dir, flow_dir):
    assert model_levels({"spec": {"kind": "diffusers", "path": str(vp_dir)}}) == "sigma"
    assert model_levels({"spec": {"kind": "diffusers", "path": str(flow_dir)}}) == "flow"
    assert model_levels({"spec": {"kind": "diffusers", "path": str(vp_dir),
                                  "options": {"parameterization": {"kind": "flow"}}}}) == "flow"
    assert model_levels({"name": "gmm-digits"}) == "sigma"
    assert model_levels({"name": "digits-unet-s"}) == "sigma"  # searchd.json: edm_precond
    # What the session passes: the validated configuration's model section.
    from searchd.config import ModelConfig

    assert model_levels(ModelConfig(name=f"diffusers:{flow_dir}")) == "flow"
    assert model_levels(ModelConfig(zoo=["gmm-digits-k8", "gmm-digits-k64"])) == "sigma"
