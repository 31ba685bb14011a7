"""The training loop every Ray Train worker runs: `train_loop_per_worker(LoopConfig)`.

A `Worker` sets up (model, optimizer, resumed position), trains epoch by epoch
(gradient accumulation without a gradient sync on all but the last micro-step, each
global micro-batch dealt out to the ranks by padded size: services/training/sharding.py)
and evaluates and checkpoints (exact over all ranks; rank 0 writes the checkpoint, every
rank reports). The model is held with DDP or sharded with FSDP
(services/training/parallel.py); an FSDP checkpoint adds every rank's shards of the
model and optimizer for resuming. The task in the LoopConfig
(services/training/tasks.py) builds the model, the batches, the loss and the eval
metrics. The examples come from memory (`MemoryData`: the tokenised splits the driver
put in the object store) or from Ray Data streams (services/training/streamed.py), both
as `Micro` batches.
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
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import numpy as np

from services.core.config import ClusterSection, OptimSection, ResolvedTrainConfig
from services.core.modeling import load_tokenizer, quiet_transformers
from services.training.encoded import EncodedSplit
from services.training.parallel import (DDP, FSDP, agree, broadcast_text, choose_strategy,
                                        full_state_dict, gradient_sync, load_sharded,
                                        save_sharded, smallest, training_state_bytes,
                                        unwrapped, worker_memory_bytes, wrap)
from services.training.sharding import Micro, epoch_order, micro_batches, share_and_scale
from services.training.streamed import StreamedData, StreamedSplits
from services.training.tasks import Task, all_reduce
from services.training.tracking import record_gauges

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


def param_groups(model, weight_decay: float, head_lr_scale: float = 1.0,
                 is_head=lambda name: False):
    """AdamW's groups: with and without weight decay, the head's (`is_head`) apart
    with its learning rate `head_lr_scale` times the schedule's (each group's
    `lr_scale`)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = head_lr_scale != 1.0 and is_head(name)
        decay = not (p.ndim < 2 or "norm" in name.lower())
        groups.setdefault((head, decay), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": head_lr_scale if head else 1.0}
            for (head, decay), params in sorted(groups.items(),
                                                key=lambda kv: (kv[0][0], not kv[0][1]))]


def save_trainer_state(folder: str, optimizer, state: dict[str, Any]) -> None:
    """Optimizer moments and RNG as safetensors, counters as JSON: no pickle anywhere.
    `optimizer` None: the RNG and counters only (an FSDP checkpoint keeps the optimizer
    sharded)."""
    import torch
    from safetensors.torch import save_file

    opt = optimizer.state_dict() if optimizer is not None else {"state": {},
                                                                 "param_groups": []}
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
    """The counters saved by save_trainer_state; restores the optimizer (unless None)
    and RNG."""
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
    if optimizer is not None:
        optimizer.load_state_dict({"state": slots,
                                   "param_groups": state["optimizer"]["param_groups"]})
    return state


def saved_strategy(folder: str) -> str:
    """The strategy (ddp or fsdp) that wrote a checkpoint."""
    with open(os.path.join(folder, TRAIN_STATE_FILE)) as fh:
        return json.load(fh).get("strategy", DDP)


