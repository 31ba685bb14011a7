"""The classification model deployment (one per model name). No gRPC in here.

Following the registry (channel or pin, verify, load beside the old version, smoke
inference, atomic swap, refusal of bad versions) is shared with the generator:
services/serving/follower.py. What is classifier-specific: the labels check on load
(config.json's id2label must match the manifest), the smoke inference, batching.

Requests are batched across callers by a GreedyBatcher (services/serving/batching.py):
while the model computes, requests queue, and the next batch is everything queued
(after a brief wait for the callers of the batch that just ended), so a lone request
never waits and batches grow with the load. Inside a batch the texts are sorted by
length so each forward pass pads as little as possible. Each version runs as a
TorchScript trace of its model where that answers as the model does
(`trace_classifier`; ServeConfig.trace).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from services.core import metrics
from services.core.errors import CorruptVersion
from services.core.registry import Registry
from services.serving.batching import GreedyBatcher
from services.serving.follower import RegistryFollower

logger = logging.getLogger("ray.serve")

SMOKE_TEXT = "tuneserve smoke test"


@dataclass
class LoadedModel:
    version: str
    model: Any
    tokenizer: Any
    labels: list[str]
    max_length: int
    loaded_at: float
    traced: Any = None
    """The model's TorchScript trace (`trace_classifier`), which `_predict` runs when
    set; None: the model itself."""

    @property
    def dtype(self) -> str:
        from services.core.modeling import dtype_name

        return dtype_name(self.model)

    def logits(self, batch: dict[str, Any]):
        if self.traced is not None:
            return self.traced(**batch)
        return self.model(**batch).logits


def _load_version(registry: Registry, name: str, version: str,
                  dtype: str = "auto", trace: bool = True) -> LoadedModel:
    """Verify, load and smoke-test one version (runs in a worker thread); the weights
    in `services.core.modeling.serving_dtype(dtype)`; with `trace`, run as a TorchScript
    trace where that gives the model's own answers (`trace_classifier`)."""
    import torch

    from services.core.modeling import load_classifier_for_serving

    manifest = registry.verify(name, version)
    if manifest.get("task") != "classification":
        raise CorruptVersion(f"{name} {version}: task is {manifest.get('task')!r}, "
                             "not classification")
    model, tokenizer = load_classifier_for_serving(registry.local_copy(name, version), dtype)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if labels != manifest.get("labels"):
        raise CorruptVersion(f"{name} {version}: model labels differ from the manifest")
    max_length = int((manifest.get("config") or {}).get("max_length") or 512)
    max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
    loaded = LoadedModel(version, model, tokenizer, labels, max_length, time.time())
    if trace:
        loaded.traced = trace_classifier(loaded, f"{name} {version}")
    probs = _predict(loaded, [SMOKE_TEXT])
    if probs.shape != (1, len(labels)) or not bool(torch.isfinite(probs).all()):
        raise CorruptVersion(f"{name} {version}: smoke inference gave invalid output")
    return loaded


# ---- TorchScript --------------------------------------------------------------------
TRACE_PROBES = [SMOKE_TEXT, "a", "two texts of different lengths, so one of them is padded",
                "word " * 600]
"""What a trace is checked on: lengths from 1 token to max_length, with padding."""


