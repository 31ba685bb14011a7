"""A classifier version of the registry, loaded and run (torch side).

    loaded = load_classifier(registry, "sentiment", "v3")  # verified, smoke-tested
    probs = predict(loaded, ["a lovely film"])              # [texts x labels], rows sum to 1

`load_classifier` refuses a version (CorruptVersion) whose task is not classification,
whose model's labels differ from its manifest's, or whose smoke inference fails; a
version runs as a TorchScript trace where that answers as the model does
(`trace_classifier`). `predict_batch` runs several requests' texts together, once per
version. No gRPC and no Ray Serve in here.

Texts run whole, up to the model's own limit (`input_limit`) or a lower serving limit,
never the training run's max_length (a statistic of the training data). A longer text
is truncated to it, counted in `tuneserve_truncated_inputs_total` and reported in a
log line at most once a minute per version; with `refuse`, its request fails with
InvalidInput instead.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from services.core import metrics
from services.core.config import BF16_OPTIMIZERS, CLASSIFICATION
from services.core.errors import CorruptVersion, InvalidInput
from services.core.modeling import context_length, dtype_name, load_classifier_for_serving
from services.core.registry import Registry
from services.runtime.optimized import (
    OptimizeRefused,
    bf16_runner,
    bf16_unsupported,
    onnx_runner,
)

# The serving replicas' logger: a replica logs its loads there, and so does `tuneserve eval`.
logger = logging.getLogger("ray.serve")

SMOKE_TEXT = "tuneserve smoke test"
TRUNCATION_LOG_INTERVAL_S = 60.0
"""At most one log line about truncated texts per version and interval."""


@dataclass
class LoadedClassifier:
    version: str
    model: Any
    tokenizer: Any
    labels: list[str]
    max_length: int
    """The most tokens a text runs on: the model's own limit (`input_limit`), or the
    serving limit where that is lower. Longer texts are truncated (or refused)."""
    loaded_at: float
    traced: Any = None
    """What `predict` runs where set: the model's TorchScript trace (`trace_classifier`
    and, on bfloat16 weights, `optimize_classifier`) or its ONNX Runtime session
    (`optimize_classifier`); None: the model itself."""
    runtime: str = "eager"
    """What runs the model: eager (the model itself), torchscript, onnx, onnx-int8, bf16
    (bfloat16 weights as a TorchScript trace) or bf16-eager (bfloat16 weights, where
    tracing failed)."""
    name: str = ""
    """The model's name (the `model` label of its metrics)."""
    refuse: bool = False
    """`predict_batch` answers a request with a text over max_length with InvalidInput
    instead of truncating it."""
    truncations: dict[str, Any] = field(default_factory=lambda: {
        "count": 0, "longest": 0, "logged_at": 0.0})
    """Texts truncated since the last log line, and when that was."""

    @property
    def dtype(self) -> str:
        return dtype_name(self.model)

    def logits(self, batch: dict[str, Any]):
        if self.traced is not None:
            return self.traced(**batch)
        return self.model(**batch).logits


def input_limit(model, tokenizer) -> int:
    """The most tokens the model takes: its position embeddings (less the positions
    that padding reserves, as in RoBERTa), and the tokenizer's model_max_length where
    that is set and lower."""
    limit = context_length(model.config, tokenizer)
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)  # RoBERTa: positions from it + 1
    if isinstance(padding_idx, int) and 0 <= padding_idx < limit - 1:
        limit -= padding_idx + 1
    own = getattr(tokenizer, "model_max_length", None)
    if isinstance(own, int) and 0 < own < 10**7:
        limit = min(limit, own)
    return limit


