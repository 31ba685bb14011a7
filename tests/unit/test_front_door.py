"""The front door without Ray (issue 29): the Admin service on a port of its own, and
the bounds every gRPC server of tuneserve keeps. A real InferenceIngress over the
in-process fakes of test_replica_grpc.py, served by its real gRPC servers on loopback
ports, called by the real client or raw sockets."""

from __future__ import annotations

import asyncio
import time

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import CallError, Client
from services.core.auth import Tokens
from services.core.config import ServeConfig, ServeLimits
from services.core.errors import ConfigError
from services.core.net import free_port
from services.protocol import admin_pb, pb
from services.serving.colocated import LocalModel
from services.serving.replica_grpc import STOP_GRACE_S
from tests.helpers import (
    closed_by_server,
    grpc_length_prefix_probe,
    idle_h2_connections,
    poll_until,
)
from tests.unit.test_replica_grpc import Board, LoopThread, Model

API, ADMIN = "api-token-0123456789abcdef", "admin-token-fedcba9876543210"
CODES = grpc.StatusCode
CLASSIFY = "/tuneserve.v1.Inference/Classify"


@pytest.fixture
def front(tmp_path):
    """make(**ingress kwargs) -> the ingress, serving inference on `port` and the Admin
    service on `admin_port`, with an API and an admin token."""
    from services.serving.ingress import InferenceIngress

    (tmp_path / "registry").mkdir()
    loop, model = LoopThread(), Model()
    ports = {"port": free_port(), "admin_port": free_port()}
    made = []

    def make(tokens: Tokens = Tokens.from_values(API, ADMIN), limits=None, bounds=None):
        async def build():
            ingress = InferenceIngress(
                str(tmp_path / "registry"), {"m": LocalModel(model)},
                {"m": "classification"}, {"max_request_bytes": 4096, **(limits or {})},
                board=Board(), auth=tokens.as_dict(),
                grpc_server={"host": "127.0.0.1", "port": ports["port"],
                             "max_receive_bytes": 8192, "bounds": bounds},
                admin_server={"host": "127.0.0.1", "port": ports["admin_port"],
                              "max_receive_bytes": 8192, "bounds": bounds})
            made.append(ingress)
            return ingress
        return loop.call(build)

    yield {"make": make, "loop": loop, "model": model, **ports}
    for ingress in made:
        loop.call(lambda: ingress.__del__() or asyncio.sleep(0), timeout=60)
    loop.close()


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details() or ""


def _client(front, token: str = API, admin_token: str = ADMIN) -> Client:
    return Client(f"127.0.0.1:{front['port']}", token=token, admin_token=admin_token,
                  admin_address=f"127.0.0.1:{front['admin_port']}", timeout_s=10)


# ---- the Admin service apart ---------------------------------------------------------
def test_admin_answers_on_the_admin_port_with_the_admin_token(front):
    front["make"]()
    with _client(front) as client:
        # reached the method: the (empty) registry has no model 'm'
        code, details = _code(lambda: client.promote("m", "v1"))
        assert code == CODES.NOT_FOUND and "'m' not found" in details, details
        assert client.classify("m", ["x"]).version == "v1"
        raw = client.admin_channel.unary_unary("/tuneserve.v1.Admin/Promote",
                                               request_serializer=lambda b: b,
                                               response_deserializer=lambda b: b)
        code, details = _code(lambda: raw(b"\x0a\x01m\x1a\x01\xfe", timeout=10,
                                          metadata=[("authorization", f"Bearer {ADMIN}")]))
        assert code == CODES.INVALID_ARGUMENT and "not a valid" in details, details


def test_the_inference_token_on_the_admin_port_is_permission_denied(front):
    front["make"]()
    with _client(front, admin_token=API) as client:
        code, details = _code(lambda: client.unpin("m"))
        assert code == CODES.PERMISSION_DENIED and "admin token" in details
    with _client(front, admin_token="") as client:
        assert _code(lambda: client.unpin("m"))[0] == CODES.UNAUTHENTICATED


