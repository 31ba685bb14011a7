"""`tuneserve k8s ...`: training RayJobs and version pins on a KubeRay cluster.

    tuneserve k8s train --config run.yaml [--epochs 5 ...] [--watch] [--dry-run]
    tuneserve k8s status JOB [--json]
    tuneserve k8s logs JOB [--follow] [--tail N]
    tuneserve k8s delete JOB [--dry-run]
    tuneserve k8s promote MODEL VERSION [--service tuneserve] [--dry-run | --file F]
    tuneserve k8s unpin MODEL

The cluster comes from --kubeconfig, $KUBECONFIG or ~/.kube/config (--context picks a
context), or from the in-cluster service account. `register(subparsers)` adds this tree
to an argparse parser; `run(args)` carries it out and returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from services.core.config import (
    TrainConfig,
    field_help,
    load_yaml_mapping,
    template_from_flag,
)
from services.core.errors import ConfigError, InvalidInput
from services.k8s import objects
from services.k8s.client import JobFailed, Kube
from services.k8s.manifest import pin_in_manifest
from services.k8s.objects import (
    APP_NAME,
    DEFAULT_NAMESPACE,
    DEFAULT_PVC,
    DEFAULT_RAYSERVICE,
    JobOptions,
)


def _field_help() -> dict[str, str]:
    try:
        return field_help(TrainConfig)  # the same texts as `tuneserve train`
    except Exception:  # help texts only: never fail the parser for them
        return {}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed like `tuneserve train`'s; None = not given."""
    helps = _field_help()
    group = p.add_argument_group("run config (override fields of --config)")
    for f in objects.train_flag_fields():
        flag = "--" + f.name.replace("_", "-")
        hint = str(f.type)
        text = helps.get(f.name)
        if "bool" in hint and "Optional" in hint:  # on, off, or the task's default
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=text)
        elif "bool" in hint:
            group.add_argument(flag, dest=f.name, action="store_true", default=None, help=text)
        elif "float" in hint:
            group.add_argument(flag, dest=f.name, type=float, default=None, help=text,
                               metavar="X")
        elif "int" in hint:
            group.add_argument(flag, dest=f.name, type=int, default=None, help=text,
                               metavar="N")
        else:
            group.add_argument(flag, dest=f.name, default=None, help=text,
                               metavar="A,B" if "list" in hint else "VALUE")


