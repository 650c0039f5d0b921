"""An asyncio batcher that merges requests arriving together into one call (no Ray here).

An evaluator actor receives ``evaluate(candidates, seeds)`` requests from many Tune trials at
once. Scoring them one request at a time wastes the population batching of the evaluator:
one call over 64 candidates costs far less than 64 calls over one. ``RequestBatcher`` sits
between the actor's async methods and the (blocking) evaluator:

- a request is a list of items and a key (the seeds); only requests with equal keys merge;
- a single worker coroutine takes the oldest waiting request, waits at most ``max_wait_s``
  after its arrival for more requests with the same key (or until ``max_batch`` items are
  waiting), concatenates them in arrival order and runs one blocking call in a worker
  thread, so the event loop keeps accepting requests meanwhile;
- requests that arrive while a call runs are merged into the next call without any extra
  wait (their oldest member has waited longer than ``max_wait_s`` already);
- the call's output (one entry per item) is split back to the requests; an exception of
  the call is raised in every request of that call.

Calls run one at a time, in arrival order of their oldest request, on one thread: the
evaluator needs no locking, and a GPU is never shared by two calls of one actor.
``@serve.batch`` does the same for Ray Serve deployments but does not work in a plain
actor, hence this class.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

# ``fn(items, key_value) -> outputs``: one output per item, in order.
BatchFn = Callable[[list[Any], Any], Sequence[Any]]


@dataclass
class _Request:
    items: list[Any]
    key: Hashable
    key_value: Any
    future: asyncio.Future[list[Any]]
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatcherStats:
    """Counters of a batcher, for tests and the benchmark.

    Attributes:
        requests: requests received.
        items: items received.
        calls: blocking calls made.
        max_items_per_call: largest merged call.
        max_requests_per_call: most requests merged into one call.
        in_flight: items of the call running now (0 when idle).
        busy_s: total seconds spent inside calls.
    """

    requests: int = 0
    items: int = 0
    calls: int = 0
    max_items_per_call: int = 0
    max_requests_per_call: int = 0
    in_flight: int = 0
    busy_s: float = 0.0


class RequestBatcher:
    """Merge requests with equal keys into one blocking call, run in a worker thread.

    Args:
        fn: ``fn(items, key_value) -> outputs`` with ``len(outputs) == len(items)``;
            blocking, called from a worker thread, one call at a time.
        max_batch: items above which no further request is merged into a call (a single
            request larger than this still runs whole).
        max_wait_s: longest wait, counted from the arrival of a call's oldest request, for
            more requests to merge.

    Use from inside a running event loop (an async Ray actor's methods): ``await
    batcher.submit(items, key, key_value)``.
    """

    def __init__(self, fn: BatchFn, max_batch: int = 4096, max_wait_s: float = 0.005) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch = {max_batch}; it must be >= 1")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s = {max_wait_s}; it must be >= 0")
        self._fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: list[_Request] = []
        self._arrival: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")
        self.stats = BatcherStats()

    async def submit(self, items: Sequence[Any], key: Hashable, key_value: Any = None) -> list[Any]:
        """Queue ``items`` under ``key`` and wait for their outputs (one per item, in order).

        ``key_value`` is what ``fn`` receives for the key (default: the key itself).
        """
        loop = asyncio.get_running_loop()
        if self._arrival is None:
            self._arrival = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._serve())
        items = list(items)
        if not items:
            return []
        request = _Request(items, key, key if key_value is None else key_value,
                           loop.create_future())
        self._queue.append(request)
        self.stats.requests += 1
        self.stats.items += len(items)
        self._arrival.set()
        return await request.future

    def _waiting_items(self, key: Hashable) -> int:
        return sum(len(r.items) for r in self._queue if r.key == key)

    def _take(self, key: Hashable) -> list[_Request]:
        """Remove and return the requests of ``key`` that fit in one call (at least one)."""
        taken: list[_Request] = []
        n = 0
        for r in list(self._queue):
            if r.key != key:
                continue
            if taken and n + len(r.items) > self.max_batch:
                break
            taken.append(r)
            n += len(r.items)
            self._queue.remove(r)
        return taken

    async def _serve(self) -> None:
        """The worker: gather a call's requests, run it in the thread, hand out outputs."""
        assert self._arrival is not None
        loop = asyncio.get_running_loop()
        while True:
            # Wait for work.
            while not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
            head = self._queue[0]
            # Gather more requests of the same key until max_batch or max_wait_s.
            while self._waiting_items(head.key) < self.max_batch:
                remaining = head.arrived + self.max_wait_s - time.monotonic()
                if remaining <= 0:
                    break
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [r for r in self._take(head.key) if not r.future.cancelled()]
            if not batch:
                continue
            items = [x for r in batch for x in r.items]
            self.stats.calls += 1
            self.stats.in_flight = len(items)
            self.stats.max_items_per_call = max(self.stats.max_items_per_call, len(items))
            self.stats.max_requests_per_call = max(self.stats.max_requests_per_call, len(batch))
            t0 = time.monotonic()
            # Run the blocking call off the event loop.
            try:
                outputs = list(
                    await loop.run_in_executor(self._executor, self._fn, items, head.key_value)
                )
                if len(outputs) != len(items):
                    raise RuntimeError(
                        f"batched call returned {len(outputs)} outputs for {len(items)} items"
                    )
            except Exception as e:  # handed to every request of the call
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)
            else:
                start = 0
                for r in batch:
                    if not r.future.done():
                        r.future.set_result(outputs[start : start + len(r.items)])
                    start += len(r.items)
            finally:
                self.stats.in_flight = 0
                self.stats.busy_s += time.monotonic() - t0

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run a blocking ``fn()`` on the batcher's thread, between batched calls (so it
        never runs concurrently with one), and return its value."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    def close(self) -> None:
        """Stop the worker coroutine and the thread (pending requests are cancelled)."""
        if self._worker is not None:
            self._worker.cancel()
        for r in self._queue:
            if not r.future.done():
                r.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=False)