def load_classifier(registry: Registry, name: str, version: str,
                    dtype: str = "auto", trace: bool = True,
                    max_input_tokens: Optional[int] = None,
                    refuse: bool = False, optimize: Optional[str] = None) -> LoadedClassifier:
    """Verify, load and smoke-test one version (a serving replica runs this in a worker
    thread); the weights in `services.core.modeling.serving_dtype(dtype)`; with `trace`,
    run as a TorchScript trace where that gives the model's own answers. Texts run up
    to the model's limit, or `max_input_tokens` where lower; `refuse`: see
    LoadedClassifier.refuse; `optimize` (onnx, onnx-int8, bf16, auto): run on ONNX
    Runtime or in bfloat16 where that answers as the model does (`optimize_classifier`),
    else as without it. bf16 and auto load the weights in float32 under dtype auto (the
    reference their check needs)."""
    import torch

    if optimize in BF16_OPTIMIZERS and dtype == "auto":
        dtype = "float32"
    manifest = registry.verify(name, version)
    if manifest.get("task") != CLASSIFICATION:
        raise CorruptVersion(f"{name} {version}: task is {manifest.get('task')!r}, "
                             f"not {CLASSIFICATION}")
    model, tokenizer = load_classifier_for_serving(registry.local_copy(name, version), dtype)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if labels != manifest.get("labels"):
        raise CorruptVersion(f"{name} {version}: model labels differ from the manifest")
    max_length = input_limit(model, tokenizer)
    if max_input_tokens is not None and max_input_tokens < max_length:
        max_length = max_input_tokens
    loaded = LoadedClassifier(version, model, tokenizer, labels, max_length, time.time(),
                              name=name, refuse=refuse)
    if optimize:
        optimize_classifier(loaded, optimize, f"{name} {version}")
    if trace and loaded.traced is None:
        loaded.traced = trace_classifier(loaded, f"{name} {version}")
        loaded.runtime = "torchscript" if loaded.traced is not None else "eager"
    probs = predict(loaded, [SMOKE_TEXT])
    if probs.shape != (1, len(labels)) or not bool(torch.isfinite(probs).all()):
        raise CorruptVersion(f"{name} {version}: smoke inference gave invalid output")
    return loaded


def load_classifier_folder(folder: str | Path, name: str = "",
                           version: str = "") -> LoadedClassifier:
    """A checkpoint folder in a version's layout, loaded as `load_classifier` loads a
    version but with no manifest to verify, no trace and no smoke test: a training
    run's checkpoint, scored before it is published (the promotion gate)."""
    model, tokenizer = load_classifier_for_serving(folder)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    return LoadedClassifier(version, model, tokenizer, labels, input_limit(model, tokenizer),
                            time.time(), name=name)


# ---- TorchScript --------------------------------------------------------------------
TRACED_RUNTIMES = ("torchscript", "bf16")
"""LoadedClassifier.runtime values whose runner is a TorchScript trace."""
TRACE_PROBES = [SMOKE_TEXT, "a", "two texts of different lengths, so one of them is padded"]
"""What a trace is made from; it is checked on these and `trace_probes`' long texts."""
TRACE_KEYS = {"input_ids", "attention_mask", "token_type_ids"}
"""The tokenizer's tensors a trace takes."""


