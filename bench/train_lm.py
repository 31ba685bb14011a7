"""Causal-LM training throughput and MFU: Ray Train (tuneserve's generation task) vs a
plain single-process PyTorch loop, on a Llama-style model built from a config.

    .venv/bin/python bench/train_lm.py --preset 0.5b --use-gpu [--steps 30] [--batch-size 16]
        [--seq-len 1024] [--workers 1] [--peak-tflops 989] [--json out.json]
    .venv/bin/python bench/train_lm.py --preset tiny --steps 8 --seq-len 128   # CPU check

Nothing is downloaded: the model is a LlamaConfig preset with random weights (speed does
not depend on the weights), the tokenizer a byte-level BPE trained here on synthetic
text, and the data synthetic prompt/response pairs, packed into sequences of --seq-len
tokens (`--packing`), so every step sees batch-size x seq-len tokens on both sides.
Both sides train the same model in fp32 master weights with bf16 autocast on a GPU
(fp32 on the CPU), AdamW, the same global batch and number of optimizer steps.

Reported: tokens/s in the steady state (after the first steps), the ratio to the plain
loop, and MFU = model FLOPs per second / peak dense bf16 FLOPs of the GPU(s), with
model FLOPs per token = 6 x (parameters outside the input embedding) + 12 x layers x
hidden x seq-len (attention scores and values, forward and backward; PaLM's
accounting, without halving for the causal mask).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, table, timed_ray_training, write_json  # noqa: E402
from services.core.config import GENERATION, TrainConfig  # noqa: E402
from services.core.data import load_pairs  # noqa: E402
from services.core.modeling import (load_causal_lm_for_training,  # noqa: E402
                                    load_tokenizer, quiet_transformers)
from services.core.raycluster import ensure_ray  # noqa: E402
from services.training.encoded import encode_pairs  # noqa: E402
from services.training.loop import param_groups  # noqa: E402
from services.training.tasks import lm_batch, token_nll  # noqa: E402

WARMUP_STEPS = 3
# Llama-style shapes. 0.5b: 24 x 1280 (about 0.56B parameters with a 32k vocabulary);
# 1b: TinyLlama-1.1B's shape (grouped-query attention, 4 KV heads).
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=1024),
    "0.5b": dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=24,
                 num_attention_heads=20, num_key_value_heads=20, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}
# Dense bf16 peak of one GPU, TFLOP/s (vendor figures, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L4": 121.0}


def flops_per_token(params: int, embedding_params: int, layers: int, hidden: int,
                    seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight that multiplies (the input embedding is a
    lookup) plus attention's 12 x layers x hidden x seq_len."""
    return 6.0 * (params - embedding_params) + 12.0 * layers * hidden * seq_len


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return None


def build(folder: Path, preset: str, seq_len: int, seed: int) -> dict:
    """Tokenizer and random-init Llama model saved in folder; returns its shape."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    quiet_transformers()
    shape = dict(PRESETS[preset])
    words = synthetic_words(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(shape["vocab_size"], 4096),
                                  special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(seed)
    tok.train_from_iterator((" ".join(rng.choices(words, k=64)) for _ in range(2000)), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", model_max_length=seq_len)
    eos = tokenizer.eos_token_id
    # The model's vocabulary is the preset's (its embedding and output layer cost what
    # a real model's do); the tokenizer uses the first few thousand ids.
    config = LlamaConfig(**shape, max_position_embeddings=max(seq_len, 128),
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"params": params, "embedding_params": embedding,
            "layers": shape["num_hidden_layers"], "hidden": shape["hidden_size"], **shape}


def synthetic_words(seed: int, n: int = 3000) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(n)]


def write_pairs(path: Path, n: int, words_per_side: int, seed: int) -> Path:
    rng = random.Random(seed)
    words = synthetic_words(seed)
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": " ".join(rng.choices(words, k=words_per_side)),
                                 "response": " " + " ".join(rng.choices(words, k=words_per_side))})
                     + "\n")
    return path


def pairs_needed(tokenizer_dir: Path, sample: Path, sequences: int, seq_len: int) -> int:
    """How many pairs like those in sample pack into at least `sequences` sequences."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [json.loads(line) for line in sample.read_text().splitlines()[:200]]
    per_pair = sum(len(tok(r["prompt"])["input_ids"]) + len(tok(r["response"])["input_ids"]) + 1
                   for r in rows) / len(rows)
    return int(math.ceil(sequences * seq_len / per_pair * 1.15)) + 16


