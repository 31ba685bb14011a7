"""The FLOP accounting behind bench/train_lm.py's MFU figure (no GPU, no Ray)."""

from __future__ import annotations

import pytest

from bench.train_lm import PRESETS, flops_per_token, peak_tflops


def test_flops_per_token_counts_every_multiplying_weight_and_attention():
    # 6 FLOPs per weight outside the input embedding, 12 x layers x hidden x seq_len
    assert flops_per_token(1000, 100, layers=2, hidden=8, seq_len=16) == 6 * 900 + 12 * 2 * 8 * 16


@pytest.mark.parametrize("preset,low,high", [("0.5b", 0.50e9, 0.60e9), ("1b", 1.0e9, 1.2e9)])
def test_presets_have_the_size_they_are_named_for(preset, low, high):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(
            LlamaConfig(**PRESETS[preset], tie_word_embeddings=False))
    params = sum(p.numel() for p in model.parameters())
    assert low < params < high
    embedding = model.get_input_embeddings().weight.numel()
    per_token = flops_per_token(params, embedding, PRESETS[preset]["num_hidden_layers"],
                                PRESETS[preset]["hidden_size"], 1024)
    assert 6 * (params - embedding) < per_token < 6 * params * 1.5


def test_peak_is_known_for_hopper_and_unknown_elsewhere():
    assert peak_tflops("NVIDIA H200") == peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("Some Other GPU") is None
