"""Waiting on an asyncio.Event with a time limit, cancellable at every moment.

`asyncio.wait_for(event.wait(), t)` on Python 3.10 and 3.11 can swallow a cancellation
that arrives as the wait itself ends; a loop built on it (a health Watch stream, the
registry follower, the batcher) then never sees that it was cancelled and runs on.
`asyncio.wait` does not cancel what it waits for on a timeout, so a cancellation of the
caller always reaches the caller.
"""
from __future__ import annotations

import asyncio


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
