"""services/serving/waiting.py: waits with a time limit that never lose a cancellation.

On Python 3.10 and 3.11 `asyncio.wait_for` returns the result of an awaitable that
ended as its caller was cancelled, and the caller runs on; a health Watch stream read
the status board that way, so a stream cancelled at that moment never ended and
whoever cancelled it waited forever."""

from __future__ import annotations

import asyncio
import sys

import pytest

from services.serving.waiting import wait_event, wait_within


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def cancelled_as_it_ends(wait) -> str:
    """Cancel a task waiting on `wait(future)` in the same loop step as the future
    gets its result: 'cancelled' if the cancellation reached the task."""
    future = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(wait(future))
    await asyncio.sleep(0.01)  # the task waits now
    future.set_result("done")
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    return "ran on"


def test_a_cancellation_as_the_awaited_ends_reaches_the_caller():
    assert run(cancelled_as_it_ends(lambda f: wait_within(f, 5))) == "cancelled"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for is fixed there")
def test_asyncio_wait_for_loses_that_cancellation_here():
    """Why wait_within exists: the same race with asyncio.wait_for."""
    assert run(cancelled_as_it_ends(lambda f: asyncio.wait_for(f, 5))) == "ran on"


def test_wait_within_returns_the_result_or_times_out_and_cancels():
    async def main():
        assert await wait_within(asyncio.sleep(0, "ok"), 1) == "ok"
        slow = asyncio.ensure_future(asyncio.sleep(10))
        with pytest.raises(asyncio.TimeoutError):
            await wait_within(slow, 0.05)
        await asyncio.sleep(0)
        assert slow.cancelled()
        with pytest.raises(ValueError, match="bad"):
            await wait_within(_raise(ValueError("bad")), 1)

    run(main())


def test_cancelling_the_caller_cancels_what_it_waited_for():
    async def main():
        inner = asyncio.ensure_future(asyncio.sleep(10))
        outer = asyncio.ensure_future(wait_within(inner, 5))
        await asyncio.sleep(0.01)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        await asyncio.sleep(0)
        return inner.cancelled()

    assert run(main())


def test_wait_event():
    async def main():
        event = asyncio.Event()
        assert await wait_event(event, 0.01) is False
        asyncio.get_running_loop().call_later(0.01, event.set)
        assert await wait_event(event, 5) is True

    run(main())


async def _raise(exc: Exception):
    raise exc
