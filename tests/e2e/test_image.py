"""The real image, built and run on this machine without Docker.

A Debian base made with `debootstrap --variant=minbase` plus Debian's python3 (imported
with `podman import`), the project's Dockerfile built on it with `buildah bud --isolation
chroot`, the machine's pip configuration, wheel folders and CA bundle mounted into the
RUN steps only (nothing host-specific lands in a layer), and the image run with `podman
run` (runc, explicit ulimits): `--version`, `--help` and `tuneserve demo`.

The build takes about 4 minutes on 2 cores (a full dependency install), most of it
waiting on disk and unpacking. So that it costs the suite little wall time, it starts in
a background thread as soon as the tests are collected (`start_build`, called by
tests/conftest.py, at the lowest CPU priority), and these tests run last, waiting for it.
`.ci/run` installs the four tools, so CI runs it; elsewhere it runs as root where
buildah, podman, runc and debootstrap are installed, and is skipped, saying which is
missing, otherwise. TUNESERVE_IMAGE_TEST=0 skips it for a quicker local run.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("buildah", "podman", "runc", "debootstrap")
BASE = "localhost/tuneserve-test-base:bookworm"
IMAGE = "localhost/tuneserve:test"
# The machine's pip setup, visible to the build's RUN steps only (buildah --volume).
HOST_MOUNTS = ("/etc/pip.conf", "/etc/xdg/pip", "/root/.config/pip", "/opt/wheels",
               "/opt/pypi", "/opt/pypi-more", "/etc/ssl/certs/ca-certificates.crt")
# crun and podman's default ulimits fail here: runc, and limits no higher than this
# process's hard limits (Ray opens many files and threads).
_FILES = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
_PROCS = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 8192)
RUN_FLAGS = ["--runtime", "runc", "--ulimit", f"nofile={_FILES}:{_FILES}", "--ulimit",
             f"nproc={_PROCS}:{_PROCS}", "--shm-size", "2g", "--network", "host", "--rm"]


def _skip_reason() -> str:
    if os.environ.get("TUNESERVE_IMAGE_TEST") == "0":
        return "TUNESERVE_IMAGE_TEST=0: the image build (minutes) is skipped"
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install {' '.join(TOOLS)})"
    if os.geteuid() != 0:
        return "buildah and podman run rootless here only as root"
    return ""


pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600),
              pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "-")]


def run(*argv: str, timeout: float = 1800) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv[:4])} ...:\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc.stdout


class _Build:
    """The base image and the project's image, built on a thread of their own: the
    image's name, or the error that stopped the build."""

    def __init__(self):
        self.done = threading.Event()
        self.error: Optional[BaseException] = None
        self._work = tempfile.TemporaryDirectory(prefix="tuneserve-image-")
        threading.Thread(target=self._run, daemon=True, name="image-build").start()

    def _run(self) -> None:
        try:
            build(Path(self._work.name))
        except BaseException as exc:  # reported by the `image` fixture
            self.error = exc
        finally:
            self._work.cleanup()
            self.done.set()

    def wait(self) -> str:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return IMAGE


_build: Optional[_Build] = None


def start_build() -> None:
    """Start building the image in the background, once (no-op where it is skipped)."""
    global _build
    if _build is None and not _skip_reason():
        _build = _Build()


def build(work: Path) -> None:
    """Debian bookworm minbase with python3, venv and the `python` name as the base,
    then the project's Dockerfile on it, each step at the lowest CPU priority."""
    low = ["nice", "-n", "19"]
    root = work / "rootfs"
    run(*low, "debootstrap", "--variant=minbase",
        "--include=python3,python3-venv,python-is-python3", "bookworm", str(root))
    tar = work / "rootfs.tar"
    run(*low, "tar", "-C", str(root), "-cf", str(tar), ".")
    shutil.rmtree(root, ignore_errors=True)
    run(*low, "podman", "import", "--change", "CMD=/bin/bash", str(tar), BASE)
    tar.unlink()
    mounts = [f"--volume={p}:{p}:ro" for p in HOST_MOUNTS if Path(p).exists()]
    run(*low, "buildah", "bud", "--isolation", "chroot", "--format", "docker",
        "--build-arg", f"BASE_IMAGE={BASE}", "--build-arg", "TORCH_INDEX=",
        *mounts, "-t", IMAGE, str(ROOT), timeout=3000)  # niced: slower while tests run


@pytest.fixture(scope="module")
def image() -> str:
    start_build()  # when collection did not start it (e.g. the module alone)
    return _build.wait()


def test_version_and_help(image):
    out = run("podman", "run", *RUN_FLAGS, image, "--version")
    assert out.strip().startswith("tuneserve"), out
    assert "train" in run("podman", "run", *RUN_FLAGS, image, "--help")
    config = run("podman", "image", "inspect", "--format", "{{.Config.User}}", image)
    assert config.strip() == "1000:100"
    # nothing of the host's pip setup in a layer (mounted into the RUN steps only)
    # (buildah leaves empty mount points; the CA bundle is Debian's own, not the host's)
    found = run("podman", "run", *RUN_FLAGS, "--user", "0", "--entrypoint", "sh", image,
                "-c", f"for p in {' '.join(HOST_MOUNTS[:-1])}; do "
                '[ -e "$p" ] && find "$p" -type f -size +0; done; '
                "sha256sum /etc/ssl/certs/ca-certificates.crt; true")
    host_ca = hashlib.sha256(Path(HOST_MOUNTS[-1]).read_bytes()).hexdigest()
    lines = found.split()
    assert len(lines) == 2 and lines[0] != host_ca, found


def test_demo_runs_in_the_image(image):
    out = run("podman", "run", *RUN_FLAGS, image, "demo", "--help")
    assert "demo" in out
    out = run("podman", "run", *RUN_FLAGS, "--env", "TUNESERVE_HOME=/tmp/tuneserve",
              image, "demo", timeout=1800)
    assert "answered by sentiment-demo v1" in out and "== summary ==" in out, out[-3000:]
