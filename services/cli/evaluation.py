"""`tuneserve eval`: a classifier's accuracy, per-class metrics and confusion matrix on
a labelled data file, from the registry's checkpoint or through a running server.
The evaluation (services.evaluate) is imported in `run` only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.cli.common import add_tls_flags, tls_options
from services.core.config import CLASSIFIER_OPTIMIZERS, DEFAULT_REGISTRY, TrainConfig, field_help
from services.core.errors import InvalidInput


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="a classifier's accuracy, per-class metrics and "
                              "confusion matrix on a labelled data file")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="labelled data: .csv, .tsv, .jsonl, .json (an array of records) "
                        "or .parquet")
    p.add_argument("--model", required=True, metavar="NAME[@VERSION]",
                   help="default version: the production channel's")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--registry", default=None,
                       help=f"load the checkpoint from this registry (default {DEFAULT_REGISTRY})")
    where.add_argument("--address", default=None, help="evaluate through a running "
                       "server's gRPC API (HOST:PORT)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="with --address: file holding the API token (default: "
                        "$TUNESERVE_API_TOKEN, else $TUNESERVE_ADMIN_TOKEN)")
    add_tls_flags(p)  # with --address
    helps = field_help(TrainConfig)
    p.add_argument("--text-column", default=None, metavar="VALUE", help=helps["text_column"])
    p.add_argument("--label-column", default=None, metavar="VALUE",
                   help=helps["label_column"])
    p.add_argument("--columns", default=None, metavar="A,B", help=helps["columns"])
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="texts per forward pass (default 64), or with --address per "
                        "request (default 128; lowered to the server's limit if less)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate the first N examples only")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request, with --address")
    p.add_argument("--optimize", choices=CLASSIFIER_OPTIMIZERS, default=None,
                   help="with --registry: run the version on ONNX Runtime or in bfloat16 "
                        "as `tuneserve serve --optimize` does (onnx-int8: int8 weights; "
                        "bf16: bfloat16 weights; auto: bf16 where the CPU computes it "
                        "natively)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.add_argument("--confusion-png", default=None, metavar="PATH",
                   help="also write the confusion matrix as a PNG")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace) -> int:
    from services.evaluate import run_eval

    if args.confusion_png:  # checked before the evaluation, not after it
        check_png_path(args.confusion_png)
    report = run_eval(data=args.data, model=args.model, registry=args.registry,
                      address=args.address, text_column=args.text_column,
                      label_column=args.label_column, columns=args.columns,
                      batch_size=args.batch_size, limit=args.limit, timeout_s=args.timeout_s,
                      token_file=args.token_file, tls=_tls(args), optimize=args.optimize)
    png = str(report.write_png(args.confusion_png)) if args.confusion_png else None
    if args.json:
        print(json.dumps({**report.to_json(), "confusion_png": png}))
    else:
        print(report.format())
        if png:
            print(f"\nconfusion matrix plot: {png}")
    return 0


def _tls(args: argparse.Namespace) -> dict:
    """The --tls* flags, which only a server (--address) uses."""
    tls = tls_options(args)
    given = [name for name, value in tls.items() if value]
    if given and not args.address:
        raise InvalidInput(f"--{given[0].replace('_', '-')}: TLS is for a server; pass "
                           "--address too")
    return tls


def check_png_path(path: str) -> None:
    """--confusion-png names a .png file that can be written."""
    png = Path(path)
    if png.suffix.lower() != ".png":
        raise InvalidInput(f"--confusion-png: a .png file name, got {path}")
    if png.is_dir():
        raise InvalidInput(f"--confusion-png: {path} is a folder")
    if png.parent.exists() and not png.parent.is_dir():
        raise InvalidInput(f"--confusion-png: cannot write {path}: "
                           f"{png.parent} is not a folder")
