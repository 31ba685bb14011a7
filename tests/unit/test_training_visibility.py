"""Training visibility without Ray: the driver-side tracker turns rank 0's events into
the training gauges, TensorBoard scalars (read back with TensorBoard's own reader) and a
PNG of the curves; `tuneserve train` prints them per epoch. The real run is checked in
tests/integration/test_training_visibility.py."""

from __future__ import annotations

import pytest

from services.core import metrics
from services.training import tracking

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_history(epochs: int = 2, steps_per_epoch: int = 3) -> list[dict]:
    events = [{"type": "start", "total_steps": epochs * steps_per_epoch,
               "steps_per_epoch": steps_per_epoch, "epochs": epochs, "world_size": 2,
               "train_examples": 96, "eval_examples": 24}]
    step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            step += 1
            events.append({"type": "step", "epoch": epoch, "step": step,
                           "loss": 1.0 / step, "lr": 1e-3 * step, "samples_per_s": 10.0 * step,
                           "tokens_per_s": 100.0 * step})
        events.append({"type": "eval", "epoch": epoch, "step": step,
                       "eval_loss": 0.5 / epoch, "eval_accuracy": 0.5 + 0.2 * epoch,
                       "eval_macro_f1": 0.4 + 0.2 * epoch, "eval_examples": 24,
                       "eval_support": 24, "confusion_matrix": [[1, 0], [0, 1]],
                       "eval_per_class": {"a": {"f1": 1.0}}})
    return events


@pytest.fixture
def gauges(monkeypatch):
    seen: list[tuple[str, float, dict]] = []
    monkeypatch.setattr(metrics, "set_gauge",
                        lambda name, value, **tags: seen.append((name, value, tags)))
    return seen


def test_tracker_sets_the_training_gauges_by_run_and_model(tmp_path, gauges):
    tracker = tracking.RunTracker(tmp_path / "run-1", "run-1", "toy")
    for ev in fake_history():
        tracker.handle(ev)
    tracker.close()
    for name, _, tags in gauges:
        assert name in metrics.SPECS, name
        assert set(tags) == set(metrics.SPECS[name].labels), (name, tags)
        assert tags["run"] == "run-1" and tags["model"] == "toy"
    last = {(n, t.get("metric")): v for n, v, t in gauges}
    assert last[("tuneserve_train_loss", None)] == pytest.approx(1.0 / 6)
    assert last[("tuneserve_train_learning_rate", None)] == pytest.approx(6e-3)
    assert last[("tuneserve_train_samples_per_second", None)] == pytest.approx(60.0)
    assert last[("tuneserve_train_tokens_per_second", None)] == pytest.approx(600.0)
    assert last[("tuneserve_train_epoch", None)] == 2
    evals = {m: v for (n, m), v in last.items() if n == "tuneserve_train_eval_metric"}
    # counts (examples, support) are not metrics; neither are the matrices
    assert evals == pytest.approx({"loss": 0.25, "accuracy": 0.9, "macro_f1": 0.8})


def test_tensorboard_scalars_read_back(tmp_path, gauges):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = tracking.RunTracker(tmp_path / "run-1", "run-1", "toy",
                                  config={"model": "m", "epochs": 2})
    for ev in fake_history():
        tracker.handle(ev)
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "run-1" / tracking.TENSORBOARD_DIR))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/samples_per_second",
            "train/tokens_per_second", "train/epoch", "eval/loss", "eval/accuracy",
            "eval/macro_f1"} <= tags
    assert not {"eval/examples", "eval/support"} & tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in loss] == pytest.approx([1.0 / s for s in range(1, 7)])
    accuracy = acc.Scalars("eval/accuracy")
    assert [(e.step, round(e.value, 4)) for e in accuracy] == [(3, 0.7), (6, 0.9)]
    assert "config/text_summary" in acc.Tags()["tensors"]  # the run's config as text


def test_plot_is_a_png_with_both_panels(tmp_path, gauges):
    from PIL import Image

    tracker = tracking.RunTracker(tmp_path / "run-1", "run-1", "toy")
    for ev in fake_history():
        tracker.handle(ev)
    plot = tracker.plot()
    assert plot == tmp_path / "run-1" / tracking.PLOT_FILE
    assert plot.read_bytes()[:8] == PNG_MAGIC
    with Image.open(plot) as img:
        img.verify()
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size == (1100, 400)  # loss + eval panels
    tracker.close()
    assert tracker.artifacts(plot) == {"plot": str(plot),
                                       "tensorboard": str(tracker.tensorboard_dir)}


def test_plot_failure_does_not_fail_training(tmp_path, gauges):
    lines: list[str] = []
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    tracker = tracking.RunTracker(blocker / "run", "run", "toy", out=lines.append)
    for ev in fake_history():
        tracker.handle(ev)
    assert tracker.plot() is None
    assert tracker.artifacts(None) == {}
    assert any(line.startswith("tensorboard: not written") for line in lines), lines
    assert any(line.startswith("plot: not written") for line in lines), lines


def test_epoch_rows_and_the_train_summary_table():
    from services.cli import _train_summary

    rows = tracking.epoch_rows(fake_history())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["train_loss"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert rows[1]["accuracy"] == pytest.approx(0.9) and "examples" not in rows[1]
    text = _train_summary({
        "name": "toy", "version": "v3", "promoted": False, "registry": "/r",
        "checkpoint": "/r/toy/v3", "run_dir": "/runs/x", "wall_s": 3.0, "publish_s": 0.42,
        "metrics": {"accuracy": 0.9, "macro_f1": 0.8, "loss": 0.25},
        "epochs": rows, "best_epoch": 2,
        "artifacts": {"plot": "/runs/x/training_curves.png",
                      "tensorboard": "/runs/x/tensorboard"}})
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("epoch"))
    assert header.split() == ["epoch", "step", "train", "loss", "eval", "loss", "eval",
                              "accuracy", "eval", "macro_f1"]
    first = next(line for line in lines if line.startswith("1 "))
    assert first.split() == ["1", "3", "0.6111", "0.5000", "0.7000", "0.6000"]
    assert any(line.startswith("2 *") for line in lines)
    assert "published epoch 2 (*): accuracy 0.9000, macro_f1 0.8000, loss 0.2500" in lines
    assert "curves:    /runs/x/training_curves.png" in lines
    assert "published toy v3 -> /r/toy/v3 in 0.42s" in lines
    assert "tensorboard --logdir /runs/x/tensorboard" in lines