def write_checkpoint(save, rank: int = 0, world: int = 1,
                     device=None) -> tuple[Any, Any]:
    """A checkpoint written by `save(folder)`, and the upload mode to report it with.

    In a run folder on a filesystem (local, or a volume every node mounts) it is
    written straight where Ray Train keeps it: no temporary copy for Ray to copy again
    (NO_UPLOAD). It is written under a hidden name and renamed whole, so a worker that
    dies while writing leaves no checkpoint that looks complete (and Ray never hears of
    it); a write that fails (disk full) removes what it wrote and raises.

    In object storage it is written into a local temporary folder that Ray Train
    uploads when it is reported and then removes (SYNC): a checkpoint exists for Ray
    only once reported, after its upload, so a worker lost while uploading leaves
    none that a resume would read.

    Called by rank 0 alone (world 1), or by every rank with `world` (an FSDP
    checkpoint, each rank writing its shards): in a folder every rank writes into rank
    0's, and rank 0 gets the Checkpoint, the others None; in object storage each rank
    gets its own, which Ray Train uploads into the one checkpoint. A failure on any rank
    fails the write on all."""
    import pyarrow.fs as pafs
    import ray.train
    from ray.train import CheckpointUploadMode

    storage = ray.train.get_context().get_storage()
    remote = not isinstance(storage.storage_filesystem, pafs.LocalFileSystem)
    if remote:
        partial = tempfile.mkdtemp(prefix="tuneserve-checkpoint-")
    else:
        name = broadcast_text(storage.make_default_checkpoint_dir_name() if rank == 0
                              else None, rank, world)
        final = os.path.join(storage.experiment_fs_path, name)
        partial = os.path.join(storage.experiment_fs_path, f".{name}.partial")
        os.makedirs(partial, exist_ok=world > 1)
    failed: Optional[BaseException] = None
    try:
        save(partial)
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others know
        failed = exc
    if agree(failed is not None, device, world) and failed is None:
        failed = RuntimeError("another rank failed to write its part of the checkpoint")
    if failed is not None:
        if remote or rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise failed
    if remote:
        return ray.train.Checkpoint.from_directory(partial), CheckpointUploadMode.SYNC
    if rank != 0:
        return None, CheckpointUploadMode.NO_UPLOAD
    os.rename(partial, final)
    return ray.train.Checkpoint.from_directory(final), CheckpointUploadMode.NO_UPLOAD


FAULT_ENV = "TUNESERVE_TEST_FAULT"


def _maybe_inject_fault(spec: Optional[str], step: int, rank: int, world: int,
                        reports: int) -> None:
    """Test hook, from TUNESERVE_TEST_FAULT='step=N[,action=kill|pause][,times=K]'.

    On reaching optimizer step N the last rank either kills its own process with
    SIGKILL (a worker lost mid-epoch) or stops there for a minute (so that a test can
    kill the driver at a known point); at most K times per run (default 1).

    It first waits until Ray Train has registered this worker's `reports` reports: a
    report becomes a durable checkpoint at the controller's next health-check poll
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, services/core/raycluster.py), and a worker lost
    before that loses it (Ray's semantics). Its count is kept in the run's folder,
    `.faults/fault-at-N`, on the run's storage (a folder or object storage).
    """
    if not spec or rank != world - 1:
        return
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    if int(fields.get("step", -1)) != step:
        return
    import ray.train

    storage = ray.train.get_context().get_storage()
    fs, run_dir = storage.storage_filesystem, storage.experiment_fs_path

    def read(path: str) -> bytes:
        with fs.open_input_stream(path) as src:
            return src.read()

    snapshot = f"{run_dir}/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 120
    while reports and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(read(snapshot)).get("current_report_index", 0) >= reports:
                break
        time.sleep(0.2)
    marker = f"{run_dir}/.faults/fault-at-{step}"
    try:
        done = int(read(marker))
    except (OSError, ValueError):
        done = 0
    if done >= int(fields.get("times", 1)):
        return
    fs.create_dir(f"{run_dir}/.faults")
    with fs.open_output_stream(marker) as dst:
        dst.write(str(done + 1).encode())
    if fields.get("action", "kill") == "pause":
        time.sleep(60)
    else:
        os.kill(os.getpid(), signal.SIGKILL)


EARLY_STOP = "early_stop"
MAX_STEPS = "max_steps"
"""Why Worker.train_epoch ended before its epoch's end."""


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


