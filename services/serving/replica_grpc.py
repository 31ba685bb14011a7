"""The ingress replica's own gRPC servers: inference (ServeConfig.replica_grpc), the
Admin service (ServeConfig.admin_port) and health alone (ServeConfig.health_port).

Every ingress replica runs a `grpc.aio` server of its own on grpc_port, in its own
event loop, whose handlers are the ingress's methods: the same code, checks, status
codes and metrics as behind Serve's proxy, which keeps serving on its own port. The
replicas of a node share the port (SO_REUSEPORT). Serve does not see these calls: its
autoscaler follows the ingress's calls to the model deployments instead, and with
colocate the calls each server is answering (InFlight), which the ingress reports to
Serve (services/serving/autoscale.py).

With ServeConfig's TLS files the port is TLS (mutual TLS with a client CA), and the
files are re-read when they change (CertificateFiles), so a renewed Secret reaches new
connections without a restart.

The Admin service is served only by an admin server (`plane="admin"`, on admin_port),
which serves nothing else: its calls reach the ingress with an AdminContext, and the
ingress refuses Admin calls that come any other way (UNIMPLEMENTED).

A health server (`plane="health"`, on health_port) answers grpc.health.v1 alone, in
plaintext, for Kubernetes' gRPC probes (which cannot speak TLS): a probe of it asks the
pod's own ingress replica, whatever the inference port's TLS.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional

import grpc
from grpc_reflection.v1alpha import reflection

from services.core.config import ServeConfig, check_tls_files
from services.core.errors import ConfigError
from services.protocol import ADMIN_SERVICE, INFERENCE_SERVICE
from services.serving.servicers import (
    add_admin_servicer,
    add_health_servicer,
    add_inference_servicer,
)
from services.serving.status_codes import internal_error

logger = logging.getLogger("ray.serve")

STOP_GRACE_S = 10.0
"""On shutdown, calls in flight get this long to finish; new calls are refused."""
KEEPALIVE_S = 60.0
"""The server pings a connection quiet for this long, and closes it when the ping gets
no answer within KEEPALIVE_TIMEOUT_S: a vanished client frees its connection."""
KEEPALIVE_TIMEOUT_S = 20.0
MIN_CLIENT_PING_INTERVAL_S = 10.0
"""A client pinging more often than this without calls is sent GOAWAY after
MAX_PING_STRIKES such pings (grpc's keepalive enforcement)."""
MAX_PING_STRIKES = 2


def server_options(max_receive_bytes: int,
                   max_connections: int = ServeConfig.max_connections,
                   max_streams_per_connection: int = 100, connection_idle_s: float = 300.0,
                   connection_max_age_s: float = 3600.0, grace_s: float = 120.0,
                   **_unused) -> list[tuple[str, Any]]:
    """grpc channel arguments of a tuneserve server: a message over max_receive_bytes is
    refused from its length prefix, before it is read; connections and the streams
    of each are bounded; an idle, silent, ping-flooding or very old connection is
    closed (ServeConfig.bounds)."""
    return [
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.max_concurrent_streams", max_streams_per_connection),
        ("grpc.max_connection_idle_ms", int(connection_idle_s * 1000)),
        ("grpc.max_connection_age_ms", int(connection_max_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(grace_s * 1000)),
        ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.min_ping_interval_without_data_ms",
         int(MIN_CLIENT_PING_INTERVAL_S * 1000)),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]


FILES_BESIDE_CONNECTIONS = 1024
"""Open files a replica needs beside its connections (models, logs, Ray's sockets)."""


def allow_open_files(max_connections: int) -> None:
    """Raise this process's soft limit on open files so that `max_connections`
    connections fit beside FILES_BESIDE_CONNECTIONS others (each connection is a file
    descriptor; past the limit grpc cannot accept one). Up to the hard limit; below
    it, a warning names the setting to lower."""
    import resource

    needed = max_connections + FILES_BESIDE_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            logger.warning("this process may open %d files (hard limit), fewer than "
                           "max_connections=%d connections need: lower max_connections "
                           "or raise the limit (ulimit -n)", target, max_connections)


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


class AdminContext:
    """A grpc.aio context of a call that came in on the admin port: the ingress serves
    Admin methods only to calls with one (`admin_plane`)."""

    admin_plane = True

    def __init__(self, context: Any):
        self._context = context

    def __getattr__(self, name: str):
        return getattr(self._context, name)


def _on_admin_plane(fn):
    @functools.wraps(fn)
    async def handler(request, context):
        return await fn(request, AdminContext(context))

    return handler


HEALTH_METHODS = frozenset({"Check", "Watch"})
"""Not load: a health Watch stream stays open for as long as its client wants."""


class InFlight:
    """The calls a server is answering now (health excepted): the load Serve's
    autoscaler cannot see on these servers (services/serving/autoscale.py)."""

    def __init__(self):
        self.calls = 0

    def unary(self, fn):
        @functools.wraps(fn)
        async def handler(request, context):
            self.calls += 1
            try:
                return await fn(request, context)
            finally:
                self.calls -= 1

        return handler

    def streaming(self, fn):
        @functools.wraps(fn)
        async def handler(request, context):
            self.calls += 1
            try:
                async for item in fn(request, context):
                    yield item
            finally:
                self.calls -= 1

        return handler


class _Servicer:
    """The ingress's gRPC methods as grpc.aio handlers; methods the ingress does not
    have (e.g. a newer grpc.health.v1 method) stay unregistered: UNIMPLEMENTED. On the
    admin server (`admin`), each call's context is an AdminContext. Calls other than
    health are counted in `in_flight` while they run."""

    def __init__(self, ingress: Any, admin: bool = False, in_flight: Optional[InFlight] = None):
        self._ingress = ingress
        self._admin = admin
        self._in_flight = in_flight

    def __getattr__(self, name: str):
        fn = getattr(self._ingress, name) if name[:1].isupper() else None
        if fn is None:
            raise AttributeError(name)
        if self._admin:
            return _on_admin_plane(fn)
        streaming = inspect.isasyncgenfunction(fn)
        handler = _streaming(fn) if streaming else fn
        if self._in_flight is None or name in HEALTH_METHODS:
            return handler
        return self._in_flight.streaming(handler) if streaming else \
            self._in_flight.unary(handler)


class CertificateFiles:
    """A server's TLS files (PEM certificate chain, key, optional client CA), checked
    and read at once; `fetch` is grpc's certificate configuration fetcher, called for
    each new connection: when a file changed (a renewed k8s Secret swaps them all at
    once), they are read again and new connections get the new certificate, while open
    connections keep theirs. Files that do not load (half written) are skipped, with a
    warning, until they do."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: Optional[str] = None):
        self.files = (cert_file, key_file, client_ca_file)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._refused: Optional[tuple] = None
        self.initial = self._load()

    def _stat(self) -> tuple:
        stamps = []
        for path in self.files:
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            stamps.append(st and (st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def _load(self):
        cert, key, client_ca = self.files
        check_tls_files(cert, key, client_ca)
        return grpc.ssl_server_certificate_configuration(
            [(Path(key).read_bytes(), Path(cert).read_bytes())],
            root_certificates=Path(client_ca).read_bytes() if client_ca else None)

    def fetch(self):
        """The new configuration if a file changed since the last one, else None (grpc
        keeps the current one). Never raises: grpc would refuse the connection."""
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            try:
                config = self._load()
            except Exception as exc:  # noqa: BLE001 - keep serving the current files
                if stamp != self._refused:
                    self._refused = stamp
                    logger.warning("TLS files changed but do not load, serving the "
                                   "previous ones: %s", exc)
                return None
            if self._stat() != stamp:  # changed while being read: the next connection
                return None
            self._stamp = stamp
            logger.info("TLS files changed: new connections get the new certificate")
            return config

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that follow the files; with a client CA, mutual TLS (a
        client must present a certificate it signed)."""
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=bool(self.files[2]))