def register(subparsers, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """Add `k8s` and its actions to an argparse subparsers object; returns its parser.
    `prog`: the command's name in usage lines, where it is not `... k8s`."""
    parser = subparsers.add_parser(
        "k8s", help="train and pin versions on Kubernetes (KubeRay RayJob / RayService)",
        **({"prog": prog} if prog else {}),
        description="Submit and follow training RayJobs; pin the version a RayService "
                    "serves. See docs/kubernetes.md.")
    actions = parser.add_subparsers(dest="k8s_command", required=True, metavar="ACTION")
    common = _cluster_flags()
    for register_action in (_register_train, _register_status, _register_logs,
                            _register_delete):
        register_action(actions, common)
    for action, text in PIN_ACTIONS:
        _register_pin(actions, common, action, text)
    return parser


def _cluster_flags() -> argparse.ArgumentParser:
    """The flags every action takes: which cluster and namespace."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--namespace", "-n", default=DEFAULT_NAMESPACE,
                        help=f"namespace of the RayJobs and the RayService "
                             f"(default: {DEFAULT_NAMESPACE})")
    common.add_argument("--kubeconfig", default=None,
                        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then "
                             "the in-cluster service account)")
    common.add_argument("--context", default=None, help="kubeconfig context")
    return common


def _register_train(actions, common: argparse.ArgumentParser) -> None:
    p = actions.add_parser("train", parents=[common],
                           help="run `tuneserve train` as a KubeRay RayJob",
                           description="Builds a RayJob and a ConfigMap holding the run "
                                       "config (registry and runs on the shared volume) and "
                                       "creates them.")
    p.add_argument("--config", help="YAML run config, as for `tuneserve train`")
    _add_train_flags(p)
    g = p.add_argument_group("cluster")
    g.add_argument("--job-name", default=None,
                   help="RayJob name (default: train-<model>-<UTC time>)")
    g.add_argument("--image", default=None,
                   help="image for head, workers and submitter (default: "
                        "tuneserve:<version>-cpu, or -cu128 with --use-gpu)")
    g.add_argument("--pvc", default=DEFAULT_PVC,
                   help=f"ReadWriteMany claim mounted at /data (default: {DEFAULT_PVC})")
    g.add_argument("--head-cpus", default="2")
    g.add_argument("--head-memory", default="6Gi")
    g.add_argument("--worker-cpus", default=None,
                   help="per worker pod (default: cpus_per_worker rounded up)")
    g.add_argument("--worker-memory", default="6Gi")
    g.add_argument("--gpus-per-worker", type=int, default=None,
                   help="with --use-gpu (default: 1)")
    g.add_argument("--ttl-s", type=int, default=600,
                   help="keep the finished cluster this long for logs (default: 600)")
    g.add_argument("--backoff-limit", type=int, default=1, help="retries on a new cluster")
    g.add_argument("--watch", action="store_true",
                   help="follow the job until it finishes; print the published version")
    g.add_argument("--interval-s", type=float, default=5.0, help="polling interval of --watch")
    g.add_argument("--timeout-s", type=float, default=None,
                   help="stop watching after this long (the job goes on)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the ConfigMap and RayJob as YAML; contact no cluster")
    p.set_defaults(handler=cmd_train)


def _register_status(actions, common: argparse.ArgumentParser) -> None:
    p = actions.add_parser("status", parents=[common], help="state of a training RayJob")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--json", action="store_true", help="the RayJob's status as JSON")
    p.set_defaults(handler=cmd_status)


def _register_logs(actions, common: argparse.ArgumentParser) -> None:
    p = actions.add_parser("logs", parents=[common], help="the training driver's log")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--tail", type=int, default=None, metavar="N", help="last N lines only")
    p.set_defaults(handler=cmd_logs)


def _register_delete(actions, common: argparse.ArgumentParser) -> None:
    p = actions.add_parser("delete", parents=[common],
                           help="delete a RayJob (its cluster and run config go with it)")
    p.add_argument("job", metavar="JOB")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted")
    p.set_defaults(handler=cmd_delete)


PIN_ACTIONS = (("promote", "pin the version a model's replicas serve "
                           "(declarative: edits the RayService's serveConfigV2)"),
               ("unpin", "let a model's replicas follow their channel again"))


def _register_pin(actions, common: argparse.ArgumentParser, action: str, text: str) -> None:
    p = actions.add_parser(action, parents=[common], help=text)
    p.add_argument("model", metavar="MODEL")
    if action == "promote":
        p.add_argument("version", metavar="VERSION", help="e.g. v3")
    p.add_argument("--service", default=DEFAULT_RAYSERVICE,
                   help=f"RayService name (default: {DEFAULT_RAYSERVICE})")
    p.add_argument("--app", default=APP_NAME,
                   help=f"Serve application name (default: {APP_NAME})")
    p.add_argument("--dry-run", action="store_true",
                   help="print the patch instead of applying it")
    p.add_argument("--file", default=None, metavar="MANIFEST_YAML",
                   help="edit this manifest instead of the cluster's RayService and "
                        "print the result, changed only in the pin (no cluster "
                        "needed): a RayService, or an overlay's patch of "
                        "/spec/serveConfigV2 (k8s/overlays/gpu/rayservice-gpu.yaml)")
    p.add_argument("--in-place", action="store_true",
                   help="with --file: write the result back to the file")
    p.set_defaults(handler=cmd_promote if action == "promote" else cmd_unpin)


# ---- actions ---------------------------------------------------------------------------
def _connect(args: argparse.Namespace) -> Kube:
    objects.check_k8s_name(args.namespace, "namespace", 63)
    return Kube.connect(args.namespace, kubeconfig=args.kubeconfig, context=args.context)


MIN_WATCH_INTERVAL_S = 0.5
"""--watch polls the API server no more often than this."""


def _check_watch_flags(args: argparse.Namespace) -> None:
    """--interval-s and --timeout-s: finite seconds (nan passes no comparison, and the
    watch loop would sleep a negative or nan interval)."""
    interval = args.interval_s
    if not math.isfinite(interval) or interval < MIN_WATCH_INTERVAL_S:
        raise InvalidInput(f"--interval-s: must be a number of seconds >= "
                           f"{MIN_WATCH_INTERVAL_S:g}, got {interval}")
    timeout = args.timeout_s
    if timeout is not None and (not math.isfinite(timeout) or timeout <= 0):
        raise InvalidInput(f"--timeout-s: must be a number of seconds > 0 (leave it out "
                           f"to watch until the job ends), got {timeout}")


def _train_objects(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    _check_watch_flags(args)
    file_data = load_yaml_mapping(args.config) if args.config else {}
    overrides = {f.name: getattr(args, f.name) for f in objects.train_flag_fields()}
    if overrides.get("prompt_template"):
        overrides["prompt_template"] = template_from_flag(overrides["prompt_template"])
    run_config, cfg = objects.resolve_run_config(
        file_data, overrides, source=args.config or "command line")
    for name in objects.paths_outside_cluster(cfg):
        print(f"warning: {name} = {getattr(cfg, name)!r} is read inside the pods; put it on "
              f"the shared volume (under {objects.DATA_MOUNT}/) or use a Hugging Face id",
              file=sys.stderr)
    for name, value in (("ttl-s", args.ttl_s), ("backoff-limit", args.backoff_limit)):
        if value < 0:
            raise InvalidInput(f"--{name}: must be >= 0, got {value}")
    if args.gpus_per_worker is not None and not cfg.use_gpu:
        raise InvalidInput("--gpus-per-worker: applies to a run that uses GPUs; pass "
                           "--use-gpu too (or drop it)")
    gpus_per_worker = 1 if args.gpus_per_worker is None else args.gpus_per_worker
    if cfg.use_gpu and gpus_per_worker < 1:
        raise InvalidInput("--gpus-per-worker: the run uses GPUs (use_gpu), so at least 1")
    objects.cpu_quantity(args.head_cpus, "--head-cpus")
    objects.memory_quantity(args.head_memory, "--head-memory")
    objects.memory_quantity(args.worker_memory, "--worker-memory")
    objects.check_claim_name(args.pvc)
    if args.image is not None:
        objects.image_reference(args.image)
    if args.worker_cpus is not None and \
            objects.cpu_quantity(args.worker_cpus, "--worker-cpus") < cfg.cpus_per_worker:
        # Ray Train would wait forever for a worker slot that no pod offers.
        raise InvalidInput(f"--worker-cpus: {args.worker_cpus} is less than cpus_per_worker "
                           f"({cfg.cpus_per_worker:g}) of the run")
    opts = JobOptions(namespace=args.namespace, image=args.image, job_name=args.job_name,
                      pvc=args.pvc, head_cpus=args.head_cpus, head_memory=args.head_memory,
                      worker_cpus=args.worker_cpus, worker_memory=args.worker_memory,
                      gpus_per_worker=gpus_per_worker, ttl_s=args.ttl_s,
                      backoff_limit=args.backoff_limit)
    return objects.build_train_objects(run_config, cfg, opts)


def cmd_train(args: argparse.Namespace) -> int:
    config_map, rayjob = _train_objects(args)
    if args.dry_run:
        print(objects.to_yaml(config_map, rayjob), end="")
        return 0
    kube = _connect(args)
    kube.create_train_job(config_map, rayjob)
    name = rayjob["metadata"]["name"]
    print(f"created RayJob {name} in namespace {args.namespace} "
          f"(run config: ConfigMap {config_map['metadata']['name']})")
    if not args.watch:
        print(f"follow it:  tuneserve k8s status {name}   |   tuneserve k8s logs {name} -f")
        return 0
    return _watch(kube, name, args)


def _watch(kube: Kube, name: str, args: argparse.Namespace) -> int:
    try:
        state = kube.watch_job(name, out=lambda line: print(line, flush=True),
                               interval_s=args.interval_s, timeout_s=args.timeout_s)
    except KeyboardInterrupt:
        print(f"\nstopped watching; the job goes on: tuneserve k8s status {name}",
              file=sys.stderr)
        return 130
    if not state.succeeded:
        raise JobFailed(f"RayJob {name} failed: {state.message or state.reason or 'no message'}"
                        f" (tuneserve k8s logs {name})")
    published = kube.published_by(name)
    if published:
        model, version = published
        print(f"published {model} {version}")
        print(f"pin it on the RayService:  tuneserve k8s promote {model} {version}")
    else:
        print(f"finished; no published version in the log (tuneserve k8s logs {name})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = _connect(args).get_job(args.job)
    if args.json:
        print(json.dumps({"name": state.name, **(state.raw.get("status") or {})}))
        return 0
    rows = [("deployment", state.deployment_status), ("job", state.job_status),
            ("cluster", state.cluster), ("started", state.start_time),
            ("ended", state.end_time), ("message", state.message)]
    print(f"RayJob {state.name} (namespace {args.namespace})")
    for key, value in rows:
        print(f"  {key:<11}{value or '-'}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    kube = _connect(args)
    if args.follow:
        for chunk in kube.follow_logs(args.job):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        return 0
    print(kube.job_logs(args.job, tail_lines=args.tail), end="")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    objects.check_k8s_name(args.job, "job")
    if args.dry_run:
        print(objects.to_yaml({"apiVersion": f"{objects.RAY_GROUP}/{objects.RAY_API_VERSION}",
                               "kind": "RayJob",
                               "metadata": {"name": args.job, "namespace": args.namespace}}),
              end="")
        return 0
    _connect(args).delete_job(args.job)
    print(f"deleted RayJob {args.job} (namespace {args.namespace}); its cluster and run "
          "config follow")
    return 0


def _pin(args: argparse.Namespace, version: Optional[str]) -> int:
    if version is not None:
        objects.check_version(version)  # before any cluster or file is read
    if args.file:
        return _pin_file(args, version)
    if args.in_place:
        raise InvalidInput("--in-place: edits the --file manifest; pass --file too")
    patch = _connect(args).pin(args.service, args.model, version, app=args.app,
                               dry_run=args.dry_run)
    if args.dry_run:
        print(objects.to_yaml(patch), end="")
        return 0
    what = f"pinned {args.model} to {version}" if version else \
        f"unpinned {args.model} (follows its channel)"
    print(f"{what} on RayService {args.service} (namespace {args.namespace}); the replicas "
          "load it in place, the old version serves until the new one is verified")
    return 0


def _pin_file(args: argparse.Namespace, version: Optional[str]) -> int:
    """Pin in a manifest file (a RayService, or an overlay's serveConfigV2 patch), keeping
    the rest of the file as it is; print it, or with --in-place write it back."""
    try:
        with open(args.file, encoding="utf-8") as fh:
            text = fh.read()
        list(yaml.safe_load_all(text))
    except OSError as exc:
        raise ConfigError(f"{args.file}: {exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        why = str(getattr(exc, "problem", None) or exc).splitlines()[0]
        raise ConfigError(f"{args.file}: not valid YAML: {why}") from None
    edited = pin_in_manifest(text, service=args.service, model=args.model, version=version,
                             app=args.app, source=args.file)
    if not edited.kept_comments:
        print(f"note: {args.file}: serveConfigV2 of {edited.where} was written out anew "
              "(its comments and layout were not kept)", file=sys.stderr)
    if not args.in_place:
        print(edited.text, end="")
        return 0
    target = Path(args.file)
    temp = target.with_name(f".{target.name}.tuneserve-tmp")
    temp.write_text(edited.text, encoding="utf-8")
    os.replace(temp, target)  # a reader never sees half a file
    what = f"pinned {args.model} to {version}" if version else f"unpinned {args.model}"
    print(f"{what} in {args.file} ({edited.where})", file=sys.stderr)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    return _pin(args, args.version)


def cmd_unpin(args: argparse.Namespace) -> int:
    return _pin(args, None)


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed `tuneserve k8s ...` (the action's handler, set by `register`);
    raises TuneserveError for the CLI to print."""
    return args.handler(args)
