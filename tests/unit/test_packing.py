"""Packing without cross-contamination (issue 33): a packed batch gives every example
the same loss as the example trained on its own, on tiny causal LMs built from a
config (per-example position ids; transformers builds the block-diagonal causal mask)."""

from __future__ import annotations

import numpy as np
import pytest

from services.training.encoded import EncodedSplit, pack
from services.training.tasks import (IGNORE_INDEX, lm_batch, lm_inputs, packed_lm_batch,
                                     token_nll)

torch = pytest.importorskip("torch")
VOCAB = 64
PAD = 0


def tiny_lm(kind: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=128)
    else:
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                            n_positions=128)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config).eval()


def examples(seed: int = 0):
    """Prompt + response token lists of uneven lengths, the loss on the response."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for n_prompt, n_resp in [(3, 4), (5, 2), (2, 6), (4, 3), (6, 5), (1, 2)]:
        ids.append(rng.integers(1, VOCAB, n_prompt + n_resp).tolist())
        masks.append([False] * n_prompt + [True] * n_resp)
    return ids, masks


def per_example_unpacked(model, ids, masks) -> list[float]:
    out = []
    for ex, mask in zip(ids, masks):
        batch = lm_batch([(np.asarray(ex), np.asarray(mask))], PAD)
        with torch.no_grad():
            logits = model(**lm_inputs(batch)).logits
        out.append(float(token_nll(logits, batch["labels"])[0]))
    return out


def per_example_packed(model, batch, positions) -> list[float]:
    """Summed NLL of each example of a packed batch, in packing order."""
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(**lm_inputs(batch)).logits
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["labels"][:, 1:],
                          ignore_index=IGNORE_INDEX, reduction="none")
    out = []
    for row, pos in enumerate(positions):
        segment = np.cumsum(np.asarray(pos) == 0)  # 1, 1, 1, 2, 2, ... per token
        for k in range(1, segment.max() + 1):
            tokens = np.nonzero(segment[1:] == k)[0]  # targets (shifted by one)
            out.append(float(nll[row, tokens].sum()))
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_batch_gives_each_example_its_unpacked_loss(kind):
    model = tiny_lm(kind)
    ids, masks = examples()
    packed_ids, packed_masks, positions = pack(ids, masks, max_length=24)
    assert len(packed_ids) < len(ids)  # several examples share a sequence
    split = EncodedSplit.from_lists(packed_ids, [0] * len(packed_ids), packed_masks,
                                    positions)
    items = [(split.example(i), split.mask(i), split.position(i)) for i in range(len(split))]
    batch = packed_lm_batch(items, PAD)  # rows of uneven length: right padding too
    assert "attention_mask" not in batch
    packed = per_example_packed(model, batch, [split.position(i) for i in range(len(split))])
    alone = per_example_unpacked(model, ids, masks)
    assert packed == pytest.approx(alone, rel=1e-4, abs=1e-4)

    # The targets the loss is divided by are the same too.
    plain = EncodedSplit.from_lists(ids, [0] * len(ids), masks)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == \
        sum(int(plain.mask(i)[1:].sum()) for i in range(len(plain)))

    # Without the per-example positions the examples see each other: the check bites.
    leaky = lm_batch([(split.example(i), split.mask(i)) for i in range(len(split))], PAD)
    leaky["labels"] = batch["labels"]
    assert per_example_packed(model, leaky, [split.position(i) for i in range(len(split))]) \
        != pytest.approx(alone, rel=1e-4, abs=1e-4)


def test_loss_denominator_of_a_packed_split_counts_the_same_targets():
    from services.training.tasks import GenerationTask

    ids, masks = examples()
    masks[5] = [True] * len(masks[5])  # an example with no prompt: loss from its start
    plain = EncodedSplit.from_lists(ids, [0] * len(ids), masks)
    packed_ids, packed_masks, positions = pack(ids, masks, max_length=24)
    packed = EncodedSplit.from_lists(packed_ids, [0] * len(packed_ids), packed_masks,
                                     positions)
    task = GenerationTask.__new__(GenerationTask)
    assert task.loss_denominator(packed, range(len(packed))) == \
        task.loss_denominator(plain, range(len(plain)))
