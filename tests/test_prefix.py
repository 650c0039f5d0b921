"""Prefix-tree sampling against sampling every schedule alone: bitwise equal, less work.

The reference is ``solve`` run on each schedule by itself on the same noise rows. Equality
is ``torch.equal`` (every bit), for every solver and option variant, both endings, per-sample
schedules [B, N+1] and model schedules. The work saved is checked against the number of
distinct prefixes counted independently, and failures stay in their subtree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchd.models import load
from searchd.models.compose import ComposedDenoiser
from searchd.schedules import baseline
from searchd.solvers import SOLVERS, nfe, solve
from searchd.solvers._core import trajectory
from searchd.solvers.prefix import PrefixStats, solve_prefix_tree
from searchd.solvers.stepping import SolverState

# Every solver with its defaults, and with each non-default value of each option: new
# solvers and options are covered as they are registered.
CONFIGS: list[tuple[str, dict]] = [
    (name, variant)
    for name, spec in SOLVERS.items()
    for variant in [{}] + [{k: v} for k, o in spec.options.items()
                           for v in o.allowed if v != o.default]
]
CONFIG_IDS = [name + "".join(f"-{k}={v}" for k, v in o.items()) for name, o in CONFIGS]
B = 40


@pytest.fixture(scope="module")
def den():
    """The smallest embedded mixture in float32 (the precision searches run in)."""
    return load("gmm-digits-k8")


@pytest.fixture(scope="module")
def noise():
    return torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def family(n_steps: int, final_zero: bool, seed: int, lo: float = 0.002, hi: float = 80.0
           ) -> list[np.ndarray]:
    """Schedules with shared prefixes of every length: a base, one-level moves of it at
    every level, moves of those moves, an exact duplicate, and an unrelated schedule."""
    rng = np.random.default_rng(seed)
    base = baseline("polynomial", n_steps, lo, hi, final_zero, rho=7)
    positive = n_steps if final_zero else n_steps + 1

    def move(s: np.ndarray, j: int) -> np.ndarray:
        out = s.copy()
        upper = out[j - 1] if j > 0 else hi
        lower = out[j + 1] if j + 1 < len(out) else lo
        if j + 1 == positive and final_zero:
            lower = lo
        out[j] = lower + (upper - lower) * rng.uniform(0.2, 0.8)
        return out

    out = [base]
    for j in range(positive):
        out.append(move(base, j))
        out.append(move(out[-1], min(j + 1, positive - 1)))
    out.append(base.copy())
    out.append(baseline("logsnr", n_steps, lo, hi, final_zero))
    rng.shuffle(out)
    return out


def distinct_prefixes(rows: list[tuple]) -> int:
    """Observe phases a tree needs: distinct (levels 0..k, step inputs 0..k) for k < N."""
    n = len(rows[0])
    return sum(len({r[: k + 1] for r in rows}) for k in range(n - 1))


def alone(den, noise, schedules, solver, opts, model_ids=None):
    mids = model_ids or [None] * len(schedules)
    with torch.no_grad():
        return [solve(den, noise, torch.as_tensor(s), solver=solver, model_ids=m, **opts)
                for s, m in zip(schedules, mids)]


@pytest.mark.parametrize("final_zero", [True, False])
@pytest.mark.parametrize(("solver", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_tree_is_bitwise_alone(den, noise, solver, opts, final_zero, one_thread):
    n_steps = 5
    schedules = family(n_steps, final_zero, seed=n_steps)
    stats = PrefixStats()
    got = solve_prefix_tree(den, noise, schedules, solver=solver, stats=stats, **opts)
    want = alone(den, noise, schedules, solver, opts)
    for c, (g, w) in enumerate(zip(got, want)):
        assert isinstance(g, torch.Tensor), g
        assert torch.equal(g, w), f"schedule {c} differs"
    # Work: one observe per distinct prefix; sharing happened.
    rows = [tuple(float(v) for v in s) for s in schedules]
    assert stats.observes == distinct_prefixes(rows)
    assert stats.observes_alone == len(schedules) * n_steps
    assert stats.observes < stats.observes_alone


@pytest.mark.parametrize(("solver", "opts"), CONFIGS, ids=CONFIG_IDS)
def test_tree_per_sample_schedules(den, noise, solver, opts, one_thread):
    """Schedules [B, N+1]: a prefix is shared only where every row agrees."""
    rng = np.random.default_rng(7)
    n_steps = 4
    base = np.stack([np.sort(rng.uniform(0.01, 80.0, n_steps))[::-1] for _ in range(B)])
    base = np.concatenate([base, np.zeros((B, 1))], axis=1)
    one_level = base.copy()
    one_level[:, 2] = 0.5 * (base[:, 1] + base[:, 2])  # every row moves at level 2
    one_row = base.copy()
    one_row[5, 1] = 0.5 * (base[5, 1] + base[5, 2])  # one row moves at level 1
    schedules = [base, one_level, one_row, base.copy()]
    stats = PrefixStats()
    got = solve_prefix_tree(den, noise, schedules, solver=solver, stats=stats, **opts)
    for g, w in zip(got, alone(den, noise, schedules, solver, opts)):
        assert torch.equal(g, w)
    # Depth 0, 1: one prefix (one_row differs at level 1 in one row: two); 2, 3: base/dup,
    # one_level, one_row.
    assert stats.observes == 1 + 2 + 3 + 3


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "unipc", "ipndm"])
def test_tree_model_schedules(noise, solver, one_thread):
    """The models of each step are part of the prefix; Heun's second call uses the step's."""
    den = ComposedDenoiser([load("gmm-digits-k1"), load("gmm-digits-k8")])
    sig = baseline("polynomial", 4, den.sigma_min, den.sigma_max, True, rho=7)
    mids = [np.array(m) for m in ([0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1],
                                  [0, 0, 1, 1])]
    per_sample = np.array([[0, 0, 1, 1]] * B)
    per_sample[3, 3] = 0
    mids.append(per_sample)
    schedules = [sig] * len(mids)
    stats = PrefixStats()
    got = solve_prefix_tree(den, noise, schedules, solver=solver, model_ids=mids, stats=stats)
    for g, w in zip(got, alone(den, noise, schedules, solver, {}, mids)):
        assert torch.equal(g, w)
    # Distinct (level, model) prefixes of steps 0..3: {0,1} | {00,01,11} | {001,011,111} |
    # {0011,0010,0111,1111, per-sample}.
    assert stats.observes == 2 + 3 + 3 + 5


def test_tree_nfe_matches_calls(den, noise, one_thread):
    """Heun's denoiser calls: the tree makes the alone count minus the shared phases."""
    calls = []

    def counted(x, sigma, **cond):
        calls.append(x.shape[0])
        return den(x, sigma, **cond)

    counted.shape, counted.sigma_min, counted.sigma_max = den.shape, den.sigma_min, den.sigma_max
    schedules = family(4, True, seed=1)
    stats = PrefixStats()
    solve_prefix_tree(counted, noise, schedules, solver="heun", stats=stats)
    # One call per observe, one per advance except those into the final level (to 0).
    leaves = len({tuple(s) for s in schedules})
    assert len(calls) == stats.observes + stats.advances - leaves
    assert len(schedules) * nfe("heun", 4) > len(calls)


