"""Bearer-token authentication through Serve's real gRPC proxy (docs/reliability.md,
"Authentication").

The session's app runs without tokens, so this module deploys a second Serve
application with an API token and an admin token, read from files as a mounted
Kubernetes Secret would give them (with a trailing newline), over its own copy of the
toy classifier. Serve's gRPC proxy serves every application on the one port and routes
by the `application` metadata, which every call here sends; its Admin service has a
port of its own (ServeConfig.admin_port) and answers nowhere else. The app is deleted when
the module ends, and the session's app is reachable without metadata again.
`test_token_rotation_without_a_restart` rewrites the API token file while the app
serves (and puts it back).

The second app also serves in bfloat16 (ServeConfig.dtype), the session's in float32
(the default on a CPU): the last test checks that the setting reaches the replicas.
"""

from __future__ import annotations

import os
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import Client
from services.core.config import ServeConfig
from services.protocol import admin_pb, pb
from services.core.registry import Registry
from tests.helpers import delete_app, server_port

pytestmark = pytest.mark.timeout(600)

APP = "auth-test"
API_TOKEN = "api-0123456789abcdef"
ADMIN_TOKEN = "admin-fedcba9876543210"
CODES = grpc.StatusCode


@pytest.fixture(scope="module")
def secured(server, trained, tmp_path_factory):
    from ray import serve

    from services.serving.app import build_app

    cfg, _ = trained
    folder = tmp_path_factory.mktemp("auth")
    source, registry = Registry(cfg.registry), Registry(folder / "registry")
    manifest = {k: v for k, v in source.manifest("toy", "v1").items()
                if k not in ("files", "version", "name", "created_at")}
    registry.publish("toy", source.local_copy("toy", "v1"), manifest)
    (folder / "api-token").write_text(API_TOKEN + "\n")
    (folder / "admin-token").write_text(ADMIN_TOKEN + "\n")
    admin_address = f"127.0.0.1:{server_port()}"
    serve_cfg = ServeConfig(registry=registry.uri, replica_cpus=0.1, poll_interval_s=0.5,
                            dtype="bfloat16", api_token_file=str(folder / "api-token"),
                            admin_token_file=str(folder / "admin-token"),
                            admin_port=int(admin_address.rsplit(":", 1)[1]))
    serve.run(build_app(serve_cfg), name=APP, route_prefix=f"/{APP}", blocking=False)
    probe = Client(server.address, token="", admin_token="", application=APP,
                   admin_address=admin_address)

    try:
        probe.wait_until_serving(timeout_s=180)
        yield {"address": server.address, "channel": probe.channel, "registry": registry,
               "api_token_file": folder / "api-token", "admin_address": admin_address,
               "admin_channel": probe.admin_channel}
    finally:
        probe.close()
        delete_app(APP, server)


def metadata(token=None, raw=None):
    entries = [("application", APP)]
    if raw is not None:
        entries.append(("authorization", raw))
    elif token is not None:
        entries.append(("authorization", f"Bearer {token}"))
    return entries


INFERENCE_CALLS = {
    "Classify": pb.ClassifyRequest(model="toy", texts=["a good film"]),
    "Generate": pb.GenerateRequest(model="toy", prompt="hello"),
    "GenerateStream": pb.GenerateRequest(model="toy", prompt="hello"),
    "ListModels": pb.ListModelsRequest(),
}
ADMIN_CALLS = {
    "Promote": admin_pb.PromoteRequest(model="toy", version="v1"),
    "Rollback": admin_pb.RollbackRequest(model="toy"),
    "Pin": admin_pb.PinRequest(model="toy", version="v1"),
    "Unpin": admin_pb.UnpinRequest(model="toy"),
}
# What each method answers once the token is accepted: the classifier cannot
# generate, and this registry has no earlier production version to roll back to.
AUTHORIZED = {"Generate": CODES.FAILED_PRECONDITION,
              "GenerateStream": CODES.FAILED_PRECONDITION,
              "Rollback": CODES.FAILED_PRECONDITION}


