"""Changes pushed to the replicas: an Admin Promote, a canary step and the CLI's promote
through the Admin API reach every replica of an app whose replicas poll the registry
only every 600 s, so only the status board's change notice can have told them
(services/serving/status.py), with zero failed calls under light load.

A second Serve application beside the session's, over its own copy of the toy
classifier, deleted when the module ends (as test_auth.py does)."""

from __future__ import annotations

import threading

import grpc
import pytest

from services.client import Client
from services.core.config import ServeConfig
from services.core.registry import Registry
from tests.helpers import delete_app, poll_until, server_port

pytestmark = pytest.mark.timeout(600)

APP = "push-test"
MODEL = "toy"
TEXT = ["a superb film with lovely acting"]
POLL_S = 600.0
REACHED_S = 60.0  # well inside one poll interval: a pass within it was woken by a notice


@pytest.fixture(scope="module")
def pushed(server, trained, tmp_path_factory):
    from ray import serve

    from services.serving.app import build_app

    cfg, _ = trained
    source = Registry(cfg.registry)
    registry = Registry(tmp_path_factory.mktemp("push") / "registry")
    manifest = {k: v for k, v in source.manifest("toy", "v1").items()
                if k not in ("files", "version", "name", "created_at")}
    for _ in range(3):
        registry.publish(MODEL, source.local_copy("toy", "v1"), manifest)
    admin_address = f"127.0.0.1:{server_port()}"
    serve_cfg = ServeConfig(registry=registry.uri, replica_cpus=0.1, num_replicas=2,
                            poll_interval_s=POLL_S,
                            admin_port=int(admin_address.rsplit(":", 1)[1]))
    serve.run(build_app(serve_cfg), name=APP, route_prefix=f"/{APP}", blocking=False)
    client = Client(server.address, application=APP, admin_address=admin_address,
                    timeout_s=60)
    try:
        client.wait_until_serving(timeout_s=180)
        assert poll_until(lambda: replica_versions(client) == ["v1", "v1"], 120)
        yield client
    finally:
        client.close()
        delete_app(APP, server)


def replica_versions(client) -> list[str]:
    (info,) = client.list_models(MODEL).models
    return sorted(r.version for r in info.replicas)


def replica_canaries(client) -> list[str]:
    (info,) = client.list_models(MODEL).models
    return sorted(r.canary_version for r in info.replicas)


class Load:
    """Two client threads calling Classify until stopped; every outcome recorded."""

    def __init__(self, client):
        self.client = client
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.versions: list[str] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self):
        with Client(self.client.address, application=APP, timeout_s=30,
                    max_attempts=1) as c:
            while not self.stop.is_set():
                try:
                    version = c.classify(MODEL, TEXT).version
                    with self.lock:
                        self.versions.append(version)
                except grpc.RpcError as exc:
                    with self.lock:
                        self.errors.append(f"{exc.code().name}: {exc.details()}")

    def answered_by(self, version: str, after: int) -> bool:
        with self.lock:
            return version in self.versions[after:]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_admin_promote_canary_and_cli_reach_every_replica_at_once(pushed):
    from services.cli import main

    with Load(pushed) as load:
        assert poll_until(lambda: load.answered_by("v1", 0), 60), load.errors[:3]
        resp = pushed.promote(MODEL, "v2")
        assert (resp.version, resp.previous_version) == ("v2", "v1")
        assert poll_until(lambda: replica_versions(pushed) == ["v2", "v2"], REACHED_S), \
            pushed.list_models(MODEL)
        seen = len(load.versions)
        assert poll_until(lambda: load.answered_by("v2", seen), 60)

        # a canary step: both replicas hold the candidate beside production
        pushed.start_canary(MODEL, "v3", 50.0)
        assert poll_until(lambda: replica_canaries(pushed) == ["v3", "v3"], REACHED_S), \
            pushed.list_models(MODEL)
        pushed.abort_canary(MODEL)
        assert poll_until(lambda: replica_canaries(pushed) == ["", ""], REACHED_S)

        # the CLI, through the Admin API
        assert main(["models", "promote", "--address", pushed.admin_address, MODEL,
                     "v3"]) == 0
        assert poll_until(lambda: replica_versions(pushed) == ["v3", "v3"], REACHED_S), \
            pushed.list_models(MODEL)
        seen = len(load.versions)
        assert poll_until(lambda: load.answered_by("v3", seen), 60)
    assert not load.errors, load.errors[:5]
    assert {"v1", "v2", "v3"} <= set(load.versions)
