"""What a training run leaves to watch and to look at afterwards.

A `RunTracker` turns rank 0's events (`start`, `step`, `eval`; loop.py) into Prometheus
gauges (services/core/metrics.py), TensorBoard scalars under `<run>/tensorboard/` and,
at the end, `<run>/training_curves.png`; `epoch_rows` is the per-epoch table `tuneserve
train` prints. None of this may fail a run: what cannot be written is reported in one
line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

from services.core import metrics

TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "training_curves.png"
# eval_* values that are counts, not metrics: neither a gauge nor a curve.
_EVAL_COUNTS = {"examples", "tokens", "support"}


def eval_scalars(ev: dict[str, Any]) -> dict[str, float]:
    """The scalar eval metrics of an eval event, without the `eval_` prefix."""
    out = {}
    for key, value in ev.items():
        name = key.removeprefix("eval_")
        if key.startswith("eval_") and name not in _EVAL_COUNTS \
                and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def step_scalars(ev: dict[str, Any]) -> dict[str, float]:
    values = {"loss": ev["loss"], "learning_rate": ev["lr"],
              "samples_per_second": ev["samples_per_s"], "epoch": ev["epoch"]}
    if ev.get("tokens_per_s") is not None:
        values["tokens_per_second"] = ev["tokens_per_s"]
    return values


def record_gauges(ev: dict[str, Any], tags: dict[str, str]) -> None:
    """The training gauges for one progress event.

    Called in rank 0's Ray Train worker (services/training/loop.py): metrics recorded
    in a Ray worker are exported through Ray's metrics endpoint, a driver's are not.
    """
    kind = ev.get("type")
    if kind == "start":
        metrics.set_gauge("tuneserve_train_epoch", 1, **tags)
    elif kind == "step":
        for name, value in step_scalars(ev).items():
            metrics.set_gauge(f"tuneserve_train_{name}", value, **tags)
    elif kind == "eval":
        metrics.set_gauge("tuneserve_train_epoch", ev["epoch"], **tags)
        for name, value in eval_scalars(ev).items():
            metrics.set_gauge("tuneserve_train_eval_metric", value, metric=name, **tags)


def epoch_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluated epoch: epoch, step, mean train loss, eval metrics."""
    rows = []
    for ev in history:
        if ev.get("type") != "eval":
            continue
        losses = [s["loss"] for s in history
                  if s.get("type") == "step" and s.get("epoch") == ev["epoch"]]
        rows.append({"epoch": ev["epoch"], "step": ev.get("step"),
                     "train_loss": sum(losses) / len(losses) if losses else None,
                     **eval_scalars(ev)})
    return rows


class RunTracker:
    """Turns rank 0's events into gauges and TensorBoard scalars (driver side)."""

    def __init__(self, run_dir: str | Path, run: str, model: str,
                 config: Optional[dict[str, Any]] = None,
                 out: Callable[[str], None] = print, gauges: bool = True):
        self.run_dir = Path(run_dir)
        self.tags = {"run": run, "model": model}
        self.gauges = gauges  # False when rank 0's worker records them (run_training)
        self.config = config
        self.out = out
        self.history: list[dict[str, Any]] = []
        self._writer = None
        self._writer_failed = False

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / TENSORBOARD_DIR

    def _tb(self):
        """The SummaryWriter, made on the first event: Ray Train owns the run folder
        and creates it when the run starts."""
        if self._writer is None and not self._writer_failed:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir),
                                             flush_secs=10)
                if self.config is not None:
                    self._writer.add_text("config", "```\n" + json.dumps(
                        self.config, indent=2, default=str) + "\n```", 0)
            except Exception as exc:  # noqa: BLE001 - never fail training for this
                self._writer_failed = True
                self.out(f"tensorboard: not written ({type(exc).__name__}: {exc})")
        return self._writer

    def handle(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind not in ("start", "step", "eval"):
            return
        self.history.append(ev)
        if self.gauges:
            record_gauges(ev, self.tags)
        tb = self._tb()
        if tb is None:
            return
        if kind == "step":
            for name, value in step_scalars(ev).items():
                tb.add_scalar(f"train/{name}", value, ev["step"])
        elif kind == "eval":
            for name, value in eval_scalars(ev).items():
                if math.isfinite(value):
                    tb.add_scalar(f"eval/{name}", value, ev.get("step", ev["epoch"]))
            tb.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def plot(self) -> Optional[Path]:
        """Draws the curves into the run folder; the PNG's path, or None if it cannot."""
        try:
            return plot_curves(self.history, self.run_dir / PLOT_FILE,
                               title=f"{self.tags['model']} ({self.tags['run']})")
        except Exception as exc:  # noqa: BLE001 - never fail training for this
            self.out(f"plot: not written ({type(exc).__name__}: {exc})")
            return None

    def artifacts(self, plot: Optional[Path]) -> dict[str, str]:
        """What the manifest links: the plot and the TensorBoard folder, where written."""
        found = {}
        if plot is not None and plot.is_file():
            found["plot"] = str(plot)
        if self._writer is not None and self.tensorboard_dir.is_dir():
            found["tensorboard"] = str(self.tensorboard_dir)
        return found


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train and eval loss against optimizer steps (left), the other eval metrics
    against epochs (right). Matplotlib's object API on the Agg canvas: no pyplot state,
    no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [e for e in history if e.get("type") == "step"]
    evals = [e for e in history if e.get("type") == "eval"]
    others = sorted({k for e in evals for k in eval_scalars(e)} - {"loss"})
    fig = Figure(figsize=(11, 4) if others else (6, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if others else 1, squeeze=False)[0]
    ax = axes[0]
    ax.plot([e["step"] for e in steps], [e["loss"] for e in steps], label="train loss")
    eval_loss = [(e.get("step"), e["eval_loss"]) for e in evals if "eval_loss" in e]
    if eval_loss:
        ax.plot(*zip(*eval_loss), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if others:
        ax = axes[1]
        for name in others:
            points = [(e["epoch"], eval_scalars(e)[name]) for e in evals
                      if name in eval_scalars(e)]
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("eval metric")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