def invoke(secured, method: str, md, port: str = ""):
    """(code, details) of one call, on its own service's port (Admin: the admin port)
    unless `port` ("inference" or "admin") says which."""
    from services.protocol import admin_pb_grpc, pb_grpc

    service = "Admin" if method in ADMIN_CALLS else "Inference"
    port = port or ("admin" if service == "Admin" else "inference")
    channel = secured["admin_channel" if port == "admin" else "channel"]
    stub = (admin_pb_grpc.AdminStub if service == "Admin" else pb_grpc.InferenceStub)(
        channel)
    request = {**INFERENCE_CALLS, **ADMIN_CALLS}[method]
    try:
        response = getattr(stub, method)(request, timeout=30, metadata=md)
        if method == "GenerateStream":
            list(response)
        return CODES.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details()


ALL_METHODS = [*INFERENCE_CALLS, *ADMIN_CALLS]


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("md,needle", [
    (metadata(), "missing credentials"),
    (metadata("not-the-token"), "invalid token"),
    (metadata(API_TOKEN + "x"), "invalid token"),
    (metadata(raw=f"Basic {API_TOKEN}"), "malformed"),
    (metadata(raw="Bearer"), "malformed"),
    (metadata(raw=API_TOKEN), "malformed"),
], ids=["none", "wrong", "prefix-of-longer", "basic", "empty-bearer", "no-scheme"])
def test_missing_or_wrong_token_is_unauthenticated(secured, method, md, needle):
    code, details = invoke(secured, method, md)
    assert code == CODES.UNAUTHENTICATED, f"{code.name}: {details}"
    assert needle in details
    assert API_TOKEN not in details and ADMIN_TOKEN not in details


@pytest.mark.parametrize("method", [*INFERENCE_CALLS])
def test_api_token_calls_inference(secured, method):
    code, details = invoke(secured, method, metadata(API_TOKEN))
    assert code == AUTHORIZED.get(method, CODES.OK), f"{code.name}: {details}"


def test_bearer_scheme_is_case_insensitive(secured):
    code, details = invoke(secured, "Classify", metadata(raw=f"bearer {API_TOKEN}"))
    assert code == CODES.OK, details


@pytest.mark.parametrize("method", [*ADMIN_CALLS])
def test_api_token_on_admin_is_permission_denied(secured, method):
    code, details = invoke(secured, method, metadata(API_TOKEN))
    assert code == CODES.PERMISSION_DENIED, f"{code.name}: {details}"
    assert "admin token" in details


@pytest.mark.parametrize("method", ALL_METHODS)
def test_admin_token_calls_everything(secured, method):
    code, details = invoke(secured, method, metadata(ADMIN_TOKEN))
    assert code == AUTHORIZED.get(method, CODES.OK), f"{code.name}: {details}"


@pytest.mark.parametrize("method", [*ADMIN_CALLS])
def test_admin_is_unreachable_on_the_inference_port(secured, method):
    code, details = invoke(secured, method, metadata(ADMIN_TOKEN), port="inference")
    assert code == CODES.UNIMPLEMENTED, f"{code.name}: {details}"


@pytest.mark.parametrize("token", [API_TOKEN, ADMIN_TOKEN])
def test_the_admin_port_serves_admin_alone(secured, token):
    code, details = invoke(secured, "Classify", metadata(token), port="admin")
    assert code == CODES.UNIMPLEMENTED, f"{code.name}: {details}"


def test_health_and_reflection_stay_open(secured):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = health_pb2_grpc.HealthStub(secured["channel"])
    response = stub.Check(health_pb2.HealthCheckRequest(service="tuneserve.v1.Inference"),
                          timeout=10, metadata=metadata())
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(secured["channel"])
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in answer.list_services_response.service}
    assert "tuneserve.v1.Inference" in names and "tuneserve.v1.Admin" not in names
    reflection = reflection_pb2_grpc.ServerReflectionStub(secured["admin_channel"])
    (answer,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in answer.list_services_response.service}
    assert "tuneserve.v1.Admin" in names and "tuneserve.v1.Inference" not in names


