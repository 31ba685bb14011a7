"""Classification metrics from a confusion matrix: one implementation for training,
`tuneserve eval` and the benchmarks.

The confusion matrix is the thing workers all-reduce (rows: true label, columns:
predicted), so distributed evaluation is exact: no sample is dropped or counted twice.
"""

from __future__ import annotations

from typing import Sequence


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
