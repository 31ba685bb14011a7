"""k8s/overlays/production and the components it uses or offers: what keeps serving up
through a lost head, pod or node, checked on the rendered objects (no cluster).

GCS fault tolerance wired to a Redis that the overlay runs (or a Service of that name),
with the password from a Secret; PodDisruptionBudgets that select the Ray workers of
each part and leave one serving; serving workers spread over nodes; the layout
`tuneserve serve` runs by default, with two ingress replicas at least (each holding
every model), one per node, on at least as many nodes; the Serve config in step with
the colocated overlay's; the upgrade strategy stated, and the incremental one as a
component that validates against KubeRay's CRD.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_k8s_manifests import (K8S, admits, by_kind, network_policies, one,
                                           render, restricted_violations, selects,
                                           serve_config, take_tls_files_as_mounted,
                                           validate_object)

PRODUCTION = str(K8S / "overlays" / "production")


@pytest.fixture(autouse=True)
def _tls_files_on_the_pods(monkeypatch):
    """The overlay's TLS files are a Secret's, on the pods only (test_k8s_manifests)."""
    take_tls_files_as_mounted(monkeypatch)


def _app(rayservice: dict[str, Any]) -> dict[str, Any]:
    (application,) = serve_config(rayservice)["applications"]
    return application


def _worker_pod_labels(group: dict[str, Any]) -> dict[str, str]:
    """A worker pod's labels: its template's and the node type KubeRay adds."""
    return {**group["template"]["metadata"]["labels"], "ray.io/node-type": "worker",
            "ray.io/group": group["groupName"]}


def test_gcs_fault_tolerance_uses_the_overlays_redis_and_a_secret():
    objects = render(PRODUCTION)
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    ft = cluster["gcsFaultToleranceOptions"]
    host, _, port = ft["redisAddress"].rpartition(":")
    assert "value" not in ft["redisPassword"], "no password in the manifests"
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert not by_kind(objects, "Secret")  # the user creates it
    # The address is the in-cluster Redis' Service, on its port.
    named = [s for s in by_kind(objects, "Service") if s["metadata"]["name"] == host]
    assert len(named) == 1, f"no Service {host!r} for the Redis address"
    service = named[0]
    assert \
        [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    redis = one(objects, "StatefulSet")
    pod = redis["spec"]["template"]
    assert selects({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref  # the same Secret
    assert "$(REDIS_PASSWORD)" in container["args"] and "--requirepass" in container["args"]
    assert restricted_violations(pod) == []
    # Its data survives a Redis restart: append-only file on a volume of its own.
    assert container["args"][container["args"].index("--appendonly") + 1] == "yes"
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/data"] == \
        redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    # Only the serving cluster reaches it.
    policies = network_policies(objects)
    labels = pod["metadata"]["labels"]
    serving = {"app.kubernetes.io/name": "tuneserve", "app.kubernetes.io/component": "serving",
               "ray.io/node-type": "head"}
    training = {**serving, "app.kubernetes.io/component": "training"}
    assert admits(policies, labels, 6379, pod_labels=serving)
    assert not admits(policies, labels, 6379, pod_labels=training)
    assert not admits(policies, labels, 6379, pod_labels=None)
    # The base has no GCS fault tolerance to wire: only production asks for Redis.
    base = one(render(str(K8S / "overlays" / "cpu")), "RayService")
    assert "gcsFaultToleranceOptions" not in base["spec"]["rayClusterConfig"]


def test_disruption_budgets_select_the_workers_and_leave_one_serving():
    objects = render(PRODUCTION)
    budgets = {p["metadata"]["name"]: p for p in by_kind(objects, "PodDisruptionBudget")}
    service = one(objects, "RayService")["spec"]["rayClusterConfig"]
    job = one(objects, "RayJob")["spec"]["rayClusterSpec"]
    for part, cluster in (("serving", service), ("training", job)):
        (group,) = cluster["workerGroupSpecs"]
        head = {**cluster["headGroupSpec"]["template"]["metadata"]["labels"],
                "ray.io/node-type": "head"}
        chosen = [name for name, pdb in budgets.items()
                  if selects(pdb["spec"]["selector"], _worker_pod_labels(group))]
        assert len(chosen) == 1, (part, chosen)
        pdb = budgets.pop(chosen[0])
        assert not selects(pdb["spec"]["selector"], head)  # a lone head blocks drains
        assert "ray.io/cluster" not in pdb["spec"]["selector"].get("matchLabels", {})
        assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
        # the other part's workers are not counted in this budget
        other = service if part == "training" else job
        assert not selects(pdb["spec"]["selector"],
                           _worker_pod_labels(other["workerGroupSpecs"][0]))
        if part == "serving":
            assert group["minReplicas"] - pdb["spec"]["maxUnavailable"] >= 1
    assert budgets == {}


def test_serving_workers_spread_over_nodes_with_replicas_on_each():
    from services.core.config import ServeConfig
    from services.serving.app import INGRESS_DEPLOYMENT, model_deployment_name

    rayservice = one(render(PRODUCTION), "RayService")
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    spread = {c["topologyKey"]: c for c in group["template"]["spec"]["topologySpreadConstraints"]}
    host = spread["kubernetes.io/hostname"]
    assert host["whenUnsatisfiable"] == "DoNotSchedule" and host["maxSkew"] == 1
    assert host.get("nodeTaintsPolicy") == "Honor"
    assert spread["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
    for constraint in spread.values():  # each counts exactly this group's pods
        assert selects(constraint["labelSelector"], _worker_pod_labels(group))
        head = {**rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"][
            "metadata"]["labels"], "ray.io/node-type": "head"}
        assert not selects(constraint["labelSelector"], head)
    application = _app(rayservice)
    args = copy.deepcopy(application["args"])
    limits = args.pop("limits")
    cfg = ServeConfig(**args).validate()
    assert limits
    # The replicas that hold the models, and the deployments they are: with colocate
    # the ingress alone (min_replicas sizes it), else the ingress and a deployment per
    # model; each on a node of its own.
    if cfg.colocate:
        always = cfg.min_replicas
        placed = [INGRESS_DEPLOYMENT]
        per_node = cfg.replica_cpus
    else:
        always = max(cfg.min_replicas, cfg.ingress_replicas)
        placed = [INGRESS_DEPLOYMENT] + [model_deployment_name(m) for m in cfg.models]
        per_node = len(cfg.models) * cfg.replica_cpus + cfg.ingress_cpus
    assert cfg.min_replicas >= 2 and always >= 2
    deployments = {d["name"]: d for d in application["deployments"]}
    assert set(deployments) == set(placed)
    for name in placed:
        assert deployments[name]["max_replicas_per_node"] == 1, name
    # One replica per node: the nodes always up hold every replica always up, and
    # autoscaling finds a node for each replica up to max_replicas.
    assert group["minReplicas"] >= always
    assert group["maxReplicas"] >= cfg.max_replicas
    # ... and each node has room for its replicas.
    cpus = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert cpus >= per_node


def test_serve_config_is_the_colocated_overlays_with_tls_and_placement_only():
    """The production serveConfigV2 is a copy of the colocated overlay's (the layout
    `tuneserve serve` runs by default): they must not drift."""
    colocated = _app(one(render(str(K8S / "overlays" / "colocated")), "RayService"))
    prod = _app(one(render(PRODUCTION), "RayService"))
    changed = {k for k in set(colocated["args"]) | set(prod["args"])
               if colocated["args"].get(k) != prod["args"].get(k)}
    # The API over TLS on the ingress replicas' own servers, health alone for the
    # readiness probe (tls.yaml)
    assert changed == {"health_port", "tls_cert_file", "tls_key_file"}
    # ... and one replica per node
    colocated_deps = {d["name"]: d for d in colocated["deployments"]}
    prod_deps = {d["name"]: {k: v for k, v in d.items() if k != "max_replicas_per_node"}
                 for d in prod["deployments"]}
    assert prod_deps == colocated_deps
    assert {k: v for k, v in colocated.items() if k not in ("args", "deployments")} == \
        {k: v for k, v in prod.items() if k not in ("args", "deployments")}


def _layout(cfg) -> dict[str, Any]:
    """The ServeConfig fields that `tuneserve serve --layout` sets, as cfg has them."""
    from services.cli.serve import LAYOUTS

    return {name: getattr(cfg, name) for fields in LAYOUTS.values() for name in fields}


def test_production_serves_the_layout_tuneserve_serve_runs_by_default(monkeypatch):
    """The layout of `tuneserve serve` with no layout flag (its parser's default, through
    the ServeConfig the command builds) is the one the overlay's args build: the one
    bench/serve.py measures as the default is the one production runs."""
    import services.serving.app as app_module
    from services.cli import build_parser
    from services.cli.serve import LAYOUTS, serve_config

    default = serve_config(build_parser().parse_args(["serve"]))
    name = build_parser().parse_args(["serve"]).layout
    assert _layout(default) == {**dict.fromkeys(_layout(default), False), **LAYOUTS[name]}
    monkeypatch.setattr(app_module, "build_app", lambda cfg: cfg)
    prod = app_module.app_builder(copy.deepcopy(_app(one(render(PRODUCTION),
                                                           "RayService"))["args"]))
    assert _layout(prod.validate()) == _layout(default), f"tuneserve serve: --layout {name}"


def _with_components(tmp_path: Path, *components: str) -> tuple[dict[str, Any], ...]:
    """The production overlay with components added, as a user's overlay would."""
    rel = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{rel}/overlays/production"],
        "components": [f"{rel}/components/{c}" for c in components]}))
    render.cache_clear()  # a new folder each time: nothing to reuse
    return render(str(tmp_path))


