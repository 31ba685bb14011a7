"""Multi-node training on one machine: a node lost in the middle of an epoch.

A cluster of its own, apart from the session's (its own ports and temp dir): a head with
no CPUs (the driver, Ray Train's controller and the progress queue live there, as on a
RayJob's head) and two worker nodes of 2 CPUs each, every node started with
`ray start --block` in a process group of its own. `tuneserve train --address` runs the
fault tests' run (tests.helpers.FAULT_RUN) on 2 workers with --placement-strategy
SPREAD: one worker on each worker node. When the last rank reaches step 6 (after the
checkpoint of step 4; TUNESERVE_TEST_FAULT pauses it there) one worker node is lost
whole: its raylet, agents and workers SIGKILLed at once (RayNode.lose), as when its
machine goes. The run resumes from the checkpoint of step 4 on the
node left (SPREAD shares a node when it must; the head has no CPUs, and no node
replaces the lost one) and publishes a model of the uninterrupted run's quality.

The head's GCS declares a node dead after 3 failed health checks a second apart
(Ray's default: 5, 3 s apart), so that the restart does not wait on a node that is
gone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from services.core.net import free_port
from services.core.registry import Registry
from services.training.loop import FAULT_ENV
from tests.helpers import (
    assert_same_quality,
    fault_run_config,
    head_and_workers,
    join_ray_nodes,
    keep_ray_logs,
    poll_until,
    ray_nodes_env,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RESUMED = "resumed from the checkpoint at epoch 1, step 4"


@pytest.fixture
def cluster(tmp_path):
    """Head (0 CPUs) and two worker nodes (2 CPUs each); every node killed at the end."""
    logs = tmp_path / "logs"
    logs.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # unix sockets: a short path
    gcs_port = free_port()
    env = ray_nodes_env(RAY_health_check_period_ms="1000",
                        RAY_health_check_failure_threshold="3")
    address = f"127.0.0.1:{gcs_port}"
    head, workers = head_and_workers(env, logs, temp_dir, gcs_port)
    try:
        join_ray_nodes([head], 1, address, env)
        join_ray_nodes(workers, 3, address, env)
        yield {"address": address, "env": env, "workers": workers}
    finally:
        for node in [*workers, head]:
            node.kill()
        keep_ray_logs([temp_dir], logs)


def test_a_node_lost_mid_epoch_resumes_on_the_node_left(cluster, tmp_path, tiny_model_dir,
                                                         toy_csv, uninterrupted_run):
    cfg = fault_run_config(tmp_path, tiny_model_dir, toy_csv, "multinode",
                           run_name="multinode", max_failures=1)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    run_dir = tmp_path / "runs" / "multinode"
    output = tmp_path / "train.out"
    env = {**cluster["env"], FAULT_ENV: "step=6,action=pause", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "services", "train", "--config", str(config),
           "--address", cluster["address"], "--placement-strategy", "SPREAD", "--json"]
    with output.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp_path)

    def said() -> str:
        return output.read_text(errors="replace")

    try:
        assert poll_until(lambda: (run_dir / ".faults" / "fault-at-6").exists()
                          or proc.poll() is not None, timeout_s=300), said()
        assert proc.poll() is None, said()
        # One Ray Train worker on each worker node.
        placed = {w.name: len(w.processes("ray::RayTrainWorker")) for w in cluster["workers"]}
        assert placed == {"worker1": 1, "worker2": 1}, placed

        victim = cluster["workers"][0]
        killed = time.monotonic()
        victim.lose()
        assert poll_until(lambda: RESUMED in said() or proc.poll() is not None,
                          timeout_s=180), said()
        resumed_s = time.monotonic() - killed
        proc.wait(timeout=300)
        done_s = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    text = said()
    assert proc.returncode == 0, text
    assert [line for line in text.splitlines() if line.startswith("resumed from")] == \
        [RESUMED], text
    summary = json.loads(text.strip().splitlines()[-1])
    print(f"node lost at step 6: resumed {resumed_s:.1f}s after the kill, run done "
          f"{done_s:.1f}s after it; accuracy {summary['metrics']['accuracy']:.3f} "
          f"(uninterrupted {uninterrupted_run.metrics['accuracy']:.3f}), loss "
          f"{summary['metrics']['loss']:.4f} "
          f"(uninterrupted {uninterrupted_run.metrics['loss']:.4f})")

    # The same evaluation schedule to the same last step, and the same quality.
    plain = [e for e in uninterrupted_run.history if e["type"] == "eval"]
    steps = [row["step"] for row in summary["epochs"]]
    assert [s for s in steps if s > 4] == [e["step"] for e in plain if e["step"] > 4]
    assert steps[-1] == plain[-1]["step"] == 2 * 12
    assert summary["version"] == "v1"
    assert Registry(cfg.registry).versions("multinode") == ["v1"]
    assert_same_quality(summary["metrics"], uninterrupted_run.metrics,
                        plain[-1]["eval_examples"])
