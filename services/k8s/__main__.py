"""`python -m services.k8s ACTION ...` is `tuneserve k8s ACTION ...`."""

import argparse
import sys

from services.core.errors import InvalidInput, TuneserveError
from services.k8s import register, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register(sub, prog="python -m services.k8s")  # usage lines name the form that works
    args = parser.parse_args(["k8s", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except TuneserveError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidInput) else 1


if __name__ == "__main__":
    sys.exit(main())
