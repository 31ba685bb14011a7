"""Serve autoscaling, driven by the same settings as the RayService: under load the
model deployment grows to max_replicas while every call succeeds; idle, it shrinks."""

import threading
import time

import grpc
import pytest

from tests.helpers import poll_until as wait_for

from services.client import Client
from services.serving.app import APP_NAME, model_deployment_name

pytestmark = pytest.mark.timeout(600)


def running_replicas(model: str = "toy") -> int:
    from ray import serve

    app = serve.status().applications[APP_NAME]
    return app.deployments[model_deployment_name(model)].replica_states.get("RUNNING", 0)




def test_scales_up_under_load_and_back_down(server):
    assert wait_for(lambda: running_replicas() == 1, 120), "did not settle at 1 replica"
    stop = threading.Event()
    ok = [0]
    failures: list[str] = []
    lock = threading.Lock()

    def client_loop():
        with Client(server.address, timeout_s=60) as c:
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
        scaled = wait_for(lambda: running_replicas() >= 2, 120)
        # keep the load on a little while with both replicas serving
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert scaled, "Serve did not add a replica under load"
    assert not failures, failures[:5]
    assert ok[0] > 20
    assert wait_for(lambda: running_replicas() == 1, 180), "did not scale back down"
    assert server.classify("toy", ["a superb film with lovely acting"]).results[0].label == "positive"
