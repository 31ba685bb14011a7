"""Bad flags and config values fail at once, with one line naming them and exit code 2:
never a traceback, and never after Ray (or training, or a replica) started."""

import math
import socket

import pytest

from services.cli import main
from services.core.config import SEED_MAX, ServeConfig, TrainConfig
from services.core.errors import ConfigError, InvalidInput


@pytest.fixture
def nothing_starts(monkeypatch):
    """Anything that would start Ray, train or serve fails the test instead."""
    import services.core.raycluster
    import services.serving.app
    import services.training.run

    def started(*args, **kwargs):
        raise AssertionError("validation came too late: something started")

    monkeypatch.setattr(services.core.raycluster, "ensure_ray", started)
    monkeypatch.setattr(services.serving.app, "start_serving", started)

    def run_training(cfg, **kwargs):  # it validates the config first, then trains
        cfg.validate()
        started()

    monkeypatch.setattr(services.training.run, "run_training", run_training)
    try:
        import ray

        monkeypatch.setattr(ray, "init", started)
    except ImportError:
        pass


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


# ---- serve ------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value,needle", [
    ("--poll-interval-s", "nan", "'poll_interval_s': must be a finite number, got nan"),
    ("--poll-interval-s", "inf", "'poll_interval_s': must be a finite number, got inf"),
    ("--poll-interval-s", "0", "'poll_interval_s': must be > 0"),
    ("--replica-cpus", "nan", "'replica_cpus': must be a finite number"),
    ("--replica-cpus", "inf", "'replica_cpus': must be a finite number"),
    ("--replica-gpus", "-1", "'replica_gpus': must be >= 0, got -1.0"),
    ("--replica-gpus", "nan", "'replica_gpus': must be a finite number"),
    ("--max-queued-requests", "0", "'max_queued_requests': must be -1 (no limit) or a "
                                   "positive integer, got 0"),
    ("--max-queued-requests", "-5", "'max_queued_requests': must be -1 (no limit)"),
    ("--target-ongoing-requests", "nan", "'target_ongoing_requests': must be a finite"),
    ("--target-ongoing-requests", "0", "'target_ongoing_requests': must be > 0"),
    ("--max-batch-size", "0", "'max_batch_size': must be an integer >= 1"),
    ("--num-replicas", "0", "'num_replicas': must be an integer >= 1"),
    ("--grpc-port", "70000", "'grpc_port': 70000 is not a port number"),
    ("--http-port", "70000", "'http_port': 70000 is not a port number"),
    ("--http-port", "0", "'http_port': 0 is not a port number"),
    ("--metrics-port", "-1", "'metrics_port': -1 is not a port number"),
    ("--metrics-port", "70000", "'metrics_port': 70000 is not a port number"),
    ("--models", "a,,b", "'models': model name is empty"),
])
def test_serve_refuses_bad_numbers_before_anything_starts(flag, value, needle, capsys,
                                                         nothing_starts, tmp_path):
    code, err = run_cli(capsys, "serve", "--registry", str(tmp_path), flag, value)
    assert code == 2, err
    assert err.startswith("error: invalid serve setting ") and needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize("kw,field", [
    (dict(poll_interval_s=math.nan), "poll_interval_s"),
    (dict(poll_interval_s=-1.0), "poll_interval_s"),
    (dict(ingress_cpus=math.inf), "ingress_cpus"),
    (dict(ingress_cpus=-0.5), "ingress_cpus"),
    (dict(replica_cpus=0.00001), "replica_cpus"),
    (dict(upscale_delay_s=math.nan), "upscale_delay_s"),
    (dict(downscale_delay_s=-3.0), "downscale_delay_s"),
    (dict(batch_wait_timeout_s=math.nan), "batch_wait_timeout_s"),
    (dict(batch_wait_timeout_s=-0.1), "batch_wait_timeout_s"),
    (dict(generation_batch_wait_timeout_s=math.inf), "generation_batch_wait_timeout_s"),
    (dict(generation_batch_wait_timeout_s=-1.0), "generation_batch_wait_timeout_s"),
    (dict(max_replicas=3, target_ongoing_requests=math.nan), "target_ongoing_requests"),
    (dict(max_replicas=3, min_replicas=-1), "min_replicas"),
    (dict(max_batch_size=True), "max_batch_size"),
    (dict(num_replicas="2"), "num_replicas"),
    (dict(poll_interval_s="2"), "poll_interval_s"),
    (dict(max_queued_requests=1.5), "max_queued_requests"),
])
def test_serve_config_refuses_non_finite_negative_and_mistyped_values(kw, field):
    with pytest.raises(ConfigError, match=f"invalid serve setting '{field}'"):
        ServeConfig(**kw).validate()


