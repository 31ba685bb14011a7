"""ServeConfig.colocate: the models run inside the ingress replica (no model deployments),
and ServeConfig.replica_grpc: that replica answers gRPC on a port of its own.

A second Serve application in the session cluster, over a registry of its own holding
the session's classifier and generator, built with colocate=True and replica_grpc=True,
reached both through Serve's gRPC proxy (with the `application` metadata) and on the
replica's own port. Either way it must answer exactly as the session's (default layout)
server does, keep the error contract and stop a cancelled stream's generation; it
hot-loads a promoted version, and deleting the app closes the replica's port.
"""

from __future__ import annotations

import grpc
import pytest

from services.client import Client
from services.core.config import ServeConfig
from services.core.registry import Registry
from tests.conftest import GEN_MODEL
from tests.helpers import copy_version, delete_app, poll_until, server_port

pytestmark = pytest.mark.timeout(600)

APP = "tuneserve-colocated"
TEXTS = ["a lovely film with superb acting", "dull, tedious and far too long",
         "the plot was fine", "😀 ✓ 日本語"]
PROMPTS = [("red cat", {}), ("blue dog", {"max_new_tokens": 3}),
           ("red cat", {"temperature": 0.9, "seed": 7, "max_new_tokens": 8})]


def _board(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("status-board", app).get.remote().result()


@pytest.fixture(scope="module")
def colocated(server, trained, trained_generator, tmp_path_factory):
    from ray import serve

    from services.serving.app import build_app

    # What the session's server (separate model deployments) answers, asked before the
    # second app exists (calls without `application` metadata are routed while only
    # one app runs).
    expected_classify = server.classify("toy", TEXTS)
    expected_generate = [server.generate(GEN_MODEL, p, **kw) for p, kw in PROMPTS]
    source = Registry(trained[0].registry)
    registry = Registry(tmp_path_factory.mktemp("colocated") / "registry")
    copy_version(source, "toy", "v1", registry, "toy")
    copy_version(source, GEN_MODEL, "v1", registry, GEN_MODEL)
    # access_log off: Serve must accept the logging option on the ingress
    port, admin_port = server_port(), server_port()
    cfg = ServeConfig(registry=registry.uri, colocate=True, replica_cpus=0.5,
                      poll_interval_s=0.5, access_log=False, replica_grpc=True,
                      host="127.0.0.1", grpc_port=port, admin_port=admin_port)
    serve.run(build_app(cfg), name=APP, route_prefix=f"/{APP}", blocking=False)
    clients = {"proxy": Client(server.address, token="", application=APP, timeout_s=60,
                               admin_address=f"127.0.0.1:{admin_port}"),
               "replica": Client(f"127.0.0.1:{port}", token="", timeout_s=60)}
    state = {"client": clients["proxy"], "clients": clients, "port": port,
             "registry": registry, "source": source, "deleted": False,
             "classify": expected_classify, "generate": expected_generate}
    try:
        clients["proxy"].wait_until_serving(timeout_s=180)
        clients["replica"].wait_until_serving(timeout_s=60)
        yield state
    finally:
        for client in clients.values():
            client.close()
        if not state["deleted"]:
            delete_app(APP, server)


def test_no_model_deployments(colocated):
    from ray import serve

    deployments = set(serve.status().applications[APP].deployments)
    assert deployments == {"ingress", "status-board"}, deployments


VIA = ["proxy", "replica"]


@pytest.mark.parametrize("via", VIA)
def test_answers_equal_the_default_layout(colocated, via):
    client = colocated["clients"][via]
    got = client.classify("toy", TEXTS)
    want = colocated["classify"]
    assert (got.model, got.version) == ("toy", "v1")
    assert [r.label for r in got.results] == [r.label for r in want.results]
    for g, w in zip(got.results, want.results):
        assert [s.label for s in g.scores] == [s.label for s in w.scores]
        assert [s.score for s in g.scores] == pytest.approx([s.score for s in w.scores],
                                                            abs=1e-5)
    for (prompt, kw), want in zip(PROMPTS, colocated["generate"]):
        got = client.generate(GEN_MODEL, prompt, **kw)
        assert (got.text, got.finish_reason, got.completion_tokens, got.version) == \
            (want.text, want.finish_reason, want.completion_tokens, "v1")
        chunks = list(client.generate_stream(GEN_MODEL, prompt, **kw))
        assert "".join(c.text for c in chunks) == want.text
        assert chunks[-1].finish_reason == want.finish_reason


def test_list_models_names_the_ingress_replica(colocated):
    models = {m.name: m for m in colocated["client"].list_models().models}
    assert set(models) == {"toy", GEN_MODEL}
    tags = set()
    for info in models.values():
        (replica,) = info.replicas
        assert replica.version == "v1" and replica.state == "ready"
        tags.add(replica.replica)
    # both models live in the one ingress replica
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"][APP]
    assert tags == {r["replica_id"] for r in details["deployments"]["ingress"]["replicas"]}
    assert colocated["client"].health() == "SERVING"


@pytest.mark.parametrize("call, code", [
    (lambda c: c.classify("nope", ["x"]), grpc.StatusCode.NOT_FOUND),
    (lambda c: c.classify(GEN_MODEL, ["x"]), grpc.StatusCode.FAILED_PRECONDITION),
    (lambda c: c.generate("toy", "x"), grpc.StatusCode.FAILED_PRECONDITION),
    (lambda c: c.classify("toy", ["x"], version="v9"), grpc.StatusCode.NOT_FOUND),
    (lambda c: c.classify("toy", []), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda c: c.generate(GEN_MODEL, "x", temperature=-1), grpc.StatusCode.INVALID_ARGUMENT),
])
@pytest.mark.parametrize("via", VIA)
def test_errors_keep_their_codes(colocated, call, code, via):
    with pytest.raises(grpc.RpcError) as err:
        call(colocated["clients"][via])
    assert err.value.code() == code, err.value.details()
    assert "Traceback" not in (err.value.details() or "")


@pytest.mark.parametrize("via", VIA)
def test_cancelled_stream_stops_generating(colocated, via):
    """The client cancels after the first chunk; the generation in the ingress process
    stops early. Ray Serve 2.60's gRPC proxy drops about 1 cancellation in 30
    (tests/integration/test_generation.py), so up to 3 attempts."""
    from ray import serve

    from services.serving.app import INGRESS_DEPLOYMENT

    client = colocated["clients"][via]
    ingress = serve.get_deployment_handle(INGRESS_DEPLOYMENT, APP)

    def status() -> dict:
        # the (one) ingress replica's own count, not the status board's copy, which
        # is refreshed once a poll interval and can be older than the last request
        return ingress.model_status.remote(GEN_MODEL).result(timeout_s=30)

    seen = []
    for _ in range(3):
        before = status()["requests"]
        stream = client.generate_stream(GEN_MODEL, "red cat", max_new_tokens=1000,
                                        ignore_eos=True)
        assert next(stream).text
        stream.cancel()
        done = poll_until(lambda: (s := status())["generating"] == 0 and
                          s["requests"] > before and s,
                          timeout_s=60, poll_s=0.2)
        assert done, "the generation never ended"
        job = done["recent"][-1]
        seen.append(job)
        if job["finish_reason"] == "cancelled":
            assert job["completion_tokens"] < 500, job
            return
    raise AssertionError(f"generation never stopped early: {seen}")


def test_model_status_through_the_ingress_handle(colocated):
    """What bench/generate.py reads for its requests-per-batch column."""
    from ray import serve

    from services.core.errors import ModelNotFound
    from services.serving.app import INGRESS_DEPLOYMENT

    handle = serve.get_deployment_handle(INGRESS_DEPLOYMENT, APP)
    before = handle.model_status.remote(GEN_MODEL).result(timeout_s=30)
    colocated["clients"]["replica"].generate(GEN_MODEL, "red cat", max_new_tokens=2)
    after = handle.model_status.remote(GEN_MODEL).result(timeout_s=30)
    assert after["task"] == "generation" and after["version"] == "v1"
    assert after["requests"] == before["requests"] + 1
    assert after["batches"] == before["batches"] + 1
    with pytest.raises(ModelNotFound, match="not served here"):
        handle.model_status.remote("no-such-model").result(timeout_s=30)


def test_promoted_version_is_hot_loaded(colocated):
    client, registry = colocated["client"], colocated["registry"]
    v2 = copy_version(colocated["source"], "toy", "v1", registry, "toy")
    assert v2 == "v2"
    client.promote("toy", v2)
    assert poll_until(lambda: client.classify("toy", TEXTS[:1]).version == v2,
                      timeout_s=60, poll_s=0.2), "v2 never served"
    (info,) = client.list_models("toy").models
    assert list(info.serving_versions) == [v2]


def test_deleting_the_app_closes_the_replica_port(colocated, server):
    """Serve stops the ingress replica: its own gRPC server stops with it (and the
    session app still answers through the proxy: delete_app checks)."""
    client = colocated["clients"]["replica"]
    assert client.health() == "SERVING"
    delete_app(APP, server)
    colocated["deleted"] = True

    def closed() -> bool:
        try:
            client.classify("toy", TEXTS[:1])
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE
        return False

    assert poll_until(closed, timeout_s=60, poll_s=0.2), "the replica port still answers"
