"""``RayEngine``: what ``searchd.search`` runs a search on by default.

- ``check_address``: a Ray address (``--address``, ``$RAY_ADDRESS``) is checked before
  anything starts, with a timeout: a TCP connection to its host and port. Nothing listening
  is one line, not a hang.
- ``start``: starts a local Ray (``num_cpus`` = the machine's) or joins the cluster at the
  address, with Ray's token-auth banner kept off the console (and, when quiet: no ``say``,
  Ray's "A worker died ..." messages sent to the log, ``raylog``); builds the evaluator pool
  (``PoolWorkers``: the ``Workers`` protocol on the actors). A local Ray has a fixed size, so
  ``workers.num_workers`` actors that cannot fit are refused at once; on a cluster they are
  demand the autoscaler sees.
- ``drive``: the search loop under Ray Tune (``run_tune``), the pool grown between batches,
  the fault hooks of ``SEARCHD_FAULT`` watched in a thread when set. The first batch is
  sent to the evaluators by the driver as soon as Tune asks for it (``prefetch_first``),
  not once the first trial's process has started (1.5-3 s on 2 cores).
- ``close``: the actors and, if it started one, Ray itself.

Start-up is overlapped where the driver only waits: once Ray is up, Ray Tune (``ray.tune``
and ``searchd.distributed.tune``, 0.5-1 s of imports) is imported in a thread while the
actors load and the reference is computed, not after them.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from searchd.distributed.pool import ActorStartError, EvaluatorPool, EvaluatorsLostError
from searchd.evaluation import CandidateResult
from searchd.loop.factory import EvaluatorFactory
from searchd.loop.hooks import FaultHooks
from searchd.loop.loop import SearchLoop
from searchd.loop.runs import BadInput
from searchd.schedule import Schedule

logger = logging.getLogger("searchd")

T = TypeVar("T")

# Seconds a Ray address may take to accept a TCP connection before it is refused.
ADDRESS_TIMEOUT_S = 10.0
# Ray's loggers quieted while Ray starts: the token-auth banner (a warning on every start).
RAY_START_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


# The local Ray's settings: its workers (the evaluator actors, which do all of a search's
# compute) run at the priority of the command, not niced by 15 more (Ray's default, which on
# a shared machine hands most of their CPU to any other niced work: measured, the quickstart's
# actors got about half the cores beside five nice-19 jobs). ``nice python -m searchd.search``
# still nices them all.
LOCAL_RAY_CONFIG = {"worker_niceness": 0}


# What ``drive`` imports (Ray Tune), imported in a thread during the start (``start``).
TUNE_MODULES = ("searchd.distributed.tune",)


def import_in_thread(names: Sequence[str]) -> threading.Thread:
    """Import ``names`` in a daemon thread (the driver waits on Ray meanwhile); an error is
    left for the real import to raise."""
    import importlib

    def run() -> None:
        try:
            for name in names:
                importlib.import_module(name)
        except Exception:  # only a warm-up: the real import reports its own errors
            pass

    t = threading.Thread(target=run, name="searchd-import-tune", daemon=True)
    t.start()
    return t


def run_tune(*args: Any, **kwargs: Any) -> Any:
    """``searchd.distributed.tune.run_tune``, imported on first use: Ray Tune's import is
    kept off this module's (``import_in_thread`` does it while the actors start)."""
    from searchd.distributed.tune import run_tune as run

    return run(*args, **kwargs)


class RayAddressError(BadInput):
    """A Ray address that nothing answers at (one line)."""


class ModelLoadError(RuntimeError):
    """The evaluators could not load the model (one line: the model and the cause)."""


def _label(factory: Any) -> str:
    from searchd.config import validate_config
    from searchd.loop.factory import model_label

    try:
        return model_label(validate_config(factory.config))
    except Exception:  # a factory of another kind: no label
        return "the evaluator"


