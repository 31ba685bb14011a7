"""The training driver: `run_training` is preflight -> prepare -> fit -> publish_best.

    from services.core.config import TrainConfig
    from services.training.run import run_training
    result = run_training(TrainConfig(model=..., train="data.csv", workers=2))

preflight checks what can fail before Ray starts; prepare reads and tokenises the data
once on the driver, or (streamed: services/training/streamed.py) counts it in one pass
of Ray Data and leaves reading and tokenising to the cluster as it trains; fit runs Ray Train (workers: loop.py), shows rank 0's progress and
records it (tracking.py); publish_best publishes the best checkpoint with a manifest
that links those records, and gates promotion.
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
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from services import __version__
from services.core.config import (DEFAULT_RUNS_DIR, GENERATION, ResolvedTrainConfig,
                                  TrainConfig)
from services.core.errors import (ConfigError, DataError, InvalidInput, RegistryError,
                                  TrainingFailed)
from services.core.metrics import observe as metrics_observe
from services.core.objectstore import is_remote
from services.core.modeling import describe_model_ref, load_tokenizer, prepare_model_ref
from services.core.raycluster import ensure_ray
from services.core.registry import Registry
from services.core.sources import resolve as resolve_source
from services.training.encoded import EncodedSplit
from services.training.loop import LoopConfig, make_trainer
from services.training.promotion import (decide, learned_check, majority_baseline,
                                          not_promoted_note, same_rows,
                                          single_predicted_class)
from services.training.runs import RunsDir, checkpoint_location
from services.training.search import (SearchPlan, concurrent_trials, describe_params,
                                       run_search, trial_params)
from services.training.streamed import StreamedData, decide as decide_streaming
from services.training.tasks import RESUME_ONLY_FILES, Task, make_task
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
    canary_ready: bool = False
    """Published beside production for --rollout canary to roll out (it learned, and
    passed the --promote gate where given); production did not move."""


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
        self.strategy: Optional[dict[str, str]] = None
        """How the workers held the model (the start event's strategy and why)."""

    def handle(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "start":
            if ev.get("resumed"):
                self.out(f"resumed from the checkpoint at epoch {ev['resumed']['epoch']}, "
                         f"step {ev['resumed']['step']}")
            if ev.get("strategy"):
                self.strategy = {"value": ev["strategy"], "why": ev.get("strategy_why", "")}
                self.out(f"strategy: {ev['strategy']} ({self.strategy['why']})")
            bound = f" (--max-steps {ev['max_steps']})" if ev.get("max_steps") else ""
            self.out(f"training: {ev['train_examples']} examples, {ev['eval_examples']} for "
                     f"eval, {ev['world_size']} worker(s), {ev['epochs']} epoch(s), "
                     f"{ev['total_steps']} optimizer steps{bound}")
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
        elif kind == "max_steps":
            self.out(f"stopping at epoch {ev['epoch']} step {ev['step']}: --max-steps reached")
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


def _run_folder(run: str, runs_dir: Optional[str]) -> tuple[RunsDir, str]:
    """(runs folder, run name) of an existing run: a name in runs_dir, or a local run
    folder."""
    if not is_remote(run) and Path(run).is_dir():
        runs, name = RunsDir.of(Path(run).resolve().parent), Path(run).resolve().name
    else:
        runs, name = RunsDir.of(runs_dir or DEFAULT_RUNS_DIR), run
    if not runs.exists(name, RUN_CONFIG_FILE):
        raise ConfigError(f"--resume: no run {run!r} (looked for "
                          f"{runs.shown(name)}/{RUN_CONFIG_FILE}); give a run name from "
                          "--runs-dir or a run folder")
    return runs, name


def resume_config(run: str, runs_dir: Optional[str] = None,
                  address: Optional[str] = None) -> TrainConfig:
    """The config an interrupted run started with (its run folder's tuneserve_run.json)."""
    runs, name = _run_folder(run, runs_dir)
    path = f"{runs.shown(name)}/{RUN_CONFIG_FILE}"
    try:
        saved = json.loads(runs.read_text(name, RUN_CONFIG_FILE))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"--resume: {path} is unreadable ({type(exc).__name__}: {exc}); "
                          "the run cannot be resumed") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
        raise ConfigError(f"--resume: {path} holds no run config (a 'config' mapping); "
                          "the run cannot be resumed")
    cfg = TrainConfig.from_dict(saved["config"], source=str(path))
    return dataclasses.replace(cfg, runs_dir=runs.storage_path,
                               address=address or cfg.address)


def check_converged(best_metrics: dict[str, Any], run_dir: str | Path) -> None:
    """A best checkpoint whose eval loss is not a number holds weights that are not
    numbers either (the loss diverged): it is never published."""
    loss = best_metrics.get("eval_loss")
    if isinstance(loss, (int, float)) and not math.isfinite(loss):
        raise TrainingFailed(
            f"training diverged: the eval loss of the best checkpoint is {loss}, so its weights "
            "are not numbers; nothing was published. Lower --learning-rate (or --max-grad-norm)"
            f" and train again; the run is in {run_dir}")


def _check_resources(cfg: ResolvedTrainConfig, resources: dict[str, float], local: bool,
                     out: Callable[[str], None], nodes: int = 1) -> None:
    """A run that asks for more CPUs or GPUs than the cluster has, or for more nodes
    than its `nodes` alive (STRICT_SPREAD), would wait for them without a word: on a
    cluster started here it never gets them (an error naming the flags), on one joined
    with --address an autoscaler may add nodes (a warning)."""
    c = cfg.cluster
    if c.placement_strategy == "STRICT_SPREAD" and c.workers > nodes:
        what = (f"--placement-strategy STRICT_SPREAD puts each of the {c.workers} workers "
                f"on a node of its own and the Ray cluster has {nodes}")
        if local:
            raise ConfigError(f"invalid config field 'placement_strategy': {what}; use "
                              "SPREAD, or --address to a cluster with more nodes")
        out(f"warning: {what}: the run waits until it has more (an autoscaling cluster "
            "adds nodes)")
    needs = [("CPU", c.workers * c.cpus_per_worker,
              f"--workers {c.workers} x --cpus-per-worker {c.cpus_per_worker:g}")]
    if c.use_gpu:
        needs.append(("GPU", float(c.workers), f"--workers {c.workers} with --use-gpu"))
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


def _alive_nodes() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node["Alive"])


