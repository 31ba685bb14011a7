import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from services.core.errors import CorruptVersion, InvalidInput, ModelNotFound, RegistryError
from services.core.registry import Registry
from services.core.registry.safetensors_check import check_safetensors


def fake_checkpoint(folder, labels=("neg", "pos"), payload=b"\x00" * 8):
    """A checkpoint folder in HF layout with a real (tiny) safetensors file."""
    folder.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + payload)
    (folder / "config.json").write_text(json.dumps(
        {"id2label": {str(i): lab for i, lab in enumerate(labels)}}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def manifest(labels=("neg", "pos")):
    return {"task": "classification", "labels": list(labels), "metrics": {"accuracy": 0.9}}


def registry_of(tmp_path, names, versions: int = 2) -> Registry:
    """A registry under tmp_path/reg with `versions` classifier versions of each name."""
    reg = Registry(tmp_path / "reg")
    ck = fake_checkpoint(tmp_path / "ck")
    for name in names:
        for _ in range(versions):
            reg.publish(name, ck, manifest())
    return reg


def test_publish_first_version_becomes_production(tmp_path):
    reg = Registry(tmp_path / "reg")
    res = reg.publish("sent", fake_checkpoint(tmp_path / "ck"), manifest())
    assert (res.version, res.promoted) == ("v1", True)
    assert reg.channel("sent") == "v1"
    m = reg.verify("sent", "v1")
    assert set(m["files"]) == {"model.safetensors", "config.json", "tokenizer.json"}
    assert m["name"] == "sent" and m["version"] == "v1" and m["created_at"]
    assert len(m["files"]["model.safetensors"]["sha256"]) == 64
    # the second publish does not promote by itself
    res2 = reg.publish("sent", tmp_path / "ck", manifest())
    assert (res2.version, res2.promoted) == ("v2", False)
    assert reg.channel("sent") == "v1" and reg.versions("sent") == ["v1", "v2"]
    assert not list((tmp_path / "reg" / "sent").glob(".staging-*"))


def test_channels_and_rollback(tmp_path):
    reg = Registry(tmp_path / "reg")
    ck = fake_checkpoint(tmp_path / "ck")
    for _ in range(3):
        reg.publish("m", ck, manifest())
    reg.set_channel("m", "production", "v3")
    assert reg.channel("m") == "v3"
    assert reg.rollback("m") == "v1"
    assert reg.channels_of("m") == {"production": "v1"}
    with pytest.raises(ModelNotFound):
        reg.set_channel("m", "production", "v9")
    with pytest.raises(RegistryError, match="no earlier"):
        reg.rollback("m")
    with pytest.raises(ModelNotFound, match="model 'nope' not found"):
        reg.rollback("nope")
    with pytest.raises(ModelNotFound, match=r"model 'm' has no channel 'canary' \(its "
                                            r"channels: production\)"):
        reg.rollback("m", "canary")
    with pytest.raises(InvalidInput, match="channel name 'pin' is reserved"):
        reg.set_channel("m", "pin", "v1")
    # a hand-edited channel file: history that is not a list of versions is skipped
    channel = tmp_path / "reg" / "m" / "channels" / "production.json"
    for history in ('"v2"', '["v2", 7, "../x"]'):
        channel.write_text('{"version": "v1", "history": %s}' % history)
        expected = "v1" if history.startswith('"') else "v2"
        if expected == "v1":
            with pytest.raises(RegistryError, match="no earlier"):
                reg.rollback("m")
        else:
            assert reg.rollback("m") == "v2"
    reg.set_channel("m", "production", "v3")
    assert json.loads(channel.read_text())["history"] == ["v2"]


def test_verify_detects_flipped_byte_missing_file_extra_pickle(tmp_path):
    reg = Registry(tmp_path / "reg")
    ck = fake_checkpoint(tmp_path / "ck")
    for _ in range(3):
        reg.publish("m", ck, manifest())
    weights = tmp_path / "reg" / "m" / "v1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptVersion, match="sha256"):
        reg.verify("m", "v1")
    (tmp_path / "reg" / "m" / "v2" / "tokenizer.json").unlink()
    with pytest.raises(CorruptVersion, match="missing file tokenizer.json"):
        reg.verify("m", "v2")
    (tmp_path / "reg" / "m" / "v3" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CorruptVersion, match="pickle"):
        reg.verify("m", "v3")


def test_label_mismatch_is_refused(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish("m", fake_checkpoint(tmp_path / "ck", labels=("a", "b")), manifest(("x", "y")))
    with pytest.raises(CorruptVersion, match="labels"):
        reg.verify("m", "v1")


def test_publish_refuses_pickles_and_missing_weights(tmp_path):
    reg = Registry(tmp_path / "reg")
    ck = fake_checkpoint(tmp_path / "ck")
    (ck / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(RegistryError, match="pickle"):
        reg.publish("m", ck, manifest())
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match="no safetensors"):
        reg.publish("m", empty, manifest())
    assert reg.versions("m") == []
    assert not list((tmp_path / "reg" / "m").glob(".staging-*"))


@pytest.mark.parametrize("name", ["..", "../x", "a/b", "/abs", "", ".hidden", "a" * 200])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(InvalidInput):
        Registry(tmp_path).versions(name)


def test_symlink_leaving_the_root_is_refused(tmp_path):
    outside = fake_checkpoint(tmp_path / "outside" / "v1")
    (outside / "manifest.json").write_text("{}")
    root = tmp_path / "reg"
    root.mkdir()
    (root / "evil").symlink_to(tmp_path / "outside")
    reg = Registry(root)
    with pytest.raises(InvalidInput, match="leaves the registry"):
        reg.manifest("evil", "v1")
    assert reg.model_names() == []


def test_publisher_killed_midway_leaves_no_version(tmp_path):
    """Kill the publishing process between files: nothing half-written is visible."""
    ck = fake_checkpoint(tmp_path / "ck")
    big = ck / "model-00002.safetensors"
    header = json.dumps({"w": {"dtype": "U8", "shape": [50_000_000], "data_offsets": [0, 50_000_000]}}).encode()
    big.write_bytes(struct.pack("<Q", len(header)) + header + b"\x01" * 50_000_000)
    root = tmp_path / "reg"
    script = textwrap.dedent(f"""
        import os, signal
        import services.core.registry.backend as backend
        import services.core.registry.store as store
        real = backend.Backend.upload
        def upload_then_die(self, local, rel):
            out = real(self, local, rel)
            if "model-00002" in str(local):
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        backend.Backend.upload = upload_then_die
        store.Registry({str(root)!r}).publish("m", {str(ck)!r}, {{"task": "classification",
            "labels": ["neg", "pos"]}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    reg = Registry(root)
    assert reg.versions("m") == [] and reg.channel("m") is None
    assert list((root / "m").glob(".staging-*"))  # the debris is only in staging
    big.unlink()
    res = reg.publish("m", ck, manifest())
    assert res.version == "v1" and reg.verify("m", "v1")


def test_safetensors_header_checks(tmp_path):
    def write(header_obj=None, raw_header=None, payload=b"", length=None):
        raw = raw_header if raw_header is not None else json.dumps(header_obj).encode()
        path = tmp_path / "w.safetensors"
        path.write_bytes(struct.pack("<Q", length if length is not None else len(raw))
                         + raw + payload)
        return path

    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert check_safetensors(write(ok, payload=b"\x00" * 8)) == 1
    with pytest.raises(ValueError, match="exceeds"):
        check_safetensors(write(ok, payload=b"\x00" * 8, length=2**60))
    with pytest.raises(ValueError, match="outside"):
        check_safetensors(write(ok, payload=b"\x00" * 4))  # truncated
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    with pytest.raises(ValueError, match="overlap"):
        check_safetensors(write(overlap, payload=b"\x00" * 12))
    with pytest.raises(ValueError, match="not valid JSON"):
        check_safetensors(write(raw_header=b"\xff{", payload=b""))
    os.remove(tmp_path / "w.safetensors")


def _publish_one(root, ck, barrier_dir, index):
    """A publisher process: wait until every publisher is ready, then publish."""
    import time as _time
    from pathlib import Path as _Path

    (_Path(barrier_dir) / str(index)).touch()
    while len(list(_Path(barrier_dir).iterdir())) < 6:
        _time.sleep(0.005)
    res = Registry(root).publish("race", ck, manifest())
    return res.version, res.promoted


def test_concurrent_first_publishes_promote_exactly_one(tmp_path):
    """Only the first version of a new name becomes production by itself, even when
    several publishers start at once: the one that promoted is production."""
    import multiprocessing

    ck = fake_checkpoint(tmp_path / "ck")
    for attempt in range(3):
        root, barrier = tmp_path / f"reg{attempt}", tmp_path / f"barrier{attempt}"
        root.mkdir(), barrier.mkdir()
        with multiprocessing.get_context("spawn").Pool(6) as pool:
            results = pool.starmap(_publish_one, [(str(root), str(ck), str(barrier), i)
                                                  for i in range(6)])
        promoted = [version for version, did in results if did]
        assert len(promoted) == 1, results
        reg = Registry(root)
        assert reg.channel("race") == promoted[0]
        assert reg.channel_state("race")["history"] == []
        assert sorted(v for v, _ in results) == reg.versions("race")


def test_a_model_name_keeps_its_task(tmp_path):
    reg = Registry(tmp_path / "reg")
    ck = fake_checkpoint(tmp_path / "ck")
    reg.publish("m", ck, manifest())
    gen = {"task": "generation", "metrics": {"loss": 1.0}}
    with pytest.raises(RegistryError, match="'m' is a classification model .* generation"):
        reg.publish("m", ck, gen)
    assert reg.versions("m") == ["v1"]
    # a version of the other task that got in anyway (an older tuneserve, a hand copy)
    # cannot be promoted or pinned over the model's task
    import shutil

    shutil.copytree(tmp_path / "reg" / "m" / "v1", tmp_path / "reg" / "m" / "v2")
    body = json.loads((tmp_path / "reg" / "m" / "v2" / "manifest.json").read_text())
    body.update(version="v2", task="generation")
    (tmp_path / "reg" / "m" / "v2" / "manifest.json").write_text(json.dumps(body))
    for change in (lambda: reg.set_channel("m", "production", "v2"),
                   lambda: reg.set_channel("m", "canary", "v2"), lambda: reg.pin("m", "v2")):
        with pytest.raises(RegistryError, match="keeps its task"):
            change()
    assert reg.channel("m") == "v1" and reg.pinned("m") is None
    reg.publish("other", ck, gen)  # another name takes the other task
    assert reg.channel("other") == "v1"


def test_an_unreadable_file_is_a_registry_error_naming_it(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish("m", fake_checkpoint(tmp_path / "ck"), manifest())
    weights = tmp_path / "reg" / "m" / "v1" / "model.safetensors"
    weights.chmod(0)
    try:
        if os.access(weights, os.R_OK):
            pytest.skip("running with permission to read any file (root)")
        with pytest.raises(RegistryError, match="cannot read model.safetensors") as err:
            reg.verify("m", "v1")
        assert not isinstance(err.value, CorruptVersion)
        assert str(tmp_path) not in err.value.message
    finally:
        weights.chmod(0o644)


def test_a_broken_production_pointer_does_not_block_pin_or_other_channels(tmp_path):
    reg = registry_of(tmp_path, ("m",))
    (tmp_path / "reg" / "m" / "channels" / "production.json").write_text("{not json")
    reg.pin("m", "v2")
    reg.set_channel("m", "canary", "v2")
    assert reg.pinned("m") == "v2" and reg.channel("m", "canary") == "v2"
