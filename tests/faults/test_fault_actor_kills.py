"""Case 1b of the campaign: evaluator actors SIGKILLed by pid, several times within one call
of the pool, and a candidate that kills its actor every time (a poison candidate).

The pool (``searchd.distributed.pool``) must give every candidate exactly one result, equal
to what the evaluator gives in this process without any kill; a death of an actor is never
a candidate's result, except for a candidate that kills its actor each time it is scored
alone (``max_attempts`` times): that one gets a failed result naming it, and the others are
scored. When no actor comes back, the call ends with ``EvaluatorsLostError`` (one line)
instead of results.

The evaluator is the embedded Gaussian mixture sampled with searchd's solver (as in
tests/test_distributed.py), one candidate at a time so that a call lasts long enough to be
killed in; a candidate whose solver is ``"poison"`` SIGKILLs its own process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from searchd.evaluation import CandidateResult
from searchd.models import load
from searchd.noise import make_noise
from searchd.schedule import Schedule
from searchd.schedules.spaces import ContinuousSpace
from searchd.solvers import nfe, solve

pytestmark = pytest.mark.ray

SEEDS = range(600)


class SlowMeanEvaluator:
    """``|mean(samples) - data mean|`` on the embedded GMM, one candidate at a time (each
    alone: its result does not depend on the others of its call); ``"poison"`` kills it."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.denoiser = load("gmm-digits-k64")
        self.target = self.denoiser.data_mean().reshape(-1).double()

    def evaluate(self, candidates: Sequence[Schedule], seeds: Sequence[int]
                 ) -> list[CandidateResult]:
        seeds = list(seeds)
        noise = make_noise(seeds, self.denoiser.shape)
        out = []
        for c in candidates:
            if c.solver == "poison":
                os.kill(os.getpid(), signal.SIGKILL)
            t0 = time.perf_counter()
            sig = torch.tensor(np.repeat(c.sigmas[None], len(seeds), axis=0))
            x = solve(self.denoiser, noise, sig)
            d = float((x.reshape(len(seeds), -1).double().mean(0) - self.target).norm())
            wall = time.perf_counter() - t0
            out.append(CandidateResult(c.id, "ok", {"dist": d}, nfe("dpmpp_2m", c.n_steps),
                                       len(seeds), seeds[0], wall, len(seeds) / wall))
        return out


class SlowRestartEvaluator(SlowMeanEvaluator):
    """Takes 3 s more to load after a restart (a model that loads slowly)."""

    def __init__(self) -> None:
        import ray

        super().__init__()
        if ray.get_runtime_context().was_current_actor_reconstructed:
            time.sleep(3.0)


def candidates(n: int, seed: int) -> list[Schedule]:
    space = ContinuousSpace(8, 0.002, 80.0, True, "rho", 7.0, True)
    rng = np.random.default_rng(seed)
    return [space.sample(rng) for _ in range(n)]


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


def pool_of(n: int, factory: Any = SlowMeanEvaluator, **kwargs: Any) -> Any:
    from searchd.distributed import EvaluatorPool

    return EvaluatorPool(factory, num_workers=n, cpus_per_worker=0.5,
                         reserve_cpus=0.5, **kwargs)


def score_in_thread(pool: Any, cands: list[Schedule]) -> tuple[threading.Thread, dict]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["results"] = pool.score(cands, SEEDS, timeout_s=400)
        except Exception as e:  # reported by the test's assertions
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def busy_pid(ray: Any, pool: Any, not_in: set[int]) -> int | None:
    """The pid of an actor in the middle of an evaluator call now (None if none is)."""
    for a in pool.actors:
        try:
            if ray.get(a.stats.remote(), timeout=5)["in_flight"] > 0:
                pid = ray.get(a.ping.remote(), timeout=5)
                if pid not in not_in:
                    return pid
        except Exception:  # restarting: not this one
            continue
    return None


def test_kills_within_one_call_leave_every_candidate_scored_once(ray_local) -> None:
    """Three SIGKILLs of busy actors within one call (each waits for the previous victim's
    restart): every candidate gets one result, equal to the evaluator's without kills."""
    cands = candidates(6, seed=11)
    want = SlowMeanEvaluator().evaluate(cands, SEEDS)
    pool = pool_of(2)
    try:
        thread, out = score_in_thread(pool, cands)
        killed: list[int] = []
        deadline = time.monotonic() + 300
        while len(killed) < 3 and thread.is_alive() and time.monotonic() < deadline:
            pid = busy_pid(ray_local, pool, set(killed))
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.1)
        thread.join(timeout=400)
        assert not thread.is_alive()
        assert "error" not in out, out.get("error")
        assert len(killed) == 3, f"only {len(killed)} kills landed before the call ended"
        got = out["results"]
        assert [r.candidate_id for r in got] == [c.id for c in cands]
        assert [r.status for r in got] == ["ok"] * len(cands)
        # Each candidate alone in the evaluator, whichever actor and request: bitwise equal.
        assert [r.metrics for r in got] == [w.metrics for w in want]
        assert pool.client().resends >= 3
    finally:
        pool.shutdown()


