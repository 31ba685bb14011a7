"""The registry on S3-compatible object storage, against a real local S3 server
(moto in server mode on loopback), with the same guarantees as on a folder."""

import json
import struct

import pytest

from services.errors import CorruptVersion, RegistryError
from services.registry import Registry
from services.registry import store
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
