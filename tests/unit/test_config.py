import dataclasses
import os

import pytest

from services.core.config import SECTIONS, TASK_DEFAULTS, TASKS, TrainConfig
from services.core.errors import ConfigError, TuneserveError


def valid(**kw):
    base = dict(model="m", train="data/train.csv")
    base.update(kw)
    return TrainConfig(**base)


def test_defaults_validate_and_derive_name():
    cfg = valid().validate()
    assert cfg.name == "train"
    assert cfg.micro_batch_size == 32


def test_resolve_returns_a_new_frozen_config_and_leaves_the_input_as_it_is():
    raw = valid(columns="text, label")
    cfg = raw.resolve()
    assert (raw.name, raw.epochs, raw.columns) == (None, None, "text, label")
    assert (cfg.publish.name, cfg.optim.epochs, cfg.data.columns) == ("train", 3, ("text", "label"))
    assert (cfg.name, cfg.epochs, cfg.columns) == ("train", 3, ["text", "label"])  # flat view
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.epochs = 1
    with pytest.raises(AttributeError):
        cfg.epochs = 1
    assert cfg.resolve() is cfg and raw.validate() == cfg
    longer = cfg.with_max_length(64)
    assert (longer.data.max_length, longer.max_length, cfg.data.max_length) == (64, 64, None)


def test_sections_hold_every_field_once_and_to_dict_is_flat():
    names = ["task"] + [f.name for _, section in SECTIONS for f in dataclasses.fields(section)]
    assert sorted(names) == sorted(TrainConfig.field_names()) and len(set(names)) == len(names)
    assert set(TASK_DEFAULTS) == set(TASKS)
    cfg = valid(lora_target_modules="a, b").resolve()
    assert list(cfg.to_dict()) == TrainConfig.field_names()
    assert TrainConfig.from_dict(cfg.to_dict()).resolve() == cfg


def test_yaml_round_trip_and_flag_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: bert\ntrain: t.csv\nepochs: 2\nlearning_rate: 1\n"
                    "columns: text,label\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.epochs == 2 and cfg.learning_rate == 1.0 and cfg.columns == ["text", "label"]
    merged = cfg.merged({"epochs": 5, "workers": None})
    assert merged.epochs == 5 and merged.workers == 1


@pytest.mark.parametrize("field,value,needle", [
    ("epochs", 0, "'epochs'"),
    ("batch_size", 30, "'batch_size'"),
    ("learning_rate", 2.0, "'learning_rate'"),
    ("task", "regression", "'task'"),
    ("eval_fraction", 1.5, "'eval_fraction'"),
    ("name", "../evil", "'name'"),
    ("max_length", 4, "'max_length'"),
    ("seed", -1, "'seed': must be an integer >= 0"),
    ("max_grad_norm", float("nan"), "'max_grad_norm': must be a finite number"),
    ("cpus_per_worker", float("nan"), "'cpus_per_worker': must be a finite number"),
    ("cpus_per_worker", float("inf"), "'cpus_per_worker': must be a finite number"),
    ("placement_strategy", "spread-out", "'placement_strategy': must be one of PACK, SPREAD, "
                                         "STRICT_PACK, STRICT_SPREAD, got 'spread-out'"),
    ("early_stopping_min_delta", float("nan"), "'early_stopping_min_delta'"),
    ("columns", "text,text", "'columns': names a column twice: text"),
    ("label_column", "label", "'label_column': is the same column as text_column"),
    ("min_metric", "accuracy=0.9", "'min_metric': is the threshold of --promote"),
    ("extra", {"when": object()}, "'extra': must hold plain values"),
])
def test_invalid_fields_are_named(field, value, needle):
    kw = {field: value}
    if field == "batch_size":
        kw["workers"] = 4
    if field == "label_column":
        kw["text_column"] = "label"
    with pytest.raises(ConfigError) as err:
        valid(**kw).validate()
    assert needle in str(err.value)


@pytest.mark.parametrize("spec,task,needle", [
    ("bogus=0.5", "classification", "a classification run records accuracy, macro_f1"),
    ("accuracy=2", "classification", "accuracy lies between 0 and 1, got 2.0"),
    ("accuracy=nan", "classification", "must be a finite number"),
    ("accuracy=0.9", "generation", "a generation run records loss, perplexity"),
    ("loss=0", "generation", "loss is above 0"),
])
def test_min_metric_names_what_the_task_records(spec, task, needle):
    with pytest.raises(ConfigError, match="'min_metric'") as err:
        valid(task=task, train="t.jsonl", promote=True, min_metric=spec).validate()
    assert needle in str(err.value)
    valid(promote=True, min_metric="macro_f1=0.8").validate()
    valid(task="generation", train="t.jsonl", promote=True, min_metric="perplexity=12").validate()