def _logits_module(model):
    """What is traced: the classifier called with the tokenizer's tensors -> its logits
    (a module made here, so that importing this file does not import torch)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            kwargs = {"input_ids": input_ids}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return self.inner(**kwargs).logits

    return Logits(model)


def trace_classifier(loaded: LoadedModel, what: str) -> Any:
    """A TorchScript trace of the model, or None where tracing fails or its logits
    differ from the model's on TRACE_PROBES (one pass of all, padded, and each alone).

    A trace runs the whole forward pass in TorchScript's C++ interpreter: none of the
    Python of the model's layers, and without holding the GIL, so the replica's gRPC
    event loop and the model no longer wait for each other (docs/benchmarks.md,
    "Classifiers as TorchScript")."""
    import warnings

    import torch

    keys = {"input_ids", "attention_mask", "token_type_ids"}
    try:
        def encode(texts):
            enc = loaded.tokenizer(texts, padding=True, truncation=True,
                                   max_length=loaded.max_length, return_tensors="pt")
            if set(enc) - keys:
                raise ValueError(f"tokenizer gives {sorted(set(enc) - keys)}")
            return {k: v.to(loaded.model.device) for k, v in enc.items()}

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values
            traced = torch.jit.trace(_logits_module(loaded.model), example_kwarg_inputs=encode(
                TRACE_PROBES[:3]), strict=False, check_trace=False)
        tolerance = 1e-4 if loaded.model.dtype == torch.float32 else 2e-2
        with torch.inference_mode():
            for texts in [TRACE_PROBES, *([t] for t in TRACE_PROBES)]:
                batch = encode(texts)
                want, got = loaded.model(**batch).logits, traced(**batch)
                if got.shape != want.shape or not torch.allclose(
                        got.float(), want.float(), atol=tolerance, rtol=tolerance):
                    raise ValueError("the trace's logits differ from the model's")
    except Exception as exc:  # noqa: BLE001 - the model itself still serves
        logger.warning("%s: serving the model without TorchScript (%s: %s)", what,
                       type(exc).__name__, str(exc)[:200])
        return None
    return traced


# Padded tokens per forward pass. On a CPU a pass costs about its padded tokens, so
# short passes of similar lengths beat one long padded one: MiniLM-L6 on one thread
# classifies 32 SST-2 sentences at 69 texts/s in one pass, 137 with passes of at most
# 256 tokens, and as fast as before for 4 (docs/benchmarks.md). A GPU wants big passes.
CPU_TOKENS_PER_PASS = 256
GPU_TOKENS_PER_PASS = 16384


def _passes(lengths: list[int], max_texts: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped into forward passes: sorted by length, each pass at most
    max_texts texts and max_tokens padded tokens (a longer text gets a pass alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    passes: list[list[int]] = []
    for i in order:
        current = passes[-1] if passes else None
        # sorted ascending: the newcomer is the longest, so it sets the padded width
        if current and len(current) < max_texts and \
                (len(current) + 1) * lengths[i] <= max_tokens:
            current.append(i)
        else:
            passes.append([i])
    return passes


def _predict(loaded: LoadedModel, texts: list[str], chunk: int = 64,
             max_tokens: Optional[int] = None):
    """Class probabilities for texts, in order. The texts are tokenised together, then
    run in passes of similar lengths (`_passes`), each padded to its own longest."""
    import torch

    device = loaded.model.device
    if max_tokens is None:
        max_tokens = GPU_TOKENS_PER_PASS if device.type == "cuda" else CPU_TOKENS_PER_PASS
    enc = loaded.tokenizer(texts, truncation=True, max_length=loaded.max_length)
    keys = list(enc.keys())
    out = torch.empty((len(texts), len(loaded.labels)), dtype=torch.float32)
    with torch.inference_mode():
        for idx in _passes([len(ids) for ids in enc["input_ids"]], chunk, max_tokens):
            batch = loaded.tokenizer.pad([{k: enc[k][i] for k in keys} for i in idx],
                                         return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = loaded.logits(batch).float()
            out[idx] = torch.softmax(logits, dim=-1).cpu()
    return out


class Classifier(RegistryFollower):
    """Serve deployment class; `app.py` wraps it with `serve.deployment`."""

    def __init__(self, registry: str, name: str, channel: str = "production",
                 poll_interval_s: float = 2.0, threads: Optional[int] = None,
                 cache_versions: int = 2, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.0, board: Any = None,
                 dtype: str = "auto", trace: bool = True):
        super().__init__(registry, name, channel=channel, poll_interval_s=poll_interval_s,
                         threads=threads, cache_versions=cache_versions, board=board,
                         dtype=dtype)
        self.trace = trace
        self._batcher = GreedyBatcher(
            self._run_batch, max_batch_size, batch_wait_timeout_s,
            on_batch=lambda n: metrics.observe("tuneserve_batch_size", n, model=self.name),
            on_wait=lambda s: metrics.observe("tuneserve_batch_wait_seconds", s,
                                              model=self.name))

    def _status_extra(self) -> dict[str, Any]:
        return {"labels": self.current.labels if self.current else [],
                "torchscript": bool(self.current and self.current.traced is not None)}

    def _load_version(self, version: str) -> LoadedModel:
        return _load_version(self.registry, self.name, version, self.dtype, self.trace)

    async def classify(self, texts: list[str], version: Optional[str] = None) -> dict[str, Any]:
        loaded = await self._model_for(version)
        probs = await self._batcher.submit((loaded, texts))
        results = []
        for row in probs:
            ranked = sorted(zip(loaded.labels, row), key=lambda p: -p[1])
            results.append({"label": ranked[0][0], "score": ranked[0][1],
                            "scores": ranked})
        return {"version": loaded.version, "results": results}

    async def classify_many(self, calls: list[tuple[list[str], Optional[str]]]) -> list[Any]:
        """Several callers' requests, (texts, version) each, in one call (the ingress
        coalesces them): an answer or the exception for each, in order. They join the
        batcher's queue one by one, so they batch with everything else queued."""
        return await asyncio.gather(*(self.classify(texts, version) for texts, version in calls),
                                    return_exceptions=True)

    @staticmethod
    def _run_batch(items: list[tuple[LoadedModel, list[str]]]) -> list[list[list[float]]]:
        """All texts of all batched requests through `_predict`, once per model
        version (runs in the batcher's worker thread)."""
        groups: dict[int, list[int]] = {}
        for i, (loaded, _) in enumerate(items):
            groups.setdefault(id(loaded), []).append(i)
        answers: list[Any] = [None] * len(items)
        for members in groups.values():
            loaded = items[members[0]][0]
            texts = [t for i in members for t in items[i][1]]
            probs = _predict(loaded, texts).tolist()
            pos = 0
            for i in members:
                n = len(items[i][1])
                answers[i] = probs[pos:pos + n]
                pos += n
        return answers
