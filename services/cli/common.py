"""What the commands that call a running server share: their flags, the token, TLS and
how a failed call reads."""

from __future__ import annotations

import argparse
from typing import Any, Optional

import grpc

from services.core.auth import API_TOKEN_ENV, read_token


def add_target_flags(p: argparse.ArgumentParser) -> None:
    """--address, --model, --version and --routing-key of an Inference call."""
    p.add_argument("--address", default="localhost:9000",
                   help="HOST:PORT of the gRPC API (default: %(default)s)")
    p.add_argument("--model", required=True)
    p.add_argument("--version", dest="model_version", default="")
    p.add_argument("--routing-key", default="", metavar="KEY",
                   help="during a canary, the same key gets the same version (a user or "
                        "session id); default: by chance")


def add_token_file_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the API token (default: $TUNESERVE_API_TOKEN, "
                        "else $TUNESERVE_ADMIN_TOKEN)")


def token(token_file: Optional[str], env_name: str = API_TOKEN_ENV) -> Optional[str]:
    """The token in --token-file; None without one (the Client reads the environment)."""
    return read_token(env_name, token_file) if token_file else None


def add_tls_flags(p: argparse.ArgumentParser) -> None:
    """--tls, --tls-ca, --tls-cert and --tls-key: the Client's TLS arguments."""
    p.add_argument("--tls", action="store_true",
                   help="TLS, checking the server's certificate against the system's CAs "
                        "(any --tls-* flag turns TLS on)")
    p.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="PEM CA certificates the server's certificate must be signed by")
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="PEM client certificate, for a server that requires mutual TLS "
                        "(with --tls-key)")
    p.add_argument("--tls-key", default=None, metavar="FILE",
                   help="PEM private key of --tls-cert")


def add_retry_flag(p: argparse.ArgumentParser) -> None:
    """--max-attempts: the Client's tries of a call that may be sent again."""
    p.add_argument("--max-attempts", type=int, default=3, metavar="N",
                   help="tries of a call the server asks to send again (RetryInfo: a "
                        "full queue, a model loading) or that reached no server, "
                        "1 to 10 (default: %(default)s; 1: no retries)")


def tls_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Client keyword arguments of the --tls* flags."""
    return {"tls": args.tls, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert,
            "tls_key": args.tls_key}


def describe_rpc_error(exc: grpc.RpcError) -> str:
    """A failed call in one line; a connection that failed in the TLS handshake, or one
    the server closed at once, says what to check."""
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        low = details.lower()
        if "handshake" in low:
            reason = details.rsplit("OPENSSL_internal:", 1)[-1].split(":")[0].strip()
            return (f"TLS handshake with the server failed ({reason or details}): "
                    "check --tls-ca (the CA that signed the server's certificate) and "
                    "that the address is a name the certificate holds")
        if "socket closed" in low:
            return (f"UNAVAILABLE: {details} (a server with TLS closes plaintext "
                    "connections, and one with mutual TLS those without a client "
                    "certificate: check --tls-ca, --tls-cert and --tls-key)")
    attempts = getattr(exc, "attempts", 1)
    tried = f" (after {attempts} attempts, --max-attempts)" if attempts > 1 else ""
    return f"{exc.code().name}: {details}{tried}"
