"""``EvaluatorPool``: the evaluator actors of a search, and the client that Tune trials use.

The engine builds the pool before the search: one ``EvaluatorActor`` per GPU of the
cluster (``num_gpus_per_worker > 0``), or ``num_workers`` actors on CPU, spread over the
nodes. It waits until every actor has loaded its models, and keeps the handles for the
whole search (an actor whose handles are all dropped is destroyed; an actor created inside a
trial would be captured by the trial's placement group). The model's facts come from the
actors' ``ready()`` reports: nothing else loads the model.

``PoolClient`` is the picklable part, and the scoring protocol on the actors
(``score(schedules, seeds) -> results``): it splits the candidates into balanced contiguous
chunks, one per actor, and gathers the results in order.

Actor replacement, the guarantee the search relies on: if an actor dies during a call (its
process is killed, its node is lost), Ray restarts it (``max_restarts``; the restarted
actor loads the model again, from the factory as it is then, and reports
``restarted: True``), and the client sends the lost candidates again, one at a time, to live
actors (``_Scoring``). A send refused because its actor is restarting is sent again and
uses no attempt; a down actor is probed until it answers. Every candidate of a call gets
exactly one result; an actor's death is never a candidate's result, except for a candidate
whose actor died ``max_attempts`` times while it was scored alone (a candidate that kills
its evaluator): that one gets a failed result saying so, and the others are scored. When no
actor answers for ``restart_timeout_s``, the call raises ``EvaluatorsLostError`` (an
infrastructure failure: a search stops without recording the batch, and ``--resume``
scores it). ``resends`` counts the requests lost and sent again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

from searchd.distributed.holders import FactoryHolder, PoolMembership, dumps, loads
from searchd.evaluation.result import CandidateResult

# ``searchd.distributed.actor`` (the evaluator's code: torch) is imported where the pool
# starts actors, not here: a Tune trial unpickles a ``PoolClient`` and so imports this
# module, and its process must stay free of torch (``searchd.distributed.trial``).

# A picklable factory of the actors' evaluators (``searchd.loop.factory.EvaluatorFactory``,
# or any zero-argument callable returning an evaluator).
EvaluatorFactory = Any

logger = logging.getLogger(__name__)


class ActorStartError(RuntimeError):
    """An evaluator actor failed while loading its models (the message is the exception
    that stopped it, on one line)."""


def root_cause(error: BaseException) -> str:
    """The exception at the bottom of a Ray error, as ``Type: message`` on one line (colour
    codes and Ray's wrapping dropped)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)\b.*:", ln)
             and not ln.startswith(("ray.exceptions", "RayTaskError", "ActorDiedError"))]
    if found:
        return found[-1]
    return " ".join(lines)[:500] or type(error).__name__


def split_balanced(n: int, k: int) -> list[tuple[int, int]]:
    """``min(n, k)`` contiguous ``[start, stop)`` ranges covering ``range(n)``, sizes differing
    by at most one (larger ones first)."""
    if n <= 0:
        return []
    k = max(1, min(n, k))
    q, r = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        stop = start + q + (1 if i < r else 0)
        out.append((start, stop))
        start = stop
    return out


def prefix_order(candidates: Sequence[Any]) -> list[int]:
    """Indices of ``candidates`` (schedules, or their dicts) sorted by solver, steps, models
    and then their levels from the top, so that schedules with common leading levels are
    next to each other (a stable sort: equal keys keep their order)."""

    def key(j: int) -> tuple[Any, ...]:
        c = candidates[j]
        get = c.get if isinstance(c, dict) else lambda k, d=None: getattr(c, k, d)
        mids = get("model_ids")
        sig = tuple(float(x) for x in get("sigmas"))
        return (str(get("solver", "")), len(sig), () if mids is None else tuple(mids), sig)

    return sorted(range(len(candidates)), key=key)


class EvaluatorsLostError(RuntimeError):
    """The pool cannot finish a call: none of its actors answered for ``restart_timeout_s``
    (their node is gone, or they are dead for good). An infrastructure failure, never a
    candidate's result: the call's candidates get none, and a search stops so that
    ``--resume`` scores them (the message is one line)."""


# Names of the errors of a Tune trial that come from the infrastructure (an actor, a worker
# process or a node lost), not from its candidates: a batch failed by one is never recorded
# as its candidates' results (``searchd.distributed.tune``).
INFRASTRUCTURE_ERRORS = ("EvaluatorsLostError", "ActorDiedError", "ActorUnavailableError",
                         "RayActorError", "NodeDiedError", "WorkerCrashedError",
                         "OwnerDiedError", "ObjectLostError", "RaySystemError")