def test_serve_config_limits_are_checked():
    from services.core.config import ServeLimits

    for name in ("max_texts_per_request", "max_new_tokens", "default_max_new_tokens"):
        with pytest.raises(ConfigError, match=f"'limits.{name}': must be an integer >= 1"):
            ServeConfig(limits=ServeLimits(**{name: 0})).validate()
    assert ServeConfig(limits=ServeLimits(max_stop_sequences=0)).validate()


def test_serve_config_accepts_the_edges():
    assert ServeConfig(max_queued_requests=-1).validate()
    assert ServeConfig(max_queued_requests=1, replica_gpus=0.5, ingress_cpus=0,
                       batch_wait_timeout_s=0, generation_batch_wait_timeout_s=0,
                       grpc_port=65535, metrics_port=1).validate()
    assert ServeConfig(max_replicas=2, min_replicas=0, upscale_delay_s=0,
                       downscale_delay_s=0).validate()


def test_serve_unknown_model_names_the_registry_not_its_repr(tmp_path):
    from services.core.registry import Registry
    from services.serving.app import discover_models

    registry = Registry(tmp_path / "reg")
    with pytest.raises(Exception) as err:
        discover_models(registry, ["nope"])
    assert str(err.value) == (f"model 'nope' not found in registry {registry.uri} (to serve "
                              f"it before its first version, name its task in model_tasks)")
    assert "Registry(" not in str(err.value)


# ---- train: numbers, seed, list fields --------------------------------------------------
def test_train_floats_refuse_nan_and_inf_everywhere():
    for f in TrainConfig.__dataclass_fields__.values():
        if "float" not in str(f.type):
            continue
        for bad in (math.nan, math.inf, -math.inf):
            kw = {f.name: bad}
            if f.name.startswith("lora_"):
                kw.update(task="generation", train="t.jsonl", lora_r=8)
            with pytest.raises(ConfigError, match=f"'{f.name}'"):
                TrainConfig(**{"model": "m", "train": "t.csv", **kw}).validate()


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf"])
def test_train_floats_from_yaml_refuse_nan_and_inf(tmp_path, value):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: m\ntrain: t.csv\nmax_grad_norm: {value}\n")
    with pytest.raises(ConfigError, match="'max_grad_norm': must be a finite number"):
        TrainConfig.from_yaml(path).validate()


@pytest.mark.parametrize("seed,ok", [(0, True), (SEED_MAX, True), (SEED_MAX + 1, False),
                                     (10**30, False), (-1, False)])
def test_seed_is_bounded_to_what_torch_manual_seed_takes(seed, ok):
    cfg = TrainConfig(model="m", train="t.csv", seed=seed)
    if ok:
        assert cfg.validate().seed == seed
    else:
        with pytest.raises(ConfigError, match="'seed'"):
            cfg.validate()


def test_seed_bound_matches_torch():
    torch = pytest.importorskip("torch")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(SEED_MAX)
        with pytest.raises((ValueError, RuntimeError, OverflowError)):
            torch.manual_seed(SEED_MAX + 1)
    finally:
        torch.random.set_rng_state(state)


