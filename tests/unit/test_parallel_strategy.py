"""--strategy and --activation-checkpointing: the auto rule, the refusals naming the
field, the flags of `tuneserve train` and `tuneserve k8s train`, and the worker-side
pieces that need no process group (shard units, lockstep eval batches).

FSDP itself runs on 2 Ray Train workers in tests/integration/test_fsdp_training.py."""

from __future__ import annotations

import pytest
import yaml

from services.core.config import TrainConfig
from services.core.errors import ConfigError
from services.training.parallel import (DDP, FSDP, choose_strategy,
                                        enable_activation_checkpointing, shard_units,
                                        training_state_bytes)

GIB = 2**30


def test_auto_picks_ddp_while_the_training_state_fits_half_a_worker():
    assert choose_strategy("auto", 4 * GIB, 8 * GIB, 2)[0] == DDP
    strategy, why = choose_strategy("auto", 4 * GIB + 1, 8 * GIB, 2)
    assert strategy == FSDP and "more than half of a worker's 8.00 GiB" in why
    # One worker has nobody to shard with; an explicit choice is kept.
    assert choose_strategy("auto", 100 * GIB, 8 * GIB, 1) == (DDP, "auto: one worker, "
                                                               "nothing to shard")
    assert choose_strategy("fsdp", 1, 8 * GIB, 2) == (FSDP, "--strategy")
    assert choose_strategy("ddp", 100 * GIB, 8 * GIB, 2) == (DDP, "--strategy")


def test_a_resumed_run_keeps_the_strategy_of_its_checkpoint():
    # auto keeps what wrote the checkpoint even where the rule would now pick another
    assert choose_strategy("auto", 1, 8 * GIB, 2, saved=FSDP)[0] == FSDP
    assert choose_strategy("fsdp", 1, 8 * GIB, 2, saved=FSDP)[0] == FSDP
    with pytest.raises(ConfigError, match="'strategy'.*written by a ddp run.*--strategy ddp"):
        choose_strategy("fsdp", 1, 8 * GIB, 2, saved=DDP)


def test_training_state_counts_gradients_and_moments_of_trainable_weights_only():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(10, 10, bias=False),
                                torch.nn.Linear(10, 10, bias=False))
    model[0].weight.requires_grad_(False)
    # frozen: 100 floats once; trainable: 100 floats x (weight, gradient, 2 moments)
    assert training_state_bytes(model) == 100 * 4 + 100 * 4 * 4


def test_bad_strategies_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="'strategy': must be one of auto, ddp, fsdp"):
        TrainConfig(model="m", train="t.csv", strategy="zero3").resolve()
    with pytest.raises(ConfigError, match="'strategy': fsdp shards .* --workers 2"):
        TrainConfig(model="m", train="t.csv", strategy="fsdp").resolve()
    cfg = TrainConfig(model="m", train="t.csv", strategy="fsdp", workers=2,
                      activation_checkpointing=True).resolve()
    assert (cfg.cluster.strategy, cfg.cluster.activation_checkpointing) == ("fsdp", True)
    assert TrainConfig(model="m", train="t.csv").resolve().strategy == "auto"


def test_train_and_k8s_train_take_the_flags(monkeypatch, capsys):
    from services.cli import main
    from services.core.errors import DataError
    from services.training import run

    seen = {}

    def fake_run_training(cfg, **kw):
        seen["cfg"] = cfg.resolve()
        raise DataError("stop here")

    monkeypatch.setattr(run, "run_training", fake_run_training)
    assert main(["train", "--model", "m", "--train", "t.csv", "--workers", "2",
                 "--strategy", "fsdp", "--activation-checkpointing"]) == 2
    assert "stop here" in capsys.readouterr().err
    assert (seen["cfg"].strategy, seen["cfg"].activation_checkpointing) == ("fsdp", True)
    assert main(["train", "--model", "m", "--train", "t.csv", "--strategy", "fsdp"]) == 2
    assert "invalid config field 'strategy'" in capsys.readouterr().err

    assert main(["k8s", "train", "--model", "bert", "--train", "/data/t.csv", "--workers", "2",
                     "--strategy", "fsdp", "--activation-checkpointing", "--dry-run"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    sent = yaml.safe_load(docs[0]["data"]["run.yaml"])
    assert (sent["strategy"], sent["activation_checkpointing"]) == ("fsdp", True)
    assert main(["k8s", "train", "--model", "bert", "--train", "/data/t.csv",
                     "--strategy", "fsdp", "--dry-run"]) == 2
    assert "invalid config field 'strategy'" in capsys.readouterr().err


def test_shard_units_are_the_transformer_blocks(tiny_model_dir, tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    assert [type(m).__name__ for m in shard_units(bert)] == ["BertEmbeddings", "BertLayer",
                                                             "BertLayer"]
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    assert [type(m).__name__ for m in shard_units(gpt2)] == ["GPT2Block", "GPT2Block"]
    # An embedding tied to the output layer stays with it in the root's unit.
    gpt2._no_split_modules = ["GPT2Block", "Embedding"]
    assert [type(m).__name__ for m in shard_units(gpt2)] == ["Embedding", "GPT2Block",
                                                             "GPT2Block"]
    assert gpt2.transformer.wte not in shard_units(gpt2)


def test_activation_checkpointing_needs_a_model_that_supports_it(tiny_model_dir):
    import torch
    from transformers import AutoModelForSequenceClassification

    from services.core.pooling import apply_pooling

    model = apply_pooling(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir),
                          "mean")
    enable_activation_checkpointing(model)  # through the mean-pooling wrapper
    assert model.inner.is_activation_checkpointing
    with pytest.raises(ConfigError, match="'activation_checkpointing': Linear does not"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_every_rank_runs_as_many_eval_batches():
    from services.training.encoded import EncodedSplit
    from services.training.tasks import eval_chunks

    split = EncodedSplit.from_lists([[1] * n for n in (3, 5, 2, 7, 4)], [0] * 5)
    ranks = [eval_chunks(split, rank, 2, 2) for rank in range(2)]
    assert [len(chunks) for chunks in ranks] == [2, 2]  # 3 examples and 2, batches of 2
    counted = sorted(i for chunks in ranks for chunk, real in chunks if real for i in chunk)
    assert counted == [0, 1, 2, 3, 4]
    assert ranks[1][-1] == ([0], False)  # rank 1's extra batch is not counted
