"""What `tuneserve serve` does at start with a broken model beside good ones: serves
the good ones and names the broken one, instead of refusing to start or waiting."""

from __future__ import annotations

import logging

import pytest

from services.core.errors import CorruptVersion
from services.serving.app import discover_models
from services.serving.status import model_states
from tests.unit.test_registry import registry_of


@pytest.fixture
def registry(tmp_path):
    return registry_of(tmp_path, ("good", "other"))


def test_a_model_with_an_unreadable_manifest_is_skipped_with_a_warning(registry, tmp_path,
                                                                       caplog):
    (tmp_path / "reg" / "other" / "v1" / "manifest.json").write_text("{bad")
    # production (v1) unreadable: the task comes from another version
    assert discover_models(registry) == {"good": "classification", "other": "classification"}
    (tmp_path / "reg" / "other" / "v2" / "manifest.json").write_text("[]")
    with caplog.at_level(logging.WARNING, logger="services.serving.app"):
        assert discover_models(registry) == {"good": "classification"}
    assert "not serving model other: other v1: unreadable manifest" in caplog.text
    with pytest.raises(CorruptVersion, match="unreadable manifest"):
        discover_models(registry, ["other"])  # asked for by name: an error


def test_model_states_tell_loaded_failed_and_pending_models():
    statuses = {
        "good": [{"version": "v1", "state": "ready"}, {"version": None, "state": "loading"}],
        "bad": [{"version": None, "state": "failed",
                 "last_error": "other v1: model.safetensors has the wrong size"}] * 2,
        "slow": [{"version": None, "state": "failed", "last_error": "x"},
                 {"version": None, "state": "loading"}],
        "new": [],
    }
    loaded, failed, pending = model_states(statuses)
    assert loaded == ["good"]
    assert failed == {"bad": "bad: other v1: model.safetensors has the wrong size"}
    assert set(pending) == {"slow", "new"} and pending["new"] == "new: loading"


def test_waiting_ends_when_every_model_is_loaded_or_failed(monkeypatch, caplog):
    from services.core.errors import ModelLoading
    from services.serving import app

    boards = [{"good": [], "bad": []},
              {"good": [{"version": "v1"}], "bad": [{"state": "failed", "last_error": "e"}]}]

    class Call:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    class Handle:
        class _statuses:  # noqa: N801 - the ingress method's name
            @staticmethod
            def remote():
                return Call(boards.pop(0) if len(boards) > 1 else boards[0])

    import ray.serve

    monkeypatch.setattr(ray.serve, "get_app_handle", lambda name: Handle)
    with caplog.at_level(logging.WARNING, logger="services.serving.app"):
        statuses = app.wait_until_serving(timeout_s=10, poll_s=0.01)
    assert statuses["good"] == [{"version": "v1"}]
    assert "not serving bad: e" in caplog.text
    boards[:] = [{"bad": [{"state": "failed", "last_error": "refused: sha256"}]}]
    with pytest.raises(ModelLoading, match="no model could be loaded: bad: refused: sha256"):
        app.wait_until_serving(timeout_s=10, poll_s=0.01)
    boards[:] = [{"bad": [{"state": "loading"}]}]
    with pytest.raises(ModelLoading, match="not loaded after 0s: bad: loading"):
        app.wait_until_serving(timeout_s=0.05, poll_s=0.01)



def test_health_is_serving_when_the_only_unloaded_models_have_nothing_to_load():
    from services.serving.ingress import InferenceIngress

    good = [{"version": "v1", "state": "ready"}]
    failed = [{"version": None, "state": "failed", "last_error": "refused"}]
    assert InferenceIngress._serving_now({"a": good, "b": failed})
    assert not InferenceIngress._serving_now({"a": good, "b": [{"state": "loading"}]})
    assert not InferenceIngress._serving_now({"a": good, "b": []})  # not reported yet
    assert not InferenceIngress._serving_now({"b": failed})
    assert not InferenceIngress._serving_now({})


@pytest.mark.parametrize("host, needle", [("10.255.255.1", "is not an address of this machine")])
def test_a_host_this_machine_does_not_have_is_refused_naming_it(tmp_path, host, needle):
    from services.core.config import ServeConfig
    from services.core.errors import ConfigError
    from services.serving.app import check_ports_free

    cfg = ServeConfig(registry=str(tmp_path), host=host, grpc_port=0)
    with pytest.raises(ConfigError, match=f"'host': '{host}' {needle}"):
        check_ports_free(cfg, None)
    check_ports_free(ServeConfig(registry=str(tmp_path), host="127.0.0.1", grpc_port=0), None)


def test_the_serve_line_after_training_can_be_pasted_into_a_shell():
    import shlex

    from services.cli import _train_summary

    uri = "s3://bkt/pre?endpoint_override=http://127.0.0.1:9555&scheme=http"
    text = _train_summary({"name": "m", "version": "v1", "promoted": True, "checkpoint": "c",
                           "registry": uri, "metrics": {}, "epochs": [], "wall_s": 1.0})
    line = next(x for x in text.splitlines() if x.startswith("serve it:"))
    assert shlex.split(line.split(":", 1)[1])[3] == uri


def test_a_fixed_replica_count_beside_autoscaling_is_refused(tmp_path):
    from services.core.config import ServeConfig
    from services.core.errors import ConfigError

    with pytest.raises(ConfigError, match="'num_replicas'.*set min_replicas instead"):
        ServeConfig(registry=str(tmp_path), num_replicas=3, max_replicas=2).validate()
    ServeConfig(registry=str(tmp_path), min_replicas=2, max_replicas=3).validate()
