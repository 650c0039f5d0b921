"""The evaluator actors and their pool: request merging, splitting, and surviving a killed actor.

The request batcher and the splitting rule are tested without Ray; the actor and pool tests
start a local Ray (marked ``ray``) and score real schedules with a small real evaluator: the
embedded Gaussian-mixture model, sampled with searchd's solver, scored by the distance
between the sample mean and the model's exact data mean.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from searchd.distributed.batcher import RequestBatcher
from searchd.distributed.pool import split_balanced
from searchd.evaluation import CandidateResult
from searchd.models import load
from searchd.noise import make_noise
from searchd.schedule import Schedule
from searchd.schedules.spaces import ContinuousSpace
from searchd.solvers import nfe, solve


# A small real evaluator ------------------------------------------------------------------
class MeanDistanceEvaluator:
    """Scores schedules by ``|mean(samples) - exact data mean|`` on the embedded GMM (a
    factory of its own: the actor serves any evaluator, not only searchd's ``Evaluator``).

    All candidates of a call are solved in one population-batched pass ([C*B, N+1] sigmas),
    as the real evaluator does; a candidate whose solver is unknown fails alone.
    """

    def __init__(self, model: str = "gmm-digits-k64") -> None:
        torch.set_num_threads(1)
        self.denoiser = load(model)
        self.target = self.denoiser.data_mean().reshape(-1).double()

    def evaluate(self, candidates: Sequence[Schedule], seeds: Sequence[int]
                 ) -> list[CandidateResult]:
        t0 = time.perf_counter()
        seeds = list(seeds)
        b = len(seeds)
        out: dict[int, CandidateResult] = {}
        ok = [i for i, c in enumerate(candidates) if c.solver == "dpmpp_2m"]
        for i, c in enumerate(candidates):
            if i not in ok:
                out[i] = CandidateResult(c.id, "failed", {}, 0, 0, seeds[0], 0.0, 0.0,
                                    f"unknown solver {c.solver!r}")
        if ok:
            noise = make_noise(seeds, self.denoiser.shape)
            sig = np.repeat(np.stack([candidates[i].sigmas for i in ok]), b, axis=0)
            x = solve(self.denoiser, noise.repeat(len(ok), 1, 1, 1), torch.tensor(sig))
            dist = (x.reshape(len(ok), b, -1).double().mean(1) - self.target).norm(dim=1)
            wall = time.perf_counter() - t0
            for i, d in zip(ok, dist.tolist()):
                c = candidates[i]
                out[i] = CandidateResult(c.id, "ok", {"dist": d}, nfe(c.solver, c.n_steps),
                                    b, seeds[0], wall / len(ok), b * len(ok) / wall)
        return [out[i] for i in range(len(candidates))]


def make_candidates(n: int, seed: int = 0) -> list[Schedule]:
    space = ContinuousSpace(5, 0.002, 80.0, True, "rho", 7.0, True)
    rng = np.random.default_rng(seed)
    return [space.sample(rng) for _ in range(n)]


# Request batcher (no Ray) -----------------------------------------------------------------
class Recorder:
    """A batched function (squares numbers, plus the key) that records every call."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.calls: list[tuple[list[int], object]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on

    def __call__(self, items: list[int], key: object) -> list[int]:
        self.calls.append((list(items), key))
        time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"item {self.fail_on} is bad")
        return [x * x + int(key) for x in items]


def test_batcher_merges_concurrent_requests_and_routes_outputs() -> None:
    rec = Recorder()

    async def main() -> list[list[int]]:
        b = RequestBatcher(rec, max_batch=100, max_wait_s=0.05)
        reqs = [b.submit([1, 2], 10), b.submit([3], 10), b.submit([4, 5, 6], 10)]
        out = await asyncio.gather(*reqs)
        b.close()
        return out

    out = asyncio.run(main())
    assert out == [[11, 14], [19], [26, 35, 46]]
    assert len(rec.calls) == 1 and rec.calls[0] == ([1, 2, 3, 4, 5, 6], 10)


