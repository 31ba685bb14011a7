"""The gRPC ingress deployment: turns protos into calls on model deployments.

Ray Serve's gRPC proxy routes `/tuneserve.v1.Inference/<Method>` and
`/grpc.health.v1.Health/<Method>` to the methods of the same name here; Admin methods
answer only calls from the replica's admin server (ServeConfig.admin_port), any other
UNIMPLEMENTED. Every Inference and Admin call passes, in order: authorization
(UNAUTHENTICATED / PERMISSION_DENIED), a request the proxy could parse
(INVALID_ARGUMENT), its size (RESOURCE_EXHAUSTED), then the method. Domain errors answer
their status code with its details (a retry hint, the invalid field:
services/serving/status_codes.py); anything else INTERNAL with an error id. Health
stays open. No torch import here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any, Optional

import grpc
from grpc_health.v1 import health_pb2

from services.core import metrics
from services.core.auth import ADMIN, INFERENCE, Authenticator, Tokens
from services.core.config import CLASSIFICATION, GENERATION, ServeLimits
from services.core.errors import (
    DeadlineExceeded,
    ModelLoading,
    ModelNotFound,
    NotImplementedYet,
    Overloaded,
    TuneserveError,
    WrongTask,
)
from services.core.registry import Registry
from services.protocol import INFERENCE_SERVICE, admin_pb, pb
from services.serving import serve_logs
from services.serving.admin import AdminMethods
from services.serving.batching import Coalescer
from services.serving.replica_grpc import ReplicaGrpcServer
from services.serving.serve_logs import StreamEnded
from services.serving.status import model_states
from services.serving.status_codes import queue_full, set_status
from services.serving.validation import (
    UndecodableRequest,
    check_decoded,
    check_model_field,
    check_request_size,
    validate_classify,
    validate_generate,
)
from services.serving.waiting import wait_event, wait_within

logger = logging.getLogger("ray.serve")

HEALTH_CACHE_S = 1.0
STATUS_TIMEOUT_S = 5.0
REPLICA_CALL_ATTEMPTS = 2
"""Tries of a call to a model deployment when its replica dies during one: Classify,
Generate, and a GenerateStream that has sent nothing yet."""
METHOD_SCOPES = {"Classify": INFERENCE, "Generate": INFERENCE, "GenerateStream": INFERENCE,
                 "ListModels": INFERENCE, "Promote": ADMIN, "Rollback": ADMIN, "Pin": ADMIN,
                 "Unpin": ADMIN, "StartCanary": ADMIN, "SetCanaryShare": ADMIN,
                 "PromoteCanary": ADMIN, "AbortCanary": ADMIN}
ADMIN_ELSEWHERE = ("the Admin service is not served on this port: call it on the "
                   "server's admin port (tuneserve serve --admin-port)")


def _ray_actor_error() -> type[Exception]:
    """Ray's RayActorError (a model replica died during a call), imported on first use:
    this module's one import of Ray, so that importing the module loads none."""
    from ray.exceptions import RayActorError

    return RayActorError


def _replica_died(model: str, method: str) -> None:
    logger.warning("a %s replica died during a %s call; sending it again", model, method)
    metrics.inc("tuneserve_replica_retries_total", model=model)


async def _stop_all(servers: list[ReplicaGrpcServer]) -> None:
    await asyncio.gather(*(server.stop() for server in servers))


def _generate_response(answer: dict[str, Any], model: str):
    return pb.GenerateResponse(
        text=answer["text"], prompt_tokens=answer["prompt_tokens"],
        completion_tokens=answer["completion_tokens"],
        finish_reason=answer["finish_reason"] or "", model=model, version=answer["version"])


def _or_none(read, *args):
    """A registry read, or None when what it reads is unreadable (logged)."""
    try:
        return read(*args)
    except TuneserveError as exc:
        logger.warning("ListModels: %s", exc.message)
        return None


def _answered_version(response) -> Optional[str]:
    """The version an inference response says answered it (None for other methods)."""
    if isinstance(response, (pb.ClassifyResponse, pb.GenerateResponse)):
        return response.version or None
    return None


def _replica_status(r: dict[str, Any]):
    """ListModels' entry for one replica, from the status it reported."""
    canary = r.get("canary")
    return pb.ReplicaStatus(
        replica=str(r.get("replica") or ""), version=r.get("version") or "",
        state=r.get("state") or "", refused=r.get("refused") or {},
        dtype=r.get("dtype") or "", batching=r.get("batching") or "",
        torchscript=bool(r.get("torchscript")),
        canary_version=canary["version"] if isinstance(canary, dict) and canary.get("loaded")
        else "")


