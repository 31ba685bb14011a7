"""Serving metrics by model version (issue 30, point 2).

The ingress labels each request with the version that answered it, through a real
InferenceIngress served by its own gRPC server on a real port (as in
test_replica_grpc.py) over a fake model that answers v1, or v2 when asked; the model
replicas' batch sizes are counted per version; and the canary-regression alerts of
k8s/monitoring fire, under `promtool test rules`, on a candidate that errs more or
answers slower than production, and on nothing else. The same labels through Ray's
exporter and a real Prometheus: tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from services.client import Client
from services.core import metrics
from services.core.errors import ModelNotFound
from services.core.net import free_port
from services.serving.batching import observe_batch
from services.serving.colocated import LocalModel

RULES = Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "prometheus-rules.yaml"
KNOWN = ("v1", "v2")


class TwoVersions:
    """A classifier and generator with versions v1 (the default) and v2; "boom" fails
    on whichever version runs it."""

    async def classify(self, texts, version=None, routing_key=None):
        version = version or "v1"
        if version not in KNOWN:
            raise ModelNotFound(f"model 'm' has no version '{version}'")
        if "boom" in texts:
            raise RuntimeError("the model broke")
        return {"version": version, "results": [
            {"label": "pos", "score": 1.0, "scores": [("pos", 1.0)]} for _ in texts]}

    async def generate(self, prompt, params, version=None, routing_key=None):
        return {"text": prompt, "prompt_tokens": 1, "completion_tokens": 1,
                "finish_reason": "length", "version": version or "v1"}

    async def generate_stream(self, prompt, params, version=None, routing_key=None):
        for word in prompt.split():
            yield {"text": word, "prompt_tokens": 1, "completion_tokens": 1,
                   "finish_reason": None, "version": version or "v2"}


class Board:
    class _Get:
        async def remote(self):
            return {"m": [{"replica": "r1", "version": "v1"}],
                    "g": [{"replica": "r1", "version": "v1"}]}

    get = _Get()


@pytest.fixture
def recorded(monkeypatch):
    """(metric name, tags) of every request count and latency the ingress records."""
    seen: list[tuple[str, dict]] = []
    real_inc, real_observe = metrics.inc, metrics.observe

    def inc(name, value=1.0, **tags):
        seen.append((name, tags))
        real_inc(name, value, **tags)

    def observe(name, value, **tags):
        seen.append((name, tags))
        real_observe(name, value, **tags)

    monkeypatch.setattr(metrics, "inc", inc)
    monkeypatch.setattr(metrics, "observe", observe)
    return seen


@pytest.fixture
def port(tmp_path):
    from services.serving.ingress import InferenceIngress

    (tmp_path / "registry").mkdir()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    number = free_port()

    async def build():
        model = LocalModel(TwoVersions())
        return InferenceIngress(
            str(tmp_path / "registry"), {"m": model, "g": model},
            {"m": "classification", "g": "generation"}, board=Board(),
            grpc_server={"host": "127.0.0.1", "port": number, "max_receive_bytes": 8192})

    ingress = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
    yield number
    asyncio.run_coroutine_threadsafe(ingress.__del__() or asyncio.sleep(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _requests(seen) -> list[tuple[str, str, str, str]]:
    return [(t["method"], t["code"], t["model"], t["version"])
            for name, t in seen if name == "tuneserve_requests_total"]


def _wait_for(seen, entry):
    deadline = time.monotonic() + 10
    while entry not in _requests(seen):  # a stream is counted after its last chunk
        assert time.monotonic() < deadline, _requests(seen)
        time.sleep(0.02)


def test_requests_are_counted_under_the_version_that_answered(port, recorded):
    with Client(f"127.0.0.1:{port}", timeout_s=10) as client:
        assert client.classify("m", ["a"]).version == "v1"
        assert client.classify("m", ["a"], version="v2").version == "v2"
        with pytest.raises(grpc.RpcError) as err:  # v2 has answered: it gets the error
            client.classify("m", ["boom"], version="v2")
        assert err.value.code() == grpc.StatusCode.INTERNAL
        for bad in ("v7", "v999"):  # never answered: no series of their own
            with pytest.raises(grpc.RpcError):
                client.classify("m", ["a"], version=bad)
        with pytest.raises(grpc.RpcError):
            client.classify("nope", ["a"], version="v1")
        assert client.generate("g", "hi").version == "v1"
        assert [c.version for c in client.generate_stream("g", "a b")] == ["v2", "v2"]
        client.list_models()
    _wait_for(recorded, ("GenerateStream", "OK", "g", "v2"))
    assert _requests(recorded) == [
        ("Classify", "OK", "m", "v1"), ("Classify", "OK", "m", "v2"),
        ("Classify", "INTERNAL", "m", "v2"),
        ("Classify", "NOT_FOUND", "m", "-"), ("Classify", "NOT_FOUND", "m", "-"),
        ("Classify", "NOT_FOUND", "-", "-"),
        ("Generate", "OK", "g", "v1"), ("GenerateStream", "OK", "g", "v2"),
        ("ListModels", "OK", "-", "-")]
    latencies = [(t["method"], t["version"]) for name, t in recorded
                 if name == "tuneserve_request_duration_seconds"]
    assert latencies[:3] == [("Classify", "v1"), ("Classify", "v2"), ("Classify", "v2")]


def test_a_batch_is_counted_once_per_version_in_it(monkeypatch):
    observed = []
    monkeypatch.setattr(metrics, "observe", lambda name, value, **tags: observed.append(
        (name, value, tags["model"], tags["version"])))
    observe_batch("m", ["v1", "v2", "v1", "v1"])
    assert sorted(observed) == [("tuneserve_batch_size", 1, "m", "v2"),
                                ("tuneserve_batch_size", 3, "m", "v1")]


# ---- the canary-regression alerts ------------------------------------------------------
SERVER_SIDE = "INTERNAL"


def _series(name: str, values: str, **labels: str) -> dict:
    labels = {"WorkerId": "w1", "Component": "core_worker", **labels}
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def _traffic(model: str, version: str, ok: int, failed: int, fast: bool) -> list[dict]:
    """Per-minute Classify counts and latency buckets of one version."""
    req, lat = "ray_tuneserve_requests_total", "ray_tuneserve_request_duration_seconds_bucket"
    total = ok + failed
    buckets = [("0.05", total), ("1.0", total), ("2.5", total), ("+Inf", total)] if fast \
        else [("0.05", 0), ("1.0", 0), ("2.5", total), ("+Inf", total)]
    tags = {"model": model, "version": version, "method": "Classify"}
    out = [_series(req, f"0+{ok}x40", code="OK", **tags)]
    if failed:
        out.append(_series(req, f"0+{failed}x40", code=SERVER_SIDE, **tags))
    out += [_series(lat, f"0+{n}x40", le=le, **tags) for le, n in buckets]
    return out


def _expect(alert: str, eval_time: str, *fired: dict) -> dict:
    rule = next(r for g in yaml.safe_load(RULES.read_text())["spec"]["groups"]
                for r in g["rules"] if r.get("alert") == alert)
    return {"eval_time": eval_time, "alertname": alert,
            "exp_alerts": [{"exp_labels": {**rule["labels"], **f}} for f in fired]}


def test_canary_alerts_fire_on_the_worse_version_only(tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed (Debian package `prometheus`; .ci/run "
                    "installs it)")
    groups = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    series = [
        # toy: production v1 0.5% errors and fast; candidate v2 9% errors and slow.
        *_traffic("toy", "v1", 995, 5, fast=True),
        *_traffic("toy", "v2", 91, 9, fast=False),
        # good: two versions, same error ratio, both fast.
        *_traffic("good", "v1", 990, 10, fast=True),
        *_traffic("good", "v2", 99, 1, fast=True),
        # rare: a candidate that failed and was slow on too few requests to judge.
        *_traffic("rare", "v1", 1000, 0, fast=True),
        _series("ray_tuneserve_requests_total", "0+0.2x40", model="rare", version="v2",
                method="Classify", code=SERVER_SIDE),
        # one version only, erring a lot: TuneserveHighErrorRatio's business, not these.
        *_traffic("solo", "v1", 50, 50, fast=True),
        # a candidate whose failures production answered (fallbacks): none reach a
        # client, yet 9 % of its requests failed.
        *_traffic("fb", "v1", 1000, 0, fast=True),
        *_traffic("fb", "v2", 91, 0, fast=True),
        _series("ray_tuneserve_canary_fallbacks_total", "0+9x40", model="fb", version="v2"),
    ]
    bad = {"model": "toy", "version": "v2"}
    tests = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": series, "alert_rule_test": [
            _expect("TuneserveCanaryErrorRatio", "3m"),  # not yet: `for: 5m`
            _expect("TuneserveCanaryErrorRatio", "20m", bad, {"model": "fb", "version": "v2"}),
            _expect("TuneserveCanaryLatency", "20m", {**bad, "method": "Classify"}),
        ]}]}
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    proc = subprocess.run([promtool, "test", "rules", "tests.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_the_generator_labels_batches_tokens_and_first_tokens_by_version(
        batching, tmp_path, monkeypatch):
    """Both batching paths of the Generator deployment, in-process over a tiny engine
    (as in test_generator_batching.py), record with the version that generated."""
    from tests.helpers import build_bpe_tokenizer
    from tests.unit.test_continuous import PROMPTS, _engine
    from tests.unit.test_generator_batching import _serve

    seen: list[tuple[str, dict]] = []
    monkeypatch.setattr(metrics, "observe", lambda name, value, **tags: seen.append(
        (name, tags)))
    monkeypatch.setattr(metrics, "inc", lambda name, value=1.0, **tags: seen.append(
        (name, tags)))
    tokenizer = build_bpe_tokenizer(PROMPTS * 3 + ["Q: A: the a of and to in"])
    gen = _serve(_engine("gpt2", tokenizer), tmp_path, batching=batching)

    async def calls():
        return await asyncio.gather(*(gen.generate(p, {"max_new_tokens": 3,
                                                       "ignore_eos": True})
                                      for p in PROMPTS[:3]))

    assert {a["version"] for a in asyncio.run(calls())} == {"v1"}
    names = {"tuneserve_batch_size", "tuneserve_generated_tokens_total",
             "tuneserve_time_to_first_token_seconds"}
    recorded = {(name, tags["model"], tags["version"]) for name, tags in seen
                if name in names}
    assert recorded == {(name, "gen", "v1") for name in names}


def test_a_replica_exports_the_canary_share_it_routes(tmp_path, monkeypatch):
    """tuneserve_canary_percent follows the share a replica routes to the candidate it
    holds, and drops to 0 when the canary ends."""
    from tests.unit.test_generator_batching import _InProcess

    gauges: list[tuple[float, str]] = []
    monkeypatch.setattr(metrics, "set_gauge", lambda name, value, **tags: gauges.append(
        (value, tags["version"])) if name == "tuneserve_canary_percent" else None)
    gen = _InProcess(None, tmp_path)

    class Loaded:
        version = "v2"

    gen.candidate, gen.canary = Loaded(), {"version": "v2", "percent": 5.0}
    gen._export_share()
    gen.canary = {"version": "v2", "percent": 25.0}  # the rollout's next step
    gen._export_share()
    gen.canary, gen.candidate = None, None  # aborted or promoted
    gen._export_share()
    gen._export_share()
    assert gauges == [(5.0, "v2"), (25.0, "v2"), (0, "v2")]
