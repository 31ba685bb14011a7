"""`tuneserve k8s`: the objects it builds and the requests it sends.

The kubernetes client is pointed (through a real kubeconfig file) at an HTTP server on
127.0.0.1, port 0, in a thread, which records every request and answers canned JSON the
way the API server does. Nothing leaves the machine; no cluster, no Ray.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Union
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from services.core.errors import ConfigError, InvalidInput, TuneserveError
from services.k8s import objects, register, run
from services.k8s.client import (JobState, KubeRayMissing, KubernetesError, ObjectNotFound,
                                 published_version)
from tests.unit.test_k8s_manifests import K8S, pod_templates, validate_object

NS = "tuneserve"
RAYJOBS = f"/apis/ray.io/v1/namespaces/{NS}/rayjobs"
RAYSERVICES = f"/apis/ray.io/v1/namespaces/{NS}/rayservices"
CONFIGMAPS = f"/api/v1/namespaces/{NS}/configmaps"
RUN_YAML = """\
# a run config as a person writes it
model: sentence-transformers/all-MiniLM-L6-v2
train: /data/datasets/sst2/train.tsv
eval: /data/datasets/sst2/dev.tsv
name: sentiment
columns: [sentence, label]
registry: ./my-registry        # local paths: moved to the shared volume
runs_dir: ./my-runs
address: ray://localhost:10001 # dropped: the RayJob sets RAY_ADDRESS
workers: 2
cpus_per_worker: 1.5
epochs: 2
batch_size: 16
learning_rate: 3.0e-05
extra: {owner: ml-team}
"""


def base_object(name: str) -> dict[str, Any]:
    """An object of k8s/base as written (no kustomize needed), in the tuneserve namespace."""
    obj = yaml.safe_load((K8S / "base" / name).read_text())
    obj["metadata"]["namespace"] = NS
    return obj


def status(code: int, message: str, reason: str = "NotFound", **details) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details, "code": code}


RAY_RESOURCES = {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "ray.io/v1",
                 "resources": [{"name": p, "singularName": p[:-1], "namespaced": True,
                                "kind": k, "verbs": ["create", "get", "patch", "delete"]}
                               for p, k in (("rayclusters", "RayCluster"),
                                            ("rayjobs", "RayJob"),
                                            ("rayservices", "RayService"))]}

VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.2", "platform": "linux/amd64"}

Reply = Union[tuple[int, Any], Callable[[dict[str, Any]], tuple[int, Any]]]


class FakeApiServer:
    """Records requests; answers from `routes[(METHOD, path)]`, a reply or a list of
    replies used in turn (the last one repeats). Unknown routes get a 404 Status."""

    def __init__(self):
        self.requests: list[dict[str, Any]] = []
        self.routes: dict[tuple[str, str], Any] = {("GET", "/apis/ray.io/v1"): (200, RAY_RESOURCES),
                                                   ("GET", "/version/"): (200, VERSION)}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                url = urlsplit(self.path)
                size = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(size) if size else b""
                req = {"method": self.command, "path": url.path,
                       "query": {k: v[0] for k, v in parse_qs(url.query).items()},
                       "content_type": self.headers.get("Content-Type"),
                       "body": json.loads(raw) if raw else None}
                server.requests.append(req)
                code, body = server._reply(req)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(body, str)
                                 else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def _reply(self, req):
        route = self.routes.get((req["method"], req["path"]))
        if route is None:
            return 404, status(404, "the server could not find the requested resource")
        if isinstance(route, list):
            route = route.pop(0) if len(route) > 1 else route[0]
        return route(req) if callable(route) else route

    def calls(self, method: Optional[str] = None) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests
                if method is None or r["method"] == method]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api(tmp_path, monkeypatch):
    server = FakeApiServer()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
        "users": [{"name": "me", "user": {"token": "test-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield server
    server.close()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tuneserve")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")  # register() must live beside the other commands
    register(sub)
    return parser.parse_args(argv)


def k8s(*argv: str) -> int:
    args = parse(["k8s", *argv])
    assert args.command == "k8s"
    return run(args)


def created(req) -> tuple[int, Any]:
    body = copy.deepcopy(req["body"])
    body["metadata"].update(uid="8c1c1b5e-0000-4000-8000-000000000001", resourceVersion="1")
    return 201, body


def rayjob_with(deployment: str, job: str = "", message: str = "") -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": "train-x", "namespace": NS, "uid": "u1"},
            "status": {"jobDeploymentStatus": deployment, "jobStatus": job,
                       "message": message, "rayClusterName": "train-x-abcde",
                       "startTime": "2026-01-01T00:00:00Z"}}


@pytest.fixture
def run_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN_YAML)
    return path


def dry_run_objects(capsys, *argv) -> tuple[dict[str, Any], dict[str, Any]]:
    assert k8s("train", *argv, "--dry-run") == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    return docs[0], docs[1]


# ---- objects (no server) ----------------------------------------------------------------
def test_dry_run_carries_the_run_config_unchanged_and_validates(run_yaml, capsys):
    cm, job = dry_run_objects(capsys, "--config", str(run_yaml), "--epochs", "5",
                              "--job-name", "train-x")
    sent = yaml.safe_load(cm["data"]["run.yaml"])
    expected = yaml.safe_load(RUN_YAML)
    # The run is named after the job: a retry or a re-submission resumes it.
    expected.update(epochs=5, registry="/data/registry", runs_dir="/data/runs",
                    run_name="train-x")
    del expected["address"]
    assert sent == expected  # every other field exactly as written, in the same order
    assert list(sent) == [k for k in yaml.safe_load(RUN_YAML) if k != "address"] + \
        ["run_name"]
    assert job["metadata"]["name"] == "train-x" and cm["metadata"]["name"] == "train-x-config"
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m services train --config /config/run.yaml"
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    res = workers["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["cpu"] == "2" and "nvidia.com/gpu" not in res["limits"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "run-config", "configMap": {"name": "train-x-config"}} in head["volumes"]
    image = head["containers"][0]["image"]
    assert image.startswith("tuneserve:") and image.endswith("-cpu")


def test_an_unnamed_run_is_named_after_its_training_file(capsys):
    """The model name a run resolves to (the training file's stem) names the job and
    labels it, as `tuneserve train` would name the model."""
    _, job = dry_run_objects(capsys, "--model", "bert", "--train", "/data/reviews.csv")
    assert job["metadata"]["name"].startswith("train-reviews-")
    assert job["metadata"]["labels"]["tuneserve.dev/model"] == "reviews"
    # a run name given is kept
    cm, _ = dry_run_objects(capsys, "--model", "bert", "--train", "/data/reviews.csv",
                            "--run-name", "reviews-7")
    assert yaml.safe_load(cm["data"]["run.yaml"])["run_name"] == "reviews-7"


def test_flags_read_like_tuneserve_train(capsys):
    """--prompt-template's \\n is a newline, and --no-group-by-length turns off what
    classification does by default: as `tuneserve train` reads them."""
    cm, _ = dry_run_objects(capsys, "--model", "gpt2", "--train", "/data/qa.jsonl",
                            "--task", "generation", "--prompt-template",
                            "Question: {prompt}\\nAnswer:\\t", "--no-group-by-length")
    sent = yaml.safe_load(cm["data"]["run.yaml"])
    assert sent["prompt_template"] == "Question: {prompt}\nAnswer:\t"
    assert sent["group_by_length"] is False
    cm, _ = dry_run_objects(capsys, "--model", "bert", "--train", "/data/t.csv",
                            "--group-by-length")
    assert yaml.safe_load(cm["data"]["run.yaml"])["group_by_length"] is True
    cm, _ = dry_run_objects(capsys, "--model", "bert", "--train", "/data/t.csv")
    assert "group_by_length" not in yaml.safe_load(cm["data"]["run.yaml"])


def test_dry_run_gpu_run(run_yaml, capsys):
    _, job = dry_run_objects(capsys, "--config", str(run_yaml), "--use-gpu",
                             "--image", "registry.example.com/tuneserve:1-cu128")
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    for _, template in pod_templates(job):
        for c in template["spec"]["containers"]:
            assert c["image"] == "registry.example.com/tuneserve:1-cu128"


@pytest.mark.parametrize("gpu", [False, True])
def test_dry_run_objects_validate_against_the_schemas(run_yaml, capsys, gpu):
    cm, job = dry_run_objects(capsys, "--config", str(run_yaml), *(["--use-gpu"] if gpu else []))
    validate_object(cm)
    validate_object(job)
    pinned = objects.pin_version(base_object("rayservice.yaml")["spec"]["serveConfigV2"],
                                 "sentiment", "v3")
    service = base_object("rayservice.yaml")
    service["spec"]["serveConfigV2"] = pinned
    validate_object(service)


def test_dry_run_matches_the_base_manifest(run_yaml, capsys):
    """The objects the client builds and k8s/base/rayjob-train.yaml must not drift."""
    _, built = dry_run_objects(capsys, "--config", str(run_yaml), "--job-name", "train-x")
    base = base_object("rayjob-train.yaml")
    for key in ("entrypoint", "submissionMode", "shutdownAfterJobFinishes",
                "ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds"):
        assert built["spec"][key] == base["spec"][key], key
    for key in ("rayVersion", "authOptions", "enableInTreeAutoscaling"):
        assert built["spec"]["rayClusterSpec"][key] == base["spec"]["rayClusterSpec"][key]
    for (where, mine), (_, theirs) in zip(pod_templates(built), pod_templates(base)):
        assert mine["spec"]["securityContext"] == theirs["spec"]["securityContext"], where
        assert mine["spec"].get("automountServiceAccountToken") == \
            theirs["spec"].get("automountServiceAccountToken"), where
        c, t = mine["spec"]["containers"][0], theirs["spec"]["containers"][0]
        for key in ("name", "securityContext", "env", "volumeMounts", "ports"):
            assert c.get(key) == t.get(key), (where, key)
        assert {v["name"]: {k: x for k, x in v.items() if k != "configMap"}
                for v in mine["spec"]["volumes"]} == \
            {v["name"]: {k: x for k, x in v.items() if k != "configMap"}
             for v in theirs["spec"]["volumes"]}, where
    assert built["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"] == \
        base["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]


def test_bad_run_configs_fail_before_anything_is_sent(tmp_path, api, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ntrain: /data/t.csv\nbatch_sise: 3\n")
    with pytest.raises(TuneserveError, match="batch_sise"):
        k8s("train", "--config", str(bad))
    with pytest.raises(TuneserveError, match="invalid config field 'epochs'"):
        k8s("train", "--model", "m", "--train", "/data/t.csv", "--epochs", "0")
    with pytest.raises(InvalidInput, match="job name 'Train_X'"):
        k8s("train", "--model", "m", "--train", "/data/t.csv", "--job-name", "Train_X")
    with pytest.raises(InvalidInput, match="--worker-cpus: 500m is less than cpus_per_worker"):
        k8s("train", "--model", "m", "--train", "/data/t.csv", "--worker-cpus", "500m")
    with pytest.raises(InvalidInput, match="--gpus-per-worker"):
        k8s("train", "--model", "m", "--train", "/data/t.csv", "--use-gpu",
            "--gpus-per-worker", "0")
    assert api.requests == []


def test_local_paths_warn(capsys):
    assert k8s("train", "--model", "./my-bert", "--train", "data/t.csv", "--dry-run") == 0
    err = capsys.readouterr().err
    assert "train = 'data/t.csv' is read inside the pods" in err and "model" in err


def test_default_job_names_fit_kuberay():
    import datetime as dt

    when = dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
    assert objects.default_job_name("sentiment", when) == "train-sentiment-20260304-050607"
    long = objects.default_job_name("A_Very.Long Model Name " * 5, when)
    assert len(long) <= objects.MAX_JOB_NAME and objects.check_k8s_name(long, "job")
    assert long.startswith("train-a-very-long-model") and long.endswith("-20260304-050607")


def test_published_version_from_the_driver_log():
    log = ("INFO ... Job 'x' submitted\nepoch 1 ...\n"
           "published sentiment v4 (production) -> /data/registry/sentiment/v4\n"
           "serve it:  tuneserve serve ...\n")
    assert published_version(log) == ("sentiment", "v4")
    assert published_version('{"name": "topics", "version": "v2", "promoted": true}\n') == \
        ("topics", "v2")
    assert published_version("best checkpoint (not published): /data/runs/x\n") is None


def test_published_version_reads_what_tuneserve_train_prints():
    """--watch finds the version in the driver's log: keep it in step with the summary."""
    from services.cli import _train_summary

    summary = {"name": "sentiment", "version": "v12", "promoted": True,
               "metrics": {"eval_accuracy": 0.9}, "registry": "/data/registry",
               "checkpoint": "/data/registry/sentiment/v12", "run_dir": "/data/runs/x",
               "wall_s": 12.0, "publish_s": 1.5, "samples_per_s": 100.0}
    assert published_version("INFO ...\n" + _train_summary(summary) + "\n") == \
        ("sentiment", "v12")
    assert published_version(json.dumps(summary) + "\n") == ("sentiment", "v12")
    assert published_version(_train_summary({**summary, "version": None})) is None


def test_pin_version_edits_only_the_pin():
    base = base_object("rayservice.yaml")["spec"]["serveConfigV2"]
    pinned = yaml.safe_load(objects.pin_version(base, "sentiment", "v3"))
    original = yaml.safe_load(base)
    original["applications"][0]["deployments"][0]["user_config"]["pinned_version"] = "v3"
    assert pinned == original
    assert objects.pinned_versions(yaml.safe_dump(pinned)) == {"sentiment": "v3"}
    with pytest.raises(InvalidInput, match="expected v<N>"):
        objects.pin_version(base, "sentiment", "latest")
    with pytest.raises(TuneserveError, match="'topics' is not served"):
        objects.pin_version(base, "topics", "v1")
    with pytest.raises(TuneserveError, match="no application 'other'"):
        objects.pin_version(base, "sentiment", "v1", app="other")
    # With no explicit model list a model gets its own deployment entry.
    open_list = yaml.safe_load(base)
    del open_list["applications"][0]["args"]["models"]
    doc = yaml.safe_load(objects.pin_version(yaml.safe_dump(open_list), "topics", "v2"))
    entry = doc["applications"][0]["deployments"][-1]
    assert entry == {"name": "model-topics", "user_config": {
        "channel": "production", "pinned_version": "v2", "poll_interval_s": 2.0}}


def test_pin_version_on_a_colocated_app_edits_the_ingress():
    """With args.colocate the models run in the ingress: its user_config holds the pins
    (a model-<name> entry would name a deployment that does not exist)."""
    from services.serving.app import INGRESS_DEPLOYMENT

    assert objects.COLOCATED_INGRESS == INGRESS_DEPLOYMENT
    doc = yaml.safe_load(base_object("rayservice.yaml")["spec"]["serveConfigV2"])
    app = doc["applications"][0]
    app["args"]["colocate"] = True
    app["args"].pop("models", None)
    app["deployments"] = [d for d in app["deployments"] if not d["name"].startswith("model-")]
    pinned = yaml.safe_load(objects.pin_version(yaml.safe_dump(doc), "sentiment", "v3"))
    pinned = yaml.safe_load(objects.pin_version(yaml.safe_dump(pinned), "topics", "v5"))
    entries = {d["name"]: d for d in pinned["applications"][0]["deployments"]}
    assert not any(name.startswith("model-") for name in entries)
    assert entries["ingress"]["user_config"]["pinned_versions"] == {"sentiment": "v3",
                                                                     "topics": "v5"}
    assert objects.pinned_versions(yaml.safe_dump(pinned)) == {"sentiment": "v3",
                                                               "topics": "v5"}
    unpinned = objects.pin_version(yaml.safe_dump(pinned), "sentiment", None)
    assert objects.pinned_versions(unpinned) == {"sentiment": None, "topics": "v5"}


def test_promote_a_manifest_file_offline(tmp_path, capsys):
    path = tmp_path / "rayservice.yaml"
    path.write_text((K8S / "base" / "rayservice.yaml").read_text())
    assert k8s("promote", "sentiment", "v7", "--file", str(path)) == 0
    obj = yaml.safe_load(capsys.readouterr().out)
    assert obj["spec"]["rayClusterConfig"] == base_object("rayservice.yaml")["spec"][
        "rayClusterConfig"]
    assert objects.pinned_versions(obj["spec"]["serveConfigV2"]) == {"sentiment": "v7"}


# ---- requests against the fake API server ---------------------------------------------
def test_train_creates_config_then_job_then_ownership(api, run_yaml, capsys):
    api.routes[("POST", CONFIGMAPS)] = created
    api.routes[("POST", RAYJOBS)] = created
    api.routes[("PATCH", f"{CONFIGMAPS}/train-x-config")] = lambda req: (200, req["body"])
    cm, job = dry_run_objects(capsys, "--config", str(run_yaml), "--job-name", "train-x")
    assert k8s("train", "--config", str(run_yaml), "--job-name", "train-x") == 0
    assert api.calls() == [("GET", "/apis/ray.io/v1"), ("POST", CONFIGMAPS),
                           ("POST", RAYJOBS), ("PATCH", f"{CONFIGMAPS}/train-x-config")]
    _, post_cm, post_job, patch = api.requests
    assert post_cm["body"] == cm and post_job["body"] == job
    assert post_cm["content_type"] == post_job["content_type"] == "application/json"
    assert patch["content_type"] == "application/merge-patch+json"
    (owner,) = patch["body"]["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": "train-x",
                     "uid": "8c1c1b5e-0000-4000-8000-000000000001",
                     "blockOwnerDeletion": False}
    out = capsys.readouterr().out
    assert "created RayJob train-x in namespace tuneserve" in out
    assert "tuneserve k8s status train-x" in out


def test_rejected_job_removes_its_config_map(api, run_yaml):
    api.routes[("POST", CONFIGMAPS)] = created
    api.routes[("POST", RAYJOBS)] = (422, status(
        422, 'RayJob.ray.io "train-x" is invalid: spec.backoffLimit: Invalid value: -1',
        reason="Invalid"))
    api.routes[("DELETE", f"{CONFIGMAPS}/train-x-config")] = (200, status(200, "", "OK"))
    with pytest.raises(KubernetesError, match="rejected as invalid .*backoffLimit"):
        k8s("train", "--config", str(run_yaml), "--job-name", "train-x")
    assert api.calls()[-1] == ("DELETE", f"{CONFIGMAPS}/train-x-config")


def test_missing_kuberay_crds_is_one_clear_line(api, run_yaml, capsys):
    from services.k8s.__main__ import main

    api.routes[("GET", "/apis/ray.io/v1")] = (404, status(
        404, "the server could not find the requested resource"))
    with pytest.raises(KubeRayMissing, match="KubeRay is not installed"):
        k8s("train", "--config", str(run_yaml))
    assert api.calls() == [("GET", "/apis/ray.io/v1"), ("GET", "/version/")]  # nothing created
    assert main(["status", "train-x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: KubeRay is not installed")
    assert "ray.io/v1" in err and "Traceback" not in err


def test_an_older_kuberay_without_the_crd(api):
    api.routes[("GET", "/apis/ray.io/v1")] = (200, {
        **RAY_RESOURCES, "resources": RAY_RESOURCES["resources"][:1]})
    with pytest.raises(KubeRayMissing, match="CRD rayservices.ray.io is not installed"):
        k8s("promote", "sentiment", "v2")


def test_status(api, capsys):
    api.routes[("GET", f"{RAYJOBS}/train-x")] = (200, rayjob_with(
        "Running", "RUNNING", "Job is currently running"))
    assert k8s("status", "train-x") == 0
    out = capsys.readouterr().out
    assert "RayJob train-x (namespace tuneserve)" in out
    assert "deployment Running" in out and "job        RUNNING" in out
    assert "cluster    train-x-abcde" in out
    assert k8s("status", "train-x", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["jobStatus"] == "RUNNING" and data["name"] == "train-x"
    assert api.requests[-1]["method"] == "GET"
    assert api.requests[-1]["path"] == f"{RAYJOBS}/train-x"


def test_status_of_an_unknown_job(api):
    api.routes[("GET", f"{RAYJOBS}/nope")] = (404, status(
        404, 'rayjobs.ray.io "nope" not found', name="nope", group="ray.io", kind="rayjobs"))
    with pytest.raises(ObjectNotFound,
                       match=r'RayJob nope in namespace tuneserve: not found \(rayjobs.ray.io '
                             r'"nope" not found\)'):
        k8s("status", "nope")


def test_forbidden_names_the_problem(api):
    api.routes[("GET", f"{RAYJOBS}/x")] = (403, status(
        403, 'rayjobs.ray.io "x" is forbidden: User "me" cannot get resource', "Forbidden"))
    with pytest.raises(KubernetesError, match="not allowed .*cannot get resource.*RBAC"):
        k8s("status", "x")


def test_delete(api, capsys):
    api.routes[("DELETE", f"{RAYJOBS}/train-x")] = (200, rayjob_with("Complete"))
    assert k8s("delete", "train-x") == 0
    req = api.requests[-1]
    assert (req["method"], req["path"]) == ("DELETE", f"{RAYJOBS}/train-x")
    assert req["query"] == {"propagationPolicy": "Background"}
    assert "deleted RayJob train-x" in capsys.readouterr().out
    n = len(api.requests)
    assert k8s("delete", "train-x", "--dry-run") == 0
    assert len(api.requests) == n
    assert yaml.safe_load(capsys.readouterr().out)["metadata"] == {"name": "train-x",
                                                                  "namespace": NS}


def test_logs(api, capsys):
    api.routes[("GET", f"{RAYJOBS}/train-x")] = (200, rayjob_with("Running", "RUNNING"))
    api.routes[("GET", f"/api/v1/namespaces/{NS}/pods")] = (200, {
        "kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [
            {"metadata": {"name": "train-x-old", "creationTimestamp": "2026-01-01T00:00:00Z"}},
            {"metadata": {"name": "train-x-new", "creationTimestamp": "2026-01-01T01:00:00Z"}}]})
    api.routes[("GET", f"/api/v1/namespaces/{NS}/pods/train-x-new/log")] = (200, "epoch 1\n")
    assert k8s("logs", "train-x", "--tail", "50") == 0
    assert capsys.readouterr().out == "epoch 1\n"
    pods, log = api.requests[-2:]
    assert pods["query"] == {"labelSelector": "job-name=train-x"}
    assert log["query"] == {"tailLines": "50"}


def test_train_watch_follows_to_the_published_version(api, run_yaml, capsys):
    api.routes[("POST", CONFIGMAPS)] = created
    api.routes[("POST", RAYJOBS)] = created
    api.routes[("PATCH", f"{CONFIGMAPS}/train-x-config")] = lambda req: (200, req["body"])
    api.routes[("GET", f"{RAYJOBS}/train-x")] = [
        (200, rayjob_with("Initializing")),
        (200, rayjob_with("Running", "PENDING")),
        (200, rayjob_with("Running", "RUNNING")),
        (200, rayjob_with("Running", "RUNNING")),
        (200, rayjob_with("Running", "SUCCEEDED", "Job finished successfully.")),
    ]
    api.routes[("GET", f"/api/v1/namespaces/{NS}/pods")] = (200, {
        "kind": "PodList", "apiVersion": "v1", "metadata": {},
        "items": [{"metadata": {"name": "train-x-sub"}}]})
    api.routes[("GET", f"/api/v1/namespaces/{NS}/pods/train-x-sub/log")] = (
        200, "epoch 2 ...\npublished sentiment v4 (production) -> /data/registry/sentiment/v4\n")
    assert k8s("train", "--config", str(run_yaml), "--job-name", "train-x", "--watch",
               "--interval-s", "0.5") == 0
    out = capsys.readouterr().out.splitlines()
    changes = [line.split("  ", 2)[2] for line in out if "  train-x  " in line]
    assert changes == ["deployment=Initializing job=-",
                       "deployment=Running job=PENDING",
                       "deployment=Running job=RUNNING",
                       "deployment=Running job=SUCCEEDED: Job finished successfully."]
    assert "published sentiment v4" in out
    assert "pin it on the RayService:  tuneserve k8s promote sentiment v4" in out
    assert len(api.calls("GET")) <= 12


def test_watch_of_a_failed_job(api, run_yaml):
    api.routes[("POST", CONFIGMAPS)] = created
    api.routes[("POST", RAYJOBS)] = created
    api.routes[("PATCH", f"{CONFIGMAPS}/train-x-config")] = lambda req: (200, req["body"])
    api.routes[("GET", f"{RAYJOBS}/train-x")] = [
        (200, rayjob_with("Running", "FAILED")),
        (200, rayjob_with("Retrying", "FAILED")),
        (200, rayjob_with("Failed", "FAILED", "data file not found: /data/t.csv"))]
    with pytest.raises(KubernetesError, match="RayJob train-x failed: data file not found"):
        k8s("train", "--config", str(run_yaml), "--job-name", "train-x", "--watch",
            "--interval-s", "0.5")


def test_watch_gives_up_after_its_timeout(api):
    from services.k8s.client import Kube

    api.routes[("GET", f"{RAYJOBS}/train-x")] = (200, rayjob_with("Running", "RUNNING"))
    kube = Kube.connect(NS)
    ticks = iter(range(100))
    with pytest.raises(KubernetesError, match="still deployment=Running job=RUNNING after 3s"):
        kube.watch_job("train-x", out=lambda _: None, timeout_s=3, sleep=lambda _: None,
                       clock=lambda: float(next(ticks)))
    assert JobState.from_object(rayjob_with("Complete", "SUCCEEDED")).finished
    assert not JobState.from_object(rayjob_with("Retrying", "FAILED")).finished


def test_promote_patches_the_serve_config(api, capsys):
    live = base_object("rayservice.yaml")
    live["metadata"].update(resourceVersion="4711", uid="u2")
    api.routes[("GET", f"{RAYSERVICES}/tuneserve")] = (200, live)
    api.routes[("PATCH", f"{RAYSERVICES}/tuneserve")] = lambda req: (200, live)
    assert k8s("promote", "sentiment", "v3") == 0
    patch = api.requests[-1]
    assert (patch["method"], patch["path"]) == ("PATCH", f"{RAYSERVICES}/tuneserve")
    assert patch["content_type"] == "application/merge-patch+json"
    assert patch["body"]["metadata"] == {"resourceVersion": "4711"}  # no lost update
    assert set(patch["body"]) == {"metadata", "spec"} and set(patch["body"]["spec"]) == \
        {"serveConfigV2"}
    new = yaml.safe_load(patch["body"]["spec"]["serveConfigV2"])
    old = yaml.safe_load(live["spec"]["serveConfigV2"])
    old["applications"][0]["deployments"][0]["user_config"]["pinned_version"] = "v3"
    assert new == old
    assert "pinned sentiment to v3 on RayService tuneserve" in capsys.readouterr().out
    assert k8s("unpin", "sentiment") == 0
    unpinned = yaml.safe_load(api.requests[-1]["body"]["spec"]["serveConfigV2"])
    assert objects.pinned_versions(yaml.safe_dump(unpinned)) == {"sentiment": None}
    n = len(api.calls("PATCH"))
    assert k8s("promote", "sentiment", "v9", "--dry-run") == 0
    assert len(api.calls("PATCH")) == n
    assert "pinned_version: v9" in capsys.readouterr().out


def test_promote_refusals(api):
    live = base_object("rayservice.yaml")
    live["metadata"]["resourceVersion"] = "1"
    api.routes[("GET", f"{RAYSERVICES}/tuneserve")] = (200, live)
    api.routes[("PATCH", f"{RAYSERVICES}/tuneserve")] = (409, status(
        409, "Operation cannot be fulfilled on rayservices.ray.io \"tuneserve\": the object "
             "has been modified", "Conflict"))
    with pytest.raises(InvalidInput, match="expected v<N>"):
        k8s("promote", "sentiment", "3")
    with pytest.raises(TuneserveError, match="'topics' is not served"):
        k8s("promote", "topics", "v1")
    assert api.calls("PATCH") == []
    with pytest.raises(KubernetesError, match="conflict .*has been modified"):
        k8s("promote", "sentiment", "v2")
    with pytest.raises(ObjectNotFound, match="RayService other"):
        k8s("promote", "sentiment", "v2", "--service", "other")


def test_no_kubernetes_config_anywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubernetesError, match="no Kubernetes config: no kubeconfig at .*absent "
                                              r"\(set KUBECONFIG or --kubeconfig\) and not "
                                              "running inside a cluster"):
        k8s("status", "x")
    with pytest.raises(KubernetesError, match="kubeconfig not found: .*nope"):
        k8s("status", "x", "--kubeconfig", str(tmp_path / "nope"))


def test_broken_kubeconfig_and_unreachable_server(tmp_path, monkeypatch, api):
    with pytest.raises(KubernetesError, match="cannot use Kubernetes config .*context"):
        k8s("status", "x", "--context", "no-such-context")
    # a server that is gone: the port of a closed listener
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "gone"
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    with pytest.raises(KubernetesError, match="cannot reach the Kubernetes API server at "
                                              f"http://127.0.0.1:{port}: connection refused"):
        k8s("status", "x", "--kubeconfig", str(config))


def test_a_server_that_never_answers_fails_fast(tmp_path, monkeypatch):
    """A listener that accepts and stays silent (a wrong port, a dropping firewall): one
    wait, no retries of it (it was 4 x 30 s)."""
    import socket

    import services.k8s.client as kclient

    monkeypatch.setattr(kclient, "REQUEST_TIMEOUT_S", (0.5, 0.5))
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        config = tmp_path / "silent"
        config.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {
                "server": f"http://127.0.0.1:{silent.getsockname()[1]}"}}],
            "users": [{"name": "u", "user": {}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        started = time.monotonic()
        with pytest.raises(KubernetesError, match="cannot reach .*: timed out"):
            k8s("status", "x", "--kubeconfig", str(config))
        assert time.monotonic() - started < 5


def test_a_server_that_is_not_kubernetes(api):
    """A web server on the wrong port answers 404 to everything: not 'KubeRay missing'."""
    del api.routes[("GET", "/apis/ray.io/v1")]
    del api.routes[("GET", "/version/")]
    with pytest.raises(KubernetesError, match=f"{api.url} does not answer like a Kubernetes "
                                              "API server") as err:
        k8s("status", "x")
    assert not isinstance(err.value, KubeRayMissing)


def test_module_usage_names_the_form_that_works(capsys):
    from services.k8s.__main__ import main

    for argv in (["--help"], ["train", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        usage = capsys.readouterr().out.splitlines()[0]
        assert usage.startswith("usage: python -m services.k8s " + " ".join(argv[:-1])), usage
        assert "k8s k8s" not in usage


def test_wired_into_the_tuneserve_command(run_yaml, capsys):
    import services.cli as cli

    parser = cli.build_parser()
    try:
        parser.parse_args(["k8s", "train", "--help"])
    except SystemExit:
        pass
    helped = capsys.readouterr().out
    if "--job-name" not in helped:
        pytest.skip("`tuneserve k8s` is not wired into services/cli.py yet")
    assert cli.main(["k8s", "train", "--config", str(run_yaml), "--job-name", "train-x",
                     "--dry-run"]) == 0
    assert [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)] == \
        ["ConfigMap", "RayJob"]
    assert cli.main(["k8s", "promote", "sentiment", "latest"]) == 2
    assert capsys.readouterr().err.startswith("error: version 'latest'")


@pytest.mark.parametrize("body", ["- a\n- b\n", "a: [unclosed\n", "a\x00b: 1\n"])
def test_files_that_are_not_what_they_should_be(tmp_path, body):
    path = tmp_path / "f.yaml"
    path.write_text(body)
    with pytest.raises(KubernetesError, match=r"cannot use Kubernetes config .*: not (valid "
                                              r"YAML|a kubeconfig)"):
        k8s("status", "job1", "--kubeconfig", str(path))
    with pytest.raises(ConfigError, match=r"f.yaml: (not valid YAML|no RayService)") as err:
        k8s("promote", "m", "v2", "--file", str(path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("flags,needle", [
    (["--head-cpus", "abc"], "--head-cpus: 'abc' is not a CPU quantity"),
    (["--head-cpus=-1"], "--head-cpus: '-1' is not a CPU quantity above 0"),
    (["--head-memory", "lots"], "--head-memory: 'lots' is not a memory quantity"),
    (["--worker-memory", "1.5.5Gi"], "--worker-memory: '1.5.5Gi' is not a memory quantity"),
    (["--worker-memory", "0Gi"], "--worker-memory: '0Gi' is not a memory quantity above 0"),
    (["--pvc", "Bad_PVC"], "--pvc 'Bad_PVC': a claim name"),
    (["--gpus-per-worker", "2"], "--gpus-per-worker: applies to a run that uses GPUs"),
    (["--use-gpu", "--gpus-per-worker", "0"], "--gpus-per-worker: the run uses GPUs"),
    (["--image", ""], "--image: '' is not an image reference"),
    (["--image", "UPPER Case:bad tag"], "--image: 'UPPER Case:bad tag' is not an image"),
    (["--image", "ml/tuneserve:"], "--image: 'ml/tuneserve:' is not an image reference"),
])
def test_cluster_settings_are_checked_before_anything_is_written(flags, needle, capsys):
    with pytest.raises(InvalidInput, match=re.escape(needle)):
        k8s("train", "--dry-run", "--model", "bert", "--train", "/data/t.csv", *flags)
    assert capsys.readouterr().out == ""
    with pytest.raises(InvalidInput, match="job 'Bad_Job'"):
        k8s("delete", "Bad_Job", "--dry-run")


def test_cluster_settings_that_are_fine(capsys):
    _, job = dry_run_objects(capsys, "--model", "bert", "--train", "/data/t.csv", "--use-gpu",
                             "--gpus-per-worker", "2", "--head-cpus", "500m",
                             "--head-memory", "512Mi", "--worker-memory", "8G",
                             "--pvc", "shared.data-1",
                             "--image", "registry.example.com:5000/ml/tuneserve:0.1.0-cu128")
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == \
        "registry.example.com:5000/ml/tuneserve:0.1.0-cu128"
    digest = "tuneserve@sha256:" + "0123456789abcdef" * 4
    assert objects.image_reference(digest) == digest
    res = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 2 or res["limits"]["nvidia.com/gpu"] == "2"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert str(head["limits"]["cpu"]) == "500m" and head["limits"]["memory"] == "512Mi"
