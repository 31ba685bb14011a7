"""Eval-gated promotion: `tuneserve train --promote [--min-metric accuracy=0.85]`.

A freshly published version is promoted to production only if its eval metric is at
least as good as the current production version's (and above the threshold, if one is
given); otherwise it stays published, unpromoted, and the reason is printed.
"""

from __future__ import annotations

from typing import Optional

from services.core.config import LOWER_IS_BETTER, parse_min_metric
from services.core.errors import TuneserveError
from services.core.registry import Registry


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