def test_admin_is_unimplemented_on_the_inference_port(front):
    front["make"]()
    inference = f"127.0.0.1:{front['port']}"
    with Client(inference, admin_token=ADMIN, timeout_s=10) as client:
        for call in (lambda: client.promote("m", "v1"), lambda: client.unpin("m")):
            assert _code(call)[0] == CODES.UNIMPLEMENTED
    with _client(front) as client:  # and the admin port serves nothing else
        raw = client.admin_channel.unary_unary("/tuneserve.v1.Inference/Classify",
                                               request_serializer=lambda b: b,
                                               response_deserializer=lambda b: b)
        assert _code(lambda: raw(b"", timeout=10))[0] == CODES.UNIMPLEMENTED


def test_an_admin_method_called_another_way_is_unimplemented(front):
    """Serve's proxy routes a service only when grpc_servicer_functions registers it;
    a Serve config that still names add_admin_servicer reaches the ingress's Admin
    methods with the proxy's context, and they refuse it."""
    ingress = front["make"]()

    class ProxyContext:
        code = details = None

        def invocation_metadata(self):
            return [("authorization", f"Bearer {ADMIN}")]

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

        def set_trailing_metadata(self, metadata):
            self.trailers = metadata

    context = ProxyContext()
    front["loop"].call(lambda: ingress.Promote(admin_pb.PromoteRequest(model="m",
                                                                       version="v1"), context))
    assert context.code == CODES.UNIMPLEMENTED and "--admin-port" in context.details


def test_admin_port_settings():
    cfg = ServeConfig(admin_port=9100, grpc_port=9000)
    assert cfg.validate().admin_grpc_server()["port"] == 9100
    assert ServeConfig().admin_grpc_server() is None  # off unless given
    with pytest.raises(ConfigError, match="'admin_port'.*grpc port"):
        ServeConfig(admin_port=9000, grpc_port=9000).validate()
    with pytest.raises(ConfigError, match="'admin_port'.*not a port"):
        ServeConfig(admin_port=70000).validate()


def test_serve_flag_admin_port():
    import argparse

    from services.cli import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--admin-port", "9100"])
    assert serve.serve_config(args).admin_port == 9100
    args = parser.parse_args(["serve", "--admin-port", "9000"])
    with pytest.raises(ConfigError, match="'admin_port'"):
        serve.serve_config(args)


# ---- bounds ----------------------------------------------------------------------------
def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.parametrize("declared", [64 * 2**20, 2**30], ids=["64MiB", "1GiB"])
def test_a_huge_message_is_refused_from_its_length_prefix(front, declared):
    """Unauthenticated, the length prefix of a huge message and 1 KiB of it: refused
    at once, before the rest arrives (the server, in this process, grows not at all),
    while an authenticated client's calls go on."""
    front["make"]()
    with _client(front) as client:
        assert client.classify("m", ["x"]).version == "v1"
        before = _rss_mib()
        for _ in range(5):
            answer = grpc_length_prefix_probe(front["port"], CLASSIFY, declared)
            assert answer["status"] == CODES.RESOURCE_EXHAUSTED.value[0], answer
            assert "larger than max" in answer["message"]
            assert answer["seconds"] < 10
            assert client.classify("m", ["x"]).version == "v1"
        assert _rss_mib() - before < 32


def test_watch_streams_are_bounded_in_all_and_per_connection(front):
    front["make"](limits={"max_watch_streams": 12, "max_watch_streams_per_connection": 2})
    request = health_pb2.HealthCheckRequest(service="")
    channels = [grpc.insecure_channel(f"127.0.0.1:{front['port']}",
                                      options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(10)]
    streams, refused = [], []
    try:
        for channel in channels:  # 3 per connection, 30 in all, no token
            for _ in range(3):
                stream = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=30)
                try:
                    assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
                    streams.append(stream)
                except grpc.RpcError as exc:
                    refused.append((exc.code(), exc.details()))
        assert len(streams) == 12 and len(refused) == 18
        assert {code for code, _ in refused} == {CODES.RESOURCE_EXHAUSTED}
        # the first 5 connections hit their own bound (2 of 3); from the 6th's third
        # stream on, the total
        assert sum("on this connection" in d for _, d in refused) == 5
        with _client(front) as client:  # authenticated calls and Check go on
            assert client.classify("m", ["x"]).version == "v1"
            assert client.health() == "SERVING"
        for stream in streams[:4]:
            stream.cancel()
        with _client(front) as client:  # cancelled streams free their places
            assert poll_until(lambda: _watch_opens(client), timeout_s=10)
    finally:
        for stream in streams:
            stream.cancel()
        for channel in channels:
            channel.close()


