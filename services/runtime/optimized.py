"""Classifiers on ONNX Runtime: a loaded version exported to ONNX when it loads,
optionally with int8 weights, and run by onnxruntime's CPU provider.

    runner = onnx_runner(module, probes, "onnx")  # OptimizeRefused where it differs
    logits = runner(**batch)                      # the tokenizer's tensors -> logits

`module` is the model as a torch module from the tokenizer's tensors to logits, `probes`
batches of sample texts (services.runtime.classifier makes both). A runner is accepted
only where it answers as the module does on every probe batch: the same label for every
text whose top two classes the module separates by more than the tolerance, and every
class probability within the tolerance (OPTIMIZE_TOLERANCE). Otherwise it is refused and the caller serves the model
as it would have. ONNX Runtime runs float32 models on the CPU only.
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

from services.core.config import CLASSIFIER_OPTIMIZERS as OPTIMIZERS

OPTIMIZE_TOLERANCE = {"onnx": 1e-3, "onnx-int8": 0.05}
"""How far a runner's class probabilities may be from the model's on the probes."""
ONNX_OPSET = 17
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
"""The module's arguments, in the order of its signature (an export passes them by
position)."""


class OptimizeRefused(Exception):
    """The optimised runner cannot run this model, or answers differently from it."""


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise OptimizeRefused("onnxruntime is not installed (pip install onnxruntime)") from None
    return onnxruntime


def export(module, example: dict[str, Any]) -> tuple[bytes, list[str]]:
    """`module` (the tokenizer's tensors -> logits) as ONNX, batch and length dynamic,
    traced on the `example` batch; and the names of its inputs."""
    import torch

    names = [k for k in INPUT_ORDER if k in example]
    if names != list(INPUT_ORDER[:len(names)]) or set(names) != set(example):
        raise OptimizeRefused(f"the tokenizer gives {sorted(example)}; the export takes "
                              f"{', '.join(INPUT_ORDER)} in that order")
    buffer = io.BytesIO()
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on Python values
            torch.onnx.export(
                module.eval(), tuple(example[k] for k in names), buffer, input_names=names,
                output_names=["logits"], opset_version=ONNX_OPSET, dynamo=False,
                dynamic_axes={**{k: {0: "batch", 1: "length"} for k in names},
                              "logits": {0: "batch"}})
    finally:
        module.eval()  # the exporter puts back the mode it found, in every submodule
    return buffer.getvalue(), names


def quantize(model: bytes) -> bytes:
    """The ONNX model with int8 weights (a scale per output channel) for its linear
    layers (activations quantised per batch at run time)."""
    _onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser logs its advice on the root logger itself. A filter on that logger
    # drops only records logged there directly, not those of other loggers (which pass
    # its handlers, not its filters), so other threads' logs are left as they are.
    root = logging.getLogger()
    advice = _BelowError()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source, target = Path(tmp, "model.onnx"), Path(tmp, "model.int8.onnx")
        source.write_bytes(model)
        root.addFilter(advice)
        try:
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                             per_channel=True)
        finally:
            root.removeFilter(advice)
        return target.read_bytes()


class _BelowError(logging.Filter):
    """Drops records below ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def session_runner(model: bytes, names: list[str]) -> Callable[..., Any]:
    """A callable like the model's logits: the tokenizer's tensors -> logits (torch)."""
    import torch

    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def run(**batch):
        feed = {k: batch[k].cpu().numpy() for k in names}
        return torch.from_numpy(session.run(["logits"], feed)[0])

    return run


def check(module, runner: Callable[..., Any], probes: list[dict[str, Any]],
          tolerance: float) -> None:
    """OptimizeRefused where the runner's answers differ from the module's on the probes."""
    import torch

    with torch.inference_mode():
        for batch in probes:
            want = torch.softmax(module(**batch).float(), dim=-1)
            got = torch.softmax(runner(**batch).float(), dim=-1)
            if got.shape != want.shape:
                raise OptimizeRefused(f"its output has shape {tuple(got.shape)}, "
                                      f"the model's {tuple(want.shape)}")
            gap = float((got - want).abs().max())
            if gap > tolerance:
                raise OptimizeRefused(f"its class probabilities differ from the model's "
                                      f"by {gap:.4f} (tolerance {tolerance})")
            top2 = want.topk(min(2, want.shape[-1]), dim=-1).values
            clear = (top2[:, 0] - top2[:, -1]) > tolerance
            if bool((clear & (got.argmax(-1) != want.argmax(-1))).any()):
                raise OptimizeRefused("it gives another label than the model's")


def onnx_runner(module, probes: list[dict[str, Any]], kind: str = "onnx") -> Callable[..., Any]:
    """The module on ONNX Runtime (`kind` one of OPTIMIZERS), exported on the first
    probe batch and checked on all; OptimizeRefused where it cannot run or differs."""
    import torch

    if kind not in OPTIMIZERS:
        raise OptimizeRefused(f"unknown runtime {kind!r} (one of {', '.join(OPTIMIZERS)})")
    weights = next(module.parameters())
    if weights.device.type != "cpu" or weights.dtype != torch.float32:
        raise OptimizeRefused(f"ONNX Runtime runs float32 models on the CPU; this one is "
                              f"{str(weights.dtype).removeprefix('torch.')} on "
                              f"{weights.device.type}")
    try:
        model, names = export(module, probes[0])
        if kind == "onnx-int8":
            model = quantize(model)
        runner = session_runner(model, names)
    except OptimizeRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter and ORT raise many kinds
        raise OptimizeRefused(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    check(module, runner, probes, OPTIMIZE_TOLERANCE[kind])
    return runner
