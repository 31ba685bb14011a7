"""Failed calls carry status details a client can act on (docs/api.md): a retry hint
(google.rpc.RetryInfo and the retry-after-ms trailer) where calling again can help, the
invalid field (google.rpc.BadRequest) of a bad request. The mapping per error kind in
memory, then on the wire: a real InferenceIngress behind its own gRPC server (as in
test_replica_grpc.py), read with a plain stub and decoded with grpcio-status."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.client import CallError, Client
from services.core.errors import (
    InvalidInput,
    ModelLoading,
    ModelNotFound,
    Overloaded,
    RequestTooLarge,
)
from services.core.net import free_port
from services.protocol import pb, pb_grpc
from services.protocol.status import (
    RETRY_AFTER_TRAILER,
    Details,
    FieldViolation,
    trailers,
)
from services.serving import status_codes
from services.serving.colocated import LocalModel
from services.serving.status_codes import answer
from tests.unit.test_replica_grpc import LoopThread, Model

CODES = grpc.StatusCode


def _ray_errors():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    return {"back-pressure": BackPressureError(num_queued_requests=3, max_queued_requests=2),
            "no-replica": DeploymentUnavailableError("deployment 'x' unavailable"),
            "replica-died": ActorDiedError()}


@pytest.mark.parametrize("kind, code, retry_s, field", [
    ("queue-full", CODES.RESOURCE_EXHAUSTED, status_codes.QUEUE_FULL_RETRY_S, None),
    ("back-pressure", CODES.RESOURCE_EXHAUSTED, status_codes.QUEUE_FULL_RETRY_S, None),
    ("loading", CODES.UNAVAILABLE, status_codes.LOADING_RETRY_S, None),
    ("no-replica", CODES.UNAVAILABLE, status_codes.LOADING_RETRY_S, None),
    # the ingress sent it once more already: a request that kills replicas gets no hint
    ("replica-died", CODES.UNAVAILABLE, None, None),
    # retrying the same bytes cannot help
    ("too-large", CODES.RESOURCE_EXHAUSTED, None, None),
    ("invalid-text", CODES.INVALID_ARGUMENT, None, "texts[3]"),
    ("invalid-nested", CODES.INVALID_ARGUMENT, None, "options.top_p"),
    ("not-found", CODES.NOT_FOUND, None, None),
    ("bug", CODES.INTERNAL, None, None),
])
def test_each_kind_of_error_carries_its_details(kind, code, retry_s, field):
    exc = {"queue-full": status_codes.queue_full(),
           "loading": ModelLoading("model 'm' is loading"),
           "too-large": RequestTooLarge("request: 9000 bytes; the limit is 4096 bytes"),
           "invalid-text": InvalidInput("texts[3]: empty text"),
           "invalid-nested": InvalidInput("options.top_p: must be in (0, 1], got 2"),
           "not-found": ModelNotFound("model 'x' not found"),
           "bug": KeyError("/srv/secret.py"),
           }.get(kind) or _ray_errors()[kind]
    result = answer(exc, "m")
    assert result.code == code and result.retry_after_s == retry_s
    # what a client decodes from the trailers is what the server meant
    details = Details.of(result.trailing_metadata())
    assert details.status and details.retry_after_s == retry_s
    if field:
        assert details.field_violations == (
            FieldViolation(field, result.message.split(": ", 1)[1]),)
        assert details.field_violations[0].description in ("empty text",
                                                           "must be in (0, 1], got 2")
    else:
        assert details.field_violations == ()
    retry_ms = dict(result.trailing_metadata()).get(RETRY_AFTER_TRAILER)
    assert retry_ms == (None if retry_s is None else str(round(retry_s * 1000)))


def test_a_message_without_a_field_first_has_no_violation():
    assert answer(InvalidInput("Texts: bad")).field_violations == ()
    assert answer(InvalidInput("no field named here")).field_violations == ()


def test_malformed_trailers_read_as_absent():
    assert Details.of([("grpc-status-details-bin", b"\xff\xff not a status")]) == Details()
    assert Details.of([(RETRY_AFTER_TRAILER, "soon")]) == Details()
    assert Details.of([(RETRY_AFTER_TRAILER, "-5")]) == Details()
    assert Details.of(None) == Details()
    # only the plain trailer (a server without the protos): still a hint
    assert Details.of([(RETRY_AFTER_TRAILER, "1500")]).retry_after_s == 1.5
    both = trailers(CODES.UNAVAILABLE, "x", 0.5, [FieldViolation("a", "b")])
    assert Details.of(both) == Details(True, 0.5, (FieldViolation("a", "b"),))


class LoadingBoard:
    """The status board of a model "m" that has not loaded yet (a "g" that has)."""

    class _Get:
        async def remote(self):
            return {"m": [{"replica": "r1", "version": None}],
                    "g": [{"replica": "r1", "version": "v1"}]}

    get = _Get()


@pytest.fixture(scope="module")
def wire(tmp_path_factory):
    """An ingress whose model "m" is loading, behind its own gRPC server on a port."""
    from services.serving.ingress import InferenceIngress

    registry = tmp_path_factory.mktemp("registry")
    loop, port, model = LoopThread(), free_port(), Model()

    async def build():
        return InferenceIngress(
            str(registry), {"m": LocalModel(model), "g": LocalModel(model)},
            {"m": "classification", "g": "generation"}, {"max_request_bytes": 4096},
            board=LoadingBoard(), auth={},
            grpc_server={"host": "127.0.0.1", "port": port, "max_receive_bytes": 8192})

    ingress = loop.call(build)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield {"stub": pb_grpc.InferenceStub(channel), "port": port}
    channel.close()
    loop.call(lambda: ingress.__del__() or asyncio.sleep(0))
    loop.close()


def _failed(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value, rpc_status.from_call(err.value)


def _unpack(status, kind):
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    return None


def test_details_on_the_wire_decode_with_grpcio_status(wire):
    stub = wire["stub"]
    # INVALID_ARGUMENT: the field, in a BadRequest; the status matches the call's own
    err, status = _failed(lambda: stub.Classify(pb.ClassifyRequest(model="g",
                                                                   texts=["ok", ""])))
    # "g" is a generator, but fields are checked first
    assert err.code() == CODES.INVALID_ARGUMENT and status.message == err.details()
    bad = _unpack(status, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == \
        [("texts[1]", "empty text")]
    assert _unpack(status, error_details_pb2.RetryInfo) is None
    # UNAVAILABLE while loading: RetryInfo and the plain trailer agree
    err, status = _failed(lambda: stub.Classify(pb.ClassifyRequest(model="m", texts=["x"])))
    assert err.code() == CODES.UNAVAILABLE and "loading" in err.details()
    info = _unpack(status, error_details_pb2.RetryInfo)
    assert info.retry_delay.ToMilliseconds() == status_codes.LOADING_RETRY_S * 1000
    assert dict(err.trailing_metadata())[RETRY_AFTER_TRAILER] == "1000"
    # RESOURCE_EXHAUSTED for a request over the size limit: a status, no retry hint
    err, status = _failed(lambda: stub.Classify(pb.ClassifyRequest(model="m",
                                                                   texts=["y" * 5000])))
    assert err.code() == CODES.RESOURCE_EXHAUSTED and status is not None
    assert _unpack(status, error_details_pb2.RetryInfo) is None


def test_a_failed_stream_carries_its_details_too(wire):
    stub = wire["stub"]
    err, status = _failed(lambda: list(stub.GenerateStream(
        pb.GenerateRequest(model="g", prompt="x", temperature=-1))))
    assert err.code() == CODES.INVALID_ARGUMENT
    bad = _unpack(status, error_details_pb2.BadRequest)
    assert bad.field_violations[0].field == "temperature"


def test_the_client_reads_the_details(wire):
    with Client(f"127.0.0.1:{wire['port']}", token="", timeout_s=10,
                max_attempts=1) as client:
        with pytest.raises(CallError) as err:
            client.generate("g", "x", top_p=2.0)
        assert err.value.code() == CODES.INVALID_ARGUMENT and err.value.from_server
        assert [v.field for v in err.value.field_violations] == ["top_p"]
        assert err.value.retry_after_s is None
        with pytest.raises(CallError) as err:
            client.classify("m", ["x"])
        assert err.value.code() == CODES.UNAVAILABLE
        assert err.value.retry_after_s == status_codes.LOADING_RETRY_S
        assert err.value.attempts == 1
