"""The Kubernetes objects `tuneserve k8s` creates or changes, as plain dicts.

Pure functions, no cluster and no `kubernetes` import: a training RayJob and the
ConfigMap with its run config, built from the same YAML and flags `tuneserve train`
reads; and the edit of a RayService's serveConfigV2 that pins a model's version.
They mirror k8s/base (rayjob-train.yaml, rayservice.yaml); a test keeps the two alike.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import math
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Optional

import yaml

from services import __version__
from services.core.config import ResolvedTrainConfig, TrainConfig
from services.core.errors import ConfigError, InvalidInput

RAY_GROUP = "ray.io"
RAY_API_VERSION = "v1"
APP_NAME = "tuneserve"
ENTRYPOINT = "python -m services train --config /config/run.yaml"
CONFIG_MOUNT = "/config"
CONFIG_KEY = "run.yaml"
DATA_MOUNT = "/data"
REGISTRY_PATH = f"{DATA_MOUNT}/registry"
RUNS_PATH = f"{DATA_MOUNT}/runs"
DEFAULT_NAMESPACE = "tuneserve"
DEFAULT_PVC = "tuneserve-data"
DEFAULT_RAYSERVICE = "tuneserve"
# KubeRay appends 6 characters to a RayJob's name for its RayCluster (max 53), and the
# name must be a DNS-1035 label.
MAX_JOB_NAME = 47
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_VERSION = re.compile(r"^v[1-9][0-9]*$")
COMMON_LABELS = {"app.kubernetes.io/name": "tuneserve",
                 "app.kubernetes.io/part-of": "tuneserve",
                 "app.kubernetes.io/component": "training",
                 "app.kubernetes.io/managed-by": "tuneserve"}


def ray_version() -> str:
    """The installed Ray: the image is built with the same pin (pyproject.toml)."""
    return metadata.version("ray")


@dataclass
class JobOptions:
    """Where and how big the training cluster is; the run itself is the TrainConfig."""

    namespace: str = DEFAULT_NAMESPACE
    image: Optional[str] = None
    """Default: tuneserve:<version>-cpu, or -cu128 when the run uses GPUs."""
    job_name: Optional[str] = None
    pvc: str = DEFAULT_PVC
    head_cpus: str = "2"
    head_memory: str = "6Gi"
    worker_cpus: Optional[str] = None
    """Default: cpus_per_worker rounded up."""
    worker_memory: str = "6Gi"
    gpus_per_worker: int = 1
    """Only when the run has use_gpu."""
    ttl_s: int = 600
    backoff_limit: int = 1
    active_deadline_s: int = 86400

    def resolved_image(self, cfg: ResolvedTrainConfig) -> str:
        if self.image:
            return self.image
        return f"tuneserve:{__version__}-{'cu128' if cfg.use_gpu else 'cpu'}"


def check_k8s_name(name: str, what: str, max_len: int = MAX_JOB_NAME) -> str:
    if len(name) > max_len or not _DNS1035.match(name):
        raise InvalidInput(
            f"{what} {name!r}: must be at most {max_len} characters of lower-case letters, "
            "digits and '-', starting with a letter and ending with a letter or digit")
    return name


_HOST = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# An image reference as the container runtimes parse it: [host[:port]/]path[:tag][@digest].
_IMAGE = re.compile(rf"^(?:{_HOST}(?:\.{_HOST})*(?::\d+)?/)?{_PATH_PART}(?:/{_PATH_PART})*"
                    r"(?::[\w][\w.-]{0,127})?"
                    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$")


def image_reference(value: str, what: str = "--image") -> str:
    """A container image reference (registry.example.com/ml/tuneserve:0.1.0-cpu)."""
    if len(value) > 255 or not _IMAGE.match(value):
        raise InvalidInput(f"{what}: {value!r} is not an image reference "
                           "([REGISTRY/]NAME[:TAG][@DIGEST], lower-case name, e.g. "
                           "registry.example.com/ml/tuneserve:0.1.0-cpu)")
    return value


def pull_policy(image: str) -> str:
    """A tag can be moved to other bytes, so it is pulled at every start (Always); a
    digest names its bytes for good, so a copy on the node is the same (IfNotPresent)."""
    return "IfNotPresent" if "@" in image else "Always"


def cpu_quantity(value: str, what: str) -> float:
    """A Kubernetes CPU quantity ("2", "1.5", "500m") in CPUs, more than 0."""
    number = value.removesuffix("m")
    if not _PLAIN_NUMBER.match(number) or float(number) <= 0:
        raise InvalidInput(f"{what}: {value!r} is not a CPU quantity above 0 (e.g. 2, 1.5, "
                           "500m)")
    return float(number) / (1000 if value.endswith("m") else 1)


_PLAIN_NUMBER = re.compile(r"^(\d+(\.\d*)?|\.\d+)$")
_MEMORY = re.compile(r"^(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[kMGTPE])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def memory_quantity(value: str, what: str) -> str:
    """A Kubernetes memory quantity ("6Gi", "512Mi", "8G", "1000000"), more than 0."""
    match = _MEMORY.match(value)
    if not match or float(match.group(1)) <= 0:
        raise InvalidInput(f"{what}: {value!r} is not a memory quantity above 0 (e.g. 6Gi, "
                           "512Mi, 8G)")
    return value


def check_claim_name(name: str, what: str = "--pvc") -> str:
    """A PersistentVolumeClaim name: a DNS-1123 subdomain."""
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        raise InvalidInput(f"{what} {name!r}: a claim name is at most 253 characters of "
                           "lower-case letters, digits, '-' and '.', starting and ending "
                           "with a letter or digit")
    return name


def check_version(version: str) -> str:
    if not _VERSION.match(version):
        raise InvalidInput(f"version {version!r}: expected v<N>, e.g. v3")
    return version


def default_job_name(model_name: str, now: Optional[_dt.datetime] = None) -> str:
    """train-<model>-<UTC time>, cut to fit KubeRay's limit."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-") or "model"
    slug = slug[:MAX_JOB_NAME - len("train--") - len(stamp)].strip("-")
    return f"train-{slug}-{stamp}"


