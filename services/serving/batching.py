"""Batching for the model replicas and the ingress (docs/design.md, "Batching").

`GreedyBatcher`: a replica's requests queue while the model computes; when it is free,
the next batch is everything queued (up to `max_batch_size`), after a bounded wait for
the callers of the batch that just ended, or with `wait_timeout_s` > 0 for a batch to
fill. Batches run one at a time on the batcher's own thread; with `early_results`, a
batch's callers are answered as their results come, before the batch ends.
`Coalescer`: the ingress's concurrent requests to one model, sent as few calls. Calls
cancelled while queued are dropped; a failing batch fails each of its calls with the
same exception.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import time
from typing import Any, Callable, Optional, Sequence

from services.core import metrics
from services.serving.waiting import wait_event

RETURN_WAIT_SHARE = 0.25
"""The longest wait for a batch's callers to come back, as a share of its compute time."""
RETURN_WAIT_MAX_S = 0.05
"""... and in seconds."""
RETURN_WAIT_MAX_SKIPS = 16
"""After a wait that ran out, the next 1, 2, 4, ... up to this many batches do not wait."""
LONE_WAIT_SHARE = 0.25
"""With a fill wait, a lone request waits this share of it for a second request..."""
LONE_FULL_WAITS = 4
"""... or all of it, after a burst split, until this many such waits in a row caught
nobody."""


def observe_batch(model: str, versions: Sequence[str]) -> None:
    """Record a batch's size as `tuneserve_batch_size`, once per model version in it
    (each version runs its own forward pass): `versions` holds each request's."""
    for version, size in collections.Counter(versions).items():
        metrics.observe("tuneserve_batch_size", size, model=model, version=version)


