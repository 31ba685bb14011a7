"""GreedyBatcher (services/serving/batching.py): a batch starts as soon as the model is
free, with everything queued by then; no Ray, a fake model that records its batches."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.serving.batching import GreedyBatcher


class FakeModel:
    """Doubles its inputs; each batch takes `compute_s`; records batches, can be held."""

    def __init__(self, compute_s: float = 0.0):
        self.compute_s = compute_s
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def __call__(self, items):
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(10)
        time.sleep(self.compute_s)
        if any(i < 0 for i in items):
            raise ValueError("negative input")
        return [2 * i for i in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def while_busy(model: FakeModel, batcher: GreedyBatcher, first, items):
    """Submit `first`, wait until the (held) model computes it, then queue `items`
    behind it; returns (first's future, the items' futures) once all are queued."""
    head = asyncio.ensure_future(batcher.submit(first))
    await asyncio.to_thread(model.started.wait, 10)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in items]
    while batcher.queued() < len(rest):
        await asyncio.sleep(0)
    return head, rest


def test_a_lone_request_does_not_wait():
    model = FakeModel()
    batcher = GreedyBatcher(model, max_batch_size=32)

    async def lone(wait_s):
        batcher.configure(32, wait_s)
        started = time.perf_counter()
        assert await batcher.submit(21) == 42
        return time.perf_counter() - started

    # With a fill wait a lone request pays a quarter of it (serve.batch: all of it);
    # without one it only pays the hop to the model's thread.
    assert 0.12 <= run(lone(0.5)) < 0.4
    assert run(lone(0.0)) < 0.25
    assert model.batches == [[21], [21]]


def test_every_batch_runs_on_the_batchers_own_thread():
    """Not on asyncio's shared pool, where other work (registry polls, loads) runs and
    consecutive batches would land on whichever worker wakes first."""
    threads: list[str] = []

    def model(items):
        threads.append(threading.current_thread().name)
        return items

    batcher = GreedyBatcher(model, max_batch_size=4)

    async def calls():
        for i in range(8):
            # other thread work between and during batches, as a replica has
            busy = [asyncio.to_thread(time.sleep, 0.005) for _ in range(4)]
            assert await asyncio.gather(batcher.submit(i), *busy) == [i, None, None, None, None]
        assert await asyncio.gather(*(batcher.submit(i) for i in range(10))) == list(range(10))

    run(calls())
    assert len(threads) >= 11 and len(set(threads)) == 1, threads
    assert threads[0].startswith("tuneserve-batch")


def test_requests_arriving_while_the_model_computes_form_the_next_batch():
    model = FakeModel()
    model.release.clear()
    sizes: list[int] = []
    batcher = GreedyBatcher(model, max_batch_size=32, on_batch=sizes.append)

    async def main():
        first, rest = await while_busy(model, batcher, 0, range(1, 11))
        assert batcher.queued() == 10
        model.release.set()
        return await first, await asyncio.gather(*rest)

    first, rest = run(main())
    assert first == 0 and rest == [2 * i for i in range(1, 11)]
    assert model.batches == [[0], list(range(1, 11))] and sizes == [1, 10]


def test_batches_never_exceed_max_batch_size_and_keep_arrival_order():
    model = FakeModel()
    model.release.clear()
    batcher = GreedyBatcher(model, max_batch_size=8)

    async def main():
        first, rest = await while_busy(model, batcher, 100, range(20))
        model.release.set()
        await first
        return await asyncio.gather(*rest)

    assert run(main()) == [2 * i for i in range(20)]
    assert model.batches == [[100], list(range(8)), list(range(8, 16)), list(range(16, 20))]


def test_a_call_cancelled_while_queued_never_reaches_the_model():
    model = FakeModel()
    model.release.clear()
    batcher = GreedyBatcher(model, max_batch_size=8)

    async def main():
        first, (doomed, kept) = await while_busy(model, batcher, 1, (2, 3))
        doomed.cancel()  # a deadline, a client gone
        with pytest.raises(asyncio.CancelledError):
            await doomed
        model.release.set()
        return await first, await kept

    assert run(main()) == (2, 6)
    assert model.batches == [[1], [3]]


def test_a_failing_batch_fails_its_calls_and_the_next_batch_works():
    model = FakeModel()
    model.release.clear()
    batcher = GreedyBatcher(model, max_batch_size=8)

    async def main():
        first, bad = await while_busy(model, batcher, 1, (-1, 5))
        model.release.set()
        outcomes = await asyncio.gather(*bad, return_exceptions=True)
        return await first, outcomes, await batcher.submit(7)

    first, outcomes, after = run(main())
    assert first == 2 and after == 14
    assert all(isinstance(o, ValueError) and "negative input" in str(o) for o in outcomes)


def test_a_wrong_number_of_results_is_an_error_for_every_call():
    batcher = GreedyBatcher(lambda items: [0], max_batch_size=8, wait_timeout_s=0.05)

    async def main():
        return await asyncio.gather(batcher.submit(1), batcher.submit(2),
                                    return_exceptions=True)

    outcomes = run(main())
    assert all(isinstance(o, RuntimeError) and "1 results for 2 items" in str(o)
               for o in outcomes)


def test_a_wait_timeout_lets_a_batch_fill_on_an_idle_model():
    model = FakeModel()
    waits: list[float] = []
    batcher = GreedyBatcher(model, max_batch_size=4, wait_timeout_s=0.2,
                            on_wait=waits.append)

    async def main():
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(batcher.submit(2))
        return await first, await second

    assert run(main()) == (2, 4)
    assert model.batches == [[1, 2]]
    assert len(waits) == 1 and 0.15 <= waits[0] < 1.0  # a half-full batch waits it out


def test_a_full_queue_does_not_wait_for_the_timeout():
    model = FakeModel()
    batcher = GreedyBatcher(model, max_batch_size=2, wait_timeout_s=5.0)

    async def main():
        started = time.perf_counter()
        await asyncio.gather(batcher.submit(1), batcher.submit(2))
        return time.perf_counter() - started

    assert run(main()) < 2.0
    assert model.batches == [[1, 2]]


def test_configure_checks_its_arguments():
    batcher = GreedyBatcher(lambda items: items)
    batcher.configure(4, 0.01)
    assert (batcher.max_batch_size, batcher.wait_timeout_s) == (4, 0.01)
    with pytest.raises(ValueError, match="max_batch_size"):
        batcher.configure(0, 0.0)
    with pytest.raises(ValueError, match="wait_timeout_s"):
        batcher.configure(4, -1.0)


def test_forward_passes_group_similar_lengths_within_both_budgets():
    from services.runtime.classifier import forward_passes

    lengths = [50, 3, 4, 48, 5, 200, 6, 47]
    passes = forward_passes(lengths, max_texts=64, max_tokens=160)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    for p in passes:
        width = max(lengths[i] for i in p)
        assert len(p) == 1 or len(p) * width <= 160  # one over-long text runs alone
    assert [sorted(lengths[i] for i in p) for p in passes] == [[3, 4, 5, 6], [47, 48, 50], [200]]
    assert [len(p) for p in forward_passes([5] * 10, max_texts=4, max_tokens=10**6)] == [4, 4, 2]


# ---- waiting for the last batch's callers to come back -------------------------------

def test_closed_loop_callers_stay_one_batch_instead_of_taking_turns():
    """Callers that send their next request as soon as they get an answer (most
    clients) come back at slightly different times. Greedy batching alone splits them
    into batches that take turns; waiting briefly for the last batch's callers keeps
    them one batch."""

    def batches(share: float) -> list[int]:
        model = FakeModel(compute_s=0.1)
        batcher = GreedyBatcher(model, max_batch_size=8, return_wait_share=share,
                                return_wait_max_s=0.5)

        async def caller(i: int):
            await asyncio.sleep(0.003 * i)  # they start one after another
            for _ in range(8):
                assert await batcher.submit(i) == 2 * i
                await asyncio.sleep(0.002 * (i + 1))  # its own round trip: 2..16 ms

        async def main():
            await asyncio.gather(*(caller(i) for i in range(8)))

        run(main())
        return [len(b) for b in model.batches]

    together = batches(0.5)
    # The first caller starts a batch alone and the other seven queue behind it; from
    # then on every batch holds all eight (the last one lacks the first caller, done).
    assert together == [1] + [8] * 7 + [7]
    apart = batches(0.0)  # the same callers without the wait keep taking turns
    assert max(apart) < 8 and len(apart) >= 10


def test_a_lone_caller_never_waits_for_returning_callers():
    model = FakeModel(compute_s=0.05)
    waits: list[float] = []
    batcher = GreedyBatcher(model, max_batch_size=8, return_wait_share=10.0,
                            return_wait_max_s=10.0, on_wait=waits.append)

    async def main():
        for i in range(5):
            assert await batcher.submit(i) == 2 * i
            await asyncio.sleep(0.01)

    run(main())
    assert model.batches == [[i] for i in range(5)]
    assert waits == [0.0] * 5


def test_the_wait_for_returning_callers_is_bounded_and_a_returning_caller_joins():
    def scenario(comes_back: bool):
        model = FakeModel(compute_s=0.2)
        model.release.clear()
        waits: list[float] = []
        batcher = GreedyBatcher(model, max_batch_size=8, return_wait_share=0.5,
                                return_wait_max_s=0.15, on_wait=waits.append)

        async def main():
            # One call computing, three queued behind it: when it ends, the next batch
            # waits for the first call's caller to come back, for at most
            # min(0.15 s, half of 0.2 s).
            first, rest = await while_busy(model, batcher, 0, (1, 2, 3))
            model.release.set()
            assert await first == 0
            if comes_back:
                rest.append(asyncio.ensure_future(batcher.submit(4)))
            return await asyncio.gather(*rest)

        answers = run(main())
        assert len(waits) == 2 and waits[0] == 0.0  # one value per batch
        return answers, model.batches, waits[1]

    answers, batches, waited = scenario(comes_back=False)
    assert answers == [2, 4, 6] and batches == [[0], [1, 2, 3]]
    assert 0.08 <= waited <= 1.0
    answers, batches, waited = scenario(comes_back=True)
    assert answers == [2, 4, 6, 8] and batches == [[0], [1, 2, 3, 4]]
    assert waited < 0.08


def test_waits_that_run_out_back_off_for_callers_that_do_not_come_back(monkeypatch):
    """Requests arriving on their own schedule (each caller calls once): the wait for
    returning callers runs out, so the batches after it skip the wait, 1, 2, 4, ...
    of them, instead of every batch idling for it."""
    from services.serving import batching

    def open_loop() -> tuple[float, int]:
        model = FakeModel(compute_s=0.1)
        waits: list[float] = []
        batcher = GreedyBatcher(model, max_batch_size=32, return_wait_share=0.5,
                                return_wait_max_s=1.0,  # at most 50 ms per wait
                                on_wait=waits.append)

        async def main():
            calls = []
            for i in range(60):  # one new caller every 30 ms, ~3-4 per batch
                calls.append(asyncio.ensure_future(batcher.submit(i)))
                await asyncio.sleep(0.03)
            return await asyncio.gather(*calls)

        assert run(main()) == [2 * i for i in range(60)]
        return sum(1 for w in waits if w > 0), len(model.batches)

    # Counted, not timed: how many batches waited at all, so a slow machine that
    # stretches each wait cannot fail it.
    waited, batches = open_loop()
    assert batches >= 12 and waited <= batches // 2, (waited, batches)  # 1, 2, 4 skipped
    monkeypatch.setattr(batching, "RETURN_WAIT_MAX_SKIPS", 0)  # no backing off
    waited, batches = open_loop()
    assert batches >= 12 and waited >= batches - 3, (waited, batches)


def test_a_lone_request_waits_a_quarter_of_the_fill_wait_for_company():
    """One stream at a time: each lone request waits a quarter of the fill wait for a
    second one, not all of it."""
    model = FakeModel()
    waits: list[float] = []
    batcher = GreedyBatcher(model, max_batch_size=8, wait_timeout_s=0.2,
                            on_wait=waits.append)

    async def one_after_another(n):
        return [await batcher.submit(i) for i in range(n)]

    assert run(one_after_another(5)) == [0, 2, 4, 6, 8]
    assert model.batches == [[i] for i in range(5)]
    assert all(0.045 <= w < 0.15 for w in waits), waits


def test_a_second_request_within_the_lone_wait_makes_the_batch_wait_to_fill():
    """A burst: the second request comes within the lone request's wait, so the batch
    waits the whole fill wait (from its oldest request) and the third joins too; a
    request after the lone wait ran out finds the first batch gone."""
    model = FakeModel()
    waits: list[float] = []
    batcher = GreedyBatcher(model, max_batch_size=8, wait_timeout_s=0.2,
                            on_wait=waits.append)

    async def arrivals(delays):
        calls = []
        for i, delay in enumerate(delays):
            await asyncio.sleep(delay)
            calls.append(asyncio.ensure_future(batcher.submit(i)))
        return await asyncio.gather(*calls)

    assert run(arrivals([0, 0.02, 0.1])) == [0, 2, 4]
    assert model.batches == [[0, 1, 2]]
    assert 0.17 <= waits[0] < 0.4, waits
    model.batches.clear()
    assert run(arrivals([0, 0.12])) == [0, 2]
    assert model.batches == [[0], [1]]


def test_a_request_that_just_missed_a_lone_batch_brings_the_whole_wait_back():
    """Where hops spread a burst, its first request may start alone after the short
    wait; a request arriving while it computes, within the fill wait of its arrival,
    makes lone requests wait the whole fill wait, until LONE_FULL_WAITS of those in a
    row caught nobody."""
    from services.serving.batching import LONE_FULL_WAITS

    model = FakeModel()
    waits: list[float] = []
    batcher = GreedyBatcher(model, max_batch_size=8, wait_timeout_s=0.2,
                            on_wait=waits.append)

    async def main():
        model.release.clear()
        head = asyncio.ensure_future(batcher.submit(0))  # waits 0.05, then runs alone
        await asyncio.to_thread(model.started.wait, 10)
        late = asyncio.ensure_future(batcher.submit(1))  # ~0.05 s after 0 arrived
        model.release.set()
        await asyncio.gather(head, late)
        return [await batcher.submit(i) for i in range(2, 2 + LONE_FULL_WAITS)]

    assert run(main()) == [2 * i for i in range(2, 2 + LONE_FULL_WAITS)]
    assert model.batches == [[i] for i in range(2 + LONE_FULL_WAITS)]
    assert 0.045 <= waits[0] < 0.15  # the short wait
    # 1's wait (it arrived during 0's batch) and the next ones are whole waits, until
    # LONE_FULL_WAITS of them caught nobody; then the short wait is back
    assert all(w >= 0.1 for w in waits[1:1 + LONE_FULL_WAITS]), waits
    assert 0.045 <= waits[-1] < 0.15, waits


# ---- answers before the batch ends (early_results) -----------------------------------

class HalvesModel(FakeModel):
    """A batch of two halves, as a classifier's forward passes: the first half's
    results are delivered as soon as it has run, the second's at the end."""

    def __init__(self, compute_s: float = 0.0):
        super().__init__(compute_s)
        self.running = False

    def __call__(self, items, deliver):
        self.batches.append(list(items))
        self.running = True
        self.started.set()
        half = (len(items) + 1) // 2
        time.sleep(self.compute_s / 2)
        for i in range(half):
            deliver(i, 2 * items[i])
        self.release.wait(10)
        time.sleep(self.compute_s / 2)
        self.running = False
        return [2 * i for i in items]


