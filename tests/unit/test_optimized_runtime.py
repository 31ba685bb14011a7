"""Classifiers on ONNX Runtime (ServeConfig.optimize, services/runtime/optimized.py):
checked against the model at load, refused where they differ or cannot run."""

from __future__ import annotations

import pytest

from services.core.config import ServeConfig
from services.core.errors import ConfigError, InvalidInput

pytest.importorskip("onnxruntime")

TEXTS = ["a lovely film with superb acting and a plot that keeps you guessing", "dull",
         "", "😀 ✓ 日本語", "word " * 300, "fine", "not good, not bad"]


@pytest.mark.parametrize("kind, tolerance", [("onnx", 1e-4), ("onnx-int8", 0.05)])
def test_a_version_runs_on_onnx_runtime_and_answers_as_the_model(
        classifier_registry, kind, tolerance):
    import torch

    from services.runtime.classifier import load_classifier, predict

    eager = load_classifier(classifier_registry, "toy", "v1", trace=False)
    loaded = load_classifier(classifier_registry, "toy", "v1", optimize=kind)
    assert (eager.runtime, loaded.runtime) == ("eager", kind)
    want = predict(eager, TEXTS)
    for chunk in (64, 1, 3):  # one padded pass, one text a pass, uneven passes
        got = predict(loaded, TEXTS, chunk=chunk)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=tolerance), (got - want).abs().max()
    clear = (want.max(-1).values - want.min(-1).values) > tolerance
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_a_runner_that_differs_is_refused_and_the_model_serves(
        classifier_registry, monkeypatch, caplog):
    import torch

    from services.runtime import optimized
    from services.runtime.classifier import load_classifier, predict

    real = optimized.session_runner

    def off(model, names):
        run = real(model, names)
        return lambda **batch: run(**batch) + torch.tensor([0.5, 0.0])  # leans to "neg"

    monkeypatch.setattr(optimized, "session_runner", off)
    with caplog.at_level("WARNING", logger="ray.serve"):
        loaded = load_classifier(classifier_registry, "toy", "v1", optimize="onnx")
    assert loaded.runtime == "torchscript"  # as without --optimize
    messages = [r.getMessage() for r in caplog.records]
    assert any("toy v1: not serving on onnx" in m and "differ" in m for m in messages), messages
    assert predict(loaded, TEXTS).shape == (len(TEXTS), 2)


def test_a_model_onnx_runtime_cannot_run_is_refused_with_the_reason(classifier_registry, caplog):
    from services.runtime.classifier import load_classifier

    with caplog.at_level("WARNING", logger="ray.serve"):
        loaded = load_classifier(classifier_registry, "toy", "v1", dtype="bfloat16",
                                 trace=False, optimize="onnx-int8")
    assert loaded.runtime == "eager"
    assert any("runs float32 models on the CPU; this one is bfloat16" in r.getMessage()
               for r in caplog.records)


def test_a_serving_replica_loads_its_versions_on_the_runtime_asked_for(classifier_registry):
    from services.serving.classifier import Classifier

    replica = Classifier(classifier_registry.uri, "toy", optimize="onnx")
    loaded = replica._load_version("v1")
    assert loaded.runtime == "onnx"
    replica.current = loaded
    assert replica._status_extra()["torchscript"] is False


def test_an_unknown_runtime_is_a_config_error_naming_the_field(tmp_path):
    with pytest.raises(ConfigError,
                       match="optimize.*'tensorrt' is not one of onnx, onnx-int8, bf16, auto"):
        ServeConfig(registry=str(tmp_path), optimize="tensorrt").validate()


def test_eval_through_a_server_refuses_optimize(tmp_path):
    from services.evaluate import run_eval

    with pytest.raises(InvalidInput, match="--optimize: the server chooses its runtime"):
        run_eval(data=str(tmp_path / "x.csv"), model="toy", address="localhost:1",
                 optimize="onnx")