def test_a_candidate_that_kills_its_actor_fails_alone_after_bounded_attempts(ray_local) -> None:
    cands = candidates(5, seed=12)
    cands.insert(2, Schedule(cands[0].sigmas, solver="poison"))
    pool = pool_of(2, max_attempts=2)
    try:
        t0 = time.monotonic()
        got = pool.score(cands, SEEDS, timeout_s=400)
        wall = time.monotonic() - t0
    finally:
        pool.shutdown()
    assert [r.candidate_id for r in got] == [c.id for c in cands]
    assert [r.status for r in got] == ["ok", "ok", "failed", "ok", "ok", "ok"], wall
    assert "died each of the 2 times it was scored alone" in got[2].error
    assert "\n" not in got[2].error
    fine = [c for c in cands if c.solver != "poison"]
    want = SlowMeanEvaluator().evaluate(fine, SEEDS)
    assert [r.metrics for r in got if r.status == "ok"] == [w.metrics for w in want]


def test_a_pool_whose_actors_never_come_back_raises_one_line(ray_local) -> None:
    from searchd.distributed.pool import EvaluatorsLostError

    pool = pool_of(1, max_restarts=0)
    pool.client().restart_timeout_s = 3.0
    try:
        thread, out = score_in_thread(pool, candidates(4, seed=13))
        pid = None
        deadline = time.monotonic() + 120
        while pid is None and time.monotonic() < deadline:
            pid = busy_pid(ray_local, pool, set())
            time.sleep(0.05)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        thread.join(timeout=120)
    finally:
        pool.shutdown()
    err = out.get("error")
    assert isinstance(err, EvaluatorsLostError), out
    text = str(err)
    assert "\n" not in text
    assert "no evaluator actor answered for 3 s" in text and "4 of 4 candidates" in text


def test_a_call_refused_by_a_restarting_actor_uses_no_attempt(ray_local) -> None:
    """``max_attempts=1``: no death may be survived; a send to an actor that is restarting
    (its process SIGKILLed while idle) is refused, and is no death: the call waits for it."""
    from searchd.distributed.pool import is_refusal

    pool = pool_of(1, SlowRestartEvaluator, max_attempts=1)
    try:
        actor = pool.actors[0]
        pid = ray_local.get(actor.ping.remote())
        os.kill(pid, signal.SIGKILL)
        seen = None
        deadline = time.monotonic() + 60
        while seen is None and time.monotonic() < deadline:  # until Ray knows it restarts
            try:
                ray_local.get(actor.ping.remote(), timeout=10)
            except Exception as e:
                if is_refusal(e):
                    seen = e
        assert seen is not None, "the actor was back before a send was refused"
        resends = pool.client().resends
        got = pool.call(lambda ev: os.getpid())
        assert got != pid
        assert pool.client().resends == resends + 1  # refused once, sent again
    finally:
        pool.shutdown()


# A batch failed by the infrastructure, under Ray Tune ------------------------------------
class LosingScorer:
    """Scores ``dist`` = the sum of the sigmas in the trial itself; the batch holding the
    candidate ``lost_on`` raises ``EvaluatorsLostError``, as the pool does when no actor
    comes back."""

    def __init__(self, lost_on: str) -> None:
        self.lost_on = lost_on

    def score(self, schedules: Sequence[Schedule], seeds: Sequence[int]
              ) -> list[CandidateResult]:
        from searchd.distributed.pool import EvaluatorsLostError

        if any(s.id == self.lost_on for s in schedules):
            raise EvaluatorsLostError("no evaluator actor answered for 600 s (evaluator-0: "
                                      "ActorUnavailableError); 4 of 4 candidates of the batch "
                                      "not scored")
        n = len(seeds)
        return [CandidateResult(s.id, "ok", {"dist": float(np.sum(s.sigmas))}, 5, n,
                                seeds[0], 0.01, n / 0.01) for s in schedules]


class Rows:
    """A loop observer keeping every recorded result (what the run directory would hold)."""

    def __init__(self) -> None:
        self.results: list[CandidateResult] = []

    def recorded(self, batch: Any, new: Sequence[int]) -> None:
        self.results += [batch.results[j] for j in new]


