"""Classifier runtimes side by side: eager PyTorch, TorchScript, ONNX Runtime, ONNX
Runtime with int8 weights, and bfloat16 weights as a TorchScript trace (`tuneserve
serve --optimize`), in one process on the same texts: texts/s as a ratio of eager,
accuracy on a labelled file, and the FLOP/s each achieves against the machine's own
matrix-multiply rate in the dtype it computes in (what the cores reach on one large
float32 GEMM, and on one large bfloat16 GEMM for bf16, measured in the same run).

    python bench/optimize.py --registry REG --model sentiment     # a trained version
    python bench/optimize.py --quick                               # MiniLM-L6, untrained head

Without --model, a MiniLM-L6 classifier with an untrained head is published to a
temporary registry (timing only; its accuracy is not meaningful). --data: a labelled
file for the accuracy column (default: SST-2 dev from ../shared/data where present).
--clock cpu counts rates per CPU-second of this process rather than per wall-clock
second: with --threads 1, what the others on a busy machine take does not count.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    SST2_DEV,
    build_checkpoint,
    machine,
    sentences,
    table,
    write_json,
)
from services.core.config import CLASSIFICATION  # noqa: E402
from services.core.registry import Registry  # noqa: E402
from services.evaluate import evaluate_local, parse_model_ref, read_data  # noqa: E402
from services.runtime.classifier import (  # noqa: E402
    CPU_TOKENS_PER_PASS,
    encode,
    forward_passes,
    load_classifier,
    predict,
)

RUNTIMES = ("eager", "torchscript", "onnx", "onnx-int8", "bf16")
OPTIMIZED = ("onnx", "onnx-int8", "bf16")
"""The runtimes that `--optimize` picks."""


def load(registry: Registry, name: str, version: str, runtime: str):
    loaded = load_classifier(registry, name, version, dtype="float32",
                             trace=runtime == "torchscript",
                             optimize=runtime if runtime in OPTIMIZED else None)
    if loaded.runtime != runtime:
        raise SystemExit(f"{runtime}: refused at load (it runs as {loaded.runtime}); "
                         f"see the log line above")
    return loaded


def flops_per_token(config, width: int) -> float:
    """Multiply-adds x 2 of one token through an encoder whose passes are `width`
    tokens wide: the linear layers plus attention's scores and weighted sum."""
    d, layers = config.hidden_size, config.num_hidden_layers
    ff = config.intermediate_size
    return 2.0 * layers * (4 * d * d + 2 * d * ff) + 4.0 * layers * d * width


def padded_work(loaded, texts: list[str], batch: int) -> tuple[int, float]:
    """(padded tokens, FLOPs) of running `texts` in batches as `predict` cuts them."""
    tokens, flops = 0, 0.0
    for start in range(0, len(texts), batch):
        enc, _ = encode(loaded, texts[start:start + batch])
        lengths = [len(ids) for ids in enc["input_ids"]]
        for idx in forward_passes(lengths, batch, CPU_TOKENS_PER_PASS):
            width = max(lengths[i] for i in idx)
            tokens += width * len(idx)
            flops += width * len(idx) * flops_per_token(loaded.model.config, width)
    return tokens, flops


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
"""What a second is: wall-clock time, or CPU time of this process (which a busy
machine's other processes do not take from it: --clock cpu with --threads 1)."""


def throughput(loaded, texts: list[str], batch: int, seconds: float,
               clock=time.perf_counter) -> dict[str, float]:
    """Texts/s running batches of `batch` texts back to back for about `seconds`, both
    counted on `clock`."""
    predict(loaded, texts[:batch], chunk=batch)  # warm up
    done, pos, started = 0, 0, clock()
    while clock() - started < seconds:
        chunk = texts[pos:pos + batch] or texts[:batch]
        predict(loaded, chunk, chunk=batch)
        done += len(chunk)
        pos = (pos + batch) % len(texts)
    elapsed = clock() - started
    rounds = done / len(texts)
    _, flops = padded_work(loaded, texts, batch)
    return {"texts_per_s": done / elapsed, "gflops": flops * rounds / elapsed / 1e9}


