"""Tokenised examples in a compact form that crosses the Ray object store cheaply.

An `EncodedSplit` holds every example's token ids end to end in one int32 array with
offsets (two arrays, not one object per example). Generation examples carry a per-token
loss mask: True on the response and its EOS, so the loss is only on what the model
should write. Batches are padded to their own longest example.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from services.core.config import render_prompt
from services.core.errors import DataError
from services.core.modeling import context_length


@dataclass
class EncodedSplit:
    ids: np.ndarray  # int32, all examples end to end
    offsets: np.ndarray  # int64, len(examples) + 1
    labels: np.ndarray  # int64
    loss_mask: Optional[np.ndarray] = None  # bool, aligned with ids (generation only)
    positions: Optional[np.ndarray] = None
    """int32, aligned with ids: each token's position in its own example (packed
    generation splits only; 0 starts an example)."""

    @classmethod
    def from_lists(cls, token_lists: Sequence[Sequence[int]], labels: Sequence[int],
                   masks: Optional[Sequence[Sequence[bool]]] = None,
                   positions: Optional[Sequence[Sequence[int]]] = None) -> "EncodedSplit":
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((i for t in token_lists for i in t), dtype=np.int32, count=int(offsets[-1]))
        loss_mask = None
        if masks is not None:
            loss_mask = np.fromiter((b for m in masks for b in m), dtype=np.bool_,
                                    count=int(offsets[-1]))
        pos = None
        if positions is not None:
            pos = np.fromiter((p for ps in positions for p in ps), dtype=np.int32,
                              count=int(offsets[-1]))
        return cls(ids, offsets, np.asarray(labels, dtype=np.int64), loss_mask, pos)

    def __len__(self) -> int:
        return len(self.labels)

    def example(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def mask(self, i: int) -> np.ndarray:
        return self.loss_mask[self.offsets[i]:self.offsets[i + 1]]

    def position(self, i: int) -> Optional[np.ndarray]:
        """Example i's per-token positions (a packed sequence's), or None."""
        if self.positions is None:
            return None
        return self.positions[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def target_tokens(self) -> int:
        return int(self.loss_mask.sum()) if self.loss_mask is not None else 0


def choose_max_length(lengths: Sequence[int], limit: int, quantile: float = 0.99) -> int:
    """The `quantile` of token lengths, rounded up to a multiple of 8, within [8, limit].

    Covering 99 % of examples in full and truncating the longest 1 % keeps batches
    short (memory and time grow with length) at almost no cost in accuracy.
    """
    if len(lengths) == 0:
        return min(limit, 128)
    q = float(np.quantile(np.asarray(lengths, dtype=np.float64), quantile))
    return int(max(8, min(limit, int(np.ceil(q / 8.0)) * 8)))


def model_limit(ref: str, tokenizer) -> int:
    """The longest input the model accepts, from its config (or its tokenizer)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ref)
    except Exception:  # a tokenizer-only folder: trust the tokenizer
        config = None
    return context_length(config, tokenizer)


PROGRESS_MIN_EXAMPLES = 50_000
"""Tokenising at least this many examples shows a progress bar on a terminal."""


def _chunk_starts(n: int, chunk: int, desc: str) -> Iterator[int]:
    """Offsets of the chunks of n examples; a progress bar on stderr when it is a
    terminal and there are many (a million texts take minutes)."""
    bar = None
    if n >= PROGRESS_MIN_EXAMPLES and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=n, unit="example", desc=f"tokenising {desc}", leave=False,
                   dynamic_ncols=True, file=sys.stderr)
    try:
        for start in range(0, n, chunk):
            yield start
            if bar is not None:
                bar.update(min(chunk, n - start))
    finally:
        if bar is not None:
            bar.close()


def encode_texts(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int,
                 chunk: int = 4096, desc: str = "texts") -> EncodedSplit:
    token_lists: list[list[int]] = []
    for start in _chunk_starts(len(texts), chunk, desc):
        enc = tokenizer(list(texts[start:start + chunk]), truncation=True, max_length=max_length)
        token_lists.extend(enc["input_ids"])
    return EncodedSplit.from_lists(token_lists, labels)


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str],
                 template: Optional[str], max_length: int, packing: bool = False,
                 chunk: int = 4096, desc: str = "examples") -> tuple[EncodedSplit, dict[str, Any]]:
    """Prompt/response pairs -> token ids with the loss masked to the response + EOS.

    The prompt goes through the template and is tokenised on its own, exactly as the
    server does it, so the model learns to continue what it will be shown. An example
    longer than max_length keeps at least half of max_length for its response (or all
    of it when it is shorter): the prompt loses tokens from its start (after any
    leading special tokens such as BOS), the response from its end, and then has no
    EOS since it is incomplete. With `packing`, consecutive examples are joined into
    sequences of at most max_length tokens, each token keeping its position in its own
    example (`EncodedSplit.positions`), so that training can keep examples from
    attending to each other.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no end-of-sequence token; generation training "
                        "appends one to every response")
    special = set(tokenizer.all_special_ids)
    token_lists: list[list[int]] = []
    masks: list[list[bool]] = []
    truncated = 0
    for start in _chunk_starts(len(prompts), chunk, desc):
        rendered = [render_prompt(template, p) for p in prompts[start:start + chunk]]
        p_ids = tokenizer(rendered, add_special_tokens=True)["input_ids"]
        r_ids = tokenizer(list(responses[start:start + chunk]),
                          add_special_tokens=False)["input_ids"]
        for prompt, response in zip(p_ids, r_ids):
            response = list(response) + [eos]
            if len(prompt) + len(response) > max_length:
                truncated += 1
                keep_r = min(len(response), max(max_length // 2, max_length - len(prompt)))
                lead = 0
                while lead < len(prompt) - 1 and prompt[lead] in special:
                    lead += 1
                keep_p = max_length - keep_r
                tail = keep_p - lead
                prompt = prompt[:lead] + (prompt[len(prompt) - tail:] if tail > 0 else [])
                response = response[:keep_r]
            token_lists.append(list(prompt) + response)
            masks.append([False] * len(prompt) + [True] * len(response))
    n_examples = len(token_lists)
    positions = None
    if packing:
        token_lists, masks, positions = pack(token_lists, masks, max_length)
    split = EncodedSplit.from_lists(token_lists, [0] * len(token_lists), masks, positions)
    return split, {"examples": n_examples, "sequences": len(token_lists),
                   "truncated": truncated, "target_tokens": split.target_tokens()}


def pack(token_lists: list[list[int]], masks: list[list[bool]], max_length: int
         ) -> tuple[list[list[int]], list[list[bool]], list[list[int]]]:
    """Consecutive examples joined into sequences of at most max_length tokens: (ids,
    loss masks, positions), a token's position counted from its own example's start."""
    packed_ids: list[list[int]] = []
    packed_masks: list[list[bool]] = []
    packed_pos: list[list[int]] = []
    for ids, mask in zip(token_lists, masks):
        if packed_ids and len(packed_ids[-1]) + len(ids) <= max_length:
            packed_ids[-1].extend(ids)
            packed_masks[-1].extend(mask)
            packed_pos[-1].extend(range(len(ids)))
        else:
            packed_ids.append(list(ids))
            packed_masks.append(list(mask))
            packed_pos.append(list(range(len(ids))))
    return packed_ids, packed_masks, packed_pos


def pad_batch(examples: Sequence[np.ndarray], pad_id: int):
    """(input_ids, attention_mask) tensors padded to the longest example."""
    import torch

    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e)] = torch.from_numpy(e.astype(np.int64))
        mask[row, :len(e)] = 1
    return ids, mask
