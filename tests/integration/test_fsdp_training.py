"""Sharded training (FSDP2 `fully_shard`) on 2 CPU workers with the gloo backend.

- a classifier trained with --strategy fsdp reaches the loss of the session's DDP run
  (`trained`: same data, seed and schedule), writes sharded checkpoints during the run
  and publishes one consolidated checkpoint that loads and classifies as a DDP one;
- a LoRA causal LM with activation checkpointing, sharded, resumes from its last
  sharded checkpoint after a worker is killed mid-epoch, and publishes the adapter
  merged into a plain model that loads and generates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.core.config import TrainConfig
from services.core.registry import Registry
from services.training.parallel import SHARDED_DIR
from tests.helpers import (GEN_TEMPLATE, eval_events, toy_generation_pairs,
                           train_with_fault, write_jsonl)

pytestmark = pytest.mark.slow


def _sharded_checkpoints(run_dir: str) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if (p / SHARDED_DIR).is_dir())


def test_fsdp_trains_to_the_loss_of_ddp_and_publishes_one_servable_checkpoint(
        trained, tmp_path):
    from services.runtime.classifier import load_classifier, predict

    ddp_cfg, ddp = trained
    cfg = TrainConfig(**{**ddp_cfg.to_dict(), "strategy": "fsdp", "name": "toy-fsdp",
                         "registry": str(tmp_path / "registry"),
                         "runs_dir": str(tmp_path / "runs")})
    result, lines = train_with_fault(cfg)

    assert "strategy: fsdp (--strategy)" in lines, "\n".join(lines)
    fsdp_evals, ddp_evals = eval_events(result), eval_events(ddp)
    assert [e["step"] for e in fsdp_evals] == [e["step"] for e in ddp_evals]
    # The same optimisation, sharded: every epoch's eval loss matches DDP's closely
    # (float sums in another order), and so does every train-loss report.
    for f, d in zip(fsdp_evals, ddp_evals):
        assert f["eval_loss"] == pytest.approx(d["eval_loss"], rel=0.02, abs=1e-3)
        assert f["eval_accuracy"] == d["eval_accuracy"]
    steps = [(e["step"], e["loss"]) for e in result.history if e["type"] == "step"]
    ddp_steps = [(e["step"], e["loss"]) for e in ddp.history if e["type"] == "step"]
    assert [s for s, _ in steps] == [s for s, _ in ddp_steps]
    assert [loss for _, loss in steps] == pytest.approx([loss for _, loss in ddp_steps],
                                                        rel=0.02, abs=1e-3)
    assert result.metrics["loss"] == pytest.approx(ddp.metrics["loss"], rel=0.02, abs=1e-3)

    # Checkpoints during the run hold both ranks' shards (model and optimizer), as
    # safetensors like the rest of the run state.
    sharded = _sharded_checkpoints(result.run_dir)
    assert sharded, f"no sharded checkpoint in {result.run_dir}"
    shards = sorted(p.name for p in (sharded[-1] / SHARDED_DIR).iterdir())
    assert len(shards) == 2 and all(n.endswith(".safetensors") for n in shards), shards

    # The published version is one consolidated checkpoint with the files of a DDP one.
    registry = Registry(cfg.registry)
    published = {p.name for p in Path(result.checkpoint_dir).iterdir()}
    assert published == {p.name for p in Path(ddp.checkpoint_dir).iterdir()}
    assert SHARDED_DIR not in published
    manifest = registry.manifest("toy-fsdp", result.version)
    assert manifest["strategy"]["value"] == "fsdp"
    assert manifest["config"]["strategy"] == "fsdp"
    loaded = load_classifier(registry, "toy-fsdp", result.version)  # verified, smoke-tested
    reference = load_classifier(Registry(ddp_cfg.registry), "toy", ddp.version)
    texts = ["a great movie with lovely acting", "a dull film with awful acting"]
    probs, expected = predict(loaded, texts), predict(reference, texts)
    assert [loaded.labels[int(i)] for i in probs.argmax(axis=1)] == ["positive", "negative"]
    assert probs == pytest.approx(expected, abs=0.02)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft on transformers 5
def test_fsdp_lora_with_activation_checkpointing_resumes_after_a_worker_is_killed(
        ray_cluster, tmp_path, tiny_gpt2_dir):
    pytest.importorskip("peft")
    from services.runtime.generation import SamplingParams
    from services.runtime.generator import load_generator

    rows = [{"prompt": p, "response": r} for p, r in toy_generation_pairs()]
    train = write_jsonl(tmp_path / "pairs.jsonl", rows)
    evald = write_jsonl(tmp_path / "pairs-eval.jsonl", rows[::3])
    # 36 pairs, 8 a step: 5 steps an epoch, checkpoints every 3 steps; the last
    # worker dies at step 4, after the checkpoint of step 3.
    cfg = TrainConfig(model=str(tiny_gpt2_dir), train=str(train), eval=str(evald),
                      task="generation", prompt_template=GEN_TEMPLATE, name="gen-fsdp",
                      registry=str(tmp_path / "registry"), runs_dir=str(tmp_path / "runs"),
                      workers=2, strategy="fsdp", lora_r=4, lora_alpha=8.0,
                      lora_dropout=0.0, activation_checkpointing=True, epochs=2,
                      batch_size=8, eval_steps=3, learning_rate=1e-2, max_length=32,
                      log_every_steps=1, seed=3, max_failures=1)
    result, lines = train_with_fault(cfg, fault="step=4,action=kill")

    killed = list((Path(result.run_dir) / ".faults").glob("fault-at-*"))
    assert [p.read_text() for p in killed] == ["1"], "the worker was not killed"
    assert "resumed from the checkpoint at epoch 1, step 3" in lines, "\n".join(lines)
    evals = eval_events(result)
    assert [e["step"] for e in evals if e["step"] > 3] == [5, 6, 9, 10]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]

    published = Path(result.checkpoint_dir)
    names = {p.name for p in published.iterdir()}
    assert "model.safetensors" in names
    assert not {SHARDED_DIR, "adapter.safetensors", "trainer_state.safetensors"} & names
    from safetensors import safe_open

    with safe_open(str(published / "model.safetensors"), "pt") as fh:
        assert not [k for k in fh.keys() if "lora" in k]  # merged into a plain model
    assert json.loads((published / "tuneserve.json").read_text())["lora"]["r"] == 4
    loaded = load_generator(Registry(cfg.registry), "gen-fsdp", result.version)
    job = loaded.engine.job("red cat", SamplingParams(max_new_tokens=4, ignore_eos=True))
    loaded.engine.run([job])
    assert job.completion_tokens == 4
