"""Guidance weights through the solver steppers and the prefix tree.

References, independent of how ``Trajectory.denoise`` hands the weights on:

- a denoiser that counts its calls, knows from the solver's ``step_calls`` which step each
  call belongs to, and composes ``u + w (c - u)`` itself from the exact mixture's
  conditional and unconditional denoisers (the weight belongs to the step, Heun's correction
  at the next level included);
- ``solve`` on each schedule alone for the prefix tree (bitwise), with the work counted from
  the number of distinct (level, weight) prefixes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from searchd.models import load
from searchd.models.conditional import row_conditioning
from searchd.noise import make_noise
from searchd.solvers import SOLVERS, solve
from searchd.solvers.prefix import PrefixStats, solve_prefix_tree

CONFIGS = [("euler", {}), ("heun", {}), ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {}),
           ("unipc", {"order": 3}), ("ipndm", {}), ("deis", {})]
IDS = [n + "".join(f"-{k}={v}" for k, v in o.items()) for n, o in CONFIGS]
SEEDS = list(range(30, 50))
SIGMAS = {True: np.array([80.0, 14.0, 3.0, 0.8, 0.2, 0.0]),
          False: np.array([80.0, 14.0, 3.0, 0.8, 0.2, 0.05])}
WEIGHTS = [2.5, 1.0, 0.5, 3.0, 1.0]


@pytest.fixture(scope="module")
def den():
    """The exact conditional mixture in float64, so the hand-composed guidance agrees to
    rounding."""
    return load("gmm-digits-cond", dtype=torch.float64)


class StepOrderGuided:
    """The guided denoiser written out by hand: call k of the solver belongs to the step
    that ``step_calls`` says, and that step's weight mixes the exact conditional and
    unconditional denoisers. It refuses the ``guidance`` keyword (it must not be needed)."""

    def __init__(self, den, solver: str, n_steps: int, final_zero: bool, weights: Tensor,
                 labels: Tensor) -> None:
        self.den = den
        self.shape = den.shape
        calls = SOLVERS[solver].step_calls(n_steps, final_zero)
        self.step_of_call = [i for i, c in enumerate(calls) for _ in range(c)]
        self.weights = weights  # [B, N] float64
        self.labels = labels
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, **kw) -> Tensor:
        assert set(kw) <= {"sample_index"}
        step = self.step_of_call[self.calls]
        self.calls += 1
        c = self.den.conditional_denoiser(x, sigma, self.labels)
        u = self.den.unconditional_denoiser(x, sigma)
        w = self.weights[:, step].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return u + w * (c - u)


@pytest.mark.parametrize("final_zero", [True, False], ids=["to0", "above0"])
@pytest.mark.parametrize("solver,opts", CONFIGS, ids=IDS)
def test_guidance_is_the_steps_weight_in_every_call(den, one_thread, solver, opts, final_zero):
    """Per-step weights [N] and per-row weights [B, N] equal the hand-composed guidance,
    call by call; a solve without weights never hands the denoiser a ``guidance``."""
    sig = SIGMAS[final_zero]
    noise = make_noise(SEEDS, tuple(den.shape), dtype=torch.float64)
    cond = row_conditioning(den, SEEDS)
    labels = torch.as_tensor(np.asarray(SEEDS) % 10)
    per_row = torch.tensor(WEIGHTS, dtype=torch.float64).repeat(len(SEEDS), 1)
    per_row[::3, 1] = 4.0  # some rows differ on step 1
    for g in (torch.tensor(WEIGHTS, dtype=torch.float64), per_row):
        with torch.no_grad():
            got = solve(den, noise, sig, solver=solver, guidance=g, cond=cond, **opts)
            ref_den = StepOrderGuided(den, solver, 5, final_zero,
                                      g.expand(len(SEEDS), -1), labels)
            want = solve(ref_den, noise, sig, solver=solver, cond=cond, **opts)
        assert ref_den.calls == SOLVERS[solver].nfe(5, final_zero)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_no_weights_no_keyword(den, one_thread):
    seen: list[set] = []

    def spy(x, sigma, **kw):
        seen.append(set(kw))
        return den(x, sigma, **kw)

    noise = make_noise(SEEDS, tuple(den.shape), dtype=torch.float64)
    with torch.no_grad():
        solve(spy, noise, SIGMAS[True], solver="heun")
    assert seen and all(s == set() for s in seen)


@pytest.mark.parametrize("solver,opts", [("dpmpp_2m", {}), ("heun", {}), ("unipc", {"order": 3})],
                         ids=["dpmpp_2m", "heun", "unipc3"])
def test_prefix_tree_keys_the_weights(den, one_thread, solver, opts):
    """Schedules that differ only in a step's weight are different prefixes from that step
    on; each result is bitwise that of ``solve`` alone, and the tree runs one ``observe``
    per distinct (levels, weights) prefix."""
    sig = SIGMAS[True]
    base = np.array(WEIGHTS)
    variants = [base.copy() for _ in range(5)]
    variants[1][3] = 1.0      # differs from step 3 on
    variants[2][0] = 1.0      # differs from step 0 on
    variants[3][4] = 2.0      # differs on the last step only
    # variants[4] is a duplicate of the base
    noise = make_noise(SEEDS, tuple(den.shape), dtype=torch.float64)
    cond = row_conditioning(den, SEEDS)
    stats = PrefixStats()
    with torch.no_grad():
        got = solve_prefix_tree(den, noise, [sig] * 5, solver=solver,
                                guidance=[torch.tensor(v) for v in variants], cond=cond,
                                stats=stats, **opts)
        for v, x in zip(variants, got):
            alone = solve(den, noise, sig, solver=solver, guidance=torch.tensor(v), cond=cond,
                          **opts)
            assert isinstance(x, Tensor) and torch.equal(x, alone)
    # Distinct prefixes of the weights, counted per depth k = 0..4 (a step's observe is
    # shared by schedules agreeing on the weights of steps 0..k).
    want = sum(len({tuple(v[: k + 1]) for v in variants}) for k in range(5))
    assert stats.observes == want
    assert stats.observes_alone == 5 * 5


def test_prefix_tree_refuses_mixed_guidance(den):
    noise = make_noise(SEEDS, tuple(den.shape), dtype=torch.float64)
    with pytest.raises(ValueError, match="every schedule or for none"):
        solve_prefix_tree(den, noise, [SIGMAS[True]] * 2, guidance=[None, np.ones(5)])


def test_evaluator_tree_scores_guided_candidates_as_alone(one_thread):
    """``Evaluator(prefix_sharing=True)`` on guided candidates (labels from the seeds):
    every score bitwise that of the candidate scored alone by the plain evaluator."""
    from searchd.evaluation import Evaluator, load_features
    from searchd.evaluation.reference import exact_reference
    from searchd.schedule import Schedule

    den = load("gmm-digits-cond")
    feats = load_features("digits")
    ref = exact_reference(den, feats, range(10_000, 10_200))
    sig = SIGMAS[True]
    cands = [Schedule(sig, guidance=WEIGHTS),
             Schedule(sig, guidance=[2.5, 1.0, 0.5, 1.0, 1.0]),
             Schedule(sig, guidance=[1.0] * 5),
             Schedule(sig)]
    seeds = range(60)
    tree = Evaluator(den, feats, ref, metrics=("fid",), batch_size=32, prefix_sharing=True)
    plain = Evaluator(den, feats, ref, metrics=("fid",), batch_size=32)
    got = tree.evaluate(cands, seeds)
    want = [plain.evaluate([c], seeds)[0] for c in cands]
    for g, w in zip(got, want):
        assert g.status == w.status == "ok"
        assert g.metrics == w.metrics and g.stats == w.stats
    # The guided schedules differ from the unguided run of the model as loaded.
    assert got[0].metrics["fid"] != got[3].metrics["fid"]
    assert tree.prefix_stats.observes < tree.prefix_stats.observes_alone
