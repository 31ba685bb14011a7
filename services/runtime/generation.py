"""Batched text generation with per-request sampling parameters (torch side).

    engine = GenerationEngine(model, tokenizer, prompt_template, context_tokens)
    job = engine.job("blue cat", SamplingParams(max_new_tokens=32, temperature=0.8, seed=7))
    engine.run([job, other_job])          # one batched Hugging Face `generate` call
    job.text, job.finish_reason           # "length", "stop", "eos" or "cancelled"

Each request is sampled with its own parameters and seed (`_RowSampler`), so a seed
gives the same tokens whatever else is batched; each row stops on its own (EOS, a stop
string, max_new_tokens, cancellation: `_RowMonitor`), and text streams to its `on_text`
callback only once final, so streamed text is a prefix of the final text
(docs/design.md, "The engine"). No Ray and no gRPC in here.
"""

from __future__ import annotations

import copy
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from services.core.config import render_prompt
from services.core.errors import InvalidInput
from services.core.modeling import eos_token_ids

FINISH_REASONS = ("length", "stop", "eos", "cancelled")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int = 0
    """0 = a random seed."""
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class GenerationJob:
    """One request: its prompt tokens, parameters, progress and result."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    """params.max_new_tokens clamped to what fits in the model's context."""
    on_text: Optional[Callable[[str, int], None]] = None
    """Called from the generating thread with (new final text, completion tokens)."""
    stop_ids: frozenset[int] = frozenset()
    """Tokens that end the row as a stop string does: the stop strings that are a
    special or added token's text (decoding skips special tokens' text)."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    token_ids: list[int] = field(default_factory=list)
    decoder: Any = field(default=None, repr=False)
    """The row's incremental detokenizer (tokenizers' DecodeStream), made at its first
    token; False once it failed (the text is then decoded whole each step)."""
    pending: list[int] = field(default_factory=list)
    """The row's trailing run of byte-fallback tokens (`<0x5A>`), not given to the
    decoder yet: the run decodes as a whole (bytes that are not UTF-8 together become
    U+FFFD each), so its text can change until a token that is not a byte ends it."""
    completion_tokens: int = 0
    text: str = ""
    settled: int = 0
    """Characters at the start of `text` that later tokens cannot change (the
    streamed text never goes past them)."""
    emitted_chars: int = 0
    finish_reason: str = ""
    created_at: float = field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    """perf_counter() when the first token was produced (time to first token)."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)

    def cancel(self) -> None:
        self.cancelled.set()


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters must wait: a possible stop-string start or an
    incomplete character (decoders show a partial UTF-8 sequence as U+FFFD)."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def byte_fallback_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's byte tokens `<0x00>`..`<0xFF>` (SentencePiece's
    byte fallback, as in Llama 2 and Mistral); none for other tokenizers."""
    vocab = tokenizer.get_vocab()
    return {vocab[name] for b in range(256) if (name := f"<0x{b:02X}>") in vocab}


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest stop string at or after `start`, or -1."""
    found = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(found) if found else -1


