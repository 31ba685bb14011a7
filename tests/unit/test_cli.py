"""CLI behaviour that needs no Ray: parsing, clear errors, registry listing."""

import json
import subprocess
import sys

from services.cli import main
from tests.unit.test_registry import fake_checkpoint, manifest
from services.registry import Registry


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
    assert "sent" in out and "v1" in out and "production" in out and "0.9000" in out
    assert main(["models", "list", "--registry", str(tmp_path / "reg"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["version"] for r in rows] == ["v1", "v2"]
    assert rows[0]["channels"] == ["production"] and rows[1]["channels"] == []
    assert main(["models", "verify", "--registry", str(tmp_path / "reg"), "sent", "v2"]) == 0
    (tmp_path / "reg" / "sent" / "v2" / "config.json").write_text("{}")
    assert main(["models", "verify", "--registry", str(tmp_path / "reg"), "sent", "v2"]) == 1
    assert "config.json" in capsys.readouterr().err


def test_serve_with_empty_registry_fails_clearly(tmp_path, capsys):
    assert main(["serve", "--registry", str(tmp_path / "none")]) == 1
    assert "no models in registry" in capsys.readouterr().err


def test_classify_against_nothing_reports_unavailable(capsys):
    from tests.helpers import free_port

    code = main(["classify", "--address", f"127.0.0.1:{free_port()}", "--model", "m",
                 "--timeout-s", "2", "hello"])
    assert code == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err
