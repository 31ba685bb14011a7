"""Eval-gated promotion: `tuneserve train --promote [--min-metric accuracy=0.85]`.

A freshly published version is promoted to production only if its eval metric is at
least as good as the current production version's (and above the threshold, if one is
given); otherwise it stays published, unpromoted, and the reason is printed.
"""

from __future__ import annotations

import math
from typing import Optional

from services.errors import ConfigError, TuneserveError
from services.registry import Registry


def parse_min_metric(spec: Optional[str]) -> Optional[tuple[str, float]]:
    if not spec:
        return None
    name, sep, value = spec.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise ConfigError(f"invalid config field 'min_metric': expected NAME=NUMBER "
                          f"(e.g. accuracy=0.85), got {spec!r}") from None


GATE_METRICS = {
    "classification": ("accuracy", "macro_f1", "macro_precision", "macro_recall", "loss"),
    "generation": ("loss", "perplexity"),
}
"""The eval metrics a run of each task records, which --min-metric may name."""
LOWER_IS_BETTER = ("loss", "perplexity")


def check_min_metric(spec: str, task: str) -> tuple[str, float]:
    """parse_min_metric, and the name is one the task records, the bound one it can meet."""
    name, bound = parse_min_metric(spec)
    known = GATE_METRICS.get(task, ())
    if name not in known:
        raise ConfigError(f"invalid config field 'min_metric': a {task} run records "
                          f"{', '.join(known)}; got {name!r}")
    if not math.isfinite(bound):
        raise ConfigError(f"invalid config field 'min_metric': {name} bound must be a finite "
                          f"number, got {bound}")
    if name not in LOWER_IS_BETTER and not 0.0 <= bound <= 1.0:
        raise ConfigError(f"invalid config field 'min_metric': {name} lies between 0 and 1, "
                          f"got {bound}")
    if name in LOWER_IS_BETTER and bound <= 0:
        raise ConfigError(f"invalid config field 'min_metric': {name} is above 0, got {bound}")
    return name, bound


def better_or_equal(new: float, old: float, mode: str) -> bool:
    return new >= old if mode == "max" else new <= old


def decide(registry: Registry, name: str, version: str, metrics: dict[str, float],
           metric: str, mode: str, min_metric: Optional[str]) -> tuple[bool, str]:
    """(promote?, why) for a just-published version."""
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
    try:
        old = registry.manifest(name, current).get("metrics", {}).get(metric)
    except TuneserveError:
        old = None
    new = metrics.get(metric)
    if new is None:
        return False, f"not promoted: this run has no {metric!r} metric"
    if old is None:
        return True, f"promoted: production {current} records no {metric}"
    if better_or_equal(new, float(old), mode):
        return True, f"promoted: {metric} {new:.4f} vs production {current}'s {float(old):.4f}"
    return False, (f"not promoted: {metric} {new:.4f} is worse than production "
                   f"{current}'s {float(old):.4f}")
