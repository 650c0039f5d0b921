"""The exact reference split over the evaluators: its parts, joined in seed order, are bit
for bit the reference one evaluator computes whole (``reference.exact_reference_part`` /
``exact_reference_join``; ``EvaluatorPool.exact_reference``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from searchd.config import load_config
from searchd.evaluation.features import load_features
from searchd.evaluation.reference import (
    ReferenceStats,
    exact_reference,
    exact_reference_join,
    exact_reference_part,
    split_batches,
)
from searchd.loop.factory import EvaluatorFactory

QUICK = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
BASE = 2_000_000


def assert_same(a: ReferenceStats | dict, b: ReferenceStats | dict) -> None:
    """Equal statistics, bit for bit, and the same images (checksum) and count."""
    da = a.to_dict() if isinstance(a, ReferenceStats) else a
    db = b.to_dict() if isinstance(b, ReferenceStats) else b
    ra, rb = ReferenceStats.from_dict(da), ReferenceStats.from_dict(db)
    assert np.array_equal(ra.mu, rb.mu) and np.array_equal(ra.sigma, rb.sigma)
    for key in ("count", "checksum", "source", "seed_base", "features", "dim"):
        assert ra.meta.get(key) == rb.meta.get(key), key


@pytest.mark.parametrize("features", ["digits", "pixels"])
@pytest.mark.parametrize("workers", [2, 3, 6])
def test_parts_joined_in_seed_order_are_the_whole_bit_for_bit(one_thread, features, workers):
    from searchd.models import load

    den = load("gmm-digits")
    net = load_features(features, shape=(1, 8, 8)) if features == "pixels" else \
        load_features(features)
    n, batch = 1302, 256  # a last batch of 22 samples
    whole = exact_reference(den, net, range(BASE, BASE + n), batch_size=batch)
    ranges = split_batches(n, BASE, workers, batch)
    assert len(ranges) == workers and ranges[0][0] == BASE and ranges[-1][1] == BASE + n
    assert all((lo - BASE) % batch == 0 for lo, _ in ranges)
    parts = [exact_reference_part(den, net, range(lo, hi), batch_size=batch)
             for lo, hi in ranges]
    assert [len(p["features"]) for p in parts] == [hi - lo for lo, hi in ranges]
    assert_same(exact_reference_join(parts, BASE), whole)


def test_split_batches_balances_whole_batches():
    assert split_batches(10_000, 7, 2, 1000) == [(7, 5007), (5007, 10_007)]
    assert split_batches(10_000, 0, 3, 1000) == [(0, 3000), (3000, 6000), (6000, 10_000)]
    assert split_batches(500, 0, 2, 1000) == [(0, 500)]  # one batch: not split
    assert split_batches(2500, 0, 8, 1000) == [(0, 1000), (1000, 2000), (2000, 2500)]


def test_the_host_refuses_parts_of_a_model_without_exact_samples(one_thread):
    from types import SimpleNamespace

    cfg = load_config(QUICK, ["metric.reference=exact:500"]).resolve()
    host = EvaluatorFactory(cfg).host()
    host.denoiser = SimpleNamespace(name="no-exact-samples")  # a model without sample_data
    for job in (lambda: host.exact_reference(500, BASE),
                lambda: host.exact_reference_part(BASE, BASE + 500)):
        with pytest.raises(ValueError, match="'exact:500' needs a model with exact samples"):
            job()


@pytest.fixture(scope="module")
def ray_pool():
    import ray

    from searchd.distributed import EvaluatorPool

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = load_config(QUICK, ["metric.reference=exact:1500"]).resolve()
    pool = EvaluatorPool(EvaluatorFactory(cfg), num_workers=2, cpus_per_worker=0.5,
                         elastic=False)
    yield pool
    pool.shutdown()
    if started:
        ray.shutdown()


@pytest.mark.ray
def test_the_pool_splits_the_reference_and_gets_the_one_actor_value(ray_pool):
    split = ray_pool.exact_reference(1500, BASE)
    whole = ray_pool._client.run_on_one("exact_reference", 1500, BASE)
    assert_same(split, whole)


@pytest.mark.ray
def test_a_failing_part_fails_the_reference_with_the_actors_error(ray_pool):
    # Negative seeds: the model refuses them; the split reference raises that error, as the
    # whole one does.
    with pytest.raises(ValueError, match="seeds must be >= 0"):
        ray_pool._client.run_on_one("exact_reference", 1500, -2000)
    with pytest.raises(ValueError, match="seeds must be >= 0"):
        ray_pool.exact_reference(1500, -2000)
