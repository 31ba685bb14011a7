"""A bounded soak through Serve's real gRPC proxy on loopback: 32 concurrent clients send
a mix of valid and invalid requests for TUNESERVE_SOAK_S seconds (default 45; the
measured run in docs/reliability.md used 120).

Every request knows the status code it must get (docs/api.md's table); any other code
fails the test. The resident memory (RSS) of the model replicas and the ingress is
sampled every second by PID (psutil): after a warmup, the largest RSS of each
deployment's replicas in the last third of the run must stay within
max(10%, 50 MiB) of the largest in the first third. The test prints a summary: calls,
codes per kind, p50/p99 latency, RSS at the start and the end.

    TUNESERVE_SOAK_S=30 .venv/bin/pytest -s tests/integration/test_soak.py   # quicker
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time

import grpc
import pytest

from services.protocol import pb, pb_grpc
from services.serving.app import APP_NAME, model_deployment_name
from tests.conftest import GEN_MODEL
from tests.helpers import poll_until

SOAK_S = float(os.environ.get("TUNESERVE_SOAK_S", "45"))
CLIENTS = 32
CALL_TIMEOUT_S = 60.0
WARMUP_S = max(10.0, 0.2 * SOAK_S)
RSS_MARGIN_FRACTION = 0.10
RSS_MARGIN_MIB = 50.0
MiB = 2 ** 20

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SOAK_S) + 600)]

TEXT = "a lovely film with superb acting"


def _classify(**kw):
    return "Classify", pb.ClassifyRequest(**{"model": "toy", "texts": [TEXT] * 4, **kw})


def _generate(method="Generate", **kw):
    return method, pb.GenerateRequest(**{"model": GEN_MODEL, "prompt": "red cat",
                                         "max_new_tokens": 8, **kw})


# kind -> (weight, request maker, expected code); docs/api.md has the contract.
MIX = {
    "classify": (30, lambda: _classify(), "OK"),
    "classify_one_text": (5, lambda: _classify(texts=["dull"]), "OK"),
    "classify_empty_texts": (3, lambda: _classify(texts=[]), "INVALID_ARGUMENT"),
    "classify_blank_text": (3, lambda: _classify(texts=["fine", "   "]), "INVALID_ARGUMENT"),
    "classify_nul_text": (2, lambda: _classify(texts=["a\x00b"]), "INVALID_ARGUMENT"),
    "classify_unknown_model": (3, lambda: _classify(model="no-such-model"), "NOT_FOUND"),
    "classify_bad_model_name": (2, lambda: _classify(model="../x"), "INVALID_ARGUMENT"),
    "classify_unknown_version": (2, lambda: _classify(version="v99"), "NOT_FOUND"),
    "classify_bad_version": (2, lambda: _classify(version="latest"), "INVALID_ARGUMENT"),
    "classify_a_generator": (2, lambda: _classify(model=GEN_MODEL), "FAILED_PRECONDITION"),
    "generate": (12, lambda: _generate(), "OK"),
    "generate_sampled": (4, lambda: _generate(temperature=0.8, top_p=0.9, seed=7), "OK"),
    "generate_stream": (4, lambda: _generate("GenerateStream"), "OK"),
    "generate_empty_prompt": (2, lambda: _generate(prompt=""), "INVALID_ARGUMENT"),
    "generate_bad_top_p": (2, lambda: _generate(top_p=1.5), "INVALID_ARGUMENT"),
    "generate_bad_temperature": (2, lambda: _generate(temperature=-1.0), "INVALID_ARGUMENT"),
    "generate_zero_tokens": (2, lambda: _generate(max_new_tokens=0), "INVALID_ARGUMENT"),
    "generate_too_many_stops": (2, lambda: _generate(stop=list("abcde")), "INVALID_ARGUMENT"),
    "generate_stream_bad_top_k": (2, lambda: _generate("GenerateStream", top_k=-1),
                                  "INVALID_ARGUMENT"),
    "generate_unknown_model": (2, lambda: _generate(model="no-such-model"), "NOT_FOUND"),
    "generate_a_classifier": (2, lambda: _generate(model="toy"), "FAILED_PRECONDITION"),
}


def call(stub, method: str, request) -> tuple[str, str]:
    """(code name, details) of one call; streams are read to the end."""
    try:
        if method == "GenerateStream":
            chunks = list(stub.GenerateStream(request, timeout=CALL_TIMEOUT_S))
            if not chunks or not chunks[-1].finish_reason:
                return "NO_FINISH_REASON", ""
        else:
            getattr(stub, method)(request, timeout=CALL_TIMEOUT_S)
        return "OK", ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


def serving_pids() -> dict[int, str]:
    """PID -> deployment, for the ingress and the model replicas of the session app
    (from the Serve controller: `ray.util.state` needs the dashboard, which the test
    cluster does not run)."""
    from ray.serve.context import _get_global_client

    app = _get_global_client().get_serve_details()["applications"][APP_NAME]
    pids = {}
    for name, dep in app["deployments"].items():
        if name == "ingress" or name.startswith(model_deployment_name("")):
            for replica in dep["replicas"]:
                if replica.get("pid"):
                    pids[replica["pid"]] = name
    return pids


class RssSampler(threading.Thread):
    """(seconds since start, deployment, pid, RSS MiB) every second; PIDs re-read every
    5 s (autoscaling adds and removes replicas during the soak)."""

    def __init__(self, started: float):
        super().__init__(daemon=True)
        self.started = started
        self.samples: list[tuple[float, str, int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        pids: dict[int, str] = {}
        refreshed = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now - refreshed >= 5:
                try:
                    pids = serving_pids()
                    refreshed = now
                except Exception:  # the controller busy: keep the last list
                    pass
            for pid, name in pids.items():
                try:
                    rss = psutil.Process(pid).memory_info().rss / MiB
                except psutil.Error:  # the replica went away (scaled down)
                    continue
                self.samples.append((now - self.started, name, pid, rss))
            self.stop.wait(1.0)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def test_soak_mixed_traffic(server):
    kinds = list(MIX)
    weights = [MIX[k][0] for k in kinds]
    records: list[tuple[str, str, float]] = []  # kind, code, latency
    unexpected: list[tuple[str, str, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(index: int) -> None:
        rng = random.Random(index)
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.InferenceStub(channel)
        try:
            while not stop.is_set():
                kind = rng.choices(kinds, weights)[0]
                method, request = MIX[kind][1]()
                started = time.monotonic()
                code, details = call(stub, method, request)
                latency = time.monotonic() - started
                with lock:
                    records.append((kind, code, latency))
                    if code != MIX[kind][2] or "Traceback" in details:
                        unexpected.append((kind, code, details[:200]))
        finally:
            channel.close()

    assert poll_until(lambda: set(serving_pids().values()) >= {
        "ingress", model_deployment_name("toy"), model_deployment_name(GEN_MODEL)}, 60)
    started = time.monotonic()
    sampler = RssSampler(started)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        stop.wait(SOAK_S)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=CALL_TIMEOUT_S + 30)
        sampler.stop.set()
        sampler.join(timeout=30)
    elapsed = time.monotonic() - started

    # ---- summary ----
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for kind, code, _ in records:
        by_kind[kind][code] += 1
    codes = collections.Counter(code for _, code, _ in records)
    latencies = [lat for _, _, lat in records]
    ok_lat = {m: [lat for k, c, lat in records if c == "OK" and k.startswith(m)]
              for m in ("classify", "generate")}
    end = elapsed
    third = (end - WARMUP_S) / 3
    first = (WARMUP_S, WARMUP_S + third)
    last = (end - third, end)

    def window_max(name, window):
        values = [rss for t, n, _, rss in sampler.samples if n == name
                  and window[0] <= t <= window[1]]
        return max(values) if values else None

    def first_last(name):
        values = [(t, rss) for t, n, _, rss in sampler.samples if n == name]
        return (values[0][1], values[-1][1]) if values else (None, None)

    names = sorted({n for _, n, _, _ in sampler.samples})
    print(f"\nsoak: {CLIENTS} clients, {elapsed:.0f}s, {len(records)} calls "
          f"({len(records) / elapsed:.0f}/s), {len(unexpected)} unexpected codes")
    print("codes:", dict(codes.most_common()))
    print(f"latency all: p50 {pct(latencies, .5) * 1000:.0f} ms, "
          f"p99 {pct(latencies, .99) * 1000:.0f} ms; " + "; ".join(
              f"{m} OK: p50 {pct(v, .5) * 1000:.0f} ms, p99 {pct(v, .99) * 1000:.0f} ms"
              for m, v in ok_lat.items()))
    for kind in kinds:
        print(f"  {kind:28s} expect {MIX[kind][2]:20s} {dict(by_kind[kind])}")
    print(f"RSS MiB (warmup {WARMUP_S:.0f}s; max over the replicas of each deployment "
          f"in the first third / the last third; first sample / last sample):")
    growth = {}
    for name in names:
        a, b = window_max(name, first), window_max(name, last)
        s, e = first_last(name)
        pids = sorted({p for _, n, p, _ in sampler.samples if n == name})
        print(f"  {name:16s} {a or 0:7.1f} / {b or 0:7.1f}   start {s:7.1f} end {e:7.1f}"
              f"   pids {pids}")
        if a is not None and b is not None:
            growth[name] = (a, b)

    assert not unexpected, collections.Counter(unexpected).most_common(10)
    assert all(by_kind[k]["OK"] > 0 for k in kinds if MIX[k][2] == "OK"), dict(by_kind)
    assert len(records) >= CLIENTS * 2
    assert set(growth) >= {"ingress", model_deployment_name("toy"),
                           model_deployment_name(GEN_MODEL)}, growth
    for name, (a, b) in growth.items():
        margin = max(RSS_MARGIN_FRACTION * a, RSS_MARGIN_MIB)
        assert b <= a + margin, f"{name}: RSS {a:.1f} -> {b:.1f} MiB (margin {margin:.1f})"
