"""`tuneserve train ... --rollout canary` (issue 30, point 6): the run's config carries
the rollout and its policy (through `tuneserve k8s train` too), a bad field is one line
naming it before anything starts, a version that passes the run's gates goes out as a
canary instead of being promoted, and the command rolls it out as `tuneserve models
rollout` does, its exit status saying how it ended.

The rollout runs against the simulated serving layer and real HTTP metrics endpoint of
test_rollout.py; tests/integration/test_rollout_serving.py runs one through Ray Serve.
"""

from __future__ import annotations

import json

import pytest
import yaml

import services.training.run
from services.cli import main
from services.cli.train import ROLLED_BACK
from services.core.analysis import RolloutPolicy
from services.core.config import TrainConfig, rollout_policy
from services.core.registry import Registry
from services.training.run import TrainResult
from tests.unit.test_fair_gate import _production, _publish_run, models  # noqa: F401
from tests.unit.test_flag_validation import nothing_starts, run_cli  # noqa: F401 (fixture)
from tests.unit.test_k8s_client import dry_run_objects
from tests.unit.test_registry import fake_checkpoint, manifest
from tests.unit.test_rollout import Serving, _metrics_endpoint

URL = "http://127.0.0.1:8080/metrics"


@pytest.mark.parametrize("flags, needle", [
    (["--rollout", "blue"], "'rollout': must be one of canary (or left out for no "
                            "rollout), got 'blue'"),
    (["--rollout", "canary"], "'rollout_metrics_url': required with --rollout canary"),
    (["--rollout", "canary", "--rollout-metrics-url", "localhost:8080"],
     "'rollout_metrics_url': expected http://HOST:PORT/metrics, got 'localhost:8080'"),
    (["--rollout-steps", "5,50"], "'rollout_steps': is a setting of --rollout canary"),
    (["--rollout", "canary", "--rollout-metrics-url", URL, "--rollout-steps", "50,5"],
     "'rollout_steps': expected rising shares between 0 and 100"),
    (["--rollout", "canary", "--rollout-metrics-url", URL, "--rollout-steps", "5,x"],
     "'rollout_steps': expected shares in percent like 5,25,50, got '5,x'"),
    (["--rollout", "canary", "--rollout-metrics-url", URL, "--rollout-min-requests", "0"],
     "'rollout_min_requests': expected at least 1"),
    (["--rollout", "canary", "--rollout-metrics-url", URL, "--rollout-poll-s", "0"],
     "'rollout_poll_s': expected a number > 0"),
    (["--rollout", "canary", "--rollout-metrics-url", URL, "--rollout-p99-factor", "0"],
     "'rollout_p99_factor': expected a number > 0"),
])
@pytest.mark.parametrize("command", [["train"], ["k8s", "train", "--dry-run"]])
def test_bad_rollout_settings_name_the_field_before_anything_starts(
        capsys, nothing_starts, command, flags, needle):  # noqa: F811
    code, err = run_cli(capsys, *command, "--model", "m", "--train", "/data/t.csv", *flags)
    assert code == 2, err
    assert err.startswith("error: ") and needle in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag", ["--no-publish", "--promote-anyway"])
def test_a_rollout_needs_a_publish_that_leaves_production_alone(
        capsys, nothing_starts, flag):  # noqa: F811
    code, err = run_cli(capsys, "train", "--model", "m", "--train", "/data/t.csv",
                        "--rollout", "canary", "--rollout-metrics-url", URL, flag)
    assert code == 2
    assert err == (f"error: invalid config field 'rollout': --rollout canary rolls out "
                   f"what is published, and {flag} does not let it: drop one\n")


def test_the_run_config_carries_the_rollout_and_its_policy(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ntrain: /data/t.csv\nrollout: canary\n"
                    "rollout_metrics_url: [http://a:8080/metrics, http://b:8080/metrics]\n"
                    "rollout_steps: 10,50\nrollout_min_step_s: 30\nrollout_p99_factor: 3\n")
    cfg = TrainConfig.from_yaml(path).resolve()
    assert cfg.rollout == "canary"
    assert cfg.rollout_metrics_url == ["http://a:8080/metrics", "http://b:8080/metrics"]
    assert rollout_policy(cfg) == RolloutPolicy(steps=(10, 50), min_step_s=30, p99_factor=3)
    # unset fields: the policy `tuneserve models rollout` defaults to
    assert rollout_policy(TrainConfig(model="m", train="t.csv").resolve()) == RolloutPolicy()
    # the RayJob's run config holds it as written, flags overriding it
    cm, job = dry_run_objects(capsys, "--config", str(path), "--rollout-min-requests", "40",
                              "--rollout-p99-slack-s", "0.5")
    sent = yaml.safe_load(cm["data"]["run.yaml"])
    assert {k: v for k, v in sent.items() if k.startswith("rollout")} == {
        "rollout": "canary",
        "rollout_metrics_url": ["http://a:8080/metrics", "http://b:8080/metrics"],
        "rollout_steps": "10,50", "rollout_min_step_s": 30, "rollout_min_requests": 40,
        "rollout_p99_factor": 3, "rollout_p99_slack_s": 0.5}
    assert job["spec"]["entrypoint"] == "python -m services train --config /config/run.yaml"
    # and reads back as the same policy in the pod
    assert rollout_policy(TrainConfig.from_dict(sent).resolve()) == RolloutPolicy(
        steps=(10, 50), min_step_s=30, min_requests=40, p99_factor=3, p99_slack_s=0.5)


