"""bench/generate.py's fallback checkpoint (no Ray, no network)."""

from __future__ import annotations


def test_the_random_gpt2_writes_whole_characters(tmp_path):
    """Without a GSM8K run the benchmark times a random GPT-2; its greedy output must
    decode to text, or the streams' time to first text would be undefined."""
    import torch

    from bench.generate import PROMPTS, build_random_gpt2
    from services.core.modeling import load_causal_lm_for_serving

    build_random_gpt2(tmp_path / "m")
    model, tokenizer = load_causal_lm_for_serving(tmp_path / "m")
    for prompt in PROMPTS[:3]:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=24, min_new_tokens=24,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        new = out[0][ids["input_ids"].shape[1]:].tolist()
        assert len(new) == 24
        for token in new:  # every token is text on its own
            text = tokenizer.decode([token], skip_special_tokens=True)
            assert text and "\ufffd" not in text, (token, text)
