"""What the commands that call a running server share: their flags and the token."""

from __future__ import annotations

import argparse
from typing import Optional

from services.core.auth import API_TOKEN_ENV, read_token


def add_target_flags(p: argparse.ArgumentParser) -> None:
    """--address, --model and --version of an Inference call."""
    p.add_argument("--address", default="localhost:9000",
                   help="HOST:PORT of the gRPC API (default: %(default)s)")
    p.add_argument("--model", required=True)
    p.add_argument("--version", dest="model_version", default="")


def add_token_file_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the API token (default: $TUNESERVE_API_TOKEN, "
                        "else $TUNESERVE_ADMIN_TOKEN)")


def token(token_file: Optional[str], env_name: str = API_TOKEN_ENV) -> Optional[str]:
    """The token in --token-file; None without one (the Client reads the environment)."""
    return read_token(env_name, token_file) if token_file else None
