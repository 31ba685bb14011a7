"""The status-code contract for bad input (docs/api.md, "Status codes for bad input"),
through Serve's real gRPC proxy: one test per row of the table, and a property-based
test (hypothesis) that throws random requests at the live server.

No client error may come back as INTERNAL or UNKNOWN, and no message may carry a
traceback, a file path or an internal name. A message may echo a valid model name or
version the client sent (in quotes); those are removed before the message is checked.
"""

from __future__ import annotations

import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.client import CallError, Client
from services.core.config import ServeConfig, ServeLimits
from services.protocol import admin_pb, pb
from services.core.registry import Registry
from services.protocol.status import FieldViolation
from services.serving.status_codes import LOADING_RETRY_S
from tests.conftest import GEN_MODEL
from tests.helpers import copy_version, delete_app, poll_until

pytestmark = pytest.mark.timeout(600)

LIMITS = ServeLimits()
CODES = grpc.StatusCode
# What a client error may come back as. Never INTERNAL, UNKNOWN or UNIMPLEMENTED.
ALLOWED = {CODES.OK, CODES.INVALID_ARGUMENT, CODES.NOT_FOUND, CODES.FAILED_PRECONDITION,
           CODES.RESOURCE_EXHAUSTED, CODES.UNAVAILABLE}
# Tracebacks, paths, modules, Ray and Serve internals.
LEAKS = re.compile(r"traceback|file \"|\.py\b|/|\\|\bray\b|\bserve\.|deployment|\bactor\b|"
                   r"replica|ingress|follower|_pb2|services\.|<class|0x[0-9a-f]{6}", re.I)
# Exception and class names: RuntimeError, RayTaskError, DecodeError, ...
CLASS_NAMES = re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z0-9]*)*(?:Error|Exception)\b")
# Characters that must work anywhere in a text: RTL marks and overrides, zero-width
# (non-)joiners, emoji with ZWJ and skin tones, flags, combining marks, private use,
# a BOM, noncharacters, the last code point, CJK, Arabic, Devanagari.
ODD_UNICODE = ["\u200f\u202eright-to-left\u202c\u200e", "zero\u200bwidth\u200c\u200d",
               "👨\u200d👩\u200d👧 family 👍🏽 🇯🇵", "e\u0301\u0302\u0303 combining",
               "\ue000\uf8ff\U000f0000 private use", "\ufeffbom \ufffe\uffff noncharacters",
               "\U0010ffff last", "日本語のテキスト", "مرحبا بالعالم", "नमस्ते दुनिया",
               "\u00a0\u2028\u2029 separators", "😀" * 50]


