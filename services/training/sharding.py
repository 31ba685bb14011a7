"""Which examples each rank trains on, micro-batch by micro-batch.

Every rank computes the same order of the epoch (a permutation from the seed and the
epoch, optionally grouped by length) and cuts it into global micro-batches of
micro_batch_size x world examples. Each global micro-batch is dealt out to the ranks by
padded size (rows x longest row, `split_by_cost`), not in equal slices, since DDP ranks
wait for the costliest share. The gradient stays that of the whole global batch: each
rank divides its summed loss by the accumulation group's denominator (every rank knows
every example of it), times world, because DDP averages over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

GROUP_BATCHES = 64
"""Batches sorted by length together in group_by_length (HF Trainer uses 50)."""


def group_by_length(order: list[int], lengths: np.ndarray, batch: int, seed: int,
                    group_batches: int = GROUP_BATCHES) -> list[int]:
    """`order` rearranged so that each run of `batch` indices holds examples of similar
    length: groups of `group_batches` batches are sorted by length and cut into batches,
    and the full batches are put in a random order (a function of `seed`). The one
    partial batch, if any, stays last, so the batches cut from the result are exactly
    these. The result is a permutation of `order`, the same for the same arguments
    (resuming skips a prefix of it)."""
    span = batch * group_batches
    full: list[list[int]] = []
    partial: list[int] = []
    for start in range(0, len(order), span):
        # stable: equal lengths keep their shuffled order, so batches differ by epoch
        part = sorted(order[start:start + span], key=lambda i: lengths[i])
        for k in range(0, len(part), batch):
            chunk = part[k:k + batch]
            if len(chunk) == batch:
                full.append(chunk)
            else:
                partial = chunk
    perm = np.random.default_rng(seed).permutation(len(full))
    return [i for b in perm for i in full[b]] + partial


def epoch_order(n: int, seed: int, epoch: int, batch: int,
                lengths: Optional[np.ndarray] = None) -> list[int]:
    """The examples of an epoch in training order, the same on every rank: a
    permutation drawn from (seed, epoch), grouped into batches of similar length when
    `lengths` is given."""
    order = [int(i) for i in np.random.default_rng([seed % 2**63, epoch]).permutation(n)]
    if lengths is not None:
        order = group_by_length(order, lengths, batch, (seed * 1_000_003 + epoch) % 2**63)
    return order


def split_by_cost(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Positions 0..n-1 cut into `parts` runs of the positions sorted longest first,
    so that the largest run cost (rows x its longest length) is as small as possible.

    Every run is non-empty when n >= parts; with fewer positions the last runs are
    empty. The same lengths give the same runs, on every rank.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    width = [max(1, int(lengths[i])) for i in order]
    n = len(width)
    if n <= parts:
        return [[order[i]] if i < n else [] for i in range(parts)]

    def cut(limit: int) -> list[tuple[int, int]]:
        # Greedy is optimal for a cost limit: a run that takes more rows leaves the
        # next run a shorter (or equal) longest row.
        bounds, start = [], 0
        while start < n:
            end = min(n, start + max(1, limit // width[start]))
            bounds.append((start, end))
            start = end
        return bounds

    low = max(width[0], -(-sum(width) // parts))
    high = width[0] * -(-n // parts)  # the equal split of the sorted rows fits
    while low < high:
        mid = (low + high) // 2
        if len(cut(mid)) <= parts:
            high = mid
        else:
            low = mid + 1
    bounds = cut(low)
    while len(bounds) < parts:  # halving the run with most rows never raises a cost
        k = max(range(len(bounds)), key=lambda b: bounds[b][1] - bounds[b][0])
        start, end = bounds[k]
        middle = (start + end) // 2
        bounds[k:k + 1] = [(start, middle), (middle, end)]
    return [order[start:end] for start, end in bounds]


@dataclass
class MicroBatch:
    index: int  # in the epoch
    mine: list[int]  # this rank's examples, empty when the batch has fewer than world
    everyone: list[int]  # the whole global micro-batch
    group: list[int]  # every example of its accumulation group (one optimizer step)
    denominator: float  # what the group's summed loss is divided by for its mean


def micro_batches(order: Sequence[int], lengths: np.ndarray, micro_batch_size: int,
                  accum: int, rank: int, world: int, start: int = 0,
                  denominator: Callable[[list[int]], float] = len) -> Iterator[MicroBatch]:
    """The epoch's micro-batches from the `start`-th on (resuming), with this rank's
    share of each (`split_by_cost`) and its group's loss denominator (`denominator`
    of the group's examples, once per group: Task.loss_denominator)."""
    rows = micro_batch_size * world
    batches = [list(order[k:k + rows]) for k in range(0, len(order), rows)]
    group, weight, group_first = [], 1.0, -1
    for i in range(start, len(batches)):
        everyone = batches[i]
        first = (i // accum) * accum
        if first != group_first:
            group = [x for b in batches[first:first + accum] for x in b]
            weight, group_first = float(denominator(group)), first
        share = split_by_cost(lengths[everyone], world)[rank]
        yield MicroBatch(i, [everyone[p] for p in share], everyone, group, weight)


@dataclass
class Micro:
    """What one rank runs for one micro-batch, from memory or from a stream."""

    index: int  # in the epoch
    items: list  # this rank's examples (Task.dataset items)
    scale: float  # the factor loss_sum is scaled by before backward (share_and_scale)
    samples: int  # examples in the whole global micro-batch
    tokens: int  # their non-padding tokens


def share_and_scale(mb: MicroBatch, world: int) -> tuple[list[int], float]:
    """The examples this rank runs for `mb` and the factor its task.loss_sum is scaled
    by before backward: world / the accumulation group's loss denominator, so that
    DDP's average over ranks is the gradient of the group's mean loss. A rank without a
    share (a last batch smaller than world) still has to take part in the all-reduce:
    it runs one example of the batch with a factor of 0."""
    if not mb.mine:
        return mb.everyone[:1], 0.0
    return mb.mine, world / max(mb.denominator, 1e-12)
