"""High availability on a real multi-node Ray cluster on one machine, under Classify
load: a worker node holding a model replica lost (the replica starts again on the other
node), then the head lost (the workers' replicas answer on).

A head node (no CPUs, as in the RayService) and two worker nodes, each started with
`ray start --block` in a process group of its own, so that killing the group loses the
node whole (its raylet, its workers, its agents), as a lost pod does. The head's GCS
keeps its tables in a real redis-server (RAY_REDIS_ADDRESS and a password), as the
production overlay's gcsFaultToleranceOptions does. The application is deployed from a
Serve config file like the RayService's, with two ingress replicas answering gRPC on
one shared port (replica_grpc: the kernel spreads connections, as a Service does) and
two model replicas. Every call is counted; the failed ones are bounded. A new head
reloading the GCS from Redis is not exercised here: on a loaded machine its raylet
gives up waiting for its agents (docs/kubernetes.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest
import yaml

from services.client import Client
from services.core.net import free_port
from services.core.registry import Registry
from tests.helpers import (
    NODE_IDS,
    ClientThreads,
    copy_version,
    head_and_workers,
    join_ray_node,
    keep_ray_logs,
    poll_until,
    ray_nodes_env,
    ray_query,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SERVE = str(Path(sys.executable).parent / "serve")
TEXTS = ["a lovely film with superb acting"]
FAILED_BOUND = 3
"""Calls that may fail while a node is lost: those in flight on its connections."""


class Load(ClientThreads):
    """Client threads calling Classify on the shared port until stopped."""

    def __init__(self, address: str, threads: int = 3):
        super().__init__(threads)
        self.address = address
        self.ok: list[float] = []
        self.failed: list[tuple[float, str]] = []

    def loop(self) -> None:
        with Client(self.address, token="", timeout_s=20) as client:
            while not self.stop.is_set():
                try:
                    client.classify("toy", TEXTS)
                    with self.lock:
                        self.ok.append(time.monotonic())
                except grpc.RpcError as exc:
                    with self.lock:
                        self.failed.append((time.monotonic(), f"{exc.code().name}: "
                                                              f"{exc.details()}"))
                    time.sleep(0.05)

    def answered_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for x in self.ok if x > t)


PLACEMENT = """
from ray._private import state
out = [(a["Name"].split("#")[1], a["Address"]["NodeID"]) for a in state.actors().values()
       if (a.get("Name") or "").startswith("SERVE_REPLICA::tuneserve#")
       and a.get("State") == "ALIVE"]
