"""Training survives what production throws at it.

- a Ray Train worker killed (SIGKILL) in the middle of an epoch: the run resumes from
  its last checkpoint (weights, optimizer moments, step, data position) and ends where
  an uninterrupted run with the same seed ends;
- more failures than `max_failures`: a clear error, a non-zero exit, nothing published;
- the driver interrupted (Ctrl-C): it stops at once, and `tuneserve train --resume RUN`
  continues from the last checkpoint (a finished run is not resumed).

Faults are injected at a known optimizer step through TUNESERVE_TEST_FAULT (see
services/training/loop.py), so the tests do not race the training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import main as cli_main
from services.core.config import TrainConfig
from services.core.errors import TrainingFailed
from services.core.registry import Registry
from services.training.loop import FAULT_ENV
from services.training.run import RUN_CONFIG_FILE
from tests.helpers import (FAULT_RUN, assert_same_quality, eval_events, fault_run_config,
                           poll_until, train_with_fault)

pytestmark = pytest.mark.slow

BATCH, EVAL_STEPS = FAULT_RUN["batch_size"], FAULT_RUN["eval_steps"]


def _cfg(tmp_path: Path, model_dir, csv, name: str, **kw) -> TrainConfig:
    return fault_run_config(tmp_path, model_dir, csv, name, **kw)


def test_a_worker_killed_mid_epoch_resumes_from_the_last_checkpoint(
        ray_cluster, tmp_path, tiny_model_dir, toy_csv, uninterrupted_run):
    # 180 training rows / 16 = 12 steps an epoch; checkpoints at steps 4 and 8; the
    # last worker dies at step 6, in the middle of epoch 1.
    cfg = _cfg(tmp_path, tiny_model_dir, toy_csv, "faulty", max_failures=1)
    result, lines = train_with_fault(cfg, fault="step=6,action=kill")

    killed = list((Path(result.run_dir) / ".faults").glob("fault-at-*"))
    assert [p.read_text() for p in killed] == ["1"], "the worker was not killed"
    resumed = [line for line in lines if line.startswith("resumed from")]
    assert resumed == ["resumed from the checkpoint at epoch 1, step 4"], "\n".join(lines)
    evals = eval_events(result)
    plain = eval_events(uninterrupted_run)
    # Evaluations after the restart continue the same schedule to the same last step.
    assert evals[-1]["step"] == plain[-1]["step"] == 2 * 12
    assert [e["step"] for e in evals if e["step"] > 4] == \
        [e["step"] for e in plain if e["step"] > 4]
    assert result.version == "v1"
    n_eval = evals[-1]["eval_examples"]
    assert n_eval == plain[-1]["eval_examples"]
    assert_same_quality(result.metrics, uninterrupted_run.metrics, n_eval)
    # Only the model is published, not what resuming needed.
    files = {p.name for p in Path(result.checkpoint_dir).iterdir()}
    assert "model.safetensors" in files
    assert not {"trainer_state.safetensors", "adapter.safetensors"} & files


def test_more_failures_than_allowed_exit_non_zero_and_publish_nothing(
        ray_cluster, tmp_path, tiny_model_dir, toy_csv):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_csv, "doomed", max_failures=1)
    with pytest.raises(TrainingFailed) as err:
        train_with_fault(cfg, fault="step=2,action=kill,times=10")
    message = str(err.value)
    assert "worker failures tolerated: 1" in message and "nothing was published" in message
    assert "--resume" in message and "Traceback" not in message
    assert Registry(cfg.registry).versions("doomed") == []
    # The command line's side (exit code 1, one line): tests/unit/test_cli.py.


def test_train_resume_continues_a_run_whose_driver_was_killed(
        ray_cluster, tmp_path, tiny_model_dir, toy_csv, capsys):
    import ray

    address = ray.get_runtime_context().gcs_address
    runs = tmp_path / "runs"
    registry = tmp_path / "registry"
    env = {**os.environ, FAULT_ENV: "step=6,action=pause", "PYTHONUNBUFFERED": "1"}
    # One epoch of 12 steps: the pause at step 6 falls between the checkpoints of steps
    # 4 and 8, and nothing here compares with a longer run.
    epochs = 1
    cmd = [sys.executable, "-m", "services", "train", "--model", str(tiny_model_dir),
           "--train", str(toy_csv), "--name", "resumable", "--registry", str(registry),
           "--runs-dir", str(runs), "--workers", "2", "--epochs", str(epochs),
           "--batch-size", str(BATCH), "--eval-steps", str(EVAL_STEPS),
           "--learning-rate", "2e-3", "--max-length", "32", "--seed", "7",
           "--address", address]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        # The worker pauses at step 6, after the checkpoint of step 4: Ctrl-C the
        # driver. It stops at once (the run does not go on without it) and says how to
        # continue.
        marker = poll_until(lambda: next(runs.glob("resumable-*/.faults/fault-at-6"), None),
                            timeout_s=180)
        assert marker is not None
        run_dir = marker.parent.parent
        assert (run_dir / RUN_CONFIG_FILE).is_file()
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, output
    assert f"interrupted: run {run_dir.name} stopped" in output
    assert f"--resume {run_dir.name}" in output and "Traceback" not in output
    assert Registry(registry).versions("resumable") == []

    # Resume by name from the runs folder; the worker's pause hook has already fired.
    code = cli_main(["train", "--resume", run_dir.name, "--runs-dir", str(runs),
                     "--address", address, "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "resumed from the checkpoint at epoch 1, step 4" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["version"] == "v1" and summary["run_dir"] == str(run_dir.resolve())
    assert [row["epoch"] for row in summary["epochs"]][-1] == epochs
    # A finished run is not trained or published again.
    assert cli_main(["train", "--resume", run_dir.name, "--runs-dir", str(runs),
                     "--address", address]) == 2
    assert "already finished and was published as resumable v1" in capsys.readouterr().err
    assert Registry(registry).versions("resumable") == ["v1"]

    # Asking to resume what does not exist, or with new settings, is a clear error.
    assert cli_main(["train", "--resume", "no-such-run", "--runs-dir", str(runs)]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err
    assert cli_main(["train", "--resume", run_dir.name, "--runs-dir", str(runs),
                     "--epochs", "9"]) == 2
    assert "drop --epochs" in capsys.readouterr().err


def test_a_last_batch_smaller_than_the_workers_still_steps_every_rank(
        ray_cluster, tmp_path, tiny_model_dir, toy_rows):
    # 5 rows, micro-batches of 1 on each of 2 workers, 2 of them per step: the third
    # micro-batch of each epoch holds one row, so the second worker has no share and
    # runs a zero-weighted example to take part in DDP's all-reduce (sharding.py).
    from tests.helpers import write_csv

    train = write_csv(tmp_path / "five.csv", toy_rows[:5])
    held = write_csv(tmp_path / "held.csv", toy_rows[5:15])
    cfg = _cfg(tmp_path, tiny_model_dir, train, "five", eval=str(held), batch_size=4,
               grad_accum_steps=2, eval_steps=None, log_every_steps=1,
               class_weights="balanced")
    result, lines = train_with_fault(cfg)
    steps = [e for e in result.history if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4], "\n".join(lines)
    assert all(0 < e["loss"] < 5 and e["samples_per_s"] > 0 for e in steps)
    assert result.version == "v1"
    assert [e["epoch"] for e in eval_events(result)] == [1, 2]
