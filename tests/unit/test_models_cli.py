"""`tuneserve models` on a registry with something broken in it: the rest is still
listed, the pin shows, a broken pin can be repaired, and nothing prints a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest

from services.cli import main
from services.core.registry import Registry
from tests.unit.test_registry import registry_of


@pytest.fixture
def reg(tmp_path):
    return Path(registry_of(tmp_path, ("a", "b")).uri)


def test_list_shows_every_readable_version_and_marks_the_broken_one(reg, capsys):
    (reg / "a" / "v2" / "manifest.json").write_text('{"name": "a", ')
    metrics = json.loads((reg / "b" / "v2" / "manifest.json").read_text())
    metrics["metrics"] = [1, 2]  # hand-edited into a list
    (reg / "b" / "v2" / "manifest.json").write_text(json.dumps(metrics))
    assert main(["models", "list", "--registry", str(reg)]) == 1
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:2]): line for line in out.splitlines()[2:]}
    assert set(rows) == {("a", "v1"), ("a", "v2"), ("b", "v1"), ("b", "v2")}
    assert "unreadable: a v2: unreadable manifest" in rows[("a", "v2")]
    assert "accuracy 0.9000" in rows[("a", "v1")] and "production" in rows[("b", "v1")]
    assert main(["models", "list", "--registry", str(reg), "--json"]) == 1
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.get("error") is not None for r in listed] == [False, True, False, False]


def test_list_shows_the_pin_and_promote_warns_about_it(reg, capsys):
    assert main(["models", "pin", "--registry", str(reg), "a", "v1"]) == 0
    assert capsys.readouterr().out == "a pin: - -> v1\n"
    assert main(["models", "list", "--registry", str(reg)]) == 0
    out = capsys.readouterr().out
    assert [line.split()[3] for line in out.splitlines() if line.startswith("a ")] == \
        ["production,pin", "-"]
    assert main(["models", "promote", "--registry", str(reg), "a", "v2"]) == 0
    captured = capsys.readouterr()
    assert "a production: v1 -> v2" in captured.out
    assert "a is pinned to v1" in captured.err
    assert main(["models", "list", "--registry", str(reg), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["pinned"] for r in listed if r["name"] == "a"] == [True, False]


def test_a_corrupt_pin_file_is_repaired_by_unpin(reg, capsys):
    (reg / "a" / "pin.json").write_text("{oops")
    assert main(["models", "list", "--registry", str(reg)]) == 1
    assert "unreadable a pin pointer" in capsys.readouterr().out
    assert main(["models", "unpin", "--registry", str(reg), "a"]) == 0
    assert "a pin: (unreadable) -> -" in capsys.readouterr().out
    assert Registry(reg).pinned("a") is None
    (reg / "a" / "pin.json").write_text("{oops")
    assert main(["models", "pin", "--registry", str(reg), "a", "v2"]) == 0
    assert Registry(reg).pinned("a") == "v2"


def test_os_errors_are_one_line_not_a_traceback(reg, capsys, monkeypatch):
    from services.core.registry import store

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(store, "file_sha256", unreadable)
    assert main(["models", "verify", "--registry", str(reg), "a", "v1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: a v1: cannot read ") and "Permission denied" in err
    assert str(reg) not in err  # no server path
    monkeypatch.setattr(Registry, "model_names", lambda self: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", "/reg/channels")))
    assert main(["models", "list", "--registry", str(reg)]) == 1
    err = capsys.readouterr().err
    assert err == "error: Permission denied: /reg/channels\n"


def test_invalid_argument_from_the_server_exits_2(monkeypatch, capsys):
    class Refused(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self):
            return "texts[0]: empty text"

    import services.client

    def refuse(*args, **kwargs):
        raise Refused()

    monkeypatch.setattr(services.client.Client, "classify", refuse)
    assert main(["classify", "--model", "m", "--address", "127.0.0.1:1", "x"]) == 2
    assert "INVALID_ARGUMENT: texts[0]: empty text" in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_quietly(reg):
    import subprocess
    import sys

    proc = subprocess.run(
        f"{sys.executable} -m services models list --registry {reg} --json | head -c 1",
        shell=True, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_a_bad_version_for_pin_or_promote_gets_no_hint_about_leaving_it_empty():
    from services.core.errors import InvalidInput
    from services.serving.admin import AdminMethods
    from services.serving.validation import check_version_field

    with pytest.raises(InvalidInput, match=r"expected v1, v2, \.\.\.$"):
        AdminMethods._required_version("latest")
    with pytest.raises(InvalidInput, match="leave it empty for the model's channel"):
        check_version_field("latest")


def test_a_missing_registry_is_named_by_every_models_command(tmp_path, capsys):
    afile = tmp_path / "train.csv"
    afile.write_text("text,label\n")
    for registry, why in ((tmp_path / "nope", "no such folder"), (afile, "a file")):
        for command in (["list"], ["verify", "a", "v1"], ["promote", "a", "v1"],
                        ["rollback", "a"], ["pin", "a", "v1"], ["unpin", "a"]):
            assert main(["models", command[0], "--registry", str(registry),
                         *command[1:]]) == 2, command
            assert f"--registry: no registry at {registry} ({why}" in \
                capsys.readouterr().err, command