def _peer(grpc_context) -> str:
    """The connection a call came on ("ipv4:10.0.0.7:53124"), as the server (or Serve's
    proxy, which passes it on) saw it; "" where there is none."""
    try:
        peer = grpc_context.peer()
    except Exception:  # Serve's proxy context, or none
        return ""
    return peer if isinstance(peer, str) else ""


def _cancelled_code(grpc_context) -> str:
    """The code a call cancelled under us is counted with: DEADLINE_EXCEEDED when its
    deadline has passed (seen where the replica terminates gRPC itself), else
    CANCELLED (the client went away, or Serve's proxy cancelled the call, which it
    does for a deadline too)."""
    try:
        remaining = grpc_context.time_remaining()
    except Exception:  # Serve's proxy context has no deadline to read
        return "CANCELLED"
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


def rpc(response_type):
    """Wrap a unary method: domain errors become status codes, never tracebacks."""

    def decorate(fn):
        @functools.wraps(fn)
        async def wrapper(self, request, grpc_context=None):
            started = time.perf_counter()
            code_name, answered = "OK", None
            try:
                self._admit(fn.__name__, request, grpc_context)
                async with self._default_deadline(grpc_context):
                    response = await fn(self, request, grpc_context)
                answered = _answered_version(response)
                return response
            except asyncio.CancelledError:
                code_name = _cancelled_code(grpc_context)
                raise
            except Exception as exc:
                answer = set_status(grpc_context, exc, self._metric_model(request))
                code_name = answer.code.name
                return response_type()
            finally:
                self._record(fn.__name__, code_name, request, started, answered)

        return wrapper

    return decorate


