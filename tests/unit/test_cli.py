"""CLI behaviour that needs no Ray: parsing, clear errors, registry listing."""

import json
import os
import re
import subprocess
import sys
import pytest

from services.cli import main
from tests.unit.test_registry import fake_checkpoint, manifest
from services.core.config import ServeConfig
from services.core.errors import ConfigError
from services.core.registry import Registry


def test_help_runs_as_a_console_script():
    proc = subprocess.run([sys.executable, "-m", "services", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("train", "serve", "classify", "models", "demo"):
        assert cmd in proc.stdout


def test_train_bad_field_exits_2_naming_it(tmp_path, capsys):
    code = main(["train", "--model", "m", "--train", str(tmp_path / "t.csv"), "--epochs", "0"])
    assert code == 2
    assert "invalid config field 'epochs'" in capsys.readouterr().err


def test_a_failed_training_run_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    """What run_training raises when workers failed more often than allowed (the real
    failure: tests/integration/test_training_faults.py) reaches the shell as exit code
    1 and its message, with the --max-failures given."""
    from services.core.errors import TrainingFailed
    from services.training import run

    def fails(cfg, **kw):
        raise TrainingFailed(f"training failed (worker failures tolerated: "
                             f"{cfg.max_failures}); nothing was published")

    monkeypatch.setattr(run, "run_training", fails)
    code = main(["train", "--model", "m", "--train", str(tmp_path / "t.csv"),
                 "--max-failures", "0"])
    err = capsys.readouterr().err
    assert code == 1
    assert err == "error: training failed (worker failures tolerated: 0); nothing was " \
        "published\n"


def test_train_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\nbatch_sise: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "batch_sise" in err and "Traceback" not in err


def test_train_missing_data_file(tmp_path, capsys, tiny_model_dir):
    code = main(["train", "--model", str(tiny_model_dir), "--train", str(tmp_path / "no.csv")])
    assert code == 2
    assert "data file not found" in capsys.readouterr().err


def test_models_list_and_verify(tmp_path, capsys):
    reg = Registry(tmp_path / "reg")
    reg.publish("sent", fake_checkpoint(tmp_path / "ck"), manifest())
    reg.publish("sent", tmp_path / "ck", manifest())
    assert main(["models", "list", "--registry", str(tmp_path / "reg")]) == 0
    out = capsys.readouterr().out
    assert "sent" in out and "v1" in out and "production" in out and "accuracy 0.9000" in out
    assert main(["models", "list", "--registry", str(tmp_path / "reg"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["version"] for r in rows] == ["v1", "v2"]
    assert rows[0]["channels"] == ["production"] and rows[1]["channels"] == []
    assert main(["models", "verify", "--registry", str(tmp_path / "reg"), "sent", "v2"]) == 0
    (tmp_path / "reg" / "sent" / "v2" / "config.json").write_text("{}")
    assert main(["models", "verify", "--registry", str(tmp_path / "reg"), "sent", "v2"]) == 1
    assert "config.json" in capsys.readouterr().err


def test_models_list_shows_each_tasks_metric_and_a_missing_registry(tmp_path, capsys):
    reg = Registry(tmp_path / "reg")
    reg.publish("gsm", fake_checkpoint(tmp_path / "ck"),
                {"task": "generation", "metrics": {"loss": 1.25, "perplexity": 3.4903}})
    reg.publish("old", tmp_path / "ck", {"task": "classification", "metrics": {}})
    assert main(["models", "list", "--registry", str(tmp_path / "reg")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "eval" in lines[0].split()
    assert "perplexity 3.490" in next(line for line in lines if line.startswith("gsm"))
    old = next(line for line in lines if line.startswith("old"))
    assert "nan" not in old and "accuracy" not in old and old.split()[4] == "-"
    for argv in (["list"], ["list", "--json"], ["verify", "sent", "v1"]):
        assert main(["models", *argv, "--registry", str(tmp_path / "none")]) == 2
        assert "--registry: no registry at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["models", "list", "--registry", str(tmp_path / "empty")]) == 0
    assert "no models in" in capsys.readouterr().out
    # rolling back a model that is not there says so, and leaves no folder behind
    assert main(["models", "rollback", "nope", "--registry", str(tmp_path / "reg")]) == 1
    assert "model 'nope' not found" in capsys.readouterr().err
    assert not (tmp_path / "reg" / "nope").exists()


def test_eval_token_without_address_and_a_config_folder(tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,1\n")
    assert main(["eval", "--data", str(data), "--model", "m", "--token-file",
                 str(tmp_path / "t")]) == 2
    assert "--token-file: a token is for a server; pass --address" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert "is a folder; pass a YAML file" in capsys.readouterr().err


def test_serve_with_empty_registry_fails_clearly(tmp_path, capsys):
    assert main(["serve", "--registry", str(tmp_path / "none")]) == 1
    assert "no models in registry" in capsys.readouterr().err


def test_serve_on_a_busy_port_names_it_before_ray_starts(tmp_path):
    """A port something else holds is an error naming the flag, not a traceback from
    Serve's proxy actor; a taken default HTTP port (unused by gRPC) is not an error."""
    import socket

    from services.serving.app import check_ports_free, port_in_use
    from tests.helpers import free_port

    reg = Registry(tmp_path / "reg")
    reg.publish("sent", fake_checkpoint(tmp_path / "ck"), manifest())
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        assert port_in_use(busy)
        # the whole command, in a process of its own (no Ray there to skip the check)
        proc = subprocess.run(
            [sys.executable, "-m", "services", "serve", "--registry", str(tmp_path / "reg"),
             "--grpc-port", str(busy)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
        assert proc.returncode == 2, proc.stderr
        assert f"'grpc_port': port {busy} is already in use" in proc.stderr
        assert "--grpc-port" in proc.stderr and "Traceback" not in proc.stderr
        # the other ports, as start_serving checks them
        free = free_port()
        for kwargs, http, needle in (({"metrics_port": busy}, None, "'metrics_port'"),
                                     ({}, busy, "'http_port'")):
            with pytest.raises(ConfigError, match=f"{needle}: port {busy} is already in use"):
                check_ports_free(ServeConfig(grpc_port=free, **kwargs), http)


def test_replicas_that_cannot_fit_fail_before_serve_starts(tmp_path, monkeypatch):
    """Two models at one CPU each plus the ingress on a 2-CPU local cluster would wait
    for CPUs forever, in silence: an error naming the flags instead."""
    import ray
    from ray import serve

    from services.serving import app
    from tests.helpers import free_port

    reg = Registry(tmp_path / "reg")
    for name in ("sent", "topics"):
        reg.publish(name, fake_checkpoint(tmp_path / f"ck-{name}"), manifest())
    monkeypatch.setattr(app, "ensure_ray", lambda *a, **kw: True)  # "a local cluster"
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})

    class Started(Exception):
        pass

    def fake_start(**kwargs):
        raise Started()

    monkeypatch.setattr(serve, "start", fake_start)
    cfg = ServeConfig(registry=str(tmp_path / "reg"), grpc_port=free_port())
    with pytest.raises(ConfigError, match=re.escape(
            "serving needs 2.1 CPUs to start (2 model(s) x 1 replica(s) x --replica-cpus 1, "
            "+ 1 x 0.1 for the ingress) and the Ray cluster has 2: lower --replica-cpus")):
        app.start_serving(cfg)
    with pytest.raises(Started):  # fits: on to Serve
        app.start_serving(ServeConfig(registry=cfg.registry, grpc_port=cfg.grpc_port,
                                      replica_cpus=0.9))
    with pytest.raises(Started):
        app.start_serving(ServeConfig(registry=cfg.registry, grpc_port=cfg.grpc_port,
                                      models=["sent"]))
    # GPUs, colocated replicas, and a joined cluster (a warning: nodes may come)
    with pytest.raises(ConfigError, match=r"needs 2 GPUs .*--replica-gpus 1\) and the Ray "
                                          r"cluster has 0: lower --replica-gpus"):
        app.check_startup_resources(ServeConfig(replica_cpus=0.5, replica_gpus=1), 2,
                                    {"CPU": 2.0}, local=True)
    colocated = ServeConfig(colocate=True, num_replicas=2, replica_cpus=1.5)
    with pytest.raises(ConfigError, match=r"needs 3 CPUs .*2 ingress replica\(s\) x "
                                          r"--replica-cpus 1.5"):
        app.check_startup_resources(colocated, 5, {"CPU": 2.0}, local=True)
    warning = app.check_startup_resources(colocated, 5, {"CPU": 2.0}, local=False)
    assert warning.startswith("warning: serving needs 3 CPUs") and "autoscaling" in warning
    assert app.check_startup_resources(colocated, 5, {"CPU": 4.0}, local=True) is None


def test_privileged_ports_and_the_default_http_port(monkeypatch):
    import errno
    import socket

    from services.serving import app

    monkeypatch.setattr(app, "bind_error", lambda port: errno.EACCES if port < 1024 else None)
    with pytest.raises(ConfigError, match="'grpc_port': port 80 needs root .* --grpc-port"):
        app.check_ports_free(ServeConfig(grpc_port=80), None)
    app.check_ports_free(ServeConfig(grpc_port=9000), 8000)
    monkeypatch.undo()
    assert app.local_http_port(8123) == 8123
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            holder.bind(("0.0.0.0", app.DEFAULT_HTTP_PORT))
            holder.listen()
        except OSError:  # something on this machine already holds it: the same case
            pass
        port = app.local_http_port(None)
        assert port != app.DEFAULT_HTTP_PORT and not app.port_in_use(port)


def test_classify_against_nothing_reports_unavailable(capsys):
    from tests.helpers import free_port

    code = main(["classify", "--address", f"127.0.0.1:{free_port()}", "--model", "m",
                 "--timeout-s", "2", "hello"])
    assert code == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--model", "m", "--max-new-tokens", "-5", "hi"],
     "max_new_tokens: -5 is out of range (0 to 4294967295)"),
    (["generate", "--model", "m", "--top-k", "99999999999", "hi"],
     "top_k: 99999999999 is out of range"),
    (["generate", "--model", "m", "--seed", "99999999999999999999999", "hi"],
     "seed: 99999999999999999999999 is out of range"),
    (["classify", "--model", "m", "ok", "bad\udcff"],
     "texts[1]: not valid UTF-8 text"),
    (["generate", "--model", "m", "--stop", "\udcff", "hi"], "stop[0]: not valid UTF-8 text"),
    (["classify", "--address", "localhost:99999", "--model", "m", "x"],
     "address: port 99999 is out of range (1-65535)"),
    (["classify", "--timeout-s", "-1", "--model", "m", "x"], "timeout_s: must be a number"),
    (["generate", "--timeout-s", "nan", "--model", "m", "x"], "timeout_s: must be a number"),
])
def test_client_flags_out_of_range_are_named_before_any_call(argv, needle, capsys):
    from tests.helpers import free_port

    if "--address" not in argv:  # nothing listens: a call would say UNAVAILABLE
        argv = [argv[0], "--address", f"127.0.0.1:{free_port()}", *argv[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and "UNAVAILABLE" not in err


def test_client_timeouts():
    from services.client import Client
    from services.core.errors import InvalidInput

    with Client("localhost:1", timeout_s=float("inf")) as client:
        assert client.timeout_s is None and client._timeout(2) == 2.0
        with pytest.raises(InvalidInput, match="timeout_s"):
            client._timeout(0)


def test_models_promote_rollback_pin_unpin_on_the_registry(tmp_path, capsys):
    reg = Registry(tmp_path / "reg")
    ck = fake_checkpoint(tmp_path / "ck")
    for _ in range(3):
        reg.publish("sent", ck, manifest())
    r = ["--registry", str(tmp_path / "reg")]
    assert main(["models", "promote", *r, "sent", "v3"]) == 0
    assert "sent production: v1 -> v3" in capsys.readouterr().out
    assert reg.channel("sent") == "v3"
    assert main(["models", "rollback", *r, "sent"]) == 0
    assert reg.channel("sent") == "v1"
    assert main(["models", "pin", *r, "sent", "v2"]) == 0
    assert reg.pinned("sent") == "v2" and reg.resolve("sent") == "v2"
    assert main(["models", "unpin", *r, "sent"]) == 0
    assert reg.pinned("sent") is None
    capsys.readouterr()
    # promote verifies first and refuses a bad version
    (tmp_path / "reg" / "sent" / "v2" / "tokenizer.json").write_text('{"tampered": 1}')
    assert main(["models", "promote", *r, "sent", "v2"]) == 1
    assert "tokenizer.json" in capsys.readouterr().err
    assert reg.channel("sent") == "v1"
    assert main(["models", "promote", *r, "sent", "v9"]) == 1
    assert "no version 'v9'" in capsys.readouterr().err
    assert main(["models", "promote", *r, "sent", "latest"]) == 2


def test_eval_gated_promotion_decisions(tmp_path):
    from services.core.errors import ConfigError
    from services.training.promotion import decide, parse_min_metric

    reg = Registry(tmp_path / "reg")
    ck = fake_checkpoint(tmp_path / "ck")
    reg.publish("m", ck, {**manifest(), "metrics": {"accuracy": 0.80}})
    reg.publish("m", ck, {**manifest(), "metrics": {"accuracy": 0.85}})
    ok, why = decide(reg, "m", "v2", {"accuracy": 0.85}, "accuracy", "max", None)
    assert ok and "0.8500" in why and "0.8000" in why
    ok, why = decide(reg, "m", "v2", {"accuracy": 0.75}, "accuracy", "max", None)
    assert not ok and "worse than production v1" in why
    ok, why = decide(reg, "m", "v2", {"accuracy": 0.85}, "accuracy", "max", "accuracy=0.9")
    assert not ok and "threshold 0.9" in why
    ok, why = decide(reg, "m", "v2", {"loss": 0.2}, "loss", "min", None)
    assert ok  # production records no loss: nothing to compare against
    # a first version (published unpromoted, as `--promote` does): the threshold decides
    reg.publish("first", ck, {**manifest(), "metrics": {"accuracy": 0.6}}, promote=False)
    assert reg.channel("first") is None
    ok, why = decide(reg, "first", "v1", {"accuracy": 0.6}, "accuracy", "max", None)
    assert ok and "no production version yet" in why
    ok, why = decide(reg, "first", "v1", {"accuracy": 0.6}, "accuracy", "max", "accuracy=0.9")
    assert not ok and "threshold 0.9" in why
    assert parse_min_metric("macro_f1=0.7") == ("macro_f1", 0.7)
    with pytest.raises(ConfigError, match="min_metric"):
        parse_min_metric("accuracy>0.7")


def test_serve_rejects_a_bad_batch_size_naming_the_field(tmp_path, capsys):
    assert main(["serve", "--registry", str(tmp_path / "none"), "--max-batch-size", "0"]) != 0
    assert "max_batch_size" in capsys.readouterr().err


def test_serve_refuses_direct_ingress_replicas_naming_the_field(tmp_path, capsys):
    assert main(["serve", "--registry", str(tmp_path / "none"), "--layout", "direct",
                 "--num-replicas", "2"]) != 0
    err = capsys.readouterr().err
    assert "'colocate'" in err and "one replica" in err and "Traceback" not in err


@pytest.mark.parametrize("layout, fields", [
    (None, {"colocate": True, "replica_grpc": True, "direct_ingress": False}),
    ("colocated", {"colocate": True, "replica_grpc": True, "direct_ingress": False}),
    ("models", {"colocate": False, "replica_grpc": True, "direct_ingress": False}),
    ("proxy", {"colocate": False, "replica_grpc": False, "direct_ingress": False}),
    ("direct", {"colocate": True, "replica_grpc": False, "direct_ingress": True}),
])
def test_serve_layouts(tmp_path, layout, fields):
    """--layout picks the fields; the default is the fastest, the colocated one."""
    import argparse

    from services.cli import serve

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    flags = ["serve", "--registry", str(tmp_path / "r")] + \
        (["--layout", layout] if layout else [])
    cfg = serve.serve_config(parser.parse_args(flags))
    assert {k: getattr(cfg, k) for k in fields} == fields


def test_serve_layouts_with_autoscaling_and_refusals(tmp_path, capsys):
    # the model deployments, or with colocate the ingress, autoscale behind the
    # replicas' own servers
    for colocate in (False, True):
        cfg = ServeConfig(replica_grpc=True, colocate=colocate, max_replicas=3).validate()
        assert cfg.autoscaling_config()["max_replicas"] == 3
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--registry", str(tmp_path / "none"), "--layout", "sideways"])
    assert exit_.value.code == 2 and "--layout" in capsys.readouterr().err
    # the ingress replicas are the model replicas: --num-replicas sizes them
    assert main(["serve", "--registry", str(tmp_path / "none"), "--ingress-replicas", "2"]) != 0
    err = capsys.readouterr().err
    assert "'ingress_replicas'" in err and "num_replicas" in err and "Traceback" not in err


def test_direct_ingress_environment_gives_the_ingress_exactly_the_grpc_port():
    from services.serving.app import direct_ingress_env

    env = direct_ingress_env(9000)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Serve allocates ingress ports from range(min, max): only 9000
    assert range(int(env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"]),
                 int(env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"])) == range(9000, 9001)


def test_a_model_folder_without_a_tokenizer_is_one_line(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,1\nb,0\n")
    assert main(["train", "--model", str(tmp_path / "m"), "--train", str(data),
                 "--registry", str(tmp_path / "reg")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no tokenizer files" in err and "tokenizer.json, vocab.txt" in err
    assert len(err.splitlines()) == 1
