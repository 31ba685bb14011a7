"""Waiting with a time limit, cancellable at every moment.

`asyncio.wait_for(aw, t)` on Python 3.10 and 3.11 swallows a cancellation that arrives
as `aw` ends (it returns the result instead); a loop built on it (a health Watch
stream reading the status board, the registry follower, the batcher, a generation
stream) then never sees that it was cancelled and runs on, and whoever cancelled it
waits for it forever. `asyncio.wait` does not cancel what it waits for on a timeout,
so a cancellation of the caller always reaches the caller: `wait_event` and
`wait_within` are built on it.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set or `timeout_s` has passed; True if it is set."""
    if event.is_set():
        return True
    if timeout_s <= 0:
        return False
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
    return event.is_set()


async def wait_within(aw: Awaitable[T], timeout_s: float) -> T:
    """`await aw`, or asyncio.TimeoutError after `timeout_s` (aw is then cancelled);
    `asyncio.wait_for` without its lost cancellations (module docstring)."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except BaseException:  # cancelled: so is what it waited for
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError(f"not done within {timeout_s} s")
    return task.result()
