"""The ingress replica's own gRPC server (ServeConfig.replica_grpc).

Every ingress replica runs a `grpc.aio` server of its own on grpc_port, in its own
event loop, whose handlers are the ingress's methods: the same code, checks, status
codes and metrics as behind Serve's proxy, which keeps serving on its own port. The
replicas of a node share the port (SO_REUSEPORT). Serve does not see these calls, so
its autoscaler cannot follow them (ServeConfig refuses max_replicas with replica_grpc).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import Any, Optional

import grpc
from grpc_reflection.v1alpha import reflection

from services.core.errors import ConfigError
from services.protocol import admin_pb, pb
from services.serving.servicers import (
    add_admin_servicer,
    add_health_servicer,
    add_inference_servicer,
)
from services.serving.status_codes import internal_error

logger = logging.getLogger("ray.serve")

STOP_GRACE_S = 10.0
"""On shutdown, calls in flight get this long to finish; new calls are refused."""


def _streaming(fn):
    """A streaming ingress method for grpc.aio. The ingress ends a failed stream the way
    Serve wants, by setting the status and then raising; grpc.aio keeps that status but
    logs every such raise as an unexpected error with its traceback, so the stream ends
    quietly here once a status is set. Anything else answers INTERNAL with an error id."""

    @functools.wraps(fn)
    async def handler(request, context):
        try:
            async for item in fn(request, context):
                yield item
        except Exception as exc:
            if context.code() not in (None, grpc.StatusCode.OK):
                return
            code, message = internal_error(exc)
            context.set_code(code)
            context.set_details(message)

    return handler


class _Servicer:
    """The ingress's gRPC methods as grpc.aio handlers; methods the ingress does not
    have (e.g. a newer grpc.health.v1 method) stay unregistered: UNIMPLEMENTED."""

    def __init__(self, ingress: Any):
        self._ingress = ingress

    def __getattr__(self, name: str):
        fn = getattr(self._ingress, name) if name[:1].isupper() else None
        if fn is None:
            raise AttributeError(name)
        return _streaming(fn) if inspect.isasyncgenfunction(fn) else fn


class ReplicaGrpcServer:
    """A grpc.aio server answering the ingress's services on host:port, bound at
    construction (a port that cannot be bound fails the replica with a clear error)."""

    def __init__(self, ingress: Any, host: str, port: int, max_receive_bytes: int):
        self.address = f"{host}:{port}"
        self.server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", -1),
        ])
        servicer = _Servicer(ingress)
        for add in (add_inference_servicer, add_admin_servicer, add_health_servicer):
            add(servicer, self.server)
        reflection.enable_server_reflection(
            [pb.DESCRIPTOR.services_by_name["Inference"].full_name,
             admin_pb.DESCRIPTOR.services_by_name["Admin"].full_name,
             "grpc.health.v1.Health", reflection.SERVICE_NAME], self.server)
        try:
            bound = self.server.add_insecure_port(self.address)
        except RuntimeError as exc:
            bound, cause = 0, exc
        else:
            cause = None
        if not bound:
            raise ConfigError(
                f"invalid serve setting 'grpc_port': the ingress replica cannot listen on "
                f"{self.address} (another program holds the port?)") from cause
        self._started: Optional[asyncio.Task] = None

    def start(self) -> None:
        """Start serving from the running event loop (the replica's user-code loop)."""
        self._started = asyncio.get_running_loop().create_task(self.server.start())
        logger.info("ingress replica serving gRPC on %s", self.address)

    def check(self) -> None:
        """Raise if the server failed to start (Serve's health check then replaces the
        replica)."""
        if self._started is not None and self._started.done() and \
                not self._started.cancelled() and self._started.exception() is not None:
            raise RuntimeError(f"the replica's gRPC server on {self.address} failed to "
                               f"start: {self._started.exception()}")

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        if self._started is not None:
            try:
                await self._started
            except Exception:  # noqa: BLE001 - a failed start: check() reports it
                pass
        await self.server.stop(grace_s)
