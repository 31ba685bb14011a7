"""Classify texts run whole: up to the model's own token limit (or ServeConfig's
max_input_tokens), not the training run's max_length; a longer text is truncated,
counted and logged, or refused with INVALID_ARGUMENT (ServeConfig.truncation).

The tiny BERT takes 128 tokens (max_position_embeddings and the tokenizer's
model_max_length); its version says it was trained with max_length 16.
"""

from __future__ import annotations

import asyncio

import pytest

from services.core.config import ServeConfig
from services.core.errors import ConfigError, InvalidInput
from tests.helpers import publish_toy_classifier

TRAINED_MAX_LENGTH = 16
LIMIT = 128
MID = "good " * 60  # 62 tokens: over the training max_length, within the model's limit
LONG = "good " * 300  # 302 tokens: over the model's limit


@pytest.fixture(scope="module")
def registry(tiny_model_dir, tmp_path_factory):
    return publish_toy_classifier(tiny_model_dir, tmp_path_factory.mktemp("whole"),
                                  TRAINED_MAX_LENGTH)


@pytest.fixture
def counted(monkeypatch):
    """tuneserve_truncated_inputs_total's increments, as (value, tags)."""
    from services.core import metrics

    calls = []
    real = metrics.inc

    def inc(name, value=1.0, **tags):
        if name == "tuneserve_truncated_inputs_total":
            calls.append((value, tags))
        real(name, value, **tags)

    monkeypatch.setattr(metrics, "inc", inc)
    return calls


def _widths(loaded) -> list[int]:
    """Records the padded width of every forward pass the version runs."""
    widths: list[int] = []
    real = loaded.logits

    def spy(batch):
        widths.append(int(batch["input_ids"].shape[1]))
        return real(batch)

    loaded.logits = spy
    return widths


def test_a_text_runs_whole_up_to_the_models_limit_not_the_training_max_length(
        registry, counted):
    import torch

    from services.runtime.classifier import load_classifier, predict

    loaded = load_classifier(registry, "toy", "v1", trace=False)
    assert loaded.max_length == LIMIT
    widths = _widths(loaded)
    whole = predict(loaded, [MID])
    assert widths == [62]  # every token of the text, [CLS] and [SEP] included
    tok = loaded.tokenizer
    head = tok.decode(tok(MID, truncation=True, max_length=TRAINED_MAX_LENGTH)["input_ids"],
                      skip_special_tokens=True)
    assert not torch.allclose(whole, predict(loaded, [head]))  # what it served before
    assert counted == []  # nothing was truncated


def test_a_text_over_the_limit_is_truncated_counted_and_logged_once(registry, counted):
    import logging

    import torch

    from services.runtime.classifier import load_classifier, logger, predict

    loaded = load_classifier(registry, "toy", "v1", trace=False)
    widths = _widths(loaded)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # the replicas' logger may not propagate (Ray's)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        probs = predict(loaded, [LONG, "fine", LONG + "good"])
        predict(loaded, [LONG])  # within the minute: counted, not logged again
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert probs.shape == (3, 2) and bool(torch.isfinite(probs).all())
    assert max(widths) == LIMIT
    assert counted == [(2, {"model": "toy", "version": "v1"}),
                       (1, {"model": "toy", "version": "v1"})]
    lines = [r.getMessage() for r in records if "truncated" in r.getMessage()]
    assert lines == ["toy v1: truncated 2 text(s) to the limit of 128 tokens since the "
                     "last report (the longest had 303)"]
    assert loaded.truncations["count"] == 1  # reported in the next line


def test_the_serving_limit_applies_below_the_models_own(registry, counted):
    from services.runtime.classifier import load_classifier, predict

    loaded = load_classifier(registry, "toy", "v1", trace=False, max_input_tokens=32)
    assert loaded.max_length == 32
    widths = _widths(loaded)
    predict(loaded, [MID])
    assert widths == [32] and counted == [(1, {"model": "toy", "version": "v1"})]
    above = load_classifier(registry, "toy", "v1", trace=False, max_input_tokens=4096)
    assert above.max_length == LIMIT  # no more than the model takes


