"""The ingress replica's own gRPC server (ServeConfig.replica_grpc), without Ray: a real
InferenceIngress over in-process fake models, served by ReplicaGrpcServer on a real
port from an event loop in a thread (as Serve runs user code), called by the real
client. Status codes, streams, auth, health, reflection, sharing the port, shutdown."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import Client
from services.core.config import ServeConfig
from services.core.net import free_port
from services.core.errors import ConfigError, ModelNotFound
from services.protocol import pb
from services.core.auth import Tokens
from services.serving.colocated import LocalModel
from tests.helpers import poll_until

API = "api-token-0123456789abcdef"


class Model:
    """Classifier and generator in one: what the ingress calls on a model."""

    def __init__(self):
        self.calls: dict[str, int] = {}  # prompt -> generation calls made with it
        self.classified = 0  # Classify calls answered
        self.started = threading.Event()  # a slow call has begun
        self.release = asyncio.Event()
        self.hold = asyncio.Event()  # a stream's word "hold" waits for it

    async def classify(self, texts, version=None, routing_key=None):
        self.classified += 1
        if version == "v9":
            raise ModelNotFound("model 'm' has no version 'v9'")
        if texts == ["slow"]:
            self.started.set()
            await self.release.wait()
        return {"version": "v1", "results": [
            {"label": "pos", "score": 0.75, "scores": [("pos", 0.75), ("neg", 0.25)]}
            for _ in texts]}

    def _maybe_die(self, prompt):
        """"die-once" kills the replica (as Ray reports it) on the prompt's first call,
        "die-always" on every call."""
        from ray.exceptions import ActorDiedError

        self.calls[prompt] = self.calls.get(prompt, 0) + 1
        if "die-always" in prompt or ("die-once" in prompt and self.calls[prompt] == 1):
            raise ActorDiedError()

    async def generate(self, prompt, params, version=None, routing_key=None):
        self._maybe_die(prompt)
        return {"text": prompt.upper(), "prompt_tokens": 1, "completion_tokens": 2,
                "finish_reason": "length", "version": "v1"}

    async def generate_stream(self, prompt, params, version=None, routing_key=None):
        self._maybe_die(prompt)
        for i, word in enumerate(prompt.split()):
            if word == "hold":
                await self.hold.wait()
            if word == "boom":
                raise RuntimeError("/secret/path.py exploded")
            if word == "die-mid-stream":
                from ray.exceptions import ActorDiedError

                raise ActorDiedError()
            yield {"text": word, "prompt_tokens": 1, "completion_tokens": i + 1,
                   "finish_reason": None, "version": "v1"}


class Board:
    class _Get:
        async def remote(self):
            return {"m": [{"replica": "r1", "version": "v1"}],
                    "g": [{"replica": "r1", "version": "v1"}]}

    get = _Get()


class LoopThread:
    """An event loop in a thread: the replica's user-code loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro_fn, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def served(tmp_path):
    from services.serving.ingress import InferenceIngress

    (tmp_path / "registry").mkdir()
    loop, port, model = LoopThread(), free_port(), Model()
    made = []

    def make(tokens: Tokens = Tokens.from_values(None, None), port: int = port,
             model: Model = model):
        async def build():
            ingress = InferenceIngress(
                str(tmp_path / "registry"), {"m": LocalModel(model), "g": LocalModel(model)},
                {"m": "classification", "g": "generation"}, {"max_request_bytes": 4096},
                board=Board(), auth=tokens.as_dict(),
                grpc_server={"host": "127.0.0.1", "port": port, "max_receive_bytes": 8192})
            made.append(ingress)
            return ingress
        return loop.call(build)

    yield {"make": make, "loop": loop, "port": port, "model": model}
    for ingress in made:
        if ingress._grpc_server is not None:
            loop.call(lambda: ingress.__del__() or asyncio.sleep(0))
    loop.close()


def _client(port: int, token: str = "") -> Client:
    return Client(f"127.0.0.1:{port}", token=token, timeout_s=10)


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details() or ""