def run_training(cfg: TrainConfig | ResolvedTrainConfig, *, publish: bool = True,
                 promote: Optional[bool] = None, out: Callable[[str], None] = print,
                 progress_bar: Optional[bool] = None, verbose: bool = False,
                 resume: Optional[str] = None) -> TrainResult:
    """Train, evaluate each epoch, publish the best checkpoint. Raises TrainingFailed.

    `resume`: the name (or folder) of an interrupted run to continue from its last
    checkpoint; Ray Train finds it from the run's name and storage path.
    """
    started = time.perf_counter()
    resolved = cfg.resolve()
    model_ref, tokenizer = preflight(resolved, publish=publish, resume=resume,
                                     progress_bar=progress_bar, out=out)
    prepared = prepare(resolved, model_ref, tokenizer, out, verbose=verbose)
    if resolved.tuning.search:
        fitted = fit_search(prepared, out=out, verbose=verbose)
    else:
        fitted = fit(prepared, resume=resume, out=out, progress_bar=progress_bar,
                     verbose=verbose)
    res = fitted.result(prepared)
    check_converged(fitted.best_metrics, fitted.run_dir)
    quality = quality_record(prepared.task.label_names, fitted.best_metrics, res.metrics)
    if quality.get("single_class") is not None:
        out(f"warning: the model predicts {quality['single_class']!r} for every one of the "
            f"{quality['baseline']['examples']} eval examples: it learned nothing from "
            "the texts (more data, more epochs or another learning rate may help)")
    if publish:
        publish_best(prepared, fitted, res, promote, quality, out)
    res.wall_s = time.perf_counter() - started
    runs = fitted.runs or RunsDir.of(Path(fitted.run_dir).parent)
    runs.write_text(fitted.run_name, FINISHED_FILE, json.dumps(
        {"name": res.name, "version": res.version, "checkpoint": res.checkpoint_dir}))
    return res


