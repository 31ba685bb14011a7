"""`tuneserve classify`: classify texts through a running server's gRPC API."""

from __future__ import annotations

import argparse
import json

from services.cli.common import (
    add_retry_flag,
    add_target_flags,
    add_tls_flags,
    add_token_file_flag,
    tls_options,
    token,
)
from services.core.tables import format_table


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("classify", help="classify texts through a running server")
    add_target_flags(p)
    p.add_argument("--timeout-s", type=float, default=30.0)
    add_token_file_flag(p)
    add_tls_flags(p)
    add_retry_flag(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from services.client import Client

    with Client(args.address, token=token(args.token_file),
                timeout_s=args.timeout_s, max_attempts=args.max_attempts,
                **tls_options(args)) as client:
        resp = client.classify(args.model, args.texts, version=args.model_version,
                               routing_key=args.routing_key)
    if args.json:
        for text, r in zip(args.texts, resp.results):
            print(json.dumps({"text": text, "label": r.label, "score": round(r.score, 6),
                              "scores": {s.label: round(s.score, 6) for s in r.scores},
                              "model": resp.model, "version": resp.version}))
    else:
        rows = [(clip(t), r.label, f"{r.score:.3f}") for t, r in zip(args.texts, resp.results)]
        print(format_table(rows, ["text", "label", "score"]))
        print(f"model {resp.model} {resp.version}")
    return 0


def clip(text: str, width: int = 60) -> str:
    """One line of at most `width` characters."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"
