"""The front door without Ray (issue 29): the Admin service on a port of its own, and
the bounds every gRPC server of tuneserve keeps. A real InferenceIngress over the
in-process fakes of test_replica_grpc.py, served by its real gRPC servers on loopback
ports, called by the real client or raw sockets."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.client import Client
from services.core.auth import Tokens
from services.core.config import ServeConfig
from services.core.errors import ConfigError
from services.core.net import free_port
from services.protocol import admin_pb
from services.serving.colocated import LocalModel
from tests.unit.test_replica_grpc import Board, LoopThread, Model

API, ADMIN = "api-token-0123456789abcdef", "admin-token-fedcba9876543210"
CODES = grpc.StatusCode


@pytest.fixture
def front(tmp_path):
    """make(**ingress kwargs) -> the ingress, serving inference on `port` and the Admin
    service on `admin_port`, with an API and an admin token."""
    from services.serving.ingress import InferenceIngress

    (tmp_path / "registry").mkdir()
    loop, model = LoopThread(), Model()
    ports = {"port": free_port(), "admin_port": free_port()}
    made = []

    def make(tokens: Tokens = Tokens.from_values(API, ADMIN), **server_options):
        async def build():
            ingress = InferenceIngress(
                str(tmp_path / "registry"), {"m": LocalModel(model)},
                {"m": "classification"}, {"max_request_bytes": 4096},
                board=Board(), auth=tokens.as_dict(),
                grpc_server={"host": "127.0.0.1", "port": ports["port"],
                             "max_receive_bytes": 8192, **server_options},
                admin_server={"host": "127.0.0.1", "port": ports["admin_port"],
                              "max_receive_bytes": 8192})
            made.append(ingress)
            return ingress
        return loop.call(build)

    yield {"make": make, "loop": loop, "model": model, **ports}
    for ingress in made:
        loop.call(lambda: ingress.__del__() or asyncio.sleep(0))
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
