"""Training options that decide model quality: class weights on imbalanced labels, early
stopping, and a manifest that records everything needed to reproduce a run."""

from __future__ import annotations

import random

import pytest

from services.core.config import TrainConfig
from services.core.registry import Registry
from services.training.run import run_training
from tests.helpers import build_tiny_bert, write_csv

FILLER = [f"w{i}" for i in range(30)]


def skewed_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """10 % 'spam'. The word 'alpha' is in 70 % of spam and 10 % of ham, the rest is
    noise: the unweighted optimum is to answer 'ham' always, so spam recall is ~0,
    while balanced weights make 'alpha' decide and recall ~0.7."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        spam = i % 10 == 0
        words = rng.sample(FILLER, 5)
        if rng.random() < (0.7 if spam else 0.1):
            words[rng.randrange(5)] = "alpha"
        rows.append((" ".join(words), "spam" if spam else "ham"))
    return rows


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("skewed")
    train, evald = skewed_rows(1000, 1), skewed_rows(500, 2)
    model = build_tiny_bert(tmp / "model", [t for t, _ in train])
    return {"model": model, "train": write_csv(tmp / "train.csv", train),
            "eval": write_csv(tmp / "eval.csv", evald), "tmp": tmp}


def _cfg(skewed, name, **kw):
    tmp = skewed["tmp"]
    base = dict(model=str(skewed["model"]), train=str(skewed["train"]),
                eval=str(skewed["eval"]), name=name, registry=str(tmp / "registry"),
                runs_dir=str(tmp / "runs"), workers=1, cpus_per_worker=2, epochs=4,
                batch_size=32, learning_rate=3e-3, seed=11, log_every_steps=10)
    base.update(kw)
    return TrainConfig(**base)


def test_balanced_class_weights_raise_minority_recall(ray_cluster, skewed):
    plain = run_training(_cfg(skewed, "plain"), progress_bar=False, out=lambda _: None)
    weighted = run_training(_cfg(skewed, "weighted", class_weights="balanced"),
                            progress_bar=False, out=lambda _: None)
    reg = Registry(str(skewed["tmp"] / "registry"))
    plain_recall = reg.manifest("plain", plain.version)["per_class"]["spam"]["recall"]
    weighted_recall = reg.manifest("weighted", weighted.version)["per_class"]["spam"]["recall"]
    print(f"spam recall: unweighted {plain_recall:.2f}, balanced {weighted_recall:.2f}")
    assert plain_recall <= 0.2
    assert weighted_recall >= plain_recall + 0.3

    # The manifest holds what reproducing the run needs.
    manifest = reg.manifest("weighted", weighted.version)
    cfg = manifest["config"]
    assert cfg["seed"] == 11 and cfg["class_weights"] == "balanced"
    assert cfg["learning_rate"] == 3e-3 and cfg["max_length"] == manifest["data"]["max_length"]["value"]
    assert manifest["data"]["max_length"]["source"] == "data"
    weights = manifest["data"]["class_weights"]
    assert weights == pytest.approx({"ham": 1000 / (2 * 900), "spam": 1000 / (2 * 100)})
    assert manifest["data"]["train"]["label_counts"] == {"ham": 900, "spam": 100}
    assert len(manifest["data"]["train"]["sha256"]) == 64
    assert manifest["data"]["eval"]["sha256"] and manifest["versions"]["ray"]
    assert TrainConfig.from_dict(cfg).validate().max_length == cfg["max_length"]


def test_early_stopping_ends_the_run_and_publishes_the_best_evaluation(ray_cluster, skewed):
    lines: list[str] = []
    # A learning rate this small changes nothing the metric can see: after the first
    # evaluation, two more without improvement stop the run.
    cfg = _cfg(skewed, "stopper", learning_rate=1e-9, eval_steps=3, epochs=3,
               early_stopping_patience=2, early_stopping_min_delta=0.001)
    result = run_training(cfg, progress_bar=False, out=lines.append)
    evals = [e for e in result.history if e["type"] == "eval"]
    assert len(evals) == 3 and evals[-1]["step"] == 9
    assert any(line.startswith("early stopping at epoch 1 step 9") for line in lines), lines
    manifest = Registry(cfg.registry).manifest("stopper", result.version)
    best = max(e["eval_accuracy"] for e in evals)
    assert manifest["metrics"]["accuracy"] == pytest.approx(best)


def test_a_model_trained_on_shuffled_labels_is_published_but_not_production(
        ray_cluster, tmp_path):
    """Labels shuffled at random leave nothing to learn: the first version is published
    with its baseline recorded, and production stays empty (issue 33). The session's
    `trained` fixture (tests/conftest.py) is the learnable counterpart: made production."""
    from tests.helpers import toy_sentiment_rows

    rows = toy_sentiment_rows(200, seed=3)
    labels = [label for _, label in rows]
    random.Random(5).shuffle(labels)
    data = write_csv(tmp_path / "shuffled.csv", [(t, y) for (t, _), y in zip(rows, labels)])
    model = build_tiny_bert(tmp_path / "model", [t for t, _ in rows])
    cfg = TrainConfig(model=str(model), train=str(data), name="shuffled",
                      registry=str(tmp_path / "registry"), runs_dir=str(tmp_path / "runs"),
                      workers=1, cpus_per_worker=2, epochs=4, batch_size=16,
                      learning_rate=2e-3, seed=1, log_every_steps=20)
    result = run_training(cfg, progress_bar=False, out=lambda _: None)
    reg = Registry(cfg.registry)
    assert result.version == "v1" and not result.promoted
    assert reg.channel("shuffled", "production") is None
    assert result.promotion.startswith("not promoted: accuracy ")
    assert "published as shuffled v1" in result.promotion
    manifest = reg.manifest("shuffled", "v1")
    assert manifest["metrics"]["baseline_accuracy"] == pytest.approx(
        manifest["quality"]["baseline"]["accuracy"])
    assert manifest["quality"]["learned"] is False
