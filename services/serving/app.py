"""Building the Serve application and starting Serve with its gRPC proxy.

    tuneserve serve --registry DIR --grpc-port 9000

or, for a Serve config file / KubeRay RayService, the import path
`services.serving.app:app_builder` with args {registry: ..., ...}. API tokens are read
here, where the application is built (a placeholder or an empty one refuses to start);
only their digests and file paths go to the ingress, which re-reads the files when they
change.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import time
from typing import Any, Optional

from services.core.auth import Tokens
from services.core.config import CLASSIFICATION, GENERATION, ServeConfig, ServeLimits
from services.core.errors import ConfigError, ModelLoading, RegistryError, TuneserveError
from services.core.net import bind_error, free_port, host_problem, port_in_use
from services.core.raycluster import ensure_ray
from services.core.registry import Registry
from services.serving.autoscale import POLICY as AUTOSCALE_POLICY
from services.serving.ingress import InferenceIngress
from services.serving.servicers import GRPC_SERVICER_FUNCTIONS
from services.serving.status import StatusBoard, model_states

APP_NAME = "tuneserve"
INGRESS_DEPLOYMENT = "ingress"
"""The ingress deployment's name (with colocate it also holds the models)."""
logger = logging.getLogger(__name__)


def _ray():
    """Ray, with Ray Serve loaded, imported on first use: this module's one import of
    Ray, which takes seconds; the checks before serving need none of it."""
    import ray
    import ray.serve

    return ray


def _colocated():
    """services/serving/colocated.py, imported on first use: it imports the model
    deployments, and with them Ray."""
    from services.serving import colocated

    return colocated


def model_deployment_name(model: str) -> str:
    return f"model-{model}"


def discover_models(registry: Registry, wanted: Optional[list[str]] = None,
                    known_tasks: Optional[dict[str, str]] = None) -> dict[str, str]:
    """model name -> task, for every servable model (or the ones asked for).
    `known_tasks` (ServeConfig.model_tasks): models served before they have a version."""
    known_tasks = known_tasks or {}
    names = wanted or list(dict.fromkeys([*registry.model_names(), *known_tasks]))
    tasks: dict[str, str] = {}
    for name in names:
        versions = registry.versions(name)
        if not versions and name in known_tasks:
            tasks[name] = known_tasks[name]  # NOT_SERVING until a version is promoted
            continue
        if not versions:
            raise RegistryError(f"model '{name}' not found in registry "
                                f"{registry.uri.split('?')[0]} (to serve it before its "
                                "first version, name its task in model_tasks)")
        try:
            tasks[name] = registry.model_task(name)[1]  # it has versions: never None
        except TuneserveError as exc:
            if wanted:  # asked for by name: not served is an error
                raise
            # One broken model does not keep the others from being served.
            logger.warning("not serving model %s: %s", name, exc.message)
    wrong = sorted(n for n, t in known_tasks.items() if tasks.get(n, t) != t)
    if wrong:
        raise ConfigError(f"invalid serve setting 'model_tasks': model '{wrong[0]}' holds "
                          f"{tasks[wrong[0]]} versions, not {known_tasks[wrong[0]]}")
    return tasks


def build_app(cfg: ServeConfig, tasks: Optional[dict[str, str]] = None):
    """The Serve application: one ingress, one model deployment per model name (or, with
    cfg.colocate, an ingress that runs the models itself: services/serving/colocated.py).
    `tasks`: the registry's models (discover_models), when the caller has read them."""
    cfg.validate()
    tokens = Tokens.load(cfg.api_token_file, cfg.admin_token_file)
    registry = Registry(cfg.registry)
    if tasks is None:
        tasks = discover_models(registry, cfg.models, cfg.model_tasks)
    if not tasks:
        raise RegistryError(f"no models in registry {cfg.registry}: train one first "
                            "(tuneserve train ...)")
    # Each model replica holds one long poll of the board open (change notices): a
    # board stopping need not wait for them, they are asked again elsewhere.
    board = _ray().serve.deployment(StatusBoard).options(
        name="status-board", num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000, graceful_shutdown_timeout_s=1).bind()
    specs = _model_specs(cfg, registry.uri, tasks)
    served_tasks = {n: t for n, t in tasks.items() if n in specs}
    if tokens.open_warning():
        logger.warning(tokens.open_warning())
    if cfg.colocate:
        return _colocated_ingress(cfg, registry.uri, specs, served_tasks, board, tokens)
    return _ingress_over_models(cfg, registry.uri, specs, tasks, served_tasks, board, tokens)


