"""Start on an empty registry (ServeConfig.model_tasks): the app deploys with no version
of its models, health answers NOT_SERVING and Classify UNAVAILABLE; a version published
and promoted is served without a redeploy (the replicas poll the registry), and so is a
second model's first version later.

A second Serve application in the session cluster, built by `app_builder` from the args
a RayService's serveConfigV2 gives it, over a registry of its own that starts empty.
"""

from __future__ import annotations

import grpc
import pytest

from services.client import Client
from services.core.registry import Registry
from tests.helpers import copy_version, delete_app, poll_until

pytestmark = pytest.mark.timeout(600)

APP = "tuneserve-empty"
TEXTS = ["a lovely film with superb acting", "dull, tedious and far too long"]


def _replicas(client: Client, model: str) -> list[tuple[str, str]]:
    (info,) = client.list_models(model).models
    return sorted((r.replica, r.version) for r in info.replicas)


def test_serves_once_a_version_is_promoted_without_redeploy(server, trained, tmp_path):
    from ray import serve

    from services.serving.app import app_builder

    expected = server.classify("toy", TEXTS)  # asked while the session app runs alone
    source = Registry(trained[0].registry)
    registry = Registry(tmp_path / "registry")  # nothing in it, not even the folder
    args = {"registry": registry.uri, "models": ["fresh", "later"],
            "model_tasks": {"fresh": "classification", "later": "classification"},
            "replica_cpus": 0.25, "ingress_cpus": 0.0, "poll_interval_s": 0.5}
    serve.run(app_builder(args), name=APP, route_prefix=f"/{APP}", blocking=False)
    client = Client(server.address, token="", application=APP, timeout_s=60)
    try:
        # Deployed (RUNNING), yet nothing to serve: NOT_SERVING, never DEPLOY_FAILED.
        assert poll_until(lambda: serve.status().applications[APP].status == "RUNNING",
                          timeout_s=180), serve.status().applications[APP]
        assert client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as err:
            client.classify("fresh", TEXTS)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "model 'fresh' is loading" in err.value.details()
        before = _replicas(client, "fresh")
        assert before and all(v == "" for _, v in before), before

        # Published but not promoted: still nothing served.
        manifest = {k: v for k, v in source.manifest("toy", "v1").items()
                    if k not in ("files", "version", "name", "created_at")}
        version = registry.publish("fresh", source.local_copy("toy", "v1"), manifest,
                                   promote=False).version
        assert not registry.channel_state("fresh", "production").get("version")
        assert poll_until(lambda: client.health() != "NOT_SERVING", timeout_s=2) is None
        registry.set_channel("fresh", "production", version)
        client.wait_until_serving(timeout_s=120)
        answer = client.classify("fresh", TEXTS)
        assert answer.version == version
        assert [r.label for r in answer.results] == [r.label for r in expected.results]
        # the same replica loaded it: no redeploy, no restart
        assert [tag for tag, _ in _replicas(client, "fresh")] == [tag for tag, _ in before]

        # The second model's first version, later: served the same way.
        with pytest.raises(grpc.RpcError) as err:
            client.classify("later", TEXTS)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        later = copy_version(source, "toy", "v1", registry, "later")
        registry.set_channel("later", "production", later)

        def later_answers():
            try:
                return client.classify("later", TEXTS).version == later
            except grpc.RpcError:
                return False

        assert poll_until(later_answers, timeout_s=120)
        assert client.health() == "SERVING"
    finally:
        client.close()
        delete_app(APP, server)
