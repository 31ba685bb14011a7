"""Changes pushed to the replicas: an Admin Promote, a canary step and the CLI's promote
through the Admin API reach every replica of an app whose replicas poll the registry
only every 600 s, so only the status board's change notice can have told them
(services/serving/status.py), with zero failed calls under light load.

A second Serve application beside the session's, over its own copy of the toy
classifier, deleted when the module ends (as test_auth.py does)."""

from __future__ import annotations

import grpc
import pytest

from services.client import Client
from services.core.config import ServeConfig
from services.core.registry import Registry
from tests.helpers import ClientThreads, copy_version, poll_until, second_app, server_port

pytestmark = pytest.mark.timeout(600)

APP = "push-test"
MODEL = "toy"
TEXT = ["a superb film with lovely acting"]
POLL_S = 600.0
REACHED_S = 60.0  # well inside one poll interval: a pass within it was woken by a notice


@pytest.fixture(scope="module")
def pushed(server, trained, tmp_path_factory):
    source = Registry(trained[0].registry)
    registry = Registry(tmp_path_factory.mktemp("push") / "registry")
    for _ in range(3):
        copy_version(source, "toy", "v1", registry, MODEL)
    serve_cfg = ServeConfig(registry=registry.uri, replica_cpus=0.1, num_replicas=2,
                            poll_interval_s=POLL_S, admin_port=server_port())
    with second_app(server, APP, serve_cfg) as client:
        assert poll_until(lambda: replica_versions(client) == ["v1", "v1"], 120)
        yield client


def replica_versions(client) -> list[str]:
    (info,) = client.list_models(MODEL).models
    return sorted(r.version for r in info.replicas)


def replica_canaries(client) -> list[str]:
    (info,) = client.list_models(MODEL).models
    return sorted(r.canary_version for r in info.replicas)


class Load(ClientThreads):
    """Two client threads calling Classify until stopped; every outcome recorded."""

    def __init__(self, client):
        super().__init__(2)
        self.client = client
        self.versions: list[str] = []
        self.errors: list[str] = []

    def loop(self):
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
