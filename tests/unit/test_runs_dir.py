"""The folder of training runs (services/training/runs.py): a local folder, or a prefix
in S3-compatible object storage (a real moto S3 server on loopback), with clear errors
for a URI that cannot work."""

import pyarrow.fs as pafs
import pytest
from ray.train import Checkpoint

from services.core.config import TrainConfig
from services.core.errors import ConfigError
from services.training.run import preflight
from services.training.runs import RunsDir, checkpoint_location
from tests.unit.test_registry_s3 import BUCKET, s3_endpoint  # noqa: F401 (fixture)


@pytest.fixture
def s3_query(s3_endpoint, monkeypatch):  # noqa: F811
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return f"?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"


def test_a_local_runs_dir_is_an_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = RunsDir.of("runs")
    assert runs.local and runs.storage_path == str(tmp_path / "runs") == runs.shown()
    assert not runs.exists("r1", "tuneserve_run.json")
    runs.write_text("r1", "tuneserve_run.json", '{"run": "r1"}')
    assert runs.read_text("r1", "tuneserve_run.json") == '{"run": "r1"}'
    assert sorted(p.name for p in (tmp_path / "runs" / "r1").iterdir()) == \
        ["tuneserve_run.json"]  # written whole: no partial file left
    runs.check()


def test_a_runs_dir_in_object_storage(s3_query, tmp_path):
    runs = RunsDir.of(f"s3://{BUCKET}/unit-runs{s3_query}")
    assert not runs.local and runs.root == f"{BUCKET}/unit-runs"
    assert runs.shown("r1") == f"s3://{BUCKET}/unit-runs/r1"  # without the query
    runs.check()
    runs.write_text("r1", "tuneserve_run.json", '{"run": "r1"}')
    assert runs.exists("r1", "tuneserve_run.json")
    assert runs.read_text("r1", "tuneserve_run.json") == '{"run": "r1"}'
    (tmp_path / "staged" / "tensorboard").mkdir(parents=True)
    (tmp_path / "staged" / "tensorboard" / "events").write_text("e")
    runs.upload("r1", tmp_path / "staged")
    assert runs.read_text("r1", "tensorboard/events") == "e"
    checkpoint = Checkpoint(f"{BUCKET}/unit-runs/r1/checkpoint_1", filesystem=runs.fs)
    assert checkpoint_location(checkpoint) == f"s3://{BUCKET}/unit-runs/r1/checkpoint_1"
    assert checkpoint_location(Checkpoint(str(tmp_path))) == str(tmp_path)

    with pytest.raises(ConfigError, match=r"'runs_dir': s3://no-such-bucket/runs: no bucket"):
        RunsDir.of(f"s3://no-such-bucket/runs{s3_query}").check()


def test_a_runs_dir_uri_that_cannot_work_is_a_config_error():
    with pytest.raises(ConfigError, match="'runs_dir': .*no credentials in the URI") as err:
        RunsDir.of("s3://AKIA:Secret@bucket/runs")
    assert "Secret" not in str(err.value)
    with pytest.raises(ConfigError, match=r"'runs_dir': nosuch://bucket/runs: "):
        RunsDir.of("nosuch://bucket/runs")


def test_a_search_with_its_runs_in_object_storage_is_refused_before_it_starts(s3_query):
    cfg = TrainConfig(model="m", train="t.csv", search=True,
                      runs_dir=f"s3://{BUCKET}/runs{s3_query}").resolve()
    with pytest.raises(ConfigError, match="'runs_dir': a --search keeps its trials in a "
                                          "folder"):
        preflight(cfg, publish=False, resume=None, progress_bar=False, out=print)


def test_an_unknown_run_in_object_storage_is_named(s3_query):
    from services.training.run import resume_config

    with pytest.raises(ConfigError, match=f"--resume: no run 'gone' \\(looked for "
                                          f"s3://{BUCKET}/runs/gone/tuneserve_run.json\\)"):
        resume_config("gone", f"s3://{BUCKET}/runs{s3_query}")


def test_checkpoint_location_of_a_local_filesystem(tmp_path):
    assert checkpoint_location(Checkpoint(str(tmp_path), filesystem=pafs.LocalFileSystem())) \
        == str(tmp_path)