def _model_specs(cfg: ServeConfig, registry_uri: str,
                 tasks: dict[str, str]) -> dict[str, dict[str, Any]]:
    """model name -> {"task", "kwargs": its class's arguments}, for each model whose task
    this server can serve (the others are named in a warning)."""
    classes = _colocated().model_classes()
    threads = max(1, math.ceil(cfg.replica_cpus))
    specs: dict[str, dict[str, Any]] = {}
    for name, task in tasks.items():
        if task not in classes:
            logger.warning("model %s has task %s, which this server cannot serve",
                           name, task)
            continue
        # A generation batch runs to its longest request: no larger than what one
        # replica takes on at once.
        batch_size, batch_wait = cfg.max_batch_size, cfg.batch_wait_timeout_s
        if task == GENERATION:
            batch_size = min(cfg.max_batch_size, cfg.ongoing_for(task))
            batch_wait = cfg.generation_batch_wait_timeout_s
        kwargs = {"registry": registry_uri, "name": name, "channel": cfg.channel,
                  "poll_interval_s": cfg.poll_interval_s, "threads": threads,
                  "max_batch_size": batch_size, "batch_wait_timeout_s": batch_wait,
                  "dtype": cfg.dtype}
        if task == CLASSIFICATION:
            kwargs.update(trace=cfg.trace, max_input_tokens=cfg.max_input_tokens,
                          truncation=cfg.truncation, optimize=cfg.optimize)
        elif task == GENERATION:
            kwargs["batching"] = cfg.generation_batching
        specs[name] = {"task": task, "kwargs": kwargs}
    return specs


def _replicas(cfg: ServeConfig) -> dict[str, Any]:
    """The replica count options of a deployment holding models: autoscaling or fixed."""
    autoscaling = cfg.autoscaling_config()
    return {"autoscaling_config": autoscaling} if autoscaling else \
        {"num_replicas": cfg.num_replicas}


def _model_actor(cfg: ServeConfig) -> dict[str, Any]:
    """ray_actor_options of a replica holding models."""
    return {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus,
            "runtime_env": {"env_vars": {"TUNESERVE_REPLICA_CPUS": str(cfg.replica_cpus)}}}


def _colocated_ingress(cfg: ServeConfig, registry_uri: str, specs: dict[str, dict[str, Any]],
                       served_tasks: dict[str, str], board, tokens: Tokens):
    """cfg.colocate: one ingress deployment whose replicas run every model themselves."""
    replicas = _replicas(cfg)
    if cfg.replica_grpc and "autoscaling_config" in replicas:
        # Serve does not see the calls the replicas' own servers answer: they report
        # them, and this policy counts them in (services/serving/autoscale.py).
        replicas["autoscaling_config"] = {**replicas["autoscaling_config"],
                                          "policy": {"policy_function": AUTOSCALE_POLICY}}
    ingress = _ray().serve.deployment(_colocated().ColocatedIngress).options(
        name=INGRESS_DEPLOYMENT, **replicas, ray_actor_options=_model_actor(cfg),
        max_ongoing_requests=max((cfg.ongoing_for(t) for t in served_tasks.values()),
                                 default=cfg.ongoing_for(CLASSIFICATION)),
        max_queued_requests=cfg.max_queued_requests,
        user_config={"channel": cfg.channel, "pinned_versions": dict(cfg.pinned_versions),
                     "poll_interval_s": cfg.poll_interval_s},
        health_check_period_s=10, **cfg.deployment_logging())
    return ingress.bind(registry_uri, specs, served_tasks, dataclasses.asdict(cfg.limits),
                        board=board, auth=tokens.as_dict(),
                        grpc_server=cfg.replica_grpc_server(),
                        admin_server=cfg.admin_grpc_server(),
                        health_server=cfg.health_grpc_server())


