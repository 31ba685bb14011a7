"""High availability on a real multi-node Ray cluster on one machine, under Classify
load, in the layout the production overlay serves (colocated: each ingress replica runs
the model and answers gRPC itself): a worker node lost (the other node's replica answers
every call, and a new node gets the lost replica back), then the head lost (the
workers' replicas answer on), then a new head started on the same Redis (the cluster
recovers, serving never stopped).

A head node (no CPUs, as in the RayService) and two worker nodes, each started with
`ray start --block` in a session of its own, so that killing every process of the
session loses the node whole (its raylet, its agents, its workers and their replicas)
at once, as a lost pod does (RayNode.lose). The head's GCS
keeps its tables in a real redis-server (RAY_REDIS_ADDRESS and a password), as the
production overlay's gcsFaultToleranceOptions does. The application is deployed from a
Serve config file made from the production overlay's serveConfigV2 (colocate,
replica_grpc, two replicas at least, one per node), without its TLS and tokens: two
ingress replicas answering gRPC on one shared port (the kernel spreads connections, as
a Service does). Every call is counted; the failed ones are bounded.
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
    RayNode,
    ray_node_args,
    ray_query,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SERVE = str(Path(sys.executable).parent / "serve")
PRODUCTION = Path(__file__).resolve().parents[2] / "k8s/overlays/production/rayservice-ha.yaml"
TEXTS = ["a lovely film with superb acting"]
HEAVY_TEXTS = [" ".join(TEXTS * 20)] * 64
"""Calls that spend tens of milliseconds on the replica (its model), not in the client."""
FAILED_BOUND = 3
"""Calls that may fail while a node is lost: those in flight on its connections."""


class Load(ClientThreads):
    """Client threads calling Classify on the shared port until stopped, each with a
    Client of `connections` connections, sending self.texts and pausing self.pause_s
    after each answer (both read at each call)."""

    def __init__(self, address: str, threads: int = 3, pause_s: float = 0.0,
                 connections: int = 1):
        super().__init__(threads)
        self.address = address
        self.pause_s = pause_s
        self.connections = connections
        self.texts = TEXTS
        self.retried: list[float] = []
        self.ok: list[float] = []
        self.failed: list[tuple[float, str]] = []

    def loop(self) -> None:
        with Client(self.address, token="", timeout_s=20,
                    connections=self.connections) as client:
            client.retry = CountedRetries(client.retry, self)
            while not self.stop.is_set():
                try:
                    client.classify("toy", self.texts)
                    with self.lock:
                        self.ok.append(time.monotonic())
                    self.stop.wait(self.pause_s)
                except grpc.RpcError as exc:
                    with self.lock:
                        self.failed.append((time.monotonic(), f"{exc.code().name}: "
                                                              f"{exc.details()}"))
                    time.sleep(0.05)

    def retried_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for x in self.retried if x > t)

    def answered_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for x in self.ok if x > t)


class CountedRetries:
    """A Client's RetryPolicy that records in load.retried when it tries a call again."""

    def __init__(self, policy, load: Load):
        self.policy, self.load = policy, load
        self.max_attempts = policy.max_attempts

    def wait_s(self, error, attempt: int):
        wait = self.policy.wait_s(error, attempt)
        if wait is not None:
            with self.load.lock:
                self.load.retried.append(time.monotonic())
        return wait


PLACEMENT = """
from ray._private import state
out = [(a["Name"].split("#")[1], a["Address"]["NodeID"]) for a in state.actors().values()
       if (a.get("Name") or "").startswith("SERVE_REPLICA::tuneserve#")
       and a.get("State") == "ALIVE"]
"""


