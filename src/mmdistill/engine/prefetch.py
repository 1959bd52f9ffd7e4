"""Batches prepared ahead, in order, in one background thread while the current step computes.

A step module may split its forward in two: ``prepare(indices, progress)`` does the CPU-side work of a
micro-batch (read records, decode images and clips, tokenise, read stored teacher signals) and returns
tensors on the CPU; ``forward(prepared, progress)`` moves them to the device and runs the models. The
loop then hands ``prepare`` to a :class:`Prefetcher` that works `depth` micro-batches ahead.

Why a thread and not DataLoader worker processes: the step modules hold the models (a fork after torch's
OpenMP pool started can deadlock, a spawn would pickle them), and much of the preparing — image decoding
(PIL), tokenisers (Rust), numpy and torch ops, memory-mapped reads — runs outside the GIL, so it overlaps with
the step's own torch compute. Not all of it: a processor's Python (chat templates, image-processor glue)
holds the GIL, and next to a Python-bound step (tiny models on the CPU) prefetching is then slower, which is
why ``train.prefetch`` is off by default (benchmarks/prefetch.py). One thread also keeps the
order: batch ``i`` is the i-th prepared, so the data a step sees is the same with or without prefetching,
and an error in a record surfaces in the main thread as the same one-line error, at the step that reads it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator


class Prefetcher:
    """Calls ``fn(*args)`` for each item of `items` in a background thread, at most `depth` results ahead;
    ``next()`` returns them in order (or raises, in the caller's thread, what `fn` raised)."""

    _DONE = object()

    def __init__(self, fn: Callable[..., Any], items: Iterable[tuple], depth: int, *, name: str = "mmdistill-prefetch"):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._fn, self._items = fn, iter(items)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for args in self._items:
                if self._stop.is_set() or not self._put((True, self._fn(*args))):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put((False, e))
            return
        self._put((True, self._DONE))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                ok, value = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread stopped without a result") from None
        if not ok:
            raise value
        if value is self._DONE:
            raise StopIteration
        return value

    def close(self) -> None:
        """Stop the thread (it finishes the item it is preparing) and drop what it prepared."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