HEALTH_SERVICE = "grpc.health.v1.Health"
PLANES = {"inference": ((add_inference_servicer, add_health_servicer),
                        (INFERENCE_SERVICE, HEALTH_SERVICE)),
          "admin": ((add_admin_servicer,), (ADMIN_SERVICE,)),
          "health": ((add_health_servicer,), (HEALTH_SERVICE,))}
"""What each kind of server registers, and names in its reflection."""
PORT_SETTINGS = {"inference": "grpc_port", "admin": "admin_port", "health": "health_port"}
"""The ServeConfig field of each kind of server's port, named in its errors."""


class ReplicaGrpcServer:
    """A grpc.aio server answering the ingress's services on host:port, bound at
    construction (a port that cannot be bound fails the replica with a clear error):
    the services of its `plane` (PLANES): "inference" (Inference and Health), "admin"
    (the Admin service alone) or "health" (Health alone). `tls`: {cert_file, key_file,
    client_ca_file} (ServeConfig.replica_grpc_server), or None for plaintext.
    `bounds`: ServeConfig.bounds (connections, calls, streams, ages); default: its
    defaults."""

    def __init__(self, ingress: Any, host: str, port: int, max_receive_bytes: int,
                 tls: Optional[dict[str, Optional[str]]] = None, plane: str = "inference",
                 bounds: Optional[dict[str, Any]] = None):
        self.address = f"{host}:{port}"
        self.tls = tls
        self.plane = plane
        self.admin = plane == "admin"
        bounds = dict(bounds or {})
        allow_open_files(bounds.get("max_connections", ServeConfig.max_connections))
        self.server = grpc.aio.server(
            options=server_options(max_receive_bytes, **bounds),
            maximum_concurrent_rpcs=bounds.get("max_concurrent_rpcs", 1000))
        self.in_flight = InFlight()
        servicer = _Servicer(ingress, self.admin, self.in_flight)
        adders, names = PLANES[plane]
        for add in adders:
            add(servicer, self.server)
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        try:
            bound = self.server.add_secure_port(
                self.address, CertificateFiles(**tls).credentials()) if tls else \
                self.server.add_insecure_port(self.address)
        except RuntimeError as exc:
            bound, cause = 0, exc
        else:
            cause = None
        if not bound:
            raise ConfigError(
                f"invalid serve setting '{PORT_SETTINGS[plane]}': the "
                f"ingress replica cannot listen on {self.address} (another program holds "
                "the port?)") from cause
        self._started: Optional[asyncio.Task] = None

    def start(self) -> None:
        """Start serving from the running event loop (the replica's user-code loop)."""
        self._started = asyncio.get_running_loop().create_task(self.server.start())
        logger.info("ingress replica serving %s on %s%s",
                    {"admin": "the Admin service", "health": "gRPC health"}.get(
                        self.plane, "gRPC"), self.address,
                    "" if not self.tls else " with mutual TLS"
                    if self.tls.get("client_ca_file") else " with TLS")

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
