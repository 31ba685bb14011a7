"""The training loop every Ray Train worker runs. Read it top to bottom.

One `state` dict, a pure `lr_at(step)`, gradient accumulation with DDP's `no_sync` on
all but the last micro-step, exact distributed evaluation (confusion matrices are
all-reduced) after every epoch, rank 0 writes the checkpoint and every rank reports.
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

from services.training.encoded import EncodedSplit, pad_batch

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


class _Examples:
    """A map-style dataset over an EncodedSplit (index -> (ids, label))."""

    def __init__(self, split: EncodedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split.example(i), int(self.split.labels[i])


def _collate(pad_id: int):
    import torch

    def collate(items):
        ids, mask = pad_batch([ex for ex, _ in items], pad_id)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([lab for _, lab in items], dtype=torch.long)}

    return collate


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def evaluate(model, split: EncodedSplit, rank: int, world: int, batch_size: int,
             pad_id: int, num_labels: int, device, autocast) -> tuple[np.ndarray, float, int]:
    """This rank's share (rank::world) -> summed confusion matrix, loss and count."""
    import torch
    import torch.nn.functional as F

    model.eval()
    cm = torch.zeros((num_labels, num_labels), dtype=torch.long)
    loss_sum = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.long)
    indices = list(range(rank, len(split), world))
    # Sorting by length makes padding (and so evaluation time) minimal.
    indices.sort(key=lambda i: split.offsets[i + 1] - split.offsets[i])
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            ids, mask = pad_batch([split.example(i) for i in chunk], pad_id)
            labels = torch.from_numpy(split.labels[chunk])
            with autocast():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logits = logits.float().cpu()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            pred = logits.argmax(dim=-1)
            cm.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
            count += len(chunk)
    if world > 1:
        import torch.distributed as dist

        packed = torch.cat([cm.flatten().double(), loss_sum.view(1), count.double().view(1)])
        packed = packed.to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        cm = packed[:-2].round().long().view(num_labels, num_labels)
        loss_sum, count = packed[-2], packed[-1].round().long()
    model.train()
    n = int(count)
    return cm.numpy(), float(loss_sum) / max(1, n), n


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, DistributedSampler

    from services.evaluation import metrics_from_confusion
    from services.modeling import load_classifier_for_training, load_tokenizer, quiet_transformers

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
    id2label = {int(k): v for k, v in cfg["id2label"].items()}
    labels = [id2label[i] for i in range(len(id2label))]
    pad_id = cfg["pad_token_id"]

    tokenizer = load_tokenizer(cfg["model"])
    model = load_classifier_for_training(cfg["model"], id2label, pad_id)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    bf16 = cfg["use_gpu"] and torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    def autocast():
        if bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    dataset = _Examples(train_split)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg["seed"], drop_last=False)
    loader = DataLoader(dataset, batch_size=cfg["micro_batch_size"], sampler=sampler,
                        collate_fn=_collate(pad_id), num_workers=0)
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False,
                                                 move_to_device=True)
    accum = cfg["grad_accum_steps"]
    steps_per_epoch = max(1, math.ceil(len(sampler) / cfg["micro_batch_size"] / accum))
    total_steps = steps_per_epoch * cfg["epochs"]
    warmup_steps = int(total_steps * cfg["warmup_ratio"])
    optimizer = torch.optim.AdamW(_param_groups(model, cfg["weight_decay"]),
                                  lr=cfg["learning_rate"])
    class_weights = cfg.get("class_weights")
    weight = torch.tensor(class_weights, dtype=torch.float, device=device) if class_weights else None

    state = {"epoch": 0, "step": 0}
    progress = cfg.get("progress_queue") if rank == 0 else None

    def emit(event: dict) -> None:
        if progress is not None:
            with contextlib.suppress(Exception):
                progress.put_nowait(event)

    emit({"type": "start", "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
          "epochs": cfg["epochs"], "world_size": world,
          "train_examples": len(train_split), "eval_examples": len(eval_split)})
    window_start, window_samples, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
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
                with autocast():
                    logits = model(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits
                loss = F.cross_entropy(logits.float(), batch["labels"], weight=weight)
                (loss / group_size).backward()
            group_loss += loss.item() / group_size
            window_samples += len(batch["labels"])
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
                      "samples_per_s": window_samples * world / max(elapsed, 1e-9)})
                window_start, window_samples = time.perf_counter(), 0
                window_loss, window_steps = 0.0, 0

        cm, eval_loss, n_eval = evaluate(model, eval_split, rank, world,
                                         cfg["micro_batch_size"] * 2, pad_id, len(labels),
                                         device, autocast)
        m = metrics_from_confusion(cm.tolist(), labels)
        metrics = {"epoch": epoch + 1, "step": state["step"], "eval_loss": eval_loss,
                   "eval_examples": n_eval, "confusion_matrix": cm.tolist(),
                   **{f"eval_{k}": v for k, v in m.items() if k != "per_class"},
                   "eval_per_class": m["per_class"]}
        emit({"type": "eval", **metrics})
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                inner = model.module if hasattr(model, "module") else model
                inner.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                with open(os.path.join(tmp, TRAIN_STATE_FILE), "w") as fh:
                    json.dump({"epoch": epoch + 1, "step": state["step"],
                               "metrics": {k: v for k, v in metrics.items()
                                           if k not in ("confusion_matrix", "eval_per_class")}},
                              fh, indent=2)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