def test_client_sends_tokens_from_the_environment(secured, monkeypatch):
    monkeypatch.setenv("TUNESERVE_API_TOKEN", API_TOKEN)
    monkeypatch.setenv("TUNESERVE_ADMIN_TOKEN", ADMIN_TOKEN)
    with Client(secured["address"], application=APP,
                admin_address=secured["admin_address"]) as client:
        assert client.classify("toy", ["a good film"]).version == "v1"
        assert client.pin("toy", "v1").version == "v1"
        assert client.unpin("toy").previous_version == "v1"
    monkeypatch.delenv("TUNESERVE_ADMIN_TOKEN")
    with Client(secured["address"], application=APP,
                admin_address=secured["admin_address"]) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.unpin("toy")  # falls back to the API token
        assert err.value.code() == CODES.PERMISSION_DENIED


def test_client_token_from_a_file(secured, tmp_path):
    from services.client import token_from

    path = tmp_path / "token"
    path.write_text(ADMIN_TOKEN + "\r\n")
    token = token_from(str(path), "TUNESERVE_ADMIN_TOKEN")
    with Client(secured["address"], token="", admin_token=token, application=APP,
                admin_address=secured["admin_address"]) as client:
        assert client.unpin("toy").model == "toy"
        with pytest.raises(grpc.RpcError) as err:
            client.classify("toy", ["x"])  # no API token given: none is sent
        assert err.value.code() == CODES.UNAUTHENTICATED


def rewrite(path, text: str) -> None:
    """Replace a token file atomically, as a Secret volume update does."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)


def wait_for(secured, token: str, code, timeout_s: float = 15.0):
    """Classify with `token` until it answers `code` (the ingress re-reads the file at
    most every second); the last (code, details)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = invoke(secured, "Classify", metadata(token))
        if answer[0] == code or time.monotonic() > deadline:
            return answer
        time.sleep(0.2)


def test_token_rotation_without_a_restart(secured):
    """Old and new both valid while the file holds both; the old one UNAUTHENTICATED
    once removed from it; the same replica all along (no restart)."""
    path, new = secured["api_token_file"], "api-rotated-0123456789"
    assert invoke(secured, "Classify", metadata(new))[0] == CODES.UNAUTHENTICATED
    try:
        rewrite(path, f"# rotation: old, then new\n{API_TOKEN}\n{new}\n")
        assert wait_for(secured, new, CODES.OK)[0] == CODES.OK
        assert invoke(secured, "Classify", metadata(API_TOKEN))[0] == CODES.OK
        rewrite(path, new + "\n")
        code, details = wait_for(secured, API_TOKEN, CODES.UNAUTHENTICATED)
        assert code == CODES.UNAUTHENTICATED and "invalid token" in details
        assert invoke(secured, "Classify", metadata(new))[0] == CODES.OK
        rewrite(path, "")  # emptied mid-rotation: the last good token stays valid
        time.sleep(1.5)
        assert invoke(secured, "Classify", metadata(new))[0] == CODES.OK
        assert invoke(secured, "Classify", metadata())[0] == CODES.UNAUTHENTICATED
    finally:
        rewrite(path, API_TOKEN + "\n")
    assert wait_for(secured, API_TOKEN, CODES.OK)[0] == CODES.OK
    assert invoke(secured, "Classify", metadata(new))[0] == CODES.UNAUTHENTICATED


def test_the_dtype_setting_reaches_the_replicas(secured, server):
    texts = ["a lovely film with superb acting", "dull, tedious and far too long",
             "the plot was fine", "😀 ✓ 日本語", "x"]
    from services.serving.app import APP_NAME

    with Client(server.address, token="", application=APP_NAME) as session_app:
        full = session_app.classify("toy", texts)  # float32, the default on a CPU
        (info,) = session_app.list_models("toy").models
    assert {r.dtype for r in info.replicas} == {"float32"}
    with Client(secured["address"], token=API_TOKEN, application=APP) as client:
        (info,) = client.list_models("toy").models
        assert {r.dtype for r in info.replicas} == {"bfloat16"}, info.replicas
        half = client.classify("toy", texts)
    for h, f in zip(half.results, full.results):
        h_scores = {s.label: s.score for s in h.scores}
        f_scores = {s.label: s.score for s in f.scores}
        assert h_scores.keys() == f_scores.keys()
        assert all(abs(h_scores[k] - f_scores[k]) < 0.02 for k in f_scores), (h, f)
