"""Talking to a cluster: training RayJobs and the RayService, through the kubernetes client.

    kube = Kube.connect("tuneserve")           # kubeconfig, else in-cluster config
    kube.create_train_job(config_map, rayjob)  # objects from services.k8s.objects
    kube.watch_job(name, out=print)            # state changes until it finishes

Every failure becomes a TuneserveError with one line a person can act on: no config,
KubeRay not installed, object not found, forbidden, conflict, unreachable API server.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from services.core.errors import TuneserveError
from services.k8s.objects import RAY_API_VERSION, RAY_GROUP, owner_reference, pin_version

# (connect, read) seconds per API call, and no retries of a read: an API server answers
# in well under a second, and one that accepts connections but never answers (a wrong
# port, a firewall that drops packets) should fail in seconds, not after urllib3's three
# retries of a 30 s wait. A refused connection is tried once more.
REQUEST_TIMEOUT_S = (5.0, 15.0)
# The client leaves Content-Type unset on creates (the API server then assumes JSON);
# say it anyway.
JSON = {"Content-Type": "application/json"}
FINISHED_DEPLOYMENT_STATES = {"Complete", "Failed", "ValidationFailed"}
_PUBLISHED = re.compile(r"^published (?P<name>\S+) (?P<version>v\d+)\b")


class KubernetesError(TuneserveError):
    """The cluster refused or could not be reached; the message says why."""

    grpc_code = "UNAVAILABLE"


class KubeRayMissing(KubernetesError):
    """The ray.io API group or one of its resources is not installed."""

    grpc_code = "FAILED_PRECONDITION"


class ObjectNotFound(KubernetesError):
    grpc_code = "NOT_FOUND"


class JobFailed(KubernetesError):
    grpc_code = "ABORTED"


@dataclass
class JobState:
    name: str
    deployment_status: str = ""
    job_status: str = ""
    message: str = ""
    reason: str = ""
    cluster: str = ""
    start_time: str = ""
    end_time: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> "JobState":
        status = obj.get("status") or {}
        return cls(name=obj["metadata"]["name"],
                   deployment_status=status.get("jobDeploymentStatus", ""),
                   job_status=status.get("jobStatus", ""),
                   message=status.get("message", ""), reason=status.get("reason", ""),
                   cluster=status.get("rayClusterName", ""),
                   start_time=status.get("startTime", ""), end_time=status.get("endTime", ""),
                   raw=obj)

    @property
    def finished(self) -> bool:
        # SUCCEEDED is final; a FAILED attempt may still be retried (backoffLimit), so a
        # failure counts only once KubeRay marks the whole RayJob Failed.
        return self.job_status == "SUCCEEDED" or \
            self.deployment_status in FINISHED_DEPLOYMENT_STATES

    @property
    def succeeded(self) -> bool:
        return self.job_status == "SUCCEEDED"

    def summary(self) -> str:
        text = f"deployment={self.deployment_status or '-'} job={self.job_status or '-'}"
        return text + (f": {self.message}" if self.message else "")


def published_version(log: str) -> Optional[tuple[str, str]]:
    """(model, version) from the last `published NAME vN` line (or --json summary)."""
    found = None
    for line in log.splitlines():
        line = line.strip()
        m = _PUBLISHED.match(line)
        if m:
            found = (m["name"], m["version"])
        elif line.startswith("{") and '"version"' in line:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("version") and data.get("name"):
                found = (str(data["name"]), str(data["version"]))
    return found


def _kubeconfig_paths(explicit: Optional[str]) -> list[Path]:
    if explicit:
        return [Path(explicit).expanduser()]
    env = os.environ.get("KUBECONFIG")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return [Path("~/.kube/config").expanduser()]


def _quiet(conf):
    """conf with tuneserve's retries; a kubeconfig that turns TLS checks off (its
    insecure-skip-tls-verify) was the user's choice: no urllib3 warning on every call."""
    import urllib3

    conf.retries = urllib3.Retry(total=1, connect=1, read=0, status=0, other=0,
                                 redirect=0, backoff_factor=0.2)
    if not conf.verify_ssl:
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return conf


