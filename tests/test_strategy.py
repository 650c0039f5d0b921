"""Per-step solver strategies (searchd.solvers.strategy) against the plain solvers and the
closed-form ODE of Gaussian data (tests/test_solvers.py's ``GaussianDenoiser``).

- The plain solver's own per-step choices, run as a strategy, reproduce it bitwise, for every
  solver with a strategy and every option value, both endings; a strategy equal at every
  step is the plain solver wherever the plain solver makes that choice at every step.
- A mixed strategy, repeated along ever finer schedules, converges with the order of its
  lowest-order step (measured slope against the exact solution).
- The prefix tree and the evaluator run strategies bitwise as ``solve`` does alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchd.schedule import Schedule
from searchd.schedules import baseline
from searchd.solvers import SOLVERS, solve
from searchd.solvers.prefix import solve_prefix_tree
from searchd.solvers.strategy import (
    FAMILIES,
    canonical,
    default_strategy,
    implied_order,
)
from tests.test_solvers import SIGMA_MAX, SIGMA_MIN, GaussianDenoiser, make_noise

CONFIGS: list[tuple[str, dict]] = [
    (name, variant)
    for name in FAMILIES
    for variant in [{}] + [{k: v} for k, o in SOLVERS[name].options.items()
                           for v in o.allowed if v != o.default]
]
IDS = [name + "".join(f"-{k}={v}" for k, v in o.items()) for name, o in CONFIGS]


@pytest.mark.parametrize("n_steps", [1, 2, 5, 9])
@pytest.mark.parametrize("final_zero", [True, False])
@pytest.mark.parametrize(("solver", "opts"), CONFIGS, ids=IDS)
def test_default_strategy_is_the_plain_solver_bitwise(solver, opts, final_zero, n_steps):
    den, noise = GaussianDenoiser(), make_noise()
    sig = baseline("polynomial", n_steps, SIGMA_MIN, SIGMA_MAX, final_zero)
    plain = solve(den, noise, sig, solver=solver, **opts)
    codes = default_strategy(solver, n_steps, final_zero, opts)
    assert torch.equal(solve(den, noise, sig, solver=solver, strategy=codes, **opts), plain)


@pytest.mark.parametrize(("solver", "code", "opts"), [
    ("dpmpp_2m", "2", {}), ("dpmpp_3m", "3", {}), ("unipc", "2c", {}),
    ("unipc", "1c", {"order": 1}), ("unipc", "3c", {"order": 3, "lower_order_final": False}),
    ("ipndm", "4", {}), ("ipndm", "2", {"order": 2}), ("deis", "3", {}), ("deis", "1",
                                                                         {"order": 1}),
])
def test_a_strategy_equal_at_every_step_is_the_plain_solver_bitwise(solver, code, opts):
    den, noise = GaussianDenoiser(), make_noise()
    for final_zero in (True, False):
        if solver == "unipc" and not final_zero and opts.get("lower_order_final", True):
            continue  # plain UniPC lowers its last step's order when N < 15
        sig = baseline("polynomial", 7, SIGMA_MIN, SIGMA_MAX, final_zero)
        plain = solve(den, noise, sig, solver=solver, **opts)
        got = solve(den, noise, sig, solver=solver, strategy=[code] * 7, **opts)
        assert torch.equal(got, plain), (solver, code, final_zero)


# Mixed strategies: a pattern repeated along the steps.
MIXED: list[tuple[str, tuple[str, ...], dict]] = [
    ("dpmpp_2m", ("2", "3"), {}),
    ("dpmpp_2m", ("3", "3", "1"), {}),
    ("dpmpp_2m", ("3",), {}),
    ("dpmpp_3m", ("1", "3"), {}),
    ("unipc", ("2c", "2"), {}),
    ("unipc", ("3c", "2c"), {}),
    ("unipc", ("3c", "1"), {}),
    ("unipc", ("1c", "3", "3c"), {}),
    ("ipndm", ("3", "4"), {"variable_step": True}),
    ("ipndm", ("4", "2", "4"), {"variable_step": True}),
    ("deis", ("3", "2"), {}),
    ("deis", ("1", "3", "3"), {}),
]


def _error(solver: str, codes: tuple[str, ...], opts: dict, n: int) -> float:
    den, noise = GaussianDenoiser(), make_noise()
    sig = baseline("polynomial", n, SIGMA_MIN, SIGMA_MAX, False)
    strategy = [codes[i % len(codes)] for i in range(n)]
    x = solve(den, noise, sig, solver=solver, strategy=strategy, **opts)
    exact = den.exact(noise * sig[0], sig[0], sig[-1])
    return float((x - exact).abs().max())


@pytest.mark.parametrize(("solver", "codes", "opts"), MIXED,
                         ids=[f"{s}-{'.'.join(c)}" for s, c, _ in MIXED])
def test_mixed_strategy_has_the_order_of_its_lowest_order_step(solver, codes, opts):
    ns = np.array([64, 128, 256])
    errors = np.array([_error(solver, codes, opts, int(n)) for n in ns])
    assert errors.min() > 1e-11, f"errors {errors} are too close to round-off to measure"
    slope = -np.polyfit(np.log(ns), np.log(errors), 1)[0]
    expected = implied_order(solver, codes, opts)
    assert abs(slope - expected) <= 0.3, f"{solver} {codes}: slope {slope:.2f}, {errors}"


def test_canonical_form_and_one_line_errors():
    assert canonical("dpmpp_2m", ["3", "3", "3", "2"], 4, True) == ("1", "2", "3", "1")
    assert canonical("unipc", ["2c", "2c", "2c"], 3, False) == ("1c", "2c", "2")
    assert canonical("ipndm", ["4", "4", "4"], 3, True) == ("1", "2", "3")
    with pytest.raises(ValueError, match=r"strategy\[1\] = '2c' is not a step of dpmpp_2m; "
                                         r"allowed: 1, 2, 3$"):
        canonical("dpmpp_2m", ["1", "2c"], 2, True)
    with pytest.raises(ValueError, match=r"strategy\[0\] = '4' is not a step of unipc"):
        canonical("unipc", ["4"], 1, True)
    with pytest.raises(ValueError, match=r"strategy has 2 step\(s\); the schedule has 3"):
        canonical("unipc", ["1", "2"], 3, True)
    with pytest.raises(ValueError, match=r"solver 'euler' has no per-step strategy"):
        Schedule(np.array([80.0, 1.0, 0.0]), solver="euler", strategy=("1", "1"))
    with pytest.raises(ValueError, match=r"list of per-step codes; got '12'"):
        Schedule.from_dict({"sigmas": [80.0, 1.0, 0.0], "solver": "dpmpp_2m",
                            "strategy": "12"})


def test_schedule_identity_round_trip():
    sig = np.array([80.0, 5.0, 0.5, 0.0])
    plain = Schedule(sig, solver="unipc")
    mixed = Schedule(sig, solver="unipc", strategy=("3c", "2", "2c"))
    # Canonical: step 0 has one prediction, the last step (to 0) neither order nor corrector.
    assert mixed.strategy == ("1c", "2", "1")
    assert Schedule(sig, solver="unipc", strategy=("1c", "2c", "3")).strategy != mixed.strategy
    assert Schedule(sig, solver="unipc", strategy=("2c", "2", "3c")) == mixed
    assert plain.id != mixed.id
    assert "strategy" not in plain.to_dict()
    back = Schedule.from_json(mixed.to_json())
    assert back == mixed and back.strategy == mixed.strategy
    # A schedule without a strategy keeps the id scheme's bytes (no strategy part hashed).
    import hashlib

    from searchd.schedule import HASH_CHARS, canonical_sigmas

    h = hashlib.sha256(b"unipc|s|" + canonical_sigmas(sig).astype("<f8").tobytes())
    assert plain.id == h.hexdigest()[:HASH_CHARS]


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "ipndm"])
def test_prefix_tree_runs_strategies_bitwise(solver):
    from searchd.models import load

    den = load("gmm-digits-k8")
    noise = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    sig = baseline("polynomial", 5, den.sigma_min, den.sigma_max, True, rho=7)
    sig2 = sig.copy()
    sig2[3] = 0.5 * (sig[3] + sig[4])
    orders, corr, _ = FAMILIES[solver]
    hi = str(orders[-1])
    strategies = [None, ("1",) * 5, (hi,) * 5, ("2", "2", "1", "2", "1"),
                  ("2", "2", "1", hi, "1")]
    if corr:
        strategies += [("2c", "2", "2c", "2", "1"), ("2c", "2c", "2c", "2", "1")]
    cases = [(s, k) for s in (sig, sig2) for k in strategies]
    with torch.no_grad():
        got = solve_prefix_tree(den, noise, [torch.as_tensor(s) for s, _ in cases],
                                solver=solver, strategies=[k for _, k in cases])
        for (s, k), g in zip(cases, got):
            want = solve(den, noise, torch.as_tensor(s), solver=solver, strategy=k)
            assert torch.equal(g, want), k


def test_evaluator_scores_strategies_as_solve_does():
    from searchd.evaluation import Evaluator, load_features
    from searchd.evaluation.reference import exact_reference
    from searchd.models import load

    den = load("gmm-digits-k8")
    feats = load_features("digits")
    ref = exact_reference(den, feats, range(10_000, 10_200))
    sig = baseline("polynomial", 4, den.sigma_min, den.sigma_max, True, rho=7)
    cands = [Schedule(sig, solver="unipc"),
             Schedule(sig, solver="unipc", strategy=("1c", "2", "2c", "1")),
             Schedule(sig, solver="unipc", strategy=("1c", "2c", "2c", "1"))]
    assert cands[2].id not in (cands[0].id, cands[1].id)
    for sharing in (False, True):
        ev = Evaluator(den, feats, ref, metrics=("fid",), batch_size=64,
                       prefix_sharing=sharing)
        res = ev.evaluate(cands, list(range(100)))
        alone = [ev.evaluate([c], list(range(100)))[0] for c in cands]
        assert [r.metrics["fid"] for r in res] == [r.metrics["fid"] for r in alone]
        # cands[2] is the plain solver's own choices: the same samples, the same FID.
        assert res[2].metrics["fid"] == res[0].metrics["fid"]
        assert res[1].metrics["fid"] != res[0].metrics["fid"]
