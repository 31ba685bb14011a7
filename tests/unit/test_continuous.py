"""Continuous batching (services/runtime/continuous.py) in-process, without Ray: requests that
join a running batch at different steps get the tokens a static batch gives them
(greedy and seeded samples), on a tiny GPT-2 (learned positions) and a tiny Llama
(rotary positions, grouped KV heads); rows leave as they end, the context bounds who
joins, cancellation, failures, and the check that refuses what cannot be batched so."""

from __future__ import annotations

import threading
import time

import pytest

from services.runtime.continuous import ContinuousBatcher, ContinuousUnsupported, check_continuous
from services.runtime.generation import GenerationEngine, SamplingParams
from tests.helpers import GEN_TEMPLATE, build_bpe_tokenizer, poll_until

PROMPTS = ["red cat", "a much longer prompt than the others, with more words in it",
           "x", "blue dog sat on the mat", "what is two plus two", "z y"]


# Weights 10x Hugging Face's default spread: at the default, a tiny random GPT-2 with
# tied embeddings answers every prompt with one token repeated, whatever its attention
# does, and equal tokens would prove nothing. At 0.2 each prompt gets its own varied
# continuation, and zeroing attention changes every one of them.
INIT = 0.2


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(PROMPTS * 3 + ["Q: A: the a of and to in"])


def _engine(kind: str, tokenizer, context: int = 256) -> GenerationEngine:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    eos = tokenizer.eos_token_id
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_positions=context, n_embd=64, n_layer=2, n_head=2,
            bos_token_id=eos, eos_token_id=eos, initializer_range=INIT))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=context, bos_token_id=eos, eos_token_id=eos,
            initializer_range=INIT))
    else:  # Mistral with a sliding window: its cache rows cannot be joined
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=context, sliding_window=4, eos_token_id=eos))
    return GenerationEngine(model.eval(), tokenizer, GEN_TEMPLATE, context)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def engine(request, tokenizer):
    return _engine(request.param, tokenizer)


GREEDY = dict(max_new_tokens=24, ignore_eos=True)
SAMPLED = dict(max_new_tokens=18, ignore_eos=True, temperature=1.2, top_p=0.9, top_k=40)


def _static(engine, prompt, **params):
    job = engine.job(prompt, SamplingParams(**params))
    engine.run([job])
    return job


def test_requests_joining_at_different_steps_get_the_static_tokens(engine):
    want_greedy = [_static(engine, p, **GREEDY).token_ids for p in PROMPTS]
    want_sampled = [_static(engine, p, seed=i + 1, **SAMPLED).token_ids
                    for i, p in enumerate(PROMPTS)]
    admitted: list[tuple[int, list[float]]] = []
    done = []
    loop = ContinuousBatcher(engine, max_rows=4, on_admit=lambda n, w: admitted.append((n, w)),
                             on_done=done.append)
    jobs, futures = [], []
    for i, prompt in enumerate(PROMPTS):
        for params in (GREEDY, dict(SAMPLED, seed=i + 1)):
            job = engine.job(prompt, SamplingParams(**params))
            jobs.append(job)
            futures.append(loop.submit(job))
        if i % 2:  # later requests join a batch that is already decoding
            assert poll_until(lambda: jobs[-1].completion_tokens >= 2, 30, 0.001)
    for future in futures:
        assert future.result(timeout=120) is None
    assert [j.token_ids for j in jobs[0::2]] == want_greedy
    assert [j.token_ids for j in jobs[1::2]] == want_sampled
    assert all(j.finish_reason == "length" for j in jobs)
    assert [j.completion_tokens for j in jobs] == [24, 18] * len(PROMPTS)
    assert sorted(map(id, done)) == sorted(map(id, jobs))  # each reported once
    # more than one admission, never more than max_rows rows, waits measured
    assert len(admitted) > 1 and max(n for n, _ in admitted) <= 4
    assert sum(len(w) for _, w in admitted) == len(jobs)
    assert all(w >= 0 for _, waits in admitted for w in waits)
    # every row left: the thread ended, nothing is running
    assert poll_until(lambda: loop._thread is None, 10, 0.01)
    assert loop.rows == 0 and loop.waiting == 0


