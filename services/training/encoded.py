"""Tokenised examples in a compact form that crosses the Ray object store cheaply.

Token ids of all examples are stored end to end in one int32 array with offsets,
instead of a list of lists, so that 60k examples are two arrays and not 60k objects.
Batches are padded to their own longest example, not to max_length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class EncodedSplit:
    ids: np.ndarray  # int32, all examples end to end
    offsets: np.ndarray  # int64, len(examples) + 1
    labels: np.ndarray  # int64

    @classmethod
    def from_lists(cls, token_lists: Sequence[Sequence[int]], labels: Sequence[int]) -> "EncodedSplit":
        lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
        offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((i for t in token_lists for i in t), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, offsets, np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def example(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def encode_texts(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int,
                 chunk: int = 4096) -> EncodedSplit:
    token_lists: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        enc = tokenizer(list(texts[start:start + chunk]), truncation=True, max_length=max_length)
        token_lists.extend(enc["input_ids"])
    return EncodedSplit.from_lists(token_lists, labels)


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