def test_unary_calls_answer_and_keep_their_codes(served):
    served["make"]()
    with _client(served["port"]) as client:
        answer = client.classify("m", ["good", "bad"])
        assert (answer.model, answer.version) == ("m", "v1")
        assert [r.label for r in answer.results] == ["pos", "pos"]
        assert [s.score for s in answer.results[0].scores] == pytest.approx([0.75, 0.25])
        code, details = _code(lambda: client.classify("nope", ["x"]))
        assert code == grpc.StatusCode.NOT_FOUND and "'nope' not found" in details
        assert _code(lambda: client.classify("m", ["x"], version="v9"))[0] == \
            grpc.StatusCode.NOT_FOUND
        assert _code(lambda: client.classify("g", ["x"]))[0] == \
            grpc.StatusCode.FAILED_PRECONDITION
        assert _code(lambda: client.classify("m", []))[0] == grpc.StatusCode.INVALID_ARGUMENT
        # over the ingress's limit, under grpc's: the ingress's message names the limit
        code, details = _code(lambda: client.classify("m", ["x" * 5000]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "4096 bytes" in details
        # over grpc's own limit (2x): refused before it is read, with the same code
        assert _code(lambda: client.classify("m", ["x" * 9000]))[0] == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [m.name for m in client.list_models().models] == ["g", "m"]


def test_streams_end_with_the_ingress_status_not_unknown(served, caplog):
    served["make"]()
    with _client(served["port"]) as client:
        chunks = list(client.generate_stream("g", "red cat sat"))
        assert [c.text for c in chunks] == ["red", "cat", "sat"]
        assert chunks[-1].completion_tokens == 3 and chunks[-1].model == "g"
        # the ingress sets the status, then raises (how Serve ends a stream)
        code, details = _code(lambda: list(client.generate_stream("m", "x")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "use Classify" in details
        code, details = _code(lambda: list(client.generate_stream("g", "x", temperature=-1)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in details
        # an unexpected failure mid-stream: INTERNAL with an error id, nothing leaked
        received = []
        with pytest.raises(grpc.RpcError) as err:
            for chunk in client.generate_stream("g", "red boom"):
                received.append(chunk.text)
        assert received == ["red"]
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "internal error (id " in err.value.details()
        assert "secret" not in err.value.details() and "Traceback" not in err.value.details()
    # grpc logs a handler's raise as unexpected: a refused stream is not one
    assert not [r for r in caplog.records if r.name.startswith("grpc")], caplog.text


def test_generation_whose_replica_died_is_sent_once_more(served):
    """Generate, and GenerateStream until it has sent a chunk, go to the model once more
    when the replica dies during the call (services/serving/ingress.py)."""
    served["make"]()
    model = served["model"]
    with _client(served["port"]) as client:
        answer = client.generate("g", "die-once hello")
        assert answer.text == "DIE-ONCE HELLO" and model.calls["die-once hello"] == 2
        chunks = list(client.generate_stream("g", "die-once a b"))
        assert "".join(c.text for c in chunks) == "die-onceab"
        assert model.calls["die-once a b"] == 2
        # once more only: a request that kills its replicas fails, as UNAVAILABLE
        for call in (lambda: client.generate("g", "die-always"),
                     lambda: list(client.generate_stream("g", "die-always x"))):
            code, details = _code(call)
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert model.calls["die-always"] == model.calls["die-always x"] == 2
        # a stream that has sent text is not sent again: the client has part of it
        received = []
        with pytest.raises(grpc.RpcError) as err:
            for chunk in client.generate_stream("g", "one die-mid-stream two"):
                received.append(chunk.text)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert received == ["one"] and model.calls["one die-mid-stream two"] == 1


def test_undecodable_request_is_invalid_argument(served):
    served["make"]()
    with grpc.insecure_channel(f"127.0.0.1:{served['port']}") as channel:
        raw = channel.unary_unary("/tuneserve.v1.Inference/Classify",
                                  request_serializer=lambda b: b,
                                  response_deserializer=pb.ClassifyResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid tuneserve.v1.ClassifyRequest" in err.value.details()


def test_auth_health_and_reflection(served):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    served["make"](Tokens.from_values(API, None))
    with _client(served["port"]) as anonymous:
        code, details = _code(lambda: anonymous.classify("m", ["x"]))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization" in details
        assert anonymous.health() == "SERVING"  # probes send no token
    with _client(served["port"], token=API) as client:
        assert client.classify("m", ["x"]).results[0].label == "pos"
    with grpc.insecure_channel(f"127.0.0.1:{served['port']}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="other"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        if hasattr(health, "List"):  # newer grpc.health.v1: not implemented here
            with pytest.raises(grpc.RpcError) as err:
                health.List(health_pb2.HealthListRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=10))
        names = {s.name for s in answer.list_services_response.service}
        assert {"tuneserve.v1.Inference", "grpc.health.v1.Health"} <= names
        assert "tuneserve.v1.Admin" not in names  # on the admin port only


def test_replicas_share_the_port_and_a_taken_port_is_a_clear_error(served):
    served["make"]()
    served["make"]()  # a second replica on the same node binds the same port
    with _client(served["port"]) as client:
        assert client.classify("m", ["x"]).version == "v1"
    with socket.socket() as held:  # a program of another kind holds this one
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(ConfigError, match="'grpc_port'.*cannot listen on 127.0.0.1"):
            served["make"](port=held.getsockname()[1])


def test_a_client_with_several_connections_reaches_every_replica_on_the_port(served):
    """The kernel gives each connection to one replica sharing the port: a client
    reaches more than one replica only with more than one connection
    (Client(connections=N)), and each Client has connections of its own."""
    first, second = Model(), Model()
    served["make"](model=first)
    served["make"](model=second)
    with _client(served["port"]) as one, \
            Client(f"127.0.0.1:{served['port']}", timeout_s=10, connections=16) as many:
        assert len(many.channels) == 16
        for _ in range(32):
            one.classify("m", ["x"])
        # one connection: one replica took every call
        assert sorted([first.classified, second.classified]) == [0, 32]
        first.classified = second.classified = 0
        for _ in range(64):
            many.classify("m", ["x"])
        # 16 connections in turn: both replicas (all 16 on one: p = 2 ** -15)
        assert first.classified > 0 and second.classified > 0
        assert first.classified + second.classified == 64
        assert [c.text for c in many.generate_stream("g", "a b")] == ["a", "b"]
    with pytest.raises(ValueError, match="connections must be an integer >= 1"):
        Client("127.0.0.1:1", connections=0)


def test_shutdown_lets_calls_in_flight_finish_and_refuses_new_ones(served):
    ingress = served["make"]()
    model = served["model"]
    with _client(served["port"]) as client:
        pending = client.inference.Classify.future(
            pb.ClassifyRequest(model="m", texts=["slow"]), timeout=30)
        assert model.started.wait(10)
        stopping = asyncio.run_coroutine_threadsafe(ingress.__del__(), served["loop"].loop)

        def refused() -> bool:
            try:
                with _client(served["port"]) as other:
                    other.classify("m", ["x"])
                return False
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAVAILABLE

        deadline = time.monotonic() + 10
        while not refused():
            assert time.monotonic() < deadline, "new calls still accepted while stopping"
        assert not stopping.done()
        served["loop"].loop.call_soon_threadsafe(model.release.set)
        assert pending.result(10).results[0].label == "pos"
        stopping.result(10)
    assert ingress.__del__() is None  # stopped once: nothing more to await


def test_replica_grpc_settings():
    cfg = ServeConfig(replica_grpc=True, grpc_port=9100, host="127.0.0.1").validate()
    assert cfg.replica_grpc_server() == {"host": "127.0.0.1", "port": 9100,
                                         "max_receive_bytes": 2 * cfg.limits.max_request_bytes,
                                         "bounds": cfg.bounds()}
    assert ServeConfig().replica_grpc_server() is None
    assert ServeConfig(replica_grpc=True, colocate=True, num_replicas=3).validate()
    with pytest.raises(ConfigError, match="'replica_grpc'.*choose one"):
        ServeConfig(replica_grpc=True, direct_ingress=True).validate()
    for colocate in (False, True):  # the models, or the colocated ingress, autoscale
        assert ServeConfig(replica_grpc=True, colocate=colocate, max_replicas=3).validate()


def test_a_server_that_failed_to_start_fails_the_health_check(served):
    ingress = served["make"]()

    async def broken_start():
        raise RuntimeError("no completion queue")

    async def scenario():
        await ingress.check_health()  # running: healthy
        ingress._grpc_server.server.start = broken_start
        ingress._grpc_server.start()
        with pytest.raises(RuntimeError):
            await ingress._grpc_server._started
        with pytest.raises(RuntimeError, match="failed to start: no completion queue"):
            await ingress.check_health()

    served["loop"].call(scenario)


def test_a_colocated_replica_listens_only_once_its_models_are_loaded(tmp_path, monkeypatch):
    """While a colocated replica loads its models, its port is not bound, so the kernel
    gives a shared port's new connections to the replicas already serving."""
    from services.serving import colocated

    loaded = asyncio.Event()

    class Loading(Model):
        def __init__(self, **kwargs):
            super().__init__()

        async def reconfigure(self, user_config):
            await loaded.wait()  # the first reconfigure loads the model

        async def check_health(self):
            pass

    monkeypatch.setattr(colocated, "model_classes", lambda: {"classification": Loading})
    (tmp_path / "registry").mkdir()
    loop, port = LoopThread(), free_port()

    def connects() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    async def build():
        return colocated.ColocatedIngress(
            str(tmp_path / "registry"), {"m": {"task": "classification", "kwargs": {}}},
            {"m": "classification"}, board=Board(),
            grpc_server={"host": "127.0.0.1", "port": port, "max_receive_bytes": 8192})

    try:
        ingress = loop.call(build)
        starting = asyncio.run_coroutine_threadsafe(ingress.reconfigure({}), loop.loop)
        assert ingress._grpc_server is None and not connects()
        loop.loop.call_soon_threadsafe(loaded.set)
        starting.result(10)
        with _client(port) as client:
            assert client.classify("m", ["x"]).version == "v1"
        loop.call(ingress.check_health)  # started once: health only checks it
        assert ingress._grpc_server is not None
    finally:
        if "ingress" in locals() and ingress._grpc_server is not None:
            loop.call(lambda: ingress.__del__() or asyncio.sleep(0))
        loop.close()


def test_calls_ended_by_a_deadline_or_the_client_are_not_counted_ok(served, monkeypatch):
    """requests_total: a call whose deadline passes in the model is DEADLINE_EXCEEDED,
    a stream the client drops CANCELLED, never OK."""
    from services.core import metrics

    counted: list[tuple[str, str]] = []
    real_inc = metrics.inc

    def inc(name, value=1.0, **tags):
        if name == "tuneserve_requests_total":
            counted.append((tags["method"], tags["code"]))
        real_inc(name, value, **tags)

    monkeypatch.setattr(metrics, "inc", inc)
    served["make"]()
    model = served["model"]

    def wait_for(entry):
        deadline = time.monotonic() + 10
        while entry not in counted:
            assert time.monotonic() < deadline, counted
            time.sleep(0.02)

    with _client(served["port"]) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.inference.Classify(pb.ClassifyRequest(model="m", texts=["slow"]),
                                      timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(("Classify", "DEADLINE_EXCEEDED"))
        served["loop"].loop.call_soon_threadsafe(model.release.set)
        stream = client.inference.GenerateStream(pb.GenerateRequest(model="g",
                                                                     prompt="a hold c"))
        assert next(stream).text == "a"
        stream.cancel()
        wait_for(("GenerateStream", "CANCELLED"))
    assert ("Classify", "OK") not in counted and ("GenerateStream", "OK") not in counted


def test_calls_in_flight_are_counted_for_the_autoscaler(served):
    """What a colocated replica reports to Serve's autoscaler: the calls its own server
    is answering now, unary and streams alike; health (a Watch stays open) is not load."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ingress = served["make"]()
    in_flight = ingress._grpc_server.in_flight
    model = served["model"]
    with _client(served["port"]) as client:
        assert client.classify("m", ["x"]).version == "v1" and in_flight.calls == 0
        slow = client.inference.Classify.future(pb.ClassifyRequest(model="m", texts=["slow"]),
                                                timeout=30)
        stream = client.generate_stream("g", "a hold b")
        assert next(stream).text == "a"
        watch = health_pb2_grpc.HealthStub(client.channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert model.started.wait(10)
        assert poll_until(lambda: in_flight.calls == 2, timeout_s=10), in_flight.calls
        served["loop"].loop.call_soon_threadsafe(model.release.set)
        served["loop"].loop.call_soon_threadsafe(model.hold.set)
        assert slow.result(10).results[0].label == "pos"
        assert [c.text for c in stream] == ["hold", "b"]
        assert poll_until(lambda: in_flight.calls == 0, timeout_s=10), in_flight.calls
        watch.cancel()


def test_the_autoscaling_policy_adds_the_own_servers_calls():
    from types import SimpleNamespace

    from services.serving.autoscale import OWN_CALLS, own_servers_policy

    def ctx(running, seen, own, target=2.0):
        return SimpleNamespace(
            current_num_replicas=running, target_num_replicas=running,
            total_num_requests=seen, aggregated_metrics={OWN_CALLS: own},
            config=SimpleNamespace(get_target_ongoing_requests=lambda: target))

    # 2 replicas, each answering 4 calls on its own server, target 2: 4 replicas
    assert own_servers_policy(ctx(2, 0, {"r1": 4.0, "r2": 4.0}))[0] == 4
    # plus what Serve saw itself (its proxy / handles)
    assert own_servers_policy(ctx(2, 2, {"r1": 1.0, "r2": 1.0}))[0] == 2
    assert own_servers_policy(ctx(3, 0, {}))[0] == 0  # idle: Serve's bounds keep min
    assert own_servers_policy(ctx(0, 0, {}))[0] == 0  # nothing running: Serve's target
