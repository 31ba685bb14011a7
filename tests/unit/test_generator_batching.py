"""The Generator deployment's two ways of batching (ServeConfig.generation_batching),
in-process without Ray: the deployment class called the way the ingress calls it,
over a tiny engine. Continuous and static give the same text; a model that cannot be
batched continuously falls back to static batches with a warning; a stream abandoned
by its caller stops; the status says which way a replica batches."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from services.core.config import ServeConfig
from services.core.errors import ConfigError
from services.runtime.generation import GenerationEngine, SamplingParams
from services.runtime.generator import LoadedGenerator
from services.serving.generator import Generator
from tests.unit.test_continuous import PROMPTS, _engine


class _InProcess(Generator):
    """A Generator whose version is a given engine instead of a registry's, with no
    registry follower."""

    def __init__(self, engine: GenerationEngine, tmp_path, **kwargs):
        super().__init__(str(tmp_path), "gen", poll_interval_s=60, **kwargs)
        self.engine = engine

    def _ensure_follower(self) -> None:
        pass

    def _load_version(self, version: str) -> LoadedGenerator:
        return self._with_batching(LoadedGenerator(version, self.engine, None, time.time()))


@pytest.fixture(scope="module")
def tokenizer():
    from tests.helpers import build_bpe_tokenizer

    return build_bpe_tokenizer(PROMPTS * 3 + ["Q: A: the a of and to in"])


def _serve(engine, tmp_path, **kwargs) -> _InProcess:
    gen = _InProcess(engine, tmp_path, **kwargs)
    gen.current = gen._load_version("v1")
    return gen


PARAMS = [{"max_new_tokens": 12, "ignore_eos": True},
          {"max_new_tokens": 9, "ignore_eos": True, "temperature": 0.9, "seed": 3}]


async def _calls(gen: Generator) -> list[str]:
    """Unary and streaming requests at once; the texts in order."""
    async def stream(prompt, params):
        return "".join([c["text"] async for c in gen.generate_stream(prompt, params)])

    calls = []
    for i, prompt in enumerate(PROMPTS):
        params = PARAMS[i % 2]
        calls.append(gen.generate(prompt, params) if i % 3 else stream(prompt, params))
    answers = await asyncio.gather(*calls)
    return [a if isinstance(a, str) else a["text"] for a in answers]


def _expected(engine) -> list[str]:
    texts = []
    for i, prompt in enumerate(PROMPTS):
        job = engine.job(prompt, SamplingParams(**PARAMS[i % 2]))
        engine.run([job])
        texts.append(job.text)
    return texts


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_both_ways_give_the_texts_of_the_engine_alone(batching, tokenizer, tmp_path):
    engine = _engine("gpt2", tokenizer)
    gen = _serve(engine, tmp_path, batching=batching, batch_wait_timeout_s=0.005)
    assert (gen.current.continuous is not None) == (batching == "continuous")
    texts = asyncio.run(_calls(gen))
    assert texts == _expected(engine)
    status = gen._status_extra()
    assert status["batching"] == batching and status["generating"] == 0
    assert status["requests"] == len(PROMPTS)
    assert 1 <= status["batches"] < len(PROMPTS)  # requests shared batches
    assert status["tokens_generated"] == sum(PARAMS[i % 2]["max_new_tokens"]
                                             for i in range(len(PROMPTS)))
    assert [r["finish_reason"] for r in status["recent"]] == ["length"] * len(PROMPTS)


def test_a_model_that_cannot_join_rows_falls_back_to_static(tokenizer, tmp_path, caplog):
    engine = _engine("mistral-sliding", tokenizer)
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        gen = _serve(engine, tmp_path, batching="continuous")
    assert gen.current.continuous is None
    assert "static batches instead of continuous batching" in caplog.text
    assert "DynamicSlidingWindowLayer" in caplog.text
    answer = asyncio.run(gen.generate("red cat", PARAMS[0]))
    assert answer["finish_reason"] == "length" and answer["completion_tokens"] == 12
    assert gen._status_extra()["batching"] == "static"


def test_an_abandoned_stream_stops_generating(tokenizer, tmp_path):
    engine = _engine("llama", tokenizer)
    gen = _serve(engine, tmp_path, batching="continuous", stream_chunks_per_s=1000.0)

    async def scenario():
        stream = gen.generate_stream("red cat", {"max_new_tokens": 400, "ignore_eos": True})
        first = await stream.__anext__()  # the caller reads one chunk and goes away
        await stream.aclose()
        return first

    first = asyncio.run(scenario())
    assert first["completion_tokens"] >= 1

    def recorded():
        recent = gen._status_extra()["recent"]
        return recent and recent[-1]

    deadline = time.monotonic() + 30
    while not recorded() and time.monotonic() < deadline:
        time.sleep(0.01)
    record = recorded()
    assert record and record["finish_reason"] == "cancelled"
    assert record["completion_tokens"] < 400
    assert gen._status_extra()["cancelled"] == 1


def test_a_lone_stream_neither_waits_for_company_nor_for_its_last_chunk(tokenizer, tmp_path):
    """A request that finds the replica idle starts at once, whatever the burst wait,
    and a stream's last text goes out when generation ends, not after the pause that
    paces its chunks: here a burst wait of 30 s and one chunk every 10 s."""
    engine = _engine("gpt2", tokenizer)
    gen = _serve(engine, tmp_path, batching="continuous", batch_wait_timeout_s=30.0,
                 stream_chunks_per_s=0.1)

    async def stream():
        started, chunks = time.monotonic(), []
        async for chunk in gen.generate_stream("red cat", {"max_new_tokens": 12,
                                                           "ignore_eos": True}):
            chunks.append((time.monotonic() - started, chunk))
        return chunks

    chunks = asyncio.run(stream())
    assert chunks[-1][1]["finish_reason"] == "length"
    assert chunks[-1][1]["completion_tokens"] == 12
    assert chunks[0][0] < 5.0, chunks  # a quarter of the burst wait would be 7.5 s
    assert chunks[-1][0] < 5.0, chunks  # the pacing pause is 10 s


def test_the_setting_is_checked():
    assert ServeConfig(generation_batching="static").validate().generation_batching == "static"
    with pytest.raises(ConfigError, match="'generation_batching'.*'dynamic' is not one of"):
        ServeConfig(generation_batching="dynamic").validate()
