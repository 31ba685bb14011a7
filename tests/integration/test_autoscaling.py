"""Serve autoscaling, driven by the same settings as the RayService: under load the
model deployment grows to max_replicas while every call succeeds; idle, it shrinks.
In ServeConfig's default layout (calls through Serve's gRPC proxy) and in the
replica_grpc layouts (calls on the ingress replicas' own gRPC servers, which Serve never
sees): `models` (the model deployment scales on the ingress's calls to it) and the one
`tuneserve serve` runs with no layout flag, which the production overlay renders
(colocated: the ingress replicas hold the model and report their servers' calls)."""

import dataclasses
import threading

import grpc
import pytest

from tests.helpers import copy_version, delete_app, server_port
from tests.helpers import poll_until as wait_for

from services.cli import build_parser
from services.cli.serve import LAYOUTS
from services.client import Client
from services.core.registry import Registry
from services.serving.app import APP_NAME, model_deployment_name

pytestmark = pytest.mark.timeout(600)


def running_replicas(deployment: str = model_deployment_name("toy"),
                     app: str = APP_NAME) -> int:
    from ray import serve

    status = serve.status().applications[app]
    return status.deployments[deployment].replica_states.get("RUNNING", 0)


def test_scales_up_under_load_and_back_down(server):
    scale_under_load(server, server.address, APP_NAME, model_deployment_name("toy"))


REPLICA_GRPC_APP = "tuneserve-replica-grpc"
DEFAULT_LAYOUT = build_parser().parse_args(["serve"]).layout
"""`tuneserve serve`'s layout with no layout flag (colocated), the production overlay's
(tests/unit/test_k8s_production.py)."""


@pytest.mark.parametrize("layout", ["models", DEFAULT_LAYOUT])
def test_replica_grpc_layout_scales(server, trained, tmp_path, layout):
    """The ingress replicas answer on a port of their own, which Serve never sees; the
    model deployment behind them (models), or the ingress replicas holding the model
    (colocated: they report their servers' calls to Serve's autoscaler), still go
    1 -> 2 -> 1 replicas under load and after it, with every call answered."""
    from ray import serve

    from services.serving.app import INGRESS_DEPLOYMENT, build_app

    flags = {"colocate": False, "direct_ingress": False, **LAYOUTS[layout]}
    assert flags["replica_grpc"], layout  # a port of the replicas' own
    registry = Registry(tmp_path / "registry")
    copy_version(Registry(trained[0].registry), "toy", "v1", registry, "toy")
    port = server_port()
    cfg = dataclasses.replace(server.serve_cfg, registry=registry.uri, **flags,
                              models=["toy"], host="127.0.0.1", grpc_port=port,
                              admin_port=None)
    serve.run(build_app(cfg.validate()), name=REPLICA_GRPC_APP,
              route_prefix=f"/{REPLICA_GRPC_APP}", blocking=False)
    try:
        with Client(f"127.0.0.1:{port}", timeout_s=60) as client:
            client.wait_until_serving(timeout_s=180)
        scale_under_load(server, f"127.0.0.1:{port}", REPLICA_GRPC_APP,
                         INGRESS_DEPLOYMENT if flags["colocate"] else
                         model_deployment_name("toy"))
    finally:
        delete_app(REPLICA_GRPC_APP, server)


def scale_under_load(server, address: str, app: str, deployment: str) -> None:
    assert wait_for(lambda: running_replicas(deployment, app) == 1, 120), "did not settle at 1"
    stop = threading.Event()
    ok = [0]
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop():
        with Client(address, timeout_s=60) as c:
            while not stop.is_set():
                try:
                    resp = c.classify("toy", ["a lovely film with superb acting"] * 8)
                    assert resp.version == "v1"
                    with lock:
                        ok[0] += 1
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        scaled = wait_for(lambda: running_replicas(deployment, app) >= 2, 120)
        # keep the load on until both replicas have answered calls
        done = ok[0]
        wait_for(lambda: ok[0] >= done + 20, 60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert scaled, "Serve did not add a replica under load"
    assert not failures, failures[:5]
    assert ok[0] > 20
    assert wait_for(lambda: running_replicas(deployment, app) == 1, 180), "did not scale back down"
    with Client(address, timeout_s=60) as c:
        assert c.classify("toy", ["a superb film with lovely acting"]).results[0].label == \
            "positive"