def test_batcher_keeps_keys_apart_and_respects_max_batch() -> None:
    rec = Recorder()

    async def main() -> list[list[int]]:
        b = RequestBatcher(rec, max_batch=3, max_wait_s=0.05)
        reqs = [b.submit([1, 2], 0), b.submit([3], 1), b.submit([4], 0), b.submit([5, 6], 0)]
        out = await asyncio.gather(*reqs)
        b.close()
        return out

    out = asyncio.run(main())
    assert out == [[1, 4], [10], [16], [25, 36]]
    # Key 0 first ([1, 2] + [4] = max_batch), then key 1, then the rest of key 0.
    assert rec.calls == [([1, 2, 4], 0), ([3], 1), ([5, 6], 0)]


def test_batcher_merges_requests_arriving_during_a_call() -> None:
    rec = Recorder(delay_s=0.2)

    async def main() -> list[list[int]]:
        b = RequestBatcher(rec, max_batch=100, max_wait_s=0.0)
        first = asyncio.ensure_future(b.submit([1], 0))
        await asyncio.sleep(0.05)  # the first call is running now
        later = [b.submit([2], 0), b.submit([3], 0), b.submit([4], 0)]
        out = await asyncio.gather(first, *later)
        b.close()
        return out

    out = asyncio.run(main())
    assert out == [[1], [4], [9], [16]]
    assert [c[0] for c in rec.calls] == [[1], [2, 3, 4]]


def test_batcher_raises_a_failed_call_in_its_requests_only() -> None:
    rec = Recorder(fail_on=3)

    async def main() -> tuple[list, list[int]]:
        b = RequestBatcher(rec, max_batch=100, max_wait_s=0.05)
        bad = await asyncio.gather(b.submit([1], 0), b.submit([3], 0), return_exceptions=True)
        good = await b.submit([2], 0)
        b.close()
        return bad, good

    bad, good = asyncio.run(main())
    assert all(isinstance(e, ValueError) for e in bad)
    assert good == [4]


def test_split_balanced_covers_every_index_once() -> None:
    for n in range(0, 12):
        for k in range(1, 6):
            chunks = split_balanced(n, k)
            idx = [i for a, b in chunks for i in range(a, b)]
            assert idx == list(range(n))
            sizes = [b - a for a, b in chunks]
            assert len(chunks) == min(n, k)
            assert not sizes or max(sizes) - min(sizes) <= 1


# Actors and pool (local Ray) --------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray
    import ray.cloudpickle

    # This module is not importable in Ray's workers: ship the evaluator class by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def pool(ray_local):
    from searchd.distributed import EvaluatorPool

    # Sized from the cluster: 2 CPUs less 1.2 reserved leave room for one 0.5-CPU actor;
    # the first test lowers the reserve and grows the pool to two.
    p = EvaluatorPool(MeanDistanceEvaluator, num_workers=None, cpus_per_worker=0.5,
                      reserve_cpus=1.2, max_wait_s=0.2)
    yield p
    p.shutdown()


@pytest.mark.ray
def test_pool_needs_gpus_it_cannot_find(ray_local) -> None:
    from searchd.distributed import EvaluatorPool

    with pytest.raises(RuntimeError, match="no room for an evaluator actor of 1.0 GPU"):
        EvaluatorPool(MeanDistanceEvaluator, num_gpus_per_worker=1)


@pytest.mark.ray
def test_pool_grows_and_clients_handed_out_before_see_it(ray_local, pool) -> None:
    assert len(pool) == 1 and pool.refresh() == 0
    before = pool.client()

    @ray_local.remote(num_cpus=0.01)
    def in_a_trial(client, cands: list[Schedule], seeds: range) -> list[str]:
        return [r.worker for r in client.score(cands, seeds)]

    pool.reserve_cpus = 0.6  # room for a second actor now
    assert pool.refresh() == 1 and len(pool) == 2
    assert pool.names == ["evaluator-0", "evaluator-1"]
    workers = ray_local.get(in_a_trial.remote(before, make_candidates(4, seed=5), range(20)))
    assert workers == ["evaluator-0"] * 2 + ["evaluator-1"] * 2 or workers == [
        "evaluator-1"] * 2 + ["evaluator-0"] * 2