def test_a_version_that_passes_the_gate_goes_out_as_a_canary_not_to_production(
        tmp_path, models):
    registry = _production(tmp_path, models["partial"], 0.99)
    res = _publish_run(tmp_path, registry, models["full"], 1.0, [[16, 0], [0, 16]],
                       rollout="canary", rollout_metrics_url=[URL])
    assert (res.version, res.promoted, res.canary_ready) == ("v2", False, True)
    assert registry.channel("sent") == "v1"
    assert res.promotion == ("gate passed (accuracy 1.0000 vs production v1's 0.8750 on "
                             "this run's 32 eval rows): rolling it out as a canary")
    assert registry.canary("sent") is None  # the command starts it (tests below)


def test_a_version_that_fails_the_gate_does_not_go_out(tmp_path, models):
    registry = _production(tmp_path, models["full"], 0.85)
    res = _publish_run(tmp_path, registry, models["partial"], 0.875, [[16, 0], [4, 12]],
                       rollout="canary", rollout_metrics_url=[URL])
    assert (res.version, res.promoted, res.canary_ready) == ("v2", False, False)
    assert res.promotion.startswith("not promoted: accuracy 0.8750 is worse")
    assert registry.channel("sent") == "v1"


def test_a_first_version_becomes_production_without_a_canary(tmp_path, models):
    registry = Registry(tmp_path / "registry")
    res = _publish_run(tmp_path, registry, models["full"], 1.0, [[16, 0], [0, 16]],
                       rollout="canary", rollout_metrics_url=[URL])
    assert (res.version, res.promoted, res.canary_ready) == ("v1", True, False)
    assert registry.canary("sent") is None


# ---- the whole command, training stood in for ------------------------------------------
@pytest.fixture
def published(tmp_path, monkeypatch):
    """A registry with toy v1 in production, and `train` whose run publishes v2 beside
    it (ready for the canary) as run_training does."""
    registry = Registry(tmp_path / "reg")
    ck = fake_checkpoint(tmp_path / "ck")
    registry.publish("toy", ck, manifest())

    def run_training(cfg, **kwargs):
        cfg = cfg.resolve()
        version = registry.publish("toy", ck, manifest()).version
        return TrainResult(name="toy", version=version, promoted=False,
                           metrics={"accuracy": 0.9}, run_dir=str(tmp_path / "runs" / "r"),
                           registry=registry.uri, checkpoint_dir=str(ck),
                           canary_ready=cfg.rollout == "canary")

    monkeypatch.setattr(services.training.run, "run_training", run_training)
    return registry


def _train(registry: Registry, url: str, *flags: str) -> list[str]:
    return ["train", "--model", "m", "--train", "t.csv", "--name", "toy", "--registry",
            registry.uri, "--rollout", "canary", "--rollout-metrics-url", url,
            "--rollout-steps", "10,50", "--rollout-min-requests", "30",
            "--rollout-min-step-s", "0", "--rollout-poll-s", "0.01", *flags]


def test_train_rolls_a_good_version_out_to_production(published, capsys):
    server = _metrics_endpoint(Serving(published, "toy"))
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        code = main(_train(published, url))
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "published toy v2 -> " in out and "rolling out toy v2 as a canary" in out
    assert "step 1 of 2: v2 at 10 %" in out and "step 2 of 2: v2 at 50 %" in out
    assert out.rstrip().endswith("promoted: v2 passed every step (10 % -> 50 % -> 100 %) "
                                 "against v1")
    assert published.channel("toy") == "v2" and published.canary("toy") is None
    assert [e["action"] for e in published.history("toy")] == [
        "promote", "canary-start", "canary-share", "canary-promote"]


def test_train_rolls_a_failing_version_back_and_says_so(published, capsys):
    server = _metrics_endpoint(Serving(published, "toy", fail_every=10))
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        code = main(_train(published, url, "--json"))
    finally:
        server.shutdown()
    assert code == ROLLED_BACK
    summary = json.loads(capsys.readouterr().out)
    assert (summary["version"], summary["promoted"]) == ("v2", False)
    assert summary["rollout"]["promoted"] is False
    assert summary["rollout"]["reason"].startswith(
        "rolled back at 10 % (step 1): error check: v2 failed")
    assert [s["state"] for s in summary["rollout"]["steps"]] == ["fail"]
    assert published.channel("toy") == "v1" and published.canary("toy") is None
    assert published.history("toy")[-1]["action"] == "canary-abort"


def test_unreadable_metrics_leave_production_and_say_how_to_retry(published, capsys):
    from tests.helpers import free_port

    url = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens there
    code = main(_train(published, url))
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: toy v2 is published but its rollout stopped: "
                          f"--metrics-url {url}: cannot read it"), err
    assert (f"Roll it out again with `tuneserve models rollout --registry {published.uri} "
            f"toy v2 --metrics-url {url}`") in err
    assert published.channel("toy") == "v1" and published.canary("toy") is None
    assert [e["action"] for e in published.history("toy")] == ["promote"]