def resolve_run_config(file_data: dict[str, Any], overrides: dict[str, Any],
                       source: str = "config") -> tuple[dict[str, Any], ResolvedTrainConfig]:
    """The run config the cluster gets, and the resolved config it gives.

    The YAML mapping stays as written, with the command-line overrides applied; only the
    registry and run-state paths move to the shared volume, and `address` goes (inside
    a RayJob the entrypoint finds its cluster through RAY_ADDRESS). The result is
    validated here exactly as `tuneserve train` validates it, so a bad field fails
    before anything is submitted.
    """
    data = {k.replace("-", "_"): v for k, v in file_data.items()}
    data.update({k: v for k, v in overrides.items() if v is not None})
    data["registry"] = REGISTRY_PATH
    data["runs_dir"] = RUNS_PATH
    data.pop("address", None)
    return data, TrainConfig.from_dict(copy.deepcopy(data), source=source).resolve()


def paths_outside_cluster(cfg: ResolvedTrainConfig) -> list[str]:
    """Fields naming local paths that the pods cannot see (not on the shared volume)."""
    out = []
    for name in ("train", "eval"):
        value = getattr(cfg, name)
        if value and "://" not in value and not value.startswith(DATA_MOUNT + "/"):
            out.append(name)
    if cfg.model and (cfg.model.startswith(("/", ".", "~")) and
                      not cfg.model.startswith(DATA_MOUNT + "/")):
        out.append("model")
    return out


def _restricted_container() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


def _restricted_pod(fs_group: bool = True) -> dict[str, Any]:
    ctx: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100}
    if fs_group:
        ctx["fsGroup"] = 100
    ctx["seccompProfile"] = {"type": "RuntimeDefault"}
    return ctx


def _ray_env() -> list[dict[str, str]]:
    return [{"name": "HOME", "value": "/tmp"},
            {"name": "HF_HOME", "value": "/tmp/huggingface"},
            {"name": "TUNESERVE_HOME", "value": DATA_MOUNT}]


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    amounts = {"cpu": cpu, "memory": memory}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def build_train_objects(run_config: dict[str, Any], cfg: ResolvedTrainConfig,
                        opts: JobOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ConfigMap, RayJob) for one training run; `run_config` goes in unchanged but for
    its run_name, the job's name when unset."""
    name = check_k8s_name(opts.job_name or default_job_name(cfg.name or "model"), "job name")
    check_k8s_name(opts.namespace, "namespace", 63)
    image = opts.resolved_image(cfg)
    # A retry of the RayJob, or the job submitted again under its name, resumes the run
    # from its last checkpoint (TrainConfig.run_name): the run is named after the job.
    run_config = {**run_config, "run_name": run_config.get("run_name") or name}
    labels = dict(COMMON_LABELS)  # one dict: the YAML names it once and refers to it
    config_map = _config_map(name, opts.namespace, labels, run_config)
    head = _head_group(image, labels, opts, config_map["metadata"]["name"])
    worker_pod = _worker_pod(image, cfg, opts)
    rayjob = {
        "apiVersion": f"{RAY_GROUP}/{RAY_API_VERSION}",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": opts.namespace,
                     "labels": {**labels, "tuneserve.dev/model": cfg.name or ""}},
        "spec": {
            "entrypoint": ENTRYPOINT,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": opts.ttl_s,
            "backoffLimit": opts.backoff_limit,
            "activeDeadlineSeconds": opts.active_deadline_s,
            "submitterPodTemplate": _submitter_template(image, labels),
            "rayClusterSpec": {
                "rayVersion": ray_version(),
                # Ray token auth on GCS, dashboard and client port (k8s/base/rayjob-train.yaml)
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": False,
                "headGroupSpec": head,
                "workerGroupSpecs": [{
                    "groupName": "train",
                    "replicas": cfg.workers, "minReplicas": cfg.workers,
                    "maxReplicas": cfg.workers,
                    "rayStartParams": {"metrics-export-port": "8080"},
                    "template": {"metadata": {"labels": labels}, "spec": worker_pod},
                }],
            },
        },
    }
    return config_map, rayjob


