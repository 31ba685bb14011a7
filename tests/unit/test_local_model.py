"""The colocated ingress's pieces without Ray: LocalModel (called like a DeploymentHandle)
and the forwarding of Serve's user_config and health checks to the local models."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.core.config import ServeConfig
from services.core.errors import ConfigError, ModelNotFound
from services.serving import colocated
from services.serving.colocated import ColocatedIngress, LocalModel


class Toy:
    def __init__(self):
        self.closed = False
        self.yielded = 0

    async def classify(self, texts, version=None):
        if version == "v9":
            raise ModelNotFound("model 'toy' has no version 'v9'")
        return {"version": "v1", "texts": list(texts)}

    async def generate_stream(self, n):
        try:
            for i in range(n):
                self.yielded += 1
                yield i
                await asyncio.sleep(0)
        finally:
            self.closed = True


def test_local_model_calls_like_a_handle():
    async def scenario():
        toy = Toy()
        model = LocalModel(toy)
        assert await model.classify.remote(["a", "b"]) == {"version": "v1", "texts": ["a", "b"]}
        with pytest.raises(ModelNotFound, match="v9"):  # the domain error, unwrapped
            await model.classify.remote(["a"], "v9")
        stream = model.options(stream=True).generate_stream.remote(3)
        assert [i async for i in stream] == [0, 1, 2]
        assert toy.closed

    asyncio.run(scenario())


def test_an_abandoned_stream_is_closed_by_cancel():
    async def scenario():
        toy = Toy()
        stream = LocalModel(toy).options(stream=True).generate_stream.remote(1000)
        async for i in stream:
            if i == 2:
                break
        stream.cancel()
        for _ in range(10):
            await asyncio.sleep(0)
            if toy.closed:
                break
        assert toy.closed and toy.yielded == 3

    asyncio.run(scenario())


def test_private_names_are_not_forwarded():
    with pytest.raises(AttributeError):
        LocalModel(Toy())._secret  # noqa: B018


class Recorder:
    """Stands in for Classifier/Generator: records what the ingress forwards."""

    instances: list["Recorder"] = []

    def __init__(self, registry, name, board=None, **kwargs):
        self.name, self.board, self.kwargs = name, board, kwargs
        self.configs: list[dict] = []
        self.healthy = True
        Recorder.instances.append(self)

    async def reconfigure(self, user_config):
        self.configs.append(user_config)

    async def check_health(self):
        if not self.healthy:
            raise RuntimeError("registry follower stopped")

    async def status(self):
        return {"name": self.name, "configs": len(self.configs)}


def test_user_config_and_health_reach_every_model(tmp_path, monkeypatch, caplog):
    Recorder.instances = []
    monkeypatch.setattr(colocated, "model_classes",
                        lambda: {"classification": Recorder, "generation": Recorder})
    board = object()
    specs = {"toy": {"task": "classification",
                     "kwargs": {"registry": str(tmp_path), "name": "toy", "threads": 1}},
             "gen": {"task": "generation",
                     "kwargs": {"registry": str(tmp_path), "name": "gen", "threads": 1}}}
    ingress = ColocatedIngress(str(tmp_path), specs, {"toy": "classification",
                                                      "gen": "generation"}, board=board)
    toy, gen = Recorder.instances
    assert (toy.name, gen.name) == ("toy", "gen") and toy.board is board
    assert toy.kwargs == {"threads": 1}
    assert set(ingress.handles) == {"toy", "gen"}

    async def scenario():
        await ingress.reconfigure({"channel": "canary", "pinned_versions": {"gen": "v2"},
                                   "poll_interval_s": 0.5})
        assert toy.configs[-1] == {"channel": "canary", "poll_interval_s": 0.5,
                                   "pinned_version": None}
        assert gen.configs[-1] == {"channel": "canary", "poll_interval_s": 0.5,
                                   "pinned_version": "v2"}
        await ingress.reconfigure({"pinned_versions": "v2"})  # not a mapping: no pins
        assert gen.configs[-1] == {"pinned_version": None}
        with caplog.at_level(logging.WARNING, logger="ray.serve"):
            await ingress.reconfigure({"pinned_versions": {"tyop": "v1", "gen": "v3"}})
        assert gen.configs[-1] == {"pinned_version": "v3"}
        assert "tyop not served here" in caplog.text
        assert await ingress.model_status("gen") == {"name": "gen", "configs": 3}
        with pytest.raises(ModelNotFound, match="'tyop' is not served here"):
            await ingress.model_status("tyop")
        await ingress.check_health()
        gen.healthy = False
        with pytest.raises(RuntimeError, match="follower"):
            await ingress.check_health()

    asyncio.run(scenario())


def test_colocate_settings():
    cfg = ServeConfig(colocate=True)
    assert cfg.validate() is cfg
    assert cfg.coalescing("classification") is None  # in-process: nothing to coalesce
    assert ServeConfig(colocate=True, num_replicas=3).validate()
    assert ServeConfig(colocate=True, max_replicas=3).validate()
    assert ServeConfig(colocate=True, direct_ingress=True).validate()
    for bad in ({"num_replicas": 2}, {"max_replicas": 2}):
        with pytest.raises(ConfigError, match="'colocate'.*one replica"):
            ServeConfig(colocate=True, direct_ingress=True, **bad).validate()


def test_models_in_one_process_load_one_at_a_time(tmp_path):
    """Two models' loads never overlap in one process (transformers' lazy imports fail
    when two threads import model classes at once)."""
    import threading
    import time
    from types import SimpleNamespace

    from services.serving.follower import RegistryFollower

    running, peak, lock = [0], [0], threading.Lock()

    class Slow(RegistryFollower):
        def _load_version(self, version):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            return SimpleNamespace(version=version)

    async def scenario():
        a, b = Slow(str(tmp_path), "a"), Slow(str(tmp_path), "b")
        loaded = await asyncio.gather(a._get_or_load("v1"), b._get_or_load("v1"),
                                      a._get_or_load("v2"))
        assert [m.version for m in loaded] == ["v1", "v1", "v2"]

    asyncio.run(scenario())
    assert peak == [1]


def test_access_log_setting():
    assert ServeConfig().deployment_logging() == {}
    assert ServeConfig(access_log=False).deployment_logging() == \
        {"logging_config": {"enable_access_log": False}}
