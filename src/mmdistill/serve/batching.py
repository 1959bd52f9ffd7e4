"""Dynamic micro-batching of concurrent requests, and an LRU result cache.

A request submits a *job* (its list of items: texts to embed, pairs to score). One worker task per
queue waits for the first job, then keeps collecting jobs for up to ``max_wait_s`` or until
``max_batch`` items are gathered, runs the model once on all their items in a worker thread, and
hands every job its slice of the results. ``max_batch=1`` / ``max_wait_s=0`` turns batching off:
every request is then one model call of its own items (one request at a time).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from concurrent.futures import Executor
from typing import Any, Callable, Hashable, Sequence


class LRUCache:
    """A bounded mapping that forgets the least recently used entry first (size 0: caches nothing)."""

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._items: OrderedDict = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        if self.max_items <= 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class MicroBatcher:
    """Collects jobs from concurrent requests into one model call.

    ``fn(items) -> results`` (same length) runs in ``executor`` (one thread: model calls never overlap).
    ``on_batch(n_items)`` is called for every model call (metrics).
    """

    def __init__(self, fn: Callable[[list], Sequence], executor: Executor, *, max_batch: int = 32, max_wait_s: float = 0.005, on_batch: Callable[[int], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.fn = fn
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, items: list) -> list:
        """Results of `items`, in order (the model call may include other requests' items)."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._worker())
        fut = loop.create_future()
        self._queue.put_nowait((items, fut))
        return await fut

    async def _collect(self) -> list[tuple[list, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        jobs = [await self._queue.get()]
        n = len(jobs[0][0])
        deadline = loop.time() + self.max_wait_s
        while n < self.max_batch:
            timeout = deadline - loop.time()
            try:
                job = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            jobs.append(job)
            n += len(job[0])
        return jobs

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            items = [it for job, _ in jobs for it in job]
            if self.on_batch is not None:
                self.on_batch(len(items))
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
            except Exception as e:  # the model call failed: every job in it gets the error, the worker goes on
                for _, fut in jobs:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            i = 0
            for job, fut in jobs:
                if not fut.done():  # a request that timed out has cancelled its future
                    fut.set_result(list(results[i : i + len(job)]))
                i += len(job)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