def test_upgrade_strategy_is_stated_and_incremental_is_a_component(tmp_path):
    from services.core.config import ServeConfig

    assert one(render(PRODUCTION), "RayService")["spec"]["upgradeStrategy"] == \
        {"type": "NewCluster"}
    rayservice = one(_with_components(tmp_path, "incremental-upgrade"), "RayService")
    strategy = rayservice["spec"]["upgradeStrategy"]
    assert strategy["type"] == "NewClusterWithIncrementalUpgrade"
    options = strategy["clusterUpgradeOptions"]
    assert options["gatewayClassName"]
    assert 0 < options["stepSizePercent"] <= 100 and options["intervalSeconds"] > 0
    assert 0 < options["maxSurgePercent"] < 100  # less spare capacity than NewCluster
    validate_object(rayservice)  # KubeRay's CRD schema knows every field
    # Incremental upgrades scale the new cluster with Serve autoscaling.
    args = copy.deepcopy(_app(rayservice)["args"])
    args.pop("limits")
    assert ServeConfig(**args).validate().autoscaling_config() is not None
    # Components say what they are for, on their first line.
    for component in (K8S / "components").iterdir():
        first = (component / "kustomization.yaml").read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, component


@pytest.mark.parametrize("break_it", ["address", "secret", "pdb", "spread", "per-node",
                                      "layout"])
