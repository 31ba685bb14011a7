"""A small training set with every setting left to the defaults (issue 33, point 1):
the run picks mean pooling for a sentence-transformers encoder and the small-data
settings, says so, records both in the manifest and the checkpoint, and the served
model runs with the pooling it was trained with."""

from __future__ import annotations

import json

from services.core.config import TrainConfig
from services.core.registry import Registry
from tests.helpers import build_tiny_bert, toy_sentiment_rows, write_csv
from tests.unit.test_small_data import _sentence_transformers_files


def test_small_data_defaults_are_chosen_recorded_and_served(ray_cluster, tmp_path,
                                                            monkeypatch):
    from services.runtime.classifier import load_classifier, predict
    from services.training import tasks
    from services.training.run import run_training

    # A quarter of the real minimum of steps (a tiny model learns the toy set in fewer;
    # tests/unit/test_small_data.py checks the real values): 4 epochs, not 14.
    monkeypatch.setattr(tasks, "SMALL_DATA_MIN_STEPS", 100)
    rows = toy_sentiment_rows(1000, seed=4)  # 900 to train on: 29 steps an epoch
    model = build_tiny_bert(tmp_path / "st-model", [t for t, _ in rows])
    _sentence_transformers_files(model, mean=True)
    cfg = TrainConfig(model=str(model), train=str(write_csv(tmp_path / "few.csv", rows)),
                      name="few", registry=str(tmp_path / "registry"),
                      runs_dir=str(tmp_path / "runs"), workers=1, cpus_per_worker=2,
                      log_every_steps=50, seed=3)
    lines: list[str] = []
    result = run_training(cfg, progress_bar=False, out=lines.append)
    text = "\n".join(lines)
    assert "pooling: mean (a sentence-transformers encoder" in text, text
    assert "small-data settings: epochs 4, learning_rate 5e-05, warmup_ratio 0.1, " \
           "head_learning_rate 0.001 (900 training rows, below 5000" in text, text
    assert "4 epoch(s), 116 optimizer steps" in text, text
    assert result.metrics["accuracy"] >= 0.9, result.metrics
    assert result.promoted

    reg = Registry(cfg.registry)
    manifest = reg.verify("few", "v1")
    assert manifest["pooling"]["value"] == "mean"
    small = manifest["small_data"]
    assert small["applied"] and small["mode"] == "auto" and small["train_rows"] == 900
    assert small["optim"] == {"epochs": 4, "learning_rate": 5e-5, "warmup_ratio": 0.1,
                              "head_learning_rate": 1e-3}
    saved = manifest["config"]
    assert (saved["epochs"], saved["pooling"], saved["head_learning_rate"]) == (4, "mean", 1e-3)
    folder = reg.local_copy("few", "v1")
    assert json.loads((folder / "config.json").read_text())["tuneserve_pooling"] == "mean"

    loaded = load_classifier(reg, "few", "v1")
    assert type(loaded.model).__name__ == "MeanPooled" and loaded.traced is not None
    probs = predict(loaded, ["a superb film with lovely acting",
                             "a dull story with awful acting"])
    assert [loaded.labels[int(i)] for i in probs.argmax(dim=-1)] == ["positive", "negative"]
