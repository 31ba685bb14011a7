"""A publisher killed with SIGKILL at any point leaves no half version behind.

The publish runs in a child process that pauses at a chosen point (a hook installed in
the child only: while it writes the second weights file, after the staging manifest is
written but before the rename, or while it replaces the production pointer), tells the
test where it is, and is killed there with SIGKILL, with no chance to clean up. The
registry must then list only complete versions, every one of them must verify, the
channel must be intact, and the next publish must work and take the next number.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.core.registry import Registry
from services.core.registry.store import STALE_STAGING_S
from tests.helpers import poll_until
from tests.unit.test_registry import fake_checkpoint, manifest

REPO = Path(__file__).resolve().parents[2]
SHARD = "model-00002.safetensors"
SHARD_BYTES = 1024 * 1024

CHILD = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, sys.argv[5])
    import services.core.registry.backend as backend
    from services.core.registry import Registry

    root, ck, marker, point = sys.argv[1:5]

    def pause(note):
        """Tell the parent where we are (atomically), then wait to be killed."""
        with open(marker + ".tmp", "w") as fh:
            fh.write(note)
        os.rename(marker + ".tmp", marker)
        time.sleep(600)

    if point == "mid-file":
        backend.CHUNK = 64 * 1024
        real_open = open

        class PausingFile:
            def __init__(self, fh):
                self.fh = fh
            def write(self, data):
                n = self.fh.write(data)
                self.fh.flush()
                pause(self.fh.name)  # after the first block of the shard
                return n
            def __getattr__(self, attr):
                return getattr(self.fh, attr)
            def __enter__(self):
                return self
            def __exit__(self, *exc):
                return self.fh.__exit__(*exc)

        def pausing_open(path, mode="r", *args, **kwargs):
            fh = real_open(path, mode, *args, **kwargs)
            if "w" in mode and str(path).endswith("model-00002.safetensors"):
                return PausingFile(fh)
            return fh

        backend.open = pausing_open
    elif point == "before-rename":
        def rename_dir(self, src, dst):
            pause(src)  # the staging manifest is written; the model lock is held
        backend.Backend.rename_dir = rename_dir
    elif point == "mid-channel-write":
        real_replace = os.replace
        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith("production.json"):
                pause(str(src))  # the new pointer is written to its temporary file
            return real_replace(src, dst, *args, **kwargs)
        os.replace = replace
    Registry(root).publish("m", ck, {"task": "classification", "labels": ["neg", "pos"]},
                           promote=True if point == "mid-channel-write" else None)
    print("publish finished: the hook never paused")
''')


def checkpoint_with_big_shard(folder: Path) -> Path:
    ck = fake_checkpoint(folder)
    header = json.dumps({"big": {"dtype": "U8", "shape": [SHARD_BYTES],
                                 "data_offsets": [0, SHARD_BYTES]}}).encode()
    (ck / SHARD).write_bytes(struct.pack("<Q", len(header)) + header
                             + os.urandom(1024) * (SHARD_BYTES // 1024))
    return ck


def kill_publisher_at(point: str, root: Path, ck: Path, tmp_path: Path) -> str:
    """Run a publish in a child, SIGKILL it at `point`; return where it paused."""
    script = tmp_path / "publish_child.py"
    script.write_text(CHILD)
    marker = tmp_path / f"paused-{point}"
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(ck), str(marker),
                             point, str(REPO)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        reached = poll_until(lambda: marker.exists() or proc.poll() is not None,
                             timeout_s=60, poll_s=0.05)
        if not marker.exists():
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"the publisher never paused (rc {proc.returncode}, reached "
                        f"{reached}): {out.decode()[-500:]} {err.decode()[-2000:]}")
        # While it is paused, readers see nothing new yet.
        assert Registry(root).versions("m") == ["v1"] or point == "mid-channel-write"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return marker.read_text()


def assert_consistent(reg: Registry, versions: list[str]) -> None:
    assert reg.model_names() == ["m"]
    assert reg.versions("m") == versions
    for version in versions:
        assert reg.verify("m", version)["version"] == version
    assert reg.channel("m") == "v1" and reg.channels_of("m") == {"production": "v1"}
    assert reg.resolve("m") == "v1"


@pytest.fixture
def setup(tmp_path):
    root = tmp_path / "reg"
    reg = Registry(root)
    assert reg.publish("m", fake_checkpoint(tmp_path / "small"), manifest()).version == "v1"
    return reg, root, checkpoint_with_big_shard(tmp_path / "ck")


def test_killed_while_writing_a_file(setup, tmp_path):
    reg, root, ck = setup
    paused_in = Path(kill_publisher_at("mid-file", root, ck, tmp_path))
    # It really died mid-file: a partial shard in a staging folder, nothing else.
    assert paused_in.parent.name.startswith(".staging-")
    assert 0 < paused_in.stat().st_size < (ck / SHARD).stat().st_size
    assert not (paused_in.parent / "manifest.json").exists()
    assert_consistent(reg, ["v1"])
    assert reg.exists("m", "v1") and not reg.exists("m", "v2")

    # The next publish takes v2; debris older than a day goes with it.
    old = time.time() - STALE_STAGING_S - 60
    os.utime(paused_in.parent, (old, old))
    res = reg.publish("m", ck, manifest())
    assert (res.version, res.promoted) == ("v2", False)
    assert_consistent(reg, ["v1", "v2"])
    assert not paused_in.parent.exists()
    assert set(reg.verify("m", "v2")["files"]) >= {SHARD, "model.safetensors"}


def test_killed_between_staging_manifest_and_rename(setup, tmp_path):
    reg, root, ck = setup
    staging = Path(root) / kill_publisher_at("before-rename", root, ck, tmp_path)
    # Everything was written, manifest included, but the version never got its name.
    assert (staging / "manifest.json").is_file() and (staging / SHARD).is_file()
    assert_consistent(reg, ["v1"])
    # The model lock died with the publisher: the next publish is not blocked.
    res = reg.publish("m", ck, manifest())
    assert res.version == "v2"
    assert_consistent(reg, ["v1", "v2"])
    assert staging.exists()  # fresh debris is left for the stale-staging sweep


def test_killed_while_replacing_the_channel_pointer(setup, tmp_path):
    reg, root, ck = setup
    tmp_pointer = Path(kill_publisher_at("mid-channel-write", root, ck, tmp_path))
    assert tmp_pointer.is_file() and tmp_pointer.name.endswith(".tmp")
    # v2 was complete before the pointer moved: it is visible and verifies, and
    # production still points at v1, readable and whole.
    assert_consistent(reg, ["v1", "v2"])
    assert reg.channel_state("m")["version"] == "v1"
    res = reg.publish("m", ck, manifest(), promote=True)
    assert (res.version, res.promoted) == ("v3", True)
    assert reg.channel("m") == "v3" and reg.verify("m", "v3")
    assert reg.channels_of("m") == {"production": "v3"}
