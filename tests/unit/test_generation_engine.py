"""The generation engine in-process (no Ray): per-row sampling, seeds, stop strings,
streaming deltas, cancellation between tokens; on a tiny random-weight GPT-2 whose
continuations differ by prompt (varied_gpt2_dir)."""

import threading

import pytest

from services.core.errors import InvalidInput
from services.runtime.generation import GenerationEngine, SamplingParams, find_stop, held_back
from tests.helpers import GEN_TEMPLATE


@pytest.fixture(scope="module")
def engine(varied_gpt2_dir):
    import torch

    from services.core.modeling import context_length, load_causal_lm_for_serving

    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm_for_serving(varied_gpt2_dir)
    return GenerationEngine(model, tokenizer, GEN_TEMPLATE, context_length(model.config))


def run_one(engine, prompt="red cat", **kw):
    job = engine.job(prompt, SamplingParams(**{"max_new_tokens": 20, **kw}))
    engine.run([job])
    return job


def test_held_back_and_find_stop():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["world"]) == 0
    assert held_back("caf\ufffd", []) == 1
    assert find_stop("a.b;c", [";", "."]) == 1
    assert find_stop("a.b;c", [";", "."], start=2) == 3
    assert find_stop("abc", ["x"]) == -1


def test_template_and_context_check(engine):
    job = engine.job("red cat", SamplingParams(max_new_tokens=5000))
    expected = engine.tokenizer(GEN_TEMPLATE.format(prompt="red cat"))["input_ids"]
    assert job.prompt_ids == expected
    assert job.max_new_tokens == engine.context_tokens - len(expected)  # clamped
    with pytest.raises(InvalidInput, match="prompt: .* tokens"):
        engine.job("cat " * 1100, SamplingParams(max_new_tokens=1))


def test_length_ignore_eos_and_greedy_batch_equals_single(engine):
    alone = run_one(engine, max_new_tokens=25, ignore_eos=True)
    assert (alone.finish_reason, alone.completion_tokens) == ("length", 25)
    jobs = [engine.job(p, SamplingParams(max_new_tokens=25, ignore_eos=True))
            for p in ("a much longer prompt than the other one", "red cat", "x")]
    engine.run(jobs)
    assert jobs[1].text == alone.text
    assert [j.completion_tokens for j in jobs] == [25, 25, 25]
    assert len({tuple(j.token_ids) for j in jobs}) == 3  # the model is not degenerate


def test_stop_strings_cut_the_text(engine):
    full = run_one(engine, max_new_tokens=30, ignore_eos=True).text
    stop = next(full[i:i + 3] for i in range(5, len(full)) if "\ufffd" not in full[i:i + 3])
    job = run_one(engine, max_new_tokens=30, ignore_eos=True, stop=(stop,))
    assert job.finish_reason == "stop"
    # the text before the stop string, less a partial character at its end (the
    # bytes that would complete it were cut with the stop string)
    assert job.text == full[:full.index(stop)].rstrip("\ufffd")
    assert full.index(stop) >= 5


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine):
    params = dict(max_new_tokens=30, ignore_eos=True, temperature=1.3, top_p=0.9, top_k=50)
    a = run_one(engine, seed=5, **params).text
    assert run_one(engine, seed=5, **params).text == a
    assert len({run_one(engine, seed=s, **params).text for s in (1, 2, 3)} | {a}) > 1
    jobs = [engine.job("red cat", SamplingParams(seed=5, **params)),
            engine.job("blue dog", SamplingParams(max_new_tokens=10)),
            engine.job("pink owl", SamplingParams(seed=9, **params))]
    engine.run(jobs)
    assert jobs[0].text == a


def test_top_k_one_is_greedy(engine):
    greedy = run_one(engine, max_new_tokens=15, ignore_eos=True).text
    assert run_one(engine, max_new_tokens=15, ignore_eos=True, temperature=2.0, top_k=1,
                   seed=3).text == greedy
    assert run_one(engine, max_new_tokens=15, ignore_eos=True, temperature=2.0,
                   top_p=1e-6, seed=3).text == greedy


def test_streamed_deltas_add_up_to_the_text(engine):
    deltas = []
    job = engine.job("red cat", SamplingParams(max_new_tokens=40, ignore_eos=True),
                     on_text=lambda text, n: deltas.append((text, n)))
    engine.run([job])
    assert "".join(t for t, _ in deltas) == job.text
    assert deltas[-1][1] == 40 and len(deltas) > 5


def test_cancel_stops_the_row_at_the_next_token(engine):
    seen = []
    other = engine.job("blue dog", SamplingParams(max_new_tokens=60, ignore_eos=True))

    def on_text(text, n):
        if n >= 3 and not seen:
            seen.append(n)
            job.cancel()

    job = engine.job("red cat", SamplingParams(max_new_tokens=500, ignore_eos=True),
                     on_text=on_text)
    engine.run([job, other])
    assert job.finish_reason == "cancelled" and job.completion_tokens == seen[0] + 1
    assert other.finish_reason == "length" and other.completion_tokens == 60
    gone = engine.job("red cat", SamplingParams(max_new_tokens=5))
    gone.cancel()
    engine.run([gone])
    assert gone.finish_reason == "cancelled" and gone.completion_tokens == 0


def test_one_batch_at_a_time(engine):
    """run() is safe to call from several threads (it serialises)."""
    jobs = [engine.job("red cat", SamplingParams(max_new_tokens=10, ignore_eos=True))
            for _ in range(3)]
    threads = [threading.Thread(target=engine.run, args=([j],)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len({j.text for j in jobs}) == 1 and all(j.completion_tokens == 10 for j in jobs)


def test_a_long_prompt_and_a_long_generation_never_leave_the_context(engine):
    """A row whose prompt nearly fills the context must not be carried past its end
    while another row still generates (GPT-2's position embeddings end there)."""
    long_job = engine.job("cat " * 1000, SamplingParams(max_new_tokens=500, ignore_eos=True))
    room = engine.context_tokens - long_job.prompt_tokens
    assert 0 < room < 100 and long_job.max_new_tokens == room
    short_job = engine.job("red cat", SamplingParams(max_new_tokens=300, ignore_eos=True))
    assert engine._groups([long_job, short_job]) == [[long_job], [short_job]]
    engine.run([long_job, short_job])
    assert (long_job.finish_reason, long_job.completion_tokens) == ("length", room)
    assert (short_job.finish_reason, short_job.completion_tokens) == ("length", 300)
    a, b = (engine.job("red cat", SamplingParams(max_new_tokens=9)) for _ in range(2))
    assert engine._groups([a, b]) == [[a, b]]
