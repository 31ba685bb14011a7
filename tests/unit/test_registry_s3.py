"""The registry on S3-compatible object storage, against a real local S3 server
(moto in server mode on loopback), with the same guarantees as on a folder."""

import json
import struct

import pytest

from services.core.errors import CorruptVersion, RegistryError
from services.core.registry import Registry
from services.core.registry import store
from tests.unit.test_registry import fake_checkpoint, manifest

moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed")

BUCKET = "tuneserve-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test",
                 aws_secret_access_key="test", region_name="us-east-1"
                 ).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def s3_registry(s3_endpoint, monkeypatch, tmp_path, request):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(store, "CACHE_DIR", tmp_path / "cache")
    prefix = request.node.name.replace("[", "-").replace("]", "")
    uri = (f"s3://{BUCKET}/{prefix}?endpoint_override={s3_endpoint}"
           "&scheme=http&region=us-east-1")
    return Registry(uri)


def test_publish_channels_verify_on_s3(s3_registry, tmp_path):
    reg = s3_registry
    ck = fake_checkpoint(tmp_path / "ck")
    first = reg.publish("sent", ck, manifest())
    second = reg.publish("sent", ck, manifest())
    assert (first.version, first.promoted, second.version, second.promoted) == \
        ("v1", True, "v2", False)
    assert first.path.startswith(f"s3://{BUCKET}/") and "?" not in first.path
    assert reg.model_names() == ["sent"] and reg.versions("sent") == ["v1", "v2"]
    m = reg.verify("sent", "v2")
    assert set(m["files"]) == {"model.safetensors", "config.json", "tokenizer.json"}
    local = reg.local_copy("sent", "v2")
    assert (local / "model.safetensors").is_file() and str(local).startswith(str(tmp_path))
    reg.set_channel("sent", "production", "v2")
    assert reg.channel("sent") == "v2" and reg.channels_of("sent") == {"production": "v2"}
    assert reg.rollback("sent") == "v1"
    reg.pin("sent", "v2")
    assert reg.pinned("sent") == "v2" and reg.resolve("sent") == "v2"
    reg.unpin("sent")
    assert reg.pinned("sent") is None and reg.resolve("sent") == "v1"


def test_unfinished_publish_is_invisible_on_s3(s3_registry, tmp_path, monkeypatch):
    """Files uploaded but the publisher died before the manifest: no version."""
    reg = s3_registry
    ck = fake_checkpoint(tmp_path / "ck")

    def die(*a, **k):
        raise KeyboardInterrupt("publisher killed")

    real_write = reg.backend.write_atomic

    def write_but_not_manifest(rel, data):
        if rel.endswith("manifest.json"):
            die()
        return real_write(rel, data)

    monkeypatch.setattr(reg.backend, "write_atomic", write_but_not_manifest)
    with pytest.raises(KeyboardInterrupt):
        reg.publish("m", ck, manifest())
    monkeypatch.setattr(reg.backend, "write_atomic", real_write)
    assert reg.versions("m") == [] and reg.channel("m") is None
    assert reg.backend.list_files("m/v1")  # the debris exists, yet is not a version
    res = reg.publish("m", ck, manifest())
    assert res.version == "v2" and reg.verify("m", "v2")["version"] == "v2"


def test_corrupt_object_is_refused_on_s3(s3_registry, tmp_path):
    reg = s3_registry
    ck = fake_checkpoint(tmp_path / "ck")
    reg.publish("c", ck, manifest())
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    reg.backend.write_atomic("c/v1/model.safetensors",
                             struct.pack("<Q", len(header)) + header + b"\x01" * 8)
    with pytest.raises(CorruptVersion, match="sha256"):
        reg.verify("c", "v1")


def test_unreachable_store_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(RegistryError, match="cannot open registry"):
        Registry("nosuchscheme://bucket/prefix")


def _flip_last_byte(reg, rel):
    data = bytearray(reg.backend.read_bytes(rel))
    data[-1] ^= 0xFF
    reg.backend.write_atomic(rel, bytes(data))
    return bytes(data)


def test_the_cache_follows_the_store(s3_registry, tmp_path):
    """A cached copy is not trusted over the store: an object corrupted after the copy
    was made fails verify, and the same object put right verifies again (a Promote
    after the fix works without clearing any cache by hand)."""
    import time

    reg = s3_registry
    reg.publish("c", fake_checkpoint(tmp_path / "ck"), manifest())
    good = reg.backend.read_bytes("c/v1/model.safetensors")
    assert reg.verify("c", "v1")  # cached now
    time.sleep(1.1)  # object stores date objects to the second
    _flip_last_byte(reg, "c/v1/model.safetensors")
    with pytest.raises(CorruptVersion, match="sha256"):
        reg.verify("c", "v1")
    time.sleep(1.1)
    reg.backend.write_atomic("c/v1/model.safetensors", good)
    assert reg.verify("c", "v1")["version"] == "v1"
    # a damaged cached copy is fetched again rather than refused
    cached = reg.local_copy("c", "v1") / "model.safetensors"
    cached.write_bytes(cached.read_bytes()[:-1] + b"\x00")
    assert reg.verify("c", "v1")["version"] == "v1"


def test_a_missing_bucket_and_credentials_in_the_uri_are_refused(s3_endpoint, monkeypatch):
    from services.core.errors import InvalidInput

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    query = f"?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    with pytest.raises(RegistryError, match="bucket 'nobucket' does not exist"):
        Registry(f"s3://nobucket/p{query}")
    with pytest.raises(InvalidInput, match="no credentials in the URI") as err:
        Registry(f"s3://AKIAFAKE:SuperSecret@{BUCKET}/p{query}")
    assert "SuperSecret" not in err.value.message


def test_a_copy_of_a_cached_version_publishes_without_its_claim(s3_registry, tmp_path):
    import shutil

    reg = s3_registry
    reg.publish("c", fake_checkpoint(tmp_path / "ck"), manifest())
    copy = tmp_path / "copy"
    shutil.copytree(reg.local_copy("c", "v1"), copy)
    assert (copy / ".claim").is_file()
    res = reg.publish("c", copy, manifest())
    assert ".claim" not in reg.verify("c", res.version)["files"]


def test_canary_and_history_on_s3(s3_registry, tmp_path, monkeypatch):
    """Canary state and history on an object store: no append there, so the history
    is rewritten whole and keeps its newest entries (whole lines only)."""
    from services.core.registry import rollout

    reg = s3_registry
    ck = fake_checkpoint(tmp_path / "ck")
    reg.publish("sent", ck, manifest()), reg.publish("sent", ck, manifest())
    reg.start_canary("sent", "v2", 10)
    assert Registry(reg.uri).canary("sent")["percent"] == 10.0
    reg.set_canary_share("sent", 30)
    reg.abort_canary("sent", reason="errors")
    assert [e["action"] for e in reg.history("sent")] == [
        "promote", "canary-start", "canary-share", "canary-abort"]
    monkeypatch.setattr(rollout, "HISTORY_KEEP_BYTES", 400)
    for i in range(10):
        reg.record("sent", "note", n=i)
    kept = reg.history("sent")
    assert kept and [e["n"] for e in kept] == list(range(10 - len(kept), 10))
