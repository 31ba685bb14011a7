"""A training run whose folder is in S3-compatible object storage (a real moto S3
server on loopback), as on a Kubernetes cluster without a shared volume: the workers
upload their checkpoints to the bucket, a driver lost after a checkpoint is followed by
the same command (a RayJob retry) that resumes from it there, and the best checkpoint
is published whole from the bucket into an S3 registry.
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
from services.training.run import FINISHED_FILE, RUN_CONFIG_FILE
from tests.helpers import poll_until
from tests.unit.test_registry_s3 import BUCKET, s3_endpoint  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_EC2_METADATA_DISABLED": "true"}


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"][len(prefix):] for page in pages for o in page.get("Contents", [])]


def test_a_run_in_object_storage_resumes_there_and_publishes_from_there(
        ray_cluster, s3_endpoint, tmp_path, tiny_model_dir, toy_csv,  # noqa: F811
        monkeypatch, capsys):
    import boto3
    import ray

    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path / "cache"))
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    query = f"?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    runs_uri, registry_uri = f"s3://{BUCKET}/runs{query}", f"s3://{BUCKET}/models{query}"
    address = ray.get_runtime_context().gcs_address
    args = ["train", "--model", str(tiny_model_dir), "--train", str(toy_csv),
            "--name", "nightly", "--run-name", "nightly-s3", "--registry", registry_uri,
            "--runs-dir", runs_uri, "--workers", "2", "--epochs", "2",
            "--batch-size", "16", "--eval-steps", "4", "--learning-rate", "2e-3",
            "--max-length", "32", "--seed", "7", "--address", address]
    # The job's workers get the credentials as a RayJob's pods get them from a Secret:
    # in their environment (here the job's runtime env, as `ray job submit` sets it).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_JOB_CONFIG_JSON_ENV_VAR":
           json.dumps({"runtime_env": {"env_vars": CREDENTIALS}})}

    def train(extra_env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "services", *args, "--json"],
                                env={**env, **extra_env}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, text=True)

    run = "runs/nightly-s3/"
    proc = train({FAULT_ENV: "step=6,action=pause"})
    try:
        # The worker pauses at step 6, after the checkpoint of step 4: the driver is lost.
        assert poll_until(lambda: ".faults/fault-at-6" in _keys(client, run),
                          timeout_s=240), "the run never reached step 6"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    first = _keys(client, run)
    assert RUN_CONFIG_FILE in first and FINISHED_FILE not in first
    assert any(k.startswith("checkpoint_") and k.endswith("/train_state.json")
               for k in first), first
    registry = Registry(registry_uri)
    assert registry.versions("nightly") == []

    # The same command again (a retry, on another node: nothing local is left to it).
    proc = train({})
    output, _ = proc.communicate(timeout=420)
    assert proc.returncode == 0, output
    assert "resuming run nightly-s3" in output
    assert "resumed from the checkpoint at epoch 1, step 4" in output
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["version"] == "v1"
    assert summary["run_dir"] == f"s3://{BUCKET}/runs/nightly-s3"
    assert summary["artifacts"]["plot"] == f"s3://{BUCKET}/runs/nightly-s3/training_curves.png"
    assert [row["epoch"] for row in summary["epochs"]][-1] == 2
    after = _keys(client, run)
    assert FINISHED_FILE in after and "training_curves.png" in after
    assert any(k.startswith("tensorboard/") for k in after)
    assert {k.split("/", 1)[0] for k in _keys(client, "runs/")} - {""} == {"nightly-s3"}

    # The published version is whole: every file the manifest lists, checksums verified.
    manifest = registry.verify("nightly", "v1")
    assert {"model.safetensors", "config.json"} <= set(manifest["files"])
    assert "trainer_state.safetensors" not in manifest["files"]  # resuming's alone
    assert manifest["run"] == "nightly-s3"

    # Once finished, the same command is refused: nothing trained or published twice.
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "--run-name: run 'nightly-s3' already finished and was published as nightly v1" \
        in err
    assert registry.versions("nightly") == ["v1"]