def test_early_results_answer_callers_while_the_batch_goes_on():
    model = HalvesModel()
    model.release.clear()  # a batch holds after its first half
    batcher = GreedyBatcher(model, max_batch_size=8, early_results=True)

    async def main():
        # queued in one loop step, before the batcher's task first runs: one batch
        calls = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
        early = await asyncio.wait_for(asyncio.gather(*calls[:2]), 10)
        running = model.running  # answered while the batch has not ended
        model.release.set()
        return early, running, await asyncio.gather(*calls)

    early, running, answers = run(main())
    assert early == [0, 2] and running
    assert answers == [0, 2, 4, 6] and model.batches == [[0, 1, 2, 3]]


def test_callers_answered_early_stay_one_batch_and_the_wait_stays_short():
    """The callers of a batch's first half come back while its second half computes:
    they are queued when it ends, and the next batch waits only for the second half's
    callers, not until the wait's deadline for callers already back."""
    model = HalvesModel(compute_s=0.1)
    waits: list[float] = []
    # max_batch_size above the callers: the batch size alone cannot end the wait
    batcher = GreedyBatcher(model, max_batch_size=32, return_wait_share=0.5,
                            return_wait_max_s=0.5, on_wait=waits.append,
                            early_results=True)

    async def caller(i: int):
        await asyncio.sleep(0.003 * i)
        for _ in range(8):
            assert await batcher.submit(i) == 2 * i
            await asyncio.sleep(0.002 * (i + 1))

    async def main():
        await asyncio.gather(*(caller(i) for i in range(8)))

    run(main())
    sizes = [len(b) for b in model.batches]
    assert sizes == [1] + [8] * 7 + [7], sizes
    # each wait ends when the last caller is back (16 ms at most here), far before the
    # deadline of 50 ms (half of 0.1 s) that counting the early callers twice runs into
    # (the last batch waits it out: caller 0 has made its last call)
    assert max(waits[:-1]) < 0.04, waits


