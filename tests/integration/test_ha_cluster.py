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

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from services.client import Client
from services.core.net import free_port
from services.core.registry import Registry
from tests.helpers import copy_version, poll_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
SERVE = str(Path(sys.executable).parent / "serve")
TEXTS = ["a lovely film with superb acting"]
FAILED_BOUND = 3
"""Calls that may fail while a node is lost: those in flight on its connections."""


class Node:
    """One Ray node: `ray start --block` in a process group of its own."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path):
        self.name, self.args, self.env, self.logs = name, args, env, logs
        self.port = next(int(a.split("=")[1]) for a in args
                         if a.startswith("--node-manager-port="))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Node":
        log = open(self.logs / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen([RAY, "start", "--block", *self.args], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        return self

    def started(self) -> int:
        """How many times this node came up (its `ray start` log says so each time)."""
        log = self.logs / f"{self.name}.log"
        return log.read_text(errors="replace").count("Ray runtime started") \
            if log.exists() else 0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


class Load:
    """Client threads calling Classify on the shared port until stopped."""

    def __init__(self, address: str, threads: int = 3):
        self.address, self.stop = address, threading.Event()
        self.lock = threading.Lock()
        self.ok: list[float] = []
        self.failed: list[tuple[float, str]] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
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

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _ray_query(address: str, code: str, env: dict[str, str]) -> object:
    """Run `code` (which sets `out`) in a driver connected to the cluster; its JSON."""
    script = ("import json, ray\nray.init(address=%r, logging_level='ERROR')\n%s\n"
              "print('OUT=' + json.dumps(out))\n" % (address, code))
    try:
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:  # no GCS to answer (yet)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("OUT="):
            return json.loads(line[4:])
    return None


PLACEMENT = """
from ray._private import state
out = [(a["Name"].split("#")[1], a["Address"]["NodeID"]) for a in state.actors().values()
       if (a.get("Name") or "").startswith("SERVE_REPLICA::tuneserve#")
       and a.get("State") == "ALIVE"]
"""
NODE_IDS = "out = {n['NodeManagerPort']: n['NodeID'] for n in ray.nodes() if n['Alive']}"


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


def _nodes(env: dict[str, str], logs: Path, temp_dir: str, gcs_port: int,
           password: str) -> tuple[Node, list[Node]]:
    """The head (no CPUs, GCS in Redis) and two worker nodes, each on ports of its own."""
    def ports() -> list[str]:
        return [f"--dashboard-agent-listen-port={free_port()}",
                f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--temp-dir={temp_dir}",
                "--node-ip-address=127.0.0.1", "--disable-usage-stats"]

    head = Node("head", ["--head", f"--port={gcs_port}", "--num-cpus=0",
                         "--include-dashboard=true", f"--dashboard-port={free_port()}",
                         f"--redis-password={password}",
                         *ports()], env, logs)
    workers = [Node(f"worker{i}", [f"--address=127.0.0.1:{gcs_port}", "--num-cpus=2",
                                   *ports()], env, logs) for i in (1, 2)]
    return head, workers


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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_REDIS_ADDRESS": f"127.0.0.1:{redis_port}",
           "RAY_external_storage_namespace": f"ha-{os.getpid()}",
           # workers wait this long for a lost GCS to come back before they give up
           "RAY_gcs_rpc_server_reconnect_timeout_s": "120",
           # a raylet waits this long for its agents to start: slow on a loaded machine
           "RAY_agent_register_timeout_ms": "120000"}
    env.pop("RAY_ADDRESS", None)
    head, workers = _nodes(env, logs, temp_dir, gcs_port, password)
    address = f"127.0.0.1:{gcs_port}"
    state = {"address": address, "env": env, "head": head, "workers": workers,
             "grpc": f"127.0.0.1:{grpc_port}", "logs": logs, "temp_dirs": [temp_dir]}
    try:
        for alive, node in enumerate([head, *workers], start=1):
            _join(node, alive, address, env)
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
        _keep_ray_logs(state["temp_dirs"], logs)


def _keep_ray_logs(temp_dirs: list[str], logs: Path) -> None:
    """Ray's own logs beside the nodes' (the session folders go)."""
    for i, folder in enumerate(temp_dirs):
        try:
            shutil.copytree(Path(folder) / "session_latest" / "logs", logs / f"ray{i}",
                            ignore=shutil.ignore_patterns("*.sock"), dirs_exist_ok=True)
        except OSError:
            pass
        shutil.rmtree(folder, ignore_errors=True)


ALIVE = "out = len([n for n in ray.nodes() if n['Alive']])"


def _join(node: Node, alive: int, address: str, env: dict[str, str],
          attempts: int = 2) -> None:
    """Start a node and wait until the cluster has `alive` nodes. One at a time, and
    once more if `ray start` gave up (it waits 30 s for its raylet, which a loaded
    machine can exceed)."""
    for _ in range(attempts):
        before = node.started()
        node.start()
        # `ray start` says so once its raylet registered (or exits when it gave up).
        poll_until(lambda: node.proc.poll() is not None or node.started() > before,
                   timeout_s=180, poll_s=1)
        if node.proc.poll() is None and node.started() > before and \
                poll_until(lambda: _ray_query(address, ALIVE, env) == alive, timeout_s=120):
            return
        node.kill()
    raise AssertionError(f"node {node.name} did not join; see {node.logs}")


def _replica_nodes(state, deployment: str = "model-toy") -> list[str]:
    """The node ids of a deployment's live replicas."""
    placement = _ray_query(state["address"], PLACEMENT, state["env"]) or []
    return sorted(node for name, node in placement if name == deployment)


def test_worker_node_lost_replica_rescheduled_under_load(ha_cluster):
    before = _replica_nodes(ha_cluster)
    assert len(before) == 2, before
    node_ids = _ray_query(ha_cluster["address"], NODE_IDS, ha_cluster["env"])
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