def _config_map(job_name: str, namespace: str, labels: dict[str, str],
                run_config: dict[str, Any]) -> dict[str, Any]:
    """The run config as run.yaml, for the pods to mount at CONFIG_MOUNT."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{job_name}-config", "namespace": namespace,
                     "labels": {**labels, "tuneserve.dev/rayjob": job_name}},
        "data": {CONFIG_KEY: yaml.safe_dump(run_config, sort_keys=False)},
    }


def _pod_volumes(pvc: str) -> list[dict[str, Any]]:
    """/tmp (emptyDir) and the shared volume, as head and workers mount them."""
    return [{"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": pvc}}]


def _pod_mounts() -> list[dict[str, Any]]:
    return [{"name": "tmp", "mountPath": "/tmp"}, {"name": "data", "mountPath": DATA_MOUNT}]


def _head_group(image: str, labels: dict[str, str], opts: JobOptions,
                config_map_name: str) -> dict[str, Any]:
    """The head pod: no training work (num-cpus 0); it mounts the run config."""
    return {
        "rayStartParams": {"num-cpus": "0", "metrics-export-port": "8080"},
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "automountServiceAccountToken": False,
                "securityContext": _restricted_pod(),
                "containers": [{
                    "name": "ray-head", "image": image, "imagePullPolicy": pull_policy(image),
                    "ports": [{"name": "gcs-server", "containerPort": 6379},
                              {"name": "dashboard", "containerPort": 8265},
                              {"name": "client", "containerPort": 10001},
                              {"name": "metrics", "containerPort": 8080}],
                    "env": _ray_env(),
                    "resources": _resources(opts.head_cpus, opts.head_memory),
                    "securityContext": _restricted_container(),
                    "volumeMounts": _pod_mounts() + [{"name": "run-config",
                                                      "mountPath": CONFIG_MOUNT,
                                                      "readOnly": True}],
                }],
                "volumes": _pod_volumes(opts.pvc) + [{"name": "run-config",
                                                      "configMap": {"name": config_map_name}}],
            },
        },
    }


def _worker_pod(image: str, cfg: ResolvedTrainConfig, opts: JobOptions) -> dict[str, Any]:
    """A training worker's pod spec: cpus_per_worker rounded up unless --worker-cpus,
    GPUs (and their taint's toleration) when the run uses them."""
    gpus = opts.gpus_per_worker if cfg.use_gpu else 0
    worker_cpus = opts.worker_cpus or str(max(1, math.ceil(cfg.cpus_per_worker)))
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": _restricted_pod(),
        "containers": [{
            "name": "ray-worker", "image": image, "imagePullPolicy": pull_policy(image),
            "ports": [{"name": "metrics", "containerPort": 8080}],
            "env": _ray_env(),
            "resources": _resources(worker_cpus, opts.worker_memory, gpus),
            "securityContext": _restricted_container(),
            "volumeMounts": _pod_mounts(),
        }],
        "volumes": _pod_volumes(opts.pvc),
    }
    if gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                               "effect": "NoSchedule"}]
    return pod


def _submitter_template(image: str, labels: dict[str, str]) -> dict[str, Any]:
    """The pod that submits the entrypoint to the cluster and follows it."""
    return {
        "metadata": {"labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": _restricted_pod(fs_group=False),
            "containers": [{
                "name": "ray-job-submitter", "image": image, "imagePullPolicy": pull_policy(image),
                "env": [{"name": "HOME", "value": "/tmp"}],
                "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                              "limits": {"cpu": "1", "memory": "1Gi"}},
                "securityContext": _restricted_container(),
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}],
        },
    }