def _network_reason(exc: BaseException) -> str:
    """A few words for a failed connection: timed out, connection refused, host not
    found, TLS, ... (urllib3 wraps the cause in MaxRetryError, whose name says nothing)."""
    from urllib3.exceptions import (MaxRetryError, NameResolutionError, ProtocolError,
                                    SSLError, TimeoutError as Urllib3Timeout)

    seen = 0
    while isinstance(exc, MaxRetryError) and exc.reason is not None and seen < 5:
        exc, seen = exc.reason, seen + 1
    text = str(exc)
    # Before timeouts: urllib3's NewConnectionError (refused, no such host) is a
    # ConnectTimeoutError too.
    if isinstance(exc, NameResolutionError) or "Name or service not known" in text \
            or "Temporary failure in name resolution" in text:
        return "host name not found"
    if isinstance(exc, ConnectionRefusedError) or "Connection refused" in text:
        return "connection refused (nothing listens there)"
    if isinstance(exc, SSLError):
        return f"TLS error ({text.splitlines()[0][:200] if text else type(exc).__name__})"
    if isinstance(exc, (Urllib3Timeout, TimeoutError)) or "timed out" in text:
        return "timed out (no answer; a wrong address or port, or a firewall?)"
    if isinstance(exc, ProtocolError) or "RemoteDisconnected" in text:
        return "the connection was closed without an answer"
    return text.splitlines()[0][:200] if text.strip() else type(exc).__name__


