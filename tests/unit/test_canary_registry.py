"""Canary state and rollout history in the registry, and `tuneserve models canary` /
`tuneserve models history` on it."""

from __future__ import annotations

import json
import threading

import pytest

from services.cli import main
from services.core.errors import InvalidInput, ModelNotFound, RegistryError
from services.core.registry import Registry
from tests.unit.test_registry import registry_of


@pytest.fixture
def reg(tmp_path) -> Registry:
    """Model "a" with v1 (production), v2 and v3."""
    return registry_of(tmp_path, ("a",), versions=3)


def test_canary_lifecycle_is_shared_by_every_reader(reg):
    state = reg.start_canary("a", "v2", 10, reason="new data")
    assert (state["version"], state["percent"], state["production"]) == ("v2", 10.0, "v1")
    other = Registry(reg.uri)  # another replica, another node
    assert other.canary("a")["version"] == "v2" and other.canary("a")["percent"] == 10.0
    reg.set_canary_share("a", 25, reason="step 2", step=1, errors=0.0)
    assert (other.canary("a")["percent"], other.canary("a")["step"]) == (25.0, 1)
    done = reg.promote_canary("a", reason="all steps passed")
    assert (done["version"], done["previous"]) == ("v2", "v1")
    assert other.channel("a") == "v2" and other.canary("a") is None
    assert other.canary_state("a")["ended"] == {"version": "v2", "how": "promote"}
    # production moved with its history, so a rollback goes back to v1
    assert reg.rollback("a") == "v1"
    actions = [(e["action"], e.get("version"), e.get("percent")) for e in reg.history("a")]
    assert actions == [("promote", "v1", None), ("canary-start", "v2", 10.0),
                       ("canary-share", "v2", 25.0), ("canary-promote", "v2", 25.0),
                       ("rollback", "v1", None)]
    share = reg.history("a")[2]
    assert (share["previous_percent"], share["errors"], share["reason"]) == (10.0, 0.0,
                                                                             "step 2")
    assert all(e["time"] for e in reg.history("a"))


def test_abort_sends_everything_to_production(reg):
    reg.start_canary("a", "v3", 50)
    state = reg.abort_canary("a", reason="p99 3x production")
    assert state["version"] == "v3" and reg.canary("a") is None and reg.channel("a") == "v1"
    last = reg.history("a")[-1]
    assert (last["action"], last["version"], last["reason"]) == ("canary-abort", "v3",
                                                                 "p99 3x production")
    with pytest.raises(RegistryError, match="no canary running"):
        reg.abort_canary("a")
    reg.start_canary("a", "v2", 5)  # a new canary may start once the last one ended
    assert reg.canary("a")["version"] == "v2"


@pytest.mark.parametrize("version, percent, error, match", [
    ("v1", 10, RegistryError, "production already"),
    ("v9", 10, ModelNotFound, "no version 'v9'"),
    ("v2", 101, InvalidInput, "from 0 to 100"),
    ("v2", -1, InvalidInput, "from 0 to 100"),
    ("v2", float("nan"), InvalidInput, "from 0 to 100"),
    ("v2", "ten", InvalidInput, "from 0 to 100"),
    ("../x", 10, InvalidInput, "invalid version"),
])
def test_bad_canaries_are_refused(reg, version, percent, error, match):
    with pytest.raises(error, match=match):
        reg.start_canary("a", version, percent)
    assert reg.canary("a") is None and not (reg.backend.local_root / "a" / "canary.json").exists()


def test_one_canary_at_a_time_and_never_under_a_pin(reg):
    reg.start_canary("a", "v2", 10)
    with pytest.raises(RegistryError, match="canary running .v2 at 10 %"):
        reg.start_canary("a", "v3", 10)
    reg.abort_canary("a")
    reg.pin("a", "v1")
    with pytest.raises(RegistryError, match="pinned to v1.*unpin a"):
        reg.start_canary("a", "v2", 10)


def test_a_hand_edited_canary_file_means_no_canary(reg):
    path = reg.backend.local_root / "a" / "canary.json"
    for text in ('{"version": "v2", "percent": 400}', '{"version": "../v2", "percent": 5}',
                 '{"version": "v2"}', "[1, 2]"):
        path.write_text(text)
        assert reg.canary("a") is None, text
    path.write_text("{oops")
    with pytest.raises(RegistryError, match="unreadable a canary pointer"):
        reg.canary("a")


