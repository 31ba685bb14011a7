"""A classifier replica swapping versions does not wait for the new version's
TorchScript trace: it answers with the new version run by the model itself, and
with its trace once that is built and checked. The first version is traced before
it serves. The real Classifier over a registry of a tiny BERT, without Ray; the
trace is held back by a gate so that the order is certain."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from services.core.registry import Registry
from services.serving import classifier as classifier_module
from services.serving import follower as follower_module
from services.serving.classifier import Classifier
from tests.helpers import publish_toy_classifier


@pytest.fixture
def outside_serve(monkeypatch):
    monkeypatch.setattr(follower_module.serve, "get_replica_context", lambda: None)


async def _until(predicate, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_a_swap_serves_before_its_trace_then_runs_the_trace(
        tiny_model_dir, tmp_path, monkeypatch, outside_serve):
    reg = publish_toy_classifier(tiny_model_dir, tmp_path)
    manifest = {k: v for k, v in reg.manifest("toy", "v1").items()
                if k not in ("files", "version", "name", "created_at")}
    reg.publish("toy", reg.local_copy("toy", "v1"), manifest)
    gate = threading.Event()
    traced_versions = []
    real_trace = classifier_module.trace_classifier

    def gated_trace(loaded, what):
        gate.wait(60)
        traced_versions.append(loaded.version)
        return real_trace(loaded, what)

    async def scenario():
        model = Classifier(reg.uri, "toy", poll_interval_s=600, threads=1)
        await model.reconfigure({})
        assert (model.current.version, model.current.runtime) == ("v1", "torchscript")
        monkeypatch.setattr(classifier_module, "trace_classifier", gated_trace)
        await asyncio.to_thread(Registry(reg.uri).set_channel, "toy", "production", "v2")
        model._wake.set()
        await _until(lambda: model.current.version == "v2")
        assert (model.current.runtime, model.current.traced) == ("eager", None)
        eager = await model.classify(["a superb film"])
        assert eager["version"] == "v2"
        gate.set()
        await _until(lambda: model.current.runtime == "torchscript")
        assert traced_versions == ["v2"] and model.current.traced is not None
        traced = await model.classify(["a superb film"])
        assert traced["version"] == "v2"
        assert traced["results"][0]["label"] == eager["results"][0]["label"]
        assert abs(traced["results"][0]["score"] - eager["results"][0]["score"]) < 1e-4
        model._follower.cancel()

    asyncio.run(scenario())