def plain_loop(folder: Path, train_file: Path, args, device: str) -> dict:
    """The baseline: one process, no Ray; the same packed sequences and optimizer."""
    import torch

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(str(folder))
    pairs = load_pairs(train_file)
    split, _ = encode_pairs(tokenizer, pairs.prompts, pairs.responses, None, args.seq_len,
                            packing=True)
    model = load_causal_lm_for_training(str(folder), tokenizer).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=args.lr,
                            fused=device == "cuda")
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    first_step_s = steady_start = None
    tokens = 0
    for step in range(args.steps):
        if step == WARMUP_STEPS:
            if device == "cuda":
                torch.cuda.synchronize()
            steady_start, tokens = time.perf_counter(), 0
        rows = [(step * args.batch_size + k) % len(split) for k in range(args.batch_size)]
        batch = lm_batch([(split.example(i), split.mask(i)) for i in rows], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
        nll, n = token_nll(logits, batch["labels"])
        (nll / max(1, n)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        if first_step_s is None:
            first_step_s = time.perf_counter() - started
    if device == "cuda":
        torch.cuda.synchronize()
    steady = time.perf_counter() - steady_start
    return {"tokens_per_s": tokens / steady, "first_step_s": first_step_s,
            "wall_s": time.perf_counter() - started, "sequences": len(split)}


def ray_train(folder: Path, train_file: Path, eval_file: Path, workers: int, args,
              work: Path) -> dict:
    cfg = TrainConfig(model=str(folder), train=str(train_file), eval=str(eval_file),
                      task=GENERATION, packing=True, max_length=args.seq_len,
                      name=f"bench-lm-{workers}w", registry=str(work / "registry"),
                      runs_dir=str(work / "runs"), workers=workers,
                      cpus_per_worker=max(1, args.cores // workers), use_gpu=args.use_gpu,
                      epochs=1, batch_size=args.batch_size, learning_rate=args.lr,
                      warmup_ratio=0.0, log_every_steps=1, seed=args.seed)
    return timed_ray_training(cfg, "tokens_per_s", WARMUP_STEPS, max_steps=args.steps)


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="0.5b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--workers", default="1", help="Ray Train worker counts, e.g. 1,2")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of one GPU (default: from its name)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than {WARMUP_STEPS} (the warm-up steps)")
    return parser, args


def write_data(work: Path, folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Train and eval pairs: enough to pack steps x batch-size sequences."""
    sample = write_pairs(work / "sample.jsonl", 200, args.seq_len // 6, args.seed)
    n_pairs = pairs_needed(folder, sample, args.steps * args.batch_size, args.seq_len)
    train_file = write_pairs(work / "train.jsonl", n_pairs, args.seq_len // 6, args.seed)
    eval_file = write_pairs(work / "eval.jsonl", 8, args.seq_len // 6, args.seed + 1)
    return train_file, eval_file


def report(results: dict, fpt: float, peak: float | None, device: str) -> None:
    """The table, with each run's MFU added to its result."""
    base = results.get("plain", {}).get("tokens_per_s")
    rows = []
    for name, r in results.items():
        gpus = 1 if name == "plain" else int(name.split("-")[1].rstrip("w"))
        r["mfu"] = (r["tokens_per_s"] * fpt / (peak * 1e12 * gpus)) if peak and device == "cuda" \
            else None
        rows.append([name, f"{r['tokens_per_s']:.0f}",
                     f"{r['tokens_per_s'] / base:.2f}x" if base else "-",
                     f"{r['tokens_per_s'] * fpt / 1e12:.1f}",
                     f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-",
                     f"{r['first_step_s']:.1f}", f"{r['wall_s']:.1f}"])
    print(table(rows, ["run", "tokens/s", "vs plain", "TFLOP/s", "MFU", "first step s",
                       "wall s"]))


def main() -> int:
    parser, args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    device = "cuda" if args.use_gpu and torch.cuda.is_available() else "cpu"
    if args.use_gpu and device != "cuda":
        parser.error("--use-gpu: torch sees no CUDA device")
    gpu_name = torch.cuda.get_device_name(0) if device == "cuda" else ""
    peak = args.peak_tflops or (peak_tflops(gpu_name) if gpu_name else None)
    work = Path(tempfile.mkdtemp(prefix="tuneserve-bench-lm-"))
    folder = work / "model"
    shape = build(folder, args.preset, args.seq_len, args.seed)
    train_file, eval_file = write_data(work, folder, args)
    fpt = flops_per_token(shape["params"], shape["embedding_params"], shape["layers"],
                          shape["hidden"], args.seq_len)
    print(f"model: Llama-style '{args.preset}' {shape['params'] / 1e6:.1f}M parameters "
          f"({shape['layers']} layers x {shape['hidden']}, vocab {shape['vocab_size']}), "
          f"random init; {args.steps} steps of {args.batch_size} x {args.seq_len} tokens; "
          f"{device}{' ' + gpu_name if gpu_name else ''}; {fpt / 1e9:.2f} GFLOP/token",
          flush=True)
    results = {}
    if not args.no_plain:
        results["plain"] = plain_loop(folder, train_file, args, device)
        print(f"  plain: {results['plain']['tokens_per_s']:.0f} tokens/s", flush=True)
    t0 = time.perf_counter()
    ensure_ray(None)
    ray_start_s = time.perf_counter() - t0
    for w in (int(x) for x in args.workers.split(",")):
        results[f"ray-{w}w"] = ray_train(folder, train_file, eval_file, w, args, work)
        print(f"  ray-{w}w: {results[f'ray-{w}w']['tokens_per_s']:.0f} tokens/s", flush=True)
    report(results, fpt, peak, device)
    print(f"ray start: {ray_start_s:.1f} s; peak used for MFU: "
          f"{f'{peak:g} TFLOP/s per GPU' if peak and device == 'cuda' else 'none (no GPU)'}")
    write_json(args.json, {"machine": {**machine(), "gpu": gpu_name}, "args": vars(args),
                           "shape": shape, "flops_per_token": fpt, "peak_tflops": peak,
                           "results": results, "ray_start_s": ray_start_s})
    return 0 if all(math.isfinite(r["tokens_per_s"]) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