class GreedyBatcher:
    """`await batcher.submit(item)` -> `fn(batch)[i]` for that item, where `fn` takes a
    list of items and returns one result per item (it runs in the batcher's own thread,
    one batch at a time). `return_wait_share` 0 turns the wait for returning callers off.
    `on_batch(n)` is told each batch's size and `on_wait(seconds)` how long it waited
    for more requests (0: not at all).

    With `early_results`, `fn(items, deliver)` may call `deliver(i, result)` (from its
    thread) as soon as item i's result is known: its caller is answered then, while
    the batch goes on. A classifier's batch runs as several forward passes, so the
    callers of its first passes come back while its last ones compute, and the next
    batch starts full without the model idling for the whole batch's callers
    (docs/design.md, "Batching")."""

    def __init__(self, fn: Callable[..., Sequence[Any]], max_batch_size: int = 32,
                 wait_timeout_s: float = 0.0,
                 on_batch: Optional[Callable[[int], None]] = None,
                 on_wait: Optional[Callable[[float], None]] = None,
                 return_wait_share: float = RETURN_WAIT_SHARE,
                 return_wait_max_s: float = RETURN_WAIT_MAX_S,
                 early_results: bool = False):
        if return_wait_share < 0 or return_wait_max_s < 0:
            raise ValueError("return_wait_share and return_wait_max_s must be >= 0")
        self._fn = fn
        self._early_results = early_results
        self._arrivals = 0  # requests submitted since the start
        self._on_batch = on_batch
        self._on_wait = on_wait
        # (item, its caller's future, when it arrived), oldest first
        self._queue: collections.deque[tuple[Any, asyncio.Future, float]] = \
            collections.deque()
        self._arrived: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        # Every batch runs on this one thread. From a pool, consecutive batches land on
        # whichever worker wakes first, which costs CPU (caches, docs/benchmarks.md), and
        # with several torch threads each calling thread would keep an OpenMP team of its own.
        # (No thread starts before the first batch.)
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tuneserve-batch")
        # The last batch: its callers not yet back when it ended (those answered early
        # and back already are queued), its compute time, when it ended, and how many
        # calls were queued then.
        self._last: tuple[int, float, float, int] = (0, 0.0, 0.0, 0)
        self.return_wait_share, self.return_wait_max_s = return_wait_share, return_wait_max_s
        self._backoff = self._skip_waits = 0
        # The fill wait's share a lone request waits, the full lone waits in a row that
        # caught nobody, and the arrival of a lone request computing on its own after
        # a short wait (None: none is).
        self._lone_share, self._lone_vain = LONE_WAIT_SHARE, 0
        self._cut_short: Optional[float] = None
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
        now = time.monotonic()
        self._arrivals += 1
        self._queue.append((item, future, now))
        if self._cut_short is not None and now - self._cut_short <= self.wait_timeout_s:
            # it would have joined that lone request with the whole wait: a burst split
            self._lone_share, self._lone_vain, self._cut_short = 1.0, 0, None
        self._arrived.set()
        return await future

    async def _fill(self, size: int, deadline: float) -> None:
        """Wait until the queue holds `size` calls, or until `deadline` (monotonic)."""
        while len(self._queue) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            if not await wait_event(self._arrived, left):
                return

    async def _await_returning(self) -> float:
        """Wait for the last batch's callers to come back (see the module docstring);
        the seconds waited."""
        size, took, ended, queued = self._last
        target = min(self.max_batch_size, queued + size)
        deadline = ended + min(self.return_wait_max_s, self.return_wait_share * took)
        if len(self._queue) >= target or time.monotonic() >= deadline:
            return 0.0
        if self._skip_waits > 0:  # recent waits ran out: callers did not come back
            self._skip_waits -= 1
            return 0.0
        started = time.monotonic()
        await self._fill(target, deadline)
        waited = time.monotonic() - started
        if len(self._queue) >= target:
            self._backoff = 0
        else:
            self._backoff = min(RETURN_WAIT_MAX_SKIPS, max(1, 2 * self._backoff))
            self._skip_waits = self._backoff
        return waited

    async def _await_filling(self) -> float:
        """Wait for a batch to fill (wait_timeout_s > 0; see the module docstring);
        the seconds waited."""
        if len(self._queue) >= self.max_batch_size:
            return 0.0
        oldest, started = self._queue[0][2], time.monotonic()
        deadline = oldest + self.wait_timeout_s
        if len(self._queue) == 1:  # a lone request: is anybody coming?
            share = self._lone_share
            await self._fill(2, min(deadline, oldest + share * self.wait_timeout_s))
            if len(self._queue) < 2:  # nobody came
                if share < 1.0:
                    self._cut_short = oldest
                else:
                    self._lone_vain += 1
                    if self._lone_vain >= LONE_FULL_WAITS:
                        self._lone_share, self._lone_vain = LONE_WAIT_SHARE, 0
                return time.monotonic() - started
            self._lone_vain = 0
        await self._fill(self.max_batch_size, deadline)
        return time.monotonic() - started

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            item, future, _ = self._queue.popleft()
            if not future.done():  # cancelled while queued: drop it
                batch.append((item, future))
        return batch

    async def _run(self) -> None:
        while True:
            self._cut_short = None  # the lone batch, if any, has ended
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if self.wait_timeout_s > 0:
                waited = await self._await_filling()
            else:
                waited = await self._await_returning()
            batch = self._take()
            if not batch:
                continue
            if self._on_batch is not None:
                self._on_batch(len(batch))
            if self._on_wait is not None:
                self._on_wait(waited)
            started, arrivals = time.monotonic(), self._arrivals
            loop = asyncio.get_running_loop()
            args: tuple = ([item for item, _ in batch],)
            early = [0]  # callers answered before the batch ended
            if self._early_results:

                def settle(future: asyncio.Future, result: Any) -> None:
                    if not future.done():
                        future.set_result(result)
                        early[0] += 1

                def deliver(i: int, result: Any) -> None:  # the batch's thread
                    loop.call_soon_threadsafe(settle, batch[i][1], result)

                args += (deliver,)
            try:
                results = await loop.run_in_executor(  # as to_thread
                    self._thread, contextvars.copy_context().run, self._fn, *args)
                if len(results) != len(batch):
                    raise RuntimeError(f"batch function returned {len(results)} results "
                                       f"for {len(batch)} items")
            except Exception as exc:  # every call of the batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                # Early answers were scheduled before the batch's end, so they are
                # settled by now; of those callers, at most the calls that arrived
                # meanwhile are back (queued).
                ended = time.monotonic()
                back = min(early[0], self._arrivals - arrivals)
                self._last = (len(batch) - back, ended - started, ended, len(self._queue))
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


