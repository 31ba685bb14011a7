"""Dealing global micro-batches out to ranks by padded cost, without Ray: the split is
optimal, every example is trained once per epoch, resuming replays the same order, and
the ranks' scaled gradients average to exactly the whole batch's gradient."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest

from services.training.sharding import (
    epoch_order,
    group_by_length,
    micro_batches,
    share_and_scale,
    split_by_cost,
)


def _cost(lengths, run) -> int:
    return len(run) * max((lengths[p] for p in run), default=0)


def _best_cost(lengths, parts) -> int:
    """Brute force: every way to cut the sorted positions into `parts` non-empty runs."""
    s = sorted(lengths, reverse=True)
    best = None
    for cuts in itertools.combinations(range(1, len(s)), parts - 1):
        bounds = (0, *cuts, len(s))
        worst = max((b - a) * s[a] for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


def test_split_by_cost_is_optimal_and_covers_every_position_once():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, parts = int(rng.integers(2, 11)), int(rng.integers(2, 5))
        lengths = [int(x) for x in rng.integers(1, 60, size=n)]
        runs = split_by_cost(lengths, parts)
        assert len(runs) == parts
        assert sorted(p for run in runs for p in run) == list(range(n))
        if n >= parts:
            assert all(runs), runs
            assert max(_cost(lengths, r) for r in runs) == _best_cost(lengths, parts)
        assert split_by_cost(lengths, parts) == runs  # the same on every rank


def test_split_by_cost_gives_the_longest_text_fewer_rows():
    lengths = [64] + [8] * 31
    runs = split_by_cost(lengths, 2)
    assert runs[0] == [0, 1, 2]  # 3 x 64 = 192 against 29 x 8 = 232
    assert max(_cost(lengths, r) for r in runs) == 232  # an equal split costs 16 x 64
    assert split_by_cost([5, 7], 4) == [[1], [0], [], []]
    assert split_by_cost([3] * 6, 3) == [[0, 1], [2, 3], [4, 5]]


def test_micro_batches_deal_every_example_once_and_resume_in_the_same_order():
    lengths = np.random.default_rng(1).integers(2, 50, size=101)
    world, micro, accum = 3, 4, 2
    order = epoch_order(len(lengths), seed=7, epoch=2, batch=micro * world)
    assert order == epoch_order(len(lengths), seed=7, epoch=2, batch=micro * world)
    assert order != epoch_order(len(lengths), seed=7, epoch=3, batch=micro * world)
    per_rank = [list(micro_batches(order, lengths, micro, accum, r, world))
                for r in range(world)]
    assert [len(b) for b in per_rank] == [9] * world  # ceil(101 / 12)
    seen = [x for batches in per_rank for b in batches for x in b.mine]
    assert sorted(seen) == list(range(101))
    for k in range(9):
        everyone = per_rank[0][k].everyone
        assert everyone == order[k * 12:(k + 1) * 12]
        assert sorted(x for r in range(world) for x in per_rank[r][k].mine) == sorted(everyone)
        first = (k // accum) * accum
        assert per_rank[0][k].group == order[first * 12:(first + accum) * 12]
        assert per_rank[0][k].denominator == len(per_rank[0][k].group)  # the default
    resumed = list(micro_batches(order, lengths, micro, accum, 1, world, start=4))
    assert [(b.index, b.mine) for b in resumed] == [(b.index, b.mine) for b in per_rank[1][4:]]
    # the last batch holds 5 examples: still one for each rank
    assert all(per_rank[r][-1].mine for r in range(world))
    tail = list(micro_batches(order[:25], lengths, micro, accum, 2, world))
    assert tail[-1].everyone == order[24:25] and tail[-1].mine == []


def _padded_tokens(order, lengths, batch):
    return sum(int(lengths[order[k:k + batch]].max()) * len(order[k:k + batch])
               for k in range(0, len(order), batch))


def test_group_by_length_cuts_padding_and_keeps_every_example_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 120, size=1003)  # 1003: the last batch is partial
    order = [int(i) for i in rng.permutation(len(lengths))]
    grouped = group_by_length(order, lengths, batch=16, seed=7, group_batches=8)
    assert sorted(grouped) == sorted(order)
    # only the final batch is partial, so the loader cuts exactly the grouped batches
    batches = [grouped[k:k + 16] for k in range(0, len(grouped), 16)]
    assert [len(b) for b in batches[:-1]] == [16] * (len(batches) - 1)
    assert len(batches[-1]) == len(order) % 16
    assert _padded_tokens(grouped, lengths, 16) < 0.65 * _padded_tokens(order, lengths, 16)
    # deterministic for a seed (resuming replays the same order), batches shuffled
    assert grouped == group_by_length(order, lengths, batch=16, seed=7, group_batches=8)
    other = group_by_length(order, lengths, batch=16, seed=8, group_batches=8)
    assert other != grouped and sorted(other) == sorted(grouped)
    widths = [int(lengths[b].max()) for b in batches[:-1]]
    assert widths != sorted(widths)  # not one long sweep from short to long


def test_grouped_epoch_order_pads_less():
    lengths = np.random.default_rng(2).integers(2, 120, size=640)
    plain = epoch_order(640, seed=0, epoch=0, batch=32)
    grouped = epoch_order(640, seed=0, epoch=0, batch=32, lengths=lengths)
    assert sorted(grouped) == sorted(plain) == list(range(640))
    assert _padded_tokens(grouped, lengths, 32) < 0.6 * _padded_tokens(plain, lengths, 32)


def _sharded_grads(task, model, split, dataset, order, micro, accum, world):
    """What DDP computes: each rank's scaled loss_sum, gradients averaged over ranks."""
    model.zero_grad()
    for rank in range(world):
        for mb in micro_batches(order, split.lengths(), micro, accum, rank, world,
                                denominator=lambda ids: task.loss_denominator(split, ids)):
            share, scale = share_and_scale(mb, world)
            batch = task.collate([dataset[k] for k in share])
            (task.loss_sum(model, batch, contextlib.nullcontext) * scale).backward()
    return {n: p.grad.clone() / world for n, p in model.named_parameters()
            if p.grad is not None}


