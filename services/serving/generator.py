"""The text-generation model deployment (one per model name). No gRPC in here.

A thin wrapper around the runtime (services/runtime/generator.py: loading, the prompt
template, the smoke generation): it follows the registry (services/serving/follower.py),
batches requests, streams their text and records metrics.

Batching (ServeConfig.generation_batching), unary and streaming requests alike:
- continuous (the default): each version has a ContinuousBatcher
  (services/runtime/continuous.py) that a new request joins at the next decoding step;
  a version that fails `check_continuous` at load gets static batches, with a warning.
- static: requests meet in one GreedyBatcher queue (services/serving/batching.py); a
  batch is one Hugging Face `generate` call per version (`run_jobs`).
A stream sends its text as tokens are produced, at most about STREAM_CHUNKS_PER_S
chunks a second over all of a replica's streams. When a caller goes away, its job is
cancelled and the generating thread drops its row at the next token.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections import deque
from typing import Any, AsyncIterator, Optional

from services.core import metrics
from services.core.config import GENERATION
from services.runtime.continuous import (
    ContinuousBatcher,
    ContinuousUnsupported,
    check_continuous,
)
from services.runtime.generation import GenerationJob
from services.runtime.generator import (
    LoadedGenerator,
    job_result,
    load_generator,
    run_jobs,
    sampling_params,
)
from services.serving.batching import GreedyBatcher, observe_batch
from services.serving.follower import RegistryFollower, falls_back
from services.serving.waiting import wait_event

logger = logging.getLogger("ray.serve")

RECENT_JOBS = 32
STREAM_CHUNKS_PER_S = 100.0
"""Chunks per second one replica sends, shared by its open streams: after its first
chunk (sent at once), a stream sends at most one chunk every open_streams / 100 s,
holding the tokens generated meanwhile; its last chunk goes as soon as generation
ends. Every chunk crosses three processes (this
replica, the ingress, the proxy), which costs more CPU than a decoding step of a small
model; this bound keeps that cost flat as streams are added (docs/benchmarks.md).
One stream gets a chunk every 10 ms, 8 streams one every 80 ms each."""


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
                    loaded.engine, self.max_batch_size,
                    on_admit=functools.partial(self._on_admit, version),
                    on_done=functools.partial(self._record, version),
                    # a lone request starts at once (its first token is what
                    # a caller waits for); requests already queued together are
                    # a burst, which waits for the rest of itself
                    start_wait_s=0.0, burst_wait_s=self.batch_wait_timeout_s)
        return loaded

    def _on_admit(self, version: str, rows: int, waits: list[float]) -> None:
        """Requests joined `version`'s continuous batch (on its batcher's thread)."""
        self.counters["batches"] += 1
        metrics.observe("tuneserve_batch_size", rows, model=self.name, version=version)
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
                       version: Optional[str] = None,
                       routing_key: Optional[str] = None) -> dict[str, Any]:
        """`version`, else the canary candidate or production, answers (follower.py:
        `_answer`; `routing_key` keeps a caller on one)."""
        return await self._answer(version, routing_key,
                                  lambda loaded: self._generate_on(loaded, prompt, params))

    async def _generate_on(self, loaded: LoadedGenerator, prompt: str,
                           params: dict[str, Any]) -> dict[str, Any]:
        job = loaded.engine.job(prompt, sampling_params(params))
        try:
            await self._submit(loaded, job)
        except asyncio.CancelledError:
            job.cancel()  # the caller is gone: stop at the next token
            raise
        return job_result(job, loaded.version)

    async def generate_stream(self, prompt: str, params: dict[str, Any],
                              version: Optional[str] = None,
                              routing_key: Optional[str] = None
                              ) -> AsyncIterator[dict[str, Any]]:
        """Chunks {text, prompt_tokens, completion_tokens, finish_reason, version}; the
        text that became final since the last chunk, the finish reason on the last.
        Routed as `generate`; a candidate that fails before its first chunk leaves the
        stream to production."""
        self._ensure_follower()
        candidate = self._pick_candidate(version, routing_key)
        if candidate is not None:
            sent = False
            try:
                async for chunk in self._stream_on(candidate, prompt, params):
                    sent = True
                    yield chunk
                return
            except Exception as exc:
                if sent or not falls_back(exc) or self.current is None:
                    raise
                self.fell_back(candidate.version, exc)
        async for chunk in self._stream_on(await self._model_for(version), prompt, params):
            yield chunk

    async def _stream_on(self, loaded: LoadedGenerator, prompt: str,
                         params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        texts: list[tuple[str, int, Optional[str]]] = []  # filled by the generating thread
        lock = threading.Lock()
        wake = asyncio.Event()
        waiting = False  # the reader found no text and waits for the next (under lock)

        def on_text(text: str, tokens: int) -> None:  # on the generating thread
            nonlocal waiting
            finish = job.finish_reason
            with lock:  # the event loop is woken only when the reader waits, or at the end
                texts.append((text, tokens, finish))
                notify, waiting = waiting or bool(finish), False
            if notify:
                try:
                    loop.call_soon_threadsafe(wake.set)
                except RuntimeError:  # the caller's loop has closed: nobody reads this
                    job.cancel()

        job = loaded.engine.job(prompt, sampling_params(params), on_text)
        batch = self._submit(loaded, job)
        # Wakes a reader that the batch leaves without a last text (it failed).
        batch.add_done_callback(lambda _: wake.set())
        self.streams += 1
        try:
            while True:
                with lock:
                    got, texts[:] = texts[:], []
                    waiting = not got
                if not got:
                    # The batch's future is settled on this loop, after the generating
                    # thread added its last text: done with no text left, none is coming.
                    if batch.done():
                        batch.result()  # raises the batch's error
                        raise RuntimeError("generation ended without a finish reason")
                    await wake.wait()
                    wake.clear()
                    continue
                _, tokens, finish = got[-1]
                yield {"text": "".join(g[0] for g in got),
                       "prompt_tokens": job.prompt_tokens, "completion_tokens": tokens,
                       "finish_reason": finish, "version": loaded.version}
                if finish:
                    return
                # Let tokens gather (see STREAM_CHUNKS_PER_S), but send the last ones
                # as soon as they are in.
                await wait_event(wake, self.streams / self.stream_chunks_per_s)
                wake.clear()
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
        observe_batch(self.name, [loaded.version for loaded, _ in items])
        try:
            run_jobs(items)
        finally:
            self.generating -= len(items)
            for loaded, job in items:
                self._record(loaded.version, job)
        return [None] * len(items)

    def _record(self, version: str, job: GenerationJob) -> None:
        """A job of `version` ended: counters and metrics."""
        self.counters["requests"] += 1
        self.counters["tokens_generated"] += job.completion_tokens
        if job.completion_tokens:
            metrics.inc("tuneserve_generated_tokens_total", job.completion_tokens,
                        model=self.name, version=version)
        if job.first_token_at is not None:
            metrics.observe("tuneserve_time_to_first_token_seconds",
                            job.first_token_at - job.created_at, model=self.name,
                            version=version)
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
        return {"task": GENERATION, "generating": self.generating + rows,
                "batching": batching, **self.counters, "recent": list(self.recent)}
