"""A small Python client for the tuneserve gRPC API.

    from services.client import Client
    with Client("localhost:9000") as c:
        resp = c.classify("sentiment", ["what a lovely film"])
        print(resp.results[0].label, resp.version)

Tokens: when the server requires them, the client sends `authorization: Bearer
<token>`: `token` (default: env TUNESERVE_API_TOKEN, else TUNESERVE_ADMIN_TOKEN) on
Inference calls, `admin_token` (default: env TUNESERVE_ADMIN_TOKEN, else `token`) on
Admin calls. Pass "" to send none. The channel is plaintext: put TLS in front (a mesh,
an ingress) before tokens cross a network you do not trust.

Other languages: generate stubs from protos/tuneserve/v1/inference.proto, or explore
with grpcurl (server reflection is on): `grpcurl -plaintext localhost:9000 list`.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator, Optional, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.protocol import INFERENCE_SERVICE, admin_pb, admin_pb_grpc, pb, pb_grpc
from services.serving.auth import ADMIN_TOKEN_ENV, API_TOKEN_ENV, read_token

DEFAULT_TIMEOUT_S = 30.0


def token_from(token_file: Optional[str], env_name: str) -> Optional[str]:
    """A token from a file (whitespace stripped) if one is named, else from env_name."""
    return read_token(env_name, token_file)


class Client:
    def __init__(self, address: str, *, token: Optional[str] = None,
                 admin_token: Optional[str] = None, application: Optional[str] = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, connections: int = 1):
        """`application`: the Serve application to reach, when the cluster runs more
        than one (sent as the `application` metadata Serve's gRPC proxy routes by).

        `connections`: TCP connections this client opens, taking calls in turn. Each
        Client has connections of its own (gRPC would otherwise share one among all
        channels to an address in a process). Behind Serve's proxy one is enough: the
        proxy spreads calls over replicas. Replicas that answer gRPC themselves
        (ServeConfig.replica_grpc) share a port and the kernel hands each connection to
        one of them, so a client reaches as many replicas as it has connections, at
        most (docs/kubernetes.md)."""
        if not isinstance(connections, int) or connections < 1:
            raise ValueError(f"connections must be an integer >= 1, got {connections!r}")
        self.address = address
        self.timeout_s = timeout_s
        self.channels = [grpc.insecure_channel(address,
                                               options=[("grpc.use_local_subchannel_pool", 1)])
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

    def classify(self, model: str, texts: Sequence[str], version: str = "",
                 timeout_s: Optional[float] = None) -> pb.ClassifyResponse:
        req = pb.ClassifyRequest(model=model, texts=list(texts), version=version)
        return self.inference.Classify(req, timeout=timeout_s or self.timeout_s,
                                       metadata=self._metadata)

    def generate(self, model: str, prompt: str, **params) -> pb.GenerateResponse:
        timeout_s = params.pop("timeout_s", None) or self.timeout_s
        req = pb.GenerateRequest(model=model, prompt=prompt, **params)
        return self.inference.Generate(req, timeout=timeout_s, metadata=self._metadata)

    def generate_stream(self, model: str, prompt: str, **params) -> Iterator[pb.GenerateResponse]:
        timeout_s = params.pop("timeout_s", None) or self.timeout_s
        req = pb.GenerateRequest(model=model, prompt=prompt, **params)
        return self.inference.GenerateStream(req, timeout=timeout_s, metadata=self._metadata)

    def list_models(self, model: str = "") -> pb.ListModelsResponse:
        return self.inference.ListModels(pb.ListModelsRequest(model=model),
                                         timeout=self.timeout_s, metadata=self._metadata)

    # ---- Admin ----------------------------------------------------------------------
    def promote(self, model: str, version: str, channel: str = "") -> admin_pb.AdminResponse:
        return self.admin.Promote(admin_pb.PromoteRequest(model=model, version=version,
                                                          channel=channel),
                                  timeout=self.timeout_s, metadata=self._admin_metadata)

    def rollback(self, model: str, channel: str = "") -> admin_pb.AdminResponse:
        return self.admin.Rollback(admin_pb.RollbackRequest(model=model, channel=channel),
                                   timeout=self.timeout_s, metadata=self._admin_metadata)

    def pin(self, model: str, version: str) -> admin_pb.AdminResponse:
        return self.admin.Pin(admin_pb.PinRequest(model=model, version=version),
                              timeout=self.timeout_s, metadata=self._admin_metadata)

    def unpin(self, model: str) -> admin_pb.AdminResponse:
        return self.admin.Unpin(admin_pb.UnpinRequest(model=model),
                                timeout=self.timeout_s, metadata=self._admin_metadata)

    def health(self, service: str = INFERENCE_SERVICE, timeout_s: float = 5.0) -> str:
        """'SERVING', 'NOT_SERVING', ... as a name (health needs no token)."""
        resp = self._health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                       timeout=timeout_s, metadata=self._health_metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_until_serving(self, timeout_s: float = 120.0, poll_s: float = 0.5) -> None:
        import time

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


def _bearer(token: Optional[str]) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def format_table(rows: Iterable[Sequence[str]], header: Sequence[str]) -> str:
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