def test_predict_batch_delivers_each_request_once_its_last_pass_has_run(
        tiny_model_dir, tmp_path):
    from services.core.errors import InvalidInput
    from services.runtime import classifier as runtime
    from tests.helpers import publish_toy_classifier

    registry = publish_toy_classifier(tiny_model_dir, tmp_path, 16)
    loaded = runtime.load_classifier(registry, "toy", "v1", trace=False, refuse=True)
    passes = []
    real = loaded.logits

    def counting(batch):
        passes.append(int(batch["input_ids"].shape[0]))
        return real(batch)

    loaded.logits = counting
    delivered = []
    # 102 tokens: a pass of its own (CPU passes hold 256 padded tokens); 302: refused
    mid, long = "good " * 100, "good " * 300
    items = [(loaded, [mid]), (loaded, ["fine", "great"]), (loaded, [long]),
             (loaded, ["bad"])]
    answers = runtime.predict_batch(
        items, lambda i, answer: delivered.append((i, answer, len(passes))))
    # the short texts run in the first pass (shortest first), the long one after
    assert [(i, n) for i, _, n in delivered] == [(1, 1), (3, 1), (0, 2)]
    assert all(answers[i] == answer for i, answer, _ in delivered)
    assert isinstance(answers[2], InvalidInput)  # refused: answered, never delivered
    assert [len(a) for a in (answers[0], answers[1], answers[3])] == [1, 2, 1]
    again = runtime.predict_batch(items)  # the same answers without deliver
    assert [again[i] for i in (0, 1, 3)] == [answers[i] for i in (0, 1, 3)]
    assert str(again[2]) == str(answers[2])
