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

Other languages: generate stubs from protos/tuneserve/v1/inference.proto, or explore
with grpcurl (server reflection is on): `grpcurl -plaintext localhost:9000 list`.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import grpc
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.auth import ADMIN_TOKEN_ENV, API_TOKEN_ENV, read_token
from services.core.errors import InvalidInput
from services.protocol import INFERENCE_SERVICE, admin_pb, admin_pb_grpc, pb, pb_grpc

DEFAULT_TIMEOUT_S = 30.0


def token_from(token_file: Optional[str], env_name: str) -> Optional[str]:
    """A token from a file (whitespace stripped) if one is named, else from env_name."""
    return read_token(env_name, token_file)


class Client:
    def __init__(self, address: str, *, token: Optional[str] = None,
                 admin_token: Optional[str] = None, application: Optional[str] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, connections: int = 1,
                 tls: bool = False, tls_ca: Optional[str] = None,
                 tls_cert: Optional[str] = None, tls_key: Optional[str] = None):
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
        module docstring; the files are PEM."""
        if not isinstance(connections, int) or connections < 1:
            raise ValueError(f"connections must be an integer >= 1, got {connections!r}")
        check_address(address)
        self.address = address
        self.timeout_s = _deadline(timeout_s)
        credentials = channel_credentials(tls, tls_ca, tls_cert, tls_key)
        options = [("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.secure_channel(address, credentials, options=options)
                         if credentials else grpc.insecure_channel(address, options=options)
                         for _ in range(connections)]
        self.channel = self.channels[0]
        self._inference = [pb_grpc.InferenceStub(ch) for ch in self.channels]
        self._admin = [admin_pb_grpc.AdminStub(ch) for ch in self.channels]
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
    def admin(self) -> admin_pb_grpc.AdminStub:
        return self._admin[next(self._turn) % len(self._admin)]

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def _timeout(self, timeout_s: Optional[float]) -> Optional[float]:
        return self.timeout_s if timeout_s is None else _deadline(timeout_s)

    def classify(self, model: str, texts: Sequence[str], version: str = "",
                 timeout_s: Optional[float] = None) -> pb.ClassifyResponse:
        req = build(pb.ClassifyRequest, model=model, texts=list(texts), version=version)
        return self.inference.Classify(req, timeout=self._timeout(timeout_s),
                                       metadata=self._metadata)

    def generate(self, model: str, prompt: str, **params) -> pb.GenerateResponse:
        timeout_s = self._timeout(params.pop("timeout_s", None))
        req = build(pb.GenerateRequest, model=model, prompt=prompt, **params)
        return self.inference.Generate(req, timeout=timeout_s, metadata=self._metadata)

    def generate_stream(self, model: str, prompt: str, **params) -> Iterator[pb.GenerateResponse]:
        timeout_s = self._timeout(params.pop("timeout_s", None))
        req = build(pb.GenerateRequest, model=model, prompt=prompt, **params)
        return self.inference.GenerateStream(req, timeout=timeout_s, metadata=self._metadata)

    def list_models(self, model: str = "") -> pb.ListModelsResponse:
        return self.inference.ListModels(build(pb.ListModelsRequest, model=model),
                                         timeout=self.timeout_s, metadata=self._metadata)

    # ---- Admin ----------------------------------------------------------------------
    def promote(self, model: str, version: str, channel: str = "") -> admin_pb.AdminResponse:
        return self.admin.Promote(build(admin_pb.PromoteRequest, model=model, version=version,
                                                          channel=channel),
                                  timeout=self.timeout_s, metadata=self._admin_metadata)

    def rollback(self, model: str, channel: str = "") -> admin_pb.AdminResponse:
        return self.admin.Rollback(build(admin_pb.RollbackRequest, model=model, channel=channel),
                                   timeout=self.timeout_s, metadata=self._admin_metadata)

    def pin(self, model: str, version: str) -> admin_pb.AdminResponse:
        return self.admin.Pin(build(admin_pb.PinRequest, model=model, version=version),
                              timeout=self.timeout_s, metadata=self._admin_metadata)

    def unpin(self, model: str) -> admin_pb.AdminResponse:
        return self.admin.Unpin(build(admin_pb.UnpinRequest, model=model),
                                timeout=self.timeout_s, metadata=self._admin_metadata)

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
