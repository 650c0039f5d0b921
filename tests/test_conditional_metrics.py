"""Class-conditional metrics: per-class and pooled FID against a direct computation, mergeable
statistics, the stratified paired bootstrap, the objective, and the evaluators on the exact
conditional mixture (labels from seeds, population-batched and per-candidate sampling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchd.evaluation import Evaluator, frechet_distance
from searchd.evaluation.conditional import (
    ClassReference,
    ClassStats,
    GuidanceObjective,
    conditional_metrics,
    exact_class_reference,
    stratified_counts,
)
from searchd.evaluation.conditional_evaluator import ConditionalEvaluator
from searchd.evaluation.features import load_features
from searchd.evaluation.heldout import bootstrap_conditional
from searchd.models import load
from searchd.models.conditional import class_labels
from searchd.schedule import Schedule
from searchd.schedules import baseline
from searchd.schedules.guidance_spaces import constant_guidance

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


def fake(n: int, d: int = 5, c: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    f = torch.randn(n, d, generator=g, dtype=torch.float64) + y[:, None].double()
    logits = torch.randn(n, c, generator=g)
    return f, logits, y.numpy()


def test_metrics_match_a_direct_computation():
    f_ref, _, y_ref = fake(600, seed=1)
    ref = ClassReference.from_features(f_ref, y_ref, 3)
    f, logits, y = fake(300, seed=2)
    m = conditional_metrics(f, logits, y, ref)
    fids = []
    for c in range(3):
        a, b = f[y == c].numpy(), f_ref[y_ref == c].numpy()
        fids.append(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                     np.cov(b, rowvar=False)))
    assert m["fid_class"] == pytest.approx(np.mean(fids), rel=1e-7)
    for c in range(3):
        assert m[f"fid_class_{c}"] == pytest.approx(fids[c], rel=1e-7)
    pool = frechet_distance(f.numpy().mean(0), np.cov(f.numpy(), rowvar=False),
                            f_ref.numpy().mean(0), np.cov(f_ref.numpy(), rowvar=False))
    assert m["fid"] == pytest.approx(pool, rel=1e-7)
    assert m["accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == y).mean()))


def test_stats_merge_and_bootstrap_identity():
    f_ref, _, y_ref = fake(600, seed=1)
    ref = ClassReference.from_features(f_ref, y_ref, 3)
    f, logits, y = fake(300, seed=2)
    whole = ClassStats.zeros(3, 5).add(f, logits, y)
    half = ClassStats.zeros(3, 5).add(f[:120], logits[:120], y[:120])
    half.merge(ClassStats.zeros(3, 5).add(f[120:], logits[120:], y[120:]))
    a, b = whole.metrics(ref), half.metrics(ref)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-9)
    counts = stratified_counts(y, 40, seed=0)
    for c in range(3):
        assert torch.all(counts[:, y == c].sum(1) == (y == c).sum())  # classes keep their size
    assert torch.equal(counts, stratified_counts(y, 40, seed=0))  # paired: seeded
    ones = torch.ones(1, y.size, dtype=torch.float64)
    boot = bootstrap_conditional(f, logits, y, ref, ones)
    for k in ("fid_class", "fid", "accuracy"):
        assert boot[k][0] == pytest.approx(a[k], rel=1e-7)
    spread = bootstrap_conditional(f, logits, y, ref, counts)["fid_class"]
    assert spread.std() > 0


def test_class_reference_round_trips(tmp_path):
    f_ref, _, y_ref = fake(200, seed=3)
    ref = ClassReference.from_features(f_ref, y_ref, 3, {"features": "x"})
    again = ClassReference.load(ref.save(tmp_path / "ref.npz"))
    assert again.n_classes == 3
    for a, b in zip([*ref.classes, ref.pool], [*again.classes, again.pool]):
        assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma) and a.n == b.n
    with pytest.raises(ValueError, match="class 2 has 1"):
        ClassReference.from_features(f_ref[:5], y_ref[:5], 3)


def test_objective_keeps_feasible_schedules_first():
    obj = GuidanceObjective(floor=0.9, reference_fid=2.0)
    assert obj({"fid_class": 1.5, "accuracy": 0.95}) == 1.5
    # One point below the floor costs one reference FID.
    assert obj({"fid_class": 1.5, "accuracy": 0.89}) == pytest.approx(3.5)
    assert obj({"fid_class": 0.0, "accuracy": 0.88}) > obj({"fid_class": 3.0, "accuracy": 0.9})
    assert "floor" in obj.describe()
    with pytest.raises(ValueError, match="floor"):
        GuidanceObjective(floor=float("nan"), reference_fid=1.0)


@pytest.fixture(scope="module")
def cond_case():
    den = load("gmm-digits-cond")
    feats = load_features("digits")
    ref = exact_class_reference(den, feats, range(2_000_000, 2_004_000), 10)
    return den, feats, ref


def test_fid_alone_rewards_ignoring_the_condition(cond_case):
    """The unconditional sampler (w = 0) matches the class-balanced pool about as well as
    the conditional one, but not the classes: class-conditional FID and accuracy see it."""
    den, feats, ref = cond_case
    ev = ConditionalEvaluator(den, ref, feats)
    base = Schedule(baseline("polynomial", 12, den.sigma_min, den.sigma_max, rho=7),
                    solver="dpmpp_2m")
    seeds = list(range(1000))
    cond, unc = ev.evaluate([constant_guidance(base, 1.0), constant_guidance(base, 0.0)], seeds)
    assert cond.ok and unc.ok
    assert cond.metrics["accuracy"] > 0.95 and unc.metrics["accuracy"] < 0.2
    assert unc.metrics["fid"] < 3 * cond.metrics["fid"] + 0.5
    assert unc.metrics["fid_class"] > 20 * cond.metrics["fid_class"]
    assert cond.metrics["network_calls"] == 12 and unc.metrics["network_calls"] == 24


def test_labels_follow_seeds_in_every_sampling_path(cond_case):
    """Population-batched sampling (Evaluator, with sample_index = seed) and per-candidate
    sampling give each seed the same class and noise: the same samples, whatever the batch
    size or the other candidates."""
    den, feats, ref = cond_case
    base = Schedule(baseline("polynomial", 6, den.sigma_min, den.sigma_max, rho=7),
                    solver="dpmpp_2m")
    a, b = constant_guidance(base, 1.0), constant_guidance(base, 2.0)
    seeds = list(range(40, 240))
    ev = ConditionalEvaluator(den, ref, feats, batch_size=64)
    x_alone = ev.samples(b, seeds)
    big = Evaluator(den, feats, ref.pool, batch_size=4096)
    r_batched = big.evaluate([a, b, base], seeds)
    r_alone = Evaluator(den, feats, ref.pool, batch_size=64).evaluate([b], seeds)
    assert r_batched[1].metrics["fid"] == pytest.approx(r_alone[0].metrics["fid"], rel=1e-5)
    # Without guidance weights the model runs at its own scale (1): the conditional a.
    assert r_batched[2].metrics["fid"] == pytest.approx(r_batched[0].metrics["fid"], rel=1e-5)
    y = class_labels(seeds, 10)
    acc = float((feats.logits(x_alone).argmax(1).numpy() == y).mean())
    assert acc > 0.9


def test_a_bad_candidate_fails_alone(cond_case):
    den, feats, ref = cond_case
    ev = ConditionalEvaluator(den, ref, feats)
    good = Schedule(baseline("polynomial", 4, den.sigma_min, den.sigma_max, rho=7))
    bad = Schedule([200.0, 1.0, 0.0])  # above the model's sigma_max
    r = ev.evaluate([bad, good], list(range(100)))
    assert r[0].status == "failed" and "sigma_max" in r[0].error and r[1].ok
    with pytest.raises(ValueError, match="not a conditional model"):
        ConditionalEvaluator(load("gmm-digits-k8"), ref, feats)
    plain = Evaluator(load("gmm-digits-k8"), feats, ref.pool)
    res = plain.evaluate([constant_guidance(good, 2.0)], list(range(10)))
    assert res[0].status == "failed" and "guidance weights" in res[0].error