@pytest.mark.ray
def test_pool_scores_like_the_evaluator_itself(ray_local, pool) -> None:
    cands = make_candidates(5, seed=1)
    cands.append(Schedule(cands[0].sigmas, solver="no_such_solver"))
    seeds = range(100, 300)
    got = pool.score(cands, seeds)
    want = MeanDistanceEvaluator().evaluate(cands, seeds)
    assert [g.candidate_id for g in got] == [c.id for c in cands]
    assert [g.status for g in got] == ["ok"] * 5 + ["failed"]
    np.testing.assert_allclose([g.metrics.get("dist", np.nan) for g in got],
                               [w.metrics.get("dist", np.nan) for w in want], rtol=1e-5)
    # Split over both actors, each tagged with its worker and node.
    assert {g.worker for g in got} == {"evaluator-0", "evaluator-1"}
    assert {g.node for g in got} == {pool.workers[0]["node"]}


@pytest.mark.ray
def test_actor_merges_requests_that_arrive_together(ray_local, pool) -> None:
    actor = pool.actors[0]
    before = ray_local.get(actor.stats.remote())
    a, b = make_candidates(3, seed=2), make_candidates(2, seed=3)
    seeds = list(range(50))
    refs = [actor.evaluate.remote(a, seeds), actor.evaluate.remote(b, seeds)]
    ra, rb = ray_local.get(refs)
    after = ray_local.get(actor.stats.remote())
    assert [r.candidate_id for r in ra] == [c.id for c in a]
    assert [r.candidate_id for r in rb] == [c.id for c in b]
    assert after["requests"] - before["requests"] == 2
    assert after["calls"] - before["calls"] == 1
    # A job that needs the evaluator runs on the actor's evaluator thread.
    assert pool.call(lambda ev, n: float(ev.target.numel() * n), 2) == 128.0


@pytest.mark.ray
def test_killed_actor_is_restarted_and_its_chunk_rescored(ray_local, pool) -> None:
    cands = make_candidates(8, seed=4)
    seeds = range(400)
    client = pool.client()
    resends = client.resends
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["results"] = pool.score(cands, seeds, timeout_s=120)
        except Exception as e:  # reported by the assertions below
            out["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    # Kill the first actor seen scoring a chunk, mid-call (SIGKILL, like the OOM killer).
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        for i, a in enumerate(pool.actors):
            if ray_local.get(a.stats.remote())["in_flight"] > 0:
                victim = i
                break
        time.sleep(0.01)
    assert victim is not None, "no actor started scoring"
    old_pid = pool.workers[victim]["pid"]
    os.kill(old_pid, signal.SIGKILL)
    worker.join(timeout=150)
    assert "error" not in out, out.get("error")
    results = out["results"]
    # Every candidate got exactly one result, in order, and the lost chunk was re-sent.
    assert [r.candidate_id for r in results] == [c.id for c in cands]
    assert client.resends == resends + 1
    want = MeanDistanceEvaluator().evaluate(cands, seeds)
    np.testing.assert_allclose([r.metrics["dist"] for r in results],
                               [w.metrics["dist"] for w in want], rtol=1e-5)
    # Ray restarted the killed actor, which rebuilt its evaluator and serves again.
    info = client.wait_ready(victim, timeout_s=120)
    assert info["restarted"] and info["pid"] != old_pid
    again = ray_local.get(pool.actors[victim].evaluate.remote(cands[:1], range(10)))
    assert again[0].candidate_id == cands[0].id