def test_refuse_answers_invalid_argument(registry, counted):
    import grpc

    from services.runtime.classifier import load_classifier, predict_batch
    from services.serving.classifier import Classifier
    from services.serving.status_codes import status_code

    loaded = load_classifier(registry, "toy", "v1", trace=False, refuse=True)
    other = load_classifier(registry, "toy", "v1", trace=False)
    answers = predict_batch([(loaded, ["fine", LONG]), (loaded, [MID, "good"]),
                             (other, [LONG])])
    assert isinstance(answers[0], InvalidInput)
    assert str(answers[0]) == "texts[1]: 302 tokens; model toy takes at most 128 tokens per text"
    assert len(answers[1]) == 2 and len(answers[2]) == 1  # the others ran
    assert counted == [(1, {"model": "toy", "version": "v1"})]  # only the truncating version's text

    replica = Classifier(registry.uri, "toy", trace=False, truncation="refuse")
    replica.current = replica._load_version("v1")

    async def classify(texts):
        replica._model_for = _async_value(replica.current)
        return await replica.classify(texts)

    assert len(asyncio.run(classify(["fine", MID]))["results"]) == 2
    with pytest.raises(InvalidInput) as err:
        asyncio.run(classify(["fine", LONG]))
    code, message = status_code(err.value, "toy")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "texts[1]: 302 tokens" in message


def _async_value(value):
    async def get(version=None):
        return value
    return get


def test_a_trace_covers_every_length_up_to_the_limit(registry):
    import torch

    from services.runtime.classifier import load_classifier, predict

    traced = load_classifier(registry, "toy", "v1")
    eager = load_classifier(registry, "toy", "v1", trace=False)
    assert traced.traced is not None
    texts = ["a", MID, "good " * 126, "good " * 127, LONG]  # 3 to 128 tokens, and over
    for chunk in (64, 1):
        assert torch.allclose(predict(traced, texts, chunk=chunk),
                              predict(eager, texts, chunk=chunk), atol=1e-5)


def test_the_limit_leaves_out_positions_that_padding_reserves():
    from transformers import AutoModelForSequenceClassification, BertConfig, RobertaConfig

    from services.runtime.classifier import input_limit

    class Tokenizer:
        model_max_length = int(1e30)  # unset, as in many tokenizers

    roberta = AutoModelForSequenceClassification.from_config(RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=130, pad_token_id=1))
    assert input_limit(roberta, Tokenizer()) == 128
    bert = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=256))
    assert input_limit(bert, Tokenizer()) == 256
    Tokenizer.model_max_length = 100
    assert input_limit(bert, Tokenizer()) == 100


def test_the_settings_are_checked_and_reach_classifiers(monkeypatch, tmp_path):
    from services.cli import build_parser
    from services.cli.serve import serve_config
    from services.serving import app as app_module

    assert ServeConfig(max_input_tokens=256, truncation="refuse").validate()
    with pytest.raises(ConfigError, match=r"'max_input_tokens'.*>= 8, got 4"):
        ServeConfig(max_input_tokens=4).validate()
    with pytest.raises(ConfigError, match=r"'truncation'.*'cut' is not one of truncate, refuse"):
        ServeConfig(truncation="cut").validate()
    args = build_parser().parse_args(["serve", "--max-input-tokens", "256",
                                      "--truncation", "refuse"])
    cfg = serve_config(args)
    assert (cfg.max_input_tokens, cfg.truncation) == (256, "refuse")
    defaults = serve_config(build_parser().parse_args(["serve"]))
    assert (defaults.max_input_tokens, defaults.truncation) == (None, "truncate")
    monkeypatch.setattr(app_module, "discover_models",
                        lambda *_: {"c": "classification", "g": "generation"})
    app = app_module.build_app(ServeConfig(registry=str(tmp_path), colocate=True,
                                           max_input_tokens=256, truncation="refuse"))
    specs = app._bound_deployment.init_args[1]
    assert (specs["c"]["kwargs"]["max_input_tokens"], specs["c"]["kwargs"]["truncation"]) \
        == (256, "refuse")
    assert "truncation" not in specs["g"]["kwargs"]


def test_eval_classifies_texts_whole(registry, tmp_path, monkeypatch):
    from services import evaluate
    from tests.helpers import write_csv

    widths: list[int] = []
    real = evaluate.predict

    def spy(loaded, texts, **kwargs):
        seen = _widths(loaded)
        out = real(loaded, texts, **kwargs)
        widths.extend(seen)
        return out

    monkeypatch.setattr(evaluate, "predict", spy)
    rows = [(MID, "pos"), ("fine", "neg")]
    data = evaluate.read_data(str(write_csv(tmp_path / "d.csv", rows)))
    evaluate.evaluate_local(str(registry.backend.root), "toy", "v1", data, progress=False)
    assert max(widths) == 62  # the whole text, not its first TRAINED_MAX_LENGTH tokens
