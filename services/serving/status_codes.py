"""Exceptions to gRPC status codes: the one mapping every tuneserve server uses.

A domain error (services.core.errors) answers its own `grpc_code` with its message, paths
cut out; Serve's back-pressure answers RESOURCE_EXHAUSTED, a dead replica UNAVAILABLE;
anything else answers INTERNAL with an error id while the traceback goes to the log.
`set_status` puts the answer on a call's context with its details (services/protocol/
status.py): a retry hint where calling again can help, the invalid field of a request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import grpc

from services.core.errors import ModelLoading, Overloaded, TuneserveError
from services.protocol.status import FieldViolation, trailers

logger = logging.getLogger("ray.serve")

MAX_MESSAGE_CHARS = 1000
QUEUE_FULL_RETRY_S = 0.25
"""Retry hint of RESOURCE_EXHAUSTED for a full queue: calls leave it in milliseconds."""
LOADING_RETRY_S = 1.0
"""Retry hint of UNAVAILABLE while a model loads or a deployment has no replica."""
# Anything that looks like a file path or a module: a word holding a slash or a
# backslash, or ending in ".py".
# A message that names its field first ("texts[3]: empty text"), as InvalidInput's do.
_FIELD_FIRST = re.compile(r"([a-z_][a-z0-9_]*(?:\[\d+\])?(?:\.[a-z_][a-z0-9_]*(?:\[\d+\])?)*)"
                          r": (.+)", re.DOTALL)
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


@dataclass(frozen=True)
class Answer:
    """A failed call's status: code, public message and details."""

    code: grpc.StatusCode
    message: str
    retry_after_s: Optional[float] = None
    field_violations: tuple[FieldViolation, ...] = ()

    def trailing_metadata(self) -> list[tuple[str, Any]]:
        return trailers(self.code, self.message, self.retry_after_s, self.field_violations)


def _retry_after_s(exc: BaseException) -> Optional[float]:
    """How long a client should wait before calling again, or None when calling again
    will not help. A replica that died during the call gets none: the ingress has sent
    the call once more already, and a request that kills replicas must not be repeated."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, (Overloaded, BackPressureError)):
        return QUEUE_FULL_RETRY_S
    if isinstance(exc, (ModelLoading, DeploymentUnavailableError)):
        return LOADING_RETRY_S
    return None


def answer(exc: BaseException, model: str = "") -> Answer:
    """status_code's answer with its details."""
    code, message = status_code(exc, model)
    if code == grpc.StatusCode.INTERNAL:
        return Answer(code, message)
    violations: tuple[FieldViolation, ...] = ()
    named = _FIELD_FIRST.fullmatch(message)
    if code == grpc.StatusCode.INVALID_ARGUMENT and named:
        violations = (FieldViolation(named.group(1), named.group(2)),)
    return Answer(code, message, _retry_after_s(exc), violations)


def set_status(grpc_context, exc: BaseException, model: str = "") -> Answer:
    """End the call on `grpc_context` (Serve's or grpc's; None: only answer) with the
    status of `exc`: code, message and details in the trailers."""
    result = answer(exc, model)
    if grpc_context is not None:
        grpc_context.set_code(result.code)
        grpc_context.set_details(result.message)
        grpc_context.set_trailing_metadata(result.trailing_metadata())
    return result
