"""The training loop every Ray Train worker runs. Read it top to bottom.

One `state` dict, a pure `lr_at(step)`, gradient accumulation with DDP's `no_sync` on
all but the last micro-step, each global micro-batch dealt out to the ranks by padded
size with the loss of the whole batch (services/training/sharding.py), exact
distributed evaluation after every epoch, rank 0 writes the checkpoint and every rank
reports. The same loop trains classifiers and causal LMs: the task object in the
config (services/training/tasks.py) builds the model, the batches, the loss and the
eval metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
from typing import Any, Optional

import numpy as np

from services.training.encoded import EncodedSplit
from services.training.sharding import epoch_order, micro_batches, share_and_scale

TRAIN_STATE_FILE = "train_state.json"
TRAINER_STATE_FILE = "trainer_state.safetensors"
"""Optimizer moments and RNG state: for resuming, never published."""


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


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def save_trainer_state(folder: str, optimizer, state: dict[str, Any]) -> None:
    """Optimizer moments and RNG as safetensors, counters as JSON: no pickle anywhere."""
    import torch
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    scalars: dict[str, Any] = {}
    for idx, slots in opt["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, os.path.join(folder, TRAINER_STATE_FILE))
    groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
    with open(os.path.join(folder, TRAIN_STATE_FILE), "w") as fh:
        json.dump({**state, "optimizer": {"param_groups": groups, "scalars": scalars}}, fh,
                  indent=2)


def load_trainer_state(folder: str, optimizer, device) -> dict[str, Any]:
    """The counters saved by save_trainer_state; restores the optimizer and RNG."""
    import torch
    from safetensors.torch import load_file

    with open(os.path.join(folder, TRAIN_STATE_FILE)) as fh:
        state = json.load(fh)
    tensors = load_file(os.path.join(folder, TRAINER_STATE_FILE))
    torch.set_rng_state(tensors.pop("rng.torch"))
    slots: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        slots.setdefault(int(idx), {})[key] = value.to(device)
    for name, value in state["optimizer"]["scalars"].items():
        idx, key = name.split(".", 1)
        slots.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": slots,
                               "param_groups": state["optimizer"]["param_groups"]})
    return state


def write_checkpoint(save) -> Any:
    """A checkpoint written by `save(folder)` straight into the run's storage, where Ray
    Train keeps it: no temporary copy for Ray to copy again (reported with NO_UPLOAD).
    It is written under a hidden name and renamed whole, so a worker that dies while
    writing leaves no checkpoint that looks complete (and Ray never hears of it); a
    write that fails (disk full) removes what it wrote and raises."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    name = storage.make_default_checkpoint_dir_name()
    final = os.path.join(storage.experiment_fs_path, name)
    partial = os.path.join(storage.experiment_fs_path, f".{name}.partial")
    os.makedirs(partial)
    try:
        save(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.rename(partial, final)
    return ray.train.Checkpoint.from_directory(final)


FAULT_ENV = "TUNESERVE_TEST_FAULT"


def _maybe_inject_fault(spec: Optional[str], step: int, rank: int, world: int,
                        run_dir: str, reports: int) -> None:
    """Test hook, from TUNESERVE_TEST_FAULT='step=N[,action=kill|pause][,times=K]'.

    On reaching optimizer step N the last rank either kills its own process with
    SIGKILL (a worker lost mid-epoch) or stops there for a minute (so that a test can
    kill the driver at a known point); at most K times per run (default 1).

    It first waits until Ray Train has registered this worker's `reports` reports: a
    report becomes a durable checkpoint at the controller's next health-check poll
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, services/core/raycluster.py), and a worker lost
    before that loses it (Ray's semantics).
    """
    if not spec or rank != world - 1:
        return
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    if int(fields.get("step", -1)) != step:
        return
    snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + 120
    while reports and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            with open(snapshot) as fh:
                if json.load(fh).get("current_report_index", 0) >= reports:
                    break
        time.sleep(0.2)
    marker_dir = os.path.join(run_dir, ".faults")
    os.makedirs(marker_dir, exist_ok=True)
    marker = os.path.join(marker_dir, f"fault-at-{step}")
    done = int(open(marker).read()) if os.path.exists(marker) else 0
    if done >= int(fields.get("times", 1)):
        return
    with open(marker, "w") as fh:
        fh.write(str(done + 1))
    if fields.get("action", "kill") == "pause":
        time.sleep(60)
    else:
        os.kill(os.getpid(), signal.SIGKILL)


class EarlyStopping:
    """Counts evaluations without improvement of the metric by more than min_delta."""

    def __init__(self, mode: str, patience: int, min_delta: float,
                 best: Optional[float] = None, bad_evals: int = 0):
        self.mode, self.patience, self.min_delta = mode, patience, min_delta
        self.best, self.bad_evals = best, bad_evals

    def update(self, value: float) -> bool:
        """Record an evaluation; True when training should stop."""
        better = self.best is None or (
            value > self.best + self.min_delta if self.mode == "max"
            else value < self.best - self.min_delta)
        if better:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        return self.patience > 0 and self.bad_evals >= self.patience


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import CheckpointUploadMode

    from services.core.modeling import load_tokenizer, quiet_transformers
    from services.training.tasks import all_reduce
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

    restore = ray.train.get_checkpoint()
    tokenizer = load_tokenizer(cfg["model"])
    model = task.build_model(tokenizer)
    if restore is not None:
        with restore.as_directory() as folder:
            task.load_weights(model, folder)
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    bf16 = cfg["use_gpu"] and torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    def autocast():
        if bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    dataset = task.dataset(train_split)
    lengths = train_split.lengths()
    micro, accum = cfg["micro_batch_size"], cfg["grad_accum_steps"]
    micro_per_epoch = math.ceil(len(train_split) / (micro * world))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / accum))
    total_steps = steps_per_epoch * cfg["epochs"]
    warmup_steps = int(total_steps * cfg["warmup_ratio"])
    eval_steps = cfg.get("eval_steps") or 0
    optimizer = torch.optim.AdamW(param_groups(model, cfg["weight_decay"]),
                                  lr=cfg["learning_rate"])

    # Where training stands: the epoch, optimizer steps so far, micro-batches of this
    # epoch already trained (the data position), and the early-stopping record.
    state = {"epoch": 0, "step": 0, "micro_in_epoch": 0, "best": None, "bad_evals": 0,
             "reports": 0}
    resumed = None
    if restore is not None:
        with restore.as_directory() as folder:
            saved = load_trainer_state(folder, optimizer, device)
        state.update({k: saved[k] for k in state if k in saved})
        resumed = {"epoch": state["epoch"] + 1, "step": state["step"]}
    stopper = EarlyStopping(task.metric_mode, cfg.get("early_stopping_patience") or 0,
                            cfg.get("early_stopping_min_delta") or 0.0,
                            state["best"], state["bad_evals"])
    progress = cfg.get("progress_queue") if rank == 0 else None

    def emit(event: dict) -> None:
        if progress is not None:
            record_gauges(event, cfg.get("metric_tags") or {})
            with contextlib.suppress(Exception):
                progress.put_nowait(event)

    emit({"type": "start", "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
          "epochs": cfg["epochs"], "world_size": world, "resumed": resumed,
          "train_examples": len(train_split), "eval_examples": len(eval_split)})

    def evaluate_and_checkpoint(epoch: int, epoch_done: bool) -> bool:
        """Exact eval on all ranks, a checkpoint from rank 0; True: stop early."""
        metrics = {"epoch": epoch + 1, "step": state["step"],
                   "epoch_progress": round(epoch + (1.0 if epoch_done else
                                                    state["micro_in_epoch"] / micro_per_epoch), 4),
                   **task.evaluate(model, eval_split, rank, world,
                                   cfg["micro_batch_size"] * 2, device, autocast)}
        stop = stopper.update(float(metrics[task.metric]))
        state.update(best=stopper.best, bad_evals=stopper.bad_evals)
        metrics["early_stop"] = stop
        emit({"type": "eval", **metrics})
        state["reports"] += 1
        position = dict(state)
        if epoch_done:
            position.update(epoch=epoch + 1, micro_in_epoch=0)

        def save(folder: str) -> None:
            task.save(model.module if hasattr(model, "module") else model, folder, tokenizer)
            tokenizer.save_pretrained(folder)
            save_trainer_state(folder, optimizer, {
                **position, "metrics": task.state_metrics(metrics)})

        checkpoint = write_checkpoint(save) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
        return stop

    def denominator(examples: list[int]) -> float:
        return task.loss_denominator(train_split, examples)

    def to_device(batch: dict) -> dict:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    fault = cfg.get("fault_injection")
    window_start, window_samples, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
    window_tokens = 0  # non-padding tokens of the global batches
    model.train()
    for epoch in range(state["epoch"], cfg["epochs"]):
        state["epoch"] = epoch
        order = epoch_order(len(train_split), cfg["seed"], epoch, micro * world,
                            lengths if cfg.get("group_by_length") else None)
        stop = False
        for mb in micro_batches(order, lengths, micro, accum, rank, world,
                                start=state["micro_in_epoch"], denominator=denominator):
            i = mb.index
            last_micro = (i + 1) % accum == 0 or i + 1 == micro_per_epoch
            share, scale = share_and_scale(mb, world)
            batch = to_device(task.collate([dataset[k] for k in share]))
            sync = contextlib.nullcontext() if (last_micro or world == 1) else model.no_sync()
            with sync:
                loss_sum = task.loss_sum(model, batch, autocast)
                (loss_sum * scale).backward()
            window_loss += float(loss_sum) * scale / world  # this rank's part of the mean
            window_samples += len(mb.everyone)
            window_tokens += int(lengths[mb.everyone].sum())
            if not last_micro:
                continue
            lr = lr_at(state["step"], total_steps, warmup_steps, cfg["learning_rate"])
            for g in optimizer.param_groups:
                g["lr"] = lr
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_grad_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["micro_in_epoch"] = i + 1
            window_steps += 1
            if state["step"] % cfg["log_every_steps"] == 0 or state["step"] == total_steps \
                    or i + 1 == micro_per_epoch:
                # every rank reaches this line at the same step: one scalar all-reduce
                # gives the exact loss of the window's global batches (and each epoch's
                # last step closes a window, so every epoch has its train loss)
                loss = float(all_reduce([window_loss], device, world)[0]) / window_steps
                elapsed = time.perf_counter() - window_start
                emit({"type": "step", "epoch": epoch + 1, "step": state["step"],
                      "loss": loss, "lr": lr,
                      "samples_per_s": window_samples / max(elapsed, 1e-9),
                      "tokens_per_s": window_tokens / max(elapsed, 1e-9)})
                window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
                window_loss, window_steps = 0.0, 0
            _maybe_inject_fault(fault, state["step"], rank, world,
                                cfg.get("run_dir") or tempfile.gettempdir(), state["reports"])
            if eval_steps and state["step"] % eval_steps == 0 and i + 1 < micro_per_epoch:
                if evaluate_and_checkpoint(epoch, epoch_done=False):
                    stop = True
                    break
        if stop or evaluate_and_checkpoint(epoch, epoch_done=True):
            emit({"type": "early_stop", "epoch": epoch + 1, "step": state["step"],
                  "best": stopper.best, "patience": stopper.patience})
            break
        state["micro_in_epoch"] = 0