def check_address(address: str | None, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Refuse a Ray address whose host and port accept no TCP connection within
    ``timeout_s`` (``RayAddressError``). ``None`` and ``"auto"``/``"local"`` are not
    checked here (Ray finds, or starts, the cluster itself)."""
    if address is None or address in ("auto", "local"):
        return
    text = address if "://" in address else f"ray://{address}"
    parts = urlsplit(text)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise RayAddressError(f"Ray address {address!r} is not host:port (e.g. 127.0.0.1:6379, "
                              "or leave --address out for a local Ray)")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise RayAddressError(
            f"Ray address {address!r}: nothing answers at {host}:{port} ({why} within "
            f"{timeout_s:g} s); start a head with `ray start --head`, or leave --address "
            "out for a local Ray"
        ) from None


class PoolWorkers:
    """The ``Workers`` protocol (``searchd.loop.scoring``) on an ``EvaluatorPool``."""

    def __init__(self, pool: EvaluatorPool) -> None:
        self.pool = pool
        self.facts: dict[str, Any] = pool.facts

    @property
    def client(self) -> Any:
        """The picklable scorer the Tune trials use (``PoolClient``)."""
        return self.pool.client()

    @property
    def names(self) -> list[str]:
        return self.pool.names

    @property
    def nodes(self) -> list[str]:
        return sorted({i["node"] for i in self.pool.workers})

    @property
    def model_loads(self) -> dict[str, int]:
        return self.pool.model_loads()

    def score(self, schedules: Sequence[Schedule], seeds: Sequence[int]
              ) -> list[CandidateResult]:
        return self.pool.score(schedules, seeds)

    def exact_reference(self, n: int, seed_base: int) -> dict[str, Any]:
        return self.pool.exact_reference(n, seed_base)

    def set_reference(self, reference: Mapping[str, Any]) -> None:
        self.pool.set_reference(reference)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return self.pool.call(fn, *args)

    def call_each(self, jobs: Sequence[tuple[Callable[..., Any], tuple[Any, ...]]]
                  ) -> list[Any]:
        return self.pool.call_each(jobs)

    def call_all(self, fn: Callable[..., T], *args: Any) -> list[T]:
        return self.pool.call_all(fn, *args)

    def calls_started(self) -> int:
        """Evaluator calls started so far, over all actors (the fault hooks' counter)."""
        return sum(int(st["calls"]) for st in self.pool.stats())

    def grow(self) -> list[str]:
        """Between batches: start actors for capacity that joined (GPU nodes the autoscaler
        added) and admit those that have loaded; never waits, never stops the search."""
        before = set(self.pool.names)
        try:
            self.pool.refresh(wait=False)
        except Exception as e:  # an actor that died while loading: the others serve
            logger.warning("evaluator pool refresh failed: %s: %s", type(e).__name__, e)
            return []
        return [n for n in self.pool.names if n not in before]

    def shutdown(self) -> None:
        self.pool.shutdown()


class RayEngine:
    """Runs a search on Ray: a local Ray, or the cluster at ``address``.

    Args:
        address: a Ray address; None: ``$RAY_ADDRESS``, else a local Ray.
        say: where "starting Ray ..." goes (None: the log only).
    """

    name = "ray"

    def __init__(self, address: str | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.say = say
        self.started_ray = False
        self.workers: PoolWorkers | None = None

    def check(self) -> None:
        """The checks that need no Ray: the address answers (``RayAddressError``)."""
        check_address(self.address)

    def _start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
        if self.say is not None:
            self.say(f"searchd: starting {where} ...")
        logger.info("starting %s", where)
        t0 = time.monotonic()
        saved = {n: logging.getLogger(n).level for n in RAY_START_LOGGERS}
        for n in RAY_START_LOGGERS:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                         configure_logging=False, _system_config=LOCAL_RAY_CONFIG)
                self.started_ray = True
        finally:
            for n, level in saved.items():
                logging.getLogger(n).setLevel(level)
        if self.say is None:  # quiet: Ray's "A worker died ..." messages go to the log
            from searchd.distributed import raylog

            raylog.route_to_log()
        logger.info("Ray ready in %.1f s", time.monotonic() - t0)

    def start(self, factory: EvaluatorFactory, workers_config: Any) -> PoolWorkers:
        """Start (or join) Ray and the evaluator pool; the actors load the models once."""
        self.check()
        self._start_ray()
        self._tune_import = import_in_thread(TUNE_MODULES)
        w = workers_config
        if self.say is not None:
            self.say("searchd: starting evaluator actors ...")
        try:
            pool = EvaluatorPool(
                factory, num_workers=w.num_workers, num_gpus_per_worker=w.num_gpus_per_worker,
                cpus_per_worker=w.cpus_per_worker, elastic=not self.started_ray,
            )
        except ActorStartError as e:
            raise ModelLoadError(f"cannot load the model ({_label(factory)}): {e}") from None
        except ValueError as e:  # the workers do not fit this Ray
            raise BadInput(str(e)) from None
        self.workers = PoolWorkers(pool)
        return self.workers

    def drive(self, loop: SearchLoop, workers: PoolWorkers, *, name: str,
              between: Callable[[], Any] | None = None) -> bool:
        """Run the loop under Ray Tune (``between`` after each batch is recorded: the pool's
        growth); True when its searcher finished.

        Raises ``EvaluatorsLostError`` (one line) when a batch failed because the
        evaluators were lost: that batch is not recorded, what is stored stays, and a resume
        scores it."""
        hooks = None
        if FaultHooks.wanted():
            hooks = FaultHooks(counter=workers.calls_started)
            loop.observers = [*loop.observers, hooks]
        stop = threading.Event()
        if hooks is not None and hooks.mid is not None:
            threading.Thread(target=hooks.watch, args=(lambda: not stop.is_set(),),
                             name="searchd-fault-watch", daemon=True).start()
        scratch = tempfile.mkdtemp(prefix="searchd-tune-")
        try:
            outcome = run_tune(loop, loop.scorer_for(workers.client), storage_path=scratch,
                               name=name,
                               between=between or workers.grow, prefetch_first=True)
        finally:
            stop.set()
            shutil.rmtree(scratch, ignore_errors=True)
        if outcome.lost is not None:
            raise EvaluatorsLostError(
                f"search stopped, the evaluators were lost ({outcome.lost}); the batch in "
                "flight is not recorded, what is stored is kept: resume with python -m "
                "searchd.search --resume RUN_DIR")
        return outcome.finished

    def close(self) -> None:
        """Stop the actors, and Ray if this engine started it."""
        if self.workers is not None:
            try:
                self.workers.shutdown()
            finally:
                self.workers = None
        if self.say is None:
            from searchd.distributed import raylog

            raylog.restore()
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False
