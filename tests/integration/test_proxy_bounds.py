"""Bounds through Serve's real gRPC proxy, in front of the session's app (issue 29):
a huge message is refused from its length prefix by the proxy itself, and health Watch
streams (which need no token) are bounded, while calls and readiness go on. The same
bounds on tuneserve's own servers, with connections too: tests/unit/test_front_door.py.
"""

from __future__ import annotations

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.config import ServeConfig
from tests.helpers import grpc_length_prefix_probe, poll_until

pytestmark = pytest.mark.timeout(300)

CODES = grpc.StatusCode
TEXT = ["a lovely film with superb acting"]


def _listener(port: int) -> psutil.Process:
    """The process listening on TCP `port` (Serve's proxy actor)."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    pytest.skip(f"cannot see which process listens on {port}")


def _port(server) -> int:
    return int(server.address.rsplit(":", 1)[1])


@pytest.mark.parametrize("declared", [64 * 2**20, 2**30], ids=["64MiB", "1GiB"])
def test_the_proxy_refuses_a_huge_message_from_its_length_prefix(server, declared):
    limit = ServeConfig().max_message_bytes()
    proxy = _listener(_port(server))
    before = proxy.memory_info().rss
    for _ in range(3):
        answer = grpc_length_prefix_probe(_port(server), "/tuneserve.v1.Inference/Classify",
                                          declared)
        assert answer["status"] == CODES.RESOURCE_EXHAUSTED.value[0], answer
        assert f"vs. {limit}" in answer["message"], answer  # tuneserve's limit, not 2 GiB
        assert answer["seconds"] < 10
        assert server.classify("toy", TEXT).version == "v1"
    assert proxy.memory_info().rss - before < 64 * 2**20


def test_watch_streams_through_the_proxy_are_bounded(server):
    limits = ServeConfig().limits
    bound = limits.max_watch_streams
    # Serve's proxy passes each call's peer on: the bound per connection holds there
    # too, so the streams are spread over enough connections to reach the total.
    count = bound // limits.max_watch_streams_per_connection + 5
    channels = [grpc.insecure_channel(server.address,
                                      options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(count)]
    request = health_pb2.HealthCheckRequest(service="")
    streams, refused = [], []
    try:
        for i in range(bound + 20):  # no token: Watch needs none
            stream = health_pb2_grpc.HealthStub(channels[i % count]).Watch(request,
                                                                           timeout=120)
            try:
                assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
                streams.append(stream)
            except grpc.RpcError as exc:
                refused.append(exc.code())
                stream.cancel()
        assert len(streams) == bound and set(refused) == {CODES.RESOURCE_EXHAUSTED}, refused
        assert len(refused) == 20
        # readiness and calls go on while the streams are open
        assert server.health() == "SERVING"
        assert server.classify("toy", TEXT).version == "v1"
        for stream in streams:
            stream.cancel()
        # the cancelled streams reach the ingress and free their places
        assert poll_until(lambda: _watch_opens(channels[0]), timeout_s=30)
    finally:
        for stream in streams:
            stream.cancel()
        for channel in channels:
            channel.close()


def _watch_opens(channel) -> bool:
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=30)
    try:
        return next(stream).status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        stream.cancel()