def is_infrastructure_error(text: str) -> bool:
    """Whether an error's text (a trial's error, one line or a traceback) names one of
    ``INFRASTRUCTURE_ERRORS``."""
    return any(name in text for name in INFRASTRUCTURE_ERRORS)


def is_refusal(error: BaseException) -> bool:
    """A Ray error saying that the actor was restarting when the request reached it: the
    request never ran, so it is no attempt of its candidates. (A request in flight when its
    actor process dies fails with ``ActorUnavailableError`` too, "Socket closed", or with
    ``ActorDiedError``: that one did run.)"""
    return isinstance(error, ActorUnavailableError) and "is restarting" in str(error)


def candidate_id(candidate: Any) -> str:
    """The id of a candidate given as a ``Schedule`` or as its dict."""
    if isinstance(candidate, dict):
        from searchd.schedule import Schedule

        return Schedule.from_dict(candidate).id
    return str(candidate.id)


@dataclasses.dataclass(frozen=True)
class _Item:
    """Candidates ``[start, stop)`` of a call, sent as one request; ``solo``: a single
    candidate quarantined after its request's actor died (sent alone, to an idle actor that
    has answered in this call)."""

    start: int
    stop: int
    solo: bool = False


@dataclasses.dataclass(frozen=True)
class _Sent:
    """A request in flight: its item, its actor, and whether it is the only request of this
    call on an actor that had answered (a death then counts against its one candidate)."""

    item: _Item
    actor: int
    alone: bool


