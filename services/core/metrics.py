"""Every Prometheus metric tuneserve exports, defined in one place.

Metrics are recorded with Ray's metrics API (`ray.util.metrics`) and exported through
Ray's metrics endpoint on each node, which prefixes every name with `ray_` (e.g.
`ray_tuneserve_requests_total`). Each histogram has a companion counter, its name plus
`_exact_sum_total`, that adds up the observations exactly (Ray's `_sum` is approximate):
a mean is rate(<name>_exact_sum_total) / rate(<name>_count).

Labels have few values only (method, code, model, version, result, run): never a text,
a prompt or a request id. `model` and `version` name only what is served: a request for
an unknown model, or one no version answered, is counted under UNKNOWN ("-"). Metric
objects are created lazily, once per process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

PREFIX = "ray_"  # added by Ray's exporter
UNKNOWN = "-"
"""The `model` or `version` label of a request for no served model or version."""

# Buckets fit for millisecond classification and multi-second generation alike.
LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0, 60.0, 120.0]
TTFT_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
LOAD_BUCKETS_S = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]
    buckets: Optional[Sequence[float]] = None


def exact_sum_name(histogram: str) -> str:
    """The counter that adds up a histogram's observations exactly (module docstring)."""
    return histogram + "_exact_sum_total"


SPECS = {s.name: s for s in [
    # serving
    Spec("tuneserve_requests_total", "counter",
         "gRPC requests answered, by method, status code, model and the version that "
         "answered", ("method", "code", "model", "version")),
    Spec("tuneserve_request_duration_seconds", "histogram",
         "Time to answer a gRPC request in the ingress", ("method", "model", "version"),
         LATENCY_BUCKETS_S),
    Spec("tuneserve_batch_size", "histogram",
         "Requests of one model version in each dynamic batch a model replica runs",
         ("model", "version"), BATCH_BUCKETS),
    Spec("tuneserve_batch_wait_seconds", "histogram",
         "Time each classifier batch waited for more requests before it ran (0: none)",
         ("model",), LATENCY_BUCKETS_S),
    Spec("tuneserve_coalesced_requests", "histogram",
         "Classify requests the ingress sends to a model deployment in one call",
         ("model",), BATCH_BUCKETS),
    Spec("tuneserve_generated_tokens_total", "counter", "Tokens generated",
         ("model", "version")),
    Spec("tuneserve_time_to_first_token_seconds", "histogram",
         "Time from a generation request to its first token", ("model", "version"),
         TTFT_BUCKETS_S),
    Spec("tuneserve_model_info", "gauge",
         "1 for each model version a replica serves", ("model", "version")),
    Spec("tuneserve_model_loads_total", "counter",
         "Model version loads by result (loaded, failed, refused)", ("model", "result")),
    Spec("tuneserve_canary_percent", "gauge",
         "Share of the requests (percent) a replica routes to its canary candidate; 0 "
         "once the canary ended", ("model", "version")),
    Spec("tuneserve_canary_fallbacks_total", "counter",
         "Requests a canary candidate failed with a server-side error and production "
         "answered instead, by candidate version", ("model", "version")),
    Spec("tuneserve_replica_retries_total", "counter",
         "Calls (Classify, Generate, GenerateStream before its first chunk) the ingress "
         "sent again because the model replica died during them", ("model",)),
    Spec("tuneserve_truncated_inputs_total", "counter",
         "Texts longer than the model's (or the serving) token limit, truncated to it",
         ("model", "version")),
    Spec("tuneserve_model_load_duration_seconds", "histogram",
         "Time to verify, load and smoke-test a model version", ("model",), LOAD_BUCKETS_S),
    # rollouts (recorded by the process that runs one: services/rollout.py)
    Spec("tuneserve_rollout_step", "gauge",
         "The step of the canary rollout being judged (1-based); 0 once it ended",
         ("model", "version")),
    Spec("tuneserve_rollout_percent", "gauge",
         "The candidate's share (percent) at the rollout's current step; 0 once it "
         "ended", ("model", "version")),
    Spec("tuneserve_rollout_decisions_total", "counter",
         "Rollout decisions by kind: step_passed, promoted, rolled_back, stopped",
         ("model", "version", "decision")),
    # training
    Spec("tuneserve_train_loss", "gauge", "Training loss (mean over the last log window)",
         ("run", "model")),
    Spec("tuneserve_train_learning_rate", "gauge", "Current learning rate", ("run", "model")),
    Spec("tuneserve_train_samples_per_second", "gauge", "Training throughput",
         ("run", "model")),
    Spec("tuneserve_train_tokens_per_second", "gauge", "Training throughput in tokens",
         ("run", "model")),
    Spec("tuneserve_train_epoch", "gauge", "Epoch being trained (1-based)", ("run", "model")),
    Spec("tuneserve_train_eval_metric", "gauge", "Evaluation metrics after each epoch",
         ("run", "model", "metric")),
    Spec("tuneserve_checkpoint_publish_duration_seconds", "histogram",
         "Time to publish a checkpoint to the registry", ("model",), LOAD_BUCKETS_S),
]}
# Each histogram's exact sum (module docstring).
SPECS.update({exact_sum_name(h.name): Spec(
    exact_sum_name(h.name), "counter",
    f"Sum of the observations of {h.name}, exact (its _sum is rebuilt from bucket "
    "midpoints)", h.labels) for h in list(SPECS.values()) if h.kind == "histogram"})

_lock = threading.Lock()
_made: dict[str, Any] = {}


def metric(name: str):
    """The process's Ray metric object for a spec (created on first use)."""
    with _lock:
        if name not in _made:
            from ray.util import metrics as rm

            spec = SPECS[name]
            if spec.kind == "counter":
                _made[name] = rm.Counter(spec.name, description=spec.help, tag_keys=spec.labels)
            elif spec.kind == "gauge":
                _made[name] = rm.Gauge(spec.name, description=spec.help, tag_keys=spec.labels)
            else:
                _made[name] = rm.Histogram(spec.name, description=spec.help,
                                           boundaries=list(spec.buckets or []),
                                           tag_keys=spec.labels)
        return _made[name]


def inc(name: str, value: float = 1.0, **tags: str) -> None:
    _safe(lambda: metric(name).inc(value, tags=_tags(tags)))


def set_gauge(name: str, value: float, **tags: str) -> None:
    _safe(lambda: metric(name).set(value, tags=_tags(tags)))


def observe(name: str, value: float, **tags: str) -> None:
    tags = _tags(tags)
    _safe(lambda: metric(name).observe(value, tags=tags))
    if value > 0:  # a Ray counter takes only positive steps
        _safe(lambda: metric(exact_sum_name(name)).inc(value, tags=tags))


def _tags(tags: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in tags.items()}


def _safe(fn) -> None:
    """Metrics never break serving or training (e.g. outside a Ray process)."""
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass
