"""A classifier version of the registry, loaded and run (torch side).

    loaded = load_classifier(registry, "sentiment", "v3")  # verified, smoke-tested
    probs = predict(loaded, ["a lovely film"])              # [texts x labels], rows sum to 1

`load_classifier` refuses a version (CorruptVersion) whose task is not classification,
whose model's labels differ from its manifest's, or whose smoke inference fails; a
version runs as a TorchScript trace where that answers as the model does
(`trace_classifier`). `predict_batch` runs several requests' texts together, once per
version. No gRPC and no Ray Serve in here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from services.core.config import CLASSIFICATION
from services.core.errors import CorruptVersion
from services.core.modeling import dtype_name, load_classifier_for_serving
from services.core.registry import Registry

# The serving replicas' logger: a replica logs its loads there, and so does `tuneserve eval`.
logger = logging.getLogger("ray.serve")

SMOKE_TEXT = "tuneserve smoke test"


@dataclass
class LoadedClassifier:
    version: str
    model: Any
    tokenizer: Any
    labels: list[str]
    max_length: int
    loaded_at: float
    traced: Any = None
    """The model's TorchScript trace (`trace_classifier`), which `predict` runs when
    set; None: the model itself."""

    @property
    def dtype(self) -> str:
        return dtype_name(self.model)

    def logits(self, batch: dict[str, Any]):
        if self.traced is not None:
            return self.traced(**batch)
        return self.model(**batch).logits


def load_classifier(registry: Registry, name: str, version: str,
                    dtype: str = "auto", trace: bool = True) -> LoadedClassifier:
    """Verify, load and smoke-test one version (a serving replica runs this in a worker
    thread); the weights in `services.core.modeling.serving_dtype(dtype)`; with `trace`,
    run as a TorchScript trace where that gives the model's own answers."""
    import torch

    manifest = registry.verify(name, version)
    if manifest.get("task") != CLASSIFICATION:
        raise CorruptVersion(f"{name} {version}: task is {manifest.get('task')!r}, "
                             f"not {CLASSIFICATION}")
    model, tokenizer = load_classifier_for_serving(registry.local_copy(name, version), dtype)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if labels != manifest.get("labels"):
        raise CorruptVersion(f"{name} {version}: model labels differ from the manifest")
    max_length = int((manifest.get("config") or {}).get("max_length") or 512)
    max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
    loaded = LoadedClassifier(version, model, tokenizer, labels, max_length, time.time())
    if trace:
        loaded.traced = trace_classifier(loaded, f"{name} {version}")
    probs = predict(loaded, [SMOKE_TEXT])
    if probs.shape != (1, len(labels)) or not bool(torch.isfinite(probs).all()):
        raise CorruptVersion(f"{name} {version}: smoke inference gave invalid output")
    return loaded


# ---- TorchScript --------------------------------------------------------------------
TRACE_PROBES = [SMOKE_TEXT, "a", "two texts of different lengths, so one of them is padded",
                "word " * 600]
"""What a trace is checked on: lengths from 1 token to max_length, with padding."""
TRACE_KEYS = {"input_ids", "attention_mask", "token_type_ids"}
"""The tokenizer's tensors a trace takes."""


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


def _trace_inputs(loaded: LoadedClassifier, texts: list[str]) -> dict[str, Any]:
    """The texts as one padded batch on the model's device, as a trace takes it."""
    enc = loaded.tokenizer(texts, padding=True, truncation=True,
                           max_length=loaded.max_length, return_tensors="pt")
    if set(enc) - TRACE_KEYS:
        raise ValueError(f"tokenizer gives {sorted(set(enc) - TRACE_KEYS)}")
    return {k: v.to(loaded.model.device) for k, v in enc.items()}


def _checked_trace(loaded: LoadedClassifier) -> Any:
    """The trace, checked against the model on TRACE_PROBES; raises where it differs."""
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values
        traced = torch.jit.trace(_logits_module(loaded.model), example_kwarg_inputs=(
            _trace_inputs(loaded, TRACE_PROBES[:3])), strict=False, check_trace=False)
    tolerance = 1e-4 if loaded.model.dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for texts in [TRACE_PROBES, *([t] for t in TRACE_PROBES)]:
            batch = _trace_inputs(loaded, texts)
            want, got = loaded.model(**batch).logits, traced(**batch)
            if got.shape != want.shape or not torch.allclose(
                    got.float(), want.float(), atol=tolerance, rtol=tolerance):
                raise ValueError("the trace's logits differ from the model's")
    return traced


def trace_classifier(loaded: LoadedClassifier, what: str) -> Any:
    """A TorchScript trace of the model, or None where tracing fails or its logits
    differ from the model's on TRACE_PROBES (one pass of all, padded, and each alone).

    A trace runs the whole forward pass in TorchScript's C++ interpreter: none of the
    Python of the model's layers, and without holding the GIL, so a replica's gRPC
    event loop and the model no longer wait for each other (docs/benchmarks.md,
    "Classifiers as TorchScript")."""
    try:
        return _checked_trace(loaded)
    except Exception as exc:  # noqa: BLE001 - the model itself still serves
        logger.warning("%s: serving the model without TorchScript (%s: %s)", what,
                       type(exc).__name__, str(exc)[:200])
        return None


# ---- inference ----------------------------------------------------------------------
# Padded tokens per forward pass. On a CPU a pass costs about its padded tokens, so
# short passes of similar lengths beat one long padded one (docs/benchmarks.md); a GPU
# wants big passes.
CPU_TOKENS_PER_PASS = 256
GPU_TOKENS_PER_PASS = 16384


def forward_passes(lengths: list[int], max_texts: int, max_tokens: int) -> list[list[int]]:
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


def predict(loaded: LoadedClassifier, texts: list[str], chunk: int = 64,
            max_tokens: Optional[int] = None):
    """Class probabilities for texts, in order (a float32 tensor, texts x labels). The
    texts are tokenised together, then run in passes of similar lengths
    (`forward_passes`), each padded to its own longest."""
    import torch

    device = loaded.model.device
    if max_tokens is None:
        max_tokens = GPU_TOKENS_PER_PASS if device.type == "cuda" else CPU_TOKENS_PER_PASS
    enc = loaded.tokenizer(texts, truncation=True, max_length=loaded.max_length)
    keys = list(enc.keys())
    out = torch.empty((len(texts), len(loaded.labels)), dtype=torch.float32)
    with torch.inference_mode():
        for idx in forward_passes([len(ids) for ids in enc["input_ids"]], chunk, max_tokens):
            batch = loaded.tokenizer.pad([{k: enc[k][i] for k in keys} for i in idx],
                                         return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = loaded.logits(batch).float()
            out[idx] = torch.softmax(logits, dim=-1).cpu()
    return out


def predict_batch(items: list[tuple[LoadedClassifier, list[str]]]) -> list[list[list[float]]]:
    """Several requests, (version, texts) each: every request's probabilities (lists),
    in order. The texts of all requests on one version go through `predict` together."""
    groups: dict[int, list[int]] = {}
    for i, (loaded, _) in enumerate(items):
        groups.setdefault(id(loaded), []).append(i)
    answers: list[Any] = [None] * len(items)
    for members in groups.values():
        loaded = items[members[0]][0]
        texts = [t for i in members for t in items[i][1]]
        probs = predict(loaded, texts).tolist()
        pos = 0
        for i in members:
            n = len(items[i][1])
            answers[i] = probs[pos:pos + n]
            pos += n
    return answers