class InferenceIngress(AdminMethods):
    """Serve deployment class; `app.py` wraps it with `serve.deployment`."""

    def __init__(self, registry: str, models: dict[str, Any], tasks: dict[str, str],
                 limits: Optional[dict] = None, board: Any = None,
                 auth: Optional[dict] = None, coalesce: Optional[dict] = None,
                 grpc_server: Optional[dict] = None, admin_server: Optional[dict] = None,
                 health_server: Optional[dict] = None):
        self.registry = Registry(registry)
        self.handles = models  # model name -> DeploymentHandle of its model deployment
        # Classifier model name -> Coalescer: concurrent Classify calls share one call
        # to the model deployment (services/serving/batching.py). `coalesce` holds the
        # Coalescer's limits per model; a model without them gets one call per request.
        self.coalescers = {
            name: Coalescer(functools.partial(self._classify_many, name),
                            on_full=queue_full, **settings,
                            on_call=functools.partial(self._observe_call, name))
            for name, settings in (coalesce or {}).items() if name in models}
        self.tasks = tasks
        self.limits = ServeLimits(**(limits or {}))
        self.board = board  # DeploymentHandle of the StatusBoard
        serve_logs.install()
        # Token digests (services/core/auth.py), never the tokens themselves; token
        # files are re-read here when they change (rotation without a restart).
        tokens = Tokens.from_dict(auth)
        self.auth = Authenticator(tokens, log=logger)
        if tokens.open_warning():
            logger.warning(tokens.open_warning())
        # model -> the versions that have answered here: the only values the `version`
        # label of a failed call may take (a client naming v999 adds no series).
        self._answered: dict[str, set[str]] = {}
        # Models seen with a loaded version once; until then a call is answered
        # UNAVAILABLE "loading" at once (see _check_loaded).
        self._seen_loaded: set[str] = set()
        # The status board as last read, for health and the "loading" gate alike: read
        # at most every HEALTH_CACHE_S (_cached_board).
        self._board_read: tuple[float, Optional[dict]] = (-HEALTH_CACHE_S, None)
        # ServeConfig.replica_grpc: {host, port, max_receive_bytes} of a gRPC server of
        # this replica's own (services/serving/replica_grpc.py), started on the running
        # loop: Serve builds the replica from its user-code event loop.
        self._grpc_server = None
        self._grpc_server_args = grpc_server
        # ServeConfig.admin_port: {host, port, max_receive_bytes, tls} of the Admin
        # service's server in this replica; without one no call reaches Admin methods.
        self._admin_server = None
        self._admin_server_args = admin_server
        # ServeConfig.health_port: {host, port, max_receive_bytes} of a plaintext
        # server answering grpc.health.v1 alone (Kubernetes' probes of this replica).
        self._health_server = None
        self._health_server_args = health_server
        # Open health Watch streams by connection (the call's peer; "" where none is
        # known): bounded (ServeLimits.max_watch_streams...), and ended when the
        # replica stops (_closing).
        self._watches: dict[str, int] = {}
        self._closing = asyncio.Event()
        if self.LISTEN_AT_INIT:
            self._listen()

    LISTEN_AT_INIT = True
    """Whether the replica's own gRPC server (if any) listens from the start; a replica
    whose models load first listens once they have (ColocatedIngress)."""

    def _listen(self) -> None:
        """Bind and start the replica's own gRPC servers, once (no-op without them).
        Until the inference one binds, the kernel gives the shared port's new
        connections to the other replicas of the node."""
        if self._grpc_server_args and self._grpc_server is None:
            self._grpc_server = ReplicaGrpcServer(self, **self._grpc_server_args)
            self._grpc_server.start()
        if self._admin_server_args and self._admin_server is None:
            self._admin_server = ReplicaGrpcServer(self, **self._admin_server_args,
                                                   plane="admin")
            self._admin_server.start()
        if self._health_server_args and self._health_server is None:
            self._health_server = ReplicaGrpcServer(self, **self._health_server_args,
                                                    plane="health")
            self._health_server.start()

    def _own_servers(self) -> list[Any]:
        return [s for s in (getattr(self, "_grpc_server", None),
                            getattr(self, "_admin_server", None),
                            getattr(self, "_health_server", None)) if s is not None]

    async def check_health(self) -> None:
        """Serve's periodic health check: the replica's own gRPC servers, if any, run."""
        for server in self._own_servers():
            server.check()

    def __del__(self):
        """Serve calls this when it stops the replica, and awaits what it returns: the
        replica's own gRPC servers, if any, refuse new calls and let those in flight
        finish (replica_grpc.STOP_GRACE_S)."""
        closing = getattr(self, "_closing", None)
        if closing is not None:
            closing.set()  # Watch streams end now, not at the end of the grace period
        servers = self._own_servers()
        self._grpc_server = self._admin_server = self._health_server = None
        return _stop_all(servers) if servers else None

    # ---- helpers ---------------------------------------------------------------
    def _admit(self, method: str, request, grpc_context) -> None:
        """What every Inference and Admin call passes before its method runs: the
        token, a request the proxy could parse, the size limit."""
        scope = METHOD_SCOPES[method]
        if scope == ADMIN and not getattr(grpc_context, "admin_plane", False):
            raise NotImplementedYet(ADMIN_ELSEWHERE)
        metadata = grpc_context.invocation_metadata() if grpc_context is not None else ()
        self.auth.check(metadata, scope)
        check_decoded(request)
        check_request_size(request, self.limits)

    @contextlib.asynccontextmanager
    async def _default_deadline(self, grpc_context):
        """A call that carries no deadline gets ServeLimits.request_timeout_s: past it,
        DEADLINE_EXCEEDED (a call with a deadline of its own ends with it, as before)."""
        try:
            remaining = grpc_context.time_remaining()
        except Exception:  # Serve's proxy context has none to read
            remaining = None
        if remaining is not None:
            yield
            return
        limit = self.limits.request_timeout_s
        try:
            async with asyncio.timeout(limit):
                yield
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within {limit} s, this server's deadline "
                                   "for calls that set none; set a deadline of your "
                                   "own, or retry") from None

    def _metric_model(self, request) -> str:
        """The model label: a served model's name, else "-" (labels stay bounded)."""
        name = getattr(request, "model", "")
        return name if name in self.handles else metrics.UNKNOWN

    def _metric_version(self, model: str, request, answered: Optional[str]) -> str:
        """The version label: the one that answered; for a call none answered, the
        version it named if that version has answered here before; else "-"."""
        if model == metrics.UNKNOWN:
            return metrics.UNKNOWN
        seen = self._answered.setdefault(model, set())
        if answered:
            seen.add(answered)
            return answered
        named = getattr(request, "version", "")
        return named if named in seen else metrics.UNKNOWN

    def _record(self, method: str, code: str, request, started: float,
                answered: Optional[str] = None) -> None:
        model = self._metric_model(request)
        version = self._metric_version(model, request, answered)
        metrics.inc("tuneserve_requests_total", method=method, code=code, model=model,
                    version=version)
        metrics.observe("tuneserve_request_duration_seconds", time.perf_counter() - started,
                        method=method, model=model, version=version)

    def _handle(self, model: str, task: str):
        handle = self.handles.get(model)
        if handle is None:
            if self.registry.exists(model):
                raise ModelNotFound(f"model '{model}' is in the registry but not served by "
                                    "this server; restart serve to pick it up")
            raise ModelNotFound(f"model '{model}' not found; ListModels shows the models "
                                "served here")
        actual = self.tasks.get(model)
        if actual != task:
            method = "Classify" if actual == CLASSIFICATION else "Generate"
            raise WrongTask(f"model '{model}' is a {actual} model; use {method}")
        return handle

    async def _check_loaded(self, model: str) -> None:
        """Until `model` first has a loaded version somewhere, fail fast with UNAVAILABLE
        'loading' (docs/api.md) instead of waiting in Serve's queue for replicas that
        are still starting, which ends in DEADLINE_EXCEEDED for a short deadline. Once
        seen loaded, never again asked: later trouble (a replica lost, a load refused)
        answers as before. Without a readable board, calls go through as before."""
        if model in self._seen_loaded or self.board is None:
            return
        board = await self._cached_board()
        if board is None:
            return
        for name, replicas in board.items():
            if any(r.get("version") for r in replicas):
                self._seen_loaded.add(name)
        if model not in self._seen_loaded:
            raise ModelLoading(f"model '{model}' is loading")

    async def _read_board(self) -> Optional[dict[str, list[dict]]]:
        """The status board's model -> replica statuses; None when it cannot be read."""
        try:
            return await wait_within(self.board.get.remote(), STATUS_TIMEOUT_S)
        except Exception:
            logger.warning("status board unavailable", exc_info=True)
            return None

    async def _cached_board(self) -> Optional[dict[str, list[dict]]]:
        """The status board as read at most HEALTH_CACHE_S ago (None: unreadable)."""
        read_at, board = self._board_read
        if time.monotonic() - read_at >= HEALTH_CACHE_S:
            board = await self._read_board()
            self._board_read = (time.monotonic(), board)
        return board

    async def _statuses(self) -> dict[str, list[dict]]:
        """model name -> the live replicas' statuses (from the status board)."""
        board = await self._read_board() or {}
        return {name: board.get(name, []) for name in self.handles}

    @staticmethod
    def _observe_call(model: str, size: int) -> None:
        metrics.observe("tuneserve_coalesced_requests", size, model=model)

    async def _coalescing(self) -> dict[str, dict[str, int]]:
        """model -> calls sent to it and the Classify requests they carried."""
        return {name: {"calls": c.calls_sent, "requests": c.requests_sent}
                for name, c in self.coalescers.items()}

    async def _classify_many(self, model: str, calls: list[tuple]):
        return await self._again_if_replica_dies(
            model, lambda: self.handles[model].classify_many.remote(calls))

    async def _again_if_replica_dies(self, model: str, call, method: str = "Classify"):
        """Await `call()`, and once more if the replica died during it. Inference has no
        side effects (a seeded generation gives the same text again), and a coalesced
        Classify call carries many callers' requests, all of which would fail with one
        dead replica. Serve's router sends the second call to a live replica (or waits
        for the replacement). Only one more: a request that kills replicas itself must
        not take them all down."""
        replica_died = _ray_actor_error()
        for attempt in range(1, REPLICA_CALL_ATTEMPTS + 1):
            try:
                return await call()
            except replica_died:
                if attempt == REPLICA_CALL_ATTEMPTS:
                    raise
                _replica_died(model, method)

    @staticmethod
    def _serving_now(statuses: dict[str, list[dict]]) -> bool:
        """Every served model has a replica answering with a version, but for models
        with nothing they can load (every version refused, or none promoted), which do
        not keep the others from serving; and one model at least is served."""
        loaded, _, pending = model_states(statuses)
        return bool(loaded) and not pending

    # ---- tuneserve.v1.Inference ---------------------------------------------------
    @rpc(pb.ClassifyResponse)
    async def Classify(self, request, grpc_context=None):
        call = validate_classify(request, self.limits)
        handle = self._handle(call.model, CLASSIFICATION)
        await self._check_loaded(call.model)
        coalescer = self.coalescers.get(call.model)
        if coalescer is not None:
            answer = await coalescer.submit((call.texts, call.version, call.routing_key))
        else:
            answer = await self._again_if_replica_dies(
                call.model, lambda: handle.classify.remote(call.texts, call.version,
                                                           call.routing_key))
        results = [
            pb.Classification(
                label=r["label"], score=r["score"],
                scores=[pb.LabelScore(label=lab, score=s) for lab, s in r["scores"]],
            )
            for r in answer["results"]
        ]
        return pb.ClassifyResponse(results=results, model=call.model, version=answer["version"])

    @rpc(pb.GenerateResponse)
    async def Generate(self, request, grpc_context=None):
        call = validate_generate(request, self.limits)
        handle = self._handle(call.model, GENERATION)
        await self._check_loaded(call.model)
        # If this call is cancelled (client gone, deadline), Serve cancels the model
        # call too, and the generator stops at the next token.
        answer = await self._again_if_replica_dies(
            call.model, lambda: handle.generate.remote(call.prompt, call.params, call.version,
                                                       call.routing_key),
            "Generate")
        return _generate_response(answer, call.model)

    async def GenerateStream(self, request, grpc_context=None):
        replica_died = _ray_actor_error()
        stream = None
        finished = False
        started = time.perf_counter()
        code_name, answered = "CANCELLED", None
        try:
            self._admit("GenerateStream", request, grpc_context)
            call = validate_generate(request, self.limits)
            handle = self._handle(call.model, GENERATION)
            await self._check_loaded(call.model)
            for attempt in range(1, REPLICA_CALL_ATTEMPTS + 1):
                stream = handle.options(stream=True).generate_stream.remote(
                    call.prompt, call.params, call.version, call.routing_key)
                sent = False
                try:
                    async for chunk in stream:
                        sent, answered = True, chunk["version"]
                        yield _generate_response(chunk, call.model)
                    break
                except replica_died:
                    # Sent again only while the client has seen nothing of it.
                    if sent or attempt == REPLICA_CALL_ATTEMPTS:
                        raise
                    _replica_died(call.model, "GenerateStream")
            finished = True
            code_name = "OK"
        except Exception as exc:
            answer = set_status(grpc_context, exc, self._metric_model(request))
            code_name = answer.code.name
            # Raising after setting the code is how a streaming method ends with a
            # status in Serve; the proxy keeps our code and message (and, for a
            # caller's mistake, logs one line: services/serving/serve_logs.py).
            raise StreamEnded(answer.code, answer.message) from None
        finally:
            if code_name == "CANCELLED":  # closed or cancelled under us
                code_name = _cancelled_code(grpc_context)
            self._record("GenerateStream", code_name, request, started, answered)
            if stream is not None and not finished:
                # Client gone or deadline passed: stop the generation (Serve also
                # cancels child calls of a cancelled request; this is explicit).
                try:
                    stream.cancel()
                except Exception:
                    logger.debug("cancelling the generation stream failed", exc_info=True)

    @rpc(pb.ListModelsResponse)
    async def ListModels(self, request, grpc_context=None):
        names = sorted(self.handles)
        if request.model:
            check_model_field(request.model, self.limits)
            if request.model not in self.handles:
                raise ModelNotFound(f"model '{request.model}' not found")
            names = [request.model]
        statuses = await self._statuses()
        infos = []
        for name in names:
            # A pointer or manifest that cannot be read hides what it says, not the
            # rest of the model: the replicas' states matter most when something broke.
            channels = await asyncio.to_thread(_or_none, self.registry.channels_of, name) \
                or {}
            versions = []
            for version in await asyncio.to_thread(self.registry.versions, name):
                try:
                    manifest = await asyncio.to_thread(self.registry.manifest, name, version)
                except TuneserveError:
                    continue
                listed = manifest.get("metrics")
                metrics = {str(k): float(v) for k, v in
                           (listed.items() if isinstance(listed, dict) else ())
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
                versions.append(pb.VersionInfo(
                    version=version, created_at=str(manifest.get("created_at", "")),
                    metrics=metrics,
                    channels=[c for c, v in channels.items() if v == version]))
            replicas = statuses.get(name, [])
            pinned = await asyncio.to_thread(_or_none, self.registry.pinned, name)
            pinned = next((r["pinned_version"] for r in replicas if r.get("pinned_version")),
                          pinned)
            labels = next((r["labels"] for r in replicas if r.get("labels")), [])
            canary = await asyncio.to_thread(_or_none, self.registry.canary, name) or {}
            infos.append(pb.ModelInfo(
                name=name, task=self.tasks.get(name, ""),
                production_version=channels.get("production", ""),
                pinned_version=pinned or "",
                serving_versions=sorted({r["version"] for r in replicas if r.get("version")},
                                        key=lambda v: int(v[1:])),
                versions=versions, labels=labels,
                replicas=[_replica_status(r) for r in replicas],
                canary_version=canary.get("version") or "",
                canary_percent=canary.get("percent") or 0.0))
        return pb.ListModelsResponse(models=infos)

    # ---- tuneserve.v1.Admin (services/serving/admin.py) ---------------------------
    @rpc(admin_pb.AdminResponse)
    async def Promote(self, request, grpc_context=None):
        return await self._promote(request)

    @rpc(admin_pb.AdminResponse)
    async def Rollback(self, request, grpc_context=None):
        return await self._rollback(request)

    @rpc(admin_pb.AdminResponse)
    async def Pin(self, request, grpc_context=None):
        return await self._pin(request)

    @rpc(admin_pb.AdminResponse)
    async def Unpin(self, request, grpc_context=None):
        return await self._unpin(request)

    @rpc(admin_pb.CanaryResponse)
    async def StartCanary(self, request, grpc_context=None):
        return await self._start_canary(request)

    @rpc(admin_pb.CanaryResponse)
    async def SetCanaryShare(self, request, grpc_context=None):
        return await self._set_canary_share(request)

    @rpc(admin_pb.CanaryResponse)
    async def PromoteCanary(self, request, grpc_context=None):
        return await self._end_canary(request, promote=True)

    @rpc(admin_pb.CanaryResponse)
    async def AbortCanary(self, request, grpc_context=None):
        return await self._end_canary(request, promote=False)

    # ---- grpc.health.v1.Health ---------------------------------------------------
    async def _serving(self) -> bool:
        board = await self._cached_board() or {}
        return self._serving_now({name: board.get(name, []) for name in self.handles})

    async def Check(self, request, grpc_context=None):
        """Open to every caller (Kubernetes' gRPC probe sends no token)."""
        if isinstance(request, UndecodableRequest):
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                grpc_context.set_details(f"request: not a valid {request.message_type} "
                                         "message")
            return health_pb2.HealthCheckResponse()
        if request.service not in ("", INFERENCE_SERVICE):
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details("unknown service: use '' or "
                                         f"'{INFERENCE_SERVICE}'")
            return health_pb2.HealthCheckResponse()
        serving = await self._serving()
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, grpc_context=None):
        """Streams the status whenever it changes (polled each second). As the health
        protocol says, an unknown service gets SERVICE_UNKNOWN once and the stream stays
        open (the services served here do not change while it runs). Open streams are
        bounded in all and per connection (RESOURCE_EXHAUSTED past either), and end
        when the replica stops."""
        if isinstance(request, UndecodableRequest):
            await self.Check(request, grpc_context)
            raise StreamEnded(grpc.StatusCode.INVALID_ARGUMENT,
                              grpc_context.details() if grpc_context is not None else
                              "request: not a valid message")
        peer = self._admit_watch(grpc_context)
        try:
            if request.service not in ("", INFERENCE_SERVICE):
                yield health_pb2.HealthCheckResponse(
                    status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                await self._closing.wait()
                return
            last = None
            while not self._closing.is_set():
                response = await self.Check(request, grpc_context)
                if response.status != last:
                    last = response.status
                    yield response
                await wait_event(self._closing, HEALTH_CACHE_S)
        finally:
            self._watches[peer] -= 1
            if not self._watches[peer]:
                del self._watches[peer]

    def _admit_watch(self, grpc_context) -> str:
        """Count a new Watch stream in, by connection; StreamEnded (RESOURCE_EXHAUSTED)
        past ServeLimits.max_watch_streams, or max_watch_streams_per_connection."""
        peer = _peer(grpc_context)
        if sum(self._watches.values()) >= self.limits.max_watch_streams:
            why = (f"too many health Watch streams open on this server "
                   f"({self.limits.max_watch_streams}); use Check, or retry later")
        elif peer and self._watches.get(peer, 0) >= \
                self.limits.max_watch_streams_per_connection:
            why = (f"too many health Watch streams on this connection "
                   f"({self.limits.max_watch_streams_per_connection})")
        else:
            self._watches[peer] = self._watches.get(peer, 0) + 1
            return peer
        metrics.inc("tuneserve_requests_total", method="Watch", code="RESOURCE_EXHAUSTED",
                    model=metrics.UNKNOWN, version=metrics.UNKNOWN)
        if grpc_context is not None:
            grpc_context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            grpc_context.set_details(why)
        raise StreamEnded(grpc.StatusCode.RESOURCE_EXHAUSTED, why)

__all__ = ["InferenceIngress", "ModelLoading", "Overloaded"]
