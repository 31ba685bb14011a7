"""FSDP against DDP: optimizer-step time and memory per worker, 2 Ray Train workers.

    .venv/bin/python bench/fsdp.py [--layers 8 --hidden 768 --vocab 16000] [--workers 2]
        [--steps 12] [--batch-size 8] [--seq-len 128] [--mmap-threshold 1048576]
        [--use-gpu] [--json out.json]

A Llama-style causal LM built from a config (random weights) trains on random token ids
in each Ray Train worker, held the way `tuneserve train --strategy` holds it
(services/training/parallel.py: `wrap`, `gradient_sync`), with the training loop's
AdamW parameter groups, the same global batch and the same number of steps for every
strategy: ddp, fsdp, and fsdp with activation checkpointing. On a CPU the workers use
the gloo backend and float32; with --use-gpu, NCCL and bf16 as `tuneserve train` does.

Reported per strategy, the largest over the workers: the median optimizer-step time
(after the first two steps); the model state a worker holds (its weights, gradients and
AdamW moments, counted from its tensors: a shard of each under FSDP); a worker's memory
once its model is set up, before the first step, and its peak while it trains (on a
CPU its resident set, sampled every 5 ms over the steps; on a GPU torch's allocation
and peak allocation); the final
loss, the same for every strategy to float rounding. Ratios are against DDP measured
in the same run. The workers run with glibc's MALLOC_MMAP_THRESHOLD_ (--mmap-threshold)
so that freed buffers leave the resident set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table, write_json  # noqa: E402

WARMUP_STEPS = 2
MIB = 2**20


def model_state_bytes(model, optimizer) -> int:
    """Bytes of this worker's own weights, gradients and optimizer tensors (the local
    shard of each under FSDP)."""
    import torch

    def local(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total = 0
    for p in model.parameters():
        total += local(p)
        if p.grad is not None:
            total += local(p.grad)
    for slots in optimizer.state.values():
        total += sum(local(v) for v in slots.values() if torch.is_tensor(v))
    return total


class PeakRss:
    """The process's largest resident set size, sampled on a thread while running."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self.process, self.interval_s = psutil.Process(), interval_s
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def train_loop(cfg: dict) -> None:
    """One worker: build the model, hold it by cfg["strategy"], train cfg["steps"]
    steps; rank 0 writes the largest of the workers' figures to cfg["out"]."""
    import ctypes
    import gc

    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from services.core.modeling import quiet_transformers
    from services.training.loop import param_groups
    from services.training.parallel import gradient_sync, wrap
    from services.training.tasks import all_reduce

    quiet_transformers()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg["threads"])
    device = ray.train.torch.get_device()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["hidden"] * 8 // 3,
                         num_hidden_layers=cfg["layers"], num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=cfg["vocab"],
                         max_position_embeddings=cfg["seq_len"], tie_word_embeddings=False)
    bf16 = cfg["use_gpu"] and torch.cuda.is_bf16_supported()
    # As `tuneserve train` holds it: with FSDP only rank 0 makes the weights, the other
    # ranks' models are empty until wrap sends them their shards.
    empty = cfg["strategy"] == "fsdp" and rank != 0
    with PeakRss() as setup_rss:
        with torch.device("meta") if empty else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config)
        model.config.use_cache = False
        model = wrap(model, cfg["strategy"], device, world, bf16=bf16,
                     activation_checkpointing=cfg["activation_checkpointing"], rank=rank)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4)
    # The same global batch for every strategy: rank r trains rows r::world of it.
    gen = torch.Generator().manual_seed(1)
    micro = cfg["batch_size"] // world
    batches = [torch.randint(0, cfg["vocab"], (cfg["batch_size"], cfg["seq_len"]),
                             generator=gen)[rank::world][:micro]
               for _ in range(cfg["steps"])]
    gc.collect()
    if device.type == "cpu":  # what the full model took before sharding goes back
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    else:
        torch.cuda.reset_peak_memory_stats(device)
    setup = PeakRss.now() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else None
    times, losses = [], []
    with PeakRss() as rss:
        for step, ids in enumerate(batches):
            ids = ids.to(device)
            started = time.perf_counter()
            with gradient_sync(model, cfg["strategy"], True, world):
                if autocast is not None:
                    with autocast:
                        loss = model(input_ids=ids, labels=ids).loss
                else:
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step < len(batches) - 1:
                optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
            losses.append(float(loss.detach()))
    state = model_state_bytes(model, optimizer)  # gradients of the last step kept
    peak = rss.peak if device.type == "cpu" else torch.cuda.max_memory_allocated(device)
    step_s = statistics.median(times[WARMUP_STEPS:])
    # The largest of each figure over the workers (a step lasts as long as the slowest).
    import torch.distributed as dist

    packed = torch.tensor([step_s, state, setup, peak], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    loss = float(all_reduce([losses[-1]], device, world)[0]) / world
    # What the workers' set-up took together at its peak (one node's RAM on a CPU).
    setup_peak = float(all_reduce([float(setup_rss.peak)], device, world)[0])
    step_s, state, setup, peak = packed.tolist()
    if rank == 0:
        Path(cfg["out"]).write_text(json.dumps({"step_s": step_s, "state_bytes": state,
                                                "setup_bytes": setup, "peak_bytes": peak,
                                                "setup_peak_bytes": setup_peak,
                                                "loss": loss}))


def run_strategy(args, strategy: str, activation_checkpointing: bool,
                 storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name = strategy + ("-ac" if activation_checkpointing else "")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"strategy": strategy, "activation_checkpointing":
                           activation_checkpointing, "layers": args.layers,
                           "hidden": args.hidden, "vocab": args.vocab, "steps": args.steps,
                           "batch_size": args.batch_size, "seq_len": args.seq_len,
                           "use_gpu": args.use_gpu, "threads": args.threads,
                           "out": str(Path(storage) / f"{name}.json")},
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.threads}),
        run_config=RunConfig(name=f"bench-fsdp-{name}", storage_path=storage))
    trainer.fit()
    return {"run": name, **json.loads((Path(storage) / f"{name}.json").read_text())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) per worker")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8, help="global, split over workers")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--mmap-threshold", type=int, default=2**20,
                   help="glibc's MALLOC_MMAP_THRESHOLD_ for the workers (bytes; 0: glibc's "
                   "default): buffers at least this large are mapped and go back to the "
                   "system when freed, so a CPU worker's resident set follows what it "
                   "holds rather than what its heap once held")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.batch_size % args.workers or args.steps <= WARMUP_STEPS:
        p.error("--batch-size must divide by --workers, and --steps exceed 2")

    from services.core.raycluster import ensure_ray

    if args.mmap_threshold:  # the local cluster's workers inherit it
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    ensure_ray(num_cpus=args.workers * args.threads)
    params = None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as storage:
        for strategy, ac in (("ddp", False), ("fsdp", False), ("fsdp", True)):
            rows.append(run_strategy(args, strategy, ac, storage))
            print(f"{rows[-1]['run']}: {rows[-1]}", flush=True)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(LlamaConfig(
            hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
            num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
            vocab_size=args.vocab, tie_word_embeddings=False)).parameters())
    base = rows[0]
    out = [[r["run"], f"{r['step_s']:.3f}", f"{r['step_s'] / base['step_s']:.2f}x",
            f"{r['state_bytes'] / MIB:.0f}", f"{r['state_bytes'] / base['state_bytes']:.2f}x",
            f"{r['setup_peak_bytes'] / MIB:.0f}",
            f"{r['setup_peak_bytes'] / base['setup_peak_bytes']:.2f}x",
            f"{r['setup_bytes'] / MIB:.0f}", f"{r['peak_bytes'] / MIB:.0f}",
            f"{r['peak_bytes'] / base['peak_bytes']:.2f}x",
            f"{r['loss']:.4f}"] for r in rows]
    print(f"\n{params / 1e6:.1f}M parameters, {args.workers} workers, global batch "
          f"{args.batch_size} x {args.seq_len} tokens, {args.steps} steps "
          f"({'GPU' if args.use_gpu else 'CPU, gloo'})")
    print(table(out, ["run", "step s", "vs ddp", "state MiB/worker", "vs ddp",
                      "set-up peak MiB, all workers", "vs ddp", "set up MiB/worker",
                      "peak MiB/worker", "vs ddp", "loss"]))
    write_json(args.json, {"machine": machine(), "args": vars(args), "params": params,
                           "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
