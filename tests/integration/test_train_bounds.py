"""--max-steps: a run ends after N optimizer steps counted across epochs, evaluates
there and publishes its best checkpoint (docs/quality.md), with the bound in the manifest."""

from __future__ import annotations

import pytest

from services.core.config import TrainConfig
from services.core.registry import Registry
from services.training.loop import lr_at
from services.training.promotion import noise_margin


@pytest.mark.usefixtures("ray_cluster")
def test_max_steps_ends_the_run_mid_epoch_and_publishes_its_best(tmp_path, tiny_model_dir,
                                                                  toy_csv):
    from services.training.run import run_training

    # 200 rows, 20 held out: 180 / 16 = 12 optimizer steps an epoch, so 15 steps end
    # three steps into the second of three epochs.
    cfg = TrainConfig(model=str(tiny_model_dir), train=str(toy_csv), name="bounded",
                      registry=str(tmp_path / "registry"), runs_dir=str(tmp_path / "runs"),
                      workers=1, epochs=3, batch_size=16, learning_rate=2e-3,
                      warmup_ratio=0.0, max_steps=15, log_every_steps=1, seed=1)
    lines: list[str] = []
    result = run_training(cfg, progress_bar=False, out=lines.append)

    steps = [e for e in result.history if e["type"] == "step"]
    evals = [e for e in result.history if e["type"] == "eval"]
    assert [s["step"] for s in steps] == list(range(1, 16))
    # The learning rate decays to 0 at the bound, not at the end of the third epoch.
    assert [s["lr"] for s in steps] == pytest.approx(
        [lr_at(i, 15, 0, 2e-3) for i in range(15)])
    assert [(e["epoch"], e["step"]) for e in evals] == [(1, 12), (2, 15)]
    assert evals[1]["epoch_progress"] == pytest.approx(1 + 3 / 12, abs=1e-3)
    assert any("15 optimizer steps (--max-steps 15)" in line for line in lines), lines
    assert any("step 15: --max-steps reached" in line for line in lines), lines

    assert result.version == "v1"
    manifest = Registry(cfg.registry).manifest("bounded", "v1")
    assert manifest["bounds"] == {"max_steps": 15, "steps": 15, "ended_by_max_steps": True}
    assert manifest["config"]["max_steps"] == 15
    # the best evaluation, or the last where the best is within the 20 eval rows' noise
    best, last = max(evals, key=lambda e: e["eval_accuracy"]), evals[-1]
    within = best["eval_accuracy"] - last["eval_accuracy"] <= noise_margin(
        last["eval_accuracy"], 20)
    published = last if within else best
    assert manifest["best_epoch"] == published["epoch"]
    assert manifest["metrics"]["accuracy"] == pytest.approx(published["eval_accuracy"])