def test_rows_leave_as_they_end_and_the_batch_narrows(engine):
    """Driven step by step on this thread: three requests start together, the
    short ones leave, and the padding only the long prompt needed goes with it."""
    import concurrent.futures

    import torch

    short = engine.job("red cat", SamplingParams(max_new_tokens=2, ignore_eos=True))
    long_prompt = engine.job(PROMPTS[1], SamplingParams(max_new_tokens=3, ignore_eos=True))
    steady = engine.job("x", SamplingParams(max_new_tokens=30, ignore_eos=True))
    loop = ContinuousBatcher(engine, max_rows=8)
    shape = []
    with torch.inference_mode():
        loop._admit([(job, concurrent.futures.Future(), 0.0)
                     for job in (short, long_prompt, steady)])
        shape.append((loop.rows, loop._batch.width))
        while loop.rows:
            loop._step()
            shape.append((loop.rows, loop._batch.width))
    assert (short.completion_tokens, long_prompt.completion_tokens,
            steady.completion_tokens) == (2, 3, 30)
    # three rows as wide as the long prompt; then two; then steady alone, its cache
    # only as wide as its own tokens: well short of the long prompt's width
    assert shape[0] == (3, long_prompt.prompt_tokens)
    assert [rows for rows, _ in shape[:4]] == [3, 2, 1, 1]
    assert shape[2][1] == steady.prompt_tokens + 2 < long_prompt.prompt_tokens
    assert shape[-1] == (0, 0)
    assert steady.token_ids == _static(engine, "x", max_new_tokens=30,
                                       ignore_eos=True).token_ids


def test_eos_stop_strings_and_streaming_deltas(engine):
    # a prompt whose greedy text has whole characters up to a 2-character stop string
    # that first occurs after its 4th character
    prompt, full, stop = next(
        (p, full, full[i:i + 2]) for p in PROMPTS
        for full in [_static(engine, p, **GREEDY).text] for i in range(4, len(full) - 1)
        if "\ufffd" not in full[:i + 2] and full.index(full[i:i + 2]) == i)
    deltas: list[str] = []
    job = engine.job(prompt, SamplingParams(stop=(stop,), **GREEDY),
                     on_text=lambda text, n: deltas.append(text))
    ContinuousBatcher(engine).submit(job).result(timeout=60)
    assert job.finish_reason == "stop" and job.text == full[:full.index(stop)]
    assert "".join(deltas) == job.text
    # without ignore_eos, a row whose greedy choice is EOS ends with "eos"
    eos = engine.tokenizer.eos_token_id
    biased = engine.job("blue dog sat on the mat", SamplingParams(max_new_tokens=10))
    with _forcing_token(engine.model, eos, after_calls=3):
        ContinuousBatcher(engine).submit(biased).result(timeout=60)
    assert biased.finish_reason == "eos" and biased.completion_tokens == 3


class _forcing_token:
    """Make the model's logits favour `token` on every forward pass from the
    `after_calls`-th on (a forward hook)."""

    def __init__(self, model, token: int, after_calls: int):
        self.model, self.token, self.after, self.calls = model, token, after_calls, 0

    def __enter__(self):
        def hook(module, args, output):
            self.calls += 1
            if self.calls >= self.after:
                output.logits[..., self.token] = 1e4
            return output
        self.handle = self.model.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_cancelled_requests_leave_waiting_or_running(engine):
    running = engine.job("red cat", SamplingParams(max_new_tokens=200, ignore_eos=True))
    waiting = engine.job("blue dog", SamplingParams(max_new_tokens=5, ignore_eos=True))
    other = engine.job("x", SamplingParams(max_new_tokens=5, ignore_eos=True))
    loop = ContinuousBatcher(engine, max_rows=1)  # the others wait behind `running`
    f_running, f_waiting, f_other = (loop.submit(j) for j in (running, waiting, other))
    assert poll_until(lambda: running.completion_tokens >= 3, 30, 0.001)
    waiting.cancel()
    f_other.cancel()  # its caller went away (the asyncio side cancels the future)
    running.cancel()
    f_running.result(timeout=30)
    f_waiting.result(timeout=30)
    assert running.finish_reason == "cancelled" and running.completion_tokens < 200
    assert (waiting.finish_reason, waiting.completion_tokens) == ("cancelled", 0)
    assert poll_until(lambda: other.done, 10, 0.005)
    assert other.finish_reason == "cancelled" and other.completion_tokens == 0


