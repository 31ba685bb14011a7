"""Calls before a model's first load answer UNAVAILABLE 'loading' at once (docs/api.md),
instead of waiting in Serve's queue for replicas that are still starting."""

from __future__ import annotations

import asyncio

import grpc

from services.protocol import pb
from services.serving import ingress as ingress_module
from services.core.auth import Tokens
from tests.unit.test_auth_tokens import FakeClassifier, FakeContext, Remote


class Board:
    def __init__(self):
        self.content, self.reads, self.broken = {"m": []}, 0, False

        async def get():
            self.reads += 1
            if self.broken:
                raise RuntimeError("board gone")
            return self.content

        self.get = Remote(get)


def classify(server):
    context = FakeContext()
    response = asyncio.run(server.Classify(pb.ClassifyRequest(model="m", texts=["hi"]),
                                           context))
    return context.code() or grpc.StatusCode.OK, context.details(), response


def test_unavailable_until_first_loaded_then_never_asked_again(tmp_path, monkeypatch):
    monkeypatch.setattr(ingress_module, "HEALTH_CACHE_S", 0.0)  # read the board every call
    board = Board()
    (tmp_path / "registry").mkdir()
    server = ingress_module.InferenceIngress(
        str(tmp_path / "registry"), {"m": FakeClassifier()}, {"m": "classification"},
        board=board, auth=Tokens.from_values(None, None).as_dict())
    code, details, _ = classify(server)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details.startswith("model 'm' is loading: no version is loaded yet")
    board.content = {"m": [{"replica": "r1", "version": None}]}  # up, nothing loaded
    assert classify(server)[0] == grpc.StatusCode.UNAVAILABLE
    board.content = {"m": [{"replica": "r1", "version": "v1"}]}
    code, _, response = classify(server)
    assert code == grpc.StatusCode.OK and response.version == "v1"
    reads = board.reads
    board.content = {"m": []}  # a replica lost later: the model's own answers count now
    assert classify(server)[0] == grpc.StatusCode.OK
    assert board.reads == reads  # not asked again


def test_an_unreadable_board_lets_calls_through(tmp_path):
    board = Board()
    board.broken = True
    (tmp_path / "registry").mkdir()
    server = ingress_module.InferenceIngress(
        str(tmp_path / "registry"), {"m": FakeClassifier()}, {"m": "classification"},
        board=board, auth=Tokens.from_values(None, None).as_dict())
    assert classify(server)[0] == grpc.StatusCode.OK


def test_health_watch_streams_the_status_and_keeps_unknown_services_open(tmp_path,
                                                                        monkeypatch):
    """grpc.health.v1 Watch: the status, then each change; an unknown service gets
    SERVICE_UNKNOWN and the stream stays open (the health protocol's rule)."""
    from grpc_health.v1 import health_pb2

    monkeypatch.setattr(ingress_module, "HEALTH_CACHE_S", 0.01)
    board = Board()
    (tmp_path / "registry").mkdir()
    server = ingress_module.InferenceIngress(
        str(tmp_path / "registry"), {"m": FakeClassifier()}, {"m": "classification"},
        board=board, auth=Tokens.from_values(None, None).as_dict())
    status = health_pb2.HealthCheckResponse

    async def watch(service: str, wanted: int) -> tuple[list[int], bool]:
        context = FakeContext()
        stream = server.Watch(health_pb2.HealthCheckRequest(service=service), context)
        seen = []
        for _ in range(wanted):
            seen.append((await asyncio.wait_for(stream.__anext__(), 5)).status)
            board.content = {"m": [{"replica": "r1", "version": "v1"}]}
        try:
            await asyncio.wait_for(stream.__anext__(), 0.3)
            still_open = False
        except asyncio.TimeoutError:
            still_open = True
        await stream.aclose()
        assert context.code() is None
        return seen, still_open

    async def both():  # one event loop, as in a replica (the ingress's events bind to it)
        return await watch("", 2), await watch("no.such.Service", 1)

    whole, unknown = asyncio.run(both())
    assert whole == ([status.NOT_SERVING, status.SERVING], True)
    assert unknown == ([status.SERVICE_UNKNOWN], True)