def owner_reference(rayjob: dict[str, Any]) -> dict[str, Any]:
    """Makes the RayJob own its ConfigMap: deleting the job deletes the config."""
    meta = rayjob["metadata"]
    return {"apiVersion": rayjob["apiVersion"], "kind": rayjob["kind"], "name": meta["name"],
            "uid": meta["uid"], "blockOwnerDeletion": False}


# ---- pinning a version on the RayService --------------------------------------------
COLOCATED_INGRESS = "ingress"
"""The deployment that holds the models when the app's args set `colocate` (same as
services.serving.app.INGRESS_DEPLOYMENT, kept import-free of Ray)."""


def deployment_name(model: str) -> str:
    """Same rule as services.serving.app.model_deployment_name (kept import-free of Ray)."""
    return f"model-{model}"


def pin_version(serve_config: str, model: str, version: Optional[str], *,
                app: str = APP_NAME) -> str:
    """serveConfigV2 with `model`'s deployment pinned to `version` (None: follow channel).

    Only user_config.pinned_version of deployment model-<model> changes (with the app's
    `colocate` arg, where the models run inside the ingress: the ingress deployment's
    user_config.pinned_versions[model]); a missing deployment entry is added with the
    app's channel and poll interval. Serve applies a user_config change through
    `reconfigure` on the running replicas: no restart.
    """
    if version is not None:
        check_version(version)
    try:
        doc = yaml.safe_load(serve_config) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"serveConfigV2 is not valid YAML: {exc}") from None
    apps = doc.get("applications") or []
    found = [a for a in apps if isinstance(a, dict) and a.get("name") == app]
    if not found:
        names = ", ".join(str(a.get("name")) for a in apps if isinstance(a, dict)) or "none"
        raise ConfigError(f"serveConfigV2 has no application {app!r} (applications: {names})")
    application = found[0]
    args = application.get("args") or {}
    served = args.get("models")
    if served and model not in served:
        raise ConfigError(f"model {model!r} is not served by application {app!r} "
                          f"(args.models: {', '.join(served)})")
    deployments = application.setdefault("deployments", [])
    colocated = bool(args.get("colocate"))
    name = COLOCATED_INGRESS if colocated else deployment_name(model)
    entry = next((d for d in deployments if d.get("name") == name), None)
    if entry is None:
        entry = {"name": name}
        deployments.append(entry)
    user_config = dict(entry.get("user_config") or {})
    user_config.setdefault("channel", args.get("channel", "production"))
    if colocated:
        pins = dict(user_config.get("pinned_versions") or args.get("pinned_versions") or {})
        pins[model] = version
        user_config["pinned_versions"] = pins
    else:
        user_config["pinned_version"] = version
    user_config.setdefault("poll_interval_s", args.get("poll_interval_s", 2.0))
    entry["user_config"] = user_config
    return yaml.safe_dump(doc, sort_keys=False)


def pinned_versions(serve_config: str, app: str = APP_NAME) -> dict[str, Optional[str]]:
    """model -> pinned version (None: follows its channel), from a serveConfigV2."""
    doc = yaml.safe_load(serve_config) or {}
    out: dict[str, Optional[str]] = {}
    for application in doc.get("applications") or []:
        if application.get("name") != app:
            continue
        for dep in application.get("deployments") or []:
            name = str(dep.get("name", ""))
            user_config = dep.get("user_config") or {}
            if name.startswith("model-"):
                out[name[len("model-"):]] = user_config.get("pinned_version")
            elif name == COLOCATED_INGRESS and (application.get("args") or {}).get("colocate"):
                out.update(user_config.get("pinned_versions") or {})
    return out


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (run.yaml, serveConfigV2) as `|` blocks, readable in a diff."""


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value and not any(c in value for c in "\t\r") and \
        not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def to_yaml(*objects: dict[str, Any]) -> str:
    return "---\n".join(yaml.dump(o, Dumper=_BlockDumper, sort_keys=False) for o in objects)


def train_flag_fields() -> list[dataclasses.Field]:
    """TrainConfig fields that `tuneserve k8s train` takes as flags (as `tuneserve train`
    does), less those the cluster decides: paths on the shared volume and the address."""
    skip = {"extra", "registry", "runs_dir", "address"}
    return [f for f in dataclasses.fields(TrainConfig) if f.name not in skip]
