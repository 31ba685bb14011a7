"""A training run with a name (`--run-name`, or `run_name` in the RayJob's run config)
resumes when the same command runs again: what a RayJob retry or a re-submitted job
does after its driver was lost. The driver is killed (SIGKILL, as a lost head pod) after
a checkpoint; the same command then continues from that checkpoint, and once the run
finished the command is refused instead of training and publishing again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from services.cli import main as cli_main
from services.core.registry import Registry
from services.training.loop import FAULT_ENV
from services.training.run import RUN_CONFIG_FILE
from tests.helpers import poll_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_same_run_name_resumes_from_the_last_checkpoint(
        ray_cluster, tmp_path, tiny_model_dir, toy_csv, capsys):
    import ray

    address = ray.get_runtime_context().gcs_address
    runs, registry = tmp_path / "runs", tmp_path / "registry"
    args = ["train", "--model", str(tiny_model_dir), "--train", str(toy_csv),
            "--name", "nightly", "--run-name", "nightly-1", "--registry", str(registry),
            "--runs-dir", str(runs), "--workers", "2", "--epochs", "2",
            "--batch-size", "16", "--eval-steps", "4", "--learning-rate", "2e-3",
            "--max-length", "32", "--seed", "7", "--address", address]
    env = {**os.environ, FAULT_ENV: "step=6,action=pause", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "services", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    run_dir = runs / "nightly-1"
    try:
        # The worker pauses at step 6, after the checkpoint of step 4: the driver is lost.
        assert poll_until(lambda: (run_dir / ".faults" / "fault-at-6").exists(),
                          timeout_s=240), "the run never reached step 6"
        assert (run_dir / RUN_CONFIG_FILE).is_file()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert Registry(registry).versions("nightly") == []

    # The same command again (a retry): it resumes the run, it does not start over.
    assert cli_main([*args, "--json"]) == 0
    out = capsys.readouterr().out
    assert "resuming run nightly-1" in out
    assert "resumed from the checkpoint at epoch 1, step 4" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["version"] == "v1" and summary["run_dir"] == str(run_dir.resolve())
    assert [row["epoch"] for row in summary["epochs"]][-1] == 2
    assert sorted(p.name for p in runs.iterdir()) == ["nightly-1"]

    # Once finished, the same command is refused: nothing trained or published twice.
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "--run-name: run 'nightly-1' already finished and was published as nightly v1" \
        in err and "another --run-name" in err
    assert Registry(registry).versions("nightly") == ["v1"]