def test_yaml_keys_dates_and_exponents(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain: t.csv\n1: 2\n")
    with pytest.raises(ConfigError, match="field names must be text, got 1"):
        TrainConfig.from_yaml(path)
    # YAML 1.1 reads 1e-4 as text and 2024-01-01 as a date: a float and the text written
    path.write_text("model: m\ntrain: t.csv\nlearning_rate: 1e-4\n"
                    "extra: {collected_on: 2024-01-01, n: 3}\n")
    cfg = TrainConfig.from_yaml(path).validate()
    assert cfg.learning_rate == 1e-4
    assert cfg.extra == {"collected_on": "2024-01-01", "n": 3}
    path.write_text("model: m\ntrain: t.csv\nlearning_rate: fast\n")
    with pytest.raises(ConfigError, match="'learning_rate': expected float, got str 'fast'"):
        TrainConfig.from_yaml(path)
    # null (or ~): refused where the field has no "unset", kept where it has one
    for line, needle in (("eval_fraction: null", r"'eval_fraction': null is not a value "
                                                  r"here; leave the field out for its "
                                                  r"default \(0.1\)"),
                         ("max_grad_norm: ~", "'max_grad_norm': null is not a value here")):
        path.write_text(f"model: m\ntrain: t.csv\n{line}\n")
        with pytest.raises(ConfigError, match=needle):
            TrainConfig.from_yaml(path)
    path.write_text("model: m\ntrain: t.csv\neval: null\n")
    assert TrainConfig.from_yaml(path).eval is None


def test_missing_model_and_train():
    with pytest.raises(ConfigError, match="'model'"):
        TrainConfig(train="x.csv").validate()
    with pytest.raises(ConfigError, match="'train'"):
        TrainConfig(model="m").validate()


def test_unknown_and_mistyped_yaml_fields(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nepochz: 3\n")
    with pytest.raises(ConfigError, match="epochz"):
        TrainConfig.from_yaml(path)
    path.write_text("model: m\nepochs: three\n")
    with pytest.raises(ConfigError, match="'epochs'.*expected int"):
        TrainConfig.from_yaml(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_serve_config_autoscaling_and_validation():
    from services.core.config import ServeConfig

    assert ServeConfig().validate().autoscaling_config() is None
    auto = ServeConfig(max_replicas=4, target_ongoing_requests=3).validate().autoscaling_config()
    assert auto["min_replicas"] == 1 and auto["max_replicas"] == 4
    assert auto["target_ongoing_requests"] == 3
    for kw, needle in [(dict(grpc_port=0), "grpc_port"),
                       (dict(min_replicas=3, max_replicas=2), "max_replicas"),
                       (dict(min_replicas=2), "min_replicas"),
                       (dict(max_ongoing_requests=0), "max_ongoing_requests")]:
        with pytest.raises(ConfigError, match=needle):
            ServeConfig(**kw).validate()


def test_model_tasks_and_ingress_replicas_are_checked(tmp_path):
    from services.core.config import ServeConfig
    from services.core.registry import Registry
    from services.serving.app import discover_models

    ok = ServeConfig(models=["fresh"], model_tasks={"fresh": "generation"},
                     ingress_replicas=2).validate()
    assert ok.model_tasks == {"fresh": "generation"}
    for kw, needle in [(dict(model_tasks={"fresh": "summarize"}), "summarize"),
                       (dict(model_tasks=["fresh"]), "must map model names"),
                       (dict(model_tasks={"../x": "classification"}), "model_tasks"),
                       (dict(models=["a"], model_tasks={"b": "classification"}),
                        "'b' is not in models"),
                       (dict(ingress_replicas=0), "ingress_replicas")]:
        with pytest.raises(ConfigError, match=needle):
            ServeConfig(**kw).validate()
    # An empty registry: a model with a known task is served (NOT_SERVING until a
    # version is promoted); one without is an error that says how to serve it.
    registry = Registry(tmp_path / "registry")
    assert discover_models(registry, ["fresh"], {"fresh": "classification"}) == \
        {"fresh": "classification"}
    assert discover_models(registry, None, {"fresh": "generation"}) == {"fresh": "generation"}
    with pytest.raises(TuneserveError, match="name its task in model_tasks"):
        discover_models(registry, ["other"], {"fresh": "classification"})


def test_ongoing_requests_default_per_task_and_explicit_value_wins():
    from services.core.config import ServeConfig

    cfg = ServeConfig(max_batch_size=16).validate()
    # a classifier holds a computing batch and the next one; a generator batch runs to
    # its longest request, so it takes few at once
    assert cfg.ongoing_for("classification") == 32
    assert cfg.ongoing_for("generation") == 8
    explicit = ServeConfig(max_ongoing_requests=1).validate()
    assert explicit.ongoing_for("classification") == explicit.ongoing_for("generation") == 1


def test_coalescing_limits_follow_replicas_batch_and_queue_settings():
    from services.core.config import ServeConfig

    cfg = ServeConfig(max_batch_size=16, num_replicas=3, max_queued_requests=10).validate()
    # two calls per replica (one computing, one queued), each at most a batch, no more
    # requests in flight than the replicas take on
    assert cfg.coalescing("classification") == {
        "max_calls": 6, "max_items": 96, "max_call_items": 16, "max_pending": 10}
    assert cfg.coalescing("generation") is None  # generation streams: one call each
    # autoscaling: room for max_replicas, so a saturated deployment shows the autoscaler
    # more than its target in flight
    auto = ServeConfig(max_replicas=4, max_batch_size=8).validate()
    assert auto.coalescing("classification")["max_calls"] == 8
    # max_ongoing_requests=1 still means one request at a time on a replica
    single = ServeConfig(max_ongoing_requests=1).validate()
    assert single.coalescing("classification")["max_call_items"] == 1
    assert single.coalescing("classification")["max_items"] == 1
    assert ServeConfig(coalesce=False).validate().coalescing("classification") is None


@pytest.mark.parametrize("preset, expected", [(None, "0.5"), ("3", "3")])
def test_local_ray_polls_train_reports_often_unless_told(preset, expected):
    # Ray Train's controller drains one report per worker per poll; services.core.raycluster
    # sets a 0.5 s poll for the processes of a local cluster, and keeps a user's value.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"}
    if preset is not None:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = preset
    code = ("import os, services.core.raycluster; "
            "print(os.environ['RAY_TRAIN_HEALTH_CHECK_INTERVAL_S'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == expected
