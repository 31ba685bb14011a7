"""Dynamic batching for a model replica: a batch starts as soon as the model is free.

`serve.batch` (Ray Serve 2.60) collects a batch for up to `batch_wait_timeout_s` after
its first request, then hands it on and at once starts collecting the next one, even
while the model is still busy with the previous batch. A lone request therefore always
waits the whole timeout, and with a timeout of 0 every request becomes a batch of one
queued behind the others. For a model that computes one batch at a time (a classifier
on its own cores) the better rule is the one Triton and TorchServe use: while the
model computes, requests queue; when it is free, the next batch is everything queued
(up to `max_batch_size`). Nobody waits on an idle model, and batches grow with the
load by themselves.

`wait_timeout_s` > 0 adds a short wait for a batch to fill when fewer than
`max_batch_size` requests are queued: it trades a lone request's latency for larger
batches, which only pays when a larger batch costs little more than a small one (a
GPU). Calls cancelled while queued (deadline, client gone) are dropped before the
batch runs; a failing batch fails each of its calls with the same exception.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any, Callable, Optional, Sequence


class GreedyBatcher:
    """`await batcher.submit(item)` -> `fn(batch)[i]` for that item, where `fn` takes a
    list of items and returns one result per item (it runs in a worker thread, one
    batch at a time)."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch_size: int = 32,
                 wait_timeout_s: float = 0.0,
                 on_batch: Optional[Callable[[int], None]] = None):
        self._fn = fn
        self._on_batch = on_batch
        self._queue: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self._arrived: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        self.max_batch_size = 1
        self.wait_timeout_s = 0.0
        self.configure(max_batch_size, wait_timeout_s)

    def configure(self, max_batch_size: int, wait_timeout_s: float) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if wait_timeout_s < 0:
            raise ValueError(f"wait_timeout_s must be >= 0, got {wait_timeout_s}")
        self.max_batch_size, self.wait_timeout_s = max_batch_size, wait_timeout_s

    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done():
            self._arrived = asyncio.Event()
            self._loop_task = loop.create_task(self._run())
        future = loop.create_future()
        self._queue.append((item, future))
        self._arrived.set()
        return await future

    async def _fill(self) -> None:
        """Wait up to wait_timeout_s for the queue to hold a full batch."""
        deadline = time.monotonic() + self.wait_timeout_s
        while len(self._queue) < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future = self._queue.popleft()
            if not future.done():  # cancelled while queued: drop it
                batch.append((item, future))
        return batch

    async def _run(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if self.wait_timeout_s > 0:
                await self._fill()
            batch = self._take()
            if not batch:
                continue
            if self._on_batch is not None:
                self._on_batch(len(batch))
            try:
                results = await asyncio.to_thread(self._fn, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results "
                                       f"for {len(batch)} items")
            except Exception as exc:  # every call of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
