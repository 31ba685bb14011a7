"""The colocated ingress (ServeConfig.colocate): the models run inside the ingress replica.

Each ingress replica builds the model objects itself (the same Classifier and Generator
classes, following the registry the same way) and calls them in-process through
`LocalModel`, which answers the few DeploymentHandle calls the ingress makes; no Ray
call between the gRPC handler and the model. Everything else (validation, auth, status
codes, metrics, the status board, hot-load) is the ingress's, unchanged. This is the
one module that composes the ingress (no torch) and the model deployments.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from services.core.config import CLASSIFICATION, GENERATION
from services.core.errors import ModelNotFound
from services.serving.autoscale import OWN_CALLS
from services.serving.classifier import Classifier
from services.serving.generator import Generator
from services.serving.ingress import InferenceIngress

logger = logging.getLogger("ray.serve")


def model_classes() -> dict[str, type]:
    """task -> the model class serving it."""
    return {CLASSIFICATION: Classifier, GENERATION: Generator}


class _LocalStream:
    """An async generator seen as a streaming DeploymentResponse (iterate, cancel)."""

    def __init__(self, agen):
        self._agen = agen

    def __aiter__(self):
        return self._agen

    def cancel(self) -> None:
        # Cancelling the ingress's task already ended the generator (the error went
        # through it); this closes one that was merely abandoned.
        asyncio.get_running_loop().create_task(self._agen.aclose())


class _LocalMethod:
    def __init__(self, fn, stream: bool):
        self._fn, self._stream = fn, stream

    def remote(self, *args, **kwargs):
        result = self._fn(*args, **kwargs)
        return _LocalStream(result) if self._stream else result


class LocalModel:
    """A model object in this process, called the way the ingress calls a
    DeploymentHandle: `model.method.remote(...)` (awaited) and
    `model.options(stream=True).method.remote(...)` (iterated)."""

    def __init__(self, target: Any, stream: bool = False):
        self._target = target
        self._stream = stream

    def options(self, *, stream: bool = False, **_ignored) -> "LocalModel":
        return LocalModel(self._target, stream)

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _LocalMethod(getattr(self._target, name), self._stream)


class ColocatedIngress(InferenceIngress):
    """Serve deployment class; `app.py` wraps it with `serve.deployment`.

    With replica_grpc, the replica's own gRPC server binds its port only once the first
    `reconfigure` (which Serve runs before the replica takes traffic) has loaded the
    models: while a replica starts, the kernel hands the shared port's new connections
    to the replicas already serving, instead of to one that can only answer "loading".

    `models`: model name -> {"task": ..., "kwargs": the model class's constructor
    arguments}. Serve's `user_config` ({"channel", "pinned_versions": {name: version},
    "poll_interval_s"}) reaches every model's `reconfigure`, as it reaches each model
    deployment in the default layout.
    """

    def __init__(self, registry: str, models: dict[str, dict[str, Any]],
                 tasks: dict[str, str], limits: Optional[dict] = None, board: Any = None,
                 auth: Optional[dict] = None, grpc_server: Optional[dict] = None,
                 admin_server: Optional[dict] = None, health_server: Optional[dict] = None):
        classes = model_classes()
        self.models = {name: classes[spec["task"]](**spec["kwargs"], board=board)
                       for name, spec in models.items()}
        super().__init__(registry, {n: LocalModel(m) for n, m in self.models.items()},
                         tasks, limits, board=board, auth=auth, grpc_server=grpc_server,
                         admin_server=admin_server, health_server=health_server)

    LISTEN_AT_INIT = False

    async def reconfigure(self, user_config: dict) -> None:
        user_config = user_config or {}
        pins = user_config.get("pinned_versions") or {}
        if not isinstance(pins, dict):
            logger.warning("user_config pinned_versions ignored: not a mapping")
            pins = {}
        unknown = sorted(set(pins) - set(self.models))
        if unknown:
            logger.warning("user_config pinned_versions: %s not served here (served: %s)",
                           ", ".join(map(str, unknown)), ", ".join(sorted(self.models)))
        shared = {k: user_config[k] for k in ("channel", "poll_interval_s")
                  if user_config.get(k)}
        for name, model in self.models.items():  # the first call loads each model
            await model.reconfigure({**shared, "pinned_version": pins.get(name)})
        self._listen()

    async def model_status(self, name: str) -> dict[str, Any]:
        """One model's status in this replica: what a model deployment's `status`
        answers in the default layout (bench/generate.py reads its batch counters)."""
        if name not in self.models:
            raise ModelNotFound(f"model '{name}' is not served here")
        return await self.models[name].status()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics: the calls this replica's own gRPC server
        is answering, which Serve does not count (services/serving/autoscale.py)."""
        server = self._grpc_server
        return {OWN_CALLS: float(server.in_flight.calls if server is not None else 0)}

    async def check_health(self) -> None:
        self._listen()  # in case Serve never called reconfigure (no user_config)
        await super().check_health()
        for model in self.models.values():
            await model.check_health()
