"""Iteration-level ("continuous") batching for one GenerationEngine (torch side).

    loop = ContinuousBatcher(engine, max_rows=8)
    future = loop.submit(engine.job("red cat", SamplingParams(max_new_tokens=32)))
    future.result()            # the job holds its text and finish reason

A thread decodes the running requests one token per step and admits waiting ones
between steps (their prompts run through the model, their KV-cache rows joined to the
batch); a request that ends leaves at once, and gets the same tokens as in a static
batch (up to the floating-point noise of padding). `check_continuous` verifies that at
load; a model it refuses (ContinuousUnsupported) is served in static batches
(docs/design.md, "Continuous batching"). No Ray and no gRPC in here.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import threading
import time
from collections import deque
from typing import Callable, Optional

from services.core.modeling import dtype_name
from services.runtime.generation import (
    GenerationEngine,
    GenerationJob,
    SamplingParams,
    row_generator,
    sample_rows,
)

logger = logging.getLogger(__name__)

CHECK_PROMPTS = ("tuneserve continuous batching check", "a second, longer prompt for the check")
CHECK_TOKENS = 8


class ContinuousUnsupported(Exception):
    """The model cannot be batched this way (its cache or its outputs)."""


class _Batch:
    """The running rows: jobs, their generators, the KV cache, the attention mask,
    each row's next position id and next input token."""

    def __init__(self):
        self.jobs: list[GenerationJob] = []
        self.generators: list = []
        self.cache = None
        self.mask = None  # [rows, width] long
        self.positions = None  # [rows] long: position id of each row's next input
        self.last = None  # [rows] long: each row's next input token

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def remaining(self) -> int:
        """The most steps any row may still take."""
        return max((j.max_new_tokens - j.completion_tokens for j in self.jobs), default=0)


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ContinuousUnsupported(f"the model's cache ({type(cache).__name__}) has no layers")
    from transformers.cache_utils import DynamicLayer

    for layer in layers:
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            raise ContinuousUnsupported(
                f"the model's cache holds {type(layer).__name__} layers (sliding-window or "
                "other attention), which rows cannot be padded and joined in")
    return layers


def _pad_left(tensor, width: int, dim: int):
    import torch.nn.functional as F

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    pads = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pads)


