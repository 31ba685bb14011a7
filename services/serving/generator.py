"""The text-generation model deployment (one per model name). No gRPC in here.

Follows the registry like the classifier (services/serving/follower.py): verify, load
beside the old version, smoke-test, swap. A generation version must carry its prompt
template (tuneserve.json in the checkpoint, the same as the manifest's), which every
request's prompt goes through, exactly as at training time.

Batching (ServeConfig.generation_batching), unary and streaming requests alike:
- continuous (the default): each version has a ContinuousBatcher
  (services/runtime/continuous.py), a thread that decodes the running requests one token a
  step; a new request joins at the next step (its prompt run through the model, its
  cache rows joined to the batch) and a finished one leaves at once. Only a request
  that finds the replica idle waits: a quarter of `batch_wait_timeout_s` for a
  second, and all of it once one came, so that a burst starts together. Checked at load
  against a static batch (same greedy tokens); a version that fails the check, or
  whose model's cache cannot be joined (sliding-window attention), gets static
  batches, with a warning.
- static: requests meet in one queue (a GreedyBatcher, services/serving/batching.py);
  a batch is one Hugging Face `generate` call over left-padded prompts
  (services/runtime/generation.py). Batches run one at a time per replica: a request that
  arrives while one runs waits for it to end, so a batch waits up to
  `batch_wait_timeout_s` for more requests to join; a lone request waits a quarter
  of that for a second one, or all of it for a while after a burst split
  (batching.py; docs/benchmarks.md has the figures).
Both sample each request with its own parameters and seed. A streaming request gets
its text through a callback from the generating thread: its first chunk leaves with
the first token, the next ones as tokens are produced, grouped so that a replica
sends at most about 100 chunks a second over all its streams (STREAM_CHUNKS_PER_S).

Cancellation: when a caller goes away (client cancel, deadline), Serve cancels this
replica's request; the request then sets its job's `cancelled` event, and the
generating thread drops the row at the next token (a static batch ends once every row
has stopped). `status()` counts what was generated, so this can be observed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from services.core import metrics
from services.core.errors import CorruptVersion
from services.runtime.continuous import ContinuousBatcher, ContinuousUnsupported, check_continuous
from services.runtime.generation import GenerationEngine, GenerationJob, SamplingParams
from services.serving.batching import GreedyBatcher
from services.serving.follower import RegistryFollower

logger = logging.getLogger("ray.serve")

SMOKE_PROMPT = "tuneserve smoke test"
RECENT_JOBS = 32
STREAM_CHUNKS_PER_S = 100.0
"""Chunks per second one replica sends, shared by its open streams: after its first
chunk (sent at once), a stream sends at most one chunk every open_streams / 100 s,
holding the tokens generated meanwhile. Every chunk crosses three processes (this
replica, the ingress, the proxy), which costs more CPU than a decoding step of a small
model; this bound keeps that cost flat as streams are added (docs/benchmarks.md).
One stream gets a chunk every 10 ms, 8 streams one every 80 ms each."""


@dataclass
class LoadedGenerator:
    version: str
    engine: GenerationEngine
    prompt_template: Optional[str]
    loaded_at: float
    continuous: Optional[ContinuousBatcher] = None
    """The version's continuous batcher; None: its requests go in static batches."""

    @property
    def dtype(self) -> str:
        from services.core.modeling import dtype_name

        return dtype_name(self.engine.model)


