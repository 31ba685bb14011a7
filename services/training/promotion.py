"""Eval-gated promotion: `tuneserve train --promote [--min-metric accuracy=0.85]`.

A freshly published version is promoted to production only if its eval metric is at
least as good as the current production version's (and above the threshold, if one is
given); otherwise it stays published, unpromoted, and the reason is printed.

Before either test, every version, a name's first included and with or without
--promote, must show that it learned something (`learned_check`): a classifier must
beat, by more than the eval set's noise, what a model that ignores its input scores
(always predicting the most frequent label: `majority_baseline`), and a causal LM must end below the eval loss of the model it started from, where the run
measured that. A version that fails is published but never made production by the
run; `tuneserve models promote` (or `train --promote-anyway`) still can.

The comparison with production is made on the same rows with the same code where it
can be (`same_rows`): a classifier run scores the production version and its own
checkpoint on its eval rows through the serving runtime, and the manifest records
both numbers (`gate`). Two runs' own eval metrics, each on its own eval set, are
compared only where that cannot be done (a generation run; a production version that
does not load), and the reason says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from services.core.config import LOWER_IS_BETTER, parse_min_metric
from services.core.evaluation import confusion_matrix, metrics_from_confusion, summary
from services.core.errors import TuneserveError
from services.core.registry import Registry
from services.runtime.classifier import (
    LoadedClassifier,
    load_classifier,
    load_classifier_folder,
    predict,
)

SIGNIFICANCE_Z = 2.0
"""How many standard errors above the majority baseline a classifier's eval accuracy
must be (see `Baseline.margin`)."""


@dataclass(frozen=True)
class Baseline:
    """What always predicting the eval set's most frequent label scores on it."""

    label: str
    """The most frequent true label of the eval set."""
    accuracy: float
    """Its share of the eval set: the accuracy of always predicting it."""
    macro_f1: float
    """The macro-F1 of always predicting it: 2p/(1+p) for that class, 0 for the others,
    averaged over every class."""
    chance_macro_f1: float
    """1/num_labels: the macro-F1 a uniformly random guess scores on balanced classes
    (and at most, in expectation, on unbalanced ones)."""
    examples: int

    def margin(self) -> float:
        """How far above `accuracy` a model must score to count as having learned.

        SIGNIFICANCE_Z binomial standard errors of an accuracy of `accuracy` on
        `examples` examples, sqrt(p(1-p)/n): a model no better than the baseline reaches
        that much more only by luck of the eval draw (about 2 % of the time, one-sided).
        The margin shrinks as the eval set grows (0.22 on 20 balanced examples, 0.07 on
        200, 0.02 on 2,000), so a small eval set needs a clear win and a large one a
        small but real one. It is capped at half the distance to a perfect score, so a
        tiny eval set still lets a model that is nearly always right through."""
        return noise_margin(self.accuracy, self.examples)

    def f1_margin(self) -> float:
        """The same margin above `chance_macro_f1` for macro-F1 (the standard error of
        a proportion of 1/num_labels on the eval set, an approximation for an F1)."""
        return noise_margin(self.chance_macro_f1, self.examples)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "margin": round(self.margin(), 4),
                "f1_margin": round(self.f1_margin(), 4)}


def noise_margin(p: float, n: int) -> float:
    """SIGNIFICANCE_Z standard errors of a proportion p on n examples, at most half the
    distance from p to 1."""
    return min(SIGNIFICANCE_Z * math.sqrt(p * (1.0 - p) / max(1, n)), (1.0 - p) / 2.0)


def last_within_noise(best: dict[str, Any], last: dict[str, Any]) -> tuple[bool, str]:
    """(publish the last checkpoint instead of the best?, why) for a classifier: the
    best evaluation is kept only where its accuracy beats the last one's by more than
    the eval set's noise (`noise_margin` of the last accuracy on the eval examples).

    On a small eval set the epochs' accuracies differ mostly by the luck of the draw
    (a standard error of 0.037 on 100 examples), so the "best" is an early epoch picked
    by chance, while the last checkpoint has had the whole schedule, its learning rate
    decayed to 0. On a large eval set a real difference still picks the best."""
    acc_best, acc_last = best.get("eval_accuracy"), last.get("eval_accuracy")
    matrix = last.get("confusion_matrix") or best.get("confusion_matrix")
    if acc_best is None or acc_last is None or not matrix:
        return False, ""
    n = int(sum(sum(row) for row in matrix))
    margin = noise_margin(acc_last, n)
    b, e = best.get("epoch", "?"), last.get("epoch", "?")
    if acc_best - acc_last > margin:
        return False, (f"published epoch {b}, the best evaluation: its accuracy "
                       f"{acc_best:.4f} beats the last epoch's {acc_last:.4f} by more than "
                       f"the eval set's noise ({margin:.4f} on {n} examples)")
    return True, (f"published the last epoch ({e}, accuracy {acc_last:.4f}): the best "
                  f"evaluation (epoch {b}, {acc_best:.4f}) is within the eval set's noise "
                  f"of it ({margin:.4f} on {n} examples), and the last checkpoint has had "
                  "the whole schedule")


