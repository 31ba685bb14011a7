"""A model replica during a canary, without Ray: the real Classifier deployment class
following a real registry holding two versions of a tiny BERT. Its share of the
requests, sticky routing keys, an explicit version, the fallback to production when
the candidate fails, abort and promote."""

from __future__ import annotations

import asyncio
import collections
import json

import pytest

from services.core.errors import InvalidInput
from services.core.registry import Registry
from services.runtime import classifier as runtime
from services.serving import follower as follower_module
from services.serving.classifier import Classifier
from services.serving.generator import Generator
from services.serving.follower import falls_back, routing_point
from tests.helpers import build_tiny_bert, toy_sentiment_rows

NAME = "toy"
TEXTS = [t for t, _ in toy_sentiment_rows(200)]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """v1 (production) and v2, the same tiny BERT, and v3 with a damaged weight file."""
    root = tmp_path_factory.mktemp("canary")
    folder = build_tiny_bert(root / "ck", TEXTS[:50])
    config = json.loads((folder / "config.json").read_text())
    config.update(id2label={"0": "neg", "1": "pos"}, label2id={"neg": 0, "pos": 1})
    (folder / "config.json").write_text(json.dumps(config))
    reg = Registry(root / "registry")
    manifest = {"task": "classification", "labels": ["neg", "pos"]}
    for _ in range(3):
        reg.publish(NAME, folder, manifest)
    weights = root / "registry" / NAME / "v3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    return reg


@pytest.fixture(autouse=True)
def outside_serve(monkeypatch):
    """No Serve replica context here: status() names no replica."""
    monkeypatch.setattr(follower_module.serve, "get_replica_context", lambda: None)


@pytest.fixture
def fallbacks(monkeypatch):
    """Every tuneserve_canary_fallbacks_total increment: version -> count."""
    seen: collections.Counter = collections.Counter()
    real_inc = follower_module.metrics.inc

    def inc(name, value=1.0, **tags):
        if name == "tuneserve_canary_fallbacks_total":
            seen[tags["version"]] += value
        real_inc(name, value, **tags)

    monkeypatch.setattr(follower_module.metrics, "inc", inc)
    return seen


async def replica(reg: Registry) -> Classifier:
    model = Classifier(reg.uri, NAME, poll_interval_s=0.1, trace=False, max_batch_size=16)
    await model.reconfigure({})
    assert model.current.version == "v1"
    return model


async def follows(model: Classifier, predicate, timeout_s: float = 30.0) -> None:
    """Wait (polling) until the replica's follower made `predicate` true."""
    model._wake.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, await model.status()
        await asyncio.sleep(0.05)


async def versions_of(model: Classifier, n: int, **kw) -> collections.Counter:
    """Which version answered each of n one-text calls (50 at a time, so they batch)."""
    counts: collections.Counter = collections.Counter()
    for start in range(0, n, 50):
        answers = await asyncio.gather(*(model.classify([TEXTS[i % len(TEXTS)]], **kw)
                                         for i in range(start, min(n, start + 50))))
        counts.update(a["version"] for a in answers)
    return counts


def test_routing_points_are_stable_and_spread():
    assert routing_point("user-7") == routing_point("user-7")
    points = [routing_point(f"user-{i}") for i in range(4000)]
    assert all(0 <= p < 100 for p in points)
    assert 0.08 < sum(p < 10 for p in points) / len(points) < 0.12
    assert falls_back(RuntimeError()) and not falls_back(InvalidInput("texts[0]: empty"))