def _whole_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("weights", [None, [1.0, 3.0]])
def test_sharded_classification_gradient_equals_the_whole_batch(tiny_model_dir, weights):
    import torch
    import torch.nn.functional as F

    from services.core.config import TrainConfig
    from services.core.modeling import load_tokenizer
    from services.training.encoded import encode_texts, pad_batch
    from services.training.tasks import ClassificationTask

    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = ["good", "a truly wonderful and moving film with a great cast", "bad",
             "not bad at all", "terrible", "i did not like the plot or the acting much",
             "fine", "great fun", "dull and long", "ok"]
    labels = [1, 1, 0, 1, 0, 0, 1, 1, 0, 1]
    split = encode_texts(tokenizer, texts, labels, 32)
    task = ClassificationTask(TrainConfig(model=str(tiny_model_dir), train="t.csv").resolve())
    task.id2label, task.pad_id, task.class_weights = {0: "neg", 1: "pos"}, \
        tokenizer.pad_token_id, weights
    torch.manual_seed(0)
    model = task.build_model(tokenizer).eval()  # no dropout: the same function twice
    order = list(range(len(texts)))
    sharded = _sharded_grads(task, model, split, task.dataset(split), order, micro=2,
                             accum=2, world=3)
    # the whole optimizer step: micro 2 x world 3 x accum 2 = 12 > 10 examples
    ids, mask = pad_batch([split.example(i) for i in order], tokenizer.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask).logits
    weight = torch.tensor(weights) if weights else None
    whole = _whole_grads(model, F.cross_entropy(logits, torch.tensor(labels), weight=weight))
    assert sharded.keys() == whole.keys()
    for name in whole:
        torch.testing.assert_close(sharded[name], whole[name], atol=2e-6, rtol=1e-4)


def test_sharded_generation_gradient_equals_the_whole_batch(tiny_gpt2_dir):
    import torch

    from services.core.config import TrainConfig
    from services.core.modeling import load_tokenizer
    from services.training.encoded import encode_pairs
    from services.training.tasks import GenerationTask, lm_batch, token_nll

    tokenizer = load_tokenizer(str(tiny_gpt2_dir))
    prompts = ["2+2?", "what is the capital of the land of many long words here?", "hi",
               "count to three", "say yes"]
    responses = ["4", "it is far away", "hello there my friend", "one two three", "yes"]
    split, _ = encode_pairs(tokenizer, prompts, responses, None, 48)
    task = GenerationTask(TrainConfig(model=str(tiny_gpt2_dir), train="t.jsonl",
                                      task="generation").resolve())
    task.pad_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = task.build_model(tokenizer).eval()
    order = [3, 1, 4, 0, 2]
    sharded = _sharded_grads(task, model, split, task.dataset(split), order, micro=2,
                             accum=1, world=2)
    # two optimizer steps (4 + 1 examples): their gradients add up here
    whole = None
    for group in (order[:4], order[4:]):
        batch = lm_batch([(split.example(i), split.mask(i)) for i in group], task.pad_id)
        nll, n = token_nll(model(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits,
                           batch["labels"])
        assert n == task.loss_denominator(split, group)
        grads = _whole_grads(model, nll / n)
        whole = grads if whole is None else {k: whole[k] + grads[k] for k in grads}
    for name in whole:
        torch.testing.assert_close(sharded[name], whole[name], atol=2e-6, rtol=1e-4)
