"""Per-sample adaptive schedules (searchd/adaptive, searchd/solvers/policy.py).

Schedule policies must run a given schedule exactly as the fixed array does; the oracle's
schedules must beat the global schedule on the noises they were fitted to; a predictor set
(or trained) to output the global schedule must reproduce the global schedule's samples bit
for bit. Small batches of the embedded mixtures in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchd.adaptive import (
    DeltaPredictor,
    OffsetHead,
    OneShotPredictor,
    ReplayPolicy,
    batched_sigmas,
    first_denoised,
    fit_delta,
    fit_one_shot,
    oracle_schedules,
)
from searchd.evaluation.teacher import TeacherCache, TeacherSettings
from searchd.methods.ld3 import Ld3Parameterization
from searchd.noise import make_noise
from searchd.schedules.baselines import baseline
from searchd.solvers import SOLVERS, SchedulePolicy, solve

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; k8 too


def per_sample(g: np.ndarray, b: int) -> np.ndarray:
    """Distinct per-sample schedules around ``g`` (top level kept)."""
    ps = np.stack([g * (1 + 0.03 * i) for i in range(b)])
    ps[:, 0] = g[0]
    return ps


@pytest.mark.parametrize("final_zero", [True, False])
def test_policy_runs_a_schedule_exactly_as_the_array(k8, final_zero):
    g = baseline("polynomial", 4, k8.sigma_min, k8.sigma_max, final_zero=final_zero)
    noise = make_noise(range(5), k8.shape, dtype=torch.float64)
    ps = per_sample(g, 5)
    for name in SOLVERS:
        with torch.no_grad():
            fixed = solve(k8, noise, ps, solver=name)
            replay = ReplayPolicy(ps)
            adaptive = solve(k8, noise, replay, solver=name)
        assert torch.equal(fixed, adaptive), name
        # The policy was asked once per step it had to choose, with the states reached.
        asked = 3 if final_zero else 4
        assert len(replay.records) == asked, name
        assert torch.equal(replay.records[0][1], torch.full((5,), g[0], dtype=torch.float64))


class _Bad(SchedulePolicy):
    def __init__(self, levels):
        self.levels, self.n_steps, self.final_zero = levels, 3, True

    def start(self, noise):
        return torch.full((noise.shape[0], 1), 80.0, dtype=torch.float64)

    def advance(self, step, x, sigmas, denoised):
        return torch.full((x.shape[0], 1), self.levels[step], dtype=torch.float64)


def test_policy_levels_are_checked(k8):
    noise = make_noise(range(2), k8.shape, dtype=torch.float64)
    msg = r"sigmas\[0, 2\] = 20.0; it must be finite, > 0 and below"
    with pytest.raises(ValueError, match=msg):
        solve(k8, noise, _Bad([10.0, 20.0]), solver="euler")
    with pytest.raises(ValueError, match=r"sigmas\[0, 1\] = nan"):
        solve(k8, noise, _Bad([float("nan"), 1.0]), solver="euler")
    with pytest.raises(ValueError, match="n_steps = 0"):
        bad = _Bad([1.0])
        bad.n_steps = 0
        solve(k8, noise, bad)


def test_gradients_flow_through_a_policy(k8):
    g = baseline("polynomial", 4, k8.sigma_min, k8.sigma_max)
    model = DeltaPredictor(g, k8.sigma_min, 64, hidden=8)
    noise = make_noise(range(3), k8.shape, dtype=torch.float64)
    x = solve(k8, noise, model.policy(), solver="dpmpp_2m")
    x.square().sum().backward()
    last = model.net[-1]
    assert last.bias.grad is not None and last.bias.grad.abs().sum() > 0


def test_offset_head_bounds_and_zero(k8):
    g = baseline("polynomial", 5, k8.sigma_min, k8.sigma_max)
    head = OffsetHead(g, k8.sigma_min)
    raw = torch.tensor([[0.0] * 4, [50.0] * 4, [-50.0] * 4, [3.0, -3.0, 3.0, -3.0]])
    out = head(raw)
    assert torch.equal(out[0], torch.tensor(g))
    assert (out[:, 1:] < out[:, :-1]).all() and (out[:, :-1] >= k8.sigma_min).all()
    with pytest.raises(ValueError, match="sigma_min = 0.0"):
        OffsetHead(g, 0.0)
    with pytest.raises(ValueError, match="inputs = 'x'"):
        OneShotPredictor(g, k8.sigma_min, 64, inputs="x")


def test_batched_parameterization_matches_ld3():
    param = Ld3Parameterization(5, 0.002, 80.0)
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(3, param.n_params, dtype=torch.float64, generator=gen)
    rows = batched_sigmas(param, theta)
    for i in range(3):
        assert torch.equal(rows[i], param.sigmas(theta[i]))


def test_oracle_beats_the_global_schedule_on_its_noises(k8):
    g = baseline("polynomial", 4, k8.sigma_min, k8.sigma_max)
    seeds = list(range(4))
    noise = make_noise(seeds, k8.shape, dtype=torch.float64)
    teacher = TeacherCache(k8).samples(seeds, TeacherSettings(n_steps=8))
    r = oracle_schedules(k8, noise, teacher, g, "dpmpp_2m", iters=8, lr=0.1)
    assert r.sigmas.shape == (4, 5) and r.improved == 4
    # Every noise is better off, and clearly so on average.
    assert (r.loss < r.global_loss).all()
    assert (r.loss / r.global_loss).mean() < 0.8
    # The reported losses are those of the returned schedules.
    with torch.no_grad():
        x = solve(k8, noise, r.sigmas, solver="dpmpp_2m")
    loss = (x - teacher).flatten(1).square().mean(1).numpy()
    np.testing.assert_allclose(loss, r.loss, rtol=1e-10)
    # A noise's schedule does not depend on the batch it was fitted in.
    half = oracle_schedules(k8, noise[:2], teacher[:2], g, "dpmpp_2m", iters=8, lr=0.1)
    np.testing.assert_allclose(half.sigmas, r.sigmas[:2], rtol=1e-9)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "unipc"])
def test_predictors_set_or_trained_to_global_reproduce_it_exactly(k8, solver):
    g = baseline("polynomial", 5, k8.sigma_min, k8.sigma_max)
    noise = make_noise(range(6), k8.shape, dtype=torch.float64)
    with torch.no_grad():
        ref = solve(k8, noise, g, solver=solver)
    target = np.tile(g, (6, 1))
    one, _ = fit_one_shot(k8, noise, target, g, epochs=5, hidden=16)
    one_noise, _ = fit_one_shot(k8, noise, target, g, inputs="noise", epochs=5, hidden=16)
    delta, _ = fit_delta(k8, noise, target, g, solver=solver, epochs=5, hidden=16)
    for model in (one, one_noise, delta, DeltaPredictor(g, k8.sigma_min, 64)):
        with torch.no_grad():
            out = solve(k8, noise, model.policy(), solver=solver)
        assert torch.equal(out, ref), type(model).__name__


def test_trained_predictors_move_towards_oracle_targets(k8):
    g = baseline("polynomial", 4, k8.sigma_min, k8.sigma_max)
    noise = make_noise(range(8), k8.shape, dtype=torch.float64)
    # Targets: every schedule's middle levels 20% higher (reachable offsets).
    target = np.tile(g, (8, 1))
    target[:, 1:4] *= 1.2
    one, rec = fit_one_shot(k8, noise, target, g, epochs=150, hidden=16, val_fraction=0.0)
    with torch.no_grad():
        pred = one(first_denoised(k8, noise, g[0]))
    np.testing.assert_allclose(pred[:, 1:4].numpy(), target[:, 1:4], rtol=0.02)
    delta, rec = fit_delta(k8, noise, target, g, epochs=150, hidden=16, val_fraction=0.0)
    replay = ReplayPolicy(target)
    with torch.no_grad():
        solve(k8, noise, delta.policy())
        solve(k8, noise, replay)
        nxt = delta(1, *replay.records[1])
    np.testing.assert_allclose(nxt.numpy(), target[:, 2], rtol=0.02)


def test_torchscript_export_matches(k8):
    g = baseline("polynomial", 4, k8.sigma_min, k8.sigma_max)
    noise = make_noise(range(4), k8.shape, dtype=torch.float64)
    target = np.tile(g, (4, 1))
    target[:, 2] *= 1.3
    one, _ = fit_one_shot(k8, noise, target, g, epochs=20, hidden=8, val_fraction=0.0)
    delta, _ = fit_delta(k8, noise, target, g, epochs=20, hidden=8, val_fraction=0.0)
    f = first_denoised(k8, noise, g[0])
    with torch.no_grad():
        assert torch.equal(torch.jit.script(one)(f), one(f))
        s = torch.full((4,), g[1], dtype=torch.float64)
        assert torch.equal(torch.jit.script(delta)(1, noise, s, f), delta(1, noise, s, f))


# The product: files, TorchScript, paired held-out scoring ----------------------------------------
def test_train_save_load_and_score_a_predictor(k8, tmp_path):
    from searchd.adaptive.product import (
        load_predictor,
        predictor_heldout,
        sample_features,
        save_predictor,
        train_predictor,
    )
    from searchd.evaluation import Evaluator
    from searchd.evaluation.reference import exact_reference
    from searchd.schedule import Schedule

    g = Schedule(baseline("polynomial", 4, k8.sigma_min, k8.sigma_max), solver="dpmpp_2m")
    model, record = train_predictor(k8, g, range(4), kind="delta", teacher_steps=4,
                                    oracle={"iters": 2}, fit={"epochs": 5, "hidden": 8},
                                    tune={"epochs": 1, "val_fraction": 0.0})
    assert record["oracle_loss"] < record["global_loss"] and record["n_train"] == 4
    assert record["tune"]["val_loss"] <= record["tune"]["val_loss_start"]
    info = save_predictor(model, tmp_path, {"gain": "n/a"})
    assert info["kind"] == "delta" and info["global_sigmas"] == list(g.sigmas)
    back = load_predictor(tmp_path)
    scripted = torch.jit.load(str(tmp_path / info["torchscript"]))
    noise = make_noise(range(10, 14), k8.shape, dtype=torch.float64)
    with torch.no_grad():
        a = solve(k8, noise, model.policy())
        assert torch.equal(a, solve(k8, noise, back.policy()))
        s = torch.full((4,), g.sigmas[1], dtype=torch.float64)
        d = k8(noise, s)
        assert torch.equal(scripted(1, noise, s, d), model(1, noise, s, d))
    with pytest.raises(ValueError, match="no predictor at"):
        load_predictor(tmp_path / "missing")

    ev = Evaluator(k8, "digits", exact_reference(k8, load_features_digits(), range(500, 564)))
    seeds = list(range(100, 108))
    # An untrained predictor is the global schedule: zero difference, on the same noise.
    zero = DeltaPredictor(g.sigmas, k8.sigma_min, 64)
    out = predictor_heldout(ev, zero, g, seeds, resamples=10)
    assert out["scores"][1]["diff"] == 0.0 and out["scores"][1]["diff_ci"] == [0.0, 0.0]
    # Our feature path is the evaluator's.
    _, feats = ev.per_sample_features([g], seeds)
    with torch.no_grad():
        x = solve(k8, ev.noise(seeds), np.array(g.sigmas))
    assert torch.equal(sample_features(ev, x), feats[0])
    scored = predictor_heldout(ev, model, g, seeds, resamples=10)
    assert scored["scores"][1]["status"] == "ok" and scored["scores"][1]["diff"] != 0.0


def load_features_digits():
    from searchd.evaluation import load_features

    return load_features("digits")


def test_fine_tune_through_the_solver_lowers_the_teacher_loss(k8):
    from searchd.adaptive import fine_tune

    g = baseline("polynomial", 4, k8.sigma_min, k8.sigma_max)
    seeds = list(range(4))
    noise = make_noise(seeds, k8.shape, dtype=torch.float64)
    teacher = TeacherCache(k8).samples(seeds, TeacherSettings(n_steps=8))
    model = OneShotPredictor(g, k8.sigma_min, 64, hidden=8)
    rec = fine_tune(model, k8, noise, teacher, epochs=2, lr=0.05, val_fraction=0.0)
    assert rec["val_loss"] < rec["val_loss_start"] and rec["best_epoch"] >= 1
    with torch.no_grad():
        x = solve(k8, noise, model.policy())
    loss = float((x - teacher).flatten(1).square().mean(1).mean())
    assert loss == pytest.approx(rec["val_loss"], rel=1e-9)
