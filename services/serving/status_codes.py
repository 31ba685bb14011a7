"""Exceptions to gRPC status codes: the one mapping every tuneserve server uses.

A domain error (services.core.errors) answers its own `grpc_code` with its message, paths
cut out; Serve's back-pressure answers RESOURCE_EXHAUSTED, a dead replica UNAVAILABLE;
anything else answers INTERNAL with an error id while the traceback goes to the log.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import Optional

import grpc

from services.core.errors import ModelLoading, Overloaded, TuneserveError

logger = logging.getLogger("ray.serve")

MAX_MESSAGE_CHARS = 1000
# Anything that looks like a file path or a module: a word holding a slash or a
# backslash, or ending in ".py".
_PATH_LIKE = re.compile(r"""[^\s'"()]*[/\\][^\s'"()]*|[^\s'"()]+\.py\b""")


def internal_error(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s", error_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id}); see server logs"


def public_message(message: str) -> Optional[str]:
    """A domain error's message as a client may see it: paths cut out, bounded; None
    if it looks like a traceback (the caller answers INTERNAL with an error id)."""
    if "Traceback" in message or 'File "' in message:
        return None
    message = _PATH_LIKE.sub("<path>", message)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 3] + "..."
    return message


def status_code(exc: BaseException, model: str = "") -> tuple[grpc.StatusCode, str]:
    """Exception -> (status code, message for the client). `model`: the request's model
    if it is one served here (safe to name), else empty."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, ModelLoading):
        # The replica's own message may carry its last load error (paths, exception
        # names): ListModels shows that to whoever needs it.
        who = f"model '{model}'" if model and model != "-" else "the model"
        return grpc.StatusCode.UNAVAILABLE, (f"{who} is loading: no version is loaded yet; "
                                             "retry shortly (ListModels shows its state)")
    if isinstance(exc, TuneserveError):
        message = public_message(exc.message or exc.grpc_code)
        if message is None:
            return internal_error(exc)
        return getattr(grpc.StatusCode, exc.grpc_code), message
    if isinstance(exc, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(queue_full())
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return grpc.StatusCode.UNAVAILABLE, "model temporarily unavailable; retry"
    if isinstance(exc, asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "timed out"
    return internal_error(exc)


def queue_full() -> Exception:
    return Overloaded("server busy: request queue full; retry later")
