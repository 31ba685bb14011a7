"""Never promote a model that learned nothing: the majority-class baseline, the
learned-nothing test and how `decide` applies it (issue 33)."""

from __future__ import annotations

import pytest

from services.core.registry import Registry
from services.training.promotion import (decide, learned_check, majority_baseline,
                                         noise_margin, single_predicted_class)
from services.training.run import quality_record
from tests.unit.test_registry import fake_checkpoint, manifest

LABELS = ["negative", "positive"]


def test_majority_baseline_from_the_confusion_matrix():
    # rows: true label; 19 negative, 21 positive
    base = majority_baseline([[10, 9], [5, 16]], LABELS)
    assert base.label == "positive" and base.examples == 40
    assert base.accuracy == pytest.approx(21 / 40)
    p = 21 / 40
    assert base.macro_f1 == pytest.approx((2 * p / (1 + p)) / 2)
    assert base.chance_macro_f1 == 0.5
    assert majority_baseline(None, LABELS) is None
    assert majority_baseline([[0, 0], [0, 0]], LABELS) is None


def test_margin_shrinks_with_the_eval_set_and_stays_reachable():
    assert noise_margin(0.5, 20) == pytest.approx(2 * (0.25 / 20) ** 0.5)
    assert noise_margin(0.5, 2000) < noise_margin(0.5, 200) < noise_margin(0.5, 20)
    # capped at half the way to a perfect score: 4 examples still leave room
    assert noise_margin(0.5, 4) == pytest.approx(0.25)
    assert noise_margin(1.0, 10) == 0.0


def test_single_predicted_class():
    assert single_predicted_class([[0, 19], [0, 21]], LABELS) == "positive"
    assert single_predicted_class([[10, 9], [5, 16]], LABELS) is None
    assert single_predicted_class([[5]], ["only"]) is None


def _metrics(cm):
    from services.core.evaluation import metrics_from_confusion

    m = metrics_from_confusion(cm, LABELS)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def test_one_class_predictor_learned_nothing_and_the_message_names_the_numbers():
    cm = [[0, 19], [0, 21]]
    record = quality_record(LABELS, {"confusion_matrix": cm}, _metrics(cm))
    assert record["single_class"] == "positive" and not record["learned"]
    assert record["baseline"]["accuracy"] == pytest.approx(0.525)
    why = record["learned_check"]
    assert "accuracy 0.525 is no better than always predicting 'positive' (0.525" in why
    assert "macro-F1 0.344" in why


def test_a_guessing_model_learned_nothing_a_learning_one_did():
    base = majority_baseline([[20, 0], [0, 20]], LABELS).to_dict()
    guess = [[11, 9], [10, 10]]  # 0.525: within the noise of 40 examples
    assert not learned_check(_metrics(guess), base)[0]
    good = [[18, 2], [3, 17]]  # 0.875
    ok, why = learned_check(_metrics(good), base)
    assert ok and "accuracy 0.875 beats always predicting" in why


def test_class_weighted_model_passes_on_macro_f1_below_majority_accuracy():
    # 90 % ham: the weighted model loses accuracy (0.86 < 0.9) but finds the spam.
    cm = [[380, 70], [0, 50]]
    base = majority_baseline(cm, ["ham", "spam"]).to_dict()
    ok, why = learned_check(_metrics(cm), base)
    assert ok and why.startswith("macro-F1")


def test_generation_check_uses_the_untrained_loss_or_is_skipped():
    assert learned_check({"loss": 1.0, "initial_loss": 3.0}, None)[0]
    ok, why = learned_check({"loss": 3.0, "initial_loss": 3.0}, None)
    assert not ok and "not below the untrained model's 3.0000" in why
    ok, why = learned_check({"loss": 1.0}, None)
    assert ok and "skipped" in why


@pytest.fixture
def registry(tmp_path):
    return Registry(tmp_path / "reg")


def test_decide_refuses_a_first_version_that_learned_nothing(registry, tmp_path):
    cm = [[0, 19], [0, 21]]
    pub = registry.publish("sent", fake_checkpoint(tmp_path / "ck"), manifest(), promote=False)
    base = majority_baseline(cm, LABELS).to_dict()
    ok, why = decide(registry, "sent", pub.version, _metrics(cm), "accuracy", "max", None,
                     baseline=base)
    assert not ok
    assert why.startswith("not promoted: accuracy 0.525 is no better than always predicting")
    assert "published as sent v1" in why and "tuneserve models promote" in why
    # a version that learned is promoted as the first one
    good = [[18, 1], [2, 19]]
    ok, why = decide(registry, "sent", pub.version, _metrics(good), "accuracy", "max", None,
                     baseline=majority_baseline(good, LABELS).to_dict())
    assert ok and why == "promoted: no production version yet"


def test_decide_refuses_a_useless_version_even_when_production_is_worse(registry, tmp_path):
    ck = fake_checkpoint(tmp_path / "ck")
    registry.publish("sent", ck, {**manifest(), "metrics": {"accuracy": 0.4}}, promote=True)
    pub = registry.publish("sent", ck, manifest(), promote=False)
    cm = [[0, 19], [0, 21]]
    ok, why = decide(registry, "sent", pub.version, _metrics(cm), "accuracy", "max", None,
                     baseline=majority_baseline(cm, LABELS).to_dict())
    assert not ok and "published as sent v2" in why


def test_decide_applies_min_metric_to_a_version_that_learned(registry, tmp_path):
    pub = registry.publish("sent", fake_checkpoint(tmp_path / "ck"), manifest(), promote=False)
    good = [[18, 1], [2, 19]]
    ok, why = decide(registry, "sent", pub.version, {**_metrics(good), "loss": 0.3},
                     "accuracy", "max", "loss=0.0001",
                     baseline=majority_baseline(good, LABELS).to_dict())
    assert not ok and "misses the threshold 0.0001" in why
