"""A small Python client for the tuneserve gRPC API.

    from services.client import Client
    with Client("localhost:9000") as c:
        resp = c.classify("sentiment", ["what a lovely film"])
        print(resp.results[0].label, resp.version)

Tokens: when the server requires them, the client sends `authorization: Bearer
<token>`: `token` (default: env TUNESERVE_API_TOKEN, else TUNESERVE_ADMIN_TOKEN) on
Inference calls, `admin_token` (default: env TUNESERVE_ADMIN_TOKEN, else `token`) on
Admin calls. Pass "" to send none.

TLS: `Client(address, tls_ca="ca.pem")` checks the server's certificate against that CA
(`tls=True`: the system's CAs); `tls_cert` and `tls_key` add a client certificate for a
server that requires mutual TLS (`tuneserve serve --tls-client-ca`). Without any of
them the channel is plaintext: do not send tokens over a network you do not trust.

Errors: a failed call raises CallError, a grpc.RpcError with `code()`, `details()`, the
request's invalid fields (`field_violations`) and the server's retry hint
(`retry_after_s`), read from the status details (services/protocol/status.py), so no
caller parses a message. Classify, Generate, ListModels and a GenerateStream that has
sent nothing are tried up to `max_attempts` times (default 3) when calling again can
help: after the wait the server asks for (RetryInfo), or, for UNAVAILABLE that no
tuneserve server answered (a connection refused or lost), after a jittered backoff;
all within the call's one deadline. Admin calls are tried once.

Other languages: generate stubs from protos/tuneserve/v1/inference.proto, or explore
with grpcurl (server reflection is on): `grpcurl -plaintext localhost:9000 list`.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import grpc
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.auth import ADMIN_TOKEN_ENV, API_TOKEN_ENV, read_token
from services.core.errors import InvalidInput
from services.protocol import INFERENCE_SERVICE, admin_pb, admin_pb_grpc, pb, pb_grpc
from services.protocol.status import Details, FieldViolation

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_KEEPALIVE_S = 20.0
"""A connection with a call in flight is pinged after this long without a frame from
the server; no answer closes it. It is twice tuneserve's servers' least ping interval
(services/serving/replica_grpc.py), so they never count it as abuse."""
MAX_PING_TIMEOUT_S = 10.0


def keepalive_options(keepalive_s: Optional[float]) -> list[tuple[str, int]]:
    """grpc channel arguments that ping a connection with calls in flight every
    `keepalive_s` seconds without a frame from the server (Client's `keepalive_s`)."""
    if keepalive_s is None:
        return []
    if isinstance(keepalive_s, bool) or not isinstance(keepalive_s, (int, float)) \
            or not 0.1 <= keepalive_s <= 3600:
        raise InvalidInput(f"keepalive_s: must be a number of seconds from 0.1 to 3600 or "
                           f"None, got {keepalive_s!r}")
    timeout_ms = int(min(keepalive_s, MAX_PING_TIMEOUT_S) * 1000)
    # grpc (1.85) times its pings out after grpc.http2.ping_timeout_ms (default 60 s),
    # whatever keepalive_timeout_ms says: both are set.
    return [("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", timeout_ms),
            ("grpc.http2.ping_timeout_ms", timeout_ms),
            ("grpc.keepalive_permit_without_calls", 0)]


def token_from(token_file: Optional[str], env_name: str) -> Optional[str]:
    """A token from a file (whitespace stripped) if one is named, else from env_name."""
    return read_token(env_name, token_file)


class Client:
    def __init__(self, address: str, *, token: Optional[str] = None,
                 admin_token: Optional[str] = None, application: Optional[str] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, connections: int = 1,
                 tls: bool = False, tls_ca: Optional[str] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 admin_address: Optional[str] = None,
                 keepalive_s: Optional[float] = DEFAULT_KEEPALIVE_S):
        """`application`: the Serve application to reach, when the cluster runs more
        than one (sent as the `application` metadata Serve's gRPC proxy routes by).

        `connections`: TCP connections this client opens, taking calls in turn. Each
        Client has connections of its own (gRPC would otherwise share one among all
        channels to an address in a process). Behind Serve's proxy one is enough: the
        proxy spreads calls over replicas. Replicas that answer gRPC themselves
        (ServeConfig.replica_grpc) share a port and the kernel hands each connection to
        one of them, so a client reaches as many replicas as it has connections, at
        most (docs/kubernetes.md).

        `tls`, `tls_ca`, `tls_cert`, `tls_key`: TLS (any of them turns it on), see the
        module docstring; the files are PEM.

        `max_attempts`: tries of an idempotent call (1: no retries), see RetryPolicy.

        `admin_address`: the server's admin port (`tuneserve serve --admin-port`), where
        Admin calls go; default `address` (a client made for Admin calls only).

        `keepalive_s`: while a call is in flight, the connection is pinged after this
        many seconds without a frame from the server, and closed when the ping gets no
        answer within min(keepalive_s, 10) s: a server whose machine vanished without
        closing its connections (a lost node) fails the call as UNAVAILABLE, tried again
        on a new connection, instead of holding it to its deadline. Idle connections
        are not pinged. None: no pings (TCP alone notices, after minutes)."""
        if not isinstance(connections, int) or connections < 1:
            raise ValueError(f"connections must be an integer >= 1, got {connections!r}")
        self.retry = RetryPolicy(max_attempts)
        check_address(address)
        self.address = address
        self.timeout_s = _deadline(timeout_s)
        credentials = channel_credentials(tls, tls_ca, tls_cert, tls_key)
        options = [("grpc.use_local_subchannel_pool", 1), *keepalive_options(keepalive_s)]
        self.channels = [grpc.secure_channel(address, credentials, options=options)
                         if credentials else grpc.insecure_channel(address, options=options)
                         for _ in range(connections)]
        self.channel = self.channels[0]
        self._inference = [pb_grpc.InferenceStub(ch) for ch in self.channels]
        self._admin_channels = []
        if admin_address is not None and admin_address != address:
            check_address(admin_address)
            self._admin_channels = [
                grpc.secure_channel(admin_address, credentials, options=options)
                if credentials else grpc.insecure_channel(admin_address, options=options)]
        self.admin_address = admin_address or address
        self._admin = [admin_pb_grpc.AdminStub(ch)
                       for ch in self._admin_channels or self.channels]
        self._turn = itertools.count()
        self._health_stub = health_pb2_grpc.HealthStub(self.channel)
        if token is None:
            token = read_token(API_TOKEN_ENV) or read_token(ADMIN_TOKEN_ENV)
        if admin_token is None:
            admin_token = read_token(ADMIN_TOKEN_ENV) or token
        routing = [("application", application)] if application else []
        self._health_metadata = routing
        self._metadata = routing + _bearer(token)
        self._admin_metadata = routing + _bearer(admin_token)

    @property
    def inference(self) -> pb_grpc.InferenceStub:
        """The Inference stub of the connection whose turn it is."""
        return self._inference[next(self._turn) % len(self._inference)]

    @property
    def admin_channel(self) -> grpc.Channel:
        """The channel Admin calls go on (to admin_address)."""
        return (self._admin_channels or self.channels)[0]

    @property
    def admin(self) -> admin_pb_grpc.AdminStub:
        return self._admin[next(self._turn) % len(self._admin)]

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for channel in self.channels + self._admin_channels:
            channel.close()

    def _timeout(self, timeout_s: Optional[float]) -> Optional[float]:
        return self.timeout_s if timeout_s is None else _deadline(timeout_s)

    def classify(self, model: str, texts: Sequence[str], version: str = "",
                 timeout_s: Optional[float] = None,
                 routing_key: str = "") -> pb.ClassifyResponse:
        req = build(pb.ClassifyRequest, model=model, texts=list(texts), version=version,
                    routing_key=routing_key)
        return self._call(lambda: self.inference.Classify, req, self._timeout(timeout_s))

    def generate(self, model: str, prompt: str, **params) -> pb.GenerateResponse:
        timeout_s = self._timeout(params.pop("timeout_s", None))
        req = build(pb.GenerateRequest, model=model, prompt=prompt, **params)
        return self._call(lambda: self.inference.Generate, req, timeout_s)

    def generate_stream(self, model: str, prompt: str, **params) -> "Stream":
        timeout_s = self._timeout(params.pop("timeout_s", None))
        req = build(pb.GenerateRequest, model=model, prompt=prompt, **params)
        return Stream(lambda t: self.inference.GenerateStream(req, timeout=t,
                                                              metadata=self._metadata),
                      self.retry, timeout_s)

    def list_models(self, model: str = "") -> pb.ListModelsResponse:
        return self._call(lambda: self.inference.ListModels,
                          build(pb.ListModelsRequest, model=model), self.timeout_s)

    def _call(self, method: Callable[[], Any], request, timeout_s: Optional[float],
              metadata=None, attempts: Optional[int] = None):
        """A unary call, tried again as `self.retry` allows (`attempts`: at most that
        many tries), each try on the next connection, all within one deadline; a failure
        raises CallError."""
        deadline = _Deadline(timeout_s)
        attempts = self.retry.max_attempts if attempts is None else attempts
        for attempt in itertools.count(1):
            try:
                return method()(request, timeout=deadline.left(),
                                metadata=self._metadata if metadata is None else metadata)
            except grpc.RpcError as exc:
                error = CallError.of(exc, attempt)
                wait = self.retry.wait_s(error, attempt) if attempt < attempts else None
                if wait is None or not deadline.allows(wait):
                    raise error from None
                time.sleep(wait)

    # ---- Admin ----------------------------------------------------------------------
    def promote(self, model: str, version: str, channel: str = "") -> admin_pb.AdminResponse:
        return self._admin_call(lambda: self.admin.Promote, build(
            admin_pb.PromoteRequest, model=model, version=version, channel=channel))

    def rollback(self, model: str, channel: str = "") -> admin_pb.AdminResponse:
        return self._admin_call(lambda: self.admin.Rollback, build(
            admin_pb.RollbackRequest, model=model, channel=channel))

    def pin(self, model: str, version: str) -> admin_pb.AdminResponse:
        return self._admin_call(lambda: self.admin.Pin, build(
            admin_pb.PinRequest, model=model, version=version))

    def unpin(self, model: str) -> admin_pb.AdminResponse:
        return self._admin_call(lambda: self.admin.Unpin, build(admin_pb.UnpinRequest,
                                                                model=model))

    def _admin_call(self, method: Callable[[], Any], request) -> admin_pb.AdminResponse:
        """Admin calls change state: tried once (Rollback twice would go back twice)."""
        return self._call(method, request, self.timeout_s, self._admin_metadata, attempts=1)

    def start_canary(self, model: str, version: str, percent: float,
                     reason: str = "") -> admin_pb.CanaryResponse:
        return self._admin_call(lambda: self.admin.StartCanary, build(
            admin_pb.StartCanaryRequest, model=model, version=version,
            percent=float(percent), reason=reason))

    def set_canary_share(self, model: str, percent: float,
                         reason: str = "") -> admin_pb.CanaryResponse:
        return self._admin_call(lambda: self.admin.SetCanaryShare, build(
            admin_pb.SetCanaryShareRequest, model=model, percent=float(percent),
            reason=reason))

    def promote_canary(self, model: str, reason: str = "") -> admin_pb.CanaryResponse:
        return self._admin_call(lambda: self.admin.PromoteCanary, build(
            admin_pb.EndCanaryRequest, model=model, reason=reason))

    def abort_canary(self, model: str, reason: str = "") -> admin_pb.CanaryResponse:
        return self._admin_call(lambda: self.admin.AbortCanary, build(
            admin_pb.EndCanaryRequest, model=model, reason=reason))

    def health(self, service: str = INFERENCE_SERVICE, timeout_s: float = 5.0) -> str:
        """'SERVING', 'NOT_SERVING', ... as a name (health needs no token)."""
        resp = self._health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                       timeout=timeout_s, metadata=self._health_metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_until_serving(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health()
                if last == "SERVING":
                    return
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(poll_s)
        raise TimeoutError(f"{self.address} not SERVING after {timeout_s:.0f}s ({last})")


class CallError(grpc.RpcError):
    """A failed call: `code()` and `details()` as grpc.RpcError has them, and what the
    status details say. `field_violations`: the request's invalid fields (field path,
    description), for INVALID_ARGUMENT. `retry_after_s`: how long the server asks to
    wait before calling again; None when it gave no hint. `from_server`: a tuneserve
    server answered (False: the connection failed, or a proxy in front answered).
    `attempts`: the tries made."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Details = Details(),
                 attempts: int = 1, trailing_metadata: Sequence = ()):
        super().__init__(f"{code.name}: {message}")
        self._code, self._message = code, message
        self.field_violations: tuple[FieldViolation, ...] = details.field_violations
        self.retry_after_s: Optional[float] = details.retry_after_s
        self.from_server = details.status
        self.attempts = attempts
        self._trailing_metadata = tuple(trailing_metadata)

    @classmethod
    def of(cls, exc: grpc.RpcError, attempts: int = 1) -> "CallError":
        """The CallError of a failed call's grpc.RpcError (itself, if it is one)."""
        if isinstance(exc, CallError):
            return exc
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else ()
        return cls(code or grpc.StatusCode.UNKNOWN,
                   (exc.details() if hasattr(exc, "details") else str(exc)) or "",
                   Details.of(trailing), attempts, trailing or ())

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple:
        return self._trailing_metadata


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed idempotent call is tried again, and after how long. A server's
    hint (RetryInfo) is waited out, plus up to half again (jitter, so that the clients
    it turned away do not come back at once), unless it is over `max_wait_s`: then the
    call fails at once. UNAVAILABLE that no tuneserve server answered waits
    `backoff_s`, doubling each try, times a random factor in [0.5, 1). Nothing else is
    tried again: a bad request, an error the server gave no hint for (a replica that
    died twice on the request), a deadline."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_s: float = 0.1
    max_wait_s: float = 5.0
    rand: Callable[[], float] = random.random

    def __post_init__(self):
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or not 1 <= self.max_attempts <= 10:
            raise InvalidInput(f"max_attempts (--max-attempts): must be an integer from 1 "
                               f"to 10, got {self.max_attempts!r}")

    def wait_s(self, error: CallError, attempt: int) -> Optional[float]:
        """Seconds to wait before try `attempt + 1`; None: do not try again."""
        if error.retry_after_s is not None:
            if error.retry_after_s > self.max_wait_s:
                return None
            return error.retry_after_s * (1 + self.rand() / 2)
        if error.code() == grpc.StatusCode.UNAVAILABLE and not error.from_server:
            return min(self.max_wait_s,
                       self.backoff_s * 2 ** (attempt - 1) * (0.5 + self.rand() / 2))
        return None


class _Deadline:
    """One deadline for all the tries of a call (None: none)."""

    def __init__(self, timeout_s: Optional[float]):
        self.at = None if timeout_s is None else time.monotonic() + timeout_s

    def left(self) -> Optional[float]:
        return None if self.at is None else max(0.001, self.at - time.monotonic())

    def allows(self, wait_s: float) -> bool:
        """Whether a try after waiting wait_s would still have time."""
        return self.at is None or time.monotonic() + wait_s < self.at


class Stream:
    """A GenerateStream's chunks. Until the first chunk arrives, the call is tried again
    when the server hints so (RetryInfo); after it, never: the caller has part of the
    text. A failure raises CallError; `cancel()` ends the call."""

    def __init__(self, start: Callable[[Optional[float]], Any], retry: RetryPolicy,
                 timeout_s: Optional[float]):
        self._start, self._retry = start, retry
        self._deadline = _Deadline(timeout_s)
        self._call = start(self._deadline.left())
        self._attempt, self._sent, self._cancelled = 1, False, False

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> pb.GenerateResponse:
        while True:
            try:
                chunk = next(self._call)
                self._sent = True
                return chunk
            except grpc.RpcError as exc:
                error = CallError.of(exc, self._attempt)
                wait = None
                if not (self._sent or self._cancelled or error.retry_after_s is None
                        or self._attempt >= self._retry.max_attempts):
                    wait = self._retry.wait_s(error, self._attempt)
                if wait is None or not self._deadline.allows(wait):
                    raise error from None
                time.sleep(wait)
                self._attempt += 1
                self._call = self._start(self._deadline.left())

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


def build(message_cls, **fields):
    """A request message, each value checked against its field first: an integer out of
    the field's range, a string that is not UTF-8 text (e.g. bytes from a shell in
    another locale), a wrong type, each an InvalidInput naming the field."""
    descriptor = message_cls.DESCRIPTOR
    for name, value in fields.items():
        field = descriptor.fields_by_name.get(name)
        if field is None:
            raise InvalidInput(f"{name}: not a field of {descriptor.full_name}")
        if value is None:  # unset, as protobuf reads it
            continue
        repeated = getattr(field, "is_repeated", None)  # protobuf 7 has no .label
        if repeated is None:
            repeated = field.label == FieldDescriptor.LABEL_REPEATED
        values = value if repeated else [value]
        if repeated and isinstance(value, (str, bytes)):
            raise InvalidInput(f"{name}: expected a list, got one {type(value).__name__}")
        for i, item in enumerate(values):
            where = f"{name}[{i}]" if repeated else name
            if field.type in _INT_RANGES:
                low, high = _INT_RANGES[field.type]
                if not isinstance(item, int) or isinstance(item, bool):
                    raise InvalidInput(f"{where}: expected an integer, got {item!r}")
                if not low <= item <= high:
                    raise InvalidInput(f"{where}: {item} is out of range ({low} to {high})")
            elif field.type == FieldDescriptor.TYPE_STRING:
                if not isinstance(item, str):
                    raise InvalidInput(f"{where}: expected text, got {type(item).__name__}")
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidInput(f"{where}: not valid UTF-8 text (bytes that are not "
                                       "text, e.g. from a shell in another locale)") from None
    try:
        return message_cls(**fields)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{descriptor.full_name}: {exc}") from None


def check_address(address: str) -> None:
    """HOST:PORT with a port gRPC can reach (it would wrap 99999 round to another). No
    scheme (gRPC reads `http://host:9000` as a DNS name) and no missing port (gRPC would
    dial 443); an IPv6 host in brackets, [::1]:9000."""
    expected = "expected host:port (e.g. localhost:9000)"
    if not isinstance(address, str) or not address.strip():
        raise InvalidInput(f"address: empty; {expected}")
    if "://" in address:
        raise InvalidInput(f"address: {expected} without a scheme, got {address!r}")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port:
        raise InvalidInput(f"address: {expected}, got {address!r}")
    if not port.isdigit():
        raise InvalidInput(f"address: the port must be a number; {expected}, got "
                           f"{address!r}")
    if not 1 <= int(port) <= 65535:
        raise InvalidInput(f"address: port {port} is out of range (1-65535) in {address!r}")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    if any(c.isspace() for c in host) or "/" in host or \
            (not bracketed and (":" in host or "[" in host or "]" in host)):
        raise InvalidInput(f"address: {expected}, got {address!r}"
                           + (" (an IPv6 host goes in brackets: [::1]:9000)"
                              if ":" in host and not bracketed else ""))


def channel_credentials(tls: bool = False, tls_ca: Optional[str] = None,
                        tls_cert: Optional[str] = None, tls_key: Optional[str] = None
                        ) -> Optional[grpc.ChannelCredentials]:
    """TLS credentials from PEM files (None: plaintext, when none is asked for). A file
    that cannot be read, or a certificate without its key, is an InvalidInput naming
    the argument."""
    if not (tls or tls_ca or tls_cert or tls_key):
        return None
    if bool(tls_cert) != bool(tls_key):
        raise InvalidInput("tls_cert and tls_key (--tls-cert, --tls-key): a client "
                           "certificate needs its key, give both or neither")
    return grpc.ssl_channel_credentials(root_certificates=_pem("tls_ca", tls_ca),
                                        private_key=_pem("tls_key", tls_key),
                                        certificate_chain=_pem("tls_cert", tls_cert))


def _pem(name: str, path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{name} ({_flag(name)}): cannot read {path} "
                           f"({exc.strerror or exc})") from None
    if b"-----BEGIN " not in data:
        raise InvalidInput(f"{name} ({_flag(name)}): {path} is not a PEM file")
    return data


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _deadline(timeout_s: Optional[float]) -> Optional[float]:
    """A call's timeout in seconds: > 0; inf or None means no deadline."""
    if timeout_s is None or timeout_s == float("inf"):
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
            or not timeout_s > 0:
        raise InvalidInput(f"timeout_s: must be a number of seconds > 0 (or inf for none), "
                           f"got {timeout_s!r}")
    return float(timeout_s)


def _bearer(token: Optional[str]) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []
