"""The training loop every Ray Train worker runs. Read it top to bottom.

One `state` dict, a pure `lr_at(step)`, gradient accumulation with DDP's `no_sync` on
all but the last micro-step, exact distributed evaluation after every epoch, rank 0
writes the checkpoint and every rank reports. The same loop trains classifiers and
causal LMs: the task object in the config (services/training/tasks.py) builds the
model, the batches, the loss and the eval metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import time
from typing import Any

import numpy as np

from services.training.encoded import EncodedSplit

TRAIN_STATE_FILE = "train_state.json"


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warmup from 0 to base_lr, then linear decay to 0 at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    remaining = max(1, total_steps - warmup_steps)
    return base_lr * max(0.0, (total_steps - step) / remaining)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from services.modeling import load_tokenizer, quiet_transformers
    from services.training.tracking import record_gauges

    quiet_transformers()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Each worker gets the cores it reserved, no more: two workers on two cores must
    # not run four BLAS threads each.
    torch.set_num_threads(max(1, int(math.ceil(cfg["cpus_per_worker"]))))
    seed_everything(cfg["seed"])

    data = ray.get(cfg["data_ref"])
    train_split: EncodedSplit = data["train"]
    eval_split: EncodedSplit = data["eval"]
    task = cfg["task"]

    tokenizer = load_tokenizer(cfg["model"])
    model = task.build_model(tokenizer)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    bf16 = cfg["use_gpu"] and torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    def autocast():
        if bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    dataset = task.dataset(train_split)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg["seed"], drop_last=False)
    loader = DataLoader(dataset, batch_size=cfg["micro_batch_size"], sampler=sampler,
                        collate_fn=task.collate, num_workers=0)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False,
                                                 move_to_device=True)
    accum = cfg["grad_accum_steps"]
    steps_per_epoch = max(1, math.ceil(len(sampler) / cfg["micro_batch_size"] / accum))
    total_steps = steps_per_epoch * cfg["epochs"]
    warmup_steps = int(total_steps * cfg["warmup_ratio"])
    optimizer = torch.optim.AdamW(_param_groups(model, cfg["weight_decay"]),
                                  lr=cfg["learning_rate"])

    state = {"epoch": 0, "step": 0}
    progress = cfg.get("progress_queue") if rank == 0 else None

    def emit(event: dict) -> None:
        if progress is not None:
            record_gauges(event, cfg.get("metric_tags") or {})
            with contextlib.suppress(Exception):
                progress.put_nowait(event)

    emit({"type": "start", "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
          "epochs": cfg["epochs"], "world_size": world,
          "train_examples": len(train_split), "eval_examples": len(eval_split)})
    window_start, window_samples, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
    window_tokens = 0  # non-padding tokens; loss.item() already syncs, so this is cheap
    model.train()
    for epoch in range(cfg["epochs"]):
        state["epoch"] = epoch
        sampler.set_epoch(epoch)
        n_micro = len(loader)
        group_loss = 0.0
        for i, batch in enumerate(loader):
            group_start = (i // accum) * accum
            group_size = min(accum, n_micro - group_start)
            last_micro = (i - group_start) == group_size - 1
            sync = contextlib.nullcontext() if (last_micro or world == 1) else model.no_sync()
            with sync:
                loss = task.loss(model, batch, autocast)
                (loss / group_size).backward()
            group_loss += loss.item() / group_size
            window_samples += len(batch["input_ids"])
            window_tokens += int(batch["attention_mask"].sum())
            if not last_micro:
                continue
            lr = lr_at(state["step"], total_steps, warmup_steps, cfg["learning_rate"])
            for g in optimizer.param_groups:
                g["lr"] = lr
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            window_loss += group_loss
            window_steps += 1
            group_loss = 0.0
            if state["step"] % cfg["log_every_steps"] == 0 or state["step"] == total_steps:
                elapsed = time.perf_counter() - window_start
                emit({"type": "step", "epoch": epoch + 1, "step": state["step"],
                      "loss": window_loss / window_steps, "lr": lr,
                      "samples_per_s": window_samples * world / max(elapsed, 1e-9),
                      "tokens_per_s": window_tokens * world / max(elapsed, 1e-9)})
                window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
                window_loss, window_steps = 0.0, 0

        metrics = {"epoch": epoch + 1, "step": state["step"],
                   **task.evaluate(model, eval_split, rank, world,
                                   cfg["micro_batch_size"] * 2, device, autocast)}
        emit({"type": "eval", **metrics})
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                inner = model.module if hasattr(model, "module") else model
                task.save(inner, tmp)
                tokenizer.save_pretrained(tmp)
                with open(os.path.join(tmp, TRAIN_STATE_FILE), "w") as fh:
                    json.dump({"epoch": epoch + 1, "step": state["step"],
                               "metrics": task.state_metrics(metrics)}, fh, indent=2)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
