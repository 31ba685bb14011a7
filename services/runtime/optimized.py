"""Optimised classifier runners: a loaded version exported to ONNX when it loads,
optionally with int8 weights, and run by onnxruntime's CPU provider; or its weights in
bfloat16, run as a TorchScript trace, where the device computes bfloat16 natively.

    runner = onnx_runner(module, probes, "onnx")  # OptimizeRefused where it differs
    logits = runner(**batch)                      # the tokenizer's tensors -> logits
    runner, model = bf16_runner(module, probes)   # the module's model, a bfloat16 copy

`module` is the model as a torch module from the tokenizer's tensors to logits, `probes`
batches of sample texts (services.runtime.classifier makes both). A runner is accepted
only where it answers as the module does on every probe batch: the same label for every
text whose top two classes the module separates by more than the tolerance, and every
class probability within the tolerance (OPTIMIZE_TOLERANCE). Otherwise it is refused
and the caller serves the model as it would have. ONNX Runtime runs float32 models on
the CPU only; bfloat16 runs where the CPU has AVX512-BF16 or AMX-BF16, or on a GPU that
computes it natively (`native_bf16`: emulated bfloat16 is slower than float32).
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from services.core.config import CLASSIFIER_OPTIMIZERS as OPTIMIZERS

OPTIMIZE_TOLERANCE = {"onnx": 1e-3, "onnx-int8": 0.05, "bf16": 0.03}
"""How far a runner's class probabilities may be from the model's on the probes.
bf16: bfloat16 keeps 8 significant bits, so logits move by a few hundredths through
the layers. MiniLM-L6 fine-tuned on SST-2 (docs/benchmarks.md, "Classifier runtimes")
moved by at most 0.0023 on the load probes, 0.013 over the 6,735 SST-2 dev phrases
and 0.009 over the 872 GLUE dev sentences, its label changing only on 5 near-ties
(top two classes within 0.009). 0.03 leaves room for deeper models' larger rounding
and still refuses a runner gone wrong (a wrong weight, an overflow), which moves
probabilities by far more."""
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


def bf16_unsupported(device) -> Optional[str]:
    """None where `device` computes bfloat16 natively (a CPU with AVX512-BF16 or
    AMX-BF16, as torch's cpuinfo reads them; a CUDA GPU of compute capability 8.0 or
    later), else why not."""
    import torch

    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return None
        return f"{torch.cuda.get_device_name(device)} has no native bfloat16"
    if device.type != "cpu":
        return f"bfloat16 is checked on CPUs and CUDA GPUs only, not {device.type}"
    caps = torch.cpu.get_capabilities()
    if caps.get("amx_bf16") or caps.get("avx512_bf16"):
        return None
    return ("this CPU has no native bfloat16 (neither AVX512-BF16 nor AMX-BF16), and "
            "emulated bfloat16 is slower than float32")


def bf16_runner(module, probes: list[dict[str, Any]]) -> tuple[Callable[..., Any], Any]:
    """A copy of the float32 `module` with bfloat16 weights, run as a TorchScript trace
    made on the first probe batch (the copy itself where tracing fails), checked against
    `module` on all probes: (runner, the copy). OptimizeRefused where the device has no
    native bfloat16 (`bf16_unsupported`) or the runner differs. The caller keeps the
    copy and drops `module` once accepted, so the float32 weights live only as long as
    the check."""
    import copy

    import torch

    weights = next(module.parameters())
    if weights.dtype != torch.float32:
        raise OptimizeRefused(f"bf16 is checked against the float32 model; this one is "
                              f"{str(weights.dtype).removeprefix('torch.')}")
    if why := bf16_unsupported(weights.device):
        raise OptimizeRefused(why)
    low = copy.deepcopy(module).to(torch.bfloat16).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values
            runner = torch.jit.trace(low, example_kwarg_inputs=probes[0], strict=False,
                                     check_trace=False)
    except Exception:  # noqa: BLE001 - the copy itself runs where tracing fails
        runner = low
    check(module, runner, probes, OPTIMIZE_TOLERANCE["bf16"])
    return runner, low