def test_the_checks_can_fail(break_it, monkeypatch):
    """Each check above fails on the overlay broken the way a careless edit would."""
    objects = copy.deepcopy(render(PRODUCTION))
    rayservice = one(objects, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    group = cluster["workerGroupSpecs"][0]
    if break_it == "address":
        cluster["gcsFaultToleranceOptions"]["redisAddress"] = "redis:6379"
        check = test_gcs_fault_tolerance_uses_the_overlays_redis_and_a_secret
    elif break_it == "secret":
        cluster["gcsFaultToleranceOptions"]["redisPassword"] = {"value": "hunter2"}
        check = test_gcs_fault_tolerance_uses_the_overlays_redis_and_a_secret
    elif break_it == "pdb":
        pdb = by_kind(objects, "PodDisruptionBudget")[0]
        pdb["spec"]["selector"]["matchLabels"]["ray.io/node-type"] = "head"
        check = test_disruption_budgets_select_the_workers_and_leave_one_serving
    elif break_it == "spread":
        constraint = group["template"]["spec"]["topologySpreadConstraints"][0]
        constraint["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] = "train"
        check = test_serving_workers_spread_over_nodes_with_replicas_on_each
    elif break_it == "per-node":
        group["minReplicas"] = 1
        check = test_serving_workers_spread_over_nodes_with_replicas_on_each
    else:  # the models layout: a deployment per model behind the replicas' servers
        doc = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
        doc["applications"][0]["args"].pop("colocate")
        rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(doc)
        check = functools.partial(
            test_production_serves_the_layout_tuneserve_serve_runs_by_default, monkeypatch)
    real = render
    monkeypatch.setattr(sys.modules[__name__], "render",
                        lambda path: tuple(objects) if path == PRODUCTION else real(path))
    with pytest.raises(AssertionError):
        check()


@pytest.mark.parametrize("break_it", ["public-proxy", "probe-tls-port", "head-mount"])
def test_the_tls_checks_can_fail(break_it, monkeypatch):
    """The TLS layout's check (test_k8s_manifests._check_tls_replica_grpc) fails on the
    overlay broken the way a careless edit would."""
    from tests.unit import test_k8s_manifests as manifests

    objects = copy.deepcopy(render(PRODUCTION))
    cluster = one(objects, "RayService")["spec"]["rayClusterConfig"]
    if break_it == "public-proxy":
        policy = [p for p in by_kind(objects, "NetworkPolicy")
                  if p["metadata"]["name"] == "tuneserve-ingress"][0]
        policy["spec"]["ingress"][0]["ports"].append({"protocol": "TCP", "port": 9000})
    elif break_it == "probe-tls-port":
        ray = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        ray["readinessProbe"]["grpc"]["port"] = 9001
    else:
        head = cluster["headGroupSpec"]["template"]["spec"]
        head["volumes"] = [v for v in head["volumes"] if "tls" not in v["name"]]
    real = manifests.render
    monkeypatch.setattr(manifests, "render",
                        lambda path: tuple(objects) if path == PRODUCTION else real(path))
    with pytest.raises((AssertionError, ValueError)):
        manifests.test_serve_config_is_valid_for_ray_serve_and_tuneserve("production",
                                                                         monkeypatch)
