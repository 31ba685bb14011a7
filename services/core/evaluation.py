"""Classification metrics from a confusion matrix: one implementation for training,
`tuneserve eval` and the benchmarks.

The confusion matrix is the thing workers all-reduce (rows: true label, columns:
predicted), so distributed evaluation is exact: no sample is dropped or counted twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from services.core.tables import format_table


def confusion_matrix(true: Sequence[int], pred: Sequence[int], num_labels: int) -> list[list[int]]:
    cm = [[0] * num_labels for _ in range(num_labels)]
    for t, p in zip(true, pred, strict=True):
        cm[t][p] += 1
    return cm


def metrics_from_confusion(cm: Sequence[Sequence[int]],
                           labels: Sequence[str] | None = None) -> dict:
    """accuracy, macro precision/recall/F1 and per-class figures.

    A class that is never predicted has precision 0 (and one that never occurs has
    recall 0), the usual convention; macro averages are over every class.
    """
    n = len(cm)
    labels = list(labels) if labels is not None else [str(i) for i in range(n)]
    total = sum(sum(row) for row in cm)
    correct = sum(cm[i][i] for i in range(n))
    per_class = {}
    ps, rs, fs = [], [], []
    for i in range(n):
        tp = cm[i][i]
        predicted = sum(cm[r][i] for r in range(n))
        actual = sum(cm[i])
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        ps.append(p), rs.append(r), fs.append(f)
        per_class[labels[i]] = {"precision": p, "recall": r, "f1": f, "support": actual}
    return {
        "accuracy": correct / total if total else 0.0,
        "macro_precision": sum(ps) / n if n else 0.0,
        "macro_recall": sum(rs) / n if n else 0.0,
        "macro_f1": sum(fs) / n if n else 0.0,
        "support": total,
        "per_class": per_class,
    }


SUMMARY_KEYS = ("accuracy", "macro_precision", "macro_recall", "macro_f1")


def summary(metrics: dict) -> dict[str, float]:
    """The scalar metrics, as stored in manifests and returned by ListModels."""
    return {k: float(metrics[k]) for k in SUMMARY_KEYS if k in metrics}


def format_report(metrics: dict, cm: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """Accuracy, a per-class table with the macro averages, and the confusion matrix,
    as plain-text tables (what `tuneserve eval` prints)."""
    rows = [(lab, f"{pc['precision']:.4f}", f"{pc['recall']:.4f}", f"{pc['f1']:.4f}",
             pc["support"]) for lab, pc in metrics["per_class"].items()]
    rows.append(("macro avg", f"{metrics['macro_precision']:.4f}",
                 f"{metrics['macro_recall']:.4f}", f"{metrics['macro_f1']:.4f}",
                 metrics["support"]))
    per_class = format_table(rows, ["label", "precision", "recall", "f1", "support"])
    cm_rows = [(lab, *row) for lab, row in zip(labels, cm)]
    matrix = format_table(cm_rows, ["true \\ predicted", *labels])
    return "\n".join([
        f"accuracy {metrics['accuracy']:.4f} "
        f"({sum(cm[i][i] for i in range(len(cm)))}/{metrics['support']})",
        "", per_class, "",
        "confusion matrix (rows: true label, columns: predicted label)", matrix])


def write_confusion_png(cm: Sequence[Sequence[int]], labels: Sequence[str], path,
                        title: str = ""):
    """The confusion matrix as a PNG heat map with the counts written in each cell.
    Matplotlib's object API on the Agg canvas: no pyplot state, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(labels)
    side = min(16.0, 2.5 + 0.6 * n)
    fig = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(cm, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, label="examples")
    ax.set_xticks(range(n), labels=labels, rotation=45 if n > 4 else 0, ha="right" if n > 4
                  else "center")
    ax.set_yticks(range(n), labels=labels)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    if n <= 30:  # past that the numbers no longer fit in the cells
        high = max((v for row in cm for v in row), default=0)
        for i, row in enumerate(cm):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=9,
                        color="white" if high and value > high / 2 else "black")
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