def test_train_and_k8s_train_refuse_a_seed_past_2_64(capsys, nothing_starts, tmp_path):
    seed = str(2**64)
    code, err = run_cli(capsys, "train", "--model", "m", "--train", str(tmp_path / "t.csv"),
                        "--seed", seed, "--address", "127.0.0.1:1")
    assert code == 2 and "invalid config field 'seed': must be at most" in err
    code, err = run_cli(capsys, "k8s", "train", "--model", "m", "--train", "/data/t.csv",
                        "--seed", seed, "--dry-run")
    assert code == 2 and "invalid config field 'seed': must be at most" in err


@pytest.mark.parametrize("line,needle", [
    ("columns: [[a], b]", "'columns': expected a list of names (text); item 1 is list"),
    ("columns: [1, 2]", "'columns': expected a list of names (text); item 1 is int 1"),
    ("columns: [text, {a: 1}]", "'columns': expected a list of names (text); item 2 is dict"),
    ("lora_target_modules: [q_proj, 3]", "'lora_target_modules': expected a list of names"),
])
def test_list_fields_in_yaml_hold_text_only(tmp_path, line, needle):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: m\ntrain: t.csv\n{line}\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(path)
    assert needle in str(err.value)


def test_list_fields_set_directly_hold_text_only():
    with pytest.raises(ConfigError, match="'columns': must be a list of names"):
        TrainConfig(model="m", train="t.csv", columns=[["a"], "b"]).validate()
    with pytest.raises(ConfigError, match="'lora_target_modules': must be a list of names"):
        TrainConfig(model="m", train="t.jsonl", task="generation", lora_r=4,
                    lora_target_modules=["q_proj", 1]).validate()
    cfg = TrainConfig(model="m", train="t.csv", columns="text, label").validate()
    assert cfg.columns == ["text", "label"]


# ---- YAML files: encoding, duplicate keys -----------------------------------------------
@pytest.mark.parametrize("command", [["train"], ["k8s", "train", "--dry-run"]])
def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys, nothing_starts,
                                                    command):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"model: m\ntrain: caf\xe9.csv\n")
    code, err = run_cli(capsys, *command, "--config", str(path))
    assert code == 2
    assert f"error: config file {path}: not UTF-8 text (" in err
    assert "Traceback" not in err and "UnicodeDecodeError" not in err
    path.write_bytes(bytes(range(256)) * 4)  # binary
    code, err = run_cli(capsys, *command, "--config", str(path))
    assert code == 2 and f"config file {path}: not UTF-8 text" in err


def test_binary_utf8_config_is_not_valid_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"\x00\x01\x02model: m\n")
    with pytest.raises(ConfigError, match="not valid YAML: unacceptable character"):
        TrainConfig.from_yaml(path)


@pytest.mark.parametrize("text,needle", [
    ("model: m\ntrain: t.csv\nepochs: 2\nepochs: 3\n",
     "(line 4): 'epochs' is given twice (first on line 3); keep one"),
    ("model: m\ntrain: t.csv\neval-fraction: 0.2\neval_fraction: 0.3\n",
     "'eval-fraction' and 'eval_fraction' are the same field (eval_fraction); keep one"),
    ("model: m\ntrain: t.csv\nextra:\n  note: a\n  note: b\n",
     "(line 5): 'note' is given twice (first on line 4)"),
])
def test_yaml_duplicate_keys_are_refused(tmp_path, text, needle):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(path)
    assert needle in str(err.value)


def test_yaml_loader_stays_safe_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain: t.csv\nextra: {<<: {a: 1, b: 2}, b: 3}\n")
    assert TrainConfig.from_yaml(path).extra == {"a": 1, "b": 3}
    path.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(path)


