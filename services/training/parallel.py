"""How the training workers hold the model: DDP (a whole copy each) or FSDP2 (sharded).

    strategy, why = choose_strategy(cfg.strategy, state_bytes, memory, world, saved)
    model = wrap(model, strategy, device, world, bf16=..., activation_checkpointing=...,
                 rank=...)

DDP goes through Ray Train's `prepare_model`. FSDP applies `fully_shard`
(torch.distributed.fsdp) to every transformer block (the model's `_no_split_modules`)
and then to the whole model, so a worker holds 1/world of the weights, gradients and
AdamW moments and gathers one block's weights at a time. Checkpoints of an FSDP run
are sharded (`save_sharded`: torch.distributed.checkpoint in safetensors files, every
rank writes its own shards of the model and optimizer, which `load_sharded` reads back
on resume) beside
one consolidated model that rank 0 writes (`full_state_dict`) as a DDP run does: the
published checkpoint is the same whatever trained it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

DDP, FSDP = "ddp", "fsdp"
SHARDED_DIR = "sharded"
"""A checkpoint's folder of torch.distributed.checkpoint shards (resuming only)."""
FIT_SHARE = 0.5
"""auto picks DDP when the model's training state takes at most this share of a
worker's memory: the rest is for activations, buffers and the allocator."""


def training_state_bytes(model) -> int:
    """Bytes a whole copy of the model takes in training with AdamW: each trainable
    weight with its gradient and two moments (4 x its size), each frozen weight once."""
    total = 0
    for p in model.parameters():
        size = p.numel() * p.element_size()
        total += 4 * size if p.requires_grad else size
    return total


def worker_memory_bytes(device, local_world: int) -> int:
    """What one worker has to hold the model in: its GPU's memory, or on a CPU its
    share of the node's RAM (the node's workers each hold their copy)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total // max(1, local_world))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def choose_strategy(requested: str, state_bytes: int, memory_bytes: int, world: int,
                    saved: Optional[str] = None) -> tuple[str, str]:
    """(ddp or fsdp, why). `saved`: the strategy of the checkpoint being resumed, which
    auto keeps (its resume state is in that layout); an explicit strategy that differs
    from it is a ConfigError naming the field. `memory_bytes`: the smallest worker's."""
    from services.core.errors import ConfigError

    if saved is not None:
        if requested not in ("auto", saved):
            raise ConfigError(f"invalid config field 'strategy': the run's checkpoint was "
                              f"written by a {saved} run; resume it with --strategy {saved} "
                              "or auto")
        if requested == "auto":
            return saved, "auto: the strategy of the checkpoint resumed"
        return saved, "--strategy"
    if requested != "auto":
        return requested, "--strategy"
    if world < 2:
        return DDP, "auto: one worker, nothing to shard"
    need = f"the model's training state is {gib(state_bytes)}"
    if state_bytes <= FIT_SHARE * memory_bytes:
        return DDP, f"auto: {need}, at most half of a worker's {gib(memory_bytes)}"
    return FSDP, f"auto: {need}, more than half of a worker's {gib(memory_bytes)}"


def shard_units(model) -> list:
    """The modules that get a fully_shard of their own: the blocks named by the Hugging
    Face model's `_no_split_modules` (its layers, and for some its embeddings), else the
    entries of its ModuleLists; the rest of the model is the root's unit. A module
    holding a weight tied to one outside it (an embedding shared with the output
    layer) stays in the root's unit, which holds both."""
    import torch

    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    found = [(prefix, m) for prefix, m in model.named_modules()
             if prefix and type(m).__name__ in names]
    if not found:
        found = [(f"{prefix}.{i}", child) for prefix, m in model.named_modules()
                 if isinstance(m, torch.nn.ModuleList) for i, child in enumerate(m)]
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    units = []
    for prefix, module in found:
        tied = any(not other.startswith(prefix + ".")
                   for p in module.parameters() for other in owners[id(p)])
        nested = any(prefix.startswith(kept + ".") for kept, _ in units)
        if not tied and not nested:
            units.append((prefix, module))
    return [module for _, module in units]


def enable_activation_checkpointing(model) -> None:
    """Hugging Face activation checkpointing, non-reentrant (it keeps the state dict's
    names, works with frozen inputs such as LoRA's, and with DDP and FSDP).
    ConfigError naming the field when the model does not support it."""
    from services.core.errors import ConfigError

    inner = getattr(model, "inner", model)  # services.core.pooling.MeanPooled
    if not getattr(inner, "supports_gradient_checkpointing", False) and \
            not getattr(getattr(inner, "base_model", None), "supports_gradient_checkpointing",
                        False):
        raise ConfigError(f"invalid config field 'activation_checkpointing': "
                          f"{type(inner).__name__} does not support gradient checkpointing")
    inner.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False})


