"""The gRPC ingress deployment: turns protos into calls on model deployments.

Ray Serve's gRPC proxy routes `/tuneserve.v1.Inference/<Method>` and
`/grpc.health.v1.Health/<Method>` to the methods of the same name here. This layer
validates requests, maps domain errors to status codes (one table: `grpc_code` on
each error class) and never imports torch. Unexpected failures answer INTERNAL with an
error id while the traceback goes to the replica log: no traceback, path or internal
name reaches a client.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from typing import Any, Optional

import grpc
from grpc_health.v1 import health_pb2

from services.config import ServeLimits
from services.errors import (
    ModelLoading,
    ModelNotFound,
    NotImplementedYet,
    Overloaded,
    TuneserveError,
    WrongTask,
)
from services.protocol import INFERENCE_SERVICE, pb
from services.registry import Registry
from services.serving.validation import check_model_field, validate_classify

logger = logging.getLogger("ray.serve")

HEALTH_CACHE_S = 1.0
STATUS_TIMEOUT_S = 5.0


def _status_code(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Exception -> (status code, message for the client)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, TuneserveError):
        return getattr(grpc.StatusCode, exc.grpc_code), exc.message
    if isinstance(exc, BackPressureError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy: request queue full; retry later"
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return grpc.StatusCode.UNAVAILABLE, "model replica unavailable; retry"
    if isinstance(exc, asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "timed out"
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s", error_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (id {error_id}); see server logs"


def rpc(response_type):
    """Wrap a unary method: domain errors become status codes, never tracebacks."""

    def decorate(fn):
        @functools.wraps(fn)
        async def wrapper(self, request, grpc_context=None):
            try:
                return await fn(self, request, grpc_context)
            except Exception as exc:
                code, message = _status_code(exc)
                if grpc_context is not None:
                    grpc_context.set_code(code)
                    grpc_context.set_details(message)
                return response_type()

        return wrapper

    return decorate


class InferenceIngress:
    """Serve deployment class; `app.py` wraps it with `serve.deployment`."""

    def __init__(self, registry: str, models: dict[str, Any], tasks: dict[str, str],
                 limits: Optional[dict] = None, pinned: Optional[dict[str, str]] = None):
        self.registry = Registry(registry)
        self.handles = models  # model name -> DeploymentHandle of its model deployment
        self.tasks = tasks
        self.limits = ServeLimits(**(limits or {}))
        self.pinned = pinned or {}
        self._health: tuple[float, bool] = (0.0, False)

    # ---- helpers ---------------------------------------------------------------
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
            method = "Classify" if actual == "classification" else "Generate"
            raise WrongTask(f"model '{model}' is a {actual} model; use {method}")
        return handle

    async def _statuses(self) -> dict[str, dict]:
        async def one(name, handle):
            try:
                return name, await asyncio.wait_for(handle.status.remote(), STATUS_TIMEOUT_S)
            except Exception:
                return name, {"state": "unavailable", "version": None}

        pairs = await asyncio.gather(*(one(n, h) for n, h in self.handles.items()))
        return dict(pairs)

    # ---- tuneserve.v1.Inference ---------------------------------------------------
    @rpc(pb.ClassifyResponse)
    async def Classify(self, request, grpc_context=None):
        call = validate_classify(request, self.limits)
        handle = self._handle(call.model, "classification")
        answer = await handle.classify.remote(call.texts, call.version)
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
        model = check_model_field(request.model, self.limits)
        self._handle(model, "generation")
        raise NotImplementedYet("text generation is not available on this server yet")

    async def GenerateStream(self, request, grpc_context=None):
        try:
            model = check_model_field(request.model, self.limits)
            self._handle(model, "generation")
            raise NotImplementedYet("text generation is not available on this server yet")
        except Exception as exc:
            code, message = _status_code(exc)
            if grpc_context is not None:
                grpc_context.set_code(code)
                grpc_context.set_details(message)
            # Raising after setting the code is how a streaming method ends with a
            # status in Serve; the proxy keeps our code and message.
            raise TuneserveError(message) from None
        yield pb.GenerateResponse()  # pragma: no cover - makes this a generator

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
            channels = await asyncio.to_thread(self.registry.channels_of, name)
            versions = []
            for version in await asyncio.to_thread(self.registry.versions, name):
                try:
                    manifest = await asyncio.to_thread(self.registry.manifest, name, version)
                except TuneserveError:
                    continue
                metrics = {k: float(v) for k, v in (manifest.get("metrics") or {}).items()
                           if isinstance(v, (int, float))}
                versions.append(pb.VersionInfo(
                    version=version, created_at=str(manifest.get("created_at", "")),
                    metrics=metrics,
                    channels=[c for c, v in channels.items() if v == version]))
            status = statuses.get(name, {})
            infos.append(pb.ModelInfo(
                name=name, task=self.tasks.get(name, ""),
                production_version=channels.get("production", ""),
                pinned_version=status.get("pinned_version") or "",
                serving_versions=[status["version"]] if status.get("version") else [],
                versions=versions, labels=status.get("labels") or []))
        return pb.ListModelsResponse(models=infos)

    # ---- grpc.health.v1.Health ---------------------------------------------------
    async def _serving(self) -> bool:
        checked_at, ok = self._health
        if time.monotonic() - checked_at < HEALTH_CACHE_S:
            return ok
        statuses = await self._statuses()
        ok = bool(statuses) and all(s.get("version") for s in statuses.values())
        self._health = (time.monotonic(), ok)
        return ok

    async def Check(self, request, grpc_context=None):
        if request.service not in ("", INFERENCE_SERVICE):
            if grpc_context is not None:
                grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
                grpc_context.set_details(f"unknown service {request.service[:100]!r}")
            return health_pb2.HealthCheckResponse()
        serving = await self._serving()
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, grpc_context=None):
        """Streams the status whenever it changes (polled each second)."""
        last = None
        while True:
            response = await self.Check(request, grpc_context)
            if grpc_context is not None and grpc_context.code():
                raise ModelNotFound("unknown service")
            if response.status != last:
                last = response.status
                yield response
            await asyncio.sleep(HEALTH_CACHE_S)


__all__ = ["InferenceIngress", "ModelLoading", "Overloaded"]
