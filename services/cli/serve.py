"""`tuneserve serve`: serve the registry's models over gRPC with Ray Serve, in the
foreground until Ctrl-C or SIGTERM.

The flags become a ServeConfig, validated before Ray starts; Ray and the serving
application are imported in `run` only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading

from services.core.config import (
    CLASSIFIER_OPTIMIZERS,
    DEFAULT_REGISTRY,
    GENERATION_BATCHING,
    SERVING_DTYPES,
    TLS_LAYOUT,
    ServeConfig,
    ServeLimits,
    check_port,
)
from services.core.errors import ConfigError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the registry's models over gRPC (foreground)")
    _add_placement_flags(p)
    _add_scaling_flags(p)
    _add_model_flags(p)
    _add_ingress_flags(p)
    _add_tls_flags(p)
    p.set_defaults(handler=run)
    return p


def _add_placement_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", default=DEFAULT_REGISTRY)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--http-port", type=int, default=None,
                   help="Ray Serve's HTTP proxy port, unused by the gRPC API (default: "
                   "8000, or a free port when 8000 is taken)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus metrics port of the local Ray node")
    p.add_argument("--host", default="0.0.0.0", help="HTTP proxy host (Serve's gRPC proxy "
                   "listens on all interfaces); with --layout colocated or models also the "
                   "address the replicas' gRPC servers listen on (127.0.0.1: this machine "
                   "only)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    p.add_argument("--models", default=None, help="comma-separated model names "
                   "(default: all in the registry)")


def _add_scaling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-replicas", type=int, default=1,
                   help="replicas per model when not autoscaling")
    p.add_argument("--min-replicas", type=int, default=None)
    p.add_argument("--max-replicas", type=int, default=None,
                   help="turns on Serve autoscaling between --min-replicas and this")
    p.add_argument("--target-ongoing-requests", type=float, default=2.0,
                   help="autoscaling target per replica")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="per replica (default: 2 x the batch size for classifiers, 8 "
                        "for generators)")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="past this, requests fail fast with RESOURCE_EXHAUSTED")
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--replica-gpus", type=float, default=0.0)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="requests per batch a model replica runs at most")
    p.add_argument("--dtype", choices=SERVING_DTYPES, default="auto",
                   help="what the replicas hold model weights in (auto: bfloat16 on a GPU "
                        "that computes it natively, else float32; bfloat16 on a CPU with "
                        "AVX512-BF16 or AMX is faster, scores differ in the third decimal)")
    p.add_argument("--generation-batching", choices=GENERATION_BATCHING, default="continuous",
                   help="generators: continuous (a request joins the running batch at the "
                        "next token and leaves when it ends) or static (one generate call "
                        "per batch, which runs until its longest request ends)")
    p.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True,
                   help="classifiers run as a TorchScript trace of the model, checked "
                        "against it at load (the model itself where tracing fails)")
    p.add_argument("--optimize", choices=CLASSIFIER_OPTIMIZERS, default=None,
                   help="classifiers: run on ONNX Runtime on a CPU (onnx; onnx-int8 with "
                        "int8 weights) or with bfloat16 weights as a TorchScript trace "
                        "(bf16: a CPU with AVX512-BF16 or AMX-BF16, or a GPU with native "
                        "bfloat16), checked against the float32 model at load (same "
                        "labels, scores within a tolerance; the model serves where it "
                        "differs or the device lacks native bfloat16); auto: bf16 where "
                        "the device computes it natively, else none. The replica's load "
                        "log line names the runtime it picked")
    p.add_argument("--max-input-tokens", type=int, default=None, metavar="N",
                   help="classifiers: the most tokens a text runs on (default: the "
                        "model's own limit, e.g. 512)")
    p.add_argument("--truncation", choices=("truncate", "refuse"), default="truncate",
                   help="classifiers, a text over that limit: truncate it (counted in "
                        "tuneserve_truncated_inputs_total) or refuse its request with "
                        "INVALID_ARGUMENT")


def _add_ingress_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coalesce", action=argparse.BooleanOptionalAction, default=True,
                   help="the ingress sends concurrent Classify requests to a model "
                        "together (one call per batch instead of one per request)")
    p.add_argument("--layout", choices=tuple(LAYOUTS), default="colocated",
                   help="how a call reaches a model. colocated (default): each ingress "
                        "replica answers gRPC on --grpc-port itself and runs every "
                        "model in its own process (the fastest; replicas on a node share "
                        "the port; the replica settings size the ingress). models: "
                        "the same servers, calling a deployment per model, which Serve "
                        "scales on its own. proxy: Serve's gRPC proxy -> ingress -> "
                        "model deployments (what KubeRay's Service routes to; no TLS). "
                        "direct: Ray's experimental direct ingress, one replica running "
                        "the models (a cluster tuneserve starts; no TLS)")
    p.add_argument("--ingress-replicas", type=int, default=1, metavar="N",
                   help="replicas of the ingress deployment (--layout models or proxy; 2 "
                        "or more in production, so that no one process carries every "
                        "call; colocated: --num-replicas / --max-replicas size the "
                        "ingress)")
    p.add_argument("--request-timeout-s", type=int, default=120, metavar="S",
                   help="deadline of a call that sets none (behind Serve's proxy: of "
                        "every unary call); past it, DEADLINE_EXCEEDED")
    p.add_argument("--max-connections", type=int, default=ServeConfig.max_connections,
                   metavar="N",
                   help="connections each of tuneserve's own gRPC servers (--layout colocated or "
                        "models, --admin-port, --health-port) accepts at once (default "
                        "%(default)s; the open-files limit is raised to fit)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="Serve's per-request access log in the replica logs (it costs CPU "
                        "on every request: docs/benchmarks.md)")
    p.add_argument("--poll-interval-s", type=float, default=2.0,
                   help="how often each replica reads the registry (default 2 s); changes "
                        "made through the Admin API reach the replicas at once")
    p.add_argument("--admin-port", type=int, default=None, metavar="PORT",
                   help="serve the Admin service (promote, roll back, pin) on this port, "
                        "apart from inference, for the admin token only; off unless "
                        "given (the inference port answers Admin calls UNIMPLEMENTED)")
    p.add_argument("--health-port", type=int, default=None, metavar="PORT",
                   help="also answer grpc.health.v1 alone, in plaintext and without a "
                        "token, on this port of every ingress replica (Kubernetes' gRPC "
                        "probes cannot speak TLS); off unless given")
    p.add_argument("--api-token-file", default=None, metavar="FILE",
                   help="file holding the token Inference calls must send as "
                        "'authorization: Bearer <token>' (default: $TUNESERVE_API_TOKEN)")
    p.add_argument("--admin-token-file", default=None, metavar="FILE",
                   help="file holding the token Admin calls must send; it also works for "
                        "Inference (default: $TUNESERVE_ADMIN_TOKEN)")


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="PEM certificate chain: TLS on --grpc-port (with --tls-key), "
                        "re-read when the file changes (--layout colocated or models: "
                        "Serve's gRPC proxy cannot terminate TLS)")
    p.add_argument("--tls-key", default=None, metavar="FILE",
                   help="PEM private key (unencrypted) of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, metavar="FILE",
                   help="PEM CA certificates: mutual TLS, clients must present a "
                        "certificate one of them signed")


LAYOUTS = {"colocated": {"colocate": True, "replica_grpc": True},
           "models": {"replica_grpc": True},
           "proxy": {},
           "direct": {"direct_ingress": True, "colocate": True}}
"""--layout: the ServeConfig fields each layout sets (docs/design.md, Layouts)."""


def _layout(args: argparse.Namespace) -> dict[str, bool]:
    if (args.tls_cert or args.tls_key or args.tls_client_ca) and \
            not LAYOUTS[args.layout].get("replica_grpc"):
        raise ConfigError(f"invalid serve setting 'layout': {TLS_LAYOUT}; --layout "
                          f"{args.layout} has none: use --layout colocated or models")
    return LAYOUTS[args.layout]


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The validated ServeConfig of the flags (--http-port is checked, not a field)."""
    cfg = ServeConfig(registry=args.registry, grpc_port=args.grpc_port, host=args.host,
                      metrics_port=args.metrics_port, address=args.address,
                      num_replicas=args.num_replicas, replica_cpus=args.replica_cpus,
                      replica_gpus=args.replica_gpus, min_replicas=args.min_replicas,
                      max_replicas=args.max_replicas,
                      target_ongoing_requests=args.target_ongoing_requests,
                      max_ongoing_requests=args.max_ongoing_requests,
                      max_queued_requests=args.max_queued_requests,
                      max_batch_size=args.max_batch_size, dtype=args.dtype,
                      trace=args.trace, optimize=args.optimize,
                      generation_batching=args.generation_batching,
                      max_input_tokens=args.max_input_tokens, truncation=args.truncation,
                      coalesce=args.coalesce,
                      **_layout(args), access_log=args.access_log,
                      poll_interval_s=args.poll_interval_s,
                      models=[m.strip() for m in args.models.split(",")] if args.models else None,
                      api_token_file=args.api_token_file,
                      admin_token_file=args.admin_token_file, admin_port=args.admin_port,
                      health_port=args.health_port,
                      ingress_replicas=args.ingress_replicas,
                      max_connections=args.max_connections,
                      limits=ServeLimits(request_timeout_s=args.request_timeout_s),
                      tls_cert_file=args.tls_cert, tls_key_file=args.tls_key,
                      tls_client_ca_file=args.tls_client_ca)
    cfg.validate()
    if args.http_port is not None:  # Serve's HTTP proxy: not a ServeConfig field
        check_port("http_port", args.http_port)
    return cfg


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from services.serving.app import APP_NAME, start_serving

    cfg = serve_config(args)
    stop = threading.Event()

    def interrupt(*_):  # while starting: stop starting (cleaned up below)
        raise KeyboardInterrupt

    _on_stop_signals(interrupt)
    print(f"starting Ray Serve (registry {cfg.registry}) ...", flush=True)
    local = not (cfg.address or os.environ.get("RAY_ADDRESS"))
    try:
        start_serving(cfg, http_port=args.http_port, verbose=args.verbose)
        _on_stop_signals(lambda *_: stop.set())
        tls = "" if not cfg.tls_cert_file else " with mutual TLS" \
            if cfg.tls_client_ca_file else " with TLS"
        admin = f"; Admin on port {cfg.admin_port}" if cfg.admin_port else ""
        if cfg.health_port:
            admin += f"; health alone on port {cfg.health_port}"
        print(f"serving gRPC{tls} on port {cfg.grpc_port}{admin}; health: "
              "grpc.health.v1.Health; Ctrl-C stops", flush=True)
        stop.wait()
    finally:
        _on_stop_signals(signal.SIG_IGN)  # a second signal: no traceback
        print("shutting down ...", flush=True)
        if not local and ray.is_initialized():
            with contextlib.suppress(Exception):  # interrupted before it was deployed
                serve.delete(APP_NAME)  # leave the shared cluster as we found it
        ray.shutdown()
    return 0


def _on_stop_signals(handler) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