def test_share_sticky_keys_and_explicit_version(registry):
    async def scenario():
        model = await replica(registry)
        registry.start_canary(NAME, "v2", 10)
        try:
            await follows(model, lambda: model.candidate is not None)
            counts = await versions_of(model, 2000)
            assert set(counts) == {"v1", "v2"}
            assert 0.07 <= counts["v2"] / 2000 <= 0.13, counts
            keys = [f"session-{i}" for i in range(60)]
            first = {k: (await model.classify(["fine"], routing_key=k))["version"]
                     for k in keys}
            for _ in range(3):
                again = await asyncio.gather(*(model.classify(["fine"], routing_key=k)
                                               for k in keys))
                assert [a["version"] for a in again] == [first[k] for k in keys]
            # raising the share keeps every candidate key on the candidate
            registry.set_canary_share(NAME, 60)
            await follows(model, lambda: model.canary["percent"] == 60)
            later = {k: (await model.classify(["fine"], routing_key=k))["version"]
                     for k in keys}
            assert all(later[k] == "v2" for k in keys if first[k] == "v2")
            assert sum(v == "v2" for v in later.values()) > sum(
                v == "v2" for v in first.values())
            # a request naming a version gets that version, whatever the share
            registry.set_canary_share(NAME, 100)
            await follows(model, lambda: model.canary["percent"] == 100)
            assert await versions_of(model, 50, version="v1") == {"v1": 50}
            assert await versions_of(model, 50) == {"v2": 50}
            status = await model.status()
            assert status["canary"] == {"version": "v2", "percent": 100.0, "loaded": True}
        finally:
            registry.abort_canary(NAME)
        await follows(model, lambda: model.candidate is None)
        assert await versions_of(model, 100) == {"v1": 100}

    asyncio.run(scenario())


def test_a_failing_candidate_costs_clients_nothing(registry, monkeypatch, fallbacks):
    """The candidate raises on about a tenth of its batches (those whose first input
    is one of a tenth of the inputs, so that the share does not grow with the batches
    the calls happen to form): every call is answered (production answers those),
    each one counted against the candidate."""
    real = runtime.run_encoded
    failed = collections.Counter()
    armed = []  # from when the candidate serves: its load's smoke test must pass

    def flaky(loaded, enc, *args, **kwargs):
        if armed and loaded.version == "v2" and \
                sum(enc["input_ids"][0]) % 10 == 0:
            failed["batches"] += 1
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(loaded, enc, *args, **kwargs)

    monkeypatch.setattr(runtime, "run_encoded", flaky)

    async def scenario():
        model = await replica(registry)
        registry.start_canary(NAME, "v2", 50)
        try:
            await follows(model, lambda: model.candidate is not None)
            armed.append(True)
            counts = await versions_of(model, 400)  # raises if any call failed
        finally:
            registry.abort_canary(NAME)
        assert sum(counts.values()) == 400 and counts["v2"] > 50, counts
        assert failed["batches"] > 0 and fallbacks["v2"] >= failed["batches"]
        assert counts["v1"] > 200 - 30  # production's half, and the ones it took over

    asyncio.run(scenario())


def test_a_candidate_that_fails_verification_gets_no_traffic(registry):
    async def scenario():
        model = await replica(registry)
        registry.start_canary(NAME, "v3", 50)
        try:
            await follows(model, lambda: "v3" in model.refused)
            assert await versions_of(model, 100) == {"v1": 100}
            assert (await model.status())["canary"]["loaded"] is False
        finally:
            registry.abort_canary(NAME)

    asyncio.run(scenario())


def test_promote_swaps_to_the_loaded_candidate(registry):
    async def scenario():
        model = await replica(registry)
        registry.start_canary(NAME, "v2", 30)
        await follows(model, lambda: model.candidate is not None)
        candidate = model.candidate
        registry.promote_canary(NAME, reason="test")
        try:
            await follows(model, lambda: model.current is candidate and model.canary is None)
            assert await versions_of(model, 100) == {"v2": 100}
            assert model.candidate is None
        finally:
            registry.rollback(NAME)
        await follows(model, lambda: model.current.version == "v1")

    asyncio.run(scenario())


def test_routing_key_is_passed_on_and_bounded():
    from services.core.config import ServeLimits
    from services.protocol import pb
    from services.serving.validation import validate_classify, validate_generate

    limits = ServeLimits()
    call = validate_classify(pb.ClassifyRequest(model="toy", texts=["x"], routing_key="u1"),
                             limits)
    assert call.routing_key == "u1"
    assert validate_generate(pb.GenerateRequest(model="g", prompt="p"), limits).routing_key \
        is None
    for request in (pb.ClassifyRequest(model="toy", texts=["x"], routing_key="k" * 257),
                    pb.GenerateRequest(model="g", prompt="p", routing_key="k" * 257)):
        with pytest.raises(InvalidInput, match="routing_key: 257 characters; the limit "
                                               "is 256"):
            (validate_classify if isinstance(request, pb.ClassifyRequest)
             else validate_generate)(request, limits)