def wrap(model, strategy: str, device, world: int, *, bf16: bool,
         activation_checkpointing: bool, rank: int = 0):
    """The model ready to train on `device`: Ray Train's DDP wrapper, or sharded with
    FSDP2 (bf16 compute and float32 gradient reduction where `bf16`).

    FSDP with several workers: rank 0's model holds the weights and every other
    rank's is empty (on the meta device, Task.build_model(empty=True)), so a node
    never holds more than one whole copy. Each rank shards its model, the empty ones
    are given memory for their shards only, and rank 0 sends every weight and buffer
    to the others, each keeping its shard."""
    import ray.train.torch
    import torch

    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if strategy == DDP:
        return ray.train.torch.prepare_model(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    whole = model.state_dict() if rank == 0 and world > 1 else {}
    # fully_shard moves each unit's weights to the mesh's device as it shards them: a
    # worker never holds more than one unit unsharded on its GPU.
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 else MixedPrecisionPolicy()
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if world > 1:
        _weights_from_rank0(model, whole, device, rank)
    return model


def _weights_from_rank0(model, whole: dict[str, Any], device, rank: int) -> None:
    """Every rank's shards of rank 0's weights (`whole`: rank 0's state dict from before
    sharding, {} elsewhere), and rank 0's buffers, non-persistent ones included (a
    rotary embedding's frequencies, BERT's position ids): an empty model gets memory
    for them here, uninitialised until this fills it. All ranks call it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if rank != 0:
        model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True,
                                                                broadcast_from_rank0=True))
    whole.clear()
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def gradient_sync(model, strategy: str, sync: bool, world: int):
    """A context in which backward syncs gradients across ranks only when `sync`: DDP's
    no_sync, FSDP's set_requires_gradient_sync (gradients then accumulate unsharded
    until the last micro-batch of the step reduce-scatters them)."""
    if world == 1:
        return contextlib.nullcontext()
    if strategy == FSDP:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else model.no_sync()


def unwrapped(model):
    """The module whose state dict a DDP wrapper holds (the model itself otherwise)."""
    return model.module if hasattr(model, "module") else model


def full_state_dict(model) -> dict[str, Any]:
    """The whole model's weights as plain CPU tensors on rank 0 ({} on the other ranks);
    every rank must call it (it gathers the shards)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def _flat_state(model, optimizer) -> tuple[dict[str, Any], dict, dict]:
    """The model's and optimizer's state dicts (get_state_dict: the optimizer's moments
    created if it has not stepped yet) and their tensors in one flat mapping, by name:
    `model.<weight>`, `optim.<weight>.<slot>`. The flat mapping holds the same tensor
    objects, so a load into it fills the state dicts."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    first: dict[int, str] = {}
    aliases = {name for name, p in model.named_parameters(remove_duplicate=False)
               if first.setdefault(id(p), name) != name}
    # A tied weight goes in once (safetensors holds no aliases); its other name shares
    # the memory, so it loads too.
    flat: dict[str, Any] = {f"model.{name}": tensor for name, tensor in model_state.items()
                            if name not in aliases}
    for name, slots in optim_state["state"].items():
        for slot, value in slots.items():
            flat[f"optim.{name}.{slot}"] = value
    return flat, model_state, optim_state


def save_sharded(folder: str, model, optimizer) -> None:
    """Every rank writes its shards of the model and the optimizer state into
    folder/SHARDED_DIR: one safetensors file per rank whose header says where each
    shard lies in its tensor (torch.distributed.checkpoint's Hugging Face storage, no
    pickle). The optimizer's hyperparameters are the run config's and its learning rate
    the schedule's, so only its tensors are saved. All ranks call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    flat, _, _ = _flat_state(model, optimizer)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(
        os.path.join(folder, SHARDED_DIR), save_distributed=True))


def load_sharded(folder: str, model, optimizer) -> None:
    """The model's and optimizer's state from folder/SHARDED_DIR into this rank's
    shards (written by save_sharded, by any number of ranks); all ranks call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    flat, model_state, optim_state = _flat_state(model, optimizer)
    dcp.load(flat, storage_reader=HuggingFaceStorageReader(os.path.join(folder, SHARDED_DIR)))
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict=optim_state)


def broadcast_text(text: Optional[str], rank: int, world: int) -> str:
    """Rank 0's `text` on every rank."""
    if world == 1:
        return text or ""
    import torch.distributed as dist

    box = [text if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(flag: bool, device, world: int) -> bool:
    """Whether `flag` holds on any rank (every rank calls it and gets the same)."""
    if world == 1:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def smallest(value: int, device, world: int) -> int:
    """The smallest of the ranks' `value`s, on every rank."""
    if world == 1:
        return value
    import torch
    import torch.distributed as dist

    packed = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MIN)
    return int(packed.item())
