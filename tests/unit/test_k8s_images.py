"""Image references in the rendered manifests: one `images:` entry sets name and tag or
digest for every container, and the pull policy matches the reference (a tag is pulled
at every start, a digest only when the node lacks it)."""

from __future__ import annotations

import os

import pytest
import yaml

from services.k8s import objects
from tests.unit.test_k8s_manifests import K8S, OVERLAYS, pod_templates, render

DIGEST = "sha256:" + "0123456789abcdef" * 4


def containers(rendered) -> list[dict]:
    out = []
    for obj in rendered:
        if obj["kind"] in ("RayService", "RayJob"):
            for _, template in pod_templates(obj):
                out.extend(template["spec"]["containers"])
        elif obj["kind"] in ("Deployment", "Job"):
            out.extend(obj["spec"]["template"]["spec"]["containers"])
    return out


@pytest.mark.parametrize("overlay", OVERLAYS + ["s3", "s3-minio"])
def test_the_pull_policy_matches_the_reference(overlay):
    found = containers(render(str(K8S / "overlays" / overlay)))
    assert len(found) >= 5
    for c in found:
        wanted = "IfNotPresent" if "@sha256:" in c["image"] else "Always"
        assert c.get("imagePullPolicy") == wanted, (c["name"], c["image"])


def _overlay(tmp_path, base: str, images: dict, components=()) -> tuple:
    rel = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [f"{rel}/overlays/{base}"],
        "components": [f"{rel}/components/{c}" for c in components],
        "images": [{"name": "tuneserve", **images}]}))
    return render(str(tmp_path))


def test_one_images_entry_pins_every_container_by_digest(tmp_path):
    """The documented way: `images:` with a digest plus the pinned-image component."""
    found = containers(_overlay(tmp_path, "cpu", {"newName": "reg.example.com/ml/tuneserve",
                                                  "digest": DIGEST}, ["pinned-image"]))
    assert {c["image"] for c in found} == {f"reg.example.com/ml/tuneserve@{DIGEST}"}
    assert {c["imagePullPolicy"] for c in found} == {"IfNotPresent"}
    assert not [o for o in _overlay(tmp_path, "cpu", {"digest": DIGEST}, ["pinned-image"])
                if o["kind"] == "ConfigMap" and "pull" in o["metadata"]["name"]]


def test_a_tag_without_the_component_is_always_pulled(tmp_path):
    found = containers(_overlay(tmp_path, "gpu", {"newName": "reg.example.com/ml/tuneserve",
                                                  "newTag": "0.2.0-cu128"}))
    assert {c["image"] for c in found} == {"reg.example.com/ml/tuneserve:0.2.0-cu128"}
    assert {c["imagePullPolicy"] for c in found} == {"Always"}


@pytest.mark.parametrize("image,policy", [
    ("registry.example.com/ml/tuneserve:0.1.0-cpu", "Always"),
    (f"registry.example.com/ml/tuneserve@{DIGEST}", "IfNotPresent"),
    (f"tuneserve:0.1.0-cpu@{DIGEST}", "IfNotPresent")])
def test_the_cli_jobs_pull_policy_follows_the_image(image, policy):
    assert objects.pull_policy(image) == policy