class Stand:
    """A loaded version as far as routing cares."""

    def __init__(self, version: str):
        self.version = version


class FlakyGenerator(Generator):
    """The Generator's routing over stand-ins: v2 fails prompts starting "bad" before
    any text, and "late" ones after the first chunk."""

    async def _generate_on(self, loaded, prompt, params):
        if loaded.version == "v2" and prompt.startswith("bad"):
            raise RuntimeError("candidate broke")
        if prompt.startswith("invalid"):
            raise InvalidInput("prompt: too long")
        return {"text": prompt, "version": loaded.version}

    async def _stream_on(self, loaded, prompt, params):
        if loaded.version == "v2" and prompt.startswith("bad"):
            raise RuntimeError("candidate broke")
        yield {"text": "a", "version": loaded.version}
        if loaded.version == "v2" and prompt.startswith("late"):
            raise RuntimeError("candidate broke mid-stream")
        yield {"text": "b", "version": loaded.version}


def test_generator_falls_back_before_any_text_only(tmp_path, fallbacks):
    async def scenario():
        model = FlakyGenerator(str(tmp_path / "registry"), "gen")
        model._follower = asyncio.get_running_loop().create_future()  # no registry polls
        model.current, model.candidate = Stand("v1"), Stand("v2")
        model.canary = {"version": "v2", "percent": 100.0}

        async def stream(prompt, **kw):
            return [c["version"] async for c in model.generate_stream(prompt, {}, **kw)]

        assert (await model.generate("ok", {}))["version"] == "v2"
        assert (await model.generate("bad", {}))["version"] == "v1"
        assert await stream("ok") == ["v2", "v2"] and await stream("bad") == ["v1", "v1"]
        assert fallbacks == {"v2": 2}
        with pytest.raises(RuntimeError, match="mid-stream"):  # text was sent: no retry
            await stream("late")
        with pytest.raises(RuntimeError):  # an explicit version is never replaced
            await model.generate("bad", {}, version="v2")
        with pytest.raises(InvalidInput):  # the request's own mistake is not retried
            await model.generate("invalid", {})
        assert fallbacks == {"v2": 2}
        model.canary = {"version": "v2", "percent": 0.0}
        assert await stream("bad", routing_key="k") == ["v1", "v1"]

    asyncio.run(scenario())


def test_a_replica_started_mid_canary_takes_its_share_at_once(registry):
    """Autoscaling or a restart during a rollout: the first reconfigure loads the
    candidate too, before Serve sends the replica any request."""
    async def scenario():
        registry.start_canary(NAME, "v2", 100)
        try:
            model = await replica(registry)
            assert model.candidate is not None and model.candidate.version == "v2"
            assert await versions_of(model, 20) == {"v2": 20}
        finally:
            registry.abort_canary(NAME)

    asyncio.run(scenario())


def test_an_unreadable_canary_file_never_stops_a_replica(registry):
    path = registry.backend.local_root / NAME / "canary.json"

    async def scenario():
        path.write_text("{not json")
        try:
            model = await replica(registry)  # starts, serving production
            assert "unreadable toy canary pointer" in model.last_error
            assert await versions_of(model, 10) == {"v1": 10}
        finally:
            path.unlink()

    asyncio.run(scenario())


def test_cli_passes_the_routing_key(monkeypatch, capsys):
    import services.client
    from services.cli import main
    from services.protocol import pb

    sent = []

    class Recorder:
        def __init__(self, address, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def classify(self, model, texts, version="", routing_key=""):
            sent.append(("classify", routing_key))
            return pb.ClassifyResponse(results=[pb.Classification(label="pos", score=1.0)],
                                       model=model, version="v2")

        def generate(self, model, prompt, **params):
            sent.append(("generate", params.get("routing_key")))
            return pb.GenerateResponse(text="hi", model=model, version="v2")

    monkeypatch.setattr(services.client, "Client", Recorder)
    assert main(["classify", "--model", "toy", "--routing-key", "user-7", "fine"]) == 0
    assert main(["generate", "--model", "gen", "--routing-key", "user-7", "hello"]) == 0
    assert main(["generate", "--model", "gen", "hello"]) == 0
    assert sent == [("classify", "user-7"), ("generate", "user-7"), ("generate", None)]
    assert "model toy v2" in capsys.readouterr().out
