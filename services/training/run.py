"""The training driver: data -> Ray Train -> registry.

    from services.core.config import TrainConfig
    from services.training.run import run_training
    result = run_training(TrainConfig(model=..., train="data.csv", workers=2))

Reads and tokenises the data once on the driver (no tokenisation inside the loop),
ships it to the workers through the object store, runs `TorchTrainer`, shows progress
from rank 0's reports (and records them as Prometheus gauges, TensorBoard scalars and a
PNG of the curves in the run folder: services/training/tracking.py), and publishes the
best epoch's checkpoint with a manifest that links those artifacts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from services import __version__
from services.core.config import TrainConfig
from services.core.errors import ConfigError, DataError, InvalidInput, TrainingFailed
from services.core.metrics import observe as metrics_observe
from services.core.raycluster import ensure_ray
from services.core.registry import Registry
from services.training.tasks import Task, make_task
from services.training.tracking import RunTracker


@dataclass
class TrainResult:
    name: str
    version: Optional[str]
    promoted: bool
    metrics: dict[str, Any]
    run_dir: str
    registry: str
    checkpoint_dir: Optional[str] = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: Optional[int] = None
    artifacts: dict[str, str] = field(default_factory=dict)
    """What the run left to look at: `plot` (PNG) and `tensorboard` (folder)."""
    wall_s: float = 0.0
    publish_s: Optional[float] = None
    """Seconds the publish to the registry took (copy, checksums, manifest)."""
    samples_per_s: Optional[float] = None
    promotion: Optional[str] = None


def _versions() -> dict[str, str]:
    import ray
    import torch
    import transformers

    return {"tuneserve": __version__, "ray": ray.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


class _Progress:
    """Renders rank 0's events: a tqdm bar on a terminal, log lines otherwise."""

    def __init__(self, out: Callable[[str], None], bar: Optional[bool], task: Task):
        self.out = out
        self.task = task
        self.use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = None
        self.history: list[dict[str, Any]] = []
        self.last_rate: Optional[float] = None

    def handle(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "start":
            if ev.get("resumed"):
                self.out(f"resumed from the checkpoint at epoch {ev['resumed']['epoch']}, "
                         f"step {ev['resumed']['step']}")
            self.out(f"training: {ev['train_examples']} examples, {ev['eval_examples']} for "
                     f"eval, {ev['world_size']} worker(s), {ev['epochs']} epoch(s), "
                     f"{ev['total_steps']} optimizer steps")
            if self.use_bar:
                from tqdm import tqdm

                self.bar = tqdm(total=ev["total_steps"], unit="step", dynamic_ncols=True)
        elif kind == "step":
            self.history.append(ev)
            self.last_rate = ev["samples_per_s"]
            text = (f"epoch {ev['epoch']} step {ev['step']} loss {ev['loss']:.4f} "
                    f"lr {ev['lr']:.2e} {ev['samples_per_s']:.1f} samples/s")
            if ev.get("tokens_per_s") is not None:
                text += f" {ev['tokens_per_s']:.0f} tokens/s"
            if self.bar is not None:
                self.bar.n = ev["step"]
                self.bar.set_postfix_str(text, refresh=True)
            else:
                self.out(text)
        elif kind == "early_stop":
            self.out(f"early stopping at epoch {ev['epoch']} step {ev['step']}: no "
                     f"improvement in {ev['patience']} evaluation(s); best {ev['best']:.4f}")
        elif kind == "eval":
            self.history.append(ev)
            text = self.task.describe_eval(ev)
            if self.bar is not None:
                self.bar.write(text)
            else:
                self.out(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


RUN_CONFIG_FILE = "tuneserve_run.json"
"""Written into the run folder at the start: what `train --resume` needs."""
FINISHED_FILE = "tuneserve_finished.json"
"""Written into the run folder when the run ended well: its published version."""
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
"""What a model folder's tokenizer is saved as, in the message when there is none."""


def has_tokenizer_files(folder: Path) -> bool:
    """Whether a model folder holds a saved tokenizer of any kind: tokenizer.json,
    tokenizer_config.json, a vocabulary (vocab.txt, vocab.json, merges.txt) or a
    SentencePiece model (spiece.model, spm.model, tokenizer.model, ...). Without one,
    transformers builds an empty tokenizer from config.json alone, which reads every
    word as [UNK]."""
    return any(f.is_file() and ("tokenizer" in f.name or "vocab" in f.name
                                or f.name == "merges.txt" or f.suffix == ".model")
               for f in folder.iterdir())


def _run_folder(run: str, runs_dir: Optional[str]) -> Path:
    path = Path(run)
    if not path.is_dir():
        path = Path(runs_dir or TrainConfig().runs_dir) / run
    if not (path / RUN_CONFIG_FILE).is_file():
        from services.core.errors import ConfigError

        raise ConfigError(f"--resume: no run {run!r} (looked for {path / RUN_CONFIG_FILE}); "
                          f"give a run name from --runs-dir or a run folder")
    return path


def resume_config(run: str, runs_dir: Optional[str] = None,
                  address: Optional[str] = None) -> TrainConfig:
    """The config an interrupted run started with (its run folder's tuneserve_run.json)."""
    folder = _run_folder(run, runs_dir)
    path = folder / RUN_CONFIG_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"--resume: {path} is unreadable ({type(exc).__name__}: {exc}); "
                          "the run cannot be resumed") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ConfigError(f"--resume: {path} holds no run config (a 'config' mapping); "
                          "the run cannot be resumed")
    cfg = TrainConfig.from_dict(saved["config"], source=str(path))
    return dataclasses.replace(cfg, runs_dir=str(folder.parent), address=address or cfg.address)


def check_converged(best_metrics: dict[str, Any], run_dir: Path) -> None:
    """A best checkpoint whose eval loss is not a number holds weights that are not
    numbers either (the loss diverged): it is never published."""
    loss = best_metrics.get("eval_loss")
    if isinstance(loss, (int, float)) and not math.isfinite(loss):
        raise TrainingFailed(
            f"training diverged: the eval loss of the best checkpoint is {loss}, so its weights "
            "are not numbers; nothing was published. Lower --learning-rate (or --max-grad-norm)"
            f" and train again; the run is in {run_dir}")


def _check_resources(cfg: TrainConfig, resources: dict[str, float], local: bool,
                     out: Callable[[str], None]) -> None:
    """A run that asks for more CPUs or GPUs than the cluster has would wait for them
    without a word: on a cluster started here it never gets them (an error naming the
    flags), on one joined with --address an autoscaler may add nodes (a warning)."""
    needs = [("CPU", cfg.workers * cfg.cpus_per_worker,
              f"--workers {cfg.workers} x --cpus-per-worker {cfg.cpus_per_worker:g}")]
    if cfg.use_gpu:
        needs.append(("GPU", float(cfg.workers), f"--workers {cfg.workers} with --use-gpu"))
    for kind, need, flags in needs:
        have = float(resources.get(kind, 0.0))
        if need <= have + 1e-9:
            continue
        what = f"{need:g} {kind}s ({flags}) and the Ray cluster has {have:g}"
        if local:
            raise ConfigError(f"invalid config field 'workers': this run needs {what}; use "
                              "fewer workers or CPUs per worker, or --address to a larger "
                              "cluster")
        out(f"warning: this run needs {what}: it waits until the cluster has them (an "
            "autoscaling cluster adds nodes)")


def run_training(cfg: TrainConfig, *, publish: bool = True, promote: Optional[bool] = None,
                 out: Callable[[str], None] = print, progress_bar: Optional[bool] = None,
                 verbose: bool = False, resume: Optional[str] = None) -> TrainResult:
    """Train, evaluate each epoch, publish the best checkpoint. Raises TrainingFailed.

    `resume`: the name (or folder) of an interrupted run to continue from its last
    checkpoint; Ray Train finds it from the run's name and storage path.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from services.core.modeling import describe_model_ref, load_tokenizer, prepare_model_ref
    from services.training.loop import FAULT_ENV, train_loop_per_worker

    started = time.perf_counter()
    cfg = cfg.resolve()
    if resume:
        _check_unfinished(resume, cfg.runs_dir)
    if publish:
        _check_registry_task(cfg)
    model_ref = prepare_model_ref(
        cfg.model, field="model",
        progress=sys.stderr.isatty() if progress_bar is None else progress_bar)
    out(f"model: {describe_model_ref(cfg.model)}")
    tokenizer_help = (f"a model folder needs the tokenizer files save_pretrained writes, e.g. "
                      f"{', '.join(TOKENIZER_FILES[:2])}, beside config.json")
    if Path(model_ref).is_dir() and not has_tokenizer_files(Path(model_ref)):
        raise DataError(f"model {cfg.model!r} has no tokenizer files ({tokenizer_help})")
    try:
        tokenizer = load_tokenizer(cfg.model)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot load a tokenizer for model {cfg.model!r}: {first} "
                        f"({tokenizer_help})") from None
    if cfg.task == "generation" and cfg.lora_r:
        _check_lora_targets(model_ref, cfg.lora_target_modules)
    task = make_task(cfg)
    task.model_ref = model_ref  # what the workers load: a local folder made absolute
    data, data_info = task.prepare_data(cfg, tokenizer)
    cfg = cfg.with_max_length(task.max_length)  # what the manifest's config says was used
    out(task.describe_data())

    started_here = ensure_ray(cfg.address, verbose=verbose)
    _check_resources(cfg, ray.cluster_resources(), started_here, out)
    if resume:
        folder = _run_folder(resume, cfg.runs_dir)
        run_name, runs_dir = folder.name, folder.parent.resolve()
        out(f"resuming run {run_name}")
    else:
        run_name = (f"{cfg.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-"
                    f"{uuid.uuid4().hex[:6]}")
        runs_dir = Path(cfg.runs_dir).resolve()
        (runs_dir / run_name).mkdir(parents=True, exist_ok=True)
        (runs_dir / run_name / RUN_CONFIG_FILE).write_text(json.dumps(
            {"run": run_name, "config": cfg.to_dict(), "data": data_info,
             "versions": _versions()}, indent=2, default=str))
    queue = Queue(actor_options={"num_cpus": 0})
    loop_cfg = {
        "model": model_ref, "data_ref": ray.put(data), "task": task,
        "seed": cfg.seed, "epochs": cfg.epochs,
        "micro_batch_size": cfg.micro_batch_size, "grad_accum_steps": cfg.grad_accum_steps,
        "group_by_length": cfg.group_by_length,
        "learning_rate": cfg.learning_rate, "weight_decay": cfg.weight_decay,
        "warmup_ratio": cfg.warmup_ratio, "max_grad_norm": cfg.max_grad_norm,
        "cpus_per_worker": cfg.cpus_per_worker, "use_gpu": cfg.use_gpu,
        "log_every_steps": cfg.log_every_steps, "progress_queue": queue,
        "metric_tags": {"run": run_name, "model": cfg.name},
        "eval_steps": cfg.eval_steps,
        "early_stopping_patience": cfg.early_stopping_patience,
        "early_stopping_min_delta": cfg.early_stopping_min_delta,
        "run_dir": str(runs_dir / run_name),
        "fault_injection": os.environ.get(FAULT_ENV),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name, storage_path=str(runs_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=2,
                                               checkpoint_score_attribute=task.metric,
                                               checkpoint_score_order=task.metric_mode),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    progress = _Progress(out, progress_bar, task)
    tracker = RunTracker(runs_dir / run_name, run_name, cfg.name, config=cfg.to_dict(),
                         out=out, gauges=False)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # reported on the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="tuneserve-fit", daemon=True)
    thread.start()
    resume_hint = f"`tuneserve train --resume {run_name} --runs-dir {runs_dir}`"
    interrupted = False
    try:
        while thread.is_alive() or not queue.empty():
            try:
                event = queue.get(timeout=0.5)
            except Empty:
                continue
            progress.handle(event)
            tracker.handle(event)
    except KeyboardInterrupt:
        # Not waiting for the run: its controller and workers belong to this driver
        # and end with it (and with the local cluster, shut down here). A checkpoint
        # being written is never seen half-written (write_checkpoint renames it whole).
        interrupted = True
        progress.close()
        out(f"interrupted: run {run_name} stopped; nothing was published. Continue it "
            f"from its last checkpoint with {resume_hint}")
        if started_here:
            ray.shutdown()
        raise
    finally:
        progress.close()
        tracker.close()
        if not interrupted:
            thread.join()
            ray.kill(queue.actor, no_restart=True)
    error = outcome.get("error") or getattr(outcome.get("result"), "error", None)
    if error is not None:
        cause, bad_input = _root_cause(error)
        advice = (f"fix it and train again (--resume keeps the config the run started with)"
                  if bad_input else f"continue it with {resume_hint} once the cause is fixed")
        raise TrainingFailed(
            f"training failed (worker failures tolerated: {cfg.max_failures}; nothing was "
            f"published): {cause}. {advice[0].upper()}{advice[1:]}.") from None
    result = outcome["result"]
    best = result.get_best_checkpoint(task.metric, task.metric_mode) or result.checkpoint
    if best is None:
        raise TrainingFailed("training produced no checkpoint")
    best_metrics = next((m for c, m in result.best_checkpoints if c.path == best.path),
                        result.metrics)
    metrics = task.summary(best_metrics)
    res = TrainResult(name=cfg.name, version=None, promoted=False, metrics=metrics,
                      run_dir=str(runs_dir / run_name), registry=str(cfg.registry),
                      checkpoint_dir=best.path, history=progress.history,
                      best_epoch=best_metrics.get("epoch"),
                      samples_per_s=progress.last_rate)
    res.artifacts = tracker.artifacts(tracker.plot())
    check_converged(best_metrics, runs_dir / run_name)
    if publish:
        manifest = {
            "task": cfg.task, "base_model": cfg.model, "labels": task.label_names,
            **task.manifest_fields(),
            "metrics": metrics, "best_epoch": best_metrics.get("epoch"),
            "per_class": best_metrics.get("eval_per_class"),
            "confusion_matrix": best_metrics.get("confusion_matrix"),
            "config": cfg.to_dict(), "data": data_info, "run": run_name,
            "versions": _versions(), "artifacts": res.artifacts,
        }
        registry = Registry(cfg.registry)
        publish_started = time.perf_counter()
        if promote is None and cfg.promote:
            promote = False  # the gate below decides, for a first version too
        with best.as_directory() as ckpt_dir, _publishable(ckpt_dir) as folder:
            pub = registry.publish(cfg.name, folder, manifest, promote=promote)
        res.publish_s = time.perf_counter() - publish_started
        metrics_observe("tuneserve_checkpoint_publish_duration_seconds", res.publish_s,
                        model=cfg.name)
        res.version, res.promoted = pub.version, pub.promoted
        res.checkpoint_dir = str(pub.path)
        if cfg.promote and not pub.promoted:
            from services.training.promotion import decide

            key = task.metric.removeprefix("eval_")
            ok, res.promotion = decide(registry, cfg.name, pub.version, metrics, key,
                                       task.metric_mode, cfg.min_metric)
            if ok:
                registry.set_channel(cfg.name, "production", pub.version)
                res.promoted = True
    res.wall_s = time.perf_counter() - started
    (runs_dir / run_name / FINISHED_FILE).write_text(json.dumps(
        {"name": cfg.name, "version": res.version, "checkpoint": res.checkpoint_dir}))
    return res


@contextlib.contextmanager
def _publishable(ckpt_dir: str):
    """The checkpoint without the files only resuming needs (optimizer state, adapter)."""
    from services.training.tasks import RESUME_ONLY_FILES

    with tempfile.TemporaryDirectory(prefix="tuneserve-publish-") as tmp:
        for entry in Path(ckpt_dir).iterdir():
            if entry.name in RESUME_ONLY_FILES:
                continue
            target = Path(tmp) / entry.name
            if entry.is_dir():
                shutil.copytree(entry, target)
                continue
            try:
                os.link(entry, target)
            except OSError:
                shutil.copy2(entry, target)
        yield tmp


def _root_cause(exc: BaseException) -> tuple[str, bool]:
    """The innermost error's message, without Ray's wrapping and tracebacks."""
    seen = set()
    while True:
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(exc))
        exc = nxt
    text = str(exc).strip().splitlines()
    last = text[-1] if text else ""
    # A worker's own error arrives as text in Ray's wrapper ("WorkerGroupError:
    # services.core.errors.ConfigError: invalid config field ..."): our input errors are
    # shown as their message alone, and no resume can fix them.
    ours = re.search(r"services\.(?:core\.)?errors\.(ConfigError|DataError|InvalidInput): (.*)", last)
    if ours or isinstance(exc, InvalidInput):
        return (ours.group(2) if ours else last), True
    return (f"{type(exc).__name__}: {last}" if last else type(exc).__name__), False


def _check_unfinished(run: str, runs_dir: Optional[str]) -> None:
    """--resume of a run that finished would train nothing and publish its checkpoint
    again as a new version."""
    marker = _run_folder(run, runs_dir) / FINISHED_FILE
    if not marker.is_file():
        return
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        done = {}
    where = (f" and was published as {done.get('name')} {done['version']}"
             if isinstance(done, dict) and done.get("version") else "")
    raise ConfigError(f"--resume: run {run!r} already finished{where}; nothing to continue "
                      "(train again without --resume for a new run)")


def _check_registry_task(cfg: TrainConfig) -> None:
    """A run whose model name holds versions of the other task would fail at publish,
    after the whole run: say so before it starts."""
    from services.core.errors import RegistryError

    try:
        registry = Registry(cfg.registry)
    except RegistryError as exc:  # e.g. a bucket that does not exist
        raise ConfigError(f"invalid config field 'registry': {exc.message}") from None
    try:
        registry.check_task(cfg.name, "", cfg.task)
    except RegistryError as exc:
        raise ConfigError(f"invalid config field 'name': {exc.message}") from None


def _check_lora_targets(model_ref: str, targets: Optional[list[str]]) -> None:
    """LoRA's target modules exist in the model: checked on an empty (meta) copy of it
    here, not by every worker after Ray started."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("invalid config field 'lora_r': LoRA needs the peft package "
                          "(pip install peft)") from None
    config = AutoConfig.from_pretrained(model_ref)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    from transformers.pytorch_utils import Conv1D

    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, (torch.nn.Linear, Conv1D))})
    try:
        get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=1, target_modules=targets,
            fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules())))
    except ValueError as exc:
        raise ConfigError(f"invalid config field 'lora_target_modules': "
                          f"{str(exc).splitlines()[0]} (the model's linear layers: "
                          f"{', '.join(linear)})") from None