class GenerationEngine:
    """A loaded causal LM plus what serving needs around it. Not thread-safe by itself:
    `run` holds a lock, so batches run one at a time."""

    def __init__(self, model, tokenizer, prompt_template: Optional[str], context_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.context_tokens = context_tokens
        eos = eos_token_ids(model.generation_config, tokenizer)
        self.eos_ids = set(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            next(iter(eos), 0)
        # Special and added tokens by their text: a stop string that is one of them
        # also stops at that token.
        self._token_stops = {**dict(zip(tokenizer.all_special_tokens,
                                        tokenizer.all_special_ids)),
                             **tokenizer.get_added_vocab()}
        self._skipped_ids = set(tokenizer.all_special_ids) | {  # what decoding leaves out
            i for i, added in tokenizer.added_tokens_decoder.items() if added.special}
        self._byte_ids = byte_fallback_ids(tokenizer)
        self.tokens_generated = 0
        self._lock = threading.Lock()
        # The Rust tokenizer refuses use from two threads at once ("Already borrowed")
        # when one of them changes its settings: requests tokenise on the event loop
        # while a batch decodes on its thread.
        self._tokenizer_lock = threading.Lock()
        # A fast tokenizer's Rust side, for incremental decoding (_decoded).
        from tokenizers import Tokenizer

        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = backend if isinstance(backend, Tokenizer) else None

    def job(self, prompt: str, params: SamplingParams,
            on_text: Optional[Callable[[str, int], None]] = None) -> GenerationJob:
        """Apply the template, tokenise and check the prompt against the context."""
        with self._tokenizer_lock:
            ids = self.tokenizer(render_prompt(self.prompt_template, prompt),
                                 add_special_tokens=True)["input_ids"]
        room = self.context_tokens - len(ids)
        if room < 1:
            raise InvalidInput(
                f"prompt: {len(ids)} tokens with the prompt template; the model's context "
                f"is {self.context_tokens} tokens, which leaves no room to generate")
        stop_ids = frozenset(self._token_stops[s] for s in params.stop
                             if s in self._token_stops)
        return GenerationJob(list(ids), params, min(params.max_new_tokens, room), on_text,
                             stop_ids=stop_ids)

    def run(self, jobs: Sequence[GenerationJob]) -> None:
        """Generate for every job, in as few `generate` calls as fit; results land in
        the jobs."""
        jobs = [j for j in jobs if not j.done]
        for job in jobs:
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
        with self._lock:
            for group in self._groups([j for j in jobs if not j.done]):
                self._generate(group)

    def _groups(self, jobs: list[GenerationJob]) -> list[list[GenerationJob]]:
        """Split jobs so that, in each group, the longest prompt plus the most new
        tokens fits in the context: a row whose own budget ran out keeps going
        through the model (its output ignored) while others still generate, and its
        positions must stay within the model's (learned position embeddings end)."""
        groups: list[list[GenerationJob]] = []
        for job in sorted(jobs, key=lambda j: -j.prompt_tokens):
            for group in groups:
                longest = group[0].prompt_tokens  # sorted: the first is the longest
                most = max(job.max_new_tokens, *(j.max_new_tokens for j in group))
                if longest + most <= self.context_tokens:
                    group.append(job)
                    break
            else:
                groups.append([job])
        return groups

    def left_padded(self, jobs: Sequence[GenerationJob]):
        """The jobs' prompts as one batch (input ids, attention mask; CPU tensors),
        padded on the left so that every row ends together."""
        import torch

        width = max(j.prompt_tokens for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, width - job.prompt_tokens:] = torch.tensor(job.prompt_ids)
            mask[row, width - job.prompt_tokens:] = 1
        return ids, mask

    def _generate(self, live: list[GenerationJob]) -> None:
        """One batched `generate` call over left-padded prompts."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        device = self.model.device
        ids, mask = self.left_padded(live)
        sampler = _RowSampler(live, self.eos_ids, device)
        monitor = _RowMonitor(self, live)
        with torch.inference_mode():
            self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max(j.max_new_tokens for j in live), do_sample=False,
                logits_processor=LogitsProcessorList([sampler]),
                stopping_criteria=StoppingCriteriaList([monitor]),
                pad_token_id=self.pad_id)
        for job in live:  # e.g. generate stopped on its own max_length
            if not job.done:
                self._finish(job, "length")

    # ---- per-step bookkeeping (called by _RowMonitor) ------------------------------
    def _advance(self, job: GenerationJob, token: int) -> None:
        if job.completion_tokens == 0:
            job.first_token_at = time.perf_counter()
        job.completion_tokens += 1
        self.tokens_generated += 1
        if token in self.eos_ids and not job.params.ignore_eos:
            self._finish(job, "eos")
            return
        if token in job.stop_ids:  # a special token's text: decoding would skip it
            self._finish(job, "stop")
            return
        job.token_ids.append(token)
        seen = job.settled
        text = self._decoded(job, token)
        stops = job.params.stop
        if stops:
            # A stop string can only end after the text that was settled before this
            # token (earlier steps searched that): search from just before its end.
            longest = max(len(s) for s in stops)
            cut = find_stop(text, stops, max(0, seen - longest))
            if cut >= 0:
                job.text = text[:cut]
                self._finish(job, "stop")
                return
        job.text = text
        if job.completion_tokens >= job.max_new_tokens:
            self._finish(job, "length")
        elif job.cancelled.is_set():
            self._finish(job, "cancelled")
        else:
            ready = min(len(text) - held_back(text, stops), job.settled)
            if ready > job.emitted_chars:
                self._emit(job, text[job.emitted_chars:ready])

    def _decoded(self, job: GenerationJob, token: int) -> str:
        """The row's text with `token` (just appended to job.token_ids): what decoding
        all its tokens gives; job.settled says how much of it is final. With a fast
        tokenizer only the newest tokens are decoded (tokenizers' DecodeStream, which
        holds back an incomplete character), so a token costs the same at any length,
        where decoding the whole row each step costs O(length).
        Other tokenizers, or a stream that fails, decode the whole row.

        A run of byte-fallback tokens goes to the stream in one step, with the token
        that ends it: given byte by byte, the stream would show `<0x5A>` as "Z" and
        then refuse `<0x5A><0xB7>` ("\ufffd\ufffd": not UTF-8 together). Until then
        the run's text is a preview, not settled. Special tokens inside a run leave it
        open: decoding skips them, so the bytes on both sides decode together."""
        with self._tokenizer_lock:
            if job.decoder is None and self._backend is not None:
                from tokenizers.decoders import DecodeStream

                job.decoder = DecodeStream(skip_special_tokens=True)
            if token in self._byte_ids or (job.pending and token in self._skipped_ids):
                job.pending.append(token)
                ended = []
            else:
                ended, job.pending = [*job.pending, token], []
            if job.decoder:
                try:
                    return self._streamed(job, ended)
                except Exception:  # noqa: BLE001 - decode this row whole from now on
                    job.decoder = False
            return self._whole(job)

    def _streamed(self, job: GenerationJob, ended: list[int]) -> str:
        """The row's text from its DecodeStream, given the tokens that are no longer
        pending (none while a byte run goes on: its text is previewed on a copy)."""
        settled = job.text[:job.settled]
        if not ended:
            preview = copy.copy(job.decoder).step(self._backend, job.pending)
            return settled + (preview or "")
        text = settled + (job.decoder.step(self._backend, ended) or "")
        job.settled = len(text)
        return text

    def _whole(self, job: GenerationJob) -> str:
        """The row's text from decoding all its tokens; settled: as much of it as
        decoding them without a pending byte run gives, less a trailing incomplete
        character (which the next bytes may complete)."""
        text = final = self._decode(job.token_ids)
        if job.pending:
            final = os.path.commonprefix([self._decode(job.token_ids[:-len(job.pending)]),
                                          text])
        job.settled = len(final.rstrip("\ufffd"))
        return text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def _finish(self, job: GenerationJob, reason: str) -> None:
        job.finish_reason = reason
        job.text = job.text.rstrip("\ufffd")  # a character that will never be completed
        rest = job.text[job.emitted_chars:]
        self._emit(job, rest, force=True)

    @staticmethod
    def _emit(job: GenerationJob, text: str, force: bool = False) -> None:
        job.emitted_chars += len(text)
        if job.on_text is not None and (text or force):
            job.on_text(text, job.completion_tokens)


def row_generator(job: GenerationJob, device):
    """The seeded torch.Generator a sampled row draws from (None for a greedy row)."""
    import torch

    if job.params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(job.params.seed or secrets.randbits(63))
    return gen


def sample_rows(jobs: Sequence[GenerationJob], generators: Sequence, scores, eos: Sequence[int]):
    """Each live row's next-token choice, in place: a sampled row's scores become
    one-hot at its draw (temperature, top-k, top-p, its own generator), a greedy row's
    stay; the argmax of every row is then its token. Done rows are left alone."""
    import torch

    for row, job in enumerate(jobs):
        if job.done:
            continue
        p = job.params
        if p.ignore_eos and eos:
            scores[row, eos] = float("-inf")
        if p.greedy:
            continue
        logits = scores[row] / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the tokens above it already cover top_p; the most
            # likely token always stays.
            drop = (torch.cumsum(probs, dim=-1) - probs) > p.top_p
            logits = logits.scatter(0, order[drop], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        token = torch.multinomial(probs, 1, generator=generators[row])
        scores[row] = float("-inf")
        scores[row, token] = 0.0
    return scores


class _RowSampler:
    """Per-row sampling inside one batched generate (a LogitsProcessor)."""

    def __init__(self, jobs: Sequence[GenerationJob], eos_ids: set, device):
        self.jobs = jobs
        self.eos = sorted(eos_ids)
        self.generators = [row_generator(job, device) for job in jobs]

    def __call__(self, input_ids, scores):
        return sample_rows(self.jobs, self.generators, scores, self.eos)


class _RowMonitor:
    """Per-row bookkeeping and stopping inside one batched generate (a StoppingCriteria)."""

    def __init__(self, engine: GenerationEngine, jobs: Sequence[GenerationJob]):
        self.engine = engine
        self.jobs = jobs

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        new = input_ids[:, -1].tolist()
        for row, job in enumerate(self.jobs):
            if not job.done:
                self.engine._advance(job, new[row])
        return torch.tensor([j.done for j in self.jobs], dtype=torch.bool,
                            device=input_ids.device)
