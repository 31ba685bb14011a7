"""`tuneserve k8s promote/unpin --file`: a pin committed for GitOps changes one line of
the manifest that holds the overlay's serveConfigV2, and nothing else."""

from __future__ import annotations

import difflib
import shutil

import pytest
import yaml

from services.core.errors import ConfigError
from services.k8s import objects
from services.k8s.manifest import pin_in_manifest
from tests.unit.test_k8s_client import k8s
from tests.unit.test_k8s_manifests import K8S, render, serve_config

# The file holding each overlay's serveConfigV2 (the others replace the base's).
PIN_FILES = {"cpu": "base/rayservice.yaml",
             "gpu": "overlays/gpu/rayservice-gpu.yaml",
             "colocated": "overlays/colocated/rayservice-colocated.yaml",
             "production": "overlays/production/rayservice-ha.yaml"}


def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(),
                                                  lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def pinned(text: str, service: str = "tuneserve") -> dict:
    """model -> pin, read from the serveConfigV2 a file holds (RayService or patch)."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "RayService":
            return objects.pinned_versions(doc["spec"]["serveConfigV2"])
        if isinstance(doc, list):
            for op in doc:
                if op.get("path") == "/spec/serveConfigV2":
                    return objects.pinned_versions(op["value"])
    raise AssertionError("no serveConfigV2")


@pytest.mark.parametrize("overlay", sorted(PIN_FILES))
def test_promote_changes_one_line_of_each_overlays_file(overlay, capsys):
    path = K8S / PIN_FILES[overlay]
    before = path.read_text()
    assert k8s("promote", "sentiment", "v3", "--file", str(path)) == 0
    out, err = capsys.readouterr()
    assert err == ""  # comments kept: no note
    diff = changed_lines(before, out)
    assert len(diff) == 2, diff  # one line out, one in
    assert pinned(out) == {"sentiment": "v3"}
    assert k8s("unpin", "sentiment", "--file", str(path)) == 0
    assert pinned(capsys.readouterr().out) == {"sentiment": None}


def test_a_pin_in_place_reaches_every_rendered_overlay(tmp_path, capsys):
    """The pin committed where each overlay reads it renders into its RayService."""
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    for overlay, name in PIN_FILES.items():
        assert k8s("promote", "sentiment", "v9", "--file", str(tree / name),
                   "--in-place") == 0
        assert f"pinned sentiment to v9 in {tree / name}" in capsys.readouterr().err
        rayservice = next(o for o in render(str(tree / "overlays" / overlay))
                          if o["kind"] == "RayService")
        assert objects.pinned_versions(yaml.safe_dump(serve_config(rayservice))) == \
            {"sentiment": "v9"}, overlay
    assert not list(tree.rglob(".*tuneserve-tmp"))


def test_pins_added_where_the_lines_are_missing():
    doc = yaml.safe_load((K8S / "base" / "rayservice.yaml").read_text())
    text = (K8S / "base" / "rayservice.yaml").read_text()
    # no pinned_version line in user_config: one is added beside the others
    text = text.replace("              pinned_version: null\n", "")
    edited = pin_in_manifest(text, service="tuneserve", model="sentiment", version="v2",
                             app="tuneserve", source="f")
    assert edited.kept_comments and len(changed_lines(text, edited.text)) == 1
    assert pinned(edited.text) == {"sentiment": "v2"}
    # a colocated ingress whose pins are a block mapping: another model's line is added
    colocated = (K8S / "overlays" / "colocated" / "rayservice-colocated.yaml").read_text()
    colocated = colocated.replace("pinned_versions: {}",
                                  "pinned_versions:  # per model\n"
                                  "                sentiment: v1")
    colocated = colocated.replace("            - sentiment\n",
                                  "            - sentiment\n            - topics\n")
    edited = pin_in_manifest(colocated, service="tuneserve", model="topics", version="v4",
                             app="tuneserve", source="f")
    assert edited.kept_comments
    assert pinned(edited.text) == {"sentiment": "v1", "topics": "v4"}
    assert "# per model" in edited.text
    edited = pin_in_manifest(edited.text, service="tuneserve", model="sentiment",
                             version="v5", app="tuneserve", source="f")
    assert pinned(edited.text) == {"sentiment": "v5", "topics": "v4"}
    assert doc["kind"] == "RayService"


def test_a_serve_config_not_written_as_a_block_is_written_anew(tmp_path, capsys):
    """A quoted string (what a YAML dumper may write) has no pin line to rewrite: the
    value is written out again as a literal block, and the command says so."""
    obj = yaml.safe_load((K8S / "base" / "rayservice.yaml").read_text())
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"},
             "data": {"serveConfigV2": "not this one"}}
    text = "# my manifests\n" + yaml.safe_dump(other) + "---\n" + \
        yaml.safe_dump(obj, default_style='"')
    path = tmp_path / "all.yaml"
    path.write_text(text)
    assert k8s("promote", "sentiment", "v6", "--file", str(path), "--in-place") == 0
    err = capsys.readouterr().err
    assert "serveConfigV2 of RayService tuneserve was written out anew" in err
    after = path.read_text()
    assert after.startswith("# my manifests\n")
    docs = list(yaml.safe_load_all(after))
    assert docs[0] == other
    assert objects.pinned_versions(docs[1]["spec"]["serveConfigV2"]) == {"sentiment": "v6"}
    assert docs[1]["spec"]["rayClusterConfig"] == obj["spec"]["rayClusterConfig"]


def test_files_without_a_serve_config_and_flag_misuse(tmp_path):
    path = tmp_path / "svc.yaml"
    path.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n")
    with pytest.raises(ConfigError, match="svc.yaml: no RayService named 'tuneserve' with a "
                                          "serveConfigV2, and no patch that sets "
                                          "/spec/serveConfigV2"):
        k8s("promote", "sentiment", "v2", "--file", str(path))
    with pytest.raises(ConfigError, match="no RayService named 'other'"):
        k8s("promote", "sentiment", "v2", "--service", "other",
            "--file", str(K8S / "base" / "rayservice.yaml"))
    with pytest.raises(Exception, match="--in-place: edits the --file manifest"):
        k8s("promote", "sentiment", "v2", "--in-place")
    with pytest.raises(ConfigError, match="model 'topics' is not served"):
        k8s("promote", "topics", "v2", "--file", str(K8S / "base" / "rayservice.yaml"))


def test_an_edit_that_does_not_read_back_is_written_anew(monkeypatch):
    """The last check: the edited file must hold the pinned serveConfigV2, else the
    value is written out anew (here the check is made to fail once)."""
    from services.k8s import manifest

    real, calls = manifest._serve_configs, []

    def fails_first(text):
        calls.append(text)
        return [] if len(calls) == 1 else real(text)

    monkeypatch.setattr(manifest, "_serve_configs", fails_first)
    text = (K8S / "base" / "rayservice.yaml").read_text()
    edited = pin_in_manifest(text, service="tuneserve", model="sentiment", version="v4",
                             app="tuneserve", source="f")
    assert not edited.kept_comments and pinned(edited.text) == {"sentiment": "v4"}
    assert yaml.safe_load(edited.text)["spec"]["rayClusterConfig"] == \
        yaml.safe_load(text)["spec"]["rayClusterConfig"]
