"""What a real training run leaves to look at: TensorBoard event files and a PNG of the
curves in its run folder, both linked from the published manifest. Checks the session's
`trained` run (2 Ray Train workers, 4 epochs) rather than training again."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.registry import Registry
from services.training.tracking import PLOT_FILE, TENSORBOARD_DIR


def test_tensorboard_has_every_step_and_epoch_of_the_run(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, result = trained
    steps = [e for e in result.history if e["type"] == "step"]
    evals = [e for e in result.history if e["type"] == "eval"]
    assert steps and len(evals) == cfg.epochs
    folder = Path(result.run_dir) / TENSORBOARD_DIR
    assert folder.is_dir() and any(p.name.startswith("events.out.tfevents")
                                   for p in folder.iterdir())
    acc = EventAccumulator(str(folder))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [s["step"] for s in steps]
    assert [e.value for e in loss] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/learning_rate")] == \
        pytest.approx([s["lr"] for s in steps], rel=1e-6)
    assert all(e.value > 0 for e in acc.Scalars("train/samples_per_second"))
    assert all(e.value > 0 for e in acc.Scalars("train/tokens_per_second"))
    for name in ("loss", "accuracy", "macro_f1"):
        points = acc.Scalars(f"eval/{name}")
        assert [e.step for e in points] == [e["step"] for e in evals], name
        assert [e.value for e in points] == \
            pytest.approx([e[f"eval_{name}"] for e in evals], rel=1e-6), name


def test_plot_is_in_the_run_folder_and_linked_from_the_manifest(trained):
    from PIL import Image

    cfg, result = trained
    plot = Path(result.run_dir) / PLOT_FILE
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as img:
        img.verify()
    manifest = Registry(cfg.registry).manifest("toy", result.version)
    assert manifest["artifacts"] == {"plot": str(plot),
                                     "tensorboard": str(Path(result.run_dir) / TENSORBOARD_DIR)}
    assert result.artifacts == manifest["artifacts"]
    assert result.best_epoch == manifest["best_epoch"]