class _Scoring:
    """One ``PoolClient.score`` call: send the chunks, and re-send what actor deaths lose.

    - The candidates go out as balanced chunks, one per actor (the first to a random one).
    - A request whose actor died while it ran (the process killed, its node lost; Ray
      restarts the actor) marks the actor down. Its candidates come back as solo items:
      each sent alone to an idle actor that has answered in this call, so that a candidate
      that kills its actor is singled out while the others are scored.
    - A request refused because its actor is restarting (``is_refusal``) is sent again
      as it was: no attempt is used.
    - A down actor is probed (``ping``, pauses growing to 1 s) until it answers again.
    - A candidate whose actor died ``max_attempts`` times while it was scored alone gets a
      failed result naming that (a candidate that kills its evaluator); the call goes on.
    - When every actor has been down for ``restart_timeout_s`` with candidates left, the
      call raises ``EvaluatorsLostError``; after ``timeout_s`` in all, ``TimeoutError``.

    Every candidate gets exactly one result (the first that arrives); results do not
    depend on which actor or request computed them.
    """

    def __init__(self, client: PoolClient, candidates: list[Any], seeds: Sequence[int],
                 timeout_s: float | None) -> None:
        self.client = client
        self.candidates = candidates
        self.seeds = list(seeds)
        self.n = len(client._actors)
        self.out: list[CandidateResult | None] = [None] * len(candidates)
        self.queue: list[_Item] = []
        self.pending: dict[ray.ObjectRef, _Sent] = {}
        self.load = [0] * self.n  # this call's requests in flight, per actor
        self.solo_on = [False] * self.n  # a solo item in flight there
        self.answered = [False] * self.n  # answered since it was last seen failing
        self.down: dict[int, float] = {}  # actor -> since when it is down
        self.probes: dict[ray.ObjectRef, int] = {}
        self.probe_at: dict[int, float] = {}
        self.pause: dict[int, float] = {}
        self.deaths: dict[int, int] = {}  # candidate -> deaths while it was scored alone
        self.last_error: dict[int, str] = {}
        self.start = time.monotonic()
        self.deadline = None if timeout_s is None else self.start + timeout_s
        self.timeout_s = timeout_s

    # Sending --------------------------------------------------------------------------------
    def send(self, item: _Item, actor: int) -> None:
        alone = self.load[actor] == 0 and self.answered[actor] and item.stop - item.start == 1
        ref = self.client._actors[actor].evaluate.remote(
            self.candidates[item.start:item.stop], self.seeds)
        self.pending[ref] = _Sent(item, actor, alone)
        self.load[actor] += 1
        self.solo_on[actor] = self.solo_on[actor] or item.solo

    def pick(self, item: _Item, first: int) -> int | None:
        """The actor for ``item``: a solo goes to an idle actor that has answered; the others
        to the least loaded live actor without a solo in flight; None: wait."""
        up = [a for a in range(self.n) if a not in self.down and not self.solo_on[a]]
        if item.solo:
            up = [a for a in up if self.load[a] == 0 and self.answered[a]]
        if not up:
            return None
        return min(up, key=lambda a: (self.load[a], (a - first) % self.n))

    def dispatch(self, first: int) -> None:
        for item in list(self.queue):
            actor = self.pick(item, first)
            if actor is not None:
                self.queue.remove(item)
                self.send(item, actor)

    def mark_down(self, actor: int, error: BaseException) -> None:
        now = time.monotonic()
        self.down.setdefault(actor, now)
        self.answered[actor] = False
        self.probe_at.setdefault(actor, now)
        self.pause.setdefault(actor, 0.05)
        self.last_error[actor] = type(error).__name__

    def mark_up(self, actor: int) -> None:
        self.answered[actor] = True
        self.down.pop(actor, None)
        self.probe_at.pop(actor, None)
        self.pause.pop(actor, None)

    def probe(self) -> None:
        """Ping the down actors whose pause is over (one ping in flight per actor); and,
        while solo items wait, the idle live actors that have not answered yet."""
        now = time.monotonic()
        probing = set(self.probes.values())
        if any(item.solo for item in self.queue):
            for actor in range(self.n):
                if (actor not in self.down and actor not in probing and not self.answered[actor]
                        and self.load[actor] == 0):
                    self.probes[self.client._actors[actor].ping.remote()] = actor
                    probing.add(actor)
        for actor, at in list(self.probe_at.items()):
            if actor not in probing and now >= at:
                self.probes[self.client._actors[actor].ping.remote()] = actor
                self.probe_at[actor] = math.inf  # until this ping answers

    # Results --------------------------------------------------------------------------------
    def on_result(self, ref: ray.ObjectRef) -> None:
        sent = self.pending.pop(ref)
        item, actor = sent.item, sent.actor
        self.load[actor] -= 1
        if item.solo:
            self.solo_on[actor] = False
        try:
            results = ray.get(ref)
        except RayActorError as e:
            self.on_lost(sent, e)
            return
        if len(results) != item.stop - item.start:
            raise RuntimeError(
                f"evaluator {self.client._names[actor]} returned {len(results)} results for "
                f"{item.stop - item.start} candidates")
        self.mark_up(actor)
        for j, r in zip(range(item.start, item.stop), results):
            if self.out[j] is None:
                self.out[j] = r

    def on_lost(self, sent: _Sent, error: RayActorError) -> None:
        """A request whose actor was restarting (sent again as it was) or died while it ran
        (its candidates re-sent one by one; a death while alone counts against the one)."""
        item, actor, names = sent.item, sent.actor, self.client._names
        self.mark_down(actor, error)
        if is_refusal(error):
            self.queue.insert(0, item)
            return
        self.client.resends += 1
        size = item.stop - item.start
        if size > 1 or not sent.alone:
            logger.warning("evaluator %s died while scoring candidates %d..%d (%s); re-sending "
                           "them one at a time", names[actor], item.start, item.stop - 1,
                           type(error).__name__)
            self.queue.extend(_Item(j, j + 1, True) for j in range(item.start, item.stop))
            return
        j = item.start
        self.deaths[j] = self.deaths.get(j, 0) + 1
        if self.deaths[j] < self.client.max_attempts:
            logger.warning("evaluator %s died while scoring candidate %d alone (%s, %d of %d); "
                           "re-sending it", names[actor], j, type(error).__name__,
                           self.deaths[j], self.client.max_attempts)
            self.queue.append(_Item(j, j + 1, True))
            return
        why = (f"its evaluator process died each of the {self.deaths[j]} times it was scored "
               f"alone (last: {type(error).__name__} on {names[actor]}); not retried: this "
               "candidate kills its evaluator (out of memory, a crash)")
        logger.error("candidate %d: %s", j, why)
        n = len(self.seeds)
        self.out[j] = CandidateResult(
            candidate_id=candidate_id(self.candidates[j]), status="failed", metrics={}, nfe=0,
            n_samples=n, seed_base=self.seeds[0] if n else 0, wall_s=0.0, samples_per_s=0.0,
            error=why, worker=names[actor])

    def on_probe(self, ref: ray.ObjectRef) -> None:
        actor = self.probes.pop(ref)
        try:
            ray.get(ref)
        except RayActorError as e:
            self.down.setdefault(actor, time.monotonic())  # also one probed before a solo
            self.answered[actor] = False
            self.last_error[actor] = type(e).__name__
            self.pause[actor] = min(2 * self.pause.get(actor, 0.05), 1.0)
            self.probe_at[actor] = time.monotonic() + self.pause[actor]
            return
        self.mark_up(actor)

    # The call -------------------------------------------------------------------------------
    def lost(self) -> bool:
        """Every actor down, the last of them for ``restart_timeout_s``."""
        if len(self.down) < self.n:
            return False
        return time.monotonic() - max(self.down.values()) > self.client.restart_timeout_s

    def give_up(self, error: Exception) -> Exception:
        for ref in [*self.pending, *self.probes]:
            ray.cancel(ref)
        return error

    def run(self) -> list[CandidateResult]:
        chunks = split_balanced(len(self.candidates), self.n)
        first = random.randrange(self.n)
        for i, (a, b) in enumerate(chunks):
            self.send(_Item(a, b), (first + i) % self.n)
        while self.pending or self.queue:
            self.dispatch(first)
            self.probe()
            now = time.monotonic()
            if self.deadline is not None and now >= self.deadline:
                raise self.give_up(TimeoutError(
                    f"no result from the evaluator pool within {self.timeout_s} s"))
            if self.lost():
                left = sum(r is None for r in self.out)
                why = ", ".join(f"{self.client._names[a]}: {self.last_error.get(a, '?')}"
                                for a in sorted(self.down))
                raise self.give_up(EvaluatorsLostError(
                    f"no evaluator actor answered for {self.client.restart_timeout_s:g} s "
                    f"({why}); {left} of {len(self.out)} candidates of the batch not scored"))
            waits = [t for t in self.probe_at.values() if t != math.inf]
            waits.append(max(self.down.values(), default=now) + self.client.restart_timeout_s)
            if self.deadline is not None:
                waits.append(self.deadline)
            wait_s = max(0.0, min(waits) - now) + 0.001
            refs = [*self.pending, *self.probes]
            if not refs:
                time.sleep(min(wait_s, 1.0))
                continue
            done, _ = ray.wait(refs, num_returns=1, timeout=min(wait_s, 60.0))
            for ref in done:
                if ref in self.probes:
                    self.on_probe(ref)
                else:
                    self.on_result(ref)
        for ref in self.probes:
            ray.cancel(ref)
        return self.out  # type: ignore[return-value]