def test_failure_stays_in_its_subtree(den, noise, one_thread):
    """A denoiser error at one level fails exactly the schedules that visit it."""
    schedules = family(4, True, seed=2)
    bad_level = float(schedules[0][1])

    def flaky(x, sigma, **cond):
        if bool((sigma == torch.tensor(bad_level, dtype=sigma.dtype)).any()):
            raise RuntimeError("boom")
        return den(x, sigma, **cond)

    flaky.shape, flaky.sigma_min, flaky.sigma_max = den.shape, den.sigma_min, den.sigma_max
    got = solve_prefix_tree(flaky, noise, schedules, solver="dpmpp_2m")
    want = alone(den, noise, schedules, "dpmpp_2m", {})
    hit = [float(np.float32(bad_level)) in {float(np.float32(v)) for v in s} for s in schedules]
    assert any(hit) and not all(hit)
    for g, w, h in zip(got, want, hit):
        if h:
            assert isinstance(g, RuntimeError)
        else:
            assert torch.equal(g, w)


def test_bad_input(den, noise):
    five = baseline("polynomial", 5, 0.002, 80.0, True)
    four = baseline("polynomial", 4, 0.002, 80.0, True)
    with pytest.raises(ValueError, match="a prefix tree holds one shape"):
        solve_prefix_tree(den, noise, [five, four])
    with pytest.raises(ValueError, match="strictly decreasing"):
        solve_prefix_tree(den, noise, [five[::-1].copy()])
    with pytest.raises(ValueError, match="unknown solver"):
        solve_prefix_tree(den, noise, [five], solver="rk45")
    with pytest.raises(ValueError, match="for every schedule or for none"):
        solve_prefix_tree(den, noise, [five, five], model_ids=[None, np.zeros(5, int)])
    assert solve_prefix_tree(den, noise, []) == []


def test_state_is_never_written_in_place(den, noise, one_thread):
    """A state continued along one schedule is left intact for the next (the tree's premise)."""
    for name in SOLVERS:
        spec = SOLVERS[name]
        stepper = spec.stepper(**spec.resolve({}))
        sig = baseline("polynomial", 4, 0.002, 80.0, True)
        traj = trajectory(den, noise, sig, None)
        state = stepper.start(traj, noise * 80.0)
        with torch.no_grad():
            for _ in range(3):
                state = stepper.observe(traj, state)
                frozen = [t.clone() for t in (state.x, *state.denoised, *state.evaluated)]
                stepper.advance(traj, state)
                after = [state.x, *state.denoised, *state.evaluated]
                assert all(torch.equal(a, b) for a, b in zip(frozen, after)), name
                state = stepper.advance(traj, state)
        assert isinstance(state, SolverState)


def test_trajectory_inputs_are_all_keyed(den, noise):
    """Tripwire: ``step_inputs`` keys the level, the models, the guidance weights and the
    solver strategy of a step (``cond`` is one per tree). A new per-step input of
    ``Trajectory`` must be added there too;
    this lists what the trajectory holds today, so adding one fails here first."""
    traj = trajectory(den, noise, baseline("polynomial", 3, 0.002, 80.0, True), None)
    assert set(vars(traj)) == {
        "denoiser", "model_ids", "final_zero", "dtype", "policy", "n_steps", "_batch",
        "_levels", "_sigmas", "_lam", "guidance", "cond", "strategy",
    }