def _ingress_over_models(cfg: ServeConfig, registry_uri: str,
                         specs: dict[str, dict[str, Any]], tasks: dict[str, str],
                         served_tasks: dict[str, str], board, tokens: Tokens):
    """The default layout: a model deployment per model, and an ingress calling them."""
    serve = _ray().serve
    classes = _colocated().model_classes()
    handles = {}
    for name, spec in specs.items():
        deployment = serve.deployment(classes[spec["task"]]).options(
            name=model_deployment_name(name),
            max_ongoing_requests=cfg.ongoing_for(spec["task"]),
            max_queued_requests=cfg.max_queued_requests,
            **_replicas(cfg),
            ray_actor_options=_model_actor(cfg),
            user_config={"channel": cfg.channel,
                         "pinned_version": cfg.pinned_versions.get(name),
                         "poll_interval_s": cfg.poll_interval_s},
            health_check_period_s=10, **cfg.deployment_logging(),
        )
        handles[name] = deployment.bind(**spec["kwargs"], board=board)
    # The ingress only awaits model calls: it can hold many at once. Health Watch
    # streams (bounded by limits.max_watch_streams) take at most half of them.
    ongoing = max([256, 2 * cfg.limits.max_watch_streams]
                  + [cfg.ongoing_for(t) * 8 for t in tasks.values()])
    ingress = serve.deployment(InferenceIngress).options(
        name=INGRESS_DEPLOYMENT, num_replicas=cfg.ingress_replicas,
        ray_actor_options={"num_cpus": cfg.ingress_cpus},
        max_ongoing_requests=ongoing,
        # Bounded, but never below what the ingress holds: a burst waits in the proxy's
        # router while it picks a replica, and the models' own queues (max_queued_requests)
        # are what answers a full server, with tuneserve's message and retry hint.
        max_queued_requests=(-1 if cfg.max_queued_requests == -1
                             else max(cfg.max_queued_requests, ongoing)),
        **cfg.deployment_logging(),
    )
    coalesce = {name: settings for name, task in served_tasks.items()
                if (settings := cfg.coalescing(task))}
    return ingress.bind(registry_uri, handles, served_tasks, dataclasses.asdict(cfg.limits),
                        board=board, auth=tokens.as_dict(), coalesce=coalesce,
                        grpc_server=cfg.replica_grpc_server(),
                        admin_server=cfg.admin_grpc_server(),
                        health_server=cfg.health_grpc_server())


def app_builder(args: dict[str, Any]):
    """Entry point for Serve config files (`import_path: services.serving.app:app_builder`)."""
    args = dict(args or {})
    limits = ServeLimits(**args.pop("limits", {}) or {})
    known = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown application args: {', '.join(unknown)}")
    return build_app(ServeConfig(limits=limits, **args))