"""


def _serve_config(path: Path, registry: Registry, grpc_port: int) -> Path:
    """A Serve config file like the RayService's serveConfigV2: two ingress replicas
    answering gRPC on one shared port (one per node, as the production overlay asks),
    two model replicas."""
    path.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": free_port()},
        "grpc_options": {"port": free_port(), "grpc_servicer_functions": []},
        "applications": [{
            "name": "tuneserve", "route_prefix": "/",
            "import_path": "services.serving.app:app_builder",
            "args": {"registry": registry.uri, "models": ["toy"], "host": "127.0.0.1",
                     "grpc_port": grpc_port, "replica_grpc": True, "access_log": False,
                     "replica_cpus": 0.5, "num_replicas": 2, "ingress_cpus": 0.1,
                     "ingress_replicas": 2, "poll_interval_s": 1.0},
            "deployments": [{"name": "ingress", "max_replicas_per_node": 1}]}]}))
    return path


@pytest.fixture(scope="module")
def ha_cluster(trained, tmp_path_factory):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (apt-get install redis-server): "
                    "GCS fault tolerance needs a real Redis")
    tmp = tmp_path_factory.mktemp("ha")
    logs = tmp / "logs"
    logs.mkdir()
    # Ray's session folder holds unix sockets: a short path.
    temp_dir = tempfile.mkdtemp(prefix="rha", dir="/tmp")
    registry = Registry(tmp / "registry")
    copy_version(Registry(trained[0].registry), "toy", "v1", registry, "toy")
    redis_port, gcs_port, grpc_port = free_port(), free_port(), free_port()
    password = os.urandom(12).hex()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--requirepass", password, "--save", "", "--appendonly", "no"],
                             stdout=open(logs / "redis.log", "wb"), stderr=subprocess.STDOUT)
    env = ray_nodes_env(RAY_REDIS_ADDRESS=f"127.0.0.1:{redis_port}",
                        RAY_external_storage_namespace=f"ha-{os.getpid()}",
                        # workers wait this long for a lost GCS to come back
                        RAY_gcs_rpc_server_reconnect_timeout_s="120")
    # the head's GCS keeps its tables in that Redis
    head, workers = head_and_workers(
        env, logs, temp_dir, gcs_port,
        head_args=("--include-dashboard=true", f"--dashboard-port={free_port()}",
                   f"--redis-password={password}"))
    address = f"127.0.0.1:{gcs_port}"
    state = {"address": address, "env": env, "head": head, "workers": workers,
             "grpc": f"127.0.0.1:{grpc_port}", "logs": logs, "temp_dirs": [temp_dir]}
    try:
        for alive, node in enumerate([head, *workers], start=1):
            join_ray_node(node, alive, address, env)
        subprocess.run([SERVE, "run", "--non-blocking", "--address", address,
                        str(_serve_config(tmp / "serve.yaml", registry, grpc_port))],
                       env=env, check=True, timeout=180, capture_output=True)
        with Client(state["grpc"], token="", timeout_s=20) as client:
            client.wait_until_serving(timeout_s=180)
        yield state
    finally:
        for node in [*workers, head]:
            node.kill()
        redis.kill()
        redis.wait(timeout=30)
        keep_ray_logs(state["temp_dirs"], logs)


def _replica_nodes(state, deployment: str = "model-toy") -> list[str]:
    """The node ids of a deployment's live replicas."""
    placement = ray_query(state["address"], PLACEMENT, state["env"]) or []
    return sorted(node for name, node in placement if name == deployment)


def test_worker_node_lost_replica_rescheduled_under_load(ha_cluster):
    before = _replica_nodes(ha_cluster)
    assert len(before) == 2, before
    node_ids = ray_query(ha_cluster["address"], NODE_IDS, ha_cluster["env"])
    # The node of a model replica (and whatever else runs there) is lost.
    victim = next(w for w in ha_cluster["workers"] if node_ids.get(str(w.port)) in before)
    survivor = next(w for w in ha_cluster["workers"] if w is not victim)
    with Load(ha_cluster["grpc"]) as load:
        assert poll_until(lambda: load.answered_since(0) >= 20, timeout_s=60)
        killed = time.monotonic()
        victim.kill()
        assert poll_until(lambda: load.answered_since(killed) >= 20, timeout_s=60), \
            load.failed[-3:]
        # Serve starts the lost replica again, on the node left.
        alive = node_ids[str(survivor.port)]
        assert poll_until(lambda: _replica_nodes(ha_cluster) == [alive, alive],
                          timeout_s=120, poll_s=2), _replica_nodes(ha_cluster)
        settled = time.monotonic()
        assert poll_until(lambda: load.answered_since(settled) >= 20, timeout_s=60)
    failed = [f for t, f in load.failed if t > killed]
    print(f"worker lost: {len(load.ok)} calls answered, {len(failed)} failed")
    assert len(failed) <= FAILED_BOUND, failed


def test_head_lost_serving_answers_on(ha_cluster):
    """The head (GCS, Serve controller, dashboard) lost under load: the workers' ingress
    and model replicas keep answering every call."""
    with Load(ha_cluster["grpc"]) as load:
        assert poll_until(lambda: load.answered_since(0) >= 20, timeout_s=60)
        killed = time.monotonic()
        ha_cluster["head"].kill()
        assert poll_until(lambda: load.answered_since(killed) >= 40, timeout_s=90), \
            load.failed[-3:]
    failed = [f for t, f in load.failed if t > killed]
    print(f"head lost: {load.answered_since(killed)} calls answered without it, "
          f"{len(failed)} failed")
    assert len(failed) <= FAILED_BOUND, failed
