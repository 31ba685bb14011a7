"""Prepare a manual SFT run on GSM8K with a small causal LM built from a config.

    .venv/bin/python bench/gsm8k_prepare.py --out /tmp/gsm8k [--train-rows 1500]
    # then, as printed at the end:
    tuneserve train --task generation --model /tmp/gsm8k/model --train ... --eval ...

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on the GSM8K
questions and answers (../shared/data/gsm8k/train.jsonl), and the model is a GPT-2
built from a config with random weights. The loss curve such a run gives shows that
the SFT path learns (response-only loss, template, EOS); the answers of a model this
small and this briefly trained are not expected to be right.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
TEMPLATE = "Question: {prompt}\\nAnswer: "  # as typed in the shell: \n is a newline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(GSM8K))
    parser.add_argument("--out", default="/tmp/gsm8k")
    parser.add_argument("--train-rows", type=int, default=1500)
    parser.add_argument("--eval-rows", type=int, default=150)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    sys.path.insert(0, str(REPO))
    from services.core.modeling import quiet_transformers

    quiet_transformers()

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    subsets = {"train": rows[:args.train_rows],
               "eval": rows[args.train_rows:args.train_rows + args.eval_rows]}
    for name, subset in subsets.items():
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for r in subset:
                fh.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows),
                            trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                        model_max_length=args.context)
    torch.manual_seed(args.seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.context,
                        n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
                        bos_token_id=eos, eos_token_id=eos)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2, {args.layers} layers, hidden {args.hidden}, {n_params / 1e6:.1f}M "
          f"parameters, vocab {len(tokenizer)}; data: {len(subsets['train'])} train and "
          f"{len(subsets['eval'])} eval rows of {args.data}")
    print("run:\n  tuneserve train --task generation "
          f"--model {out / 'model'} --train {out / 'train.jsonl'} --eval {out / 'eval.jsonl'} "
          "--prompt-column question --response-column answer "
          f"--prompt-template '{TEMPLATE}' --name gsm8k-tiny "
          f"--registry {out / 'registry'} --runs-dir {out / 'runs'} "
          "--workers 2 --epochs 3 --batch-size 16 --learning-rate 1e-3 --max-length 384 "
          "--packing --log-every-steps 5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
