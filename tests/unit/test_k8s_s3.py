"""The object-storage overlays (k8s/overlays/s3, s3-minio), rendered with kubectl
kustomize: valid, restricted, no shared volume, every Ray pod with the S3 credentials,
the registry and data on s3://, and the serveConfigV2 copy equal to the base's but for
the registry (so that it cannot drift)."""

from __future__ import annotations

import pytest
import yaml

from tests.unit.test_k8s_manifests import (K8S, admits, by_kind, mounts, network_policies,
                                           one, pod_templates, render, restricted_violations,
                                           serve_config, validate_object, volumes)

S3_OVERLAYS = ["s3", "s3-minio"]
REGISTRY = "s3://tuneserve/registry"


def overlay(name: str):
    return render(str(K8S / "overlays" / name))


def base_run() -> dict:
    return yaml.safe_load((K8S / "base" / "train" / "run.yaml").read_text())


@pytest.mark.parametrize("name", S3_OVERLAYS)
def test_valid_restricted_and_without_a_shared_volume(name):
    objects = overlay(name)
    for obj in sorted(objects, key=lambda o: o["kind"] in ("RayService", "RayJob")):
        validate_object(obj)
    claims = [o["metadata"]["name"] for o in by_kind(objects, "PersistentVolumeClaim")]
    assert claims == (["tuneserve-minio"] if name == "s3-minio" else [])
    for obj in by_kind(objects, "RayService") + by_kind(objects, "RayJob"):
        for where, template in pod_templates(obj):
            assert restricted_violations(template) == [], where
            assert not [v for v in template["spec"].get("volumes", [])
                        if "persistentVolumeClaim" in v], f"{obj['kind']} {where}"
            if where == "submitterPodTemplate":
                continue
            ray = template["spec"]["containers"][0]
            assert {"secretRef": {"name": "tuneserve-s3"}} in ray.get("envFrom", []), where
            assert "emptyDir" in volumes(template)[mounts(ray)["/tmp"]]


def test_serving_reads_the_registry_from_s3_and_nothing_else_differs():
    base = serve_config(one(overlay("cpu"), "RayService"))
    mine = serve_config(one(overlay("s3"), "RayService"))
    assert mine["applications"][0]["args"]["registry"] == REGISTRY
    mine["applications"][0]["args"]["registry"] = base["applications"][0]["args"]["registry"]
    assert mine == base, "k8s/overlays/s3/rayservice-s3.yaml drifted from the base's serveConfigV2"


def test_the_cache_stays_inside_the_serving_workers_tmp():
    service = one(overlay("s3"), "RayService")
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    env = {e["name"]: e.get("value") for e in worker["spec"]["containers"][0]["env"]}
    tmp = volumes(worker)[mounts(worker["spec"]["containers"][0])["/tmp"]]["emptyDir"]
    assert env["HOME"] == "/tmp"  # the default cache is $HOME/.cache/tuneserve
    size_gi = int(tmp["sizeLimit"].removesuffix("Gi"))
    assert 0 < int(env["TUNESERVE_CACHE_MAX_BYTES"]) <= size_gi * 1024 ** 3 // 2
    assert int(env["TUNESERVE_CACHE_MAX_VERSIONS"]) >= 2  # one served, one loading


def test_training_keeps_its_run_on_s3_and_trains_on_the_worker_pods():
    """The run's folder is on the bucket, so the base's worker pods train (no volume
    they share) and a RayJob retry resumes from the run's last checkpoint there."""
    objects = overlay("s3")
    run = yaml.safe_load(one(objects, "ConfigMap")["data"]["run.yaml"])
    assert run["registry"] == REGISTRY and run["runs_dir"] == "s3://tuneserve/runs"
    assert run["train"].startswith("s3://tuneserve/") and run["eval"].startswith("s3://")
    expected = {**base_run(), "train": run["train"], "eval": run["eval"],
                "registry": REGISTRY, "runs_dir": run["runs_dir"]}
    assert run == expected, "run-s3.yaml drifted from k8s/base/train/run.yaml"
    assert run["run_name"]  # the retry finds the run by its name
    job = one(objects, "RayJob")
    base_job = one(overlay("cpu"), "RayJob")
    assert job["spec"]["backoffLimit"] >= 1
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"] == base_job["spec"]["rayClusterSpec"]["headGroupSpec"][
        "rayStartParams"]  # the driver alone on the head: no training worker there
    [group] = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == run["workers"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["cpu"]) >= run["cpus_per_worker"]
    for template in (head["template"], group["template"]):
        ray = template["spec"]["containers"][0]
        tmp = volumes(template)[mounts(ray)["/tmp"]]["emptyDir"]
        # a checkpoint is written under /tmp before Ray Train uploads it
        assert int(tmp["sizeLimit"].removesuffix("Gi")) >= 4


def test_minio_is_reachable_from_tuneserve_pods_only():
    objects = overlay("s3-minio")
    policies = network_policies(objects)
    minio = one(objects, "Deployment")["spec"]["template"]
    labels = minio["metadata"]["labels"]
    port = minio["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert port != 9000  # the base opens 9000 (gRPC) to everyone
    assert admits(policies, labels, port, pod_labels={"app.kubernetes.io/name": "tuneserve"})
    assert not admits(policies, labels, port, pod_labels={"app": "other"})
    assert not admits(policies, labels, port, ns="elsewhere", pod_labels={})
    assert not admits(policies, labels, port)  # from outside the cluster
    assert restricted_violations(minio) == []
    job = one(objects, "Job")["spec"]["template"]
    assert restricted_violations(job) == []
    assert job["spec"]["containers"][0]["image"] == "tuneserve:0.1.0-cpu"
    assert "tuneserve" in job["spec"]["containers"][0]["args"][0]  # the bucket it creates
    assert REGISTRY.split("/")[2] == "tuneserve"
