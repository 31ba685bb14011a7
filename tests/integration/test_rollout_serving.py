"""From data to production through a real Ray Serve app (issue 30, points 3 and 6).

A Serve application of its own in the session cluster serves `rolled` v1 (production)
from a registry of its own. `tuneserve train ... --rollout canary` trains the tiny
BERT on the toy rows, publishes v2 beside v1 and rolls it out under light steady load:
the rollout reads the session node's Ray metrics endpoint, steps v2 through 25 % and
50 %, and promotes it. No client call fails, both versions answered during the
rollout, every replica then holds v2 alone, and the rollout's decisions are on the
metrics endpoint.
"""

from __future__ import annotations

import collections
import threading
import urllib.request

import pytest

from services.cli import main
from services.client import Client
from services.core.config import ServeConfig
from services.core.registry import Registry
from tests.helpers import copy_version, poll_until, second_app, server_port

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

APP = "tuneserve-rollout"
MODEL = "rolled"
TEXT = ["a lovely film with superb acting"]


@pytest.fixture(scope="module")
def rollout_app(server, trained, tmp_path_factory):
    registry = Registry(tmp_path_factory.mktemp("rollout") / "registry")
    copy_version(Registry(trained[0].registry), "toy", "v1", registry, MODEL)
    cfg = ServeConfig(registry=registry.uri, colocate=True, replica_cpus=0.5,
                      poll_interval_s=0.5, admin_port=server_port())
    with second_app(server, APP, cfg, token="") as client:
        yield client, registry


class Load:
    """Calls from `threads` clients, from the moment a canary runs until stopped: the
    version that answered each, and every failure."""

    def __init__(self, client: Client, registry: Registry, threads: int = 3):
        self.client, self.registry = client, registry
        self.versions: collections.Counter = collections.Counter()
        self.failures: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self.stop.is_set() and self.registry.canary(MODEL) is None:
            self.stop.wait(0.2)
        while not self.stop.is_set():
            try:
                version = self.client.classify(MODEL, TEXT).version
            except Exception as exc:  # noqa: BLE001 (every failure is the finding)
                with self._lock:
                    self.failures.append(repr(exc))
                continue
            with self._lock:
                self.versions[version] += 1

    def end(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


def _decisions(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ray_tuneserve_rollout_decisions_total" and \
                    sample.labels.get("model") == MODEL:
                key = sample.labels["decision"]
                out[key] = out.get(key, 0.0) + sample.value
    return out


def test_train_rolls_a_good_version_out_step_by_step_under_load(
        rollout_app, ray_cluster, tiny_model_dir, toy_csv, tmp_path, capsys):
    client, registry = rollout_app
    port = ray_cluster["metrics_port"]
    load = Load(client, registry)
    try:
        code = main([
            "train", "--model", str(tiny_model_dir), "--train", str(toy_csv),
            "--name", MODEL, "--registry", registry.uri, "--runs-dir", str(tmp_path / "runs"),
            "--workers", "1", "--epochs", "4", "--batch-size", "16",
            "--learning-rate", "2e-3", "--seed", "1",
            "--rollout", "canary", "--rollout-metrics-url", f"http://127.0.0.1:{port}/metrics",
            "--rollout-steps", "25,50", "--rollout-min-requests", "40",
            "--rollout-min-step-s", "1", "--rollout-poll-s", "1",
            # the steps are under test here, not latency: 40 calls of a loaded CI
            # machine make a p99 that one slow call decides
            "--rollout-p99-slack-s", "2",
            "--rollout-max-step-s", "120"])
    finally:
        load.end()
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"published {MODEL} v2 -> " in out
    assert "step 1 of 2: v2 at 25 %" in out and "step 2 of 2: v2 at 50 %" in out, out
    assert "promoted: v2 passed every step (25 % -> 50 % -> 100 %) against v1" in out
    assert load.failures == [], load.failures[:3]
    assert load.versions["v1"] > 0 and load.versions["v2"] > 0, load.versions
    assert registry.channel(MODEL) == "v2" and registry.canary(MODEL) is None
    history = registry.history(MODEL)
    assert [e["action"] for e in history][-3:] == [
        "canary-start", "canary-share", "canary-promote"]
    assert history[-1]["candidate_requests"] >= 40

    def one_version():
        (info,) = client.list_models(MODEL).models
        return (info.production_version, info.canary_version) == ("v2", "") and \
            info.replicas and all((r.version, r.canary_version) == ("v2", "")
                                  for r in info.replicas)

    assert poll_until(one_version, timeout_s=60), client.list_models(MODEL)
    answered = collections.Counter(client.classify(MODEL, TEXT).version for _ in range(20))
    assert answered == {"v2": 20}
    # Ray exports the driver's metrics every few seconds
    assert poll_until(lambda: _decisions(port) == {"step_passed": 2, "promoted": 1},
                      timeout_s=60), _decisions(port)
