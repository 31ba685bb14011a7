"""Generated text is decoded incrementally (tokenizers' DecodeStream) and must read
as decoding each row's tokens whole did: the same text wherever that is complete, the
same final text and stream of deltas, the same stop; and the streamed text is always
a prefix of the text, whatever later tokens do to it. Two locally made tokenizers:
GPT-2's byte-level BPE, and a Llama-style one (SentencePiece's metaspace with byte
fallback, whose decoder strips the first space); token streams from real text
(multi-byte characters split over tokens), random ids (invalid UTF-8, special
tokens) and chosen runs of byte tokens."""

import random
from types import SimpleNamespace

import pytest

from services.runtime.generation import GenerationEngine, SamplingParams
from tests.helpers import build_bpe_tokenizer, toy_generation_pairs

TEXTS = ["naïve café — 😀 emoji ✓ and 中文 text", "the red cat says meow. 42 × 7 = 294"]


def llama_style_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz.,0123456789=",
                  "▁the", "▁cat", "▁says", "▁red", "ow", "me"]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte-level-bpe", "metaspace-byte-fallback"])
def tokenizer(request):
    if request.param == "byte-level-bpe":
        texts = [p + r for p, r in toy_generation_pairs()]
        return build_bpe_tokenizer(texts)
    return llama_style_tokenizer()


def engines(tokenizer):
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    fast = GenerationEngine(model, tokenizer, None, 4096)
    whole = GenerationEngine(model, tokenizer, None, 4096)
    whole._backend = None  # the old way: every step decodes the row's tokens whole
    assert fast._backend is not None
    return fast, whole


def streams(tokenizer):
    rng = random.Random(7)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    randoms = [[rng.randrange(len(tokenizer)) for _ in range(300)] for _ in range(3)]
    return encoded, randoms


def feed(engine, tokens, stop=(), job=None):
    """Give the tokens to a job's bookkeeping one by one: (job, its text after each,
    the streamed deltas). Each step checks that what was streamed is a prefix of the
    text."""
    deltas = []
    job = job or engine.job("x", SamplingParams(max_new_tokens=len(tokens),
                                                ignore_eos=True, stop=stop))
    job.on_text = lambda text, _n: deltas.append(text)
    texts = []
    for token in tokens:
        engine._advance(job, token)
        texts.append(job.text)
        assert job.text.startswith("".join(deltas)), (tokens, job.text, deltas)
        if job.done:
            break
    return job, texts, deltas


def test_incremental_text_equals_whole_decoding_at_every_step(tokenizer):
    fast, whole = engines(tokenizer)
    encoded, randoms = streams(tokenizer)
    for tokens in encoded + randoms:
        got, got_texts, got_deltas = feed(fast, tokens)
        want, want_texts, want_deltas = feed(whole, tokens)
        assert got.text == want.text and got.finish_reason == want.finish_reason == "length"
        # Runs of byte tokens go to the stream whole, so it never refuses one.
        assert got.decoder is not False
        # Where the whole decoding is complete text, the two agree step by step; where
        # it is not, ByteFallback turns a whole run of bytes into U+FFFD until they form
        # valid UTF-8, so a character could vanish and come back there: the run's text
        # is streamed once a token that is not a byte has ended it.
        for step, (text, whole_text) in enumerate(zip(got_texts, want_texts)):
            if "\ufffd" not in whole_text:
                assert text == whole_text, step
        assert "".join(got_deltas) == "".join(want_deltas) == got.text
    for text, tokens in zip(TEXTS, encoded):  # a real text comes back as written
        assert feed(fast, tokens)[0].text == text


def test_stop_strings_end_the_row_at_the_same_token(tokenizer):
    fast, whole = engines(tokenizer)
    tokens = tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    got, got_texts, got_deltas = feed(fast, tokens, stop=("says",))
    want, want_texts, _ = feed(whole, tokens, stop=("says",))
    assert got.finish_reason == want.finish_reason == "stop"
    assert len(got_texts) == len(want_texts) and got.text == want.text == "the red cat "
    assert "".join(got_deltas) == got.text


class Broken:
    """A DecodeStream that fails."""

    def step(self, *_):
        raise RuntimeError("Invalid prefix encountered")


BYTE_RUNS = [
    # "Z" alone, then not UTF-8 with the next byte: both bytes become U+FFFD
    (["▁the", "<0x5A>", "<0xB7>", "a"], "the\ufffd\ufffda"),
    (["<0x5A>", "<0xB7>", "<0xB7>", "▁cat"], "\ufffd\ufffd\ufffd cat"),
    # a special token inside a run is skipped: the bytes around it decode together
    (["▁the", "<0x5A>", "<s>", "<0xB7>", "▁cat"], "the\ufffd\ufffd cat"),
    (["a", "<0xC3>", "<0xA9>", "b", "<0xE4>", "<0xB8>", "<0xAD>", "<0x5A>"],
     "a\u00e9b\u4e2dZ"),
    # the row ends inside a run: its text as whole decoding gives it, less U+FFFD
    (["▁the", "<0x5A>"], "theZ"),
    (["▁the", "<0x5A>", "<0xB7>"], "the"),
]


@pytest.mark.parametrize("tokens, text", BYTE_RUNS)
def test_streamed_text_over_byte_runs_is_the_text(tokens, text):
    """Decoded whole, `<0x5A>` ends the text with "Z" and `<0x5A><0xB7>` with two
    U+FFFD: the "Z" must not be streamed before the run has ended."""
    tokenizer = llama_style_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(tokens)
    fast, whole = engines(tokenizer)
    broken = engines(tokenizer)[0]
    job = broken.job("x", SamplingParams(max_new_tokens=len(ids), ignore_eos=True))
    job.decoder = Broken()  # the stream fails at once: whole decoding from there on
    for engine, given in ((fast, None), (whole, None), (broken, job)):
        got, _, deltas = feed(engine, ids, job=given)
        assert (got.text, got.finish_reason) == (text, "length")
        assert "".join(deltas) == text
    assert job.decoder is False


def test_a_failing_stream_falls_back_to_whole_decoding(tokenizer):
    fast, whole = engines(tokenizer)
    tokens = streams(tokenizer)[0][0]
    job = fast.job("x", SamplingParams(max_new_tokens=len(tokens), ignore_eos=True))
    fast._advance(job, tokens[0])
    job.decoder = Broken()
    for token in tokens[1:]:
        fast._advance(job, token)
    assert job.decoder is False and job.text == TEXTS[0]
