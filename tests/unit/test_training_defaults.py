"""The pieces behind sensible training defaults, early stopping and resuming, without Ray."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

from services.core.config import TrainConfig, parse_class_weights
from services.core.data import stratified_split_indices
from services.core.errors import ConfigError
from services.training.encoded import choose_max_length
from services.training.loop import EarlyStopping, load_trainer_state, save_trainer_state
from services.training.tasks import resolve_class_weights


def test_task_defaults_fill_only_what_is_unset():
    cls = TrainConfig(model="m", train="t.csv").validate()
    assert (cls.learning_rate, cls.warmup_ratio, cls.epochs) == (5e-5, 0.06, 3)
    gen = TrainConfig(model="m", train="t.jsonl", task="generation").validate()
    assert (gen.learning_rate, gen.warmup_ratio, gen.epochs) == (2e-5, 0.03, 2)
    lora = TrainConfig(model="m", train="t.jsonl", task="generation", lora_r=8).validate()
    assert lora.learning_rate == 2e-4
    mine = TrainConfig(model="m", train="t.csv", learning_rate=1e-4, epochs=1).validate()
    assert (mine.learning_rate, mine.epochs) == (1e-4, 1)


def test_every_task_name_has_its_class_and_defaults():
    from services.core.config import TASK_DEFAULTS, TASKS
    from services.training.tasks import make_task, task_for

    for name in TASKS:
        assert task_for(name).name == name and task_for(name).defaults is TASK_DEFAULTS[name]
    with pytest.raises(ConfigError, match="'task'"):
        task_for("regression")
    cfg = TrainConfig(model="m", train="t.jsonl", task="generation", lora_r=4,
                      lora_target_modules="a, b").resolve()
    task = make_task(cfg, model_ref="/abs/m")
    assert task.model_ref == "/abs/m" and task.lora["target_modules"] == ["a", "b"]


@pytest.mark.parametrize("field,value,needle", [
    ("eval_steps", 0, "eval_steps"),
    ("early_stopping_patience", -1, "early_stopping_patience"),
    ("max_failures", -2, "max_failures"),
    ("early_stopping_min_delta", -0.1, "early_stopping_min_delta"),
    ("class_weights", "spam=0", "class_weights"),
    ("class_weights", "spam", "class_weights"),
    ("max_length", 4, "max_length"),
])
def test_bad_training_fields_are_named(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(model="m", train="t.csv", **{field: value}).validate()


def test_class_weights_only_for_classification():
    with pytest.raises(ConfigError, match="class_weights"):
        TrainConfig(model="m", train="t.jsonl", task="generation",
                    class_weights="balanced").validate()


def test_max_length_from_the_data_is_the_p99_rounded_up_to_8_within_the_limit():
    lengths = list(range(1, 101))  # p99 = 99.01
    assert choose_max_length(lengths, 512) == 104
    assert choose_max_length(lengths, 64) == 64
    assert choose_max_length([3, 3, 3], 512) == 8
    assert choose_max_length([], 512) == 128


def test_balanced_class_weights_make_each_class_weigh_the_same_in_total():
    counts = [90, 10]
    weights = resolve_class_weights("balanced", ["ham", "spam"], counts)
    assert weights == pytest.approx([100 / 180, 100 / 20])
    assert weights[0] * counts[0] == pytest.approx(weights[1] * counts[1])
    assert resolve_class_weights("spam=3", ["ham", "spam"], counts) == [1.0, 3.0]
    assert resolve_class_weights(None, ["ham", "spam"], counts) is None
    with pytest.raises(ConfigError, match="'eggs' not in the training data"):
        resolve_class_weights("eggs=2", ["ham", "spam"], counts)
    assert parse_class_weights(" a=1.5 , b=2 ") == {"a": 1.5, "b": 2.0}


def test_stratified_split_keeps_every_label_share_and_is_deterministic():
    labels = ["a"] * 900 + ["b"] * 90 + ["c"] * 10
    tr, ev = stratified_split_indices(labels, 0.1, seed=3)
    assert sorted(tr + ev) == list(range(1000)) and not set(tr) & set(ev)
    counts = {lab: sum(labels[i] == lab for i in ev) for lab in "abc"}
    assert counts == {"a": 90, "b": 9, "c": 1}
    assert (tr, ev) == stratified_split_indices(labels, 0.1, seed=3)
    assert ev != stratified_split_indices(labels, 0.1, seed=4)[1]


def test_early_stopping_counts_evaluations_without_improvement():
    stop = EarlyStopping("max", patience=2, min_delta=0.01)
    assert [stop.update(v) for v in (0.80, 0.85, 0.855, 0.86, 0.87)] == \
        [False, False, False, True, False]
    assert stop.best == 0.87
    low = EarlyStopping("min", patience=1, min_delta=0.0)
    assert [low.update(v) for v in (1.0, 0.9, 0.95)] == [False, False, True]
    off = EarlyStopping("max", patience=0, min_delta=0.0)
    assert not any(off.update(0.5) for _ in range(10))


def test_trainer_state_round_trips_optimizer_moments_and_rng(tmp_path):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    save_trainer_state(str(tmp_path), opt, {"epoch": 1, "step": 3, "micro_in_epoch": 3})
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin"))
    expected_draw = torch.rand(3)

    twin = torch.nn.Linear(4, 2)
    twin.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(twin.parameters(), lr=5.0)
    torch.manual_seed(123)
    state = load_trainer_state(str(tmp_path), opt2, "cpu")
    assert (state["epoch"], state["step"], state["micro_in_epoch"]) == (1, 3, 3)
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3)
    for p, q in zip(model.parameters(), twin.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])
    # One more identical step keeps both models identical.
    x = torch.randn(8, 4)
    for m, o in ((model, opt), (twin, opt2)):
        m(x).sum().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert np.isfinite(state["optimizer"]["param_groups"][0]["lr"])


def test_checkpoints_are_written_once_into_the_run_folder_and_only_whole(tmp_path,
                                                                         monkeypatch):
    import pyarrow.fs as pafs
    import ray.train
    from ray.train import CheckpointUploadMode

    from services.training.loop import write_checkpoint

    names = iter(["checkpoint_a", "checkpoint_b"])
    storage = type("Storage", (), {"experiment_fs_path": str(tmp_path),
                                   "storage_filesystem": pafs.LocalFileSystem(),
                                   "make_default_checkpoint_dir_name": lambda self: next(names)})
    context = type("Context", (), {"get_storage": lambda self: storage()})
    monkeypatch.setattr(ray.train, "get_context", lambda: context())

    def save(folder):
        seen.append(os.listdir(tmp_path))  # while writing: only the hidden folder
        with open(os.path.join(folder, "model.safetensors"), "w") as fh:
            fh.write("weights")

    seen: list = []
    checkpoint, mode = write_checkpoint(save)
    assert mode == CheckpointUploadMode.NO_UPLOAD  # written where Ray keeps it
    assert seen == [[".checkpoint_a.partial"]]
    assert checkpoint.path == str(tmp_path / "checkpoint_a")
    assert os.listdir(tmp_path) == ["checkpoint_a"]
    assert (tmp_path / "checkpoint_a" / "model.safetensors").read_text() == "weights"

    def full_disk(folder):
        open(os.path.join(folder, "model.safetensors"), "w").write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(full_disk)
    assert os.listdir(tmp_path) == ["checkpoint_a"]  # nothing of the failed one


def test_checkpoints_for_object_storage_are_written_locally_for_ray_to_upload(
        tmp_path, monkeypatch):
    import pyarrow.fs as pafs
    import ray.train
    from ray.train import CheckpointUploadMode

    from services.training.loop import write_checkpoint

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    storage = type("Storage", (), {"experiment_fs_path": "bucket/runs/r",
                                   "storage_filesystem": pafs._MockFileSystem()})
    context = type("Context", (), {"get_storage": lambda self: storage()})
    monkeypatch.setattr(ray.train, "get_context", lambda: context())

    def save(folder):
        with open(os.path.join(folder, "model.safetensors"), "w") as fh:
            fh.write("weights")

    checkpoint, mode = write_checkpoint(save)
    assert mode == CheckpointUploadMode.SYNC  # Ray uploads it when it is reported
    assert os.path.dirname(checkpoint.path) == str(tmp_path)
    assert os.listdir(checkpoint.path) == ["model.safetensors"]

    def full_disk(folder):
        open(os.path.join(folder, "model.safetensors"), "w").write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(full_disk)
    assert os.listdir(tmp_path) == [os.path.basename(checkpoint.path)]


def test_a_run_larger_than_the_cluster_is_named_before_it_waits():
    from services.training.run import _check_resources

    said = []
    cfg = TrainConfig(model="m", train="t.csv", workers=4, batch_size=32).validate()
    with pytest.raises(ConfigError, match=r"'workers': this run needs 4 CPUs \(--workers 4 x "
                                          r"--cpus-per-worker 1\) and the Ray cluster has 2"):
        _check_resources(cfg, {"CPU": 2.0}, True, said.append)
    _check_resources(cfg, {"CPU": 2.0}, False, said.append)  # joined: a node may come
    assert said and said[0].startswith("warning: this run needs 4 CPUs")
    _check_resources(cfg, {"CPU": 4.0}, True, said.append)
    gpu = TrainConfig(model="m", train="t.csv", workers=2, use_gpu=True).validate()
    with pytest.raises(ConfigError, match="needs 2 GPUs"):
        _check_resources(gpu, {"CPU": 16.0}, True, said.append)
    assert len(said) == 1


def test_strict_spread_over_too_few_nodes_is_named_before_it_waits():
    from services.training.run import _check_resources

    said = []
    cfg = TrainConfig(model="m", train="t.csv", workers=2,
                      placement_strategy="STRICT_SPREAD").validate()
    with pytest.raises(ConfigError, match=r"'placement_strategy': .*STRICT_SPREAD puts each "
                                          r"of the 2 workers on a node of its own and the "
                                          r"Ray cluster has 1; use SPREAD"):
        _check_resources(cfg, {"CPU": 8.0}, True, said.append)
    _check_resources(cfg, {"CPU": 8.0}, False, said.append)  # joined: a node may come
    assert len(said) == 1 and said[0].startswith("warning: --placement-strategy")
    _check_resources(cfg, {"CPU": 8.0}, True, said.append, nodes=2)
    spread = TrainConfig(model="m", train="t.csv", workers=2,
                         placement_strategy="SPREAD").validate()
    _check_resources(spread, {"CPU": 8.0}, True, said.append)  # shares a node if it must
    assert len(said) == 1


def test_a_diverged_run_is_not_published(tmp_path):
    from services.core.errors import TrainingFailed
    from services.training.run import check_converged

    check_converged({"eval_loss": 0.3, "eval_accuracy": 0.9}, tmp_path)
    check_converged({"eval_accuracy": 0.9}, tmp_path)
    for loss in (float("nan"), float("inf")):
        with pytest.raises(TrainingFailed, match="diverged.*nothing was published"):
            check_converged({"eval_loss": loss, "eval_accuracy": 0.45}, tmp_path)


def test_max_length_above_the_models_limit_is_named(tiny_model_dir, tmp_path):
    from services.core.modeling import load_tokenizer
    from services.training.tasks import make_task

    data = tmp_path / "t.csv"
    data.write_text("text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = TrainConfig(model=str(tiny_model_dir), train=str(data), max_length=100_000).validate()
    with pytest.raises(ConfigError, match=r"'max_length': 100000 is more tokens than the model "
                                          r"takes \(\d+, from its config\)"):
        make_task(cfg).prepare_data(cfg, tokenizer)
    cfg = TrainConfig(model=str(tiny_model_dir), train=str(data), max_length=16).validate()
    make_task(cfg).prepare_data(cfg, tokenizer)


def test_resume_of_a_damaged_run_folder_is_one_clear_error(tmp_path):
    from services.training.run import RUN_CONFIG_FILE, resume_config

    run = tmp_path / "sst-1"
    run.mkdir()
    with pytest.raises(ConfigError, match="--resume: no run 'sst-1'"):
        resume_config("sst-1", str(tmp_path))
    for body, needle in (("{bad", "is unreadable"), ('{"run": "x"}', "holds no run config"),
                         ("[1]", "holds no run config")):
        (run / RUN_CONFIG_FILE).write_text(body)
        with pytest.raises(ConfigError, match=needle):
            resume_config("sst-1", str(tmp_path))
    (run / RUN_CONFIG_FILE).write_text('{"config": {"model": "m", "train": "t.csv"}}')
    assert resume_config("sst-1", str(tmp_path)).runs_dir == str(tmp_path)


def test_eval_file_columns_are_found_on_their_own(tiny_model_dir, tmp_path):
    """The train file says 'text', the eval file 'sentence': each is detected."""
    from services.core.errors import DataError
    from services.core.modeling import load_tokenizer
    from services.training.tasks import make_task

    train = tmp_path / "t.csv"
    train.write_text("text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
    evalf = tmp_path / "e.jsonl"
    evalf.write_text("".join(f'{{"sentence": "eval {i}", "label": {i % 2}}}\n'
                             for i in range(6)))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = TrainConfig(model=str(tiny_model_dir), train=str(train), eval=str(evalf),
                      max_length=16).validate()
    _, info = make_task(cfg).prepare_data(cfg, tokenizer)
    assert info["eval"]["rows"] == 6
    named = TrainConfig(model=str(tiny_model_dir), train=str(train), eval=str(evalf),
                        text_column="text", max_length=16).validate()
    with pytest.raises(DataError, match="e.jsonl: no text column 'text'; columns are: "
                                        "sentence, label"):
        make_task(named).prepare_data(named, tokenizer)
