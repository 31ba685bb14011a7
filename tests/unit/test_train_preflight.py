"""What `tuneserve train` refuses before Ray starts (each would otherwise fail inside a
worker, or at publish, after the whole run), and how a worker's error is reported."""

from __future__ import annotations

import json
import shutil

import pytest

from services.core.config import TrainConfig
from services.core.errors import ConfigError, DataError
from services.core.registry import Registry
from services.training.run import (FINISHED_FILE, RUN_CONFIG_FILE, _check_lora_targets,
                                   _root_cause, run_training)
from tests.helpers import toy_generation_pairs, write_csv, write_jsonl
from tests.unit.test_registry import fake_checkpoint, manifest

UNREACHABLE = "127.0.0.1:1"  # a run that got past the checks fails fast here


@pytest.fixture
def gen_jsonl(tmp_path):
    return write_jsonl(tmp_path / "gen.jsonl", [{"prompt": p, "response": r}
                                                for p, r in toy_generation_pairs()])


def _train(**kw):
    return run_training(TrainConfig(address=UNREACHABLE, **kw), progress_bar=False,
                        out=lambda line: None)


def test_lora_targets_the_model_lacks_are_refused_naming_its_layers(
        tmp_path, tiny_gpt2_dir, gen_jsonl):
    pytest.importorskip("peft")
    with pytest.raises(ConfigError, match="'lora_target_modules'.*c_attn") as err:
        _train(task="generation", model=str(tiny_gpt2_dir), train=str(gen_jsonl),
               name="g", lora_r=4, lora_target_modules=["q_proj", "v_proj"],
               registry=str(tmp_path / "reg"), runs_dir=str(tmp_path / "runs"))
    assert "q_proj" in err.value.message
    # the model's own layer names (or peft's default for the model) pass the check
    _check_lora_targets(str(tiny_gpt2_dir), ["c_attn"])
    _check_lora_targets(str(tiny_gpt2_dir), None)


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path, tiny_model_dir,
                                                           toy_rows):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    csv = write_csv(tmp_path / "t.csv", toy_rows[:40])
    with pytest.raises(DataError, match="no tokenizer files"):
        _train(model=str(bare), train=str(csv), name="t", registry=str(tmp_path / "reg"),
               runs_dir=str(tmp_path / "runs"))


def test_a_name_holding_the_other_task_is_refused_before_training(tmp_path, tiny_gpt2_dir,
                                                                  gen_jsonl):
    Registry(tmp_path / "reg").publish("taken", fake_checkpoint(tmp_path / "ck"), manifest())
    with pytest.raises(ConfigError, match="'name'.*classification model"):
        _train(task="generation", model=str(tiny_gpt2_dir), train=str(gen_jsonl),
               name="taken", registry=str(tmp_path / "reg"), runs_dir=str(tmp_path / "runs"))


def test_a_finished_run_is_not_resumed(tmp_path, tiny_model_dir, toy_rows):
    run = tmp_path / "runs" / "done-1"
    run.mkdir(parents=True)
    csv = write_csv(tmp_path / "t.csv", toy_rows[:40])
    cfg = TrainConfig(model=str(tiny_model_dir), train=str(csv), name="done",
                      runs_dir=str(tmp_path / "runs"), address=UNREACHABLE)
    (run / RUN_CONFIG_FILE).write_text(json.dumps({"config": cfg.to_dict()}))
    (run / FINISHED_FILE).write_text(json.dumps({"name": "done", "version": "v3"}))
    with pytest.raises(ConfigError, match="already finished and was published as done v3"):
        run_training(cfg, progress_bar=False, out=lambda line: None, resume="done-1")


def test_a_workers_input_error_is_shown_alone_and_not_as_resumable():
    class WorkerGroupError(Exception):
        pass

    wrapped = WorkerGroupError("services.core.errors.ConfigError: invalid config field 'x': bad")
    assert _root_cause(wrapped) == ("invalid config field 'x': bad", True)
    assert _root_cause(RuntimeError("boom\nlast line")) == ("RuntimeError: last line", False)


def test_any_saved_tokenizer_counts(tmp_path):
    from services.training.run import has_tokenizer_files

    for files in (["spm.model"], ["tokenizer_config.json"], ["vocab.json", "merges.txt"],
                  ["sentencepiece.bpe.model"], ["tokenizer.json"]):
        folder = tmp_path / files[0]
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        for name in files:
            (folder / name).write_text("x")
        assert has_tokenizer_files(folder), files
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    (bare / "model.safetensors").write_text("x")
    assert not has_tokenizer_files(bare)