@dataclass(frozen=True)
class LoopConfig:
    """What every worker gets from the driver (picklable)."""

    model_ref: str
    """What the workers load: a Hugging Face id or an absolute local folder."""
    data_ref: Any
    """ray.ObjectRef of {"train": EncodedSplit, "eval": EncodedSplit}, or a
    StreamedData when the trainer streams Ray Datasets to the workers."""
    task: Task
    optim: OptimSection
    """The run's schedule, batches, seed, evaluation and early stopping, as resolved."""
    micro_batch_size: int
    cpus_per_worker: float
    use_gpu: bool
    log_every_steps: int
    strategy: str = "auto"
    """ddp, fsdp or auto (services/training/parallel.py: choose_strategy)."""
    activation_checkpointing: bool = False
    progress_queue: Any = None
    """ray.util.queue.Queue that rank 0's events go to (None: not reported)."""
    metric_tags: dict[str, str] = field(default_factory=dict)
    fault_injection: Optional[str] = None
    """FAULT_ENV's value on the driver (a test hook)."""

    @classmethod
    def from_config(cls, cfg: ResolvedTrainConfig, *, model_ref: str, data_ref: Any,
                    task: Task, progress_queue: Any, run_name: str) -> "LoopConfig":
        return cls(
            model_ref=model_ref, data_ref=data_ref, task=task, optim=cfg.optim,
            micro_batch_size=cfg.micro_batch_size,
            cpus_per_worker=cfg.cluster.cpus_per_worker, use_gpu=cfg.cluster.use_gpu,
            log_every_steps=cfg.cluster.log_every_steps, strategy=cfg.cluster.strategy,
            activation_checkpointing=cfg.cluster.activation_checkpointing,
            progress_queue=progress_queue,
            metric_tags={"run": run_name, "model": cfg.publish.name},
            fault_injection=os.environ.get(FAULT_ENV))


@dataclass
class TrainState:
    """Where training stands (saved in each checkpoint's train_state.json): the epoch,
    optimizer steps so far, micro-batches of this epoch already trained (the data
    position), the early-stopping record and the reports made."""

    epoch: int = 0
    step: int = 0
    micro_in_epoch: int = 0
    best: Optional[float] = None
    bad_evals: int = 0
    reports: int = 0

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> "TrainState":
        names = asdict(cls()).keys()
        return cls(**{k: saved[k] for k in names if k in saved})


class _Window:
    """Loss and throughput since the last step report."""

    def __init__(self):
        self.start, self.samples, self.tokens = time.perf_counter(), 0, 0
        self.loss, self.steps = 0.0, 0


class MemoryData:
    """The tokenised splits in the worker's memory: every rank draws the same order of
    the epoch (sharding.epoch_order) and runs its share of each global micro-batch."""

    def __init__(self, data: dict[str, EncodedSplit], task: Task, cfg: LoopConfig,
                 rank: int, world: int):
        self.train_split: EncodedSplit = data["train"]
        self.eval_split: EncodedSplit = data["eval"]
        self.task, self.cfg, self.rank, self.world = task, cfg, rank, world
        self.dataset = task.dataset(self.train_split)
        self.lengths = self.train_split.lengths()
        self.train_rows, self.eval_rows = len(self.train_split), len(self.eval_split)

    def micro_batches(self, epoch: int, start: int, reduce=None):
        """The epoch's micro-batches from the `start`-th on (resuming)."""
        cfg, world = self.cfg, self.world
        order = epoch_order(self.train_rows, cfg.optim.seed, epoch,
                            cfg.micro_batch_size * world,
                            self.lengths if cfg.optim.group_by_length else None)
        for mb in micro_batches(order, self.lengths, cfg.micro_batch_size,
                                cfg.optim.grad_accum_steps, self.rank, world, start=start,
                                denominator=self._denominator):
            share, scale = share_and_scale(mb, world)
            yield Micro(mb.index, [self.dataset[k] for k in share], scale,
                        len(mb.everyone), int(self.lengths[mb.everyone].sum()))

    def _denominator(self, examples: list[int]) -> float:
        return self.task.loss_denominator(self.train_split, examples)

    def eval_chunks(self, batch_size: int, reduce=None):
        """This rank's eval batches as (dataset items, counted): Task.eval_chunks."""
        return self.task.eval_chunks(self.eval_split, self.rank, self.world, batch_size)


def train_loop_per_worker(cfg: LoopConfig) -> None:
    """Ray Train's entry point on every worker: set up, then train epoch by epoch,
    evaluating and checkpointing, until the last epoch or early stopping."""
    Worker(cfg).run()