@dataclass(frozen=True)
class Prepared:
    """The run's data, tokenised on the driver, and its config with max_length chosen."""

    cfg: ResolvedTrainConfig
    task: Task
    data: dict[str, EncodedSplit]
    data_info: dict[str, Any]
    """What the manifest records about the data (files, split, lengths)."""
    eval_rows: Optional[tuple[list[str], list[str]]] = None
    """A classifier run's eval texts and labels as read, for the promotion gate to
    score production on (`promotion.same_rows`); None for a generation run or a
    streamed one."""
    streamed: Optional[StreamedData] = None
    """A streamed run's row counts for the workers; `data` then holds the "train" and
    "eval" Ray Datasets, which go to the trainer."""
    ray_started: bool = False
    """Whether preparing the data started the local Ray cluster (streamed runs)."""


@dataclass(frozen=True)
class Fitted:
    """A finished Ray Train run and its best checkpoint."""

    run_name: str
    run_dir: str | Path
    """The run's folder as shown: a path, or a URI in object storage."""
    checkpoint: Any
    """ray.train.Checkpoint of the best evaluation."""
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    samples_per_s: Optional[float]
    artifacts: dict[str, str]
    steps: Optional[int] = None
    """Optimizer steps the run made (its last report's step)."""
    search: Optional[dict[str, Any]] = None
    """The search that chose this run (services/training/search.py), if any."""
    strategy: Optional[dict[str, str]] = None
    """How the workers held the model: {"value": ddp or fsdp, "why": ...}."""
    runs: Optional[RunsDir] = None
    """The folder of runs `run_dir` is in; None: run_dir's parent folder."""

    def result(self, prep: Prepared) -> TrainResult:
        """The run's result before publishing."""
        cfg = prep.cfg
        metrics = prep.task.summary(self.best_metrics)
        baseline = majority_baseline(self.best_metrics.get("confusion_matrix"),
                                     prep.task.label_names)
        if baseline is not None:
            metrics.update(baseline_accuracy=baseline.accuracy,
                           baseline_macro_f1=baseline.macro_f1)
        return TrainResult(name=cfg.publish.name, version=None, promoted=False,
                           metrics=metrics,
                           run_dir=str(self.run_dir), registry=str(cfg.publish.registry),
                           checkpoint_dir=checkpoint_location(self.checkpoint),
                           history=self.history,
                           best_epoch=self.best_metrics.get("epoch"),
                           artifacts=self.artifacts, samples_per_s=self.samples_per_s)


def preflight(cfg: ResolvedTrainConfig, *, publish: bool, resume: Optional[str],
              progress_bar: Optional[bool], out: Callable[[str], None]) -> tuple[str, Any]:
    """What fails before any data is read or Ray starts: a finished run to resume, a
    name that holds the other task, a model or tokenizer that cannot be loaded, LoRA
    targets the model lacks. Returns the model's reference for the workers and its
    tokenizer."""
    runs = RunsDir.of(cfg.cluster.runs_dir)
    runs.check()
    if cfg.tuning.search and not runs.local:
        raise ConfigError("invalid config field 'runs_dir': a --search keeps its trials in "
                          "a folder (local, or a volume every node mounts), not in "
                          f"object storage ({runs.shown()})")
    if resume:
        _check_unfinished(resume, cfg.cluster.runs_dir)
        if cfg.tuning.search:
            raise ConfigError(f"--resume: run {resume!r} was a --search, which cannot be "
                              "resumed; run the search again")
    elif cfg.cluster.run_name and runs.exists(cfg.cluster.run_name, RUN_CONFIG_FILE):
        _check_unfinished(cfg.cluster.run_name, cfg.cluster.runs_dir, flag="--run-name")
        if cfg.tuning.search:
            raise ConfigError(f"invalid config field 'run_name': run "
                              f"{cfg.cluster.run_name!r} exists and a --search cannot be "
                              "resumed; give another run name")
    if publish:
        _check_registry_task(cfg)
    model = cfg.modeling.model
    model_ref = prepare_model_ref(
        model, field="model",
        progress=sys.stderr.isatty() if progress_bar is None else progress_bar)
    out(f"model: {describe_model_ref(model)}")
    tokenizer_help = (f"a model folder needs the tokenizer files save_pretrained writes, e.g. "
                      f"{', '.join(TOKENIZER_FILES[:2])}, beside config.json")
    if Path(model_ref).is_dir() and not has_tokenizer_files(Path(model_ref)):
        raise DataError(f"model {model!r} has no tokenizer files ({tokenizer_help})")
    try:
        tokenizer = load_tokenizer(model)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot load a tokenizer for model {model!r}: {first} "
                        f"({tokenizer_help})") from None
    if cfg.task == GENERATION and cfg.modeling.lora_r:
        _check_lora_targets(model_ref, cfg.lora_target_modules)
    if cfg.cluster.activation_checkpointing:
        _check_activation_checkpointing(model_ref, cfg.task)
    return model_ref, tokenizer


