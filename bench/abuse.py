"""Abuse benchmark: authenticated Classify while an unauthenticated flood runs.

    .venv/bin/python bench/abuse.py [--quick] [--duration-s 15] [--concurrency 8]
        [--watch-streams 2000] [--idle-connections 2000] [--flood-concurrency 32]
        [--replica-grpc] [--json out.json]

Checkpoint: the MiniLM-L6 classifier of bench/_common.py, published to a temporary
registry and served by `start_serving` on a loopback port with an Inference token
(ServeConfig.api_token_file). Two phases of --duration-s each, after --warmup-s not
measured:

- quiet: --concurrency clients, each sending one authenticated Classify (one SST-2
  sentence) after another;
- flood: the same, while another process holds --watch-streams unauthenticated health
  `Watch` streams (100 to a connection) and --idle-connections connections that send
  nothing, and --flood-concurrency clients send Classify calls without a token, one
  after another.

Reported: authenticated throughput (calls answered OK per second) and p50/p99 latency
in each phase and their ratios (flood / quiet), the calls that failed, what the flood
got (streams opened, codes of its calls), and whether health Check stayed SERVING
during the flood. The load and the flood run in processes of their own (grpc.aio), on
the same machine as the server. --quick: 4 s phases, 200 streams, 50 idle
connections, 8 flood clients.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import multiprocessing.pool
import os
import secrets
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    add_layout_args,
    build_checkpoint,
    machine,
    parse_quick,
    percentile,
    sentences,
    table,
    write_json,
)
from services.client import Client  # noqa: E402
from services.core.config import CLASSIFICATION, ServeConfig  # noqa: E402
from services.core.net import free_port  # noqa: E402
from services.core.raycluster import ensure_ray  # noqa: E402
from services.core.registry import Registry  # noqa: E402
from services.protocol import pb, pb_grpc  # noqa: E402

MODEL = "bench"
STREAMS_PER_CONNECTION = 100
CALL_TIMEOUT_S = 30.0
PRIME_CALLS = 20
QUICK = {"duration_s": 4.0, "warmup_s": 1.0, "watch_streams": 200, "idle_connections": 50,
         "flood_concurrency": 8}


# ---- the authenticated load (its own process) --------------------------------------------
async def _load(address: str, token: str, concurrency: int, warmup_s: float,
                duration_s: float, texts: list[str]) -> dict[str, Any]:
    metadata = (("authorization", f"Bearer {token}"),)
    calls: list[tuple[float, float, str]] = []  # (sent, done, code) of calls sent in window
    start = time.monotonic()
    window = (start + warmup_s, start + warmup_s + duration_s)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def client(i: int) -> None:
            n = i
            while time.monotonic() < window[1]:
                request = pb.ClassifyRequest(model=MODEL, texts=[texts[n % len(texts)]])
                n += concurrency
                sent = time.monotonic()
                try:
                    await stub.Classify(request, metadata=metadata, timeout=CALL_TIMEOUT_S)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                if sent >= window[0]:
                    calls.append((sent, time.monotonic(), code))

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    # Latency: every call sent in the window, also one that ended after it (a slow call
    # is not left out); throughput: the calls answered OK within it.
    ok = [(sent, done) for sent, done, code in calls if code == "OK"]
    return {"latencies": [done - sent for sent, done in ok],
            "answered": sum(done <= window[1] for _, done in ok),
            "codes": dict(Counter(code for _, _, code in calls)), "duration_s": duration_s}


def load_process(queue, *args) -> None:
    queue.put(asyncio.run(_load(*args)))


# ---- the unauthenticated flood (its own process) -----------------------------------------
async def _hold_watch(channel, counts: Counter, stop: asyncio.Event) -> None:
    call = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                response_deserializer=health_pb2.HealthCheckResponse.FromString)
    stream = call(health_pb2.HealthCheckRequest(service=""))
    try:
        async for _ in stream:
            counts["watch answered"] += 1
            break
        await stop.wait()
        counts["watch open at the end"] += 1
    except grpc.aio.AioRpcError as exc:
        counts[f"watch {exc.code().name}"] += 1
    finally:
        stream.cancel()


async def _unauthenticated_calls(channel, counts: Counter, stop: asyncio.Event) -> None:
    stub = pb_grpc.InferenceStub(channel)
    request = pb.ClassifyRequest(model=MODEL, texts=["let me in"])
    while not stop.is_set():
        try:
            await stub.Classify(request, timeout=CALL_TIMEOUT_S)
            counts["classify OK"] += 1
        except grpc.aio.AioRpcError as exc:
            counts[f"classify {exc.code().name}"] += 1


async def _flood(address: str, watch_streams: int, idle_connections: int,
                 concurrency: int, ready, finish) -> dict[str, Any]:
    counts: Counter = Counter()
    stop = asyncio.Event()
    # Each channel its own connection (gRPC would share one per address otherwise).
    options = [("grpc.use_local_subchannel_pool", 1)]
    connections = -(-watch_streams // STREAMS_PER_CONNECTION)
    channels = [grpc.aio.insecure_channel(address, options=options)
                for _ in range(connections + idle_connections + 1)]
    idle = channels[connections:-1]
    await asyncio.gather(*(asyncio.wait_for(ch.channel_ready(), 60) for ch in idle),
                         return_exceptions=True)
    counts["idle connections"] = sum(
        ch.get_state() == grpc.ChannelConnectivity.READY for ch in idle)
    tasks = [asyncio.create_task(_hold_watch(channels[i // STREAMS_PER_CONNECTION], counts,
                                             stop)) for i in range(watch_streams)]
    tasks += [asyncio.create_task(_unauthenticated_calls(channels[-1], counts, stop))
              for _ in range(concurrency)]
    started = time.monotonic()
    ready.set()
    await asyncio.get_running_loop().run_in_executor(None, finish.wait)
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.wait(tasks, timeout=CALL_TIMEOUT_S)
    for channel in channels:
        await channel.close()
    return {"counts": dict(counts), "elapsed_s": elapsed}


def flood_process(queue, address, watch_streams, idle_connections, concurrency, ready,
                  finish) -> None:
    queue.put(asyncio.run(_flood(address, watch_streams, idle_connections, concurrency,
                                 ready, finish)))


# ---- the server and the phases -------------------------------------------------------------
def start_server(args, work: Path) -> tuple[str, str]:
    """Serve the checkpoint with an Inference token; (address, token)."""
    from services.serving.app import start_serving

    registry = Registry(work / "registry")
    registry.publish(MODEL, build_checkpoint(work / "ckpt"),
                     {"task": CLASSIFICATION, "labels": ["negative", "positive"],
                      "config": {"max_length": 128}, "metrics": {}})
    token = secrets.token_hex(24)
    token_file = work / "api-token"
    token_file.write_text(token)
    port = free_port()
    cfg = ServeConfig(registry=str(work / "registry"), grpc_port=port, host="127.0.0.1",
                      num_replicas=args.replicas, replica_cpus=args.replica_cpus,
                      colocate=args.colocate, replica_grpc=args.replica_grpc,
                      access_log=args.access_log, dtype=args.dtype,
                      api_token_file=str(token_file))
    ensure_ray(num_cpus=max(4, os.cpu_count() or 1))
    start_serving(cfg, http_port=free_port())
    address = f"127.0.0.1:{port}"
    with Client(address, token=token, timeout_s=120) as client:
        client.wait_until_serving(180)
        for _ in range(PRIME_CALLS):  # the first calls pay for warming the model up
            client.classify(MODEL, ["a warm-up sentence"])
    return address, token


def measure(ctx, address: str, token: str, args, texts: list[str]) -> dict[str, Any]:
    queue = ctx.Queue()
    proc = ctx.Process(target=load_process, args=(queue, address, token, args.concurrency,
                                                  args.warmup_s, args.duration_s, texts))
    proc.start()
    result = queue.get(timeout=args.warmup_s + args.duration_s + 2 * CALL_TIMEOUT_S + 60)
    proc.join(30)
    lat = result["latencies"]
    return {"throughput": result["answered"] / result["duration_s"],
            "p50_ms": 1000 * percentile(lat, 50),
            "p99_ms": 1000 * percentile(lat, 99), "calls": len(lat), "codes": result["codes"]}


def health_during(address: str, seconds: float) -> dict[str, int]:
    """health Check once every 0.5 s for `seconds`: answer -> count."""
    seen: Counter = Counter()
    deadline = time.monotonic() + seconds
    with Client(address, token="", max_attempts=1) as client:
        while time.monotonic() < deadline:
            try:
                seen[client.health(timeout_s=2.0)] += 1
            except grpc.RpcError as exc:
                seen[exc.code().name] += 1
            time.sleep(0.5)
    return dict(seen)


def flooded(ctx, address: str, token: str, args, texts: list[str]) -> dict[str, Any]:
    """The load measured again while the flood runs (started, and ready, first)."""
    queue, ready, finish = ctx.Queue(), ctx.Event(), ctx.Event()
    proc = ctx.Process(target=flood_process, args=(queue, address, args.watch_streams,
                                                   args.idle_connections,
                                                   args.flood_concurrency, ready, finish))
    proc.start()
    try:
        if not ready.wait(180):
            raise RuntimeError("the flood never got its connections up")
        with multiprocessing.pool.ThreadPool(1) as pool:
            health = pool.apply_async(health_during,
                                      (address, args.warmup_s + args.duration_s))
            load = measure(ctx, address, token, args, texts)
            load["health"] = health.get()
    finally:
        finish.set()
    flood = queue.get(timeout=3 * CALL_TIMEOUT_S)
    proc.join(30)
    return {**load, "flood": flood}


# ---- report ---------------------------------------------------------------------------------
def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def report(quiet: dict[str, Any], flood: dict[str, Any]) -> str:
    rows = [[name, f"{r['throughput']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
             sum(n for c, n in r["codes"].items() if c != "OK")]
            for name, r in (("quiet", quiet), ("flood", flood))]
    rows.append(["flood / quiet", ratio(flood["throughput"], quiet["throughput"]),
                 ratio(flood["p50_ms"], quiet["p50_ms"]),
                 ratio(flood["p99_ms"], quiet["p99_ms"]), ""])
    return table(rows, ["authenticated Classify", "calls/s", "p50 ms", "p99 ms", "failed"])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short phases, a smaller flood")
    p.add_argument("--duration-s", type=float, default=15.0)
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=8,
                   help="authenticated clients, one call at a time each")
    p.add_argument("--watch-streams", type=int, default=2000)
    p.add_argument("--idle-connections", type=int, default=2000)
    p.add_argument("--flood-concurrency", type=int, default=32,
                   help="clients sending Classify without a token")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    add_layout_args(p)
    p.add_argument("--json", default=None, metavar="FILE")
    return parse_quick(p, None, QUICK)


def main() -> int:
    import ray
    from ray import serve

    args = parse_args()
    texts = sentences(500)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        address, token = start_server(args, Path(tmp))
        try:
            quiet = measure(ctx, address, token, args, texts)
            flood = flooded(ctx, address, token, args, texts)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(report(quiet, flood))
    print(f"flood: {flood['flood']['counts']} over {flood['flood']['elapsed_s']:.1f} s")
    print(f"health Check during the flood: {flood['health']}")
    write_json(args.json, {"machine": machine(), "args": vars(args), "quiet": quiet,
                           "flood": flood})
    return 0


if __name__ == "__main__":
    sys.exit(main())