def make_trainer(cfg: LoopConfig, cluster: ClusterSection, run_name: str,
                 storage_path: str, callbacks: tuple = (), datasets: Optional[dict] = None):
    """Ray Train's TorchTrainer whose workers run train_loop_per_worker(cfg) on the
    cluster section's workers, placed on the nodes by its placement strategy; it keeps
    the two best checkpoints by the task's metric (`callbacks`: Ray Train
    UserCallbacks, e.g. Tune's report callback; `datasets`: the "train" and "eval" Ray
    Datasets of a streamed run)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    task = cfg.task
    streamed = {} if datasets is None else {"datasets": datasets,
                                            "dataset_config": StreamedSplits()}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=cluster.workers, use_gpu=cluster.use_gpu,
                                     resources_per_worker={"CPU": cluster.cpus_per_worker},
                                     placement_strategy=cluster.placement_strategy),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, callbacks=list(callbacks),
            checkpoint_config=CheckpointConfig(num_to_keep=2,
                                               checkpoint_score_attribute=task.metric,
                                               checkpoint_score_order=task.metric_mode),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
        ),
        **streamed,
    )


class Worker:
    """One Ray Train worker's training run; every rank runs the same steps."""

    def __init__(self, cfg: LoopConfig):
        import ray
        import ray.train
        import torch

        quiet_transformers()
        ctx = ray.train.get_context()
        self.cfg, self.task = cfg, cfg.task
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        # Each worker gets the cores it reserved, no more: two workers on two cores must
        # not run four BLAS threads each.
        torch.set_num_threads(max(1, int(math.ceil(cfg.cpus_per_worker))))
        seed_everything(cfg.optim.seed)
        if isinstance(cfg.data_ref, StreamedData):
            self.data = cfg.data_ref.open(self.task, cfg, self.rank, self.world)
        else:
            self.data = MemoryData(ray.get(cfg.data_ref), self.task, cfg, self.rank,
                                   self.world)
        restore = ray.train.get_checkpoint()
        self.local_world = ctx.get_local_world_size()
        self._setup_model(restore)
        self._setup_schedule()
        self.state, resumed = TrainState(), None
        if restore is not None:
            with restore.as_directory() as folder:
                if self.strategy == FSDP:
                    load_sharded(folder, self.model, self.optimizer)
                self.state = TrainState.from_saved(load_trainer_state(
                    folder, self.optimizer if self.strategy == DDP else None, self.device))
            resumed = {"epoch": self.state.epoch + 1, "step": self.state.step}
        optim = cfg.optim
        self.stopper = EarlyStopping(self.task.metric_mode, optim.early_stopping_patience or 0,
                                     optim.early_stopping_min_delta or 0.0,
                                     self.state.best, self.state.bad_evals)
        self.progress = cfg.progress_queue if self.rank == 0 else None
        self.emit({"type": "start", "total_steps": self.total_steps,
                   "steps_per_epoch": self.steps_per_epoch, "epochs": cfg.optim.epochs,
                   "max_steps": cfg.optim.max_steps,
                   "world_size": self.world, "resumed": resumed,
                   "strategy": self.strategy, "strategy_why": self.strategy_why,
                   "train_examples": self.data.train_rows,
                   "eval_examples": self.data.eval_rows})

    # ---- setup -------------------------------------------------------------------
    def _setup_model(self, restore) -> None:
        """The model, held by the strategy chosen (restored weights when resuming a DDP
        checkpoint; an FSDP one is restored into the shards once they exist), and
        AdamW."""
        import ray.train.torch
        import torch

        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model_ref)
        self.device = ray.train.torch.get_device()
        self.bf16 = cfg.use_gpu and torch.cuda.is_available() \
            and torch.cuda.is_bf16_supported()
        saved = None
        if restore is not None:
            with restore.as_directory() as folder:
                saved = saved_strategy(folder)
        # The strategy is chosen from the model's shapes, before any weight is read.
        model = self.task.build_model(self.tokenizer, empty=True)
        memory = smallest(worker_memory_bytes(self.device, self.local_world), self.device,
                          self.world)
        self.strategy, self.strategy_why = choose_strategy(
            cfg.strategy, training_state_bytes(model), memory, self.world, saved)
        # FSDP: only rank 0 reads the weights; the others get their shards from it (wrap).
        if self.strategy == DDP or self.rank == 0:
            model = self.task.build_model(self.tokenizer)
        if saved == DDP:
            with restore.as_directory() as folder:
                self.task.load_weights(model, folder)
        self.model = wrap(model, self.strategy, self.device, self.world, bf16=self.bf16,
                          activation_checkpointing=cfg.activation_checkpointing,
                          rank=self.rank)
        optim = self.cfg.optim
        head_scale = (optim.head_learning_rate or optim.learning_rate) / optim.learning_rate
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, optim.weight_decay, head_scale,
                         self.task.is_head_parameter), lr=optim.learning_rate)

    def _setup_schedule(self) -> None:
        cfg = self.cfg
        micro_per_epoch = math.ceil(self.data.train_rows / (cfg.micro_batch_size * self.world))
        self.micro_per_epoch = micro_per_epoch
        self.steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.optim.grad_accum_steps))
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        if cfg.optim.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.optim.max_steps)
        self.warmup_steps = int(self.total_steps * cfg.optim.warmup_ratio)

    def autocast(self):
        import torch

        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def emit(self, event: dict) -> None:
        """An event to the driver (rank 0 only), and the training gauges."""
        if self.progress is not None:
            record_gauges(event, self.cfg.metric_tags or {})
            with contextlib.suppress(Exception):
                self.progress.put_nowait(event)

    # ---- training ----------------------------------------------------------------
    def run(self) -> None:
        self.window = _Window()
        self.model.train()
        for epoch in range(self.state.epoch, self.cfg.optim.epochs):
            if self.state.step >= self.total_steps:  # --max-steps reached (a resumed run)
                break
            self.state.epoch = epoch
            ended = self.train_epoch(epoch)
            if ended == MAX_STEPS:
                self.emit({"type": "max_steps", "epoch": epoch + 1, "step": self.state.step})
                break
            if ended == EARLY_STOP or self.evaluate_and_checkpoint(epoch, epoch_done=True):
                self.emit({"type": "early_stop", "epoch": epoch + 1, "step": self.state.step,
                           "best": self.stopper.best, "patience": self.stopper.patience})
                break
            self.state.micro_in_epoch = 0

    def train_epoch(self, epoch: int) -> Optional[str]:
        """The rest of this epoch's micro-batches. EARLY_STOP: early stopping ended it;
        MAX_STEPS: the run's last step (--max-steps) came before the epoch's end, and
        was evaluated and checkpointed; None: the epoch ran to its end."""
        cfg, world = self.cfg, self.world
        batches = self.data.micro_batches(
            epoch, self.state.micro_in_epoch,
            reduce=lambda values: all_reduce(values, self.device, world))
        for mb in batches:
            i = mb.index
            last_micro = (i + 1) % cfg.optim.grad_accum_steps == 0 or i + 1 == self.micro_per_epoch
            self._backward(mb, sync=last_micro)
            if not last_micro:
                continue
            self._optimizer_step(epoch, epoch_ends=i + 1 == self.micro_per_epoch)
            self.state.micro_in_epoch = i + 1
            _maybe_inject_fault(cfg.fault_injection, self.state.step, self.rank, world,
                                self.state.reports)
            if i + 1 == self.micro_per_epoch:
                break  # the epoch's end: run() evaluates it
            if self.state.step >= self.total_steps:
                self.evaluate_and_checkpoint(epoch, epoch_done=False)
                return MAX_STEPS
            if cfg.optim.eval_steps and self.state.step % cfg.optim.eval_steps == 0 \
                    and self.evaluate_and_checkpoint(epoch, epoch_done=False):
                return EARLY_STOP
        return None

    def _backward(self, mb: Micro, sync: bool) -> None:
        """This rank's share of a global micro-batch, forward and backward; gradients
        are synced across ranks only on an optimizer step's last micro-batch."""
        scale = mb.scale
        batch = {k: v.to(self.device, non_blocking=True)
                 for k, v in self.task.collate(mb.items).items()}
        with gradient_sync(self.model, self.strategy, sync, self.world):
            loss_sum = self.task.loss_sum(self.model, batch, self.autocast)
            (loss_sum * scale).backward()
        w = self.window
        w.loss += float(loss_sum) * scale / self.world  # this rank's part of the mean
        w.samples += mb.samples
        w.tokens += mb.tokens  # non-padding tokens

    def _optimizer_step(self, epoch: int, epoch_ends: bool) -> None:
        """One optimizer step on the accumulated gradients, and a step report when one
        is due."""
        import torch

        cfg, state = self.cfg, self.state
        lr = lr_at(state.step, self.total_steps, self.warmup_steps, cfg.optim.learning_rate)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        self.window.steps += 1
        if state.step % cfg.log_every_steps == 0 or state.step == self.total_steps \
                or epoch_ends:
            self._report_step(epoch, lr)

    def _report_step(self, epoch: int, lr: float) -> None:
        # Every rank reaches this at the same step: one scalar all-reduce gives the
        # exact loss of the window's global batches (and each epoch's last step closes
        # a window, so every epoch has its train loss).
        w = self.window
        loss = float(all_reduce([w.loss], self.device, self.world)[0]) / w.steps
        elapsed = max(time.perf_counter() - w.start, 1e-9)
        self.emit({"type": "step", "epoch": epoch + 1, "step": self.state.step,
                   "loss": loss, "lr": lr, "samples_per_s": w.samples / elapsed,
                   "tokens_per_s": w.tokens / elapsed})
        self.window = _Window()

    # ---- evaluation and checkpoints ----------------------------------------------
    def evaluate_and_checkpoint(self, epoch: int, epoch_done: bool) -> bool:
        """Exact eval on all ranks, a checkpoint from rank 0; True: stop early."""
        import ray.train
        from ray.train import CheckpointUploadMode

        state = self.state
        done = 1.0 if epoch_done else state.micro_in_epoch / self.micro_per_epoch
        metrics = {"epoch": epoch + 1, "step": state.step,
                   "epoch_progress": round(epoch + done, 4),
                   **self.task.evaluate_chunks(
                       self.model, self.data.eval_chunks(
                           self.cfg.micro_batch_size * 2,
                           reduce=lambda values: all_reduce(values, self.device, self.world)),
                       self.world, self.device, self.autocast)}
        stop = self.stopper.update(float(metrics[self.task.metric]))
        state.best, state.bad_evals = self.stopper.best, self.stopper.bad_evals
        metrics["early_stop"] = stop
        self.emit({"type": "eval", **metrics})
        state.reports += 1
        position = replace(state, epoch=epoch + 1, micro_in_epoch=0) if epoch_done \
            else replace(state)
        checkpoint, mode = None, CheckpointUploadMode.NO_UPLOAD
        if self.strategy == FSDP:
            checkpoint, mode = write_checkpoint(
                lambda folder: self._save_sharded(folder, position, metrics),
                self.rank, self.world, self.device)
        elif self.rank == 0:
            checkpoint, mode = write_checkpoint(
                lambda folder: self._save(folder, position, metrics))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=
                         mode == CheckpointUploadMode.SYNC)
        return stop

    def _save(self, folder: str, position: TrainState, metrics: dict[str, Any]) -> None:
        """Rank 0's DDP checkpoint: the model, the tokenizer, the optimizer and RNG."""
        self.task.save(unwrapped(self.model), folder, self.tokenizer)
        self.tokenizer.save_pretrained(folder)
        save_trainer_state(folder, self.optimizer, {
            **asdict(position), "metrics": self.task.state_metrics(metrics),
            "strategy": DDP})

    def _save_sharded(self, folder: str, position: TrainState,
                      metrics: dict[str, Any]) -> None:
        """Every rank's part of an FSDP checkpoint: its shards of the model and the
        optimizer; and from rank 0 the consolidated model, saved as a DDP run saves it
        (a copy of the model built on the CPU takes the gathered weights), the
        tokenizer, the RNG and counters."""
        save_sharded(folder, self.model, self.optimizer)
        weights = full_state_dict(self.model)
        if self.rank != 0:
            return
        whole = self.task.build_model(self.tokenizer)
        whole.load_state_dict(weights, strict=True, assign=True)
        del weights
        self.task.save(whole, folder, self.tokenizer)
        self.tokenizer.save_pretrained(folder)
        save_trainer_state(folder, None, {
            **asdict(position), "metrics": self.task.state_metrics(metrics),
            "strategy": FSDP})
