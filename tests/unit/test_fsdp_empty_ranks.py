"""FSDP with an empty model on every rank but 0 (services/training/parallel.py wrap):
two gloo processes, rank 1 building its model from a folder that holds only the
config (no weights to read), end up with rank 0's weights and buffers, non-persistent
ones included, and compute what the unsharded model computes."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.timeout(300)

IDS = [[5, 17, 42, 8, 99, 3, 250, 7, 11, 64]]


class _Tokenizer:
    """What load_causal_lm_for_training asks of a tokenizer."""
    pad_token_id = 0

    def __len__(self) -> int:
        return 300


def _build(kind: str, folder: str) -> None:
    torch.manual_seed(0)
    if kind == "causal":  # tied input and output embeddings; rotary frequencies
        config = transformers.LlamaConfig(
            vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
            rope_theta=1234.0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    else:  # a BERT encoder (position ids buffer); the classifier head is made new
        config = transformers.BertConfig(vocab_size=300, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4)
        transformers.AutoModel.from_config(config).save_pretrained(folder)


def _load(kind: str, folder: str, empty: bool):
    from services.core.modeling import load_causal_lm_for_training, load_classifier_for_training

    if kind == "causal":
        return load_causal_lm_for_training(folder, _Tokenizer(), empty=empty)
    return load_classifier_for_training(folder, {0: "neg", 1: "pos", 2: "mixed"}, 0,
                                        pooling="mean", empty=empty)


def _worker(rank: int, kind: str, whole: str, config_only: str, port: int, out: str):
    import torch.distributed as dist

    from services.training.parallel import FSDP, full_state_dict, wrap

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(1)  # the classifier's new head
        model = _load(kind, whole if rank == 0 else config_only, empty=rank != 0)
        meta = all(p.is_meta for p in model.parameters())
        model.eval()
        reference = model(input_ids=torch.tensor(IDS)).logits.detach() if rank == 0 else None
        reference_state = {k: v.clone() for k, v in model.state_dict().items()} \
            if rank == 0 else None
        model = wrap(model, FSDP, torch.device("cpu"), 2, bf16=False,
                     activation_checkpointing=False, rank=rank)
        logits = model(input_ids=torch.tensor(IDS)).logits.detach()
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        gathered = full_state_dict(model)
        torch.save({"meta": meta, "logits": logits, "buffers": buffers,
                    "reference": reference, "reference_state": reference_state,
                    "gathered": gathered}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("kind", ["causal", "classifier"])
def test_ranks_built_empty_get_rank0s_weights_and_buffers(kind, tmp_path):
    import torch.multiprocessing as mp

    whole, config_only = tmp_path / "whole", tmp_path / "config-only"
    _build(kind, str(whole))
    config_only.mkdir()
    shutil.copy(whole / "config.json", config_only / "config.json")
    mp.spawn(_worker, args=(kind, str(whole), str(config_only), _free_port(), str(tmp_path)),
             nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))

    assert (r0["meta"], r1["meta"]) == (False, True)  # rank 1 read no weights
    for rank in (r0, r1):  # the sharded model computes what the whole one did
        assert torch.allclose(rank["logits"], r0["reference"], atol=1e-5)
    assert r0["buffers"] and r0["buffers"].keys() == r1["buffers"].keys()
    for name, buffer in r0["buffers"].items():
        assert torch.equal(buffer, r1["buffers"][name]), name
    gathered, before = r0["gathered"], r0["reference_state"]
    assert gathered.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(gathered[name], value), name
