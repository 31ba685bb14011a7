"""The Python client's retries (services/client.py RetryPolicy), against a fake
tuneserve server on a real port that fails a scripted number of times, then answers:
what is tried again, how often, after how long, and what never is."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from services.client import CallError, Client, RetryPolicy
from services.core.errors import InvalidInput
from services.core.net import free_port
from services.protocol import INFERENCE_SERVICE, admin_pb, pb
from services.protocol.status import FieldViolation, trailers

CODES = grpc.StatusCode


class Script:
    """What the fake server answers: a list of failures (code, retry hint s or None,
    with a google.rpc.Status or not) used up one per call, then success."""

    def __init__(self):
        self.failures: list[tuple] = []
        self.calls: list[tuple[str, float]] = []  # (method, monotonic time)
        self.lock = threading.Lock()

    def next_failure(self, method: str):
        with self.lock:
            self.calls.append((method, time.monotonic()))
            return self.failures.pop(0) if self.failures else None


def _fail(context, failure):
    code, retry_s, with_status = failure
    if with_status:
        context.set_trailing_metadata(trailers(code, "no", retry_s,
                                               [FieldViolation("texts[0]", "empty text")]
                                               if code == CODES.INVALID_ARGUMENT else ()))
    context.set_code(code)
    context.set_details("no")


@pytest.fixture
def fake():
    script = Script()

    def classify(request, context):
        failure = script.next_failure("Classify")
        if failure:
            _fail(context, failure)
            return pb.ClassifyResponse()
        return pb.ClassifyResponse(model=request.model, version="v1")

    def stream(request, context):
        failure = script.next_failure("GenerateStream")
        if failure:
            _fail(context, failure)
            return
        for word in request.prompt.split():
            if word == "fail":
                _fail(context, (CODES.UNAVAILABLE, 0.01, True))
                return
            if word == "slow":
                time.sleep(0.2)
            yield pb.GenerateResponse(text=word)

    def rollback(request, context):
        _fail(context, script.next_failure("Rollback") or (CODES.NOT_FOUND, None, True))
        return admin_pb.AdminResponse()

    def unary(fn, req, resp):
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString)

    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler(INFERENCE_SERVICE, {
            "Classify": unary(classify, pb.ClassifyRequest, pb.ClassifyResponse),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=pb.GenerateRequest.FromString,
                response_serializer=pb.GenerateResponse.SerializeToString)}),
        grpc.method_handlers_generic_handler("tuneserve.v1.Admin", {
            "Rollback": unary(rollback, admin_pb.RollbackRequest, admin_pb.AdminResponse)}),
    ])
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield script, f"127.0.0.1:{port}"
    server.stop(0)


def _client(address, **kw) -> Client:
    return Client(address, token="", timeout_s=10, **kw)


def _gaps(script) -> list[float]:
    times = [t for _, t in script.calls]
    return [b - a for a, b in zip(times, times[1:])]


@pytest.mark.parametrize("code", [CODES.RESOURCE_EXHAUSTED, CODES.UNAVAILABLE])
def test_a_hinted_failure_is_tried_again_after_the_hint(fake, code):
    script, address = fake
    script.failures = [(code, 0.2, True), (code, 0.2, True)]
    with _client(address) as client:
        assert client.classify("m", ["x"]).version == "v1"
    assert len(script.calls) == 3
    # waited at least the hint, and at most half again (the jitter)
    assert all(0.2 <= gap < 0.3 + 1.0 for gap in _gaps(script)), _gaps(script)


def test_attempts_are_bounded_and_the_last_error_says_how_many(fake):
    script, address = fake
    script.failures = [(CODES.UNAVAILABLE, 0.01, True)] * 5
    with _client(address) as client:
        with pytest.raises(CallError) as err:
            client.classify("m", ["x"])
    assert err.value.code() == CODES.UNAVAILABLE and err.value.attempts == 3
    assert len(script.calls) == 3
    script.calls.clear()
    with _client(address, max_attempts=1) as client:
        with pytest.raises(grpc.RpcError):  # a CallError is a grpc.RpcError
            client.classify("m", ["x"])
    assert len(script.calls) == 1


@pytest.mark.parametrize("failure", [
    (CODES.INVALID_ARGUMENT, None, True),
    (CODES.RESOURCE_EXHAUSTED, None, True),  # e.g. a request over the size limit
    (CODES.RESOURCE_EXHAUSTED, None, False),  # grpc's own message size limit
    (CODES.UNAVAILABLE, None, True),  # a replica died on it twice: the server says so
    (CODES.UNAVAILABLE, 60.0, True),  # a hint longer than the client waits
    (CODES.DEADLINE_EXCEEDED, None, False),
])
def test_what_calling_again_cannot_help_is_tried_once(fake, failure):
    script, address = fake
    script.failures = [failure]
    with _client(address) as client:
        with pytest.raises(CallError) as err:
            client.classify("m", ["x"])
    assert err.value.code() == failure[0] and len(script.calls) == 1
    if failure[0] == CODES.INVALID_ARGUMENT:
        assert err.value.field_violations == (FieldViolation("texts[0]", "empty text"),)


def test_unavailable_without_a_server_status_backs_off(fake):
    """A connection refused or lost: no tuneserve server answered, so it is tried again
    after a short, growing, jittered wait."""
    script, address = fake
    script.failures = [(CODES.UNAVAILABLE, None, False)] * 2
    with _client(address) as client:
        client.retry = RetryPolicy(3, backoff_s=0.1, rand=lambda: 0.99)
        assert client.classify("m", ["x"]).version == "v1"
    first, second = _gaps(script)
    assert 0.09 <= first < 0.5 + 0.1 and 0.19 <= second < 1.0 + 0.2, (first, second)


def test_retries_stay_within_the_calls_deadline(fake):
    script, address = fake
    script.failures = [(CODES.UNAVAILABLE, 1.0, True)] * 3
    with _client(address) as client:
        started = time.monotonic()
        with pytest.raises(CallError) as err:
            client.classify("m", ["x"], timeout_s=0.5)
    # the wait would pass the deadline: the call fails at once, not after the wait
    assert time.monotonic() - started < 0.5 and len(script.calls) == 1
    assert err.value.retry_after_s == 1.0


def test_admin_calls_are_tried_once(fake):
    script, address = fake
    script.failures = [(CODES.UNAVAILABLE, 0.01, True)]
    with _client(address) as client:
        with pytest.raises(CallError) as err:
            client.rollback("m")
    assert err.value.code() == CODES.UNAVAILABLE and len(script.calls) == 1


def test_a_stream_is_tried_again_only_before_its_first_chunk(fake):
    script, address = fake
    script.failures = [(CODES.RESOURCE_EXHAUSTED, 0.01, True)]
    with _client(address) as client:
        assert [c.text for c in client.generate_stream("g", "a b")] == ["a", "b"]
        assert len(script.calls) == 2
        script.calls.clear()
        received = []
        with pytest.raises(CallError) as err:
            for chunk in client.generate_stream("g", "a fail b"):
                received.append(chunk.text)
        assert received == ["a"] and len(script.calls) == 1
        assert err.value.code() == CODES.UNAVAILABLE


def test_a_cancelled_stream_ends_cancelled_and_is_not_sent_again(fake):
    script, address = fake
    with _client(address) as client:
        stream = client.generate_stream("g", "a slow slow slow slow slow b")
        assert next(stream).text == "a"
        stream.cancel()
        with pytest.raises(CallError) as err:
            list(stream)
    assert err.value.code() == CODES.CANCELLED and len(script.calls) == 1


def test_max_attempts_is_checked():
    with pytest.raises(InvalidInput, match="--max-attempts"):
        Client("127.0.0.1:1", max_attempts=0)
    with pytest.raises(InvalidInput, match="--max-attempts"):
        Client("127.0.0.1:1", max_attempts=11)


def test_cli_max_attempts(fake, capsys):
    from services.cli import main

    script, address = fake
    script.failures = [(CODES.UNAVAILABLE, 0.01, True)] * 5
    assert main(["classify", "--address", address, "--model", "m",
                 "--max-attempts", "2", "x"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE: no (after 2 attempts, --max-attempts)" in err
    assert len(script.calls) == 2
    assert main(["generate", "--address", address, "--model", "g",
                 "--max-attempts", "0", "x"]) == 2
    assert "--max-attempts" in capsys.readouterr().err and len(script.calls) == 2


class Relay:
    """A TCP relay in front of a server. freeze() makes it stop passing bytes on the
    connections it has, without closing them: what a client sees of a server whose
    machine vanished. Connections made after freeze() pass bytes as before."""

    def __init__(self, upstream: str):
        import socket

        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.frozen: list[threading.Event] = []
        self.sockets = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            frozen = threading.Event()
            self.frozen.append(frozen)
            self.sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst, frozen),
                                 daemon=True).start()

    @staticmethod
    def _pump(src, dst, frozen: threading.Event) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    return
                if not frozen.is_set():
                    dst.sendall(data)
            except OSError:
                return

    def freeze(self) -> None:
        for frozen in self.frozen:
            frozen.set()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def relay(fake):
    script, address = fake
    relay = Relay(address)
    yield script, relay
    relay.close()


def test_a_connection_whose_server_vanished_is_dropped_and_the_call_answered(relay):
    """A call in flight on a connection that went silent: the keepalive ping gets no
    answer, the connection is closed (UNAVAILABLE, no server answered) and the call
    is tried again on a new connection, within its deadline."""
    script, relay = relay
    with _client(relay.address, keepalive_s=0.5) as client:
        assert client.classify("m", ["warm"]).version == "v1"
        relay.freeze()
        assert client.classify("m", ["x"], timeout_s=20).version == "v1"
    assert len(script.calls) == 2  # the frozen try never reached the server


def test_without_keepalive_a_silent_connection_holds_the_call_to_its_deadline(relay):
    script, relay = relay
    with _client(relay.address, keepalive_s=None) as client:
        assert client.classify("m", ["warm"]).version == "v1"
        relay.freeze()
        with pytest.raises(CallError) as err:
            client.classify("m", ["x"], timeout_s=2)
    assert err.value.code() == CODES.DEADLINE_EXCEEDED and len(script.calls) == 1


@pytest.mark.parametrize("keepalive_s", [0, -1, 1e9, True, "20"])
def test_keepalive_is_checked(keepalive_s):
    with pytest.raises(InvalidInput, match="keepalive_s"):
        Client("127.0.0.1:1", keepalive_s=keepalive_s)


def test_the_default_keepalive_is_not_ping_abuse_to_tuneserve_servers():
    from services.client import DEFAULT_KEEPALIVE_S
    from services.serving.replica_grpc import MIN_CLIENT_PING_INTERVAL_S

    assert DEFAULT_KEEPALIVE_S >= 2 * MIN_CLIENT_PING_INTERVAL_S
