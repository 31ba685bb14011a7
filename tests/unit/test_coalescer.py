"""Coalescer (services/serving/batching.py): the ingress sends concurrent requests to a
model deployment together, a bounded number of calls at a time; no Ray, a fake `send`
that records its calls and can be held."""

from __future__ import annotations

import asyncio

import pytest

from services.core.errors import ModelNotFound, Overloaded
from services.serving.batching import Coalescer


class FakeSend:
    """Doubles each item (an item that is a negative number answers ModelNotFound);
    records each call; calls wait on `gate` while it is clear."""

    def __init__(self):
        self.calls: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next: BaseException | None = None
        self.out = self.out_items = self.most_out = self.most_items = 0

    async def __call__(self, items):
        self.calls.append(list(items))
        self.out += 1
        self.out_items += len(items)
        self.most_out = max(self.most_out, self.out)
        self.most_items = max(self.most_items, self.out_items)
        try:
            await self.gate.wait()
            await asyncio.sleep(0)
        finally:
            self.out -= 1
            self.out_items -= len(items)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return [ModelNotFound(f"no {i}") if i < 0 else 2 * i for i in items]


def make(send, *, max_calls=1, max_items=64, max_call_items=32, max_pending=-1):
    return Coalescer(send, max_calls=max_calls, max_items=max_items,
                     max_call_items=max_call_items, max_pending=max_pending,
                     on_full=lambda: Overloaded("server busy: request queue full; retry later"))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_lone_request_is_sent_at_once_alone():
    async def main():
        send = FakeSend()
        c = make(send)
        assert await c.submit(21) == 42
        assert send.calls == [[21]]
        assert c.in_flight() == (0, 0) and c.pending() == 0

    run(main())


def test_requests_arriving_while_a_call_is_out_go_together_in_the_next():
    async def main():
        send = FakeSend()
        c = make(send, max_calls=1)
        send.gate.clear()
        first = asyncio.ensure_future(c.submit(1))
        await settle()
        rest = [asyncio.ensure_future(c.submit(i)) for i in range(2, 12)]
        await settle()
        assert send.calls == [[1]] and c.pending() == 10  # waiting for the one call
        send.gate.set()
        assert await first == 2
        assert await asyncio.gather(*rest) == [2 * i for i in range(2, 12)]
        assert send.calls == [[1], list(range(2, 12))]  # 11 requests, 2 calls

    run(main())


def test_calls_in_flight_and_their_sizes_are_bounded():
    async def main():
        send = FakeSend()
        c = make(send, max_calls=2, max_items=5, max_call_items=3)
        send.gate.clear()
        futures = [asyncio.ensure_future(c.submit(i)) for i in range(20)]
        await settle()
        # the first two go out alone, at once; the rest wait for a call to return
        assert send.calls == [[0], [1]]
        assert c.in_flight() == (2, 2) and c.pending() == 18
        send.gate.set()
        assert await asyncio.gather(*futures) == [2 * i for i in range(20)]
        assert all(len(call) <= 3 for call in send.calls)
        assert send.most_out == 2 and send.most_items <= 5
        assert len(send.calls) < 20
        assert sorted(i for call in send.calls for i in call) == list(range(20))

    run(main())


def test_each_caller_gets_its_own_error_and_the_others_their_answers():
    async def main():
        c = make(FakeSend())
        results = await asyncio.gather(c.submit(1), c.submit(-1), c.submit(3),
                                       return_exceptions=True)
        assert results[0] == 2 and results[2] == 6
        assert isinstance(results[1], ModelNotFound)

    run(main())


def test_a_failed_call_fails_its_callers_only_and_the_next_call_goes_out():
    async def main():
        send = FakeSend()
        c = make(send, max_calls=1)
        send.gate.clear()
        send.fail_next = ConnectionError("replica died")
        first = asyncio.ensure_future(c.submit(1))
        await settle()
        later = [asyncio.ensure_future(c.submit(i)) for i in (2, 3)]
        await settle()
        send.gate.set()
        with pytest.raises(ConnectionError):
            await first
        assert await asyncio.gather(*later) == [4, 6]
        assert send.calls == [[1], [2, 3]]
        assert c.in_flight() == (0, 0)

    run(main())


def test_past_max_pending_requests_are_refused_at_once():
    async def main():
        send = FakeSend()
        c = make(send, max_calls=1, max_items=1, max_pending=2)
        send.gate.clear()
        sent = asyncio.ensure_future(c.submit(1))
        waiting = [asyncio.ensure_future(c.submit(i)) for i in (2, 3)]
        await settle()
        with pytest.raises(Overloaded, match="retry later"):
            await c.submit(4)
        send.gate.set()
        assert [await sent] + list(await asyncio.gather(*waiting)) == [2, 4, 6]

    run(main())


def test_a_caller_cancelled_while_waiting_is_dropped_and_one_sent_does_not_cancel_the_call():
    async def main():
        send = FakeSend()
        c = make(send, max_calls=1)
        send.gate.clear()
        sent = asyncio.ensure_future(c.submit(1))
        partner = asyncio.ensure_future(c.submit(2))
        await settle()
        waiting = asyncio.ensure_future(c.submit(3))
        kept = asyncio.ensure_future(c.submit(4))
        await settle()
        waiting.cancel()
        sent.cancel()  # already sent: the call goes on for its partner
        await settle()
        send.gate.set()
        assert await partner == 4
        assert await kept == 8
        assert send.calls == [[1], [2, 4]] or send.calls == [[1, 2], [4]]
        assert 3 not in [i for call in send.calls for i in call]

    run(main())


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        make(FakeSend(), max_calls=0)


# ---- the ingress's second try when a replica dies (services/serving/ingress.py) ----------
def test_a_classify_call_whose_replica_died_is_sent_once_more():
    from ray.exceptions import ActorDiedError, RayTaskError

    from services.serving.ingress import REPLICA_CALL_ATTEMPTS, InferenceIngress

    def calls(*outcomes):
        sent = []

        async def call():
            sent.append(len(sent))
            outcome = outcomes[len(sent) - 1]
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        return sent, call

    again = InferenceIngress._again_if_replica_dies
    sent, call = calls(ActorDiedError(), ["answer"])
    assert asyncio.run(again(None, "toy", call)) == ["answer"] and len(sent) == 2
    # one more try only: a request that kills replicas must not take them all down
    sent, call = calls(*[ActorDiedError()] * 3)
    with pytest.raises(ActorDiedError):
        asyncio.run(again(None, "toy", call))
    assert len(sent) == REPLICA_CALL_ATTEMPTS == 2
    # any other failure is the answer: not sent again
    for error in (ModelNotFound("no such model"), RayTaskError("f", "tb", ValueError())):
        sent, call = calls(error, ["answer"])
        with pytest.raises(type(error)):
            asyncio.run(again(None, "toy", call))
        assert len(sent) == 1