def test_a_request_joins_only_while_the_cache_fits_the_context(tokenizer):
    """The cache of the running batch grows a column a step; a request joins only
    once the widest row plus the most steps left stays within the context."""
    engine = _engine("gpt2", tokenizer, context=64)
    first = engine.job("x", SamplingParams(max_new_tokens=40, ignore_eos=True))
    long_prompt = PROMPTS[1] + " " + PROMPTS[1]
    second = engine.job(long_prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))
    joined = []
    loop = ContinuousBatcher(engine, max_rows=4, on_admit=lambda rows, waits: joined.append(
        (rows, first.completion_tokens, loop._batch.width)))
    widths = []
    step = loop._step
    loop._step = lambda: (step(), widths.append(loop._batch.width))
    loop.submit(first)
    assert poll_until(lambda: first.completion_tokens >= 1, 30, 0.001)
    # at this point 39 steps are left and the prompt is too wide to join yet
    assert second.prompt_tokens + 39 > 64
    loop.submit(second).result(timeout=60)
    rows, done_then, width_then = joined[-1]
    assert max(width_then, second.prompt_tokens) + (40 - done_then) <= 64  # fitted then
    assert done_then > 1  # and it waited for that
    assert max(widths) <= 64
    assert poll_until(lambda: first.done, 30, 0.005) and first.completion_tokens == 40
    # it got its static tokens all the same
    assert second.token_ids == _static(engine, long_prompt, max_new_tokens=5,
                                       ignore_eos=True).token_ids


def test_a_model_failure_fails_its_rows_and_the_next_requests_run(engine):
    job = engine.job("red cat", SamplingParams(max_new_tokens=50, ignore_eos=True))
    loop = ContinuousBatcher(engine)
    boom = threading.Event()

    def hook(module, args, output):
        if boom.is_set():
            boom.clear()
            raise RuntimeError("device lost")
        return output
    handle = engine.model.register_forward_hook(hook)
    try:
        future = loop.submit(job)
        assert poll_until(lambda: job.completion_tokens >= 2, 30, 0.001)
        boom.set()
        with pytest.raises(RuntimeError, match="device lost"):
            future.result(timeout=30)
    finally:
        handle.remove()
    after = engine.job("red cat", SamplingParams(**GREEDY))
    loop.submit(after).result(timeout=60)
    assert after.token_ids == _static(engine, "red cat", **GREEDY).token_ids


def test_the_check_accepts_full_attention_and_refuses_a_sliding_window(engine, tokenizer):
    check_continuous(engine)  # GPT-2 and Llama
    with pytest.raises(ContinuousUnsupported, match="DynamicSlidingWindowLayer"):
        check_continuous(_engine("mistral-sliding", tokenizer))
    # a model whose joined rows give other tokens is refused too
    broken = _engine("gpt2", tokenizer)
    original = ContinuousBatcher._admit

    def admit_losing_the_cache(self, admit):
        original(self, admit)
        for layer in getattr(self._batch.cache, "layers", []):
            layer.values = layer.values * 0
    try:
        ContinuousBatcher._admit = admit_losing_the_cache
        with pytest.raises(ContinuousUnsupported, match="differ from a static batch"):
            check_continuous(broken)
    finally:
        ContinuousBatcher._admit = original


def test_max_rows_must_be_positive(engine):
    with pytest.raises(ValueError, match="max_rows"):
        ContinuousBatcher(engine, max_rows=0)


def test_an_idle_batcher_gathers_a_burst_for_start_wait_s(engine):
    """The first request to an idle batcher waits up to start_wait_s for others, so a
    burst starts in one pass; a full batch starts at once; without the wait the first
    request starts alone."""
    def burst(gaps: list[float], max_rows: int = 8, **waits):
        admitted = []
        loop = ContinuousBatcher(engine, max_rows=max_rows,
                                 on_admit=lambda rows, w: admitted.append(len(w)), **waits)
        jobs = [engine.job(p, SamplingParams(max_new_tokens=4, ignore_eos=True))
                for p in PROMPTS[:len(gaps) + 1]]
        futures = [loop.submit(jobs[0])]
        for gap, job in zip(gaps, jobs[1:]):
            time.sleep(gap)  # the next request comes a little later
            futures.append(loop.submit(job))
        for future in futures:
            future.result(timeout=60)
        return admitted

    # waited for the second, then both at once
    assert burst([0.02], start_wait_s=0.5) == [2]
    # the first went alone
    assert burst([0.02], start_wait_s=0.0) == [1, 1]
    # a second came within start_wait_s: the burst waits burst_wait_s for the third
    assert burst([0.01, 0.3], start_wait_s=0.1, burst_wait_s=1.0) == [3]
    # full: no wait
    started = time.monotonic()
    assert burst([0.0], max_rows=2, start_wait_s=30.0) == [2]
    assert time.monotonic() - started < 20
    for bad in ({"start_wait_s": -1}, {"start_wait_s": 0.2, "burst_wait_s": 0.1}):
        with pytest.raises(ValueError, match="start_wait_s"):
            ContinuousBatcher(engine, **bad)


