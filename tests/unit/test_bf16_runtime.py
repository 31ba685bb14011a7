"""Classifiers with bfloat16 weights (ServeConfig.optimize bf16 and auto,
services/runtime/optimized.py): checked against the float32 model at load, refused
where they differ or where the device has no native bfloat16."""

from __future__ import annotations

import pytest

from services.core.config import ServeConfig
from services.core.errors import ConfigError

TEXTS = ["a lovely film with superb acting and a plot that keeps you guessing", "dull",
         "", "😀 ✓ 日本語", "word " * 300, "fine", "not good, not bad"]


def native_bf16() -> bool:
    import torch

    from services.runtime.optimized import bf16_unsupported

    return bf16_unsupported(torch.device("cpu")) is None


def no_native_bf16(monkeypatch):
    """This CPU as one without AVX512-BF16 and AMX-BF16, as torch's cpuinfo reports."""
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64"})


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bfloat16 "
                    "(AVX512-BF16 or AMX-BF16), so bf16 is refused here")
def test_bf16_weights_run_as_a_trace_and_answer_within_the_tolerance(classifier_registry):
    import torch

    from services.runtime.classifier import load_classifier, predict
    from services.runtime.optimized import OPTIMIZE_TOLERANCE

    tolerance = OPTIMIZE_TOLERANCE["bf16"]
    eager = load_classifier(classifier_registry, "toy", "v1", trace=False)
    loaded = load_classifier(classifier_registry, "toy", "v1", optimize="bf16")
    assert (loaded.runtime, loaded.dtype) == ("bf16", "bfloat16")
    assert isinstance(loaded.traced, torch.jit.ScriptModule)
    # the float32 weights are not kept: every parameter served is bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    want = predict(eager, TEXTS)
    for chunk in (64, 1, 3):  # one padded pass, one text a pass, uneven passes
        got = predict(loaded, TEXTS, chunk=chunk)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got, want, atol=tolerance), (got - want).abs().max()
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > tolerance
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_bf16_outside_the_tolerance_is_refused_and_the_float32_model_serves(
        classifier_registry, monkeypatch, caplog):
    import torch

    from services.runtime import optimized
    from services.runtime.classifier import load_classifier, predict

    # any device: emulated bfloat16 computes the same numbers, only slower
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    monkeypatch.setitem(optimized.OPTIMIZE_TOLERANCE, "bf16", 0.0)
    with caplog.at_level("WARNING", logger="ray.serve"):
        loaded = load_classifier(classifier_registry, "toy", "v1", optimize="bf16")
    assert (loaded.runtime, loaded.dtype) == ("torchscript", "float32")
    messages = [r.getMessage() for r in caplog.records]
    assert any("toy v1: not serving on bf16" in m and "differ from the model's" in m
               for m in messages), messages
    assert predict(loaded, TEXTS).shape == (len(TEXTS), 2)


@pytest.mark.parametrize("kind, level", [("bf16", "WARNING"), ("auto", "INFO")])
def test_without_native_bf16_bf16_is_refused_and_auto_picks_nothing(
        classifier_registry, monkeypatch, caplog, kind, level):
    from services.runtime.classifier import load_classifier

    no_native_bf16(monkeypatch)
    with caplog.at_level("INFO", logger="ray.serve"):
        loaded = load_classifier(classifier_registry, "toy", "v1", optimize=kind)
    assert (loaded.runtime, loaded.dtype) == ("torchscript", "float32")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert any(lv == level and "toy v1:" in m and "not serving on bf16" in m and
               "no native bfloat16" in m for lv, m in lines), lines


def test_a_replica_reports_the_bf16_runtime_it_picked(classifier_registry, monkeypatch):
    import torch

    from services.serving.classifier import Classifier

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    replica = Classifier(classifier_registry.uri, "toy", optimize="auto")
    replica.current = replica._load_version("v1")
    assert (replica.current.runtime, replica.current.dtype) == ("bf16", "bfloat16")
    assert replica._status_extra()["torchscript"] is True


def test_the_bf16_choices_are_validated(tmp_path):
    from services.cli import build_parser

    for kind in ("bf16", "auto"):
        ServeConfig(registry=str(tmp_path), optimize=kind).validate()
        ServeConfig(registry=str(tmp_path), optimize=kind, dtype="float32").validate()
    with pytest.raises(ConfigError, match="optimize.: bf16 checks bfloat16 weights against "
                       "the float32 model.*not bfloat16"):
        ServeConfig(registry=str(tmp_path), optimize="bf16", dtype="bfloat16").validate()
    from services.cli.serve import serve_config

    parser = build_parser()
    args = parser.parse_args(["serve", "--registry", str(tmp_path), "--optimize", "auto"])
    assert serve_config(args).optimize == "auto"
    for command in (["serve"], ["eval", "--data", "d.csv", "--model", "toy"]):
        for kind in ("bf16", "auto"):
            assert parser.parse_args([*command, "--optimize", kind]).optimize == kind
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--optimize", "fp8"])
