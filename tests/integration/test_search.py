"""--search: two Ray Tune trials of the tiny model, run in parallel with ASHA; the better
trial's best checkpoint is published as one version, the search in its manifest."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from services.core.config import TrainConfig
from services.core.registry import Registry
from services.training.search import trial_params


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_search_of_two_trials_publishes_the_better_one(tmp_path, tiny_model_dir, toy_csv):
    from services.training.run import run_training

    # 12 optimizer steps an epoch, evaluated every 4: up to 3 reports per trial for ASHA.
    cfg = TrainConfig(model=str(tiny_model_dir), train=str(toy_csv), name="searched",
                      registry=str(tmp_path / "registry"), runs_dir=str(tmp_path / "runs"),
                      workers=1, epochs=1, batch_size=16, learning_rate=3e-3,
                      eval_steps=4, log_every_steps=4, seed=3, search=True, search_trials=2)
    lines: list[str] = []
    result = run_training(cfg, progress_bar=False, out=lines.append)

    assert result.version == "v1"
    manifest = Registry(cfg.registry).manifest("searched", "v1")
    search = manifest["search"]
    # Trial 0 is the run's own settings (the flags, and what small data chose), the
    # other is drawn from the seed around them.
    own = search["trials"][0]["params"]
    assert own["learning_rate"] == 3e-3
    optim = dataclasses.replace(cfg.resolve().optim, **own)
    expected = trial_params(optim, 2, optim.seed)
    assert [t["params"] for t in search["trials"]] == expected
    assert expected[1] != expected[0]
    assert search["metric"] == "eval_accuracy" and search["concurrent_trials"] == 2
    trials = search["trials"]
    assert all(t["status"] in ("finished", "stopped early") and t["evaluations"] >= 1
               and t["best"] is not None for t in trials), trials

    def rank(t):
        return (t["best"]["eval_accuracy"], -t["best"]["eval_loss"])

    winner = max(trials, key=rank)
    loser = min(trials, key=rank)
    assert rank(winner) > rank(loser)
    assert search["best_trial"] == winner["trial"]
    assert search["best_params"] == winner["params"]
    # What was published is the winner's best checkpoint, with its metrics.
    assert manifest["metrics"]["accuracy"] == pytest.approx(winner["best"]["eval_accuracy"])
    assert manifest["metrics"]["loss"] == pytest.approx(winner["best"]["eval_loss"])
    published = Path(result.checkpoint_dir) / "model.safetensors"
    assert _sha(published) == _sha(Path(winner["best"]["checkpoint"]) / "model.safetensors")
    assert manifest["best_epoch"] == winner["best"]["epoch"]
    # The manifest's config is the one that trained the published weights.
    assert {k: manifest["config"][k] for k in own} == winner["params"]
    assert manifest["config"]["search"] is False
    assert any(line.startswith("search: 2 trials") for line in lines), lines
    assert any(f"trial {winner['trial']} is best" in line for line in lines), lines