def load_generator(registry, name: str, version: str, dtype: str = "auto") -> LoadedGenerator:
    """Verify, load and smoke-test one generation version (runs in a worker thread); the
    weights in `services.core.modeling.serving_dtype(dtype)`."""
    from services.core.modeling import GENERATION_FILE, context_length, load_causal_lm_for_serving

    manifest = registry.verify(name, version)
    if manifest.get("task") != "generation":
        raise CorruptVersion(f"{name} {version}: task is {manifest.get('task')!r}, "
                             "not generation")
    folder = registry.local_copy(name, version)
    template = manifest.get("prompt_template")
    task_file = folder / GENERATION_FILE
    if task_file.is_file():
        try:
            saved = json.loads(task_file.read_text(encoding="utf-8"))
        except ValueError:
            raise CorruptVersion(f"{name} {version}: {GENERATION_FILE} is not valid JSON") \
                from None
        if "prompt_template" in manifest and saved.get("prompt_template") != template:
            raise CorruptVersion(f"{name} {version}: the checkpoint's prompt template "
                                 "differs from the manifest's")
        template = saved.get("prompt_template")
    model, tokenizer = load_causal_lm_for_serving(folder, dtype)
    engine = GenerationEngine(model, tokenizer, template, context_length(model.config, tokenizer))
    job = engine.job(SMOKE_PROMPT, SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.run([job])
    if job.completion_tokens != 2:
        raise CorruptVersion(f"{name} {version}: smoke generation produced "
                             f"{job.completion_tokens} tokens instead of 2")
    return LoadedGenerator(version, engine, template, time.time())


def sampling_params(params: dict[str, Any]) -> SamplingParams:
    """The ingress's validated parameters (plain values) -> SamplingParams."""
    return SamplingParams(
        max_new_tokens=int(params["max_new_tokens"]),
        temperature=float(params.get("temperature", 0.0)),
        top_p=float(params.get("top_p", 1.0)), top_k=int(params.get("top_k", 0)),
        stop=tuple(params.get("stop") or ()), seed=int(params.get("seed", 0)),
        ignore_eos=bool(params.get("ignore_eos", False)))


def job_result(job: GenerationJob, version: str) -> dict[str, Any]:
    return {"text": job.text, "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens, "finish_reason": job.finish_reason,
            "version": version}


class Generator(RegistryFollower):
    """Serve deployment class; `app.py` wraps it with `serve.deployment`."""

    def __init__(self, registry: str, name: str, channel: str = "production",
                 poll_interval_s: float = 2.0, threads: Optional[int] = None,
                 cache_versions: int = 2, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.005, board: Any = None,
                 stream_chunks_per_s: float = STREAM_CHUNKS_PER_S, dtype: str = "auto",
                 batching: str = "continuous"):
        super().__init__(registry, name, channel=channel, poll_interval_s=poll_interval_s,
                         threads=threads, cache_versions=cache_versions, board=board,
                         dtype=dtype)
        self.stream_chunks_per_s = stream_chunks_per_s
        self.batching = batching  # ServeConfig.generation_batching
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_batch_size = max_batch_size
        self.streams = 0
        self.generating = 0
        self.counters = {"requests": 0, "batches": 0, "tokens_generated": 0, "cancelled": 0}
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_JOBS)
        self._batcher = GreedyBatcher(
            self._run_batch, max_batch_size, batch_wait_timeout_s,
            on_batch=lambda n: metrics.observe("tuneserve_batch_size", n, model=self.name),
            on_wait=lambda s: metrics.observe("tuneserve_batch_wait_seconds", s,
                                              model=self.name))

    def _load_version(self, version: str) -> LoadedGenerator:
        return self._with_batching(load_generator(self.registry, self.name, version,
                                                  self.dtype))

    def _with_batching(self, loaded: LoadedGenerator) -> LoadedGenerator:
        """Give a loaded version its continuous batcher, once it passed the check."""
        version = loaded.version
        if self.batching == "continuous":
            try:
                check_continuous(loaded.engine)
            except ContinuousUnsupported as exc:
                logger.warning("%s %s: static batches instead of continuous batching: %s",
                               self.name, version, exc)
            else:
                loaded.continuous = ContinuousBatcher(
                    loaded.engine, self.max_batch_size, on_admit=self._on_admit,
                    on_done=self._record, start_wait_s=self.batch_wait_timeout_s / 4,
                    burst_wait_s=self.batch_wait_timeout_s)
        return loaded

    def _on_admit(self, rows: int, waits: list[float]) -> None:  # the batcher's thread
        self.counters["batches"] += 1
        metrics.observe("tuneserve_batch_size", rows, model=self.name)
        for wait in waits:
            metrics.observe("tuneserve_batch_wait_seconds", wait, model=self.name)

    def _submit(self, loaded: LoadedGenerator, job: GenerationJob) -> asyncio.Future:
        """The job on its way: into the version's continuous batch, or the static
        batcher's queue. The future ends when the job has."""
        if loaded.continuous is not None:
            return asyncio.wrap_future(loaded.continuous.submit(job))
        return asyncio.ensure_future(self._batcher.submit((loaded, job)))

    # ---- requests ------------------------------------------------------------------
    async def generate(self, prompt: str, params: dict[str, Any],
                       version: Optional[str] = None) -> dict[str, Any]:
        loaded = await self._model_for(version)
        job = loaded.engine.job(prompt, sampling_params(params))
        try:
            await self._submit(loaded, job)
        except asyncio.CancelledError:
            job.cancel()  # the caller is gone: stop at the next token
            raise
        return job_result(job, loaded.version)

    async def generate_stream(self, prompt: str, params: dict[str, Any],
                              version: Optional[str] = None) -> AsyncIterator[dict[str, Any]]:
        """Chunks {text, prompt_tokens, completion_tokens, finish_reason, version}; the
        text that became final since the last chunk, the finish reason on the last."""
        loaded = await self._model_for(version)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_text(text: str, tokens: int) -> None:  # on the generating thread
            try:
                loop.call_soon_threadsafe(events.put_nowait,
                                          (text, tokens, job.finish_reason))
            except RuntimeError:  # the caller's loop has closed: nobody reads this
                job.cancel()

        job = loaded.engine.job(prompt, sampling_params(params), on_text)
        batch = self._submit(loaded, job)
        # Wakes the reader if the batch ends without a final chunk (it failed).
        batch.add_done_callback(lambda _: events.put_nowait(None))
        self.streams += 1
        try:
            while True:
                got = [await events.get()]
                while not events.empty():  # whatever else is ready goes in this chunk
                    got.append(events.get_nowait())
                chunks = [g for g in got if g is not None]
                if chunks:
                    _, tokens, finish = chunks[-1]
                    yield {"text": "".join(c[0] for c in chunks),
                           "prompt_tokens": job.prompt_tokens, "completion_tokens": tokens,
                           "finish_reason": finish, "version": loaded.version}
                    if finish:
                        return
                    # Let tokens gather (see STREAM_CHUNKS_PER_S).
                    await asyncio.sleep(self.streams / self.stream_chunks_per_s)
                if None in got:
                    batch.result()  # raises the batch's error
                    raise RuntimeError("generation ended without a finish reason")
        finally:
            self.streams -= 1
            if not job.done:
                job.cancel()  # the caller is gone (or failed): stop at the next token
                batch.cancel()  # still queued: the batcher drops it

    # ---- batching ------------------------------------------------------------------
    def _run_batch(self, items: list[tuple[LoadedGenerator, GenerationJob]]) -> list[None]:
        """One batch, in the batcher's worker thread: one `generate` call per model
        version."""
        self.generating += len(items)
        self.counters["batches"] += 1
        try:
            groups: dict[int, list] = {}
            for loaded, job in items:
                groups.setdefault(id(loaded), [loaded]).append(job)
            for loaded, *jobs in groups.values():
                loaded.engine.run(jobs)
        finally:
            self.generating -= len(items)
            for _, job in items:
                self._record(job)
        return [None] * len(items)

    def _record(self, job: GenerationJob) -> None:
        self.counters["requests"] += 1
        self.counters["tokens_generated"] += job.completion_tokens
        if job.completion_tokens:
            metrics.inc("tuneserve_generated_tokens_total", job.completion_tokens,
                        model=self.name)
        if job.first_token_at is not None:
            metrics.observe("tuneserve_time_to_first_token_seconds",
                            job.first_token_at - job.created_at, model=self.name)
        if job.finish_reason == "cancelled":
            self.counters["cancelled"] += 1
        self.recent.append({"finish_reason": job.finish_reason or "failed",
                            "completion_tokens": job.completion_tokens,
                            "max_new_tokens": job.max_new_tokens,
                            "prompt_tokens": job.prompt_tokens})

    def _status_extra(self) -> dict[str, Any]:
        loaded = [self.current, *self.others.values()] if self.current else \
            list(self.others.values())
        rows = sum(x.continuous.rows for x in loaded if x.continuous is not None)
        batching = None
        if self.current is not None:
            batching = "continuous" if self.current.continuous is not None else "static"
        return {"task": "generation", "generating": self.generating + rows,
                "batching": batching, **self.counters, "recent": list(self.recent)}
