"""Generation benchmark: tokens/s and time to first token through gRPC vs Hugging Face
`generate` in-process, on the same checkpoint and the same prompts, in one run.

    .venv/bin/python bench/generate.py [--quick] [--model-dir DIR | --size tiny|gpt2-small]
        [--new-tokens 64] [--batching continuous|static] [--stagger-ms 40] [--json out.json]

The checkpoint is a causal LM folder (e.g. the GSM8K run of bench/gsm8k_prepare.py,
found at /tmp/gsm8k/registry by default) or, with --size or without one, a GPT-2
built from a config (random weights: the timing is the same; SIZES). It is published to a temporary registry and
served by `start_serving` (Ray Serve, gRPC proxy, one Generator replica with
--replica-cpus CPUs), and loaded in this process for HF with as many torch threads.
Every request generates exactly --new-tokens tokens (ignore_eos; HF: min_new_tokens),
greedy, so both sides do the same work:

- 1 stream: one GenerateStream call vs one HF generate call.
- 8 streams: 8 concurrent GenerateStream calls vs one HF generate over the 8 prompts
  (a left-padded batch: what HF offers for 8 prompts at once).
- 8 unary Generate: the same through 8 concurrent unary calls ("TTFT" is then the
  whole call).
- 8 streams, batching off (max_batch_size 1): what batching buys.
- 8 staggered streams, served with continuous and with static batching (a table of
  its own): request i starts i x --stagger-ms after the first and asks for 1/4, 2/4,
  3/4 or all of --new-tokens, so requests arrive while others decode and end at
  different times, as in real traffic. Continuous batching lets each join at the
  next token; a static batch makes it wait for the running batch to end.

`--quick` (`make bench-quick`) runs the first three phases only (no redeploy), once
each, with 32 new tokens, in `tuneserve serve`'s default layout (`--colocate
--replica-grpc`); flags given win.

`--batching` sets ServeConfig.generation_batching for the other phases (default
continuous).

`--colocate` runs the Generator inside the ingress replica (no Ray call between them),
`--replica-grpc` lets that replica answer gRPC itself (no proxy hop), `--no-access-log`
turns Serve's per-request log line off: the layouts of bench/serve.py.

Time to first token is when the first token arrives (gRPC: first chunk at the client,
mean over the streams, each on a channel connected before the clock starts; HF: the
first decoding step's end, seen by a stopping-criteria hook); tokens/s counts all
generated tokens over the wall time of the phase (gRPC: to the last call's last
chunk, before the clients close their channels); requests/batch is how many requests
shared one generate call on the server (continuous batching: how many joined the
running batch at once); latency is a request's whole time. Each figure is the median
of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (  # noqa: E402
    add_layout_args,
    machine,
    parse_quick,
    table,
    write_json,
)
from services.client import Client  # noqa: E402
from services.core.config import GENERATION, ServeConfig, render_prompt  # noqa: E402
from services.core.modeling import (  # noqa: E402
    GENERATION_FILE,
    load_causal_lm_for_serving,
    quiet_transformers,
)
from services.core.net import free_port  # noqa: E402
from services.core.raycluster import ensure_ray  # noqa: E402
from services.core.registry import Registry  # noqa: E402
from services.serving.app import (  # noqa: E402
    APP_NAME,
    INGRESS_DEPLOYMENT,
    build_app,
    model_deployment_name,
    start_serving,
    wait_until_serving,
)

DEFAULT_GSM8K = Path("/tmp/gsm8k/registry/gsm8k-tiny")
PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
    "clips in May. How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
    "babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. How much more does she need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages "
    "does he write a year?",
    "Mark has a garden with flowers. He planted plants of three colors in it.",
    "Albert is wondering how much pizza he can eat in one day.",
    "Ken created a care package to send to his brother.",
    "Alexis is applying for a new job and bought a new set of business clothes.",
]


def find_checkpoint(model_dir: str | None, work: Path,
                    size: str | None = None) -> tuple[Path, str | None]:
    """(checkpoint folder, prompt template): --model-dir, else --size, else the GSM8K
    run if there is one, else the tiny GPT-2."""
    if model_dir:
        folder = Path(model_dir)
    elif size is None and DEFAULT_GSM8K.is_dir() and sorted(DEFAULT_GSM8K.glob("v*")):
        folder = sorted(DEFAULT_GSM8K.glob("v*"))[-1]
    else:
        folder = build_random_gpt2(work / "gpt2", size or "tiny")
    template = None
    task_file = folder / GENERATION_FILE
    if task_file.is_file():
        template = json.loads(task_file.read_text()).get("prompt_template")
    return folder, template


SIZES = {"tiny": {"n_embd": 192, "n_layer": 4, "n_head": 4, "vocab_size": None},
         "gpt2-small": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257}}
"""--size: GPT-2 shapes built from a config. tiny (2M parameters) times the serving
path's own costs, which a decoding step of ~2 ms hides nowhere; gpt2-small is GPT-2's
smallest real shape (124M parameters, its 50,257-token output layer), whose steps
take what a real model's do."""