def test_k8s_train_refuses_duplicate_keys(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain: /data/t.csv\nseed: 1\nseed: 2\n")
    code, err = run_cli(capsys, "k8s", "train", "--config", str(path), "--dry-run")
    assert code == 2 and "'seed' is given twice" in err


# ---- k8s train --watch ------------------------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (["--interval-s", "0"], "--interval-s: must be a number of seconds >= 0.5, got 0.0"),
    (["--interval-s", "nan"], "--interval-s: must be a number of seconds >= 0.5, got nan"),
    (["--interval-s", "-1"], "--interval-s: must be a number of seconds >= 0.5"),
    (["--interval-s", "inf"], "--interval-s: must be a number of seconds >= 0.5"),
    (["--timeout-s", "-4"], "--timeout-s: must be a number of seconds > 0"),
    (["--timeout-s", "nan"], "--timeout-s: must be a number of seconds > 0"),
    (["--timeout-s", "0"], "--timeout-s: must be a number of seconds > 0"),
])
def test_k8s_watch_interval_and_timeout_are_checked_before_any_cluster(flags, needle, capsys,
                                                                       monkeypatch):
    from services.k8s import cli as k8s_cli

    def connect(args):
        raise AssertionError("contacted a cluster before checking the flags")

    monkeypatch.setattr(k8s_cli, "_connect", connect)
    code, err = run_cli(capsys, "k8s", "train", "--model", "m", "--train", "/data/t.csv",
                        "--watch", *flags)
    assert code == 2 and needle in err


# ---- demo -------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (["--workers", "0"], "--workers: must divide the demo's batch size 16"),
    (["--workers", "3"], "--workers: must divide the demo's batch size 16"),
    (["--epochs", "-1"], "--epochs: must be a positive integer, got -1"),
    (["--epochs", "0"], "--epochs: must be a positive integer, got 0"),
    (["--grpc-port", "70000"], "--grpc-port: must be a port number (1-65535), or 0"),
    (["--grpc-port", "-1"], "--grpc-port: must be a port number"),
])
def test_demo_flags_are_checked_before_ray_starts(flags, needle, capsys, nothing_starts):
    code, err = run_cli(capsys, "demo", *flags)
    assert code == 2 and needle in err


def test_demo_grpc_port_in_use_is_refused_before_training(capsys, nothing_starts,
                                                          monkeypatch, tmp_path):
    import services.core.modeling

    monkeypatch.setattr(services.core.modeling, "demo_model_path", lambda: "m")
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        code, err = run_cli(capsys, "demo", "--grpc-port", str(port), "--home",
                            str(tmp_path))
    assert code == 2
    assert f"'grpc_port': port {port} is already in use" in err


# ---- classify / generate --address ------------------------------------------------------
@pytest.mark.parametrize("command", [["classify", "--model", "m", "x"],
                                     ["generate", "--model", "m", "x"]])
@pytest.mark.parametrize("address,needle", [
    ("localhost", "address: expected host:port (e.g. localhost:9000), got 'localhost'"),
    ("http://localhost:9000", "address: expected host:port (e.g. localhost:9000) without a "
                              "scheme, got 'http://localhost:9000'"),
    ("localhost:", "expected host:port"),
    (":9000", "expected host:port"),
    ("localhost:http", "the port must be a number"),
    ("::1:9000", "an IPv6 host goes in brackets: [::1]:9000"),
])
def test_address_must_be_host_colon_port(command, address, needle, capsys):
    code, err = run_cli(capsys, command[0], "--address", address, *command[1:])
    assert code == 2 and needle in err


def test_client_accepts_host_port_forms():
    from services.client import check_address

    for ok in ("localhost:9000", "127.0.0.1:1", "[::1]:9000", "svc.ns.svc.cluster.local:443"):
        check_address(ok)
    with pytest.raises(InvalidInput, match="port 99999 is out of range"):
        check_address("localhost:99999")


@pytest.mark.parametrize("command", ["classify", "generate"])
def test_client_help_shows_the_default_address(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: localhost:9000)" in out
