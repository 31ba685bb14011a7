"""How a serving replica holds and runs its model: ServeConfig.dtype and ServeConfig.trace.

dtype: the setting is checked where it is given (config, CLI), "auto" resolves by
device, and both model kinds load and answer in bfloat16 on a CPU, close to float32.
(The served path, ServeConfig -> app -> replica, is checked over gRPC by
tests/integration/test_auth.py, whose second app serves in bfloat16.)

trace: a classifier runs as a TorchScript trace that answers exactly as the model does,
for any batch; a trace that fails or differs is dropped and the model itself serves.
(The session's server runs traced classifiers: every integration test goes through one.)
"""

from __future__ import annotations

import pytest

from services.core.config import ServeConfig
from services.core.errors import ConfigError
from tests.helpers import GEN_TEMPLATE

TEXTS = ["a lovely film", "dull and far too long", "fine", "😀 ✓ 日本語", "x " * 60]


def test_dtype_setting_is_checked_where_it_is_given():
    for ok in ("auto", "float32", "bfloat16"):
        assert ServeConfig(dtype=ok).validate().dtype == ok
    assert ServeConfig(dtype="float16", replica_gpus=1).validate().dtype == "float16"
    with pytest.raises(ConfigError, match=r"'dtype'.*'fp8' is not one of auto, float32"):
        ServeConfig(dtype="fp8").validate()
    with pytest.raises(ConfigError, match=r"'dtype'.*float16 needs a GPU.*bfloat16"):
        ServeConfig(dtype="float16").validate()


def test_serve_flag_takes_the_dtype_and_refuses_others(capsys):
    from services.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve"]).dtype == "auto"
    assert parser.parse_args(["serve", "--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--dtype", "half"])
    assert "--dtype: invalid choice: 'half'" in capsys.readouterr().err


def test_app_builder_passes_the_dtype_to_every_model(monkeypatch, tmp_path):
    from services.serving import app as app_module

    monkeypatch.setattr(app_module, "discover_models",
                        lambda *_: {"c": "classification", "g": "generation"})
    app = app_module.build_app(ServeConfig(registry=str(tmp_path), dtype="bfloat16"))
    models = app._bound_deployment.init_args[1]  # name -> the model deployment, bound
    assert {name: h._bound_deployment.init_kwargs["dtype"] for name, h in models.items()} \
        == {"c": "bfloat16", "g": "bfloat16"}
    colocated = app_module.build_app(ServeConfig(registry=str(tmp_path), dtype="float32",
                                                 colocate=True))
    specs = colocated._bound_deployment.init_args[1]
    assert {name: spec["kwargs"]["dtype"] for name, spec in specs.items()} == \
        {"c": "float32", "g": "float32"}


def test_auto_is_bfloat16_only_on_a_gpu_that_computes_it(monkeypatch):
    import torch

    from services.core.modeling import serving_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert serving_dtype("auto") is torch.float32
    assert serving_dtype("bfloat16") is torch.bfloat16  # asked for: honoured on a CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert serving_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert serving_dtype("auto") is torch.float32  # e.g. a V100
    assert serving_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="unknown serving dtype 'int8'"):
        serving_dtype("int8")


def test_a_classifier_replica_loads_and_answers_in_bfloat16(classifier_registry):
    import torch

    from services.runtime.classifier import predict
    from services.serving.classifier import Classifier

    torch.set_num_threads(1)
    answers = {}
    for dtype in ("float32", "bfloat16"):
        replica = Classifier(classifier_registry.uri, "toy", dtype=dtype)
        loaded = replica._load_version("v1")  # verified and smoke-tested
        assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, dtype)}
        answers[dtype] = predict(loaded, TEXTS)
    half = answers["bfloat16"]
    assert half.dtype == torch.float32 and half.shape == (len(TEXTS), 2)
    assert torch.allclose(half.sum(dim=1), torch.ones(len(TEXTS)))
    assert torch.allclose(half, answers["float32"], atol=0.02)
    assert not torch.equal(half, answers["float32"])  # it did compute in bfloat16