def test_a_failing_text_callback_fails_its_request_alone(engine):
    """A request whose text callback raises (its caller's side broke) fails with that
    error, running or waiting; the requests beside it go on undisturbed."""
    def broken(text, tokens):
        raise RuntimeError("callback broke")

    loop = ContinuousBatcher(engine, max_rows=2)
    steady = engine.job("red cat", SamplingParams(**GREEDY))
    failing = engine.job("blue dog", SamplingParams(**GREEDY), on_text=broken)
    f_steady, f_failing = loop.submit(steady), loop.submit(failing)
    with pytest.raises(RuntimeError, match="callback broke"):
        f_failing.result(timeout=30)
    f_steady.result(timeout=60)
    assert steady.token_ids == _static(engine, "red cat", **GREEDY).token_ids
    # one that fails while it waits, cancelled, as it is finished in the queue
    loop = ContinuousBatcher(engine, max_rows=1)
    running = engine.job("red cat", SamplingParams(max_new_tokens=60, ignore_eos=True))
    queued = engine.job("blue dog", SamplingParams(max_new_tokens=5), on_text=broken)
    f_running = loop.submit(running)
    assert poll_until(lambda: running.completion_tokens >= 1, 30, 0.001)
    f_queued = loop.submit(queued)
    queued.cancel()
    with pytest.raises(RuntimeError, match="callback broke"):
        f_queued.result(timeout=60)
    f_running.result(timeout=60)
    assert running.finish_reason == "length" and running.completion_tokens == 60


def test_a_broken_batcher_thread_fails_every_caller_and_the_next_requests_run(engine):
    """Whatever breaks the thread itself (a bug), no caller is left waiting."""
    loop = ContinuousBatcher(engine, max_rows=1)
    original = loop._take_admissible
    calls = []

    def breaks_on_the_third_call():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("scheduler bug")
        return original()
    loop._take_admissible = breaks_on_the_third_call
    running = engine.job("red cat", SamplingParams(max_new_tokens=60, ignore_eos=True))
    queued = engine.job("blue dog", SamplingParams(max_new_tokens=5))
    futures = [loop.submit(running), loop.submit(queued)]
    for future in futures:
        with pytest.raises(RuntimeError, match="generation failed: scheduler bug"):
            future.result(timeout=30)
    assert poll_until(lambda: loop._thread is None, 10, 0.01)
    loop._take_admissible = original
    after = engine.job("red cat", SamplingParams(**GREEDY))
    loop.submit(after).result(timeout=60)
    assert after.token_ids == _static(engine, "red cat", **GREEDY).token_ids


def test_the_check_forgives_a_divergence_only_at_a_near_tie(engine):
    """Batches of other shapes round differently; in bfloat16 that can swap two
    all-but-tied tokens. The check accepts a divergence where the static run's two
    candidates were within NEAR_TIE of each other, and nothing else."""
    from services.runtime.continuous import NEAR_TIE, _near_tie

    job = _static(engine, "red cat", **GREEDY)
    step, chosen = 3, job.token_ids[3]
    other = (chosen + 1) % len(engine.tokenizer)
    for gap, tied in ((NEAR_TIE["float32"] / 2, True), (0.5, False)):
        def hook(module, args, output, gap=gap):
            logits = output.logits
            logits[..., other] = logits[..., chosen] - gap
            return output
        handle = engine.model.register_forward_hook(hook)
        try:
            assert _near_tie(engine, job, step, [other]) is tied
        finally:
            handle.remove()
    assert not _near_tie(engine, job, len(job.token_ids), [other])  # past the end
