"""bench/abuse.py's load and flood, against a fake server on a real port (no Ray): the
load counts what it measures, the flood holds its streams and connections open and
counts what its calls got."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.core.net import free_port
from services.protocol import INFERENCE_SERVICE, pb

TOKEN = "bench-token-0123456789"


@pytest.fixture
def fake():
    def classify(request, context):
        if ("authorization", f"Bearer {TOKEN}") not in context.invocation_metadata():
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token")
        time.sleep(0.01)
        return pb.ClassifyResponse(model=request.model, version="v1")

    def watch(request, context):
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
        while context.is_active():
            time.sleep(0.02)

    server = grpc.server(futures.ThreadPoolExecutor(48))
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler(INFERENCE_SERVICE, {
            "Classify": grpc.unary_unary_rpc_method_handler(
                classify, request_deserializer=pb.ClassifyRequest.FromString,
                response_serializer=pb.ClassifyResponse.SerializeToString)}),
        grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Watch": grpc.unary_stream_rpc_method_handler(
                watch, request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString)}),
    ])
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_the_load_counts_its_window(fake):
    from bench.abuse import _load

    result = asyncio.run(_load(fake, TOKEN, 2, 0.2, 0.6, ["a", "b"]))
    assert result["codes"].keys() == {"OK"} and result["answered"] > 2
    assert len(result["latencies"]) >= result["answered"]
    assert all(lat >= 0.01 for lat in result["latencies"])
    refused = asyncio.run(_load(fake, "wrong", 1, 0.0, 0.3, ["a"]))
    assert refused["answered"] == 0 and set(refused["codes"]) == {"UNAUTHENTICATED"}


def test_the_flood_holds_its_streams_and_connections(fake):
    from bench import abuse

    ready, finish = threading.Event(), threading.Event()
    out = {}
    thread = threading.Thread(target=lambda: out.update(asyncio.run(abuse._flood(
        fake, 30, 5, 2, ready, finish))))
    thread.start()
    assert ready.wait(30)
    time.sleep(0.5)
    finish.set()
    thread.join(60)
    counts = out["counts"]
    assert counts["watch answered"] == 30 and counts["watch open at the end"] == 30
    assert counts["idle connections"] == 5
    assert counts["classify UNAUTHENTICATED"] > 0 and "classify OK" not in counts