def test_a_batch_failed_by_the_infrastructure_is_not_recorded_and_stops_the_search(
        ray_local, tmp_path) -> None:
    from searchd.distributed.tune import run_tune
    from searchd.loop import SearchLoop
    from searchd.searchers.random_search import RandomSearcher

    space = ContinuousSpace(5, 0.002, 80.0, True, "rho", 7.0, True)
    twin = RandomSearcher(space, "dist", num_samples=12, seed=3)
    order = [twin.ask(f"x/{j}").id for j in range(12)]
    rows = Rows()
    loop = SearchLoop(RandomSearcher(space, "dist", num_samples=12, seed=3), range(4),
                      batch_size=4, observers=[rows])
    outcome = run_tune(loop, LosingScorer(order[4]), storage_path=str(tmp_path), name="lost")
    # The first batch is recorded; the second failed by the infrastructure is not (no
    # 'failed' rows), nothing after it was asked, and the search is not finished.
    assert outcome.lost is not None and "EvaluatorsLostError" in outcome.lost
    assert [r.candidate_id for r in rows.results] == order[:4]
    assert all(r.status == "ok" for r in rows.results)
    assert loop.n_failed == 0 and not loop.finished
    assert [b.schedules[0].id for b in loop.pending.values()] == [order[4]]


# Ray's "A worker died ..." messages under --quiet ---------------------------------------
class Sleeper:
    """An actor that answers its pid and sleeps on request (to be killed mid-call)."""

    def ping(self) -> int:
        return os.getpid()

    def sleep(self, s: float) -> None:
        time.sleep(s)


def kill_mid_call(ray: Any, actor: Any) -> None:
    """SIGKILL the actor's process during a call, once it is back from any restart."""
    pid = ray.get(actor.ping.remote(), timeout=120)
    ref = actor.sleep.remote(60)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(Exception):  # noqa: B017 - Ray's error for the killed call
        ray.get(ref, timeout=120)


def test_quiet_sends_rays_worker_died_messages_to_the_log(ray_local, capfd, caplog) -> None:
    """Without ``raylog.route_to_log`` the driver prints Ray's multi-line message on its
    stdout (the control); with it, the message is one INFO line of ``searchd.ray``."""
    import logging

    from searchd.distributed import raylog

    def wait_for(check: Any, what: str) -> str:
        seen = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen += capfd.readouterr().out
            if check(seen):
                return seen
            time.sleep(0.2)
        raise AssertionError(f"no {what} within 60 s; stdout: {seen[-2000:]}")

    actor = ray_local.remote(max_restarts=-1)(Sleeper).remote()
    capfd.readouterr()
    kill_mid_call(ray_local, actor)
    wait_for(lambda out: "A worker died or was killed" in out, "message on stdout")

    caplog.set_level(logging.INFO, logger="searchd.ray")
    assert raylog.route_to_log()
    try:
        kill_mid_call(ray_local, actor)
        deadline = time.monotonic() + 60
        out = ""
        while time.monotonic() < deadline and not any(
                "A worker died or was killed" in r.getMessage() for r in caplog.records):
            out += capfd.readouterr().out
            time.sleep(0.2)
        out += capfd.readouterr().out
    finally:
        raylog.restore()
        ray_local.kill(actor, no_restart=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "searchd.ray"]
    assert any(m.startswith("ray: A worker died or was killed") for m in lines), lines
    assert all("\n" not in m for m in lines)
    assert "A worker died" not in out


def test_the_engine_ends_the_search_on_one_line_when_the_evaluators_are_lost(
        monkeypatch) -> None:
    """``RayEngine.drive`` turns a Tune outcome with ``lost`` into ``EvaluatorsLostError``
    (a ``RuntimeError``: the command's one line, exit 1), naming the resume."""
    from types import SimpleNamespace

    from searchd import cli
    from searchd.distributed import engine
    from searchd.distributed.pool import EvaluatorsLostError
    from searchd.distributed.tune import TuneOutcome

    lost = ("trial errored: searchd.distributed.pool.EvaluatorsLostError: no evaluator actor "
            "answered for 600 s (evaluator-0: ActorUnavailableError); 6 of 6 candidates of "
            "the batch not scored")
    monkeypatch.delenv("SEARCHD_FAULT", raising=False)
    monkeypatch.setattr(engine, "run_tune", lambda *a, **k: TuneOutcome(
        False, 1, 1, 1.0, 0.5, 0.5, "scratch", lost=lost))
    loop = SimpleNamespace(observers=[])
    with pytest.raises(EvaluatorsLostError) as caught:
        engine.RayEngine().drive(loop, SimpleNamespace(client=None, grow=list), name="x")
    assert isinstance(caught.value, RuntimeError)
    text = cli.one_line(caught.value)
    assert "6 of 6 candidates" in text and "--resume" in text and "\n" not in str(caught.value)