class PoolClient:
    """Picklable handle on the evaluator actors: split, send, re-send, gather.

    Args:
        actors: handles of the evaluator actors.
        names: their worker names (for messages).
        max_attempts: deaths of its actor while a candidate is scored alone before that
            candidate gets a failed result (1: the first such death).
        restart_timeout_s: how long a call waits for an actor to come back when none is
            left; then ``EvaluatorsLostError``.
        membership: the pool's ``PoolMembership`` actor; when given, every call first picks
            up actors the pool added since (``EvaluatorPool.refresh``).
    """

    def __init__(
        self,
        actors: Sequence[ActorHandle],
        names: Sequence[str],
        max_attempts: int = 3,
        restart_timeout_s: float = 600.0,
        membership: ActorHandle | None = None,
        group_prefixes: bool = False,
    ) -> None:
        if not actors:
            raise ValueError("a pool client needs at least one actor")
        if max_attempts < 1:
            raise ValueError(f"max_attempts = {max_attempts}; it must be >= 1")
        self._actors = list(actors)
        self._names = list(names)
        self.max_attempts = max_attempts
        self.restart_timeout_s = restart_timeout_s
        self.resends = 0  # chunks re-sent after an actor died (this client copy only)
        self._membership = membership
        self._version = 0
        self.group_prefixes = group_prefixes

    def _sync(self) -> None:
        """Pick up the pool's current actors (no-op without a membership actor, or if it
        cannot answer: the known actors still serve)."""
        if self._membership is None:
            return
        try:
            update = ray.get(self._membership.get.remote(self._version), timeout=30)
        except (RayActorError, GetTimeoutError) as e:
            logger.warning("pool membership unavailable (%s); keeping the %d known actors",
                           type(e).__name__, len(self._actors))
            self._membership = None
            return
        if update is not None:
            self._version, actors, names = update
            self._actors, self._names = list(actors), list(names)

    @property
    def num_workers(self) -> int:
        return len(self._actors)

    def score(
        self,
        candidates: Sequence[Any],
        seeds: Sequence[int],
        timeout_s: float | None = None,
    ) -> list[CandidateResult]:
        """Score ``candidates`` on ``seeds`` across the actors; one result per candidate, in
        order (the scoring protocol of ``searchd.loop.scoring``).

        The candidates are split into ``min(len(candidates), num_workers)`` balanced chunks,
        the first going to a random actor (so that many small calls from concurrent trials
        spread over the pool) and the next ones to the following actors. The candidates of
        a chunk whose actor dies are re-sent one at a time (``_Scoring``); errors raised by
        the evaluator itself are not retried and propagate.

        With ``group_prefixes`` (evaluators with a prefix tree) the candidates are sorted by
        their levels first, so that schedules with common leading levels land in the same
        chunk and share those steps; the results come back in the callers' order (and are
        the same: the tree's results are those of each candidate alone).

        Raises:
            EvaluatorsLostError: no actor answered for ``restart_timeout_s`` seconds.
            TimeoutError: the results did not all come within ``timeout_s`` seconds.
        """
        candidates = list(candidates)
        if self.group_prefixes and len(candidates) > 1:
            order = prefix_order(candidates)
            if order != sorted(order):
                ranked = self._score([candidates[j] for j in order], seeds, timeout_s)
                out: list[CandidateResult | None] = [None] * len(candidates)
                for k, j in enumerate(order):
                    out[j] = ranked[k]
                return out  # type: ignore[return-value]
        return self._score(candidates, seeds, timeout_s)

    def _score(self, candidates: list[Any], seeds: Sequence[int], timeout_s: float | None
               ) -> list[CandidateResult]:
        """``score`` in the given order (``_Scoring`` does the sending and re-sending)."""
        self._sync()
        if not candidates:
            return []
        return _Scoring(self, candidates, seeds, timeout_s).run()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(evaluator, *args, **kwargs)`` in one actor (``EvaluatorActor.call``) and
        return its value; re-sent to another actor if that one dies, like ``score``."""
        return self.run_on_one("call", fn, *args, **kwargs)

    def run_on_one(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``actor.<method>(*args, **kwargs)`` on one random actor; re-sent to another live
        actor (or the restarted one, once ready) if it dies, up to ``max_attempts`` deaths
        (a send refused because the actor is restarting uses none).

        Raises:
            RayActorError: the actors died ``max_attempts`` times running it.
            EvaluatorsLostError: no actor came back within ``restart_timeout_s``.
        """
        self._sync()
        actor = random.randrange(len(self._actors))
        died: set[int] = set()
        what = getattr(args[0], "__name__", method) if method == "call" and args else method
        deaths = 0
        while True:
            try:
                return ray.get(getattr(self._actors[actor], method).remote(*args, **kwargs))
            except RayActorError as e:
                died.add(actor)
                if not is_refusal(e):
                    deaths += 1
                    if deaths >= self.max_attempts:
                        raise
                target = self._next_alive(actor, died)
                if target in died:
                    self.wait_ready(target)
                    died.discard(target)
                logger.warning("evaluator %s %s during %s (%s); re-sending it to %s",
                               self._names[actor],
                               "was restarting" if is_refusal(e) else "died", what,
                               type(e).__name__, self._names[target])
                self.resends += 1
                actor = target

    def wait_ready(self, actor: int, timeout_s: float | None = None) -> dict[str, Any]:
        """Wait until actor ``actor`` answers ``ready()`` (after a restart, once it has
        rebuilt its evaluator) and return what it reports.

        A restarting actor refuses calls (``ActorUnavailableError``), so this polls.

        Raises:
            EvaluatorsLostError: it did not come back within ``timeout_s`` (default
                ``restart_timeout_s``), or it is dead for good.
        """
        timeout_s = self.restart_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        pause = 0.05
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EvaluatorsLostError(
                    f"evaluator {self._names[actor]} did not come back within {timeout_s:g} s "
                    f"({last})")
            try:
                return ray.get(self._actors[actor].ready.remote(), timeout=left)
            except RayActorError as e:  # restarting (or dead for good: then until timeout)
                last = type(e).__name__
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(2 * pause, 1.0)
            except GetTimeoutError:
                continue

    def _next_alive(self, actor: int, died: set[int]) -> int:
        """The next actor after ``actor`` not seen dying in this call; else ``actor`` itself
        (to be sent to once Ray has restarted it)."""
        n = len(self._actors)
        for step in range(1, n + 1):
            cand = (actor + step) % n
            if cand not in died:
                return cand
        return actor


