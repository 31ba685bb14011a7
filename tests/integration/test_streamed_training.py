"""Streamed training data (Ray Data): the same loss as the in-memory path, a data set of
millions of rows trained for a bounded number of steps with the driver's memory flat,
and shards in object storage (moto) with their ETags in the manifest."""

from __future__ import annotations

import json
import random
import threading

import boto3
import psutil
import pytest

from services.core.config import TrainConfig
from services.core.registry import Registry
from tests.helpers import NEGATIVE, NOUNS, POSITIVE, toy_sentiment_rows, write_csv
from tests.unit.test_registry_s3 import BUCKET, s3_endpoint  # noqa: F401 (fixture)


def _final_eval(result) -> dict:
    return [e for e in result.history if e["type"] == "eval"][-1]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_streamed_runs_on_1_and_2_workers_reach_the_in_memory_loss(tmp_path, tiny_model_dir,
                                                                    toy_csv):
    from services.training.run import run_training

    evald = write_csv(tmp_path / "eval.csv", toy_sentiment_rows(60, seed=5))
    losses = {}
    for mode, workers in (("off", 2), ("on", 2), ("on", 1)):
        cfg = TrainConfig(model=str(tiny_model_dir), train=str(toy_csv), eval=str(evald),
                          name=f"same-{mode}-{workers}", registry=str(tmp_path / "registry"),
                          runs_dir=str(tmp_path / "runs"), workers=workers, epochs=6,
                          batch_size=16, learning_rate=3e-3, warmup_ratio=0.0,
                          small_data="off", log_every_steps=100, seed=1,
                          data_streaming=mode)
        result = run_training(cfg, progress_bar=False, out=lambda _: None)
        final = _final_eval(result)
        assert final["eval_examples"] == 60
        losses[(mode, workers)] = final["eval_loss"]
        data = Registry(cfg.registry).manifest(cfg.name, "v1")["data"]
        assert data["streaming"]["on"] is (mode == "on")
        assert data["train"]["rows"] == 200
    # Every run learned (chance is 0.69) and they end at the same loss: the batches
    # differ (a stream's order is not the in-memory permutation, and which of two
    # workers reads which block is not fixed), the model does not. A run has ended at
    # 0.0503, and 0.033 from the in-memory run.
    assert max(losses.values()) < 0.1, losses
    assert losses[("on", 2)] == pytest.approx(losses[("off", 2)], abs=0.05), losses
    assert losses[("on", 1)] == pytest.approx(losses[("on", 2)], abs=0.05), losses


ROWS = 2_000_000
RSS_GROWTH_BOUND = 160 * 2**20
"""The driver's memory may grow by this much while it streams ROWS rows (~80 MiB of
JSON Lines, each row told apart by a number: the in-memory path would hold them several
times over as Python strings and token lists)."""


class _PeakRss:
    """The driver process's resident memory, sampled every 20 ms: its highest value."""

    def __init__(self):
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_millions_of_rows_train_bounded_with_the_driver_memory_flat(tmp_path, tiny_model_dir):
    from services.training.run import run_training

    choice = random.Random(0).choice
    path = tmp_path / "big.jsonl"
    with path.open("w") as fh:
        fh.writelines(f'{{"text": "{choice(POSITIVE if i % 2 else NEGATIVE)} '
                      f'{choice(NOUNS)} {i}", "label": {i % 2}}}\n' for i in range(ROWS))
    cfg = TrainConfig(model=str(tiny_model_dir), train=str(path), name="big",
                      registry=str(tmp_path / "registry"), runs_dir=str(tmp_path / "runs"),
                      workers=1, batch_size=32, learning_rate=2e-3, max_steps=6,
                      eval_fraction=0.001, log_every_steps=2, seed=3)
    lines: list[str] = []
    with _PeakRss() as rss:
        result = run_training(cfg, progress_bar=False, out=lines.append)
    growth = rss.peak - rss.base
    assert growth < RSS_GROWTH_BOUND, f"driver RSS grew {growth / 2**20:.0f} MiB"
    assert any("data: streamed through Ray Data" in line and "at least 64 MiB" in line
               for line in lines), lines
    manifest = Registry(cfg.registry).manifest("big", "v1")
    data = manifest["data"]
    assert data["train"]["rows"] == ROWS
    split = data["split"]
    assert split["train_rows"] + split["eval_rows"] == ROWS
    assert 0.0007 * ROWS < split["eval_rows"] < 0.0013 * ROWS
    assert _final_eval(result)["eval_examples"] == split["eval_rows"]
    assert manifest["bounds"] == {"max_steps": 6, "steps": 6, "ended_by_max_steps": True}


@pytest.mark.usefixtures("ray_cluster")
def test_shards_in_object_storage_stream_and_their_etags_are_recorded(
        s3_endpoint, monkeypatch, tmp_path, tiny_model_dir):  # noqa: F811
    from services.training.run import run_training

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    rows = toy_sentiment_rows(120, seed=2)
    keys = ["shards/part-0.jsonl", "shards/part-1.jsonl"]
    for k, key in enumerate(keys):
        body = "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows[k::2])
        client.put_object(Bucket=BUCKET, Key=key, Body=body.encode())
    query = f"?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    cfg = TrainConfig(model=str(tiny_model_dir), train=f"s3://{BUCKET}/shards/{query}",
                      name="shards", registry=str(tmp_path / "registry"),
                      runs_dir=str(tmp_path / "runs"), workers=1, epochs=1, batch_size=16,
                      learning_rate=2e-3, eval_fraction=0.2, log_every_steps=100, seed=1)
    run_training(cfg, progress_bar=False, out=lambda _: None)
    data = Registry(cfg.registry).manifest("shards", "v1")["data"]
    assert data["streaming"]["on"] is True
    train = data["train"]
    assert train["path"] == f"s3://{BUCKET}/shards/"
    assert [f["path"] for f in train["files"]] == [f"s3://{BUCKET}/{k}" for k in keys]
    assert [f["etag"] for f in train["files"]] == [
        client.head_object(Bucket=BUCKET, Key=k)["ETag"].strip('"') for k in keys]
    assert train["rows"] == 120 and len(train["sha256"]) == 64
    assert data["split"]["train_rows"] + data["split"]["eval_rows"] == 120
