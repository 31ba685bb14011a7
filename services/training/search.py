"""Hyperparameter search with Ray Tune: `run_search(plan, out)` is `tuneserve train --search`.

Each trial is a Ray Train run of the training loop (loop.py) with its own learning rate,
epochs and warmup, driven from a Tune function trainable (Ray Train V2's way: the
trial starts a TorchTrainer whose TuneReportCallback passes every evaluation to Tune).
Trials run in parallel as far as the cluster's CPUs and GPUs allow; ASHA stops those
behind the others at 1, 2, 4, ... evaluations. The result is the best evaluation of any
trial (its checkpoint is what gets published) and a record of every trial.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from services.core.config import ClusterSection, OptimSection
from services.training.loop import LoopConfig, make_trainer

SEARCHED = ("learning_rate", "epochs", "warmup_ratio")
"""The settings a search varies (OptimSection's names)."""
LR_FACTOR = 4.0
"""A trial's learning rate is log-uniform within this factor of the run's."""
MAX_WARMUP_RATIO = 0.2
FINISHED_MARKER = "finished"
"""Written into a trial's folder when its Ray Train run ended by itself (not stopped
by ASHA or the time budget)."""
ASHA_MAX_T = 1 << 20
"""ASHA's bound on evaluations per trial: far above any run, so it never ends one."""
TRIAL_DRIVER_RESOURCES = {"memory": 64 * 1024 * 1024}
"""What a trial's Tune actor reserves: it only starts and waits for its Ray Train run
(whose workers reserve the CPUs), so memory rather than a slice of a CPU, which would
keep the last trial that the cluster's CPUs hold from starting."""
REPORTED = ("epoch", "step", "epoch_progress", "early_stop")
"""What the loop reports besides its eval_* metrics (and the confusion matrix)."""


def trial_params(optim: OptimSection, trials: int, seed: int) -> list[dict[str, Any]]:
    """The settings of each trial, drawn from `seed`: the first is the run's own; the
    others a learning rate log-uniform within LR_FACTOR of it, epochs one fewer to one
    more (at least 1), a warmup ratio uniform in [0, MAX_WARMUP_RATIO]."""
    rng = random.Random(seed)
    params = [{"learning_rate": optim.learning_rate, "epochs": optim.epochs,
               "warmup_ratio": optim.warmup_ratio}]
    span = math.log(LR_FACTOR)
    while len(params) < trials:
        lr = optim.learning_rate * math.exp(rng.uniform(-span, span))
        params.append({"learning_rate": float(f"{lr:.3g}"),
                       "epochs": max(1, optim.epochs + rng.choice((-1, 0, 1))),
                       "warmup_ratio": round(rng.uniform(0.0, MAX_WARMUP_RATIO), 3)})
    return params


def concurrent_trials(cluster: ClusterSection, resources: dict[str, float],
                      trials: int) -> int:
    """How many trials fit on the cluster at once (each needs the run's workers)."""
    fits = resources.get("CPU", 0.0) // (cluster.workers * cluster.cpus_per_worker)
    if cluster.use_gpu:
        fits = min(fits, resources.get("GPU", 0.0) // cluster.workers)
    return int(max(1, min(trials, fits)))


def better(a: dict[str, Any], b: Optional[dict[str, Any]], metric: str, mode: str) -> bool:
    """Whether evaluation `a` beats `b` (None: nothing yet): the task's metric first,
    the eval loss on a tie."""
    if b is None:
        return True
    sign = 1.0 if mode == "max" else -1.0
    key_a = (sign * float(a[metric]), -float(a.get("eval_loss", 0.0)))
    key_b = (sign * float(b[metric]), -float(b.get("eval_loss", 0.0)))
    return key_a > key_b


@dataclass(frozen=True)
class SearchPlan:
    """What the trials share: the loop config (data, task, the run's settings), the
    cluster section, where the trials' runs go, and each trial's settings."""

    loop_cfg: LoopConfig
    cluster: ClusterSection
    storage: str
    """The search's folder (its run folder); trial i's Ray Train run is trial-i in it."""
    params: list[dict[str, Any]]
    concurrent: int
    time_budget_s: Optional[float]


@dataclass
class TrialRecord:
    """One trial: its settings and the evaluations it reported."""

    index: int
    params: dict[str, Any]
    reports: list[dict[str, Any]]
    status: str = "pending"
    """finished, stopped early (ASHA or the time budget), failed or pending (never ran)."""
    error: Optional[str] = None

    def best(self, metric: str, mode: str) -> Optional[dict[str, Any]]:
        """The trial's best evaluation whose checkpoint Ray Train kept."""
        found = None
        for report in self.reports:
            path = report.get("checkpoint_path")
            if path and os.path.isdir(path) and better(report, found, metric, mode):
                found = report
        return found

    def to_dict(self, metric: str, mode: str) -> dict[str, Any]:
        best = self.best(metric, mode)
        keep = {k: v for k, v in (best or {}).items()
                if k.startswith("eval_") and not isinstance(v, (dict, list))}
        return {"trial": self.index, "params": self.params, "status": self.status,
                "evaluations": len(self.reports), "error": self.error,
                "best": None if best is None else {
                    "epoch": best.get("epoch"), "step": best.get("step"), **keep,
                    "checkpoint": best["checkpoint_path"]},
                "history": [{k: r.get(k) for k in ("epoch", "step", metric)}
                            for r in self.reports]}


@dataclass(frozen=True)
class SearchOutcome:
    """The best evaluation of the search and what the manifest records about it."""

    checkpoint_path: str
    best_metrics: dict[str, Any]
    best_trial: int
    history: list[dict[str, Any]]
    """The best trial's evaluations as eval events (for the summary's table)."""
    record: dict[str, Any]


def run_search(plan: SearchPlan, out: Callable[[str], None]) -> SearchOutcome:
    """Runs the trials with Tune and ASHA; the best evaluation of any trial. Raises
    RuntimeError with the first trial's error when no trial reported a checkpoint."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    task = plan.loop_cfg.task
    records = [TrialRecord(i, p, []) for i, p in enumerate(plan.params)]
    out(f"search: {len(records)} trials of {', '.join(SEARCHED)}, {plan.concurrent} at a "
        f"time; ASHA stops the weakest at 1, 2, 4, ... evaluations"
        + (f"; budget {plan.time_budget_s:g} s" if plan.time_budget_s else ""))
    for r in records:
        out(f"  trial {r.index}: {describe_params(r.params)}")
    # Ctrl-C ends the search at once, with nothing published, as it ends a run; Tune's
    # own handler would end it quietly and let the best trial so far be published.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, plan=plan),
                            TRIAL_DRIVER_RESOURCES),
        param_space={"trial": tune.grid_search(list(range(len(records))))},
        tune_config=tune.TuneConfig(
            metric=task.metric, mode=task.metric_mode,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=ASHA_MAX_T,
                                    grace_period=1, reduction_factor=2),
            max_concurrent_trials=plan.concurrent, time_budget_s=plan.time_budget_s),
        run_config=tune.RunConfig(name="tune", storage_path=plan.storage, verbose=0,
                                  callbacks=[recorder(records, task, out)]),
    )
    tuner.fit()
    return outcome(records, plan, task.metric, task.metric_mode)


def describe_params(params: dict[str, Any]) -> str:
    return (f"learning rate {params['learning_rate']:.3g}, {params['epochs']} epoch(s), "
            f"warmup {params['warmup_ratio']:g}")


def run_trial(config: dict[str, Any], plan: SearchPlan) -> None:
    """One trial, in its Tune actor: the training loop with the trial's settings as a
    Ray Train run, every evaluation passed on to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    index = config["trial"]
    name = f"trial-{index}"
    folder = os.path.join(plan.storage, name)
    loop_cfg = replace(plan.loop_cfg,
                       optim=replace(plan.loop_cfg.optim, **plan.params[index]))
    make_trainer(loop_cfg, plan.cluster, name, plan.storage,
                 callbacks=(TuneReportCallback(),)).fit()
    Path(folder, FINISHED_MARKER).touch()


def recorder(records: list[TrialRecord], task, out: Callable[[str], None]):
    """A Tune callback, on the driver, that keeps every trial's evaluations in
    `records` and shows them."""
    from ray import tune

    class Recorder(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            record = records[trial.config["trial"]]
            report = {k: v for k, v in result.items()
                      if k in REPORTED or k.startswith("eval_")
                      or k in ("confusion_matrix", "checkpoint_path")}
            record.reports.append(report)
            record.status = "running"
            out(f"trial {record.index}: {task.describe_eval(report)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            record = records[trial.config["trial"]]
            record.status = "failed"
            error = getattr(trial, "error_msg", None) or "the trial failed"
            record.error = (str(error).strip().splitlines() or ["failed"])[-1]

    return Recorder()


def outcome(records: list[TrialRecord], plan: SearchPlan, metric: str,
            mode: str) -> SearchOutcome:
    """The best checkpointed evaluation over all trials and the search's record."""
    for r in records:
        if r.status == "running":
            finished = Path(plan.storage, f"trial-{r.index}", FINISHED_MARKER).exists()
            r.status = "finished" if finished else "stopped early"
    best_trial, best = None, None
    for r in records:
        candidate = r.best(metric, mode)
        if candidate is not None and better(candidate, best, metric, mode):
            best_trial, best = r, candidate
    if best_trial is None:
        errors = [r.error for r in records if r.error]
        raise RuntimeError(errors[0] if errors else "no trial reported an evaluation")
    record = {"metric": metric, "mode": mode, "searched": list(SEARCHED),
              "scheduler": "ASHA (grace period 1 evaluation, reduction factor 2)",
              "concurrent_trials": plan.concurrent, "time_budget_s": plan.time_budget_s,
              "best_trial": best_trial.index, "best_params": best_trial.params,
              "trials": [r.to_dict(metric, mode) for r in records]}
    history = [{"type": "eval", **{k: v for k, v in rep.items() if k != "checkpoint_path"}}
               for rep in best_trial.reports]
    metrics = {k: v for k, v in best.items() if k != "checkpoint_path"}
    return SearchOutcome(checkpoint_path=best["checkpoint_path"], best_metrics=metrics,
                         best_trial=best_trial.index, history=history, record=record)
