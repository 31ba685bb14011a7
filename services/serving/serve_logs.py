"""Serve's log lines for a call that ends with a client error, made quiet.

A logging filter on Serve's logger (`install`): a record of a call that ended with a
caller's mistake (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, ...) becomes one INFO
line without a traceback. INTERNAL and UNKNOWN keep theirs; tuneserve's own records are
untouched. `StreamEnded` is how a streaming method ends with a status of its choosing.
"""

from __future__ import annotations

import logging
from typing import Optional

import grpc

from services.core.errors import TuneserveError

SERVE_LOGGER = "ray.serve"
# The codes a caller's request (or the server's load) explains; anything else is a fault.
CLIENT_CODES = frozenset(c for c in grpc.StatusCode if c not in (
    grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED))


class StreamEnded(TuneserveError):
    """Raised by a streaming method to end with `code` (already set on the context)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.grpc_code = code.name

    def __reduce__(self):  # it travels from the replica to the proxy
        return StreamEnded, (self.code, self.message)


def _client_code(exc: Optional[BaseException]) -> Optional[grpc.StatusCode]:
    if isinstance(exc, StreamEnded):
        code = exc.code
    elif isinstance(exc, TuneserveError):  # raised in a model replica (a prompt too long)
        code = getattr(grpc.StatusCode, exc.grpc_code, None)
    else:  # the proxy's gRPCStatusError (duck-typed: no Serve import here)
        code = getattr(exc, "grpc_code", None)
    return code if isinstance(code, grpc.StatusCode) and code in CLIENT_CODES else None


class QuietClientErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        code = _client_code(exc)
        if code is not None:
            details = getattr(exc, "grpc_details", None) or str(exc)
            record.msg, record.args = "call ended with %s: %s", (code.name, details)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def install() -> None:
    """Add the filter to Serve's logger in this process (once)."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, QuietClientErrors) for f in logger.filters):
        logger.addFilter(QuietClientErrors())