def trace_probes(max_length: int) -> list[str]:
    """What a trace is checked on: TRACE_PROBES and texts of about half of max_length
    and of more than max_length (truncated to it), so that every length a text can
    run on, from 1 token to max_length, is covered; with padding and without."""
    return [*TRACE_PROBES, "word " * max(1, max_length // 2 - 2), "word " * (max_length + 8)]


def logits_module(model):
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


def probe_batch(loaded: LoadedClassifier, texts: list[str]) -> dict[str, Any]:
    """The texts as one padded batch on the model's device, as a trace takes it."""
    enc = loaded.tokenizer(texts, padding=True, truncation=True,
                           max_length=loaded.max_length, return_tensors="pt")
    if set(enc) - TRACE_KEYS:
        raise ValueError(f"tokenizer gives {sorted(set(enc) - TRACE_KEYS)}")
    return {k: v.to(loaded.model.device) for k, v in enc.items()}


def _checked_trace(loaded: LoadedClassifier) -> Any:
    """The trace, checked against the model on TRACE_PROBES; raises where it differs."""

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values
        traced = torch.jit.trace(logits_module(loaded.model), example_kwarg_inputs=(
            probe_batch(loaded, TRACE_PROBES[:3])), strict=False, check_trace=False)
    tolerance = 1e-4 if loaded.model.dtype == torch.float32 else 2e-2
    probes = trace_probes(loaded.max_length)
    with torch.inference_mode():
        for texts in [probes, *([t] for t in probes)]:
            batch = probe_batch(loaded, texts)
            want, got = loaded.model(**batch).logits, traced(**batch)
            if got.shape != want.shape or not torch.allclose(
                    got.float(), want.float(), atol=tolerance, rtol=tolerance):
                raise ValueError("the trace's logits differ from the model's")
    return traced


def trace_classifier(loaded: LoadedClassifier, what: str) -> Any:
    """A TorchScript trace of the model, or None where tracing fails or its logits
    differ from the model's on `trace_probes` (one pass of all, padded, and each alone).

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


def optimize_classifier(loaded: LoadedClassifier, kind: str, what: str) -> None:
    """Run the model as `kind` says (services.runtime.optimized): onnx or onnx-int8 on
    ONNX Runtime; bf16 with its weights in bfloat16 as a TorchScript trace, `loaded.model`
    then the bfloat16 copy and the float32 model dropped; auto: bf16 where the device
    computes bfloat16 natively, else nothing. Checked against the model on
    `trace_probes` (all padded together, and each alone); sets loaded.traced and
    loaded.runtime where accepted, and leaves `loaded` as it is, with a log line saying
    why, where it cannot run or answers differently."""
    if kind == "auto":
        why = bf16_unsupported(loaded.model.device)
        if why:
            logger.info("%s: --optimize auto: not serving on bf16 (%s)", what, why)
            return
        kind = "bf16"
    probes = trace_probes(loaded.max_length)
    try:
        batches = [probe_batch(loaded, texts) for texts in [probes, *([t] for t in probes)]]
        if kind == "bf16":
            runner, low = bf16_runner(logits_module(loaded.model), batches)
            loaded.model = low.inner
            loaded.traced = runner
            loaded.runtime = "bf16" if runner is not low else "bf16-eager"
        else:
            loaded.traced = onnx_runner(logits_module(loaded.model), batches, kind)
            loaded.runtime = kind
    except (OptimizeRefused, ValueError) as exc:
        logger.warning("%s: not serving on %s (%s)", what, kind, exc)


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


def encode(loaded: LoadedClassifier, texts: list[str]) -> tuple[dict[str, list], dict[int, int]]:
    """The texts tokenised whole, those over loaded.max_length truncated to it: the
    tokenizer's lists, and index -> untruncated token length of the texts that were
    longer."""
    tokenizer = loaded.tokenizer
    enc = tokenizer(texts, verbose=False)  # no warning for a text over the model's limit
    over = {i: len(ids) for i, ids in enumerate(enc["input_ids"]) if len(ids) > loaded.max_length}
    if over:
        cut = tokenizer([texts[i] for i in over], truncation=True,
                        max_length=loaded.max_length)
        enc = {k: list(v) for k, v in enc.items()}
        for j, i in enumerate(over):
            for k in enc:
                enc[k][i] = cut[k][j]
    return enc, over


def record_truncation(loaded: LoadedClassifier, lengths: list[int]) -> None:
    """Counts texts truncated to loaded.max_length (their untruncated token lengths),
    and logs them in one line at most every TRUNCATION_LOG_INTERVAL_S."""
    metrics.inc("tuneserve_truncated_inputs_total", len(lengths), model=loaded.name,
                version=loaded.version)
    state = loaded.truncations
    state["count"] += len(lengths)
    state["longest"] = max(state["longest"], *lengths)
    now = time.monotonic()
    if now - state["logged_at"] >= TRUNCATION_LOG_INTERVAL_S:
        logger.info("%s %s: truncated %d text(s) to the limit of %d tokens since the "
                    "last report (the longest had %d)", loaded.name, loaded.version,
                    state["count"], loaded.max_length, state["longest"])
        state.update(count=0, longest=0, logged_at=now)


def predict(loaded: LoadedClassifier, texts: list[str], chunk: int = 64,
            max_tokens: Optional[int] = None):
    """Class probabilities for texts, in order (a float32 tensor, texts x labels). The
    texts are tokenised together (`encode`: whole, up to loaded.max_length), then run
    in passes of similar lengths (`forward_passes`), each padded to its own longest."""
    enc, over = encode(loaded, texts)
    if over:
        record_truncation(loaded, list(over.values()))
    return run_encoded(loaded, enc, chunk, max_tokens)


def run_encoded(loaded: LoadedClassifier, enc: dict[str, list], chunk: int = 64,
                max_tokens: Optional[int] = None,
                on_pass: Optional[Callable[[list[int], Any], None]] = None):
    """`predict` of texts `encode` tokenised. `on_pass(rows, out)` is called after each
    forward pass with the rows it filled in `out`."""
    import torch

    device = loaded.model.device
    if max_tokens is None:
        max_tokens = GPU_TOKENS_PER_PASS if device.type == "cuda" else CPU_TOKENS_PER_PASS
    keys = list(enc.keys())
    n = len(enc["input_ids"])
    out = torch.empty((n, len(loaded.labels)), dtype=torch.float32)
    with torch.inference_mode():
        for idx in forward_passes([len(ids) for ids in enc["input_ids"]], chunk, max_tokens):
            batch = loaded.tokenizer.pad([{k: enc[k][i] for k in keys} for i in idx],
                                         return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = loaded.logits(batch).float()
            out[idx] = torch.softmax(logits, dim=-1).cpu()
            if on_pass is not None:
                on_pass(idx, out)
    return out


def predict_batch(items: list[tuple[LoadedClassifier, list[str]]],
                  deliver: Optional[Callable[[int, Any], None]] = None) -> list[Any]:
    """Several requests, (version, texts) each: every request's probabilities (lists),
    in order. The texts of all requests on one version are tokenised and run together.
    Where the version refuses texts over its limit (LoadedClassifier.refuse), a request
    with one gets an InvalidInput (an answer, not raised) and the others run. A version
    that fails gives its requests the exception (as answers): the other versions'
    requests in the batch are answered all the same (a canary fails only its own).
    `deliver(i, answer)` is called with each request's probabilities as soon as the
    forward pass holding its last text ends, before the batch's other passes run."""
    groups: dict[int, list[int]] = {}
    for i, (loaded, _) in enumerate(items):
        groups.setdefault(id(loaded), []).append(i)
    answers: list[Any] = [None] * len(items)
    for members in groups.values():
        try:
            _predict_group(items, members, answers, deliver)
        except Exception as exc:
            for i in members:
                if answers[i] is None:  # delivered or refused ones keep their answer
                    answers[i] = exc
    return answers


def _predict_group(items: list[tuple[LoadedClassifier, list[str]]], members: list[int],
                   answers: list[Any],
                   deliver: Optional[Callable[[int, Any], None]] = None) -> None:
    """predict_batch for the requests `members` of one version, into `answers`."""
    loaded = items[members[0]][0]
    enc, over = encode(loaded, [t for i in members for t in items[i][1]])
    rows, pos = [], 0  # (request, its first row)
    for i in members:
        n = len(items[i][1])
        bad = [j for j in range(n) if pos + j in over] if loaded.refuse else []
        if bad:
            answers[i] = InvalidInput(
                f"texts[{bad[0]}]: {over[pos + bad[0]]} tokens; model {loaded.name} "
                f"takes at most {loaded.max_length} tokens per text")
        else:
            rows.append((i, pos))
        pos += n
    if over and not loaded.refuse:
        record_truncation(loaded, list(over.values()))
    keep = [first + j for i, first in rows for j in range(len(items[i][1]))]
    if len(keep) < pos:
        enc = {k: [v[r] for r in keep] for k, v in enc.items()}
    if not keep:
        return
    # the kept rows of each request: request -> (its first row in `out`, rows left)
    spans, owner, at = {}, [], 0
    for i, _ in rows:
        n = len(items[i][1])
        spans[i] = [at, n]
        owner.extend([i] * n)
        at += n

    def settle(i: int, out) -> None:
        first, n = spans[i][0], len(items[i][1])
        answers[i] = out[first:first + n].tolist()
        if deliver is not None:
            deliver(i, answers[i])

    def on_pass(idx: list[int], out) -> None:
        for r in idx:
            span = spans[owner[r]]
            span[1] -= 1
            if span[1] == 0:
                settle(owner[r], out)

    run_encoded(loaded, enc, on_pass=on_pass)