class EvaluatorPool:
    """The evaluator actors of a search, created and ready before Tune starts.

    Args:
        factory: picklable zero-argument callable returning the evaluator (built once per
            actor, in the actor).
        num_workers: number of actors. None: one per ``num_gpus_per_worker`` GPUs of the
            cluster when ``num_gpus_per_worker > 0``; else as many as the cluster's CPUs
            allow at ``cpus_per_worker`` each, leaving ``reserve_cpus`` for Tune's trials.
        num_gpus_per_worker: GPUs reserved by each actor (0: CPU actors).
        cpus_per_worker: CPUs reserved by each actor (fractions allowed).
        max_batch, max_wait_s: request merging in each actor (see ``RequestBatcher``).
        max_restarts: restarts Ray grants each actor (-1: unlimited).
        max_attempts: deaths of its actor while a candidate is scored alone before that
            candidate fails (``PoolClient``).
        ready_timeout_s: how long to wait for the actors to load their evaluators.
        reserve_cpus: CPUs left free for trials when ``num_workers`` is derived on CPU.
        name_prefix: worker names are ``f"{name_prefix}-{i}"``.
        elastic: the cluster may grow (an autoscaler): actors that do not fit yet are
            demand it sees, and the pool waits for them (``ready_timeout_s``). False (a
            cluster of fixed size, e.g. the local Ray a search started): ``num_workers``
            actors that cannot fit in the cluster's resources are refused at once
            (``ValueError``, one line) instead of waited for.

    Ray must be initialized. Keep the pool (or a client) alive for the whole search.
    """

    def __init__(
        self,
        factory: EvaluatorFactory,
        num_workers: int | None = None,
        num_gpus_per_worker: float = 0.0,
        cpus_per_worker: float = 1.0,
        *,
        max_batch: int = 4096,
        max_wait_s: float = 0.005,
        max_restarts: int = -1,
        max_attempts: int = 3,
        ready_timeout_s: float = 600.0,
        reserve_cpus: float = 0.1,
        name_prefix: str = "evaluator",
        elastic: bool = True,
    ) -> None:
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers = {num_workers}; it must be >= 1 (or None)")
        if num_gpus_per_worker < 0 or cpus_per_worker < 0:
            raise ValueError("num_gpus_per_worker and cpus_per_worker must be >= 0")
        if not ray.is_initialized():
            raise RuntimeError("EvaluatorPool needs Ray: call ray.init() first")
        # Stored once for the pool's lifetime: every actor (and every restart of one) builds
        # its evaluator from it, which may be large.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        self._factory_name = f"searchd-factory-{uuid.uuid4().hex[:12]}"
        self._factory = FactoryHolder.options(
            name=self._factory_name,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        ).remote()
        ray.get(self._factory.put.remote(dumps(factory)))
        self._fixed = num_workers
        self.num_gpus_per_worker = float(num_gpus_per_worker)
        self.cpus_per_worker = float(cpus_per_worker)
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._max_restarts = max_restarts
        self.max_attempts = max_attempts
        self.ready_timeout_s = ready_timeout_s
        self.reserve_cpus = reserve_cpus
        self.name_prefix = name_prefix
        self._actors: list[ActorHandle] = []
        self._info: list[dict[str, Any]] = []
        n = num_workers if num_workers is not None else self.target_workers()
        if n < 1:
            raise RuntimeError(self._no_room_message())
        if not elastic:
            self.check_room(n)
        self._starting: list[tuple[ActorHandle, str, ray.ObjectRef]] = []
        self._add(n)
        self._membership = PoolMembership.remote(self._actors, self.names)
        self._group = bool(getattr(factory, "evaluator_options", {}).get("prefix_sharing"))
        # An exact FID reference is split over the actors (``exact_reference``); a class_fid
        # one (per-class statistics) is computed whole.
        config = getattr(factory, "config", None)
        self._split_reference = isinstance(config, dict) and (
            config.get("metric") or {}).get("name") != "class_fid"
        self._client = PoolClient(self._actors, self.names, max_attempts,
                                  membership=self._membership, group_prefixes=self._group)

    # Sizing ------------------------------------------------------------------------------
    def target_workers(self) -> int:
        """Actors the cluster has room for now (the ``num_workers=None`` rule)."""
        res = ray.cluster_resources()
        if self.num_gpus_per_worker > 0:
            return int(math.floor(res.get("GPU", 0.0) / self.num_gpus_per_worker + 1e-9))
        cpus = res.get("CPU", 0.0) - self.reserve_cpus
        if self.cpus_per_worker == 0:
            return 1
        return max(0, int(math.floor(cpus / self.cpus_per_worker + 1e-9)))

    def check_room(self, n: int) -> None:
        """Refuse (``ValueError``, one line) ``n`` actors that a cluster of fixed size cannot
        hold: their CPUs (with the trials' reserve) and GPUs against the cluster's total."""
        res = ray.cluster_resources()
        cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
        need_cpu = n * self.cpus_per_worker + self.reserve_cpus
        need_gpu = n * self.num_gpus_per_worker
        if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
            fit = self.target_workers()
            raise ValueError(
                f"workers.num_workers = {n} evaluator actors need {need_cpu:g} CPUs and "
                f"{need_gpu:g} GPUs (with {self.reserve_cpus:g} CPU for the trials); this Ray "
                f"has {cpus:g} CPUs and {gpus:g} GPUs: at most {fit} fit "
                "(or lower workers.cpus_per_worker)"
            )

    def _no_room_message(self) -> str:
        return (
            f"the cluster ({ray.cluster_resources()}) has no room for an evaluator actor of "
            f"{self.num_gpus_per_worker} GPU and {self.cpus_per_worker} CPU; set num_workers "
            "or lower the per-worker resources"
        )

    def _start(self, n: int) -> list[tuple[ActorHandle, str, ray.ObjectRef]]:
        """Create ``n`` more actors; returns (handle, name, ready() ref) for each."""
        from searchd.distributed.actor import EvaluatorActor, FactoryName

        first = len(self._actors) + len(self._starting)
        out = []
        for i in range(n):
            name = f"{self.name_prefix}-{first + i}"
            actor = EvaluatorActor.options(
                num_cpus=self.cpus_per_worker,
                num_gpus=self.num_gpus_per_worker,
                scheduling_strategy="SPREAD",
                max_restarts=self._max_restarts,
                max_task_retries=0,  # the client re-sends lost chunks itself
            ).remote(FactoryName(self._factory_name), name, self._max_batch, self._max_wait_s)
            out.append((actor, name, actor.ready.remote()))
        return out

    def _admit(self, started: Sequence[tuple[ActorHandle, str, ray.ObjectRef]],
               infos: Sequence[dict[str, Any]]) -> None:
        for (actor, _, _), info in zip(started, infos):
            self._actors.append(actor)
            self._info.append(info)
            logger.info("evaluator %s ready on %s (pid %s): model loaded in %.1f s",
                        info["worker"], info["node"], info["pid"], info["load_s"])

    def _add(self, n: int) -> None:
        """Create ``n`` more actors and wait until they have built their evaluators.

        Raises ``ActorStartError`` (one line: the exception that stopped the actor) when an
        actor fails while loading its models, ``RuntimeError`` when they do not start in
        time."""
        started = self._start(n)
        try:
            infos = ray.get([ref for _, _, ref in started], timeout=self.ready_timeout_s)
        except RayActorError as e:
            for actor, _, _ in started:
                ray.kill(actor, no_restart=True)
            raise ActorStartError(root_cause(e)) from None
        except GetTimeoutError as e:
            for actor, _, _ in started:
                ray.kill(actor, no_restart=True)
            raise RuntimeError(
                f"{n} evaluator actor(s) of {self.num_gpus_per_worker} GPU and "
                f"{self.cpus_per_worker} CPU did not start within {self.ready_timeout_s} s; "
                f"cluster resources {ray.cluster_resources()}, available "
                f"{ray.available_resources()}"
            ) from e
        self._admit(started, infos)

    def refresh(self, wait: bool = True) -> int:
        """Grow the pool to what the cluster has room for now (GPU nodes that joined).

        Only a pool sized from the cluster (``num_workers=None``) grows. New actors are
        published to every client, including those already handed to Tune trials, once
        they have built their evaluators. With ``wait=False`` this returns at once and the
        actors still loading are admitted by a later ``refresh`` call (cheap: call it once
        per generation). Returns the number of actors admitted by this call.
        """
        admitted = 0
        if self._starting:
            refs = [ref for _, _, ref in self._starting]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            done = [s for s in self._starting if s[2] in set(ready)]
            if done:
                self._starting = [s for s in self._starting if s not in done]
                self._admit(done, ray.get([ref for _, _, ref in done]))
                admitted += len(done)
        if self._fixed is None:
            extra = self.target_workers() - len(self._actors) - len(self._starting)
            if extra > 0:
                if wait:
                    self._add(extra)
                    admitted += extra
                else:
                    self._starting.extend(self._start(extra))
        if admitted:
            ray.get(self._membership.update.remote(self._actors, self.names))
            self._client = PoolClient(self._actors, self.names, self.max_attempts,
                                      membership=self._membership,
                                      group_prefixes=self._group)
        return admitted

    # Use ---------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Worker names, in actor order."""
        return [i["worker"] for i in self._info]

    @property
    def actors(self) -> list[ActorHandle]:
        """The actor handles, in order."""
        return list(self._actors)

    @property
    def workers(self) -> list[dict[str, Any]]:
        """What each actor reported when it became ready (``EvaluatorActor.ready``)."""
        return [dict(i) for i in self._info]

    @property
    def facts(self) -> dict[str, Any]:
        """The model's facts, as the first actor reported them when it had loaded it."""
        return dict(self._info[0].get("facts") or {})

    def model_loads(self) -> dict[str, int]:
        """Models loaded by each actor, by name: one when it started, and one more for each
        restart seen (an actor now in another process than the one that reported ready)."""
        out = {}
        for actor, info in zip(self._actors, self._info):
            loads = int(info.get("loads", 1))
            try:
                now = ray.get(actor.ready.remote(), timeout=30)
                if now["pid"] != info["pid"]:
                    loads += int(now.get("loads", 1))
            except (RayActorError, GetTimeoutError, ActorUnavailableError):
                pass
            out[info["worker"]] = loads
        return out

    def exact_reference(self, n: int, seed_base: int) -> dict[str, Any]:
        """Reference statistics of ``n`` exact samples on the models the actors loaded.

        A plain FID reference is split over the actors: each draws a contiguous range of the
        seeds and its features (``exact_reference_part``; a part whose actor dies is re-sent
        to another), and the driver joins them in seed order, bit for bit what one actor
        computes (``reference.exact_reference_join``). A ``class_fid`` reference, or a pool
        of one actor: one actor computes it whole (re-sent to another if it dies)."""
        from searchd.evaluation.reference import exact_reference_join, split_batches

        ranges = split_batches(n, seed_base, len(self._actors))
        if len(ranges) < 2 or not self._split_reference:
            return self._client.run_on_one("exact_reference", n, seed_base)
        refs = [a.exact_reference_part.remote(lo, hi) for a, (lo, hi) in
                zip(self._actors, ranges)]
        parts = []
        for ref, (lo, hi) in zip(refs, ranges):
            try:
                parts.append(ray.get(ref))
            except RayActorError:
                parts.append(self._client.run_on_one("exact_reference_part", lo, hi))
        return exact_reference_join(parts, seed_base).to_dict()

    def set_reference(self, reference: Any) -> None:
        """Give every actor the reference statistics (they build their evaluators), and
        keep them in the factory, so that restarted and later actors build with them."""
        factory = loads(ray.get(self._factory.get.remote()))
        if dataclasses.is_dataclass(factory) and hasattr(factory, "reference"):
            ray.get(self._factory.put.remote(
                dumps(dataclasses.replace(factory, reference=reference))))
        ray.get([a.set_reference.remote(reference) for a in self._actors])

    def call_all(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(evaluator, *args)`` on every actor, results in actor order."""
        return ray.get([a.call.remote(fn, *args) for a in self._actors])

    def call_each(self, jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]
                  ) -> list[Any]:
        """``fn(evaluator, *args)`` for each job, one job per actor at a time, side by side;
        a job whose actor died is re-sent through ``call`` (which waits for a live actor)."""
        refs = [self._actors[i % len(self._actors)].call.remote(fn, *args)
                for i, (fn, args) in enumerate(jobs)]
        out = []
        for ref, (fn, args) in zip(refs, jobs):
            try:
                out.append(ray.get(ref))
            except RayActorError:
                out.append(self.call(fn, *args))
        return out

    def __len__(self) -> int:
        return len(self._actors)

    def client(self) -> PoolClient:
        """The picklable client over the current actors (hand it to Tune trials)."""
        return self._client

    def score(
        self, candidates: Sequence[Any], seeds: Sequence[int], timeout_s: float | None = None
    ) -> list[CandidateResult]:
        """``PoolClient.score`` from the driver."""
        return self._client.score(candidates, seeds, timeout_s)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``PoolClient.call``: ``fn(evaluator, *args, **kwargs)`` in one actor."""
        return self._client.call(fn, *args, **kwargs)

    def stats(self) -> list[dict[str, Any]]:
        """Each actor's batching counters (``BatcherStats`` as dicts)."""
        return ray.get([a.stats.remote() for a in self._actors])

    def shutdown(self) -> None:
        """Kill the actors (no restart)."""
        for a in [*self._actors, *(s[0] for s in self._starting)]:
            ray.kill(a, no_restart=True)
        if getattr(self, "_membership", None) is not None:
            ray.kill(self._membership, no_restart=True)
            self._membership = None
        if getattr(self, "_factory", None) is not None:
            ray.kill(self._factory, no_restart=True)
            self._factory = None
        self._actors.clear()
        self._info.clear()
        self._starting.clear()

    def __enter__(self) -> EvaluatorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
