"""bench/optimize.py's measurements on a tiny classifier (no Ray, no network)."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")


def test_each_runtime_is_timed_scored_and_reported_against_eager(
        classifier_registry, tmp_path):
    from bench.optimize import flops_per_token, load, padded_work, report, throughput

    texts = ["a lovely film", "dull", "word " * 40, "fine"] * 8
    results = {}
    for runtime in ("eager", "onnx"):
        loaded = load(classifier_registry, "toy", "v1", runtime)
        assert loaded.runtime == runtime
        results[runtime] = throughput(loaded, texts, batch=8, seconds=0.2)
        assert results[runtime]["texts_per_s"] > 0 and results[runtime]["gflops"] > 0
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