class Kube:
    """A namespace of one cluster, with the calls tuneserve needs."""

    def __init__(self, api_client, namespace: str):
        from kubernetes import client

        self.api_client = api_client
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.host = api_client.configuration.host
        self._checked: set[str] = set()

    # ---- connecting ------------------------------------------------------------------
    @classmethod
    def connect(cls, namespace: str, *, kubeconfig: Optional[str] = None,
                context: Optional[str] = None) -> "Kube":
        """kubeconfig (--kubeconfig, $KUBECONFIG or ~/.kube/config), else in-cluster."""
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        paths = _kubeconfig_paths(kubeconfig)
        existing = [p for p in paths if p.is_file()]
        conf = client.Configuration()
        try:
            if existing:
                config.load_kube_config(
                    config_file=os.pathsep.join(str(p) for p in existing), context=context,
                    client_configuration=conf, persist_config=False)
                return cls(client.ApiClient(_quiet(conf)), namespace)
            if kubeconfig:
                raise KubernetesError(f"kubeconfig not found: {kubeconfig}")
            if os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config(client_configuration=conf)
                return cls(client.ApiClient(_quiet(conf)), namespace)
        except ConfigException as exc:
            where = ", ".join(map(str, existing)) or "in-cluster config"
            raise KubernetesError(f"cannot use Kubernetes config ({where}): {exc}") from None
        except KubernetesError:
            raise
        except Exception as exc:  # a file that is not a kubeconfig: YAML errors, a list, ...
            import yaml

            what = ("not valid YAML" if isinstance(exc, (yaml.YAMLError, UnicodeDecodeError))
                    else "not a kubeconfig (a mapping with clusters, users and contexts)")
            where = ", ".join(map(str, existing)) or "in-cluster config"
            raise KubernetesError(f"cannot use Kubernetes config ({where}): {what}: "
                                  f"{type(exc).__name__}") from None
        raise KubernetesError(
            "no Kubernetes config: no kubeconfig at "
            f"{', '.join(map(str, paths))} (set KUBECONFIG or --kubeconfig) and not "
            "running inside a cluster")

    # ---- errors ----------------------------------------------------------------------
    def _call(self, what: str, fn: Callable, *args, **kwargs):
        """Run one API call; turn every failure into a one-line KubernetesError."""
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT_S)
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise self._api_error(what, exc) from None
        except (HTTPError, OSError) as exc:
            raise KubernetesError(f"cannot reach the Kubernetes API server at {self.host}: "
                                  f"{_network_reason(exc)}") from None

    @staticmethod
    def _api_error(what: str, exc) -> KubernetesError:
        message = ""
        try:
            message = json.loads(exc.body or "{}").get("message", "")
        except (ValueError, AttributeError):
            pass
        message = message or exc.reason or "no details"
        if exc.status == 404:
            return ObjectNotFound(f"{what}: not found ({message})")
        if exc.status in (401, 403):
            return KubernetesError(f"{what}: not allowed ({message}); check your kubeconfig "
                                   "context and RBAC")
        if exc.status == 409:
            return KubernetesError(f"{what}: conflict ({message})")
        if exc.status == 422:
            return KubernetesError(f"{what}: rejected as invalid ({message})")
        return KubernetesError(f"{what}: HTTP {exc.status} ({message})")

    def require_kuberay(self, plural: str) -> None:
        """Fail with a clear message when KubeRay's CRDs are missing (404 on ray.io)."""
        if plural in self._checked:
            return
        try:
            resources = self._call(f"API group {RAY_GROUP}/{RAY_API_VERSION}",
                                   self.custom.get_api_resources, RAY_GROUP, RAY_API_VERSION)
        except ObjectNotFound:
            self._require_kubernetes()
            raise KubeRayMissing(
                f"KubeRay is not installed on this cluster: the API group "
                f"{RAY_GROUP}/{RAY_API_VERSION} does not exist (install the KubeRay operator "
                "and its CRDs, e.g. `helm install kuberay-operator kuberay/kuberay-operator`)"
            ) from None
        names = {r.name for r in (resources.resources or [])}
        if plural not in names:
            raise KubeRayMissing(f"KubeRay CRD {plural}.{RAY_GROUP} is not installed "
                                 f"(found: {', '.join(sorted(names)) or 'none'})")
        self._checked.add(plural)

    def _require_kubernetes(self) -> None:
        """Fail clearly when the server is not a Kubernetes API server at all (a 404 for
        ray.io/v1 from a web server on the wrong port is not a missing KubeRay)."""
        from kubernetes import client

        try:
            raw = self._call("GET /version", client.VersionApi(self.api_client).get_code,
                             _preload_content=False)
            info = json.loads(raw.data or b"null") if 200 <= raw.status < 300 else None
        except KubernetesError as exc:
            raise KubernetesError(f"{self.host} does not answer like a Kubernetes API server "
                                  f"({exc}); check the server in your kubeconfig") from None
        except ValueError:  # not JSON
            info = None
        if not (isinstance(info, dict) and info.get("gitVersion")):
            raise KubernetesError(f"{self.host} does not answer like a Kubernetes API server "
                                  "(GET /version has no gitVersion); check the server in "
                                  "your kubeconfig")

    # ---- training jobs ---------------------------------------------------------------
    def create_train_job(self, config_map: dict[str, Any],
                         rayjob: dict[str, Any]) -> dict[str, Any]:
        """ConfigMap, then the RayJob that mounts it, then the job takes ownership of it."""
        self.require_kuberay("rayjobs")
        cm_name = config_map["metadata"]["name"]
        job_name = rayjob["metadata"]["name"]
        self._call(f"create ConfigMap {cm_name}", self.core.create_namespaced_config_map,
                   self.namespace, config_map, _headers=JSON)
        try:
            created = self._call(f"create RayJob {job_name}",
                                 self.custom.create_namespaced_custom_object, RAY_GROUP,
                                 RAY_API_VERSION, self.namespace, "rayjobs", rayjob,
                                 _headers=JSON)
        except KubernetesError:
            self._call(f"delete ConfigMap {cm_name}", self.core.delete_namespaced_config_map,
                       cm_name, self.namespace)
            raise
        self._call(f"patch ConfigMap {cm_name}", self.core.patch_namespaced_config_map,
                   cm_name, self.namespace,
                   {"metadata": {"ownerReferences": [owner_reference(created)]}},
                   _content_type="application/merge-patch+json")
        return created

    def get_job(self, name: str) -> JobState:
        self.require_kuberay("rayjobs")
        obj = self._call(f"RayJob {name} in namespace {self.namespace}",
                         self.custom.get_namespaced_custom_object, RAY_GROUP, RAY_API_VERSION,
                         self.namespace, "rayjobs", name)
        return JobState.from_object(obj)

    def delete_job(self, name: str) -> None:
        """Deletes the RayJob; Kubernetes then removes its cluster, pods and ConfigMap."""
        self.require_kuberay("rayjobs")
        self._call(f"RayJob {name} in namespace {self.namespace}",
                   self.custom.delete_namespaced_custom_object, RAY_GROUP, RAY_API_VERSION,
                   self.namespace, "rayjobs", name, propagation_policy="Background")

    def submitter_pod(self, name: str) -> Optional[str]:
        """The newest pod of the job's submitter (K8sJobMode): it relays the driver's log."""
        pods = self._call(f"pods of RayJob {name}", self.core.list_namespaced_pod,
                          self.namespace, label_selector=f"job-name={name}")
        items = sorted(pods.items or [],
                       key=lambda p: str(p.metadata.creation_timestamp or ""))
        return items[-1].metadata.name if items else None

    def job_logs(self, name: str, *, tail_lines: Optional[int] = None) -> str:
        self.get_job(name)  # a clear "not found" before looking for pods
        pod = self.submitter_pod(name)
        if pod is None:
            raise ObjectNotFound(f"RayJob {name}: no submitter pod (yet, or any more: KubeRay "
                                 "removes it with the cluster after ttlSecondsAfterFinished)")
        kwargs = {"tail_lines": tail_lines} if tail_lines else {}
        return self._call(f"logs of pod {pod}", self.core.read_namespaced_pod_log, pod,
                          self.namespace, **kwargs)

    def follow_logs(self, name: str) -> Iterator[str]:
        self.get_job(name)
        pod = self.submitter_pod(name)
        if pod is None:
            raise ObjectNotFound(f"RayJob {name}: no submitter pod yet")
        resp = self._call(f"logs of pod {pod}", self.core.read_namespaced_pod_log, pod,
                          self.namespace, follow=True, _preload_content=False,
                          _request_timeout=None)
        try:
            for chunk in resp.stream(1024):
                yield chunk.decode("utf-8", errors="replace")
        finally:
            resp.release_conn()

    def watch_job(self, name: str, *, out: Callable[[str], None] = print,
                  interval_s: float = 5.0, timeout_s: Optional[float] = None,
                  sleep: Callable[[float], None] = time.sleep,
                  clock: Callable[[], float] = time.monotonic) -> JobState:
        """Poll until the job finishes, printing each change of state."""
        deadline = None if timeout_s is None else clock() + timeout_s
        last = None
        while True:
            state = self.get_job(name)
            shown = (state.deployment_status, state.job_status, state.message)
            if shown != last:
                out(f"{time.strftime('%H:%M:%S')}  {name}  {state.summary()}")
                last = shown
            if state.finished:
                return state
            if deadline is not None and clock() >= deadline:
                raise KubernetesError(f"RayJob {name} still {state.summary()} after "
                                      f"{timeout_s:.0f}s; it goes on (tuneserve k8s status "
                                      f"{name})")
            sleep(interval_s)

    def published_by(self, name: str) -> Optional[tuple[str, str]]:
        """(model, version) the finished job published, read from its driver's log."""
        try:
            return published_version(self.job_logs(name, tail_lines=500))
        except ObjectNotFound:
            return None

    # ---- the RayService ------------------------------------------------------------------
    def get_rayservice(self, name: str) -> dict[str, Any]:
        self.require_kuberay("rayservices")
        return self._call(f"RayService {name} in namespace {self.namespace}",
                          self.custom.get_namespaced_custom_object, RAY_GROUP,
                          RAY_API_VERSION, self.namespace, "rayservices", name)

    def pin(self, service: str, model: str, version: Optional[str], *, app: str,
            dry_run: bool = False) -> dict[str, Any]:
        """Set (or clear) the pinned version of model-<model> in serveConfigV2.

        A merge patch carrying the resourceVersion read: if someone changed the RayService
        in between, the API server answers 409 and nothing is overwritten.
        """
        obj = self.get_rayservice(service)
        current = (obj.get("spec") or {}).get("serveConfigV2")
        if not current:
            raise KubernetesError(f"RayService {service} has no spec.serveConfigV2")
        patch = {"metadata": {"resourceVersion": obj["metadata"].get("resourceVersion")},
                 "spec": {"serveConfigV2": pin_version(current, model, version, app=app)}}
        if dry_run:
            return patch
        self._call(f"patch RayService {service}", self.custom.patch_namespaced_custom_object,
                   RAY_GROUP, RAY_API_VERSION, self.namespace, "rayservices", service, patch)
        return patch
