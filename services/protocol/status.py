"""Error details on the wire: what a failed call carries besides its code and message.

A tuneserve server ends every failed call with a `google.rpc.Status` in the
`grpc-status-details-bin` trailer (grpcio-status's encoding; the same code and message
as the call's own). Its details hold a `google.rpc.RetryInfo` when waiting and calling
again can help (also sent as the `retry-after-ms` trailer, for clients without the
protos), and a `google.rpc.BadRequest` naming the field of an invalid request. The
server encodes (`trailers`), clients decode (`Details.of`); docs/api.md has the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DETAILS_TRAILER = "grpc-status-details-bin"
RETRY_AFTER_TRAILER = "retry-after-ms"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request: its path (`texts[3]`, `max_new_tokens`) and
    what is wrong with it."""

    field: str
    description: str


@dataclass(frozen=True)
class Details:
    """What a failed call's trailers say: `status` whether a google.rpc.Status came
    (a tuneserve server answered, not the network or a proxy in front of it),
    `retry_after_s` the server's hint (None: calling again will not help), and the
    request's invalid fields."""

    status: bool = False
    retry_after_s: Optional[float] = None
    field_violations: tuple[FieldViolation, ...] = ()

    @classmethod
    def of(cls, trailing_metadata: Optional[Iterable[tuple[str, Any]]]) -> "Details":
        """Decode a call's trailing metadata; anything malformed counts as absent."""
        status, retry_ms = None, None
        for key, value in trailing_metadata or ():
            if key == DETAILS_TRAILER and isinstance(value, bytes):
                try:
                    status = status_pb2.Status.FromString(value)
                except DecodeError:
                    status = None
            elif key == RETRY_AFTER_TRAILER:
                retry_ms = _milliseconds(value)
        if status is None:
            return cls(retry_after_s=None if retry_ms is None else retry_ms / 1000)
        retry_after_s, violations = None, []
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry_after_s = max(0.0, info.retry_delay.ToTimedelta().total_seconds())
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description)
                               for v in bad.field_violations]
        if retry_after_s is None and retry_ms is not None:
            retry_after_s = retry_ms / 1000
        return cls(True, retry_after_s, tuple(violations))


def trailers(code: grpc.StatusCode, message: str, retry_after_s: Optional[float] = None,
             field_violations: Iterable[FieldViolation] = ()) -> list[tuple[str, Any]]:
    """The trailing metadata a server sends with a failed call's code and message."""
    status = status_pb2.Status(code=code.value[0], message=message)
    out: list[tuple[str, Any]] = []
    if retry_after_s is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromMilliseconds(round(retry_after_s * 1000))
        status.details.add().Pack(info)
        out.append((RETRY_AFTER_TRAILER, str(round(retry_after_s * 1000))))
    violations = list(field_violations)
    if violations:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field,
                                                        description=v.description)
            for v in violations])
        status.details.add().Pack(bad)
    return list(rpc_status.to_status(status).trailing_metadata) + out


def _milliseconds(value: Any) -> Optional[int]:
    try:
        ms = int(value.decode() if isinstance(value, bytes) else value)
    except (ValueError, UnicodeDecodeError):
        return None
    return ms if ms >= 0 else None