def majority_baseline(confusion: Optional[Sequence[Sequence[int]]],
                      labels: Sequence[str]) -> Optional[Baseline]:
    """The majority-class baseline of an eval set, from its confusion matrix (rows: true
    label); None without one."""
    if not confusion or not labels:
        return None
    support = [int(sum(row)) for row in confusion]
    total = sum(support)
    if total == 0:
        return None
    top = max(range(len(support)), key=lambda i: support[i])
    share = support[top] / total
    return Baseline(label=str(labels[top]), accuracy=share,
                    macro_f1=(2 * share / (1 + share)) / len(support),
                    chance_macro_f1=1.0 / len(support), examples=total)


def single_predicted_class(confusion: Optional[Sequence[Sequence[int]]],
                           labels: Sequence[str]) -> Optional[str]:
    """The one label a classifier predicted for every eval example, if it did (with
    two labels or more to choose from); else None."""
    if not confusion or len(confusion) < 2:
        return None
    predicted = [sum(int(row[j]) for row in confusion) for j in range(len(confusion))]
    used = [j for j, count in enumerate(predicted) if count]
    return str(labels[used[0]]) if len(used) == 1 else None


def learned_check(metrics: dict[str, float],
                  baseline: Optional[dict[str, Any]]) -> tuple[bool, str]:
    """(learned something?, why): the test every version passes before it is made
    production.

    A classifier (`baseline`: `Baseline.to_dict()`) is compared with what a model that
    ignores its input can score: no such predictor has an accuracy above the majority
    share (always predicting the most frequent label reaches it), and none has an
    expected macro-F1 above 1/num_labels (guessing each label at its own frequency
    reaches it). It passes when it beats either bound by more than the eval set's noise
    (`Baseline.margin`, `Baseline.f1_margin`): accuracy for the usual run, macro-F1 for
    a run whose class weights trade accuracy for the rare classes. A model predicting
    one class, or guessing, beats neither.

    A causal LM needs eval loss < `initial_loss` (the untrained model's eval loss) when
    the run recorded that; when it did not, the check is skipped and says so."""
    if baseline:
        acc, f1 = metrics.get("accuracy"), metrics.get("macro_f1")
        if acc is None or f1 is None:
            return False, "this run has no accuracy and macro-F1 to compare with the baseline"
        acc_bar = baseline["accuracy"] + baseline["margin"]
        f1_bar = baseline["chance_macro_f1"] + baseline["f1_margin"]
        always = (f"always predicting {baseline['label']!r} "
                  f"({baseline['accuracy']:.3f} on {baseline['examples']} eval examples)")
        if acc > acc_bar:
            return True, f"accuracy {acc:.3f} beats {always} by more than {baseline['margin']:.3f}"
        if f1 > f1_bar:
            return True, (f"macro-F1 {f1:.3f} beats chance ({baseline['chance_macro_f1']:.3f})"
                          f" by more than {baseline['f1_margin']:.3f}")
        return False, (f"accuracy {acc:.3f} is no better than {always}: it needs more than "
                       f"{acc_bar:.3f}; and macro-F1 {f1:.3f} is no better than chance "
                       f"({baseline['chance_macro_f1']:.3f}): it needs more than {f1_bar:.3f}")
    initial, loss = metrics.get("initial_loss"), metrics.get("loss")
    if initial is None or loss is None:
        return True, ("no eval loss of the untrained model was recorded: the learned-"
                      "nothing check is skipped for this generation run")
    if not loss < initial:
        return False, (f"eval loss {loss:.4f} is not below the untrained model's "
                       f"{initial:.4f}")
    return True, f"eval loss {loss:.4f} is below the untrained model's {initial:.4f}"


def not_promoted_note(why: str, name: str, version: str, registry: str) -> str:
    """The message of a version the learned-nothing test kept from production."""
    where = registry.split("?")[0]
    return (f"not promoted: {why}; published as {name} {version}. Promote it by hand "
            f"with `tuneserve models promote --registry {where} {name} {version}` if "
            "intended (or train with --promote-anyway)")


