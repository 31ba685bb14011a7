"""The `tuneserve` command line.

    tuneserve train --config run.yaml [--flags that override it]
    tuneserve serve --registry DIR --grpc-port 9000
    tuneserve classify --address HOST:PORT --model NAME "text" ...
    tuneserve generate --address HOST:PORT --model NAME "prompt" [--stream] [--max-new-tokens N]
    tuneserve models list --registry DIR
    tuneserve eval --data FILE --model NAME[@VERSION]
    tuneserve demo
    tuneserve k8s train|status|logs|delete|promote|unpin ...   (KubeRay; docs/kubernetes.md)

One module per command: `register(subparsers)` adds its parser and flags and sets its
handler (`args.handler`), which returns the exit code. Start-up imports neither torch,
transformers nor Ray; a command imports what it runs in its handler.

Errors print one line naming the bad field, file or status and exit non-zero (2 for
bad input, 1 for everything else); no tracebacks unless --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Optional, Sequence

import grpc

from services import __version__, k8s
from services.cli import classify, demo, evaluation, generate, models, serve, train
from services.cli.common import describe_rpc_error
from services.core.errors import InvalidInput, TuneserveError

__all__ = ["build_parser", "main"]

COMMANDS = (train, serve, classify, generate, models, evaluation, demo, k8s)
"""Each has `register(subparsers)`; `tuneserve --help` lists them in this order."""

_train_summary = train.format_summary  # the name tests have imported it by


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneserve",
        description="Fine-tune Hugging Face models with Ray Train; serve them over gRPC "
                    "with Ray Serve.")
    parser.add_argument("--version", action="version", version=f"tuneserve {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show Ray's logs and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except TuneserveError as exc:
        if args.verbose:
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidInput) else 1
    except grpc.RpcError as exc:
        print(f"error: {describe_rpc_error(exc)}", file=sys.stderr)
        # the server found the input bad: as when the CLI finds it so
        return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    except BrokenPipeError:  # output piped into `head` and the like
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        if args.verbose:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