class ContinuousBatcher:
    """Runs an engine's requests with iteration-level batching on a thread of its own,
    started when a request comes and ended when none is left. At most `max_rows`
    requests decode together; more wait, in order, and join as rows leave. A request
    that finds the batcher idle waits up to `start_wait_s` for a second, and once one
    came up to `burst_wait_s` (from its own arrival) for more, so that a burst's
    prompts go through the model in one pass; requests that come while rows decode
    join at the next step, without waiting. A request joins only if the batch's
    width plus the most steps any row may still take stays within the model's context
    (the cache never outgrows it).

    On the thread: `on_admit(rows, waits)` each time requests join (the rows after,
    each new request's seconds in the queue), `on_done(job)` as each request ends
    (finished, cancelled while waiting, or failed)."""

    def __init__(self, engine: GenerationEngine, max_rows: int = 8,
                 on_admit: Optional[Callable[[int, list[float]], None]] = None,
                 on_done: Optional[Callable[[GenerationJob], None]] = None,
                 start_wait_s: float = 0.0, burst_wait_s: Optional[float] = None):
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        burst_wait_s = start_wait_s if burst_wait_s is None else burst_wait_s
        if start_wait_s < 0 or burst_wait_s < start_wait_s:
            raise ValueError("start_wait_s must be >= 0 and burst_wait_s >= start_wait_s")
        self.engine = engine
        self.max_rows = max_rows
        self.start_wait_s = start_wait_s
        self.burst_wait_s = burst_wait_s
        self.on_admit = on_admit
        self.on_done = on_done
        self.steps = 0
        self.admissions = 0
        self._pending: deque[tuple[GenerationJob, concurrent.futures.Future, float]] = deque()
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._thread: Optional[threading.Thread] = None
        self._batch = _Batch()
        self._prefill_kwargs, self._cache_arg = _forward_arguments(engine.model)

    # ---- the caller's side ---------------------------------------------------------
    def submit(self, job: GenerationJob) -> concurrent.futures.Future:
        """Queue a job; the future resolves (to None) when the job has finished, or
        with the model's error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending.append((job, future, time.perf_counter()))
            self._arrived.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="tuneserve-continuous-batching")
                self._thread.start()
        return future

    @property
    def rows(self) -> int:
        return len(self._batch)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    # ---- the thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never leave callers waiting on a dead thread
            logger.exception("continuous batching stopped")
            error = RuntimeError(f"generation failed: {exc}")
            self._fail_all(error, [])  # the batch is this thread's alone
            with self._lock:  # a request submitted after this starts a new thread
                waiting = list(self._pending)
                self._pending.clear()
                self._thread = None
            for job, future, _ in waiting:
                self._settle(job, future, error)

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._lock:
                    if not len(self._batch):
                        self._gather()
                    admit = self._take_admissible()
                    if not admit and not len(self._batch):
                        self._thread = None
                        return
                try:
                    if admit:
                        self._admit(admit)
                    if len(self._batch):
                        self._step()
                    # Let the other threads have the GIL between steps: the event
                    # loop takes new requests and sends the chunks of this step.
                    time.sleep(0)
                except Exception as exc:  # the model failed: every row in it fails
                    logger.exception("continuous batching step failed")
                    self._fail_all(exc, [job for job, _, _ in admit])

    def _gather(self) -> None:
        """An idle batcher's first request waits up to start_wait_s (from its arrival)
        for a second; once one has come, up to burst_wait_s for the rest of the
        burst, so that its prompts go through the model together (under the lock;
        new requests wake it; a full batch starts at once)."""
        if not self._pending or self.burst_wait_s <= 0:
            return
        first = self._pending[0][2]
        while len(self._pending) < self.max_rows:
            wait = self.start_wait_s if len(self._pending) == 1 else self.burst_wait_s
            left = first + wait - time.perf_counter()
            if left <= 0:
                return
            self._arrived.wait(left)

    def _take_admissible(self) -> list[tuple[GenerationJob, concurrent.futures.Future, float]]:
        """Jobs to join now (under the lock): cancelled ones are finished here."""
        admit = []
        batch = self._batch
        width, remaining = batch.width, batch.remaining()
        while self._pending and len(batch) + len(admit) < self.max_rows:
            job, future, queued = self._pending[0]
            if job.cancelled.is_set() or future.cancelled():
                self._pending.popleft()
                try:
                    self.engine._finish(job, "cancelled")
                except Exception as exc:  # its text callback failed
                    self._settle(job, future, exc)
                else:
                    self._settle(job, future)
                continue
            new_width = max(width, job.prompt_tokens)
            new_remaining = max(remaining, job.max_new_tokens)
            if (len(batch) or admit) and new_width + new_remaining > self.engine.context_tokens:
                break  # waits, in order, until rows leave
            self._pending.popleft()
            admit.append((job, future, queued))
            width, remaining = new_width, new_remaining
        return admit

    def _admit(self, admit) -> None:
        """Prefill the new jobs together, sample their first tokens and join their rows."""
        import torch

        engine, batch = self.engine, self._batch
        jobs = [job for job, _, _ in admit]
        for job, future, _ in admit:
            self._futures[id(job)] = future
        device = engine.model.device
        ids, mask = engine.left_padded(jobs)
        width = ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache(engine.model)
        out = engine.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), use_cache=True,
                           **{self._cache_arg: cache}, **self._prefill_kwargs)
        cache = _cache_of(out)
        layers = _layers(cache)
        generators = [row_generator(job, device) for job in jobs]
        tokens = self._pick(jobs, generators, out.logits[:, -1, :])
        self.admissions += 1
        if self.on_admit is not None:
            now = time.perf_counter()
            self.on_admit(len(batch) + len(jobs), [now - queued for _, _, queued in admit])
        for job, token in zip(jobs, tokens):
            self._advance(job, token)
        keep = [i for i, job in enumerate(jobs) if not job.done]
        self._resolve([job for job in jobs if job.done])
        if not keep:
            return
        new_positions = torch.tensor([jobs[i].prompt_tokens for i in keep], dtype=torch.long)
        new_last = torch.tensor([tokens[i] for i in keep], dtype=torch.long)
        index = _row_index(keep, device)
        new_mask = mask.to(device)[index]
        if not len(batch):
            for layer in layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
            batch.cache, batch.mask = cache, new_mask
            batch.positions, batch.last = new_positions.to(device), new_last.to(device)
        else:
            joined = max(batch.width, width)
            for old, new in zip(_layers(batch.cache), layers):
                old.keys = torch.cat([_pad_left(old.keys, joined, -2),
                                      _pad_left(new.keys[index], joined, -2)])
                old.values = torch.cat([_pad_left(old.values, joined, -2),
                                        _pad_left(new.values[index], joined, -2)])
            batch.mask = torch.cat([_pad_left(batch.mask, joined, 1),
                                    _pad_left(new_mask, joined, 1)])
            batch.positions = torch.cat([batch.positions, new_positions.to(device)])
            batch.last = torch.cat([batch.last, new_last.to(device)])
        batch.jobs += [jobs[i] for i in keep]
        batch.generators += [generators[i] for i in keep]

    def _step(self) -> None:
        """One token for every running row; finished rows leave."""
        import torch

        engine, batch = self.engine, self._batch
        for job in batch.jobs:  # a cancelled row leaves before the model runs again
            if job.cancelled.is_set() and not job.done:
                self._advance(job, None)
        self._drop_done()
        if not len(batch):
            return
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
        out = engine.model(input_ids=batch.last[:, None], attention_mask=batch.mask,
                           position_ids=batch.positions[:, None], use_cache=True,
                           **{self._cache_arg: batch.cache})
        batch.cache = _cache_of(out)
        self.steps += 1
        tokens = self._pick(batch.jobs, batch.generators, out.logits[:, -1, :])
        batch.positions = batch.positions + 1
        batch.last = torch.tensor(tokens, dtype=torch.long, device=batch.last.device)
        for job, token in zip(batch.jobs, tokens):
            self._advance(job, token)
        self._drop_done()

    def _advance(self, job: GenerationJob, token: Optional[int]) -> None:
        """The engine's bookkeeping for a row's new token (None: finish it as
        cancelled). A failure there (the request's text callback) fails that request
        alone: it leaves the batch with the error and the others go on."""
        try:
            if token is None:
                self.engine._finish(job, "cancelled")
            else:
                self.engine._advance(job, token)
        except Exception as exc:
            logger.warning("a generation request failed: %s", exc)
            job.finish_reason = job.finish_reason or "failed"
            future = self._futures.pop(id(job), None)
            if future is not None:
                self._settle(job, future, exc)

    def _pick(self, jobs, generators, logits) -> list[int]:
        scores = logits.float()
        sample_rows(jobs, generators, scores, sorted(self.engine.eos_ids))
        return scores.argmax(dim=-1).tolist()

    def _drop_done(self) -> None:
        batch = self._batch
        done = [job for job in batch.jobs if job.done]
        if not done:
            return
        keep = [i for i, job in enumerate(batch.jobs) if not job.done]
        self._resolve(done)
        if not keep:
            self._batch = _Batch()
            return
        index = _row_index(keep, batch.mask.device)
        mask = batch.mask[index]
        # Columns that every remaining row has as padding go.
        first = int(mask.any(dim=0).nonzero()[0])
        for layer in _layers(batch.cache):
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        batch.mask = mask[:, first:]
        batch.positions, batch.last = batch.positions[index], batch.last[index]
        batch.jobs = [batch.jobs[i] for i in keep]
        batch.generators = [batch.generators[i] for i in keep]

    def _resolve(self, jobs: list[GenerationJob]) -> None:
        """Settle the ended jobs not settled yet (a failed one was, with its error)."""
        for job in jobs:
            future = self._futures.pop(id(job), None)
            if future is not None:
                self._settle(job, future)

    def _settle(self, job: GenerationJob, future, error: Optional[Exception] = None) -> None:
        """The job has ended: tell whoever waits (a future cancelled by its caller is
        done already) and on_done."""
        if future is not None and not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        if self.on_done is not None:
            try:
                self.on_done(job)
            except Exception:
                logger.exception("on_done failed")

    def _fail_all(self, exc: Exception, admitting: list[GenerationJob]) -> None:
        """Every job the failed step held that has not ended yet fails with `exc`."""
        for job in {id(j): j for j in [*self._batch.jobs, *admitting]}.values():
            future = self._futures.pop(id(job), None)
            if future is not None:  # not settled yet
                self._settle(job, future, exc)
        self._batch = _Batch()


def _row_index(rows: list[int], device):
    import torch

    return torch.tensor(rows, dtype=torch.long, device=device)


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def _forward_arguments(model) -> tuple[dict, str]:
    """(extra prefill arguments, the name the forward pass takes its cache by):
    only the last position's logits from a prefill, where the model can say so; the
    cache is `cache` in recent transformers, `past_key_values` before."""

    try:
        accepted = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}, "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    return extra, "cache" if "cache" in accepted else "past_key_values"


def _cache_of(output):
    for name in ("cache", "past_key_values"):
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    raise ContinuousUnsupported("the model's forward pass returned no cache")


def check_continuous(engine: GenerationEngine) -> None:
    """Raise ContinuousUnsupported unless greedy requests get the same tokens from
    continuous batching as from static batches: one request alone, a second joining
    it after its first steps (the padded join), and both decoding together. Run at
    load, before the version serves; it drives the batcher on this thread."""
    import torch

    def jobs():
        return [engine.job(p, SamplingParams(max_new_tokens=CHECK_TOKENS, ignore_eos=True))
                for p in CHECK_PROMPTS]

    try:
        static = jobs()
        for job in static:
            engine.run([job])
        loop = ContinuousBatcher(engine, max_rows=len(CHECK_PROMPTS))
        first, second = jobs()
        with torch.inference_mode():
            loop._admit([(first, concurrent.futures.Future(), 0.0)])
            for _ in range(2):
                loop._step()
            loop._admit([(second, concurrent.futures.Future(), 0.0)])
            while len(loop._batch):
                loop._step()
    except ContinuousUnsupported:
        raise
    except Exception as exc:
        raise ContinuousUnsupported(f"{type(exc).__name__}: {exc}") from exc
    for want, got in zip(static, (first, second)):
        if got.token_ids == want.token_ids:
            continue
        step = next((i for i, (a, b) in enumerate(zip(got.token_ids, want.token_ids))
                     if a != b), min(len(got.token_ids), len(want.token_ids)))
        if not _near_tie(engine, want, step, got.token_ids[step:step + 1]):
            raise ContinuousUnsupported(
                "greedy tokens differ from a static batch's "
                f"({got.token_ids} against {want.token_ids})")


NEAR_TIE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}
"""How close (in logits) the two best next tokens may be for the check to accept a
divergence there: batches of other shapes round differently, and in bfloat16 (8 bits
of mantissa: steps of 0.06-0.125 for logits of 8-16) that can swap two tokens that
are all but tied. Anything else is a real difference."""


def _near_tie(engine: GenerationEngine, job: GenerationJob, step: int, other: list[int]) -> bool:
    """Whether the static run's choice at `step` was all but tied with `other` (the
    token continuous batching chose there), by the model's own logits for the
    static run's prefix."""
    import torch


    if not other or step >= len(job.token_ids):
        return False
    ids = torch.tensor([job.prompt_ids + job.token_ids[:step]], device=engine.model.device)
    with torch.inference_mode():
        logits = engine.model(input_ids=ids).logits[0, -1].float()
    gap = float(logits[job.token_ids[step]] - logits[other[0]])
    return abs(gap) <= NEAR_TIE.get(dtype_name(engine.model), 1e-3)