def test_a_generator_loads_and_generates_in_bfloat16(tiny_gpt2_dir):
    import torch

    from services.runtime.generation import GenerationEngine, SamplingParams
    from services.core.modeling import context_length, load_causal_lm_for_serving

    model, tokenizer = load_causal_lm_for_serving(tiny_gpt2_dir, "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    engine = GenerationEngine(model, tokenizer, GEN_TEMPLATE, context_length(model.config))
    jobs = [engine.job(p, SamplingParams(max_new_tokens=6, ignore_eos=True, **kw))
            for p, kw in (("red cat", {}), ("blue dog", {"temperature": 0.8, "seed": 3}))]
    engine.run(jobs)
    assert [(j.finish_reason, j.completion_tokens) for j in jobs] == [("length", 6)] * 2
    assert all(j.text for j in jobs)


# ---- TorchScript -------------------------------------------------------------------------
MIXED = ["a lovely film with superb acting and a plot that keeps you guessing", "dull",
         "", "😀 ✓ 日本語", "word " * 300, "fine"]


def test_a_traced_classifier_answers_exactly_as_the_model(classifier_registry):
    import torch

    from services.runtime.classifier import predict
    from services.serving.classifier import Classifier

    replica = Classifier(classifier_registry.uri, "toy")
    assert replica._status_extra() == {"labels": [], "torchscript": False}  # nothing loaded
    loaded = replica._load_version("v1")
    assert loaded.traced is not None
    assert isinstance(loaded.traced, torch.jit.ScriptModule)
    replica.current = loaded  # what the status board shows of the version it serves
    assert replica._status_extra() == {"labels": ["neg", "pos"], "torchscript": True}
    traced = predict(loaded, MIXED)
    for chunk in (64, 1, 3):  # one padded pass, one text a pass, uneven passes
        # (passes of other widths may round differently in the last bits)
        assert torch.allclose(predict(loaded, MIXED, chunk=chunk), traced, atol=1e-6)
    loaded.traced = None  # the model itself
    assert torch.allclose(predict(loaded, MIXED), traced, atol=1e-6)
    plain = Classifier(classifier_registry.uri, "toy", trace=False)
    plain.current = untraced = plain._load_version("v1")
    assert untraced.traced is None and plain._status_extra()["torchscript"] is False


def test_a_trace_in_bfloat16_is_checked_with_a_wider_tolerance(classifier_registry):
    import torch

    from services.runtime.classifier import load_classifier, predict

    loaded = load_classifier(classifier_registry, "toy", "v1", dtype="bfloat16")
    assert loaded.traced is not None and loaded.dtype == "bfloat16"
    eager = load_classifier(classifier_registry, "toy", "v1", dtype="float32", trace=False)
    assert torch.allclose(predict(loaded, MIXED), predict(eager, MIXED), atol=0.02)


@pytest.mark.parametrize("fault", ["trace fails", "trace differs", "shape differs"])
def test_a_trace_that_fails_or_differs_is_dropped_and_the_model_serves(
        classifier_registry, monkeypatch, caplog, fault):
    import torch

    from services.runtime.classifier import load_classifier, predict

    real_trace = torch.jit.trace

    def faulty(module, *args, **kwargs):
        if fault == "trace fails":
            raise RuntimeError("unsupported operation")
        traced = real_trace(module, *args, **kwargs)

        class Off(torch.nn.Module):
            def forward(self, **batch):
                logits = traced(**batch)
                return logits + 0.01 if fault == "trace differs" else logits[:, :1]
        return Off()

    monkeypatch.setattr(torch.jit, "trace", faulty)
    with caplog.at_level("WARNING", logger="ray.serve"):
        loaded = load_classifier(classifier_registry, "toy", "v1")
    assert loaded.traced is None
    assert any("toy v1: serving the model without TorchScript" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    probs = predict(loaded, MIXED)  # the model itself answers
    assert probs.shape == (len(MIXED), 2)


def test_the_trace_setting_reaches_classifiers_only(monkeypatch, tmp_path):
    from services.cli import build_parser
    from services.serving import app as app_module

    parser = build_parser()
    assert parser.parse_args(["serve"]).trace is True
    assert parser.parse_args(["serve", "--no-trace"]).trace is False
    monkeypatch.setattr(app_module, "discover_models",
                        lambda *_: {"c": "classification", "g": "generation"})
    app = app_module.build_app(ServeConfig(registry=str(tmp_path), trace=False,
                                           colocate=True))
    specs = app._bound_deployment.init_args[1]
    assert specs["c"]["kwargs"]["trace"] is False and "trace" not in specs["g"]["kwargs"]
