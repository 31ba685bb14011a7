"""bench/optimize.py's measurements on a tiny classifier (no Ray, no network)."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")


def test_each_runtime_is_timed_scored_and_reported_against_eager(
        classifier_registry, tmp_path):
    from bench.optimize import (
        CLOCKS,
        flops_per_token,
        load,
        padded_work,
        report,
        throughput,
    )

    texts = ["a lovely film", "dull", "word " * 40, "fine"] * 8
    results = {}
    for runtime in ("eager", "onnx"):
        loaded = load(classifier_registry, "toy", "v1", runtime)
        assert loaded.runtime == runtime
        results[runtime] = throughput(loaded, texts, batch=8, seconds=0.2)
        assert results[runtime]["texts_per_s"] > 0 and results[runtime]["gflops"] > 0
    cpu = throughput(loaded, texts, batch=8, seconds=0.1, clock=CLOCKS["cpu"])
    assert cpu["texts_per_s"] > 0 and cpu["gflops"] > 0
    tokens, flops = padded_work(loaded, texts, 8)
    config = loaded.model.config
    # every pass is at least as wide as its longest text; work grows with the width
    assert tokens >= sum(len(loaded.tokenizer(t)["input_ids"]) for t in texts)
    assert flops_per_token(config, 64) > flops_per_token(config, 8) > 0
    assert flops >= tokens * flops_per_token(config, 1)
    text = report({"peak_gflops": 10.0, "results": results, "model": "toy v1",
                   "threads": 1, "machine": {}})
    rows = {line.split()[0]: line.split() for line in text.splitlines()[3:]}
    assert set(rows) == {"eager", "onnx"} and rows["eager"][2] == "1.00x"


def test_the_bf16_row_reads_against_the_bfloat16_gemm_rate():
    from bench.optimize import report

    results = {"eager": {"texts_per_s": 100.0, "gflops": 5.0},
               "bf16": {"texts_per_s": 300.0, "gflops": 15.0}}
    text = report({"peak_gflops": 10.0, "peak_bf16_gflops": 60.0, "results": results,
                   "model": "toy v1", "threads": 1, "machine": {}})
    assert "float32 GEMM 10.0 GFLOP/s, bfloat16 GEMM 60.0 GFLOP/s" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[3:]}
    assert rows["eager"][2] == "1.00x" and rows["eager"][-1] == "50.0%"
    assert rows["bf16"][2] == "3.00x" and rows["bf16"][-1] == "25.0%"
