"""Small-data settings and pooling (issue 33, point 1), without Ray: which settings a
run of a given size gets and why, the pooling a model folder asks for, and a
mean-pooled classifier that trains, saves and serves as the same function."""

from __future__ import annotations

import json

import pytest

from services.core.config import TrainConfig
from services.core.errors import ConfigError
from services.core.pooling import detect_pooling, is_head_parameter, resolve_pooling
from services.training.tasks import SMALL_DATA_MAX_EPOCHS, small_data_settings
from tests.helpers import build_tiny_bert, toy_sentiment_rows


def _cfg(**kw):
    return TrainConfig(model="m", train="t.csv", **kw).resolve()


def test_small_training_sets_get_enough_steps_and_a_faster_head():
    plan = small_data_settings(_cfg(), 900)  # 29 steps an epoch at batch 32
    assert plan["applied"] and "900 training rows, below 5000" in plan["why"]
    assert plan["settings"] == {"epochs": 14, "learning_rate": 5e-5, "warmup_ratio": 0.1,
                                "head_learning_rate": 1e-3}
    tiny = small_data_settings(_cfg(), 40)
    assert tiny["settings"]["epochs"] == SMALL_DATA_MAX_EPOCHS
    big = small_data_settings(_cfg(), 3000)
    assert big["settings"]["epochs"] == 5  # 94 steps an epoch: 5 epochs pass 400 steps


def test_large_sets_and_off_keep_the_plain_defaults_and_on_forces_them():
    large = small_data_settings(_cfg(), 60_000)
    assert not large["applied"] and large["settings"] == {}
    assert "at least 5000" in large["why"]
    off = small_data_settings(_cfg(small_data="off"), 500)
    assert not off["applied"] and off["why"] == "--small-data off"
    on = small_data_settings(_cfg(small_data="on"), 60_000)
    assert on["applied"] and on["settings"]["epochs"] == 3  # 1,875 steps an epoch already


def test_fields_given_explicitly_are_kept_and_named():
    plan = small_data_settings(_cfg(epochs=1, learning_rate=1e-4, head_learning_rate=5e-4), 900)
    assert plan["applied"] and plan["settings"] == {"warmup_ratio": 0.1}
    assert "kept as given: epochs, learning_rate" in plan["why"]
    # a learning rate given sets the head's pace too: no head rate of its own
    paced = small_data_settings(_cfg(learning_rate=1e-9), 900)
    assert "head_learning_rate" not in paced["settings"] and "epochs" in paced["settings"]


@pytest.mark.parametrize("field,value", [
    ("pooling", "max"), ("small_data", "yes"), ("head_learning_rate", 2.0)])
def test_bad_small_data_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        _cfg(**{field: value})


def test_small_data_fields_are_classification_only():
    for field, value in (("pooling", "mean"), ("small_data", "on"),
                         ("head_learning_rate", 1e-3)):
        with pytest.raises(ConfigError, match=f"'{field}'.*classification only"):
            TrainConfig(model="m", train="t.jsonl", task="generation",
                        **{field: value}).resolve()


def _sentence_transformers_files(folder, mean: bool) -> None:
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_mean_tokens": mean, "pooling_mode_cls_token": not mean}))


def test_pooling_is_detected_from_the_model_files(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert detect_pooling(str(plain))[0] == "cls"
    st = tmp_path / "st"
    st.mkdir()
    (st / "config.json").write_text("{}")
    _sentence_transformers_files(st, mean=True)
    pooling, why = detect_pooling(str(st))
    assert pooling == "mean" and "1_Pooling/config.json" in why
    _sentence_transformers_files(st, mean=False)
    assert detect_pooling(str(st))[0] == "cls"
    (plain / "config.json").write_text(json.dumps({"tuneserve_pooling": "mean"}))
    assert detect_pooling(str(plain)) == ("mean", "the checkpoint's config.json records "
                                                  "mean pooling")
    assert resolve_pooling("cls", str(st)) == ("cls", "--pooling cls")
    assert detect_pooling("no-such/model")[0] == "cls"


def test_head_parameters_are_found_through_wrappers():
    assert is_head_parameter("classifier.weight")
    assert is_head_parameter("module.inner.classifier.bias")
    assert not is_head_parameter("module.inner.bert.encoder.layer.0.output.dense.weight")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    rows = toy_sentiment_rows(40)
    return build_tiny_bert(tmp_path_factory.mktemp("tiny"), [t for t, _ in rows])


def test_mean_pooling_reads_every_token_but_no_padding(tiny_bert):
    import torch

    from services.core.modeling import load_classifier_for_training, load_tokenizer

    tok = load_tokenizer(str(tiny_bert))
    model = load_classifier_for_training(str(tiny_bert), {0: "neg", 1: "pos"}, tok.pad_token_id,
                                         pooling="mean").eval()
    texts = ["a good film", "a dull story with poor acting and a clumsy ending"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        together = model(**batch).logits
        alone = model(**tok(texts[:1], return_tensors="pt")).logits
        hidden = model.inner.bert(**batch)[0]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        want = model.inner.classifier((hidden * mask).sum(1) / mask.sum(1))
    assert torch.allclose(together[0], alone[0], atol=1e-5)  # padding ignored
    assert torch.allclose(together, want, atol=1e-5)
    assert model.inner.bert.pooler is None  # unused: never a weight DDP waits for


def test_a_mean_pooled_checkpoint_serves_with_mean_pooling(tiny_bert, tmp_path):
    import torch

    from services.core.modeling import (load_classifier_for_serving,
                                        load_classifier_for_training, load_tokenizer)
    from services.training.tasks import load_saved_weights

    tok = load_tokenizer(str(tiny_bert))
    model = load_classifier_for_training(str(tiny_bert), {0: "neg", 1: "pos"},
                                         tok.pad_token_id, pooling="mean").eval()
    with torch.no_grad():
        model.inner.classifier.weight.normal_()  # a head that tells the poolings apart
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tuneserve_pooling"] == "mean"
    served, _ = load_classifier_for_serving(tmp_path, dtype="float32")
    batch = tok(["a superb film", "an awful script"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(served(**batch).logits, model(**batch).logits, atol=1e-5)
        first = served.inner.classifier(served.inner.bert(**batch)[0][:, 0])  # [CLS] alone
        assert not torch.allclose(first, model(**batch).logits, atol=1e-3)
    from services.core.pooling import unwrap

    fresh = load_classifier_for_training(str(tiny_bert), {0: "neg", 1: "pos"},
                                         tok.pad_token_id, pooling="mean").eval()
    load_saved_weights(unwrap(fresh), str(tmp_path))  # resuming: the same weights back
    with torch.no_grad():
        assert torch.allclose(fresh(**batch).logits, model(**batch).logits, atol=1e-5)


def test_the_head_gets_its_own_learning_rate():
    import torch

    from services.training.loop import param_groups

    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(4, 4),
                                 "classifier": torch.nn.Linear(4, 2)})
    groups = param_groups(model, 0.01, 20.0, is_head_parameter)
    scales = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scales[id(model["classifier"].weight)] == 20.0
    assert scales[id(model["encoder"].weight)] == 1.0
    plain = param_groups(model, 0.01)
    assert [g["weight_decay"] for g in plain] == [0.01, 0.0]
    assert all(g["lr_scale"] == 1.0 for g in plain)