def _serve_config(path: Path, registry: Registry, grpc_port: int) -> Path:
    """A Serve config file made from the production overlay's serveConfigV2: its
    application, layout (colocate, replica_grpc), sizes and placement (min_replicas 2,
    max_replicas_per_node 1), on this test's registry and ports; without TLS, tokens and
    the plaintext health port (files and a port of the pod), and at most the two
    replicas the two worker nodes hold (one per node)."""
    (patch,) = [op for op in yaml.safe_load(PRODUCTION.read_text())
                if op["path"] == "/spec/serveConfigV2"]
    (app,) = yaml.safe_load(patch["value"])["applications"]
    args = {k: v for k, v in app["args"].items()
            if k not in ("api_token_file", "admin_token_file", "tls_cert_file",
                         "tls_key_file", "health_port", "models", "model_tasks")}
    assert args["colocate"] and args["replica_grpc"] and args["min_replicas"] == 2, args
    assert [d["max_replicas_per_node"] for d in app["deployments"]] == [1], app
    args.update(registry=registry.uri, models=["toy"], model_tasks={"toy": "classification"},
                host="127.0.0.1", grpc_port=grpc_port, max_replicas=2)
    path.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": free_port()},
        "grpc_options": {"port": free_port(), "grpc_servicer_functions": []},
        "applications": [{**app, "args": args}]}))
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
        for node in [*workers, *state["workers"], head]:
            node.kill()
        redis.kill()
        redis.wait(timeout=30)
        keep_ray_logs(state["temp_dirs"], logs)


def _replica_nodes(state, deployment: str = "ingress") -> list[str]:
    """The node ids of a deployment's live replicas."""
    placement = ray_query(state["address"], PLACEMENT, state["env"]) or []
    return sorted(node for name, node in placement if name == deployment)


SERVE_RUNNING = """
from ray import serve
app = serve.status().applications["tuneserve"]
out = {name: int(d.replica_states.get("RUNNING", 0)) for name, d in app.deployments.items()}
"""
"""Each deployment's replicas running, as the Serve controller knows them."""


def test_worker_node_lost_replica_rescheduled_under_load(ha_cluster):
    """A worker node lost under load: the other node's ingress replica answers every
    call (a call in flight on the lost replica's connection fails UNAVAILABLE with no
    server's answer, and the Client tries it again, on a new connection that the
    surviving replica takes), and Serve starts the lost replica again on a new worker
    node (one replica a node: none on the node left)."""
    address, env = ha_cluster["address"], ha_cluster["env"]
    before = _replica_nodes(ha_cluster)
    node_ids = ray_query(address, NODE_IDS, env)
    assert sorted(before) == sorted(node_ids[str(w.port)] for w in ha_cluster["workers"])
    victim, survivor = ha_cluster["workers"]
    # Six clients flat out on 4 connections each (the kernel hands each connection to
    # one of the two replicas: all to one, 1 in 2**23), with calls that spend their time
    # on the replica, so that the lost replica holds some of every client's connections
    # and, mostly, calls in flight when it goes.
    with Load(ha_cluster["grpc"], threads=6, connections=4) as load:
        load.texts = HEAVY_TEXTS
        assert poll_until(lambda: load.answered_since(0) >= 20, timeout_s=60)
        killed = time.monotonic()
        victim.lose()
        assert poll_until(lambda: load.answered_since(killed) >= 20, timeout_s=60), \
            load.failed[-3:]
        # Then light calls at a steady pace (about 30 a second), not flat out: the new
        # node's agents must start within the raylet's fixed wait for them.
        load.texts, load.pause_s = TEXTS, 0.2
        # The node left holds one replica, and the lost one waits for a node.
        alive = node_ids[str(survivor.port)]
        assert poll_until(lambda: _replica_nodes(ha_cluster) == [alive],
                          timeout_s=120, poll_s=2), _replica_nodes(ha_cluster)
        # A new worker node (as KubeRay replaces a lost pod): the replica starts there.
        new = RayNode("worker3", [f"--address={address}", "--num-cpus=2",
                                  *ray_node_args(ha_cluster["temp_dirs"][0])],
                      env, ha_cluster["logs"])
        ha_cluster["workers"] = [survivor, new]
        join_ray_node(new, 3, address, env)
        added = ray_query(address, NODE_IDS, env)[str(new.port)]
        assert poll_until(lambda: _replica_nodes(ha_cluster) == sorted([alive, added]),
                          timeout_s=120, poll_s=2), _replica_nodes(ha_cluster)
        assert poll_until(lambda: ray_query(address, SERVE_RUNNING, env)
                          == {"ingress": 2, "status-board": 1}, timeout_s=60, poll_s=2)
        settled = time.monotonic()
        assert poll_until(lambda: load.answered_since(settled) >= 20, timeout_s=60)
    # The new replica answers on the shared port: a fresh client with connections
    # enough that the kernel hands some to it (all 8 to the other: 1 in 256).
    with Client(ha_cluster["grpc"], token="", timeout_s=20, connections=8) as client:
        for _ in range(16):
            assert client.classify("toy", TEXTS).results
    failed = [f for t, f in load.failed if t > killed]
    print(f"worker lost: {load.answered_since(killed)} calls answered since, "
          f"{len(failed)} failed ({load.retried_since(killed)} tries again by the "
          f"Client); the lost replica running again on a new node "
          f"{settled - killed:.1f} s after the loss")
    assert failed == []