def grpc_options(cfg: ServeConfig) -> dict[str, Any]:
    return {"port": cfg.grpc_port, "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS)}


PROXY_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
"""Where Ray Serve's gRPC proxy reads the largest message it accepts (default 2 GiB),
in each proxy process as it starts."""


def proxy_env(cfg: ServeConfig) -> dict[str, str]:
    """The environment that gives Serve's gRPC proxy tuneserve's message limit: a larger
    message is refused from its length prefix, before it is read. Ray reads it where
    its processes start: `tuneserve serve` sets it for a cluster it starts; a cluster
    of your own (a RayService) needs it in its pods' environment."""
    return {PROXY_MESSAGE_ENV: str(cfg.max_message_bytes())}


def direct_ingress_env(grpc_port: int) -> dict[str, str]:
    """The environment Ray Serve reads, in every process of a cluster as it starts, to
    let the ingress replica listen on grpc_port itself (ServeConfig.direct_ingress)."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_port + 1)}


def _prepare_direct_ingress(cfg: ServeConfig) -> int:
    """Set up direct ingress before Ray starts; returns the port for Serve's own proxy
    (a free one: grpc_port belongs to the ingress replica)."""
    env = direct_ingress_env(cfg.grpc_port)
    unset = [f"{k}={v}" for k, v in env.items() if os.environ.get(k) != v]
    if unset and (_ray().is_initialized() or cfg.address or os.environ.get("RAY_ADDRESS")):
        raise ConfigError("invalid serve setting 'direct_ingress': Ray reads it when a "
                          "cluster starts, and this one is already running; start the "
                          f"cluster with {' '.join(unset)} in its environment, or let "
                          "tuneserve start one (no --address)")
    os.environ.update(env)  # the local cluster started next inherits it
    return free_port()


DEFAULT_HTTP_PORT = 8000


def check_ports_free(cfg: ServeConfig, http_port: Optional[int]) -> None:
    """Before a local cluster starts: the host must be this machine's and the ports it
    would bind free, or the failure comes later, from deep inside Serve's proxy actor."""
    problem = host_problem(cfg.host)
    if problem:
        raise ConfigError(f"invalid serve setting 'host': {cfg.host!r} {problem}; pass "
                          "--host 0.0.0.0 (every address) or one of this machine's")
    for field, flag, port in (("grpc_port", "--grpc-port", cfg.grpc_port),
                              ("http_port", "--http-port", http_port),
                              ("metrics_port", "--metrics-port", cfg.metrics_port),
                              ("admin_port", "--admin-port", cfg.admin_port),
                              ("health_port", "--health-port", cfg.health_port)):
        error = bind_error(port) if port else None
        if error == errno.EADDRINUSE:
            raise ConfigError(f"invalid serve setting '{field}': port {port} is already in "
                              f"use on this machine (another server?); pass {flag} with a "
                              "free port, or stop what holds it")
        if error == errno.EACCES:
            raise ConfigError(f"invalid serve setting '{field}': port {port} needs root "
                              f"(ports below 1024); pass {flag} with a port from 1024 up")


def local_http_port(http_port: Optional[int]) -> int:
    """The port given, else 8000, else (8000 taken: Serve's HTTP proxy is not what
    tuneserve serves) a free one."""
    if http_port is not None:
        return http_port
    if not port_in_use(DEFAULT_HTTP_PORT):
        return DEFAULT_HTTP_PORT
    return free_port()


def startup_needs(cfg: ServeConfig, models: int) -> list[tuple[str, float, str]]:
    """(resource, amount, how it adds up) the replicas ask for as the app starts: each
    model deployment's first replicas (min_replicas, or num_replicas) and the ingress."""
    if cfg.max_replicas is not None:
        first = 1 if cfg.min_replicas is None else cfg.min_replicas
    else:
        first = cfg.num_replicas
    if cfg.colocate:  # one ingress deployment holding every model
        cpus = first * cfg.replica_cpus
        parts = f"{first} ingress replica(s) x --replica-cpus {cfg.replica_cpus:g}"
        gpu_parts = f"{first} ingress replica(s) x --replica-gpus {cfg.replica_gpus:g}"
        gpus = first * cfg.replica_gpus
    else:
        cpus = models * first * cfg.replica_cpus + cfg.ingress_replicas * cfg.ingress_cpus
        parts = (f"{models} model(s) x {first} replica(s) x --replica-cpus "
                 f"{cfg.replica_cpus:g}, + {cfg.ingress_replicas} x {cfg.ingress_cpus:g} "
                 "for the ingress")
        gpus = models * first * cfg.replica_gpus
        gpu_parts = (f"{models} model(s) x {first} replica(s) x --replica-gpus "
                     f"{cfg.replica_gpus:g}")
    needs = [("CPU", cpus, parts)]
    if gpus:
        needs.append(("GPU", gpus, gpu_parts))
    return needs


def check_startup_resources(cfg: ServeConfig, models: int, resources: dict[str, float],
                            local: bool) -> Optional[str]:
    """Replicas that do not fit wait for resources without a word (Serve logs every 30 s
    in its own files): on a cluster started here they never get them (ConfigError), on
    one joined with --address an autoscaler may add nodes (the warning returned)."""
    for kind, need, parts in startup_needs(cfg, models):
        have = float(resources.get(kind, 0.0))
        if need <= have + 1e-9:
            continue
        what = f"serving needs {need:g} {kind}s to start ({parts}) and the Ray cluster has " \
               f"{have:g}"
        if local:
            hint = ("lower --replica-cpus (fractions work: the replicas share the cores), "
                     "serve fewer models (--models)" if kind == "CPU" else
                     "lower --replica-gpus or serve fewer models (--models)")
            raise ConfigError(f"{what}: {hint}, or join a larger cluster with --address")
        return f"warning: {what}: the replicas wait until it has them (an autoscaling " \
               "cluster adds nodes)"
    return None


def start_serving(cfg: ServeConfig, *, http_port: Optional[int] = None, verbose: bool = False,
                  wait_for_models: bool = True, timeout_s: float = 300.0) -> None:
    """Start (or reuse) Ray, start Serve's gRPC proxy, deploy, wait until serving.

    `http_port`: Serve's HTTP proxy, which the gRPC API does not use; None: 8000, or a
    free port when a local cluster starts and 8000 is taken."""
    cfg.validate()
    tasks = discover_models(Registry(cfg.registry), cfg.models, cfg.model_tasks)
    app = build_app(cfg, tasks)  # fail fast on an empty or bad registry, before Ray starts
    ray = _ray()
    if not (ray.is_initialized() or cfg.address or os.environ.get("RAY_ADDRESS")):
        check_ports_free(cfg, http_port)
        http_port = local_http_port(http_port)
    http_port = DEFAULT_HTTP_PORT if http_port is None else http_port
    options = grpc_options(cfg)
    if cfg.direct_ingress:
        options["port"] = _prepare_direct_ingress(cfg)
    elif cfg.replica_grpc:  # grpc_port belongs to the ingress replicas
        options["port"] = free_port()
        if cfg.tls_cert_file:  # Serve's proxy has no TLS: no plaintext way around it
            options["grpc_servicer_functions"] = []
    if not (ray.is_initialized() or cfg.address or os.environ.get("RAY_ADDRESS")):
        os.environ.update(proxy_env(cfg))  # the local cluster started next inherits it
    local = ensure_ray(cfg.address, metrics_port=cfg.metrics_port, verbose=verbose)
    served = sum(1 for task in tasks.values() if task in _colocated().model_classes())
    warning = check_startup_resources(cfg, served, ray.cluster_resources(), local)
    if warning:
        logger.warning(warning)
    try:
        ray.serve.start(http_options={"host": cfg.host, "port": http_port}, grpc_options=options)
    except Exception as exc:
        if "Failed to bind" not in str(exc) and "address already in use" not in str(exc).lower():
            raise
        raise ConfigError(f"Serve's proxy cannot bind its ports (gRPC {options['port']}, "
                          f"HTTP {http_port}): one is in use; pass free ones with "
                          "--grpc-port / --http-port") from None
    ray.serve.run(app, name=APP_NAME, blocking=False)
    if wait_for_models:
        wait_until_serving(timeout_s)


def wait_until_serving(timeout_s: float = 300.0, poll_s: float = 0.5) -> dict[str, Any]:
    """Poll the ingress until every model has a loaded version, or has none it can load
    (every version it tried refused): those are named in a warning and the others are
    served; if no model could be loaded, ModelLoading says why."""
    handle = _ray().serve.get_app_handle(APP_NAME)
    deadline = time.monotonic() + timeout_s
    statuses: dict[str, Any] = {}
    while time.monotonic() < deadline:
        statuses = handle._statuses.remote().result()
        loaded, failed, pending = model_states(statuses)
        if statuses and not pending:
            if not loaded:
                raise ModelLoading(f"no model could be loaded: {'; '.join(failed.values())}")
            for why in failed.values():
                logger.warning("not serving %s (serving the other models; a version "
                               "promoted later is loaded)", why)
            return statuses
        time.sleep(poll_s)
    _, failed, pending = model_states(statuses)
    raise ModelLoading(f"models not loaded after {timeout_s:.0f}s: "
                       f"{'; '.join([*pending.values(), *failed.values()]) or 'no status'}")


def stop_serving() -> None:
    _ray().serve.shutdown()
