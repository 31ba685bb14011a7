"""Domain errors, one place.

Every layer raises these; only the gRPC boundary (services/serving/ingress.py) turns
them into status codes, and only the CLI turns them into exit codes. Each carries a
message meant for a person: it names the bad field, file or value, and never carries
a traceback, a server path or an internal class name.

They pickle by their args, so they survive the hop from a Ray Serve replica or a Ray
Train worker to the caller unchanged.
"""

from __future__ import annotations


class TuneserveError(Exception):
    """Base class. `grpc_code` is the name of a grpc.StatusCode member."""

    grpc_code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(TuneserveError):
    """A request field, flag or config value is invalid."""

    grpc_code = "INVALID_ARGUMENT"


class ConfigError(InvalidInput):
    """A training or serving configuration value is invalid (names the field)."""


class DataError(InvalidInput):
    """A data file cannot be read; names the file and, where it applies, the line."""


class ModelNotFound(TuneserveError):
    """No model, or no such version of a model."""

    grpc_code = "NOT_FOUND"


class ModelLoading(TuneserveError):
    """The model exists but no version is loaded yet on this replica."""

    grpc_code = "UNAVAILABLE"


class WrongTask(TuneserveError):
    """E.g. Classify on a generator, or Generate on a classifier."""

    grpc_code = "FAILED_PRECONDITION"


class NotImplementedYet(TuneserveError):
    grpc_code = "UNIMPLEMENTED"


class Overloaded(TuneserveError):
    grpc_code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(TuneserveError):
    """A call without a deadline ran past the server's default one
    (ServeLimits.request_timeout_s)."""

    grpc_code = "DEADLINE_EXCEEDED"


class RequestTooLarge(TuneserveError):
    """A request message over ServeLimits.max_request_bytes."""

    grpc_code = "RESOURCE_EXHAUSTED"


class Unauthenticated(TuneserveError):
    """No token, a malformed `authorization` metadata entry, or an unknown token."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(TuneserveError):
    """A valid token that may not call this method (the API token on Admin)."""

    grpc_code = "PERMISSION_DENIED"


class RegistryError(TuneserveError):
    """The registry is unusable (missing root, unreadable pointer, ...)."""

    grpc_code = "FAILED_PRECONDITION"


class CorruptVersion(RegistryError):
    """A published version failed verification (checksums, manifest, unsafe files)."""


class UnreadableVersion(RegistryError):
    """A version's file could not be read (permissions, an I/O error): not known to be
    corrupt, so a replica tries it again (services/serving/follower.py)."""


class TrainingFailed(TuneserveError):
    """A training run failed; nothing was published."""