def gemm_gflops(seconds: float = 3.0, n: int = 2048, dtype=torch.float32,
                clock=time.perf_counter) -> float:
    """The rate the cores reach on one large matrix multiply in `dtype`, per second of
    `clock`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    runs, started = 0, clock()
    while clock() - started < seconds:
        torch.mm(a, b)
        runs += 1
    return 2.0 * n ** 3 * runs / (clock() - started) / 1e9


def untrained_version(work: Path) -> tuple[Registry, str, str]:
    registry = Registry(work / "registry")
    registry.publish("minilm", build_checkpoint(work / "ckpt"), {
        "task": CLASSIFICATION, "labels": ["negative", "positive"],
        "config": {"max_length": 128}, "metrics": {}})
    return registry, "minilm", "v1"


def run(args, work: Path) -> dict[str, Any]:
    if args.model:
        registry = Registry(args.registry)
        name, version = parse_model_ref(args.model)
        version = registry.resolve(name, version)
    else:
        registry, name, version = untrained_version(work)
    data = None
    if args.model and args.data:
        data = read_data(args.data, None, None, None, args.limit)
    texts = sentences(args.texts)
    clock = CLOCKS[args.clock]
    peak = gemm_gflops(clock=clock)
    peak_bf16 = (gemm_gflops(dtype=torch.bfloat16, clock=clock)
                 if "bf16" in args.runtimes else None)
    results: dict[str, Any] = {}
    for runtime in args.runtimes:
        loaded = load(registry, name, version, runtime)
        row = throughput(loaded, texts, args.batch, args.seconds, clock)
        if data is not None:
            report = evaluate_local(registry.uri, name, version, data, progress=False,
                                    optimize=runtime if runtime in OPTIMIZED else None)
            row["accuracy"] = report.metrics["accuracy"]
        results[runtime] = row
        print(f"{runtime}: {row['texts_per_s']:.1f} texts/s", flush=True)
    return {"peak_gflops": peak, "peak_bf16_gflops": peak_bf16, "results": results,
            "model": f"{name} {version}", "clock": args.clock,
            "threads": torch.get_num_threads(), "machine": machine()}


def report(out: dict[str, Any]) -> str:
    """The table; each runtime's GFLOP/s against the GEMM rate of the dtype it
    computes in (bf16: bfloat16, the others: float32)."""
    base = out["results"].get("eager")
    rows = []
    for runtime, r in out["results"].items():
        peak = out["peak_gflops"]
        if runtime == "bf16" and out.get("peak_bf16_gflops"):
            peak = out["peak_bf16_gflops"]
        ratio = r["texts_per_s"] / base["texts_per_s"] if base else float("nan")
        acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
        delta = (f"{100 * (r['accuracy'] - base['accuracy']):+.2f}"
                 if base and "accuracy" in r and "accuracy" in base else "-")
        rows.append([runtime, f"{r['texts_per_s']:.1f}", f"{ratio:.2f}x", acc, delta,
                     f"{r['gflops']:.1f}", f"{100 * r['gflops'] / peak:.1f}%"])
    bf16 = (f", bfloat16 GEMM {out['peak_bf16_gflops']:.1f} GFLOP/s"
            if out.get("peak_bf16_gflops") else "")
    per = ", rates per CPU-second" if out.get("clock") == "cpu" else ""
    return (f"{out['model']}, {out['threads']} threads{per}, float32 GEMM "
            f"{out['peak_gflops']:.1f} GFLOP/s{bf16}\n" + table(
                rows, ["runtime", "texts/s", "vs eager", "accuracy", "points",
                       "GFLOP/s", "of GEMM"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", default=None, help="registry of --model")
    parser.add_argument("--model", default=None, metavar="NAME[@VERSION]",
                        help="a trained classifier (default: MiniLM-L6, untrained head)")
    parser.add_argument("--data", default=str(SST2_DEV) if SST2_DEV.is_file() else None,
                        help="labelled file for the accuracy column (with --model)")
    parser.add_argument("--limit", type=int, default=None, help="rows of --data")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        type=lambda s: s.split(","), help="comma-separated")
    parser.add_argument("--batch", type=int, default=32, help="texts per predict call")
    parser.add_argument("--texts", type=int, default=1024, help="distinct texts timed")
    parser.add_argument("--seconds", type=float, default=15.0, help="per runtime")
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT threads")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="rates per wall-clock second, or per CPU-second of this "
                             "process (cpu: with --threads 1, for a machine others load)")
    parser.add_argument("--quick", action="store_true", help="3 s per runtime")
    parser.add_argument("--json", default=None, help="write the results there")
    args = parser.parse_args()
    if args.model and not args.registry:
        parser.error("--model needs --registry")
    if bad := [r for r in args.runtimes if r not in RUNTIMES]:
        parser.error(f"--runtimes: unknown {bad} (choose from {', '.join(RUNTIMES)})")
    if args.quick:
        args.seconds, args.texts = 3.0, 256
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = run(args, Path(tmp))
    print(report(out))
    write_json(args.json, out)


if __name__ == "__main__":
    main()