def better_or_equal(new: float, old: float, mode: str) -> bool:
    return new >= old if mode == "max" else new <= old


def scores_on_rows(loaded: LoadedClassifier, texts: Sequence[str], labels: Sequence[str],
                   names: Sequence[str]) -> dict[str, float]:
    """A classifier's summary metrics on labelled rows, through the serving runtime's
    `predict`; `names`: every label either side knows (a true label the model lacks
    is a row it gets wrong), so both sides' macro averages run over the same classes."""
    index = {n: i for i, n in enumerate(names)}
    probs = predict(loaded, list(texts))
    predicted = [index[loaded.labels[i]] for i in probs.argmax(dim=-1).tolist()]
    cm = confusion_matrix([index[str(t)] for t in labels], predicted, len(names))
    return summary(metrics_from_confusion(cm, list(names)))


def same_rows(registry: Registry, name: str, folder: str, rows: Optional[tuple],
              metric: str, out=print) -> Optional[dict[str, Any]]:
    """The gate's record: production and the run's checkpoint (`folder`) scored on the
    run's eval `rows` (texts, labels) by the same code. None when there is no
    production version, no rows (a generation run), or production does not load."""
    current = registry.channel(name, "production")
    if current is None or not rows or not rows[0]:
        return None
    try:
        production = load_classifier(registry, name, current, trace=False)
    except TuneserveError as exc:
        out(f"note: production {current} could not be loaded to score it on this run's "
            f"eval rows ({exc.message}); the gate compares the manifests' {metric}")
        return None
    candidate = load_classifier_folder(folder, name)
    texts, labels = rows
    names = list(dict.fromkeys([*map(str, labels), *candidate.labels, *production.labels]))
    return {"metric": metric, "rows": len(texts),
            "candidate": scores_on_rows(candidate, texts, labels, names),
            "production": {"version": current,
                           **scores_on_rows(production, texts, labels, names)}}


def _compare_same_rows(gate: dict[str, Any], mode: str) -> tuple[bool, str]:
    metric, rows, current = gate["metric"], gate["rows"], gate["production"]["version"]
    new, old = gate["candidate"][metric], gate["production"][metric]
    on = f"on this run's {rows} eval rows"
    if better_or_equal(new, old, mode):
        return True, f"promoted: {metric} {new:.4f} vs production {current}'s {old:.4f} {on}"
    return False, (f"not promoted: {metric} {new:.4f} is worse than production {current}'s "
                   f"{old:.4f} {on}")


def decide(registry: Registry, name: str, version: str, metrics: dict[str, float],
           metric: str, mode: str, min_metric: Optional[str],
           baseline: Optional[dict[str, Any]] = None,
           gate: Optional[dict[str, Any]] = None) -> tuple[bool, str]:
    """(promote?, why) for a just-published version: `learned_check` first (with the
    run's `baseline`), then --min-metric, then production: on the same rows where the
    run scored it (`gate`, from `same_rows`), else by the manifests' metric."""
    learned, why = learned_check(metrics, baseline)
    if not learned:
        return False, not_promoted_note(why, name, version, registry.uri)
    threshold = parse_min_metric(min_metric)
    if threshold is not None:
        key, bound = threshold
        if key not in metrics:
            return False, (f"not promoted: metric {key!r} is not among this run's metrics "
                           f"({', '.join(sorted(metrics))})")
        ok = better_or_equal(metrics[key], bound, "min" if key in LOWER_IS_BETTER else "max")
        if not ok:
            return False, f"not promoted: {key} {metrics[key]:.4f} misses the threshold {bound}"
    current = registry.channel(name, "production")
    if current is None or current == version:
        return True, "promoted: no production version yet"
    if gate and gate["production"]["version"] == current and metric in gate["candidate"]:
        return _compare_same_rows(gate, mode)
    try:
        old = registry.manifest(name, current).get("metrics", {}).get(metric)
    except TuneserveError:
        old = None
    new = metrics.get(metric)
    if new is None:
        return False, f"not promoted: this run has no {metric!r} metric"
    if old is None:
        return True, f"promoted: production {current} records no {metric}"
    own = "each on its own eval set"
    if better_or_equal(new, float(old), mode):
        return True, (f"promoted: {metric} {new:.4f} vs production {current}'s "
                      f"{float(old):.4f} ({own})")
    return False, (f"not promoted: {metric} {new:.4f} is worse than production "
                   f"{current}'s {float(old):.4f} ({own})")