class Coalescer:
    """Requests from many callers to one deployment, sent as few calls (the ingress's
    side of batching).

    Every call through Ray Serve costs CPU in the caller and the replica whatever it
    carries, more than the model itself spends on a short text. So the ingress keeps at
    most `max_calls` calls in flight per model, carrying at most `max_items` requests in
    all; a request that arrives while those are used up waits here, and when a call
    returns, everything waiting (up to `max_call_items`) goes in the next one. A lone
    request is sent at once; under load each call carries about what the replica
    batches next.

    `send(items)` returns one result per item, where a result that is an exception is
    raised to that item's caller; if `send` raises, every item's caller gets it. More
    than `max_pending` waiting requests (-1: no bound): `on_full()` is raised instead
    of queueing without bound. `on_call(n)` is told the size of each call sent;
    `calls_sent` / `requests_sent` count them since the start. A caller cancelled
    while waiting is dropped; one cancelled after its call was sent does not cancel
    the others' call.
    """

    def __init__(self, send: Callable[[list[Any]], Any], *, max_calls: int,
                 max_items: int, max_call_items: int, max_pending: int,
                 on_full: Callable[[], Exception],
                 on_call: Optional[Callable[[int], None]] = None):
        if min(max_calls, max_items, max_call_items) < 1:
            raise ValueError("max_calls, max_items and max_call_items must be at least 1")
        self._send = send
        self.max_calls, self.max_items = max_calls, max_items
        self.max_call_items, self.max_pending = max_call_items, max_pending
        self._on_full = on_full
        self._on_call = on_call
        self._pending: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self._calls = 0
        self._items = 0
        self.calls_sent = self.requests_sent = 0
        self._tasks: set[asyncio.Task] = set()

    def in_flight(self) -> tuple[int, int]:
        """(calls, requests) sent and not yet answered."""
        return self._calls, self._items

    def pending(self) -> int:
        return len(self._pending)

    async def submit(self, item: Any) -> Any:
        if 0 <= self.max_pending <= len(self._pending) and not self._room():
            raise self._on_full()
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._pump()
        return await future

    def _room(self) -> int:
        """Requests the next call may carry now (0: no call may start)."""
        if self._calls >= self.max_calls:
            return 0
        return min(self.max_call_items, self.max_items - self._items)

    def _pump(self) -> None:
        while self._pending and (room := self._room()) > 0:
            call = []
            while self._pending and len(call) < room:
                item, future = self._pending.popleft()
                if not future.done():  # cancelled while waiting: drop it
                    call.append((item, future))
            if not call:
                return
            self._calls += 1
            self._items += len(call)
            self.calls_sent += 1
            self.requests_sent += len(call)
            if self._on_call is not None:
                self._on_call(len(call))
            task = asyncio.get_running_loop().create_task(self._call(call))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, call: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await self._send([item for item, _ in call])
            if len(results) != len(call):
                raise RuntimeError(f"send returned {len(results)} results for "
                                   f"{len(call)} items")
        except BaseException as exc:  # noqa: BLE001 - every caller gets the failure
            for _, future in call:
                if future.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()
                else:
                    future.set_exception(exc)
            results = None
        finally:
            self._calls -= 1
            self._items -= len(call)
            self._pump()
        if results is None:
            return
        for (_, future), result in zip(call, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
