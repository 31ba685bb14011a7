"""The `tuneserve` command line.

    tuneserve train --config run.yaml [--flags that override it]
    tuneserve serve --registry DIR --grpc-port 9000
    tuneserve classify --address HOST:PORT --model NAME "text" ...
    tuneserve generate --address HOST:PORT --model NAME "prompt" [--stream] [--max-new-tokens N]
    tuneserve models list --registry DIR
    tuneserve demo
    tuneserve k8s train|status|logs|delete|promote|unpin ...   (KubeRay; docs/kubernetes.md)

Errors print one line naming the bad field, file or status and exit non-zero (2 for
bad input, 1 for everything else); no tracebacks unless --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from services import __version__
from services.core.config import (
    DEFAULT_REGISTRY,
    GENERATION_BATCHING,
    SERVING_DTYPES,
    ServeConfig,
    TrainConfig,
    field_help,
    template_from_flag,
)
from services.core.errors import InvalidInput, TuneserveError

TRAIN_FLAG_SKIP = {"extra"}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    helps = field_help(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in TRAIN_FLAG_SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = helps.get(f.name, "")
        if default not in (None, False, [], {}):
            text += f" (default: {default})"
        hint = str(f.type)
        if "bool" in hint and "Optional" in hint:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None, help=text)
        elif "bool" in hint:
            p.add_argument(flag, dest=f.name, action="store_true", default=None, help=text)
        elif "float" in hint:
            p.add_argument(flag, dest=f.name, type=float, default=None, help=text, metavar="X")
        elif "int" in hint:
            p.add_argument(flag, dest=f.name, type=int, default=None, help=text, metavar="N")
        else:
            p.add_argument(flag, dest=f.name, default=None, help=text,
                           metavar="A,B" if "list" in hint else "VALUE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneserve",
        description="Fine-tune Hugging Face models with Ray Train; serve them over gRPC "
                    "with Ray Serve.")
    parser.add_argument("--version", action="version", version=f"tuneserve {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show Ray's logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model and publish it to the registry")
    p.add_argument("--config", help="YAML run config; flags override its fields")
    _add_train_flags(p)
    p.add_argument("--no-publish", action="store_true", help="train and evaluate only")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="continue an interrupted run (its name in --runs-dir, or its folder) "
                        "from its last checkpoint, with the config it started with")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("serve", help="serve the registry's models over gRPC (foreground)")
    p.add_argument("--registry", default=DEFAULT_REGISTRY)
    p.add_argument("--grpc-port", type=int, default=9000)
    p.add_argument("--http-port", type=int, default=None,
                   help="Ray Serve's HTTP proxy port, unused by the gRPC API (default: "
                   "8000, or a free port when 8000 is taken)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus metrics port of the local Ray node")
    p.add_argument("--host", default="0.0.0.0", help="HTTP proxy host (Serve's gRPC proxy "
                   "listens on all interfaces); with --replica-grpc also the address the "
                   "replicas' gRPC servers listen on (127.0.0.1: this machine only)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    p.add_argument("--models", default=None, help="comma-separated model names "
                   "(default: all in the registry)")
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
    p.add_argument("--coalesce", action=argparse.BooleanOptionalAction, default=True,
                   help="the ingress sends concurrent Classify requests to a model "
                        "together (one call per batch instead of one per request)")
    p.add_argument("--direct-ingress", action="store_true",
                   help="the ingress replica listens on --grpc-port itself, with no "
                        "Serve proxy hop (Ray's experimental direct ingress; a cluster "
                        "tuneserve starts, not --address)")
    p.add_argument("--colocate", action="store_true",
                   help="run the models inside the ingress replicas: no Ray call between "
                        "the gRPC method and the model (the replica settings apply to "
                        "the ingress)")
    p.add_argument("--replica-grpc", action="store_true",
                   help="each ingress replica answers gRPC on --grpc-port with a server "
                        "of its own; replicas on a node share the port (with --colocate "
                        "and --num-replicas N: N model processes behind one port). "
                        "Serve's proxy moves to a free port; not with --max-replicas")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="Serve's per-request access log in the replica logs (about 2 ms "
                        "of CPU per request on a small CPU)")
    p.add_argument("--poll-interval-s", type=float, default=2.0)
    p.add_argument("--api-token-file", default=None, metavar="FILE",
                   help="file holding the token Inference calls must send as "
                        "'authorization: Bearer <token>' (default: $TUNESERVE_API_TOKEN)")
    p.add_argument("--admin-token-file", default=None, metavar="FILE",
                   help="file holding the token Admin calls must send; it also works for "
                        "Inference (default: $TUNESERVE_ADMIN_TOKEN)")

    p = sub.add_parser("classify", help="classify texts through a running server")
    p.add_argument("--address", default="localhost:9000",
                   help="HOST:PORT of the gRPC API (default: %(default)s)")
    p.add_argument("--model", required=True)
    p.add_argument("--version", dest="model_version", default="")
    p.add_argument("--timeout-s", type=float, default=30.0)
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the API token (default: $TUNESERVE_API_TOKEN, "
                        "else $TUNESERVE_ADMIN_TOKEN)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("texts", nargs="+", metavar="TEXT")

    p = sub.add_parser("generate", help="generate text through a running server")
    p.add_argument("--address", default="localhost:9000",
                   help="HOST:PORT of the gRPC API (default: %(default)s)")
    p.add_argument("--model", required=True)
    p.add_argument("--version", dest="model_version", default="")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="default: the server's")
    p.add_argument("--temperature", type=float, default=None, metavar="X",
                   help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=None, metavar="X")
    p.add_argument("--top-k", type=int, default=None, metavar="N")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable)")
    p.add_argument("--seed", type=int, default=None, metavar="N",
                   help="same seed, same text (with --temperature > 0)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate max-new-tokens whatever the model says")
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the API token (default: $TUNESERVE_API_TOKEN, "
                        "else $TUNESERVE_ADMIN_TOKEN)")
    p.add_argument("--json", action="store_true",
                   help="the response (with --stream: each chunk) as one JSON object a line")
    p.add_argument("prompt", metavar="PROMPT")

    p = sub.add_parser("models", help="inspect the registry")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    q = msub.add_parser("list", help="models, versions, channels and metrics")
    q.add_argument("--registry", default=DEFAULT_REGISTRY)
    q.add_argument("--json", action="store_true")
    q = msub.add_parser("verify", help="check a version's manifest and checksums")
    q.add_argument("--registry", default=DEFAULT_REGISTRY)
    q.add_argument("name")
    q.add_argument("model_version", metavar="VERSION")
    for action, text in (("promote", "verify a version, then point a channel at it"),
                         ("rollback", "move a channel back to its previous version"),
                         ("pin", "make every replica serve this version"),
                         ("unpin", "let replicas follow their channel again")):
        q = msub.add_parser(action, help=text)
        where = q.add_mutually_exclusive_group()
        where.add_argument("--registry", default=None,
                           help=f"act on the registry directly (default {DEFAULT_REGISTRY})")
        where.add_argument("--address", default=None,
                           help="act through a running server's Admin API (HOST:PORT)")
        q.add_argument("name")
        if action in ("promote", "pin"):
            q.add_argument("model_version", metavar="VERSION")
        if action in ("promote", "rollback"):
            q.add_argument("--channel", default="production")
        q.add_argument("--token-file", default=None, metavar="FILE",
                       help="with --address: file holding the admin token (default: "
                            "$TUNESERVE_ADMIN_TOKEN)")

    p = sub.add_parser("eval", help="a classifier's accuracy, per-class metrics and "
                       "confusion matrix on a labelled data file")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="labelled data: .csv, .tsv, .jsonl, .json (an array of records) "
                        "or .parquet")
    p.add_argument("--model", required=True, metavar="NAME[@VERSION]",
                   help="default version: the production channel's")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--registry", default=None,
                       help=f"load the checkpoint from this registry (default {DEFAULT_REGISTRY})")
    where.add_argument("--address", default=None, help="evaluate through a running "
                       "server's gRPC API (HOST:PORT)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="with --address: file holding the API token (default: "
                        "$TUNESERVE_API_TOKEN, else $TUNESERVE_ADMIN_TOKEN)")
    helps = field_help(TrainConfig)
    p.add_argument("--text-column", default=None, metavar="VALUE", help=helps["text_column"])
    p.add_argument("--label-column", default=None, metavar="VALUE",
                   help=helps["label_column"])
    p.add_argument("--columns", default=None, metavar="A,B", help=helps["columns"])
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="texts per forward pass (default 64), or with --address per "
                        "request (default 128; lowered to the server's limit if less)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate the first N examples only")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request, with --address")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.add_argument("--confusion-png", default=None, metavar="PATH",
                   help="also write the confusion matrix as a PNG")

    p = sub.add_parser("demo", help="train, publish, serve and query the bundled MiniLM "
                       "on the bundled sentiment data, on a local Ray cluster")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--grpc-port", type=int, default=0, help="default: a free port")
    p.add_argument("--home", default=None, help="where registry and runs go "
                   "(default: .tuneserve)")

    from services.k8s import register as register_k8s

    register_k8s(sub)
    return parser


# ---- commands ------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from services.training.run import run_training

    cfg = TrainConfig.from_yaml(args.config) if args.config else TrainConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if f.name not in TRAIN_FLAG_SKIP}
    if args.prompt_template:
        overrides["prompt_template"] = template_from_flag(args.prompt_template)
    from services.training.tracking import epoch_rows

    if args.resume:
        from services.training.run import resume_config

        given = sorted(k for k, v in overrides.items()
                       if v is not None and k not in ("runs_dir", "address"))
        if given or args.config:
            from services.core.errors import ConfigError

            raise ConfigError(f"--resume continues a run with the config it started with; "
                              f"drop {', '.join('--' + g.replace('_', '-') for g in given) or '--config'}")
        cfg = resume_config(args.resume, overrides.get("runs_dir"), overrides.get("address"))
    else:
        cfg = cfg.merged(overrides)
    result = run_training(cfg, publish=not args.no_publish, verbose=args.verbose,
                          resume=args.resume)
    summary = {"name": result.name, "version": result.version, "promoted": result.promoted,
               "metrics": result.metrics, "registry": result.registry,
               "checkpoint": result.checkpoint_dir, "run_dir": result.run_dir,
               "wall_s": round(result.wall_s, 1),
               "publish_s": None if result.publish_s is None else round(result.publish_s, 2),
               "samples_per_s": result.samples_per_s, "promotion": result.promotion,
               "epochs": epoch_rows(result.history), "best_epoch": result.best_epoch,
               "artifacts": result.artifacts}
    if args.json:
        print(json.dumps(summary))
    else:
        print(_train_summary(summary))
    return 0


# The per-epoch columns, in this order, where the task has them (all are in the manifest).
EPOCH_COLUMNS = ("loss", "accuracy", "macro_f1", "perplexity")


def _train_summary(s: dict[str, Any]) -> str:
    from services.core.tables import format_table

    epochs = s.get("epochs") or []
    if epochs:
        cols = [c for c in EPOCH_COLUMNS if any(c in r for r in epochs)]
        rows = [[f"{r['epoch']}{' *' if r['epoch'] == s.get('best_epoch') else ''}",
                 r["step"], _fmt(r.get("train_loss")), *(_fmt(r.get(c)) for c in cols)]
                for r in epochs]
        header = ["epoch", "step", "train loss", *(f"eval {c}" for c in cols)]
        best = ", ".join(f"{k} {v:.4f}" for k, v in s["metrics"].items())
        lines = ["", format_table(rows, header), "",
                 f"best epoch {s.get('best_epoch') or '?'} (*): {best}"]
    else:
        rows = [(k, f"{v:.4f}") for k, v in s["metrics"].items()]
        lines = ["", format_table(rows, ["metric", "value"]), ""]
    if s["version"]:
        lines.append(f"published {s['name']} {s['version']}"
                     + (" (production)" if s["promoted"] else "")
                     + f" -> {s['checkpoint']}"
                     + (f" in {s['publish_s']}s" if s.get("publish_s") is not None else ""))
        lines.append(f"serve it:  tuneserve serve --registry {shlex.quote(s['registry'])} "
                     "--grpc-port 9000")
    else:
        lines.append(f"best checkpoint (not published): {s['checkpoint']}")
    if s.get("promotion"):
        lines.append(s["promotion"])
    artifacts = s.get("artifacts") or {}
    if "plot" in artifacts:
        lines.append(f"curves:    {artifacts['plot']}")
    if "tensorboard" in artifacts:
        lines.append(f"tensorboard --logdir {artifacts['tensorboard']}")
    lines.append(f"wall time {s['wall_s']}s")
    return "\n".join(lines)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from services.serving.app import APP_NAME, start_serving

    cfg = ServeConfig(registry=args.registry, grpc_port=args.grpc_port, host=args.host,
                      metrics_port=args.metrics_port, address=args.address,
                      num_replicas=args.num_replicas, replica_cpus=args.replica_cpus,
                      replica_gpus=args.replica_gpus, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                      target_ongoing_requests=args.target_ongoing_requests,
                      max_ongoing_requests=args.max_ongoing_requests,
                      max_queued_requests=args.max_queued_requests,
                      max_batch_size=args.max_batch_size, dtype=args.dtype,
                      trace=args.trace, generation_batching=args.generation_batching,
                      coalesce=args.coalesce,
                      direct_ingress=args.direct_ingress, colocate=args.colocate,
                      replica_grpc=args.replica_grpc, access_log=args.access_log,
                      poll_interval_s=args.poll_interval_s,
                      models=[m.strip() for m in args.models.split(",")] if args.models else None,
                      api_token_file=args.api_token_file,
                      admin_token_file=args.admin_token_file)
    cfg.validate()
    if args.http_port is not None:  # Serve's HTTP proxy: not a ServeConfig field
        from services.core.config import check_port

        check_port("http_port", args.http_port)
    stop = threading.Event()

    def interrupt(*_):  # while starting: stop starting (cleaned up below)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    print(f"starting Ray Serve (registry {cfg.registry}) ...", flush=True)
    local = not (cfg.address or os.environ.get("RAY_ADDRESS"))
    try:
        start_serving(cfg, http_port=args.http_port, verbose=args.verbose)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"serving gRPC on port {cfg.grpc_port}; health: grpc.health.v1.Health; "
              "Ctrl-C stops", flush=True)
        stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal: no traceback
            signal.signal(sig, signal.SIG_IGN)
        print("shutting down ...", flush=True)
        if not local and ray.is_initialized():
            with contextlib.suppress(Exception):  # interrupted before it was deployed
                serve.delete(APP_NAME)  # leave the shared cluster as we found it
        ray.shutdown()
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from services.client import Client, token_from
    from services.core.tables import format_table

    token = token_from(args.token_file, "TUNESERVE_API_TOKEN") if args.token_file else None
    with Client(args.address, token=token, timeout_s=args.timeout_s) as client:
        resp = client.classify(args.model, args.texts, version=args.model_version)
    if args.json:
        for text, r in zip(args.texts, resp.results):
            print(json.dumps({"text": text, "label": r.label, "score": round(r.score, 6),
                              "scores": {s.label: round(s.score, 6) for s in r.scores},
                              "model": resp.model, "version": resp.version}))
    else:
        rows = [(_clip(t), r.label, f"{r.score:.3f}") for t, r in zip(args.texts, resp.results)]
        print(format_table(rows, ["text", "label", "score"]))
        print(f"model {resp.model} {resp.version}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from services.client import Client, token_from

    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "top_k": args.top_k, "stop": args.stop,
              "seed": args.seed, "ignore_eos": args.ignore_eos or None,
              "version": args.model_version or None, "timeout_s": args.timeout_s}
    params = {k: v for k, v in params.items() if v is not None}
    if params.get("seed", 0) < 0:
        raise InvalidInput(f"--seed: must be >= 0, got {params['seed']}")

    def as_json(r) -> str:
        return json.dumps({"text": r.text, "prompt_tokens": r.prompt_tokens,
                           "completion_tokens": r.completion_tokens,
                           "finish_reason": r.finish_reason, "model": r.model,
                           "version": r.version})

    token = token_from(args.token_file, "TUNESERVE_API_TOKEN") if args.token_file else None
    with Client(args.address, token=token, timeout_s=args.timeout_s) as client:
        if not args.stream:
            last = client.generate(args.model, args.prompt, **params)
            print(as_json(last) if args.json else last.text)
        else:
            stream = client.generate_stream(args.model, args.prompt, **params)
            last = None
            try:
                for last in stream:
                    if args.json:
                        print(as_json(last), flush=True)
                    else:
                        print(last.text, end="", flush=True)
            finally:
                stream.cancel()  # no-op once complete; on Ctrl-C stops the generation
            if not args.json:
                print()
    if last is not None and not args.json:
        print(f"[{last.model} {last.version}: {last.prompt_tokens} prompt + "
              f"{last.completion_tokens} generated tokens, finish: {last.finish_reason}]",
              file=sys.stderr)
    return 0


def _clip(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def cmd_models(args: argparse.Namespace) -> int:
    from services.core.tables import format_table

    if args.models_command in ("promote", "rollback", "pin", "unpin"):
        return _models_change(args)
    reg = _existing_registry(args.registry)
    if args.models_command == "verify":
        manifest = reg.verify(args.name, args.model_version)
        print(f"{args.name} {args.model_version}: OK ({len(manifest['files'])} files verified)")
        return 0
    data = _registry_rows(reg)
    if args.json:
        for row in data:
            print(json.dumps(row))
    elif not data:
        print(f"no models in {args.registry}")
    else:
        rows = [(d["name"], d["version"], d["task"] or "-",
                 ",".join([*d["channels"], *(["pin"] if d["pinned"] else [])]) or "-",
                 _headline_metric(d["metrics"]) if not d.get("error") else
                 f"unreadable: {d['error']}", d["created_at"] or "-") for d in data]
        print(format_table(rows, ["model", "version", "task", "channels", "eval", "created"]))
    return 1 if any(d.get("error") for d in data) else 0


def _registry_rows(reg) -> list[dict[str, Any]]:
    """One row per version. A version, channel or pin that cannot be read is shown as
    such (`error`), and the rest are listed all the same."""
    data: list[dict[str, Any]] = []
    for name in reg.model_names():
        problems: list[str] = []
        try:
            channels = reg.channels_of(name)
        except TuneserveError as exc:
            channels, problems = {}, [exc.message]
        try:
            pinned = reg.pinned(name)
        except TuneserveError as exc:
            pinned, problems = None, [*problems, exc.message]
        for version in reg.versions(name):
            row: dict[str, Any] = {
                "name": name, "version": version, "task": None,
                "channels": [c for c, v in channels.items() if v == version],
                "pinned": version == pinned, "metrics": {}, "created_at": None}
            try:
                m = reg.manifest(name, version)
            except TuneserveError as exc:
                row["error"] = exc.message
            else:
                metrics = m.get("metrics")
                row.update(task=m.get("task"), created_at=m.get("created_at"),
                           metrics=metrics if isinstance(metrics, dict) else {})
            if problems and not row.get("error"):
                row["error"] = "; ".join(problems)
            data.append(row)
    return data


def _existing_registry(location: str):
    """The registry at `location`; a local one must be a folder that exists."""
    from services.core.registry import Registry

    reg = Registry(location)
    root = Path(reg.backend.root)
    if not reg.backend.remote and not root.is_dir():
        why = "a file, not a folder" if root.exists() else "no such folder"
        raise InvalidInput(f"--registry: no registry at {location} ({why})")
    return reg


def _headline_metric(metrics: dict) -> str:
    """A classifier's accuracy, a generator's perplexity, from a manifest's metrics."""
    for key, fmt in (("accuracy", ".4f"), ("perplexity", ".3f"), ("loss", ".4f")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{key} {value:{fmt}}"
    return "-"


def _models_change(args: argparse.Namespace) -> int:
    """promote / rollback / pin / unpin, on the registry or through the Admin API."""
    action = args.models_command
    version = getattr(args, "model_version", None)
    channel = getattr(args, "channel", "production")
    if args.token_file and not args.address:
        raise InvalidInput("--token-file: only with --address (the Admin API)")
    if args.address:
        from services.client import Client, token_from

        token = token_from(args.token_file, "TUNESERVE_ADMIN_TOKEN") \
            if args.token_file else None
        with Client(args.address, admin_token=token) as client:
            call = {"promote": lambda: client.promote(args.name, version, channel),
                    "rollback": lambda: client.rollback(args.name, channel),
                    "pin": lambda: client.pin(args.name, version),
                    "unpin": lambda: client.unpin(args.name)}[action]
            resp = call()
        now, before = resp.version, resp.previous_version
    else:
        reg = _existing_registry(args.registry or DEFAULT_REGISTRY)
        if action == "promote":
            before = reg.channel(args.name, channel)
            reg.verify(args.name, version)
            reg.set_channel(args.name, channel, version)
            now = version
        elif action == "rollback":
            before = reg.channel(args.name, channel)
            now = reg.rollback(args.name, channel)
        elif action == "pin":
            before = reg.pinned_or_unreadable(args.name)
            reg.verify(args.name, version)
            reg.pin(args.name, version)
            now = version
        else:
            before = reg.pinned_or_unreadable(args.name)
            reg.unpin(args.name)
            now = ""
    target = channel if action in ("promote", "rollback") else "pin"
    print(f"{args.name} {target}: {before or '-'} -> {now or '-'}")
    if action in ("promote", "rollback") and not args.address:
        pinned = reg.pinned_or_unreadable(args.name)
        if pinned:
            print(f"note: {args.name} is pinned to {pinned}: replicas serve it until "
                  f"`tuneserve models unpin {args.name}`", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from services.evaluate import run_eval

    if args.confusion_png:  # checked before the evaluation, not after it
        png = Path(args.confusion_png)
        if png.suffix.lower() != ".png":
            raise InvalidInput(f"--confusion-png: a .png file name, got {args.confusion_png}")
        if png.is_dir():
            raise InvalidInput(f"--confusion-png: {args.confusion_png} is a folder")
        if png.parent.exists() and not png.parent.is_dir():
            raise InvalidInput(f"--confusion-png: cannot write {args.confusion_png}: "
                               f"{png.parent} is not a folder")

    report = run_eval(data=args.data, model=args.model, registry=args.registry,
                      address=args.address, text_column=args.text_column,
                      label_column=args.label_column, columns=args.columns,
                      batch_size=args.batch_size, limit=args.limit, timeout_s=args.timeout_s,
                      token_file=args.token_file)
    png = str(report.write_png(args.confusion_png)) if args.confusion_png else None
    if args.json:
        print(json.dumps({**report.to_json(), "confusion_png": png}))
    else:
        print(report.format())
        if png:
            print(f"\nconfusion matrix plot: {png}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.demo import run_demo

    return run_demo(workers=args.workers, epochs=args.epochs, grpc_port=args.grpc_port,
                    home=args.home, verbose=args.verbose)


def cmd_k8s(args: argparse.Namespace) -> int:
    from services.k8s import run

    return run(args)


COMMANDS = {"train": cmd_train, "serve": cmd_serve, "classify": cmd_classify,
            "generate": cmd_generate, "eval": cmd_eval,
            "models": cmd_models, "demo": cmd_demo, "k8s": cmd_k8s}


def main(argv: Optional[Sequence[str]] = None) -> int:
    import grpc

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TuneserveError as exc:
        if args.verbose:
            raise
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidInput) else 1
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        # the server found the input bad: as when the CLI finds it so
        return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    except BrokenPipeError:  # output piped into `head` and the like
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:
        if args.verbose:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