# ---- helpers --------------------------------------------------------------------------
def call(server, method: str, request, metadata=(), service="Inference"):
    """(code, details, response) of one call; a stream is read to its end."""
    stub = server.inference if service == "Inference" else server.admin
    fn = getattr(stub, method)
    try:
        response = fn(request, timeout=60, metadata=list(metadata) or None)
        if method == "GenerateStream":
            response = list(response)
        return CODES.OK, "", response
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def raw_call(channel, path: str, payload: bytes, streaming: bool = False, metadata=()):
    """Send bytes as they are (e.g. not UTF-8 where the proto has a string)."""
    make = channel.unary_stream if streaming else channel.unary_unary
    fn = make(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        response = fn(payload, timeout=60, metadata=list(metadata) or None)
        if streaming:
            list(response)
        return CODES.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def field(number: int, data: bytes) -> bytes:
    """One length-delimited protobuf field (data under 128 bytes)."""
    assert len(data) < 128
    return bytes([number << 3 | 2, len(data)]) + data


def assert_clean(code, details: str, echoes=()) -> None:
    """The contract's message rules for a non-OK answer."""
    assert code in ALLOWED, f"{code.name}: {details}"
    if code == CODES.OK:
        return
    assert details.strip(), f"{code.name} without a message"
    for echo in echoes:
        if echo:
            details = details.replace(f"'{echo}'", "''")
    assert not LEAKS.search(details), f"{code.name} leaks: {details!r}"
    assert not CLASS_NAMES.search(details), f"{code.name} names a class: {details!r}"


def expect(result, code, *needles, echoes=()):
    got, details, _ = result
    assert got == code, f"expected {code.name}, got {got.name}: {details}"
    for needle in needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    assert_clean(got, details, echoes)


def gen(**kw):
    return pb.GenerateRequest(**{"model": GEN_MODEL, "prompt": "red cat",
                                 "max_new_tokens": 4, **kw})


# ---- Classify -----------------------------------------------------------------------
@pytest.mark.parametrize("texts,needles", [
    ([], ["texts", "at least one"]),
    (["ok"] * 129, ["texts", "129", "the limit is 128"]),
    (["fine", ""], ["texts[1]", "empty"]),
    (["fine", " \t\n\u3000"], ["texts[1]", "empty"]),
    (["x" * 20_001], ["texts[0]", "20001", "the limit is 20000"]),
    (["a\x00b"], ["texts[0]", "NUL"]),
], ids=["empty", "too-many", "empty-text", "whitespace-text", "too-long", "nul"])
def test_classify_texts(server, texts, needles):
    expect(call(server, "Classify", pb.ClassifyRequest(model="toy", texts=texts)),
           CODES.INVALID_ARGUMENT, *needles)


def test_classify_limits_are_inclusive(server):
    code, details, resp = call(server, "Classify", pb.ClassifyRequest(
        model="toy", texts=["x" * 20_000] + ["ok"] * 127))
    assert code == CODES.OK, details
    assert len(resp.results) == 128


def test_request_over_the_message_size_limit(server):
    # 17 MB: over ServeLimits.max_request_bytes (16 MiB). Checked before any field.
    request = pb.ClassifyRequest(model="toy", texts=["x" * 20_000] * 850)
    assert request.ByteSize() > LIMITS.max_request_bytes
    expect(call(server, "Classify", request), CODES.RESOURCE_EXHAUSTED,
           "request", f"the limit is {LIMITS.max_request_bytes} bytes")


def test_status_details_cross_the_proxy(server):
    """docs/api.md "Status details and retries": the invalid field as a BadRequest, no
    retry hint where calling again cannot help."""
    with pytest.raises(CallError) as err:
        server.classify("toy", ["fine", ""])
    assert err.value.code() == CODES.INVALID_ARGUMENT and err.value.attempts == 1
    assert err.value.field_violations == (FieldViolation("texts[1]", "empty text"),)
    with pytest.raises(CallError) as err:
        server.generate(GEN_MODEL, "red cat", top_k=-1)
    assert [v.field for v in err.value.field_violations] == ["top_k"]
    with pytest.raises(CallError) as err:
        server.classify("toy", ["x" * 20_000] * 850)
    assert err.value.code() == CODES.RESOURCE_EXHAUSTED and err.value.from_server
    assert err.value.retry_after_s is None and err.value.attempts == 1


def test_odd_unicode_is_served(server):
    code, details, resp = call(server, "Classify", pb.ClassifyRequest(
        model="toy", texts=ODD_UNICODE))
    assert code == CODES.OK, details
    assert len(resp.results) == len(ODD_UNICODE)
    for text in ODD_UNICODE[:4]:
        code, details, resp = call(server, "Generate", gen(prompt=text, stop=[text[:8]]))
        assert code == CODES.OK, details
        assert resp.finish_reason in ("length", "stop", "eos")


@pytest.mark.parametrize("method,path,payload,streaming", [
    ("Classify", "/tuneserve.v1.Inference/Classify",
     field(1, b"toy") + field(2, b"caf\xe9 \xff\xfe"), False),
    ("Classify model", "/tuneserve.v1.Inference/Classify",
     field(1, b"t\xc3(") + field(2, b"ok"), False),
    ("Generate", "/tuneserve.v1.Inference/Generate",
     field(1, GEN_MODEL.encode()) + field(2, b"\xed\xa0\x80 surrogate"), False),
    ("GenerateStream", "/tuneserve.v1.Inference/GenerateStream",
     field(1, GEN_MODEL.encode()) + field(2, b"\xc0\xaf overlong"), True),
    ("GenerateStream stop", "/tuneserve.v1.Inference/GenerateStream",
     field(1, GEN_MODEL.encode()) + field(2, b"ok") + field(7, b"\x80"), True),
    ("ListModels", "/tuneserve.v1.Inference/ListModels", field(1, b"\xf8\x88\x80\x80\x80"),
     False),
    ("Promote", "/tuneserve.v1.Admin/Promote",
     field(1, b"toy") + field(2, b"v1") + field(3, b"\xfe"), False),
    ("not protobuf", "/tuneserve.v1.Inference/Classify", b"\xff\xff\xff\xff\xff", False),
    ("truncated", "/tuneserve.v1.Inference/Classify", field(1, b"toy")[:-1], False),
])
def test_bytes_that_are_not_the_message(server, method, path, payload, streaming):
    """Invalid UTF-8 in a string field (sent raw: a client library would refuse to
    build it) or bytes that are not protobuf at all: INVALID_ARGUMENT, not the
    parser's exception as UNKNOWN."""
    channel = server.admin_channel if ".Admin/" in path else server.channel
    code, details = raw_call(channel, path, payload, streaming)
    assert code == CODES.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert "not a valid tuneserve.v1." in details
    assert_clean(code, details)


def test_health_check_with_bytes_that_are_not_utf8(server):
    code, details = raw_call(server.channel, "/grpc.health.v1.Health/Check",
                             field(1, b"tuneserve\xff"))
    assert code == CODES.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert_clean(code, details)


# ---- model and version -----------------------------------------------------------------
@pytest.mark.parametrize("model,code,needles", [
    ("", CODES.INVALID_ARGUMENT, ["model", "required"]),
    ("../../etc/passwd", CODES.INVALID_ARGUMENT, ["model", "invalid model name"]),
    ("toy\n", CODES.INVALID_ARGUMENT, ["model", "invalid model name"]),
    ("toy\x00", CODES.INVALID_ARGUMENT, ["model", "invalid model name"]),
    ("\u202etoy", CODES.INVALID_ARGUMENT, ["model", "invalid model name"]),
    ("a" * 129, CODES.INVALID_ARGUMENT, ["model", "longer than 128"]),
    ("nope", CODES.NOT_FOUND, ["'nope'", "not found"]),
    ("ray.py", CODES.NOT_FOUND, ["not found"]),
], ids=["empty", "path", "newline", "nul", "rtl", "too-long", "unknown", "unknown-odd"])
@pytest.mark.parametrize("method", ["Classify", "Generate", "GenerateStream", "ListModels"])
def test_model_names(server, method, model, code, needles):
    if method == "ListModels" and not model:
        return  # an empty model lists every model
    request = {"Classify": lambda: pb.ClassifyRequest(model=model, texts=["ok"]),
               "ListModels": lambda: pb.ListModelsRequest(model=model)}.get(
        method, lambda: gen(model=model))()
    expect(call(server, method, request), code, *needles, echoes=[model])


@pytest.mark.parametrize("version,code,needles", [
    ("latest", CODES.INVALID_ARGUMENT, ["version", "expected v1, v2"]),
    ("v0", CODES.INVALID_ARGUMENT, ["version"]),
    ("1", CODES.INVALID_ARGUMENT, ["version"]),
    ("v1\n", CODES.INVALID_ARGUMENT, ["version"]),
    ("../v1", CODES.INVALID_ARGUMENT, ["version"]),
    ("v7", CODES.NOT_FOUND, ["'v7'"]),
])
@pytest.mark.parametrize("method", ["Classify", "Generate", "GenerateStream"])
def test_versions(server, method, version, code, needles):
    request = (pb.ClassifyRequest(model="toy", texts=["ok"], version=version)
               if method == "Classify" else gen(version=version))
    expect(call(server, method, request), code, *needles, echoes=[version])


# ---- the wrong task ------------------------------------------------------------------
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_generate_on_a_classifier(server, method):
    expect(call(server, method, gen(model="toy")), CODES.FAILED_PRECONDITION,
           "use Classify", echoes=["toy"])


def test_classify_on_a_generator(server):
    expect(call(server, "Classify", pb.ClassifyRequest(model=GEN_MODEL, texts=["red cat"])),
           CODES.FAILED_PRECONDITION, "use Generate", echoes=[GEN_MODEL])


# ---- generation parameters -------------------------------------------------------------
INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("kw,needles", [
    (dict(prompt=""), ["prompt", "required"]),
    (dict(prompt="x" * 20_001), ["prompt", "20001", "the limit is 20000"]),
    (dict(prompt="a\x00b"), ["prompt", "NUL"]),
    (dict(prompt="cat " * 1100), ["prompt", "tokens", "context"]),
    (dict(max_new_tokens=0), ["max_new_tokens", "at least 1"]),
    (dict(max_new_tokens=1025), ["max_new_tokens", "the limit is 1024"]),
    (dict(max_new_tokens=2**32 - 1), ["max_new_tokens", "the limit is 1024"]),
    (dict(temperature=-0.5), ["temperature", ">= 0"]),
    (dict(temperature=-1e-30), ["temperature"]),
    (dict(temperature=INF), ["temperature", "finite"]),
    (dict(temperature=-INF), ["temperature", "finite"]),
    (dict(temperature=NAN), ["temperature", "finite"]),
    (dict(top_p=0.0), ["top_p", "(0, 1]"]),
    (dict(top_p=-0.1), ["top_p"]),
    (dict(top_p=1.0001), ["top_p"]),
    (dict(top_p=NAN), ["top_p", "finite"]),
    (dict(top_p=INF), ["top_p", "finite"]),
    (dict(top_k=-1), ["top_k", ">= 0"]),
    (dict(top_k=-2**31), ["top_k"]),
    (dict(stop=["a", "b", "c", "d", "e"]), ["stop", "5 strings", "the limit is 4"]),
    (dict(stop=["ok", ""]), ["stop[1]", "empty"]),
    (dict(stop=["x" * 65]), ["stop[0]", "65 characters", "the limit is 64"]),
    (dict(stop=["a\x00"]), ["stop[0]", "NUL"]),
], ids=lambda v: repr(v)[:40] if isinstance(v, dict) else "")
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_invalid_generation_parameters(server, method, kw, needles):
    expect(call(server, method, gen(**kw)), CODES.INVALID_ARGUMENT, *needles)


@pytest.mark.parametrize("kw", [
    dict(temperature=1e-40),  # below 1e-5: greedy (dividing by it would overflow)
    dict(temperature=3e38, seed=1),
    dict(temperature=1.0, top_p=1e-30, seed=2),
    dict(temperature=1.0, top_k=2**31 - 1, seed=3),
    dict(temperature=0.7, seed=2**64 - 1),
    dict(temperature=0.7, seed=2**63),
    dict(max_new_tokens=1, stop=["\u200d", "👍🏽", "x" * 64, "\ue000"]),
    dict(prompt=" ", ignore_eos=True),
    dict(max_new_tokens=1024, ignore_eos=True, stop=["the"]),
], ids=lambda kw: ",".join(kw))
def test_edge_generation_parameters_are_served(server, kw):
    code, details, resp = call(server, "Generate", gen(**kw))
    assert code == CODES.OK, details
    assert resp.finish_reason in ("length", "stop", "eos")


# ---- Admin, ListModels, health ------------------------------------------------------------
@pytest.mark.parametrize("method,request_,code,needles", [
    ("Promote", admin_pb.PromoteRequest(model="toy"), CODES.INVALID_ARGUMENT,
     ["version", "required"]),
    ("Promote", admin_pb.PromoteRequest(model="toy", version="latest"),
     CODES.INVALID_ARGUMENT, ["version"]),
    ("Promote", admin_pb.PromoteRequest(model="toy", version="v1", channel="../x"),
     CODES.INVALID_ARGUMENT, ["channel", "invalid channel name"]),
    ("Promote", admin_pb.PromoteRequest(model="toy", version="v9"), CODES.NOT_FOUND,
     ["'v9'"]),
    ("Promote", admin_pb.PromoteRequest(model="nope", version="v1"), CODES.NOT_FOUND,
     ["'nope'"]),
    ("Pin", admin_pb.PinRequest(model="toy", version="v0"), CODES.INVALID_ARGUMENT,
     ["version"]),
    ("Pin", admin_pb.PinRequest(model="", version="v1"), CODES.INVALID_ARGUMENT, ["model"]),
    ("Rollback", admin_pb.RollbackRequest(model="a/b"), CODES.INVALID_ARGUMENT, ["model"]),
    ("Rollback", admin_pb.RollbackRequest(model="toy", channel="nothing-here"),
     CODES.NOT_FOUND, ["no channel 'nothing-here'", "production"]),
    ("Promote", admin_pb.PromoteRequest(model="toy", version="v1", channel="pin"),
     CODES.INVALID_ARGUMENT, ["channel: channel name 'pin' is reserved"]),
    ("Unpin", admin_pb.UnpinRequest(model="nope"), CODES.NOT_FOUND, ["'nope'"]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_admin_bad_input(server, method, request_, code, needles):
    """Refused before anything changes in the registry."""
    expect(call(server, method, request_, service="Admin"), code, *needles,
           echoes=["toy", "nope", "v9", "nothing-here", "pin"])


def test_health_unknown_service(server):
    stub = health_pb2_grpc.HealthStub(server.channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service/../x"), timeout=10)
    assert err.value.code() == CODES.NOT_FOUND
    assert_clean(err.value.code(), err.value.details())


# ---- before any model is loaded -------------------------------------------------------------
PENDING_APP = "contract-pending"


@pytest.fixture(scope="class")
def pending(server, trained, tmp_path_factory):
    """A second Serve application (routed by the `application` metadata) over its own
    registry, whose one model has a single version that fails verification: the app
    runs with nothing loaded. Class-scoped: once TestBeforeAnyModelIsLoaded ends, the
    app is deleted and the session's app is reachable without metadata again."""
    from ray import serve

    from services.serving.app import build_app

    cfg, _ = trained
    source = Registry(cfg.registry)
    registry = Registry(tmp_path_factory.mktemp("pending") / "registry")
    assert copy_version(source, "toy", "v1", registry, "pending") == "v1"
    weights = registry.local_copy("pending", "v1") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the sha256 no longer matches the manifest: refused
    weights.write_bytes(bytes(data))
    serve.run(build_app(ServeConfig(registry=registry.uri, replica_cpus=0.1,
                                    poll_interval_s=0.5)),
              name=PENDING_APP, route_prefix=f"/{PENDING_APP}", blocking=False)
    client = Client(server.address, token="", application=PENDING_APP, timeout_s=30)

    def refused():
        try:
            (info,) = client.list_models().models
        except grpc.RpcError:
            return None
        return info if any(r.refused for r in info.replicas) else None

    try:
        assert poll_until(refused, timeout_s=180, poll_s=0.5), "the app never came up"
        yield client, registry, source
    finally:
        client.close()
        delete_app(PENDING_APP, server)


class TestBeforeAnyModelIsLoaded:
    """Nothing loaded yet: UNAVAILABLE, and health NOT_SERVING (the `pending` app)."""

    def test_unavailable_and_not_serving(self, pending):
        client, _, _ = pending
        with pytest.raises(grpc.RpcError) as err:
            client.classify("pending", ["a good film"])
        expect((err.value.code(), err.value.details(), None), CODES.UNAVAILABLE, "loading",
               echoes=["pending"])
        # the retry hint crosses Serve's proxy, and the client waited it out, 3 times
        assert err.value.retry_after_s == LOADING_RETRY_S and err.value.attempts == 3
        assert client.health() == "NOT_SERVING"
        assert client.health(service="") == "NOT_SERVING"
        (info,) = client.list_models().models
        assert not info.serving_versions and "v1" in info.replicas[0].refused

    def test_serving_once_a_good_version_is_promoted(self, pending):
        client, registry, source = pending
        good = copy_version(source, "toy", "v1", registry, "pending")
        registry.set_channel("pending", "production", good)
        assert poll_until(lambda: client.health() == "SERVING", timeout_s=60)
        assert client.classify("pending", ["a good film"]).version == good


# ---- property-based ------------------------------------------------------------------------
def mostly(valid, other, other_share: int = 3):
    """`valid` about (10 - other_share) times in 10, else `other`: random values are
    rarely valid, and a request with a bad model name tests nothing past it."""
    return st.integers(0, 9).flatmap(lambda i: other if i < other_share else valid)


SAFE_CHARS = st.characters(exclude_categories=("Cs",))  # a proto string holds no surrogate
TEXT = st.text(SAFE_CHARS, max_size=40)
ANY_MODEL = st.one_of(st.sampled_from(["toy", GEN_MODEL, "nope", "", "../x", "toy\n", "Toy"]),
                      st.text(SAFE_CHARS, max_size=20))
VERSIONS = mostly(st.just(""), st.one_of(
    st.sampled_from(["v1", "v2", "v99", "latest", "v0", "V1"]), st.text(SAFE_CHARS, max_size=8)))
TEXTS = mostly(
    st.lists(st.one_of(TEXT, st.sampled_from(ODD_UNICODE)), min_size=1, max_size=6),
    st.one_of(
        st.lists(st.one_of(TEXT, st.sampled_from(["", " ", "x" * 20_001, "a\x00"])),
                 max_size=3),
        st.integers(LIMITS.max_texts_per_request - 1, LIMITS.max_texts_per_request + 2)
        .map(lambda n: ["ok"] * n)))
FLOATS = st.floats(width=32)  # NaN, infinities, subnormals, negative zero included
GENERATION = st.fixed_dictionaries({}, optional={
    "max_new_tokens": mostly(st.integers(1, 6), st.one_of(
        st.just(0), st.integers(1025, 2**32 - 1))),
    "temperature": mostly(st.one_of(st.just(0.0), st.floats(0.0, 2.0, width=32)), FLOATS),
    "top_p": mostly(st.floats(0.0, 1.0, exclude_min=True, width=32), FLOATS),
    "top_k": mostly(st.integers(0, 50), st.integers(-2**31, 2**31 - 1)),
    "stop": mostly(st.lists(st.text(SAFE_CHARS, min_size=1, max_size=8), max_size=3),
                   st.lists(st.text(SAFE_CHARS, max_size=70), max_size=6)),
    "seed": st.integers(0, 2**64 - 1),
    "ignore_eos": st.booleans(),
})
PROMPTS = mostly(st.text(SAFE_CHARS, min_size=1, max_size=60), st.one_of(
    TEXT, st.sampled_from(["", "x" * 20_001, "cat " * 1100, "a\x00b"])))


@st.composite
def requests(draw):
    method = draw(st.sampled_from(["Classify", "Generate", "GenerateStream", "ListModels"]))
    own = "toy" if method == "Classify" else GEN_MODEL
    model = draw(mostly(st.just(own), ANY_MODEL, other_share=2))
    version = draw(VERSIONS)
    if method == "Classify":
        return method, pb.ClassifyRequest(model=model, texts=draw(TEXTS), version=version)
    if method == "ListModels":
        return method, pb.ListModelsRequest(model=draw(ANY_MODEL))
    params = draw(GENERATION)
    if params.get("ignore_eos") and "max_new_tokens" not in params:
        params["max_new_tokens"] = 4  # the default (128 tokens) only costs time here
    return method, pb.GenerateRequest(model=model, prompt=draw(PROMPTS), version=version,
                                      **params)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=requests())
def test_random_requests_keep_the_contract(server, case):
    method, request = case
    code, details, response = call(server, method, request)
    assert_clean(code, details, echoes=[request.model, getattr(request, "version", "")])
    if code == CODES.OK and method == "Classify":
        assert len(response.results) == len(request.texts)
        assert response.model == request.model
    if code == CODES.OK and method == "GenerateStream":
        assert response and response[-1].finish_reason in ("length", "stop", "eos")
