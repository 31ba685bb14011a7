"""`tuneserve generate`: generate text through a running server's gRPC API, whole or
streamed."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from services.cli.common import (
    add_retry_flag,
    add_target_flags,
    add_tls_flags,
    add_token_file_flag,
    tls_options,
    token,
)
from services.core.errors import InvalidInput


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text through a running server")
    add_target_flags(p)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="default: the server's")
    p.add_argument("--temperature", type=float, default=None, metavar="X",
                   help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=None, metavar="X")
    p.add_argument("--top-k", type=int, default=None, metavar="N")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="same seed, same text (with --temperature > 0)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate max-new-tokens whatever the model says")
    p.add_argument("--timeout-s", type=float, default=120.0)
    add_token_file_flag(p)
    add_tls_flags(p)
    add_retry_flag(p)
    p.add_argument("--json", action="store_true",
                   help="the response (with --stream: each chunk) as one JSON object a line")
    p.add_argument("prompt", metavar="PROMPT")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from services.client import Client

    params = generation_params(args)
    with Client(args.address, token=token(args.token_file),
                timeout_s=args.timeout_s, max_attempts=args.max_attempts,
                **tls_options(args)) as client:
        if not args.stream:
            last = client.generate(args.model, args.prompt, **params)
            print(_as_json(last) if args.json else last.text)
        else:
            last = _print_stream(client.generate_stream(args.model, args.prompt, **params),
                                 args.json)
    if last is not None and not args.json:
        print(f"[{last.model} {last.version}: {last.prompt_tokens} prompt + "
              f"{last.completion_tokens} generated tokens, finish: {last.finish_reason}]",
              file=sys.stderr)
    return 0


def generation_params(args: argparse.Namespace) -> dict[str, Any]:
    """The Generate call's keyword arguments, those given only."""
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "top_k": args.top_k, "stop": args.stop,
              "seed": args.seed, "ignore_eos": args.ignore_eos or None,
              "version": args.model_version or None, "timeout_s": args.timeout_s,
              "routing_key": args.routing_key or None}
    params = {k: v for k, v in params.items() if v is not None}
    if params.get("seed", 0) < 0:
        raise InvalidInput(f"--seed: must be >= 0, got {params['seed']}")
    return params


def _print_stream(stream, as_json: bool):
    """Print the chunks as they come; the last one (None if none came)."""
    last = None
    try:
        for last in stream:
            if as_json:
                print(_as_json(last), flush=True)
            else:
                print(last.text, end="", flush=True)
    finally:
        stream.cancel()  # no-op once complete; on Ctrl-C stops the generation
    if not as_json:
        print()
    return last


def _as_json(r) -> str:
    return json.dumps({"text": r.text, "prompt_tokens": r.prompt_tokens,
                       "completion_tokens": r.completion_tokens,
                       "finish_reason": r.finish_reason, "model": r.model,
                       "version": r.version})
