"""Canary analysis: a candidate version judged against production on the serving
metrics of the same window.

`snapshot(text)` reads the per-version request counts, fallbacks and latency buckets
out of Prometheus text (Ray's metrics endpoint: every serving process's own metrics);
`window(before, after, model)` is what each version served between two snapshots, per
series and never negative (a process that restarted starts again from zero); `check`
compares the candidate's server-side error ratio and p99 latency with production's
over that window, under a RolloutPolicy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from services.core.metrics import PREFIX, UNKNOWN

SERVER_SIDE_CODES = frozenset({"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                               "RESOURCE_EXHAUSTED", "DATA_LOSS"})
"""The codes that count against a version (a caller's mistake does not)."""
REQUESTS = PREFIX + "tuneserve_requests_total"
LATENCY_BUCKETS = PREFIX + "tuneserve_request_duration_seconds_bucket"
FALLBACKS = PREFIX + "tuneserve_canary_fallbacks_total"
"""Requests a candidate failed that production answered instead (counted under the
candidate's version; production's answer is in REQUESTS under production's)."""
INFERENCE_METHODS = frozenset({"Classify", "Generate", "GenerateStream"})

Snapshot = dict[tuple, float]
"""(series name, its labels sorted) -> value, for the series the analysis reads."""


@dataclass(frozen=True)
class RolloutPolicy:
    """How a candidate goes from a first share of the traffic to production."""

    steps: tuple[float, ...] = (5.0, 25.0, 50.0)
    """The candidate's share at each step, in percent; after the last one passes, it
    is promoted (100 %)."""
    min_requests: int = 100
    """Requests the candidate answers in a step before it is judged."""
    min_step_s: float = 60.0
    """The shortest time a step lasts, however many requests it had."""
    max_step_s: float = 1800.0
    """A step without min_requests in this long ends the rollout (rolled back)."""
    error_ratio_factor: float = 2.0
    error_ratio_slack: float = 0.01
    """The candidate fails when its error ratio is above factor x production's + slack."""
    p99_factor: float = 1.5
    p99_slack_s: float = 0.01
    """... or its p99 latency above factor x production's + slack."""
    poll_s: float = 5.0
    """How often the metrics are read."""

    def __post_init__(self):
        steps = tuple(float(s) for s in self.steps)
        if not steps or any(not 0 < s < 100 for s in steps) or list(steps) != sorted(set(steps)):
            raise ValueError("steps: expected rising shares between 0 and 100, e.g. 5,25,50")
        object.__setattr__(self, "steps", steps)
        for name in ("min_step_s", "max_step_s", "error_ratio_slack", "p99_slack_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name}: expected a number >= 0")
        if not (math.isfinite(self.p99_factor) and self.p99_factor > 0):
            raise ValueError("p99_factor: expected a number > 0")
        if self.min_requests < 1:
            raise ValueError("min_requests: expected at least 1")
        if not (math.isfinite(self.poll_s) and self.poll_s > 0):
            raise ValueError("poll_s: expected a number > 0")
        if self.max_step_s < self.min_step_s:
            raise ValueError("max_step_s: expected at least min_step_s")


@dataclass(frozen=True)
class VersionStats:
    requests: int = 0
    failures: int = 0
    """Server-side errors, and fallbacks to production."""
    p99_s: Optional[float] = None

    @property
    def error_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Verdict:
    state: str  # "wait" (not enough yet), "pass" or "fail"
    reason: str
    numbers: dict[str, Any]


def snapshot(text: str, source: str = "") -> Snapshot:
    """The series the analysis reads, from Prometheus text. `source` tells the
    endpoints apart (the same labels can come from two nodes)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Snapshot = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (REQUESTS, LATENCY_BUCKETS, FALLBACKS):
                key = (source, sample.name, tuple(sorted(sample.labels.items())))
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def quantile(q: float, buckets: dict[float, float]) -> Optional[float]:
    """Prometheus' histogram_quantile over cumulative buckets (upper bound -> count)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank, lower, below = q * buckets[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def window(before: Snapshot, after: Snapshot, model: str) -> dict[str, VersionStats]:
    """version -> what it served for `model` between the two snapshots (inference
    methods only; "-", no version, left out)."""
    requests: dict[str, float] = {}
    failures: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for key, value in after.items():
        _, name, labels = key
        tags = dict(labels)
        version = tags.get("version", UNKNOWN)
        if tags.get("model") != model or version == UNKNOWN:
            continue
        if name != FALLBACKS and tags.get("method") not in INFERENCE_METHODS:
            continue
        delta = max(0.0, value - before.get(key, 0.0))
        if name == LATENCY_BUCKETS:
            le = float(tags.get("le", "+Inf"))
            per = buckets.setdefault(version, {})
            per[le] = per.get(le, 0.0) + delta
            continue
        if name == FALLBACKS or tags.get("code") in SERVER_SIDE_CODES:
            failures[version] = failures.get(version, 0.0) + delta
        if name == REQUESTS or name == FALLBACKS:
            requests[version] = requests.get(version, 0.0) + delta
    return {v: VersionStats(int(round(requests.get(v, 0.0))), int(round(failures.get(v, 0.0))),
                            quantile(0.99, buckets.get(v, {})))
            for v in set(requests) | set(failures) | set(buckets)}


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def check(stats: dict[str, VersionStats], candidate: str, production: str,
          policy: RolloutPolicy) -> Verdict:
    """The candidate against production over one window: "fail" on either check,
    "wait" while the candidate has fewer than min_requests, else "pass"."""
    cand, prod = stats.get(candidate, VersionStats()), stats.get(production, VersionStats())
    numbers = {"candidate_requests": cand.requests, "candidate_failures": cand.failures,
               "candidate_error_ratio": round(cand.error_ratio, 4),
               "candidate_p99_s": cand.p99_s, "production_requests": prod.requests,
               "production_error_ratio": round(prod.error_ratio, 4),
               "production_p99_s": prod.p99_s}
    if cand.requests < policy.min_requests:
        return Verdict("wait", f"{cand.requests} of {policy.min_requests} requests", numbers)
    limit = policy.error_ratio_factor * prod.error_ratio + policy.error_ratio_slack
    if cand.error_ratio > limit:
        return Verdict("fail", (
            f"error check: {candidate} failed {cand.failures} of {cand.requests} requests "
            f"({cand.error_ratio:.1%}), production {production} {prod.error_ratio:.1%}; "
            f"the limit is {limit:.1%}"), numbers)
    if cand.p99_s is not None and prod.p99_s is not None:
        bound = policy.p99_factor * prod.p99_s + policy.p99_slack_s
        if cand.p99_s > bound:
            return Verdict("fail", (
                f"latency check: {candidate} p99 {_ms(cand.p99_s)}, production "
                f"{production} {_ms(prod.p99_s)}; the limit is {_ms(bound)}"), numbers)
    return Verdict("pass", (f"{candidate}: {cand.requests} requests, errors "
                            f"{cand.error_ratio:.1%} (production {prod.error_ratio:.1%}), "
                            f"p99 {_ms(cand.p99_s)} (production {_ms(prod.p99_s)})"),
                   numbers)
