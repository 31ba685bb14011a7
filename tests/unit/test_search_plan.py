"""The parts of --search that need no cluster: the flags' checks, the trials' settings,
how many run at once, and which evaluation of which trial is published."""

from __future__ import annotations

import math

import pytest

from services.cli import main
from services.core.config import TrainConfig
from services.core.errors import ConfigError
from services.training.search import (LR_FACTOR, MAX_WARMUP_RATIO, SearchPlan, TrialRecord,
                                      better, concurrent_trials, outcome, trial_params)


def _resolved(**kw):
    return TrainConfig(model="m", train="t.csv", **kw).resolve()


def test_search_fields_resolve_into_their_section():
    r = _resolved(search=True, search_trials=6, search_time_budget_s=90)
    assert (r.tuning.search, r.tuning.search_trials, r.tuning.search_time_budget_s) == \
        (True, 6, 90)
    assert _resolved().tuning.search is False


@pytest.mark.parametrize("kw,needle", [
    ({"search_trials": 0}, "'search_trials': must be a positive integer, got 0"),
    ({"search_time_budget_s": 0}, "'search_time_budget_s': must be > 0, got 0"),
    ({"search_time_budget_s": -5.0}, "'search_time_budget_s': must be > 0"),
])
def test_bad_search_settings_name_the_field(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        _resolved(search=True, **kw)


def test_cli_search_trials_zero_is_one_line(capsys, tmp_path):
    code = main(["train", "--model", "m", "--train", str(tmp_path / "t.csv"), "--search",
                 "--search-trials", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "'search_trials': must be a positive integer, got 0" in err
    assert "Traceback" not in err


def test_trial_params_start_with_the_runs_own_and_stay_in_range():
    optim = _resolved(learning_rate=1e-4, epochs=3, warmup_ratio=0.1).optim
    params = trial_params(optim, 12, seed=5)
    assert len(params) == 12
    assert params[0] == {"learning_rate": 1e-4, "epochs": 3, "warmup_ratio": 0.1}
    for p in params[1:]:
        assert 1e-4 / LR_FACTOR * 0.999 <= p["learning_rate"] <= 1e-4 * LR_FACTOR * 1.001
        assert p["epochs"] in (2, 3, 4)
        assert 0.0 <= p["warmup_ratio"] <= MAX_WARMUP_RATIO
    assert len({p["learning_rate"] for p in params}) == 12
    assert trial_params(optim, 12, seed=5) == params  # the seed decides them
    assert trial_params(optim, 12, seed=6) != params
    assert min(p["epochs"] for p in trial_params(_resolved(epochs=1).optim, 20, 1)) == 1


def test_concurrent_trials_fit_the_cluster():
    cluster = _resolved(workers=2, cpus_per_worker=1.5).cluster
    assert concurrent_trials(cluster, {"CPU": 8.0}, 4) == 2
    assert concurrent_trials(cluster, {"CPU": 64.0}, 4) == 4
    assert concurrent_trials(cluster, {"CPU": 2.0}, 4) == 1  # never 0: it waits
    gpu = _resolved(workers=2, use_gpu=True).cluster
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 4.0}, 8) == 2


def test_better_uses_the_metric_then_the_loss():
    a = {"eval_accuracy": 0.9, "eval_loss": 0.5}
    assert better(a, None, "eval_accuracy", "max")
    assert better(a, {"eval_accuracy": 0.8, "eval_loss": 0.1}, "eval_accuracy", "max")
    assert better(a, {"eval_accuracy": 0.9, "eval_loss": 0.6}, "eval_accuracy", "max")
    assert not better(a, {"eval_accuracy": 0.9, "eval_loss": 0.4}, "eval_accuracy", "max")
    assert better({"eval_loss": 1.0}, {"eval_loss": 2.0}, "eval_loss", "min")


def _report(tmp_path, name, acc, loss, step, keep=True):
    path = tmp_path / name
    if keep:
        path.mkdir()
    return {"epoch": 1, "step": step, "eval_accuracy": acc, "eval_loss": loss,
            "confusion_matrix": [[1, 0], [0, 1]], "checkpoint_path": str(path)}


def test_outcome_publishes_the_best_kept_checkpoint_of_any_trial(tmp_path):
    (tmp_path / "trial-0").mkdir()
    (tmp_path / "trial-0" / "finished").touch()
    records = [
        TrialRecord(0, {"learning_rate": 1e-3, "epochs": 1, "warmup_ratio": 0.0},
                    [_report(tmp_path, "a", 0.7, 0.6, 4), _report(tmp_path, "b", 0.8, 0.5, 8)],
                    status="running"),
        # The best report of trial 1 has no checkpoint left (Ray Train deleted it).
        TrialRecord(1, {"learning_rate": 3e-3, "epochs": 2, "warmup_ratio": 0.1},
                    [_report(tmp_path, "c", 0.85, 0.4, 4),
                     _report(tmp_path, "d", 0.95, 0.2, 8, keep=False)], status="running"),
        TrialRecord(2, {"learning_rate": 5e-4, "epochs": 1, "warmup_ratio": 0.0}, [],
                    status="failed", error="ValueError: boom"),
    ]
    plan = SearchPlan(loop_cfg=None, cluster=None, storage=str(tmp_path),
                      params=[r.params for r in records], concurrent=2, time_budget_s=None)
    found = outcome(records, plan, "eval_accuracy", "max")
    assert found.best_trial == 1
    assert found.checkpoint_path == str(tmp_path / "c")
    assert found.best_metrics["eval_accuracy"] == 0.85
    assert "checkpoint_path" not in found.best_metrics
    assert found.best_metrics["confusion_matrix"] == [[1, 0], [0, 1]]
    assert [e["type"] for e in found.history] == ["eval", "eval"]
    rec = found.record
    assert rec["best_trial"] == 1 and rec["best_params"] == records[1].params
    assert [t["status"] for t in rec["trials"]] == ["finished", "stopped early", "failed"]
    assert rec["trials"][0]["best"]["eval_accuracy"] == 0.8
    assert rec["trials"][2]["best"] is None and rec["trials"][2]["error"] == "ValueError: boom"
    assert rec["trials"][1]["history"] == [
        {"epoch": 1, "step": 4, "eval_accuracy": 0.85},
        {"epoch": 1, "step": 8, "eval_accuracy": 0.95}]
    assert not any(isinstance(v, list) for v in rec["trials"][0]["best"].values())
    assert math.isclose(rec["trials"][1]["best"]["eval_loss"], 0.4)


def test_outcome_without_any_checkpoint_names_a_trials_error(tmp_path):
    records = [TrialRecord(0, {}, [], status="failed", error="DataError: bad rows")]
    plan = SearchPlan(loop_cfg=None, cluster=None, storage=str(tmp_path), params=[{}],
                      concurrent=1, time_budget_s=None)
    with pytest.raises(RuntimeError, match="DataError: bad rows"):
        outcome(records, plan, "eval_accuracy", "max")


def test_resume_of_a_search_is_refused(tmp_path):
    import json

    from services.training.run import RUN_CONFIG_FILE, resume_config, run_training

    folder = tmp_path / "runs" / "s1"
    folder.mkdir(parents=True)
    (folder / RUN_CONFIG_FILE).write_text(json.dumps(
        {"config": {"model": "m", "train": "t.csv", "search": True}}))
    cfg = resume_config("s1", str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="was a --search, which cannot be resumed"):
        run_training(cfg, resume="s1", publish=False, out=lambda line: None)


def test_search_with_the_run_name_of_an_unfinished_run_is_refused(tmp_path):
    import json

    from services.training.run import RUN_CONFIG_FILE, run_training

    folder = tmp_path / "runs" / "s2"
    folder.mkdir(parents=True)
    (folder / RUN_CONFIG_FILE).write_text(json.dumps(
        {"config": {"model": "m", "train": "t.csv", "search": True}}))
    cfg = TrainConfig(model="m", train="t.csv", search=True, run_name="s2",
                      runs_dir=str(tmp_path / "runs"))
    with pytest.raises(ConfigError, match="'run_name': run 's2' exists and a --search"):
        run_training(cfg, publish=False, out=lambda line: None)


def test_a_trials_tune_actor_takes_no_cpu_from_its_workers():
    """concurrent_trials counts the workers' CPUs only: the trial's own actor must not
    reserve a slice of a CPU, or the last trial that fits would wait."""
    from ray.tune.execution.placement_groups import resource_dict_to_pg_factory

    from services.training.search import TRIAL_DRIVER_RESOURCES

    pgf = resource_dict_to_pg_factory(TRIAL_DRIVER_RESOURCES)
    assert not pgf.head_bundle_is_empty
    assert pgf.required_resources.get("CPU", 0) == 0
    assert pgf.required_resources.get("GPU", 0) == 0
