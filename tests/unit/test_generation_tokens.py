"""Which tokens end a generation, end to end on a tiny Llama whose next token is forced
(no Ray): the tokenizer's EOS when the model's config names another, a stop string
that is a special token's text, and streamed text over byte-fallback tokens that
equals the unary text; in static batches and with continuous batching.

The tokenizer is Llama-style (SentencePiece's metaspace with byte fallback:
`<0x00>`..`<0xFF>`) with EOS `<|endoftext|>` (id 0), while LlamaConfig's default EOS
is 2 (`</s>`, here just another special token). The model's embeddings are the
identity and its layers add nothing, so its logits are its output matrix's column
for the last token: `force` sets that matrix so that greedy decoding produces a
chosen token sequence."""

import json

import pytest

from services.runtime.continuous import ContinuousBatcher
from services.runtime.generation import GenerationEngine, SamplingParams

CONFIG_EOS = 2
PROMPT = "cat"
BATCHING = ["static", "continuous"]
PIECES = ["▁", *"abcdefghijklmnopqrstuvwxyz.,", "▁the", "▁cat", "▁says"]


def llama_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<s>": 1, "</s>": CONFIG_EOS, "<|im_end|>": 3}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in PIECES:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True,
                               unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   extra_special_tokens=["</s>", "<|im_end|>"])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """The tokenizer and a one-layer Llama (hidden size = vocabulary size) whose
    embeddings are the identity and whose attention and MLP output nothing."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = llama_tokenizer()
    size = -(-len(tokenizer) // 8) * 8
    config = LlamaConfig(vocab_size=size, hidden_size=size, intermediate_size=8,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128)
    assert (config.eos_token_id, tokenizer.eos_token_id) == (CONFIG_EOS, 0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.eye(size))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    folder = tmp_path_factory.mktemp("forced-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engine(llama_dir):
    import torch

    from services.core.modeling import context_length, load_causal_lm_for_serving

    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm_for_serving(llama_dir)
    return GenerationEngine(model, tokenizer, None, context_length(model.config))


def ids(engine, *tokens: str) -> list[int]:
    return [engine.tokenizer.convert_tokens_to_ids(t) for t in tokens]


def force(model, start: int, tokens: list[int]) -> None:
    """Greedy decoding after `start` gives `tokens`, then the last of them forever
    (each token's successor is fixed, so none may appear twice)."""
    import torch

    assert len({start, *tokens}) == len(tokens) + 1
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head.copy_(torch.eye(head.shape[0]))  # every other token repeats itself
        for before, after in zip([start, *tokens], tokens):
            head[:, before].zero_()
            head[after, before] = 1.0


def generate(engine, tokens: list[int], batching: str, **params):
    """(job, streamed text) for PROMPT after forcing `tokens` after it."""
    deltas = []
    job = engine.job(PROMPT, SamplingParams(**{"max_new_tokens": 8, **params}),
                     on_text=lambda text, _n: deltas.append(text))
    force(engine.model, job.prompt_ids[-1], tokens)
    if batching == "static":
        engine.run([job])
    else:
        ContinuousBatcher(engine, max_rows=2).submit(job).result(timeout=60)
    return job, "".join(deltas)


def test_serving_stops_at_the_tokenizers_eos_and_the_configs(llama_dir, engine):
    import torch

    assert engine.eos_ids == {CONFIG_EOS, 0}
    assert engine.model.generation_config.eos_token_id == [CONFIG_EOS, 0]
    # Plain `generate` on the served model stops at the tokenizer's EOS too.
    the, cat, says = ids(engine, "▁the", "▁cat", "▁says")
    force(engine.model, the, [cat, 0, says])
    out = engine.model.generate(input_ids=torch.tensor([[the]]), max_new_tokens=6,
                                do_sample=False, pad_token_id=CONFIG_EOS)
    assert out[0].tolist() == [the, cat, 0]


@pytest.mark.parametrize("batching", BATCHING)
def test_a_row_ends_at_either_eos(engine, batching):
    for eos in (0, CONFIG_EOS):
        job, streamed = generate(engine, [*ids(engine, "▁the", "▁cat"), eos], batching)
        assert (job.finish_reason, job.completion_tokens) == ("eos", 3)
        assert job.text == streamed == "the cat"


@pytest.mark.parametrize("batching", BATCHING)
def test_ignore_eos_masks_the_tokenizers_eos(engine, batching):
    job, streamed = generate(engine, [*ids(engine, "▁the"), 0, *ids(engine, "▁cat")],
                             batching, ignore_eos=True)
    assert (job.finish_reason, job.completion_tokens) == ("length", 8)
    assert 0 not in job.token_ids and CONFIG_EOS not in job.token_ids
    assert job.text == streamed


@pytest.mark.parametrize("batching", BATCHING)
def test_a_stop_string_that_is_a_special_token_stops_at_it(engine, batching):
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens = [*ids(engine, "▁the", "▁cat"), im_end, *ids(engine, "▁says")]
    job, streamed = generate(engine, tokens, batching, stop=("<|im_end|>",))
    assert (job.finish_reason, job.completion_tokens) == ("stop", 3)
    assert job.text == streamed == "the cat"
    # Without the stop string the token's text is skipped and generation goes on.
    job, streamed = generate(engine, tokens, batching, max_new_tokens=5)
    assert job.finish_reason == "length" and job.text == streamed == "the cat says says"
    # An ordinary stop string beside it still matches as text, also across tokens.
    job, streamed = generate(engine, ids(engine, "▁the", "▁cat", "▁says"), batching,
                             stop=("<|im_end|>", "at s"))
    assert (job.finish_reason, job.completion_tokens) == ("stop", 3)
    assert job.text == streamed == "the c"


def test_special_token_text_in_a_prompt_is_that_token(engine):
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    job = engine.job("the cat<|im_end|>", SamplingParams(max_new_tokens=1))
    assert job.prompt_ids[-1] == im_end
    assert engine.job("the cat", SamplingParams(max_new_tokens=1)).prompt_ids == \
        job.prompt_ids[:-1]


@pytest.mark.parametrize("batching", BATCHING)
@pytest.mark.parametrize("tokens, text", [
    # "Z" alone, then not UTF-8 with the next byte: the run decodes as two U+FFFD
    (["▁the", "<0x5A>", "<0xB7>", "a"], "the\ufffd\ufffda"),
    # a special token inside a run is skipped: the bytes around it decode together
    (["▁the", "<0x5A>", "<s>", "<0xB7>", "▁cat"], "the\ufffd\ufffd cat"),
    # "é" in two bytes, then "中" in three, the row ending inside the run
    (["▁cat", "<0xC3>", "<0xA9>", "b", "<0xE4>", "<0xB8>", "<0xAD>"], "cat\u00e9b\u4e2d"),
])
def test_streamed_text_over_byte_runs_equals_the_unary_text(engine, batching, tokens, text):
    job, streamed = generate(engine, ids(engine, *tokens), batching,
                             max_new_tokens=len(tokens))
    assert job.finish_reason == "length"
    assert job.text == streamed == text
    assert job.decoder is not False  # the incremental decoder never gave up


def test_the_training_checkpoint_stops_at_the_tokenizers_eos(llama_dir, engine, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from services.core.config import TrainConfig
    from services.core.modeling import load_tokenizer
    from services.training.tasks import GenerationTask

    tokenizer = load_tokenizer(str(llama_dir))
    task = GenerationTask(TrainConfig(model=str(llama_dir), train="t.jsonl",
                                      task="generation").validate())
    model = task.build_model(tokenizer)
    assert model.generation_config.eos_token_id == CONFIG_EOS
    the, cat, says = ids(engine, "▁the", "▁cat", "▁says")
    force(model, the, [cat, 0, says])
    task.save(model, str(tmp_path), tokenizer)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [CONFIG_EOS, 0]
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path), use_safetensors=True)
    out = plain.generate(input_ids=torch.tensor([[the]]), max_new_tokens=6,
                         do_sample=False, pad_token_id=CONFIG_EOS)
    assert out[0].tolist() == [the, cat, 0]
