"""The classification model deployment (one per model name). No gRPC in here.

A thin wrapper around the runtime (services/runtime/classifier.py: loading, the labels
check, the smoke inference, TorchScript, forward passes): it follows the registry
(services/serving/follower.py), batches requests and records metrics.

Requests are batched across callers by a GreedyBatcher (services/serving/batching.py):
while the model computes, requests queue, and the next batch is everything queued
(after a brief wait for the callers of the batch that just ended), so a lone request
never waits and batches grow with the load. Each request is answered as soon as the
forward pass holding its last text ends, while the batch's other passes run. A batch
runs through `services.runtime.classifier.predict_batch`, once per model version;
texts run whole up to the model's limit (or the serving limit), longer ones truncated
or refused.

A version loaded while another serves (a promote, a canary, a request naming it) goes
live as soon as it is verified, loaded and smoke-tested, run by the model itself, and
its TorchScript trace (`trace_classifier`, which checks the trace against the model
on long probes and is most of a load's time) is built behind it in a thread of its
own and used from the next batch once checked: a swap waits for no trace. Traces are
built one at a time, and one whose version the replica no longer holds is skipped. A
replica's first version is traced before it serves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable, Optional

from services.core import metrics
from services.runtime.classifier import (
    TRACED_RUNTIMES,
    LoadedClassifier,
    load_classifier,
    predict_batch,
    trace_classifier,
)
from services.serving.batching import GreedyBatcher, observe_batch
from services.serving.follower import RegistryFollower

logger = logging.getLogger("ray.serve")


class Classifier(RegistryFollower):
    """Serve deployment class; `app.py` wraps it with `serve.deployment`."""

    def __init__(self, registry: str, name: str, channel: str = "production",
                 poll_interval_s: float = 2.0, threads: Optional[int] = None,
                 cache_versions: int = 2, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.0, board: Any = None,
                 dtype: str = "auto", trace: bool = True,
                 max_input_tokens: Optional[int] = None, truncation: str = "truncate",
                 optimize: Optional[str] = None):
        super().__init__(registry, name, channel=channel, poll_interval_s=poll_interval_s,
                         threads=threads, cache_versions=cache_versions, board=board,
                         dtype=dtype)
        self.trace = trace  # ServeConfig.trace: run each version as a TorchScript trace
        self.optimize = optimize  # ServeConfig.optimize: or on ONNX Runtime, or in bf16
        # ServeConfig.max_input_tokens and .truncation: texts run whole up to the model's
        # limit or this one; a longer text is truncated, or its request refused.
        self.max_input_tokens = max_input_tokens
        self.refuse = truncation == "refuse"
        self._trace_lock = threading.Lock()  # one trace built at a time (_trace_later)
        self._batcher = GreedyBatcher(
            self._predict, max_batch_size, batch_wait_timeout_s,
            on_wait=lambda s: metrics.observe("tuneserve_batch_wait_seconds", s,
                                              model=self.name),
            early_results=True)

    def _predict(self, items: list[tuple[LoadedClassifier, list[str]]],
                 deliver: Optional[Callable[[int, Any], None]] = None) -> list[Any]:
        """One batch (the batcher's thread): its size per version, then the forward
        passes, each request answered (`deliver`) once its texts have run."""
        observe_batch(self.name, [loaded.version for loaded, _ in items])
        return predict_batch(items, deliver)

    def _status_extra(self) -> dict[str, Any]:
        return {"labels": self.current.labels if self.current else [],
                "torchscript": bool(self.current and self.current.runtime in TRACED_RUNTIMES)}

    def _load_version(self, version: str) -> LoadedClassifier:
        later = self.trace and not self.optimize and self.current is not None
        loaded = load_classifier(self.registry, self.name, version, self.dtype,
                                 self.trace and not later, self.max_input_tokens,
                                 self.refuse, self.optimize)
        if later:  # traced behind the swap (module docstring)
            threading.Thread(target=self._trace_later, args=(loaded,), daemon=True,
                             name=f"trace-{self.name}-{version}").start()
        return loaded

    def _trace_later(self, loaded: LoadedClassifier) -> None:
        """Build and check `loaded`'s trace, then run it from the next forward pass on
        (one reference set; the two answer alike, as the check proved)."""
        if not self._trace_lock.acquire(blocking=False):
            # Another trace ran meanwhile, long enough for this version to be swapped in
            # (right after its load) and maybe out again: skipped if it is out.
            self._trace_lock.acquire()
            held = (self.current, self.candidate, *self.others.values())
            if not any(v is loaded for v in held):
                self._trace_lock.release()
                return
        try:
            traced = trace_classifier(loaded, f"{self.name} {loaded.version}")
        finally:
            self._trace_lock.release()
        if traced is not None:
            loaded.traced, loaded.runtime = traced, "torchscript"
            logger.info("%s %s: now running as TorchScript", self.name, loaded.version)

    async def classify(self, texts: list[str], version: Optional[str] = None,
                       routing_key: Optional[str] = None) -> dict[str, Any]:
        """Label scores for `texts` from `version`, else from the canary candidate or
        production (follower.py: `_answer`; `routing_key` keeps a caller on one)."""
        return await self._answer(version, routing_key,
                                  lambda loaded: self._classify_on(loaded, texts))

    async def _classify_on(self, loaded: LoadedClassifier, texts: list[str]) -> dict[str, Any]:
        probs = await self._batcher.submit((loaded, texts))
        if isinstance(probs, Exception):  # e.g. a text over the limit, with refuse
            raise probs
        results = []
        for row in probs:
            ranked = sorted(zip(loaded.labels, row), key=lambda p: -p[1])
            results.append({"label": ranked[0][0], "score": ranked[0][1],
                            "scores": ranked})
        return {"version": loaded.version, "results": results}

    async def classify_many(self, calls: list[tuple]) -> list[Any]:
        """Several callers' requests, (texts, version[, routing_key]) each, in one call
        (the ingress coalesces them): an answer or the exception for each, in order.
        They join the batcher's queue one by one, so they batch with everything else
        queued."""
        return await asyncio.gather(*(self.classify(*call) for call in calls),
                                    return_exceptions=True)