def test_head_lost_serving_answers_on(ha_cluster):
    """The head (GCS, Serve controller, dashboard) lost under load: the workers' ingress
    replicas, which hold the model, keep answering every call."""
    with Load(ha_cluster["grpc"]) as load:
        assert poll_until(lambda: load.answered_since(0) >= 20, timeout_s=60)
        killed = time.monotonic()
        ha_cluster["head"].lose()
        assert poll_until(lambda: load.answered_since(killed) >= 40, timeout_s=90), \
            load.failed[-3:]
    failed = [f for t, f in load.failed if t > killed]
    print(f"head lost: {load.answered_since(killed)} calls answered without it, "
          f"{len(failed)} failed")
    assert len(failed) <= FAILED_BOUND, failed


def test_head_restarted_on_the_same_redis_recovers_the_cluster(ha_cluster):
    """A new head on the same Redis (GCS fault tolerance) reloads the cluster's tables:
    the worker nodes left rejoin it without restarting, the Serve controller starts
    again on it and recovers the application's replicas where they were, and calls are
    answered throughout."""
    head, env, address = ha_cluster["head"], ha_cluster["env"], ha_cluster["address"]
    head.lose()  # lost in the test before; killed here when that one did not run
    left = [w for w in ha_cluster["workers"] if w.proc.poll() is None]
    starts = [w.started() for w in left]
    # The new head in a fresh temp dir, as a new head pod has a fresh /tmp (in the old
    # one `ray start --head` finds the cluster it was, through the workers, and refuses).
    temp_dir = tempfile.mkdtemp(prefix="rha", dir="/tmp")
    ha_cluster["temp_dirs"].append(temp_dir)
    head.args = [f"--temp-dir={temp_dir}" if a.startswith("--temp-dir=") else a
                 for a in head.args]
    # Calls at a steady pace (about 20 a second), not flat out: the new head's dashboard
    # agent must start within the raylet's fixed wait for it (about 15 s in Ray 2.60),
    # which it misses when clients hold both cores.
    with Load(ha_cluster["grpc"], threads=2, pause_s=0.1) as load:
        assert poll_until(lambda: load.answered_since(0) >= 20, timeout_s=60)
        restarted = time.monotonic()
        join_ray_node(head, 1 + len(left), address, env)
        # The controller, started again on the new head, recovers the replicas that
        # answered on: the ingress replica of each worker node left.
        expected = {"ingress": len(left), "status-board": 1}
        assert poll_until(lambda: ray_query(address, SERVE_RUNNING, env) == expected,
                          timeout_s=180, poll_s=2), ray_query(address, SERVE_RUNNING, env)
        node_ids = ray_query(address, NODE_IDS, env)
        on_left = sorted(node_ids[str(w.port)] for w in left)
        assert _replica_nodes(ha_cluster) == on_left
        settled = time.monotonic()
        assert poll_until(lambda: load.answered_since(settled) >= 20, timeout_s=60)
    assert [w.started() for w in left] == starts  # the workers rejoined, not restarted
    assert all(w.proc.poll() is None for w in left)
    failed = [f for t, f in load.failed if t > restarted]
    print(f"head restarted: {load.answered_since(restarted)} calls answered, "
          f"{len(failed)} failed")
    assert len(failed) <= FAILED_BOUND, failed