def _watch_opens(client: Client) -> bool:
    stream = health_pb2_grpc.HealthStub(client.channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=10)
    try:
        next(stream)
        return True
    except grpc.RpcError:
        return False
    finally:
        stream.cancel()


def test_watch_streams_end_when_the_replica_stops(front):
    ingress = front["make"]()
    channel = grpc.insecure_channel(f"127.0.0.1:{front['port']}")
    try:
        streams = [health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=60)
            for service in ("", "unknown.Service")]
        for stream in streams:
            next(stream)
        started = time.monotonic()
        front["loop"].call(lambda: ingress.__del__())
        for stream in streams:
            assert list(stream) == []  # ended cleanly, not cut at the grace period
        assert time.monotonic() - started < STOP_GRACE_S / 2
    finally:
        channel.close()


def test_connections_past_the_bound_are_closed(front):
    front["make"](bounds={"max_connections": 20})
    with _client(front) as client:
        assert client.classify("m", ["x"]).version == "v1"  # connected first
        flood = idle_h2_connections(front["port"], 100)
        try:
            assert poll_until(lambda: sum(closed_by_server(s) for s in flood) >= 80,
                              timeout_s=10), "connections past the bound stay open"
            assert not any(closed_by_server(s) for s in flood[:5])  # within it: open
            # the established client goes on, and health answers
            assert client.classify("m", ["x"]).version == "v1"
            assert client.health() == "SERVING"
        finally:
            for sock in flood:
                sock.close()
        # their places are free again once the server has seen them go (until then a
        # new connection is still one past the bound, and closed)
        with _client(front) as late:
            assert poll_until(lambda: _version_or_none(late), timeout_s=20)