def test_history_skips_broken_lines_and_concurrent_appends_all_land(reg):
    path = reg.backend.local_root / "a" / "history.jsonl"
    with open(path, "a") as fh:
        fh.write("not json\n[1]\n")
    threads = [threading.Thread(target=reg.record, args=("a", "note"), kwargs={"n": i})
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    notes = [e["n"] for e in reg.history("a") if e["action"] == "note"]
    assert sorted(notes) == list(range(20))


def test_cli_canary_start_share_promote_and_history(reg, capsys):
    root = reg.uri
    assert main(["models", "canary", "--registry", root, "a", "v2", "--percent", "10",
                 "--reason", "fresh data"]) == 0
    assert capsys.readouterr().out.startswith("a canary: v2 at 10 % beside production v1")
    assert main(["models", "canary", "--registry", root, "a", "--percent", "25"]) == 0
    assert capsys.readouterr().out == "a canary: v2 at 10 % -> 25 %\n"
    # naming the candidate again with --percent changes its share too
    assert main(["models", "canary", "--registry", root, "a", "v2", "--percent", "50"]) == 0
    assert capsys.readouterr().out == "a canary: v2 at 25 % -> 50 %\n"
    assert main(["models", "canary", "--registry", root, "a"]) == 0
    assert "v2 at 50 % beside production v1" in capsys.readouterr().out
    assert main(["models", "list", "--registry", root]) == 0
    listed = {line.split()[1]: line.split()[3] for line in
              capsys.readouterr().out.splitlines()[2:]}
    assert listed == {"v1": "production", "v2": "canary", "v3": "-"}
    assert main(["models", "canary", "--registry", root, "a", "--promote"]) == 0
    assert capsys.readouterr().out == "a production: v1 -> v2 (canary promoted)\n"
    assert main(["models", "canary", "--registry", root, "a"]) == 0
    assert capsys.readouterr().out == "a: no canary running\n"
    assert main(["models", "history", "--registry", root, "a"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out[2:]] == [
        "promote", "canary-start", "canary-share", "canary-share", "canary-promote"]
    assert "fresh data" in out[3] and "percent=10" in out[3]
    assert main(["models", "history", "--registry", root, "--json", "a"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[-1]["action"] == "canary-promote" and rows[-1]["previous"] == "v1"


@pytest.mark.parametrize("argv, message", [
    (["a", "v2"], "--percent: required to start a canary of a v2"),
    (["a", "v2", "--percent", "150"], "--percent: expected a number from 0 to 100"),
    (["a", "--percent", "x"], "--percent: expected a number from 0 to 100"),
    (["a", "--abort"], "a has no canary running"),
    (["a", "v9", "--percent", "5"], "no version 'v9'"),
    (["nosuch", "--percent", "5"], "model 'nosuch' not found"),
])
def test_cli_canary_errors_name_the_flag(reg, capsys, argv, message):
    code = main(["models", "canary", "--registry", reg.uri, *argv])
    err = capsys.readouterr().err
    assert code in (1, 2) and message in err and "Traceback" not in err


def test_cli_promote_of_another_version_than_the_candidate_is_refused(reg, capsys):
    reg.start_canary("a", "v2", 10)
    assert main(["models", "canary", "--registry", reg.uri, "a", "v3", "--promote"]) == 2
    assert "the candidate of a is v2, not v3" in capsys.readouterr().err
    assert reg.channel("a") == "v1" and reg.canary("a")["version"] == "v2"


def test_cli_history_of_a_missing_model(reg, capsys):
    assert main(["models", "history", "--registry", reg.uri, "nosuch"]) == 1
    assert "model 'nosuch' not found" in capsys.readouterr().err



@pytest.mark.parametrize("argv, message", [
    (["--address", "127.0.0.1:1", "a"], "--address: give --percent, --promote or --abort"),
    (["--token-file", "t", "a", "--abort"], "--token-file: only with --address"),
    (["--tls", "a", "--abort"], "--tls: only with --address"),
])
def test_cli_canary_admin_flags_are_checked_before_any_call(reg, capsys, argv, message):
    assert main(["models", "canary", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert reg.canary("a") is None
