"""`tuneserve demo`: train, publish, serve and query the bundled model on a local Ray
cluster (services.demo, imported in `run` only)."""

from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="train, publish, serve and query the bundled MiniLM "
                              "on the bundled sentiment data, on a local Ray cluster")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--grpc-port", type=int, default=0, help="default: a free port")
    p.add_argument("--home", default=None, help="where registry and runs go "
                   "(default: .tuneserve)")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from services.demo import run_demo

    return run_demo(workers=args.workers, epochs=args.epochs, grpc_port=args.grpc_port,
                    home=args.home, verbose=args.verbose)