OPEN_FILES_PROBE = """
import logging, resource, sys
from services.serving.replica_grpc import allow_open_files
logging.basicConfig(level=logging.WARNING)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
allow_open_files(int(sys.argv[3]))
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _open_files_after(soft: int, hard: int, max_connections: int):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", OPEN_FILES_PROBE, str(soft), str(hard),
                           str(max_connections)], capture_output=True, text=True,
                          timeout=60, check=True)
    return int(proc.stdout.split()[-1]), proc.stderr


def test_the_open_files_limit_is_raised_to_fit_the_connection_bound():
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 3000:
        pytest.skip(f"the hard open-files limit here is {hard}")
    soft, err = _open_files_after(1024, 3000, 1500)
    assert soft == 1500 + 1024 and "lower max_connections" not in err
    # only up to the hard limit, and then the warning names the setting
    soft, err = _open_files_after(1024, 2000, 5000)
    assert soft == 2000 and "max_connections=5000" in err
    # a limit already high enough is left alone
    soft, _ = _open_files_after(2900, 3000, 100)
    assert soft == 2900


def _version_or_none(client):
    try:
        return client.classify("m", ["x"]).version
    except CallError:
        return None


def test_idle_connections_are_closed(front):
    front["make"](bounds={"connection_idle_s": 1.0})
    flood = idle_h2_connections(front["port"], 30)
    try:
        assert poll_until(lambda: all(closed_by_server(s) for s in flood), timeout_s=20)
    finally:
        for sock in flood:
            sock.close()


def test_concurrent_calls_past_the_bound_are_resource_exhausted(front):
    front["make"](bounds={"max_concurrent_rpcs": 2})
    model = front["model"]
    with _client(front) as client:
        slow = [client.inference.Classify.future(
            pb.ClassifyRequest(model="m", texts=["slow"]), timeout=30,
            metadata=[("authorization", f"Bearer {API}")]) for _ in range(2)]
        assert model.started.wait(10)
        code, _ = _code(lambda: client.classify("m", ["x"]))
        assert code == CODES.RESOURCE_EXHAUSTED
        front["loop"].loop.call_soon_threadsafe(model.release.set)
        assert [f.result().version for f in slow] == ["v1", "v1"]
        assert client.classify("m", ["x"]).version == "v1"


def test_a_call_without_a_deadline_gets_the_servers(front):
    front["make"](limits={"request_timeout_s": 1})
    with Client(f"127.0.0.1:{front['port']}", token=API, timeout_s=float("inf")) as client:
        code, details = _code(lambda: client.classify("m", ["slow"]))
        assert code == CODES.DEADLINE_EXCEEDED and "deadline" in details, details
        assert client.classify("m", ["x"]).version == "v1"  # quick calls are unaffected


def test_bound_settings():
    cfg = ServeConfig(replica_grpc=True, max_connections=7, connection_idle_s=3.0)
    server = cfg.validate().replica_grpc_server()
    assert server["bounds"]["max_connections"] == 7
    assert server["max_receive_bytes"] == 2 * cfg.limits.max_request_bytes
    for field, value in (("max_connections", 0), ("ingress_replicas", 0),
                         ("connection_idle_s", 0.0), ("connection_max_age_s", -1.0)):
        with pytest.raises(ConfigError, match=f"'{field}'"):
            ServeConfig(**{field: value}).validate()
    with pytest.raises(ConfigError, match="'ingress_replicas'"):
        ServeConfig(ingress_replicas=2, colocate=True).validate()
    with pytest.raises(ConfigError, match="'limits.max_watch_streams'"):
        ServeConfig(limits=ServeLimits(max_watch_streams=0)).validate()


def test_manifests_give_the_proxy_tuneserve_s_message_limit_and_two_ingresses():
    """Serve's proxy reads its limit from the pods' environment: the value there must be
    what the app's own servers use (ServeConfig.max_message_bytes of the app's args);
    production runs at least two ingress replicas."""
    import yaml
    from pathlib import Path

    from services.serving.app import PROXY_MESSAGE_ENV

    base = Path(__file__).resolve().parents[2] / "k8s"
    rayservice = yaml.safe_load((base / "base" / "rayservice.yaml").read_text())
    env = {e["name"]: e["value"] for e in
           rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
           ["containers"][0]["env"]}
    for path in (base / "base" / "rayservice.yaml",
                 base / "overlays" / "gpu" / "rayservice-gpu.yaml"):
        text = path.read_text()
        docs = yaml.safe_load(text)
        serve_config = (docs["spec"]["serveConfigV2"] if isinstance(docs, dict) else
                        next(op["value"] for op in docs if op["path"] == "/spec/serveConfigV2"))
        (app,) = yaml.safe_load(serve_config)["applications"]
        args = dict(app["args"])
        cfg = ServeConfig(limits=ServeLimits(**args.pop("limits", {})),
                          **{k: v for k, v in args.items() if k in ServeConfig.__annotations__})
        assert int(env[PROXY_MESSAGE_ENV]) == cfg.max_message_bytes(), path
        assert cfg.ingress_replicas >= 2, path


@pytest.mark.parametrize("queued", [2, 5000, -1])
def test_the_ingress_queue_is_bounded_but_not_below_what_it_holds(monkeypatch, tmp_path, queued):
    """A burst waits in the proxy's router while it picks an ingress replica: the
    ingress's queue never trips before the models' own (max_queued_requests), whose
    rejection carries tuneserve's message and retry hint; -1 leaves both unbounded."""
    from services.serving import app as app_module

    monkeypatch.setattr(app_module, "discover_models", lambda *_: {"c": "classification"})
    app = app_module.build_app(ServeConfig(registry=str(tmp_path), max_queued_requests=queued))
    ingress = app._bound_deployment
    model = ingress.init_args[1]["c"]._bound_deployment
    assert model.max_queued_requests == queued
    expected = -1 if queued == -1 else max(queued, ingress.max_ongoing_requests)
    assert ingress.max_queued_requests == expected