def data_task_cpus(cfg: ResolvedTrainConfig, resources: dict[str, float]) -> float:
    """CPUs each Ray Data task of a streamed run asks for: 1, or 0 (one task at a time,
    beside the workers) when the training workers would leave less than one of the
    CPUs free now (`resources`: ray.available_resources())."""
    c = cfg.cluster
    free = float(resources.get("CPU", 0.0)) - c.workers * c.cpus_per_worker
    return 1.0 if free >= 1.0 else 0.0


def prepare(cfg: ResolvedTrainConfig, model_ref: str, tokenizer,
            out: Callable[[str], None], verbose: bool = False) -> Prepared:
    """Reads and tokenises the data once, on the driver (the workers get the tokens);
    or, streamed, counts it with Ray Data and plans its tokenising on the cluster."""
    task = make_task(cfg, model_ref)
    d = cfg.data
    mode = "off" if cfg.tuning.search and d.data_streaming == "auto" else d.data_streaming
    streaming, why = False, "--data-streaming off"
    if mode != "off":
        sources = [resolve_source(d.train)] + ([resolve_source(d.eval)] if d.eval else [])
        streaming, why = decide_streaming(mode, sources)
    if streaming:
        import ray

        started = ensure_ray(cfg.cluster.address, verbose=verbose)
        cpus = data_task_cpus(cfg, ray.available_resources())
        out(f"data: streamed through Ray Data ({why})")
        data, (n_train, n_eval), data_info = task.prepare_stream(
            cfg, tokenizer, sources[0], sources[1] if d.eval else None, cpus)
        data_info["streaming"] = {"on": True, "why": why}
        out(task.describe_data())
        cfg = task.choose_settings(cfg, n_train, out)
        world = cfg.cluster.workers
        if n_train < world:
            raise DataError(f"{d.train}: {n_train} training rows for {world} workers")
        return Prepared(cfg.with_max_length(task.max_length), task, data, data_info,
                        streamed=StreamedData((n_train // world) * world, n_eval),
                        ray_started=started)
    data, data_info = task.prepare_data(cfg, tokenizer)
    data_info["streaming"] = {"on": False, "why": why}
    out(task.describe_data())
    # Kept on the driver: the task itself goes to every worker.
    rows, task.eval_rows = task.eval_rows, None
    # What the data and model chose (max_length, pooling, small-data settings) goes
    # into the config the workers train with and the manifest records.
    cfg = task.choose_settings(cfg, len(data["train"]), out)
    return Prepared(cfg.with_max_length(task.max_length), task, data, data_info, rows)


def fit(prep: Prepared, *, resume: Optional[str], out: Callable[[str], None],
        progress_bar: Optional[bool], verbose: bool) -> Fitted:
    """Runs Ray Train to the end, showing and recording rank 0's progress; the best
    checkpoint. TrainingFailed names the cause (and how to resume, where that helps)."""
    import ray

    cfg = prep.cfg
    started_here = ensure_ray(cfg.cluster.address, verbose=verbose) or prep.ray_started
    _check_resources(cfg, ray.cluster_resources(), started_here, out, nodes=_alive_nodes())
    run_name, runs = _open_run(prep, resume, out)
    # TensorBoard events and the curves: written into the run's folder, or for a run in
    # object storage into a local folder first and copied there when the run ends.
    staging = None if runs.local else Path(tempfile.mkdtemp(prefix=f"tuneserve-{run_name}-"))
    run_dir = Path(runs.path(run_name)) if staging is None else staging
    try:
        fitted = _fit_run(prep, run_name, runs, run_dir, started_here, out=out,
                          progress_bar=progress_bar)
    finally:
        if staging is not None:
            _keep_staged(runs, run_name, staging, out)
    if staging is not None:
        fitted = dataclasses.replace(fitted, artifacts={
            key: f"{runs.shown(run_name)}/{Path(path).relative_to(staging).as_posix()}"
            for key, path in fitted.artifacts.items()})
    return fitted


def _keep_staged(runs: RunsDir, run_name: str, staging: Path,
                 out: Callable[[str], None]) -> None:
    """Copies what the driver wrote locally into the run's folder in object storage
    (a failed copy is said in one line, never fails the run), and removes it here."""
    try:
        if any(staging.iterdir()):
            runs.upload(run_name, staging)
    except Exception as exc:  # noqa: BLE001 - the run's results do not depend on it
        out(f"tensorboard and curves: not copied to {runs.shown(run_name)} "
            f"({type(exc).__name__}: {exc})")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def published_checkpoint(result, task: Task, out: Callable[[str], None]):
    """The checkpoint a finished run publishes, and its metrics: the best evaluation by
    the task's metric, or the last one where the task finds the two within the eval
    set's noise (Task.prefer_last), which is then said."""
    best = result.get_best_checkpoint(task.metric, task.metric_mode) or result.checkpoint
    if best is None:
        raise TrainingFailed("training produced no checkpoint")
    metrics = {c.path: m for c, m in result.best_checkpoints}
    best_metrics = metrics.get(best.path, result.metrics)
    last = result.checkpoint
    if last is None or last.path == best.path:
        return best, best_metrics
    last_metrics = metrics.get(last.path, result.metrics)
    keep_last, why = task.prefer_last(best_metrics, last_metrics)
    if why:
        out(why)
    return (last, last_metrics) if keep_last else (best, best_metrics)


def _fit_run(prep: Prepared, run_name: str, runs: RunsDir, run_dir: Path,
             started_here: bool, *, out: Callable[[str], None],
             progress_bar: Optional[bool]) -> Fitted:
    """fit's Ray Train run, its progress shown and recorded into `run_dir`."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cfg, task = prep.cfg, prep.task
    # On the driver's node, as Ray Train's controller is: a lost worker node costs the
    # run a restart from its checkpoint, not its progress reports.
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy":
                                 NodeAffinitySchedulingStrategy(
                                     ray.get_runtime_context().get_node_id(), soft=False)})
    streamed = prep.streamed is not None
    loop_cfg = LoopConfig.from_config(cfg, model_ref=task.model_ref,
                                      data_ref=prep.streamed if streamed
                                      else ray.put(prep.data), task=task,
                                      progress_queue=queue, run_name=run_name)
    trainer = make_trainer(loop_cfg, cfg.cluster, run_name, runs.storage_path,
                           datasets=prep.data if streamed else None)
    progress = _Progress(out, progress_bar, task)
    tracker = RunTracker(run_dir, run_name, cfg.publish.name, config=cfg.to_dict(),
                         out=out, gauges=False)
    resume_hint = (f"`tuneserve train --resume {run_name} --runs-dir "
                   f"{shlex.quote(runs.storage_path)}`")
    outcome = _watch(trainer, queue, progress, tracker, started_here, out,
                     interrupted=(f"interrupted: run {run_name} stopped; nothing was "
                                  f"published. Continue it from its last checkpoint with "
                                  f"{resume_hint}"))
    result = _succeeded(outcome, cfg, resume_hint)
    best, best_metrics = published_checkpoint(result, task, out)
    return Fitted(run_name=run_name, run_dir=runs.shown(run_name) if not runs.local
                  else run_dir, checkpoint=best,
                  best_metrics=best_metrics, history=progress.history,
                  samples_per_s=progress.last_rate,
                  artifacts=tracker.artifacts(tracker.plot()),
                  steps=max((e["step"] for e in progress.history), default=None),
                  strategy=progress.strategy, runs=runs)


def fit_search(prep: Prepared, *, out: Callable[[str], None], verbose: bool) -> Fitted:
    """Runs the hyperparameter search (services/training/search.py) in a new run folder;
    the best checkpoint of its best trial, with the search's record."""
    import ray
    from ray.train import Checkpoint

    cfg, task = prep.cfg, prep.task
    started_here = ensure_ray(cfg.cluster.address, verbose=verbose)
    resources = ray.cluster_resources()
    _check_resources(cfg, resources, started_here, out, nodes=_alive_nodes())
    run_name, runs = _open_run(prep, None, out)
    run_dir = Path(runs.path(run_name))  # a folder: preflight refuses a search elsewhere
    loop_cfg = LoopConfig.from_config(cfg, model_ref=task.model_ref,
                                      data_ref=ray.put(prep.data), task=task,
                                      progress_queue=None, run_name=run_name)
    trials = cfg.tuning.search_trials
    plan = SearchPlan(loop_cfg=loop_cfg, cluster=cfg.cluster, storage=str(run_dir),
                      params=trial_params(cfg.optim, trials, cfg.optim.seed),
                      concurrent=concurrent_trials(cfg.cluster, resources, trials),
                      time_budget_s=cfg.tuning.search_time_budget_s)
    try:
        found = run_search(plan, out)
    except KeyboardInterrupt:
        out(f"interrupted: search {run_name} stopped; nothing was published")
        raise
    except RuntimeError as exc:
        raise TrainingFailed(f"the search failed, no trial reported an evaluation "
                             f"(nothing was published): {exc}") from None
    out(f"search: trial {found.best_trial} is best "
        f"({describe_params(plan.params[found.best_trial])})")
    return Fitted(run_name=run_name, run_dir=run_dir,
                  checkpoint=Checkpoint.from_directory(found.checkpoint_path),
                  best_metrics=found.best_metrics, history=found.history,
                  samples_per_s=None, artifacts={},
                  steps=max((e["step"] for e in found.history), default=None),
                  search=found.record, runs=runs)


def _open_run(prep: Prepared, resume: Optional[str],
              out: Callable[[str], None]) -> tuple[str, RunsDir]:
    """(run name, runs folder): the interrupted run's, or a new run's folder with the
    config, data and versions `train --resume` starts from (RUN_CONFIG_FILE)."""
    cfg = prep.cfg
    named = cfg.cluster.run_name
    runs = RunsDir.of(cfg.cluster.runs_dir)
    if not resume and named and runs.exists(named, RUN_CONFIG_FILE):
        resume = named  # a retry or a re-submission of the run: on from its checkpoint
    if resume:
        runs, name = _run_folder(resume, cfg.cluster.runs_dir)
        out(f"resuming run {name}")
        return name, runs
    run_name = named or (f"{cfg.publish.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
                         f"-{uuid.uuid4().hex[:6]}")
    runs.write_text(run_name, RUN_CONFIG_FILE, json.dumps(
        {"run": run_name, "config": cfg.to_dict(), "data": prep.data_info,
         "versions": _versions()}, indent=2, default=str))
    return run_name, runs


def _watch(trainer, queue, progress: _Progress, tracker: RunTracker, started_here: bool,
           out: Callable[[str], None], interrupted: str) -> dict[str, Any]:
    """trainer.fit() on a thread while this one shows and records the progress events;
    {"result": ...} or {"error": ...}. Ctrl-C stops the run (`interrupted` says so)."""
    import ray
    from ray.util.queue import Empty

    outcome: dict[str, Any] = {}

    def fit_run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # reported on the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit_run, name="tuneserve-fit", daemon=True)
    thread.start()
    stopped = False
    # Ctrl-C is noted here and acted on at the loop's next turn (within 0.5 s): a
    # KeyboardInterrupt raised inside Ray's calls (queue.get) can be lost there, and
    # the run would go on.
    ctrl_c = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: ctrl_c.set()) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        while thread.is_alive() or not queue.empty():
            if ctrl_c.is_set():
                raise KeyboardInterrupt
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
        stopped = True
        progress.close()
        out(interrupted)
        if started_here:
            ray.shutdown()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts at once
        progress.close()
        tracker.close()
        if not stopped:
            thread.join()
            ray.kill(queue.actor, no_restart=True)
    return outcome


def _succeeded(outcome: dict[str, Any], cfg: ResolvedTrainConfig, resume_hint: str):
    """The Ray Train result of a run that ended well; else TrainingFailed with the
    cause and what to do."""
    error = outcome.get("error") or getattr(outcome.get("result"), "error", None)
    if error is None:
        return outcome["result"]
    cause, bad_input = _root_cause(error)
    advice = ("fix it and train again (--resume keeps the config the run started with)"
              if bad_input else f"continue it with {resume_hint} once the cause is fixed")
    raise TrainingFailed(
        f"training failed (worker failures tolerated: {cfg.cluster.max_failures}; nothing "
        f"was published): {cause}. {advice[0].upper()}{advice[1:]}.") from None


def quality_record(labels: list[str], best: dict[str, Any],
                   metrics: dict[str, float]) -> dict[str, Any]:
    """What the manifest records about whether the best checkpoint learned anything:
    the majority-class baseline of a classifier's eval set, the one label it predicts
    for every eval example (if it does), and `learned_check`'s verdict."""
    baseline = majority_baseline(best.get("confusion_matrix"), labels)
    record: dict[str, Any] = {
        "baseline": baseline.to_dict() if baseline else None,
        "single_class": single_predicted_class(best.get("confusion_matrix"), labels)}
    record["learned"], record["learned_check"] = learned_check(metrics, record["baseline"])
    record["checked"] = baseline is not None or "initial_loss" in metrics
    return record


def publish_best(prep: Prepared, fitted: Fitted, res: TrainResult, promote: Optional[bool],
                 quality: dict[str, Any], out: Callable[[str], None] = print) -> None:
    """Publishes the best checkpoint with its manifest (into `res`). Production moves to
    it when it learned something (`quality`) and, with --promote, when the eval gate
    lets it; `promote=True` (--promote-anyway) moves it regardless. With --rollout
    canary, a version that would be promoted is marked `canary_ready` instead (the
    caller rolls it out), unless it is the model's first."""
    cfg, task = prep.cfg, prep.task
    best = fitted.best_metrics
    manifest = {
        "task": cfg.task, "base_model": cfg.modeling.model, "labels": task.label_names,
        **task.manifest_fields(),
        "metrics": res.metrics, "best_epoch": best.get("epoch"),
        "per_class": best.get("eval_per_class"),
        "confusion_matrix": best.get("confusion_matrix"), "quality": quality,
        "config": cfg.to_dict(), "data": prep.data_info, "run": fitted.run_name,
        "versions": _versions(), "artifacts": res.artifacts,
        "bounds": bounds_record(cfg.optim.max_steps, fitted.steps),
        "strategy": fitted.strategy,
    }
    if fitted.search is not None:
        # The config that trained these weights: the best trial's, run without a search.
        manifest["config"].update(fitted.search["best_params"], search=False)
        manifest["search"] = fitted.search
    name = cfg.publish.name
    registry = Registry(cfg.publish.registry)
    publish_started = time.perf_counter()
    held_back = promote is None and not quality["learned"]
    if promote is None and (cfg.publish.promote or held_back):
        promote = False  # the gates below decide, for a first version too
    gate = None
    with fitted.checkpoint.as_directory() as ckpt_dir, _publishable(ckpt_dir) as folder:
        if cfg.publish.promote and promote is False and quality["learned"]:
            gate = same_rows(registry, name, folder, prep.eval_rows,
                             task.metric.removeprefix("eval_"), out)
            if gate:
                manifest["gate"] = gate
        pub = registry.publish(name, folder, manifest, promote=promote)
    res.publish_s = time.perf_counter() - publish_started
    metrics_observe("tuneserve_checkpoint_publish_duration_seconds", res.publish_s,
                    model=name)
    res.version, res.promoted = pub.version, pub.promoted
    res.checkpoint_dir = str(pub.path)
    if cfg.publish.promote and not pub.promoted:
        ok, res.promotion = decide(registry, name, pub.version, res.metrics,
                                   task.metric.removeprefix("eval_"), task.metric_mode,
                                   cfg.publish.min_metric, baseline=quality["baseline"],
                                   gate=gate)
        if ok and cfg.release.rollout and registry.channel(name, "production") is not None:
            res.canary_ready = True
            res.promotion = (f"gate passed ({res.promotion.removeprefix('promoted: ')}): "
                             "rolling it out as a canary")
        elif ok:
            registry.set_channel(name, "production", pub.version)
            res.promoted = True
    elif cfg.release.rollout and not pub.promoted and not held_back:
        res.canary_ready = True
    elif held_back:
        res.promotion = not_promoted_note(quality["learned_check"], name, pub.version,
                                          registry.uri)
    elif not quality["checked"]:
        out(f"note: {quality['learned_check']}")


def bounds_record(max_steps: Optional[int], steps: Optional[int]) -> dict[str, Any]:
    """What the manifest records about the run's length: the --max-steps bound, the
    optimizer steps made, and whether the bound ended the run."""
    return {"max_steps": max_steps, "steps": steps,
            "ended_by_max_steps": max_steps is not None and steps is not None
            and steps >= max_steps}


@contextlib.contextmanager
def _publishable(ckpt_dir: str):
    """The checkpoint without the files only resuming needs (optimizer state, adapter)."""
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


def _check_unfinished(run: str, runs_dir: Optional[str], flag: str = "--resume") -> None:
    """--resume (or --run-name) of a run that finished would train nothing and publish
    its checkpoint again as a new version."""
    runs, name = _run_folder(run, runs_dir)
    if not runs.exists(name, FINISHED_FILE):
        return
    try:
        done = json.loads(runs.read_text(name, FINISHED_FILE))
    except (OSError, UnicodeDecodeError, ValueError):
        done = {}
    where = (f" and was published as {done.get('name')} {done['version']}"
             if isinstance(done, dict) and done.get("version") else "")
    again = "without --resume" if flag == "--resume" else "with another --run-name"
    raise ConfigError(f"{flag}: run {run!r} already finished{where}; nothing to continue "
                      f"(train again {again} for a new run)")


def _check_registry_task(cfg: ResolvedTrainConfig) -> None:
    """A run whose model name holds versions of the other task would fail at publish,
    after the whole run: say so before it starts."""
    try:
        registry = Registry(cfg.publish.registry)
    except RegistryError as exc:  # e.g. a bucket that does not exist
        raise ConfigError(f"invalid config field 'registry': {exc.message}") from None
    try:
        registry.check_task(cfg.publish.name, "", cfg.task)
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


def _check_activation_checkpointing(model_ref: str, task: str) -> None:
    """The model supports Hugging Face gradient checkpointing: checked on an empty
    (meta) copy of it here, not by every worker after Ray started."""
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM,
                              AutoModelForSequenceClassification)

    config = AutoConfig.from_pretrained(model_ref)
    auto = AutoModelForCausalLM if task == GENERATION else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config)
    if not model.supports_gradient_checkpointing:
        raise ConfigError(f"invalid config field 'activation_checkpointing': "
                          f"{type(model).__name__} does not support gradient checkpointing; "
                          "drop --activation-checkpointing")