def build_random_gpt2(folder: Path, size: str = "tiny") -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(PROMPTS * 10, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    shape = dict(SIZES[size])
    vocab = shape.pop("vocab_size") or len(tokenizer)
    model = AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=vocab, n_positions=512, **shape, bos_token_id=eos, eos_token_id=eos))
    # Random weights pick byte tokens as often as words, and a lone byte >= 0x80 is no
    # text: a stream of them would hold every chunk back. Their logits are set to 0, so
    # the model writes whole characters (the timing does not change); so are those of
    # the ids past the tokenizer's own (a larger output layer costs what it costs, but
    # is never chosen: some real token's random logit is above 0).
    partial = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    partial += range(len(tokenizer), vocab)
    with torch.no_grad():
        model.get_output_embeddings().weight[partial] = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def publish(folder: Path, template: str | None, registry: Path) -> None:
    Registry(registry).publish("bench-gen", folder, {
        "task": GENERATION, "base_model": str(folder), "labels": [],
        "prompt_template": template, "metrics": {}})


# ---- HF generate in-process --------------------------------------------------------
def hf_run(model, tokenizer, template, prompts, new_tokens) -> dict:
    """One generate over the prompts (left-padded); first-token time and wall time."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class FirstToken(StoppingCriteria):
        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores, **kw):
            if self.at is None:
                self.at = time.perf_counter()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    tokenizer.padding_side = "left"
    enc = tokenizer([render_prompt(template, p) for p in prompts], return_tensors="pt",
                    padding=True)
    first = FirstToken()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, stopping_criteria=StoppingCriteriaList([first]),
                             pad_token_id=tokenizer.pad_token_id)
    wall = time.perf_counter() - started
    generated = (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)
    return {"ttft_s": first.at - started, "wall_s": wall, "tokens": generated}


# ---- gRPC --------------------------------------------------------------------------
def grpc_run(address: str, prompts, new_tokens, unary: bool = False,
             delays=None) -> dict:
    """Concurrent GenerateStream (or Generate) calls, one per prompt. For unary calls
    the "first token" time is the whole call's. `new_tokens`: one count for all, or
    one per prompt; `delays`: seconds after the start each call begins (default all
    at once); a call's TTFT and latency count from its own start."""
    import grpc

    counts = new_tokens if isinstance(new_tokens, (list, tuple)) else [new_tokens] * len(prompts)
    delays = delays or [0.0] * len(prompts)
    ttfts, tokens, latencies, errors, ends = [], [], [], [], []
    barrier = threading.Barrier(len(prompts) + 1)

    def one(prompt, new_tokens, delay):
        with Client(address, timeout_s=600, max_attempts=1) as c:  # failures counted
            # connected before the clock starts: a client keeps its channel, and TTFT
            # is not meant to include a TCP and HTTP/2 handshake
            grpc.channel_ready_future(c.channel).result(timeout=60)
            barrier.wait()
            time.sleep(delay)
            t0 = time.perf_counter()
            first, last = None, None
            try:
                if unary:
                    chunks = [c.generate("bench-gen", prompt, max_new_tokens=new_tokens,
                                         ignore_eos=True)]
                else:
                    chunks = c.generate_stream("bench-gen", prompt, max_new_tokens=new_tokens,
                                               ignore_eos=True)
                for chunk in chunks:
                    # the first chunk carrying a token: a chunk goes out when text
                    # becomes final, or at the end, so a stream whose tokens never
                    # form text still has a first chunk (its last)
                    if first is None and (chunk.completion_tokens or chunk.text):
                        first = time.perf_counter() - t0
                    last = chunk
            except Exception as exc:  # reported, not hidden
                errors.append(repr(exc))
                return
            ends.append(time.perf_counter())  # before the channel closes
            ttfts.append(first)
            tokens.append(last.completion_tokens)
            latencies.append(ends[-1] - t0)

    threads = [threading.Thread(target=one, args=args)
               for args in zip(prompts, counts, delays)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    # to the last call's last chunk: closing a channel (~80 ms here) is no generation
    wall = max(ends, default=started) - started
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed: {errors[:3]}")
    return {"ttft_s": statistics.mean(ttfts), "ttft_max_s": max(ttfts), "wall_s": wall,
            "tokens": sum(tokens), "latency_s": statistics.mean(latencies)}


def generator_counters(colocate: bool) -> dict:
    from ray import serve

    if colocate:  # the model lives in the (one) ingress replica
        handle = serve.get_deployment_handle(INGRESS_DEPLOYMENT, APP_NAME)
        return handle.model_status.remote("bench-gen").result(timeout_s=30)
    handle = serve.get_deployment_handle(model_deployment_name("bench-gen"), APP_NAME)
    return handle.status.remote().result(timeout_s=30)


def with_batches(fn, colocate: bool):
    """Also report how many requests shared a generate call, on average."""
    def run():
        before = generator_counters(colocate)
        result = fn()
        after = generator_counters(colocate)
        batches = after["batches"] - before["batches"]
        result["requests_per_batch"] = (after["requests"] - before["requests"]) / max(1, batches)
        return result
    return run


def median_run(fn, repeats: int) -> dict:
    runs = [fn() for _ in range(repeats)]
    runs.sort(key=lambda r: r["wall_s"])
    best = dict(runs[len(runs) // 2])
    best["tokens_per_s"] = best["tokens"] / best["wall_s"]
    return best


QUICK = {"repeats": 1, "new_tokens": 32, "colocate": True, "replica_grpc": True}
"""--quick: the settings it changes, unless given on the command line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a regression guard (make bench-quick): 1 stream, N streams "
                             "and N unary calls only, once each, 32 new tokens, in tuneserve "
                             "serve's default layout (--colocate --replica-grpc)")
    parser.add_argument("--model-dir", default=None, help="causal LM folder (default: the "
                        "GSM8K run in /tmp/gsm8k, else a random GPT-2 from a config)")
    parser.add_argument("--size", choices=tuple(SIZES), default=None,
                        help="serve a GPT-2 of this shape built from a config (random "
                             "weights) instead of the GSM8K run: tiny (2M parameters, "
                             "the default without /tmp/gsm8k) or gpt2-small (124M)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs")
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--batch-wait-s", type=float, default=None,
                        help="generation_batch_wait_timeout_s (default: ServeConfig's)")
    parser.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                        help="ServeConfig.generation_batching for all but the staggered "
                             "phase, which runs both")
    parser.add_argument("--stagger-ms", type=float, default=40.0,
                        help="the staggered phase: milliseconds between request starts")
    add_layout_args(parser)
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, --quick applied."""
    parser = build_parser()
    return parse_quick(parser, argv, QUICK)


def serve_config(args, registry: Path, port: int) -> ServeConfig:
    cfg = ServeConfig(registry=str(registry), grpc_port=port, host="127.0.0.1",
                      replica_cpus=args.replica_cpus, max_ongoing_requests=args.streams,
                      colocate=args.colocate, replica_grpc=args.replica_grpc,
                      access_log=args.access_log, dtype=args.dtype,
                      generation_batching=args.batching)
    if args.batch_wait_s is not None:
        cfg.generation_batch_wait_timeout_s = args.batch_wait_s
    return cfg


def redeploy(cfg: ServeConfig, address: str, prompts: list[str]) -> None:
    """Serve the app again with `cfg` and warm it up."""
    from ray import serve

    serve.run(build_app(cfg), name=APP_NAME, blocking=False)
    wait_until_serving(120)
    grpc_run(address, prompts[:2], 8)


def run_phases(args, cfg: ServeConfig, address: str, hf, prompts: list[str]) -> dict:
    """Every phase but the staggered one: label -> {"hf": ..., "grpc": ...}. `hf`:
    (model, tokenizer, template)."""
    hf_run(*hf, prompts[:1], 8)  # warm up both sides (first calls allocate, load kernels)
    grpc_run(address, prompts[:2], 8)
    many = f"{args.streams} streams"

    def measure(batch, unary=False):
        return {"hf": median_run(lambda: hf_run(*hf, batch, args.new_tokens), args.repeats),
                "grpc": median_run(with_batches(lambda: grpc_run(
                    address, batch, args.new_tokens, unary=unary), args.colocate),
                    args.repeats)}

    results = {"1 stream": measure(prompts[:1]), many: measure(prompts)}
    results[f"{args.streams} unary Generate"] = measure(prompts, unary=True)
    if args.quick:
        return results
    # The same streams with batching off: one request per generate call.
    redeploy(ServeConfig(**{**cfg.__dict__, "max_batch_size": 1}), address, prompts)
    results[f"{many}, batching off"] = {
        "hf": results[many]["hf"],
        "grpc": median_run(with_batches(lambda: grpc_run(address, prompts, args.new_tokens),
                                        args.colocate), args.repeats)}
    return results


def staggered_lengths(args, prompts: list[str]) -> tuple[list[int], list[int], list[float]]:
    """The staggered phase's (lengths in turn, new tokens per request, start delays)."""
    lengths = [max(1, args.new_tokens * k // 4) for k in (4, 1, 3, 2)]
    counts = [lengths[i % 4] for i in range(len(prompts))]
    delays = [i * args.stagger_ms / 1000 for i in range(len(prompts))]
    return lengths, counts, delays


def run_staggered(args, cfg: ServeConfig, address: str, prompts: list[str]) -> dict:
    """Staggered arrivals and lengths, served both ways: mode -> figures (none with
    --quick)."""
    _, counts, delays = staggered_lengths(args, prompts)
    staggered = {}
    if args.quick:
        return staggered
    for mode in ("continuous", "static"):
        redeploy(ServeConfig(**{**cfg.__dict__, "generation_batching": mode}), address,
                 prompts)
        staggered[mode] = median_run(with_batches(lambda: grpc_run(
            address, prompts, counts, delays=delays), args.colocate), args.repeats)
    return staggered


def print_report(args, folder: Path, n_params: int, threads: int, prompts: list[str],
                 results: dict, staggered: dict) -> dict:
    """Print both tables; the machine's description."""
    import torch

    rows = []
    for label, r in results.items():
        hf, g = r["hf"], r["grpc"]
        rows.append([label, f"{hf['tokens_per_s']:.0f}", f"{g['tokens_per_s']:.0f}",
                     f"{g['tokens_per_s'] / hf['tokens_per_s']:.2f}",
                     f"{hf['ttft_s'] * 1000:.1f}", f"{g['ttft_s'] * 1000:.1f}",
                     f"{g['ttft_s'] / hf['ttft_s']:.1f}", f"{g['requests_per_batch']:.1f}"])
    info = machine()
    layout = ", ".join(name for name, on in (("colocated", args.colocate),
                                             ("replica gRPC", args.replica_grpc),
                                             ("no access log", not args.access_log)) if on)
    print(f"\ncheckpoint: {folder} ({n_params / 1e6:.1f}M parameters); {args.new_tokens} new "
          f"tokens per request, greedy; torch threads {threads} on both sides; "
          f"{info['cpus']} CPUs, {'CUDA' if torch.cuda.is_available() else 'no GPU'}; "
          f"layout: {layout or 'default (Serve proxy, model deployment)'}")
    print(table(rows, ["", "HF tok/s", "gRPC tok/s", "ratio", "HF TTFT ms", "gRPC TTFT ms",
                       "ratio", "requests/batch"]))
    if not staggered:
        print(f"(load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())})")
        return info
    cont, stat = staggered["continuous"], staggered["static"]
    lengths, _, _ = staggered_lengths(args, prompts)
    print(f"\n{len(prompts)} staggered streams: one every {args.stagger_ms:.0f} ms, "
          f"{'/'.join(map(str, lengths))} new tokens in turn; ratio = continuous / static")
    print(table([[mode, f"{r['tokens_per_s']:.0f}", f"{r['ttft_s'] * 1000:.1f}",
                  f"{r['ttft_max_s'] * 1000:.1f}", f"{r['latency_s'] * 1000:.0f}",
                  f"{r['requests_per_batch']:.1f}"] for mode, r in staggered.items()]
                + [["ratio", f"{cont['tokens_per_s'] / stat['tokens_per_s']:.2f}",
                    f"{cont['ttft_s'] / stat['ttft_s']:.2f}",
                    f"{cont['ttft_max_s'] / stat['ttft_max_s']:.2f}",
                    f"{cont['latency_s'] / stat['latency_s']:.2f}", ""]],
                ["batching", "tok/s", "TTFT ms", "max TTFT ms", "latency ms",
                 "requests/batch"]))
    print(f"(load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())})")
    return info


def main() -> int:
    args = parse_args()

    import ray
    import torch
    from ray import serve

    quiet_transformers()
    work = Path(tempfile.mkdtemp(prefix="tuneserve-bench-gen-"))
    folder, template = find_checkpoint(args.model_dir, work, args.size)
    publish(folder, template, work / "registry")
    threads = max(1, int(args.replica_cpus))
    torch.set_num_threads(threads)
    model, tokenizer = load_causal_lm_for_serving(folder, args.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.streams)]

    port = free_port()
    cfg = serve_config(args, work / "registry", port)
    ensure_ray(num_cpus=math.ceil(args.replica_cpus) + 1)
    start_serving(cfg, http_port=free_port())
    address = f"127.0.0.1:{port}"
    try:
        results = run_phases(args, cfg, address, (model, tokenizer, template), prompts)
        staggered = run_staggered(args, cfg, address, prompts)
    finally:
        serve.shutdown()
        ray.shutdown()
    info = print_report(args, folder, n_params, threads, prompts, results, staggered)
    _, counts, _ = staggered_lengths(args, prompts)
    write_json(args.json, {"machine": info, "checkpoint": str(folder),
                           "layout": {"colocate": args.colocate,
                                      "replica_grpc": args.replica_grpc,
                                      "access_log": args.access_log},
                           "parameters": n_params, "new_tokens": args.new_tokens,
                           "threads": threads, "batching": args.batching,
                           "results": results,
                           "staggered": {"stagger_ms": args.stagger_ms, "new_tokens": counts,
                                         "results": staggered}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
