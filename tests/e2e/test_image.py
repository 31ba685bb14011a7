"""The real image, built and run on this machine without Docker.

A Debian base made with `debootstrap --variant=minbase` plus Debian's python3 (imported
with `podman import`), the project's Dockerfile built on it with `buildah bud --isolation
chroot`, the machine's pip configuration, wheel folders and CA bundle mounted into the
RUN steps only (nothing host-specific lands in a layer), and the image run with `podman
run` (runc, explicit ulimits): `--version`, `--help` and `tuneserve demo`.

It takes about 4.5 minutes on 2 cores (a full dependency install). `.ci/run` installs the
four tools, so CI runs it; elsewhere it runs as root where buildah, podman, runc and
debootstrap are installed, and is skipped, saying which is missing, otherwise.
TUNESERVE_IMAGE_TEST=0 skips it for a quicker local run.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
from pathlib import Path

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


@pytest.fixture(scope="module")
def base_image(tmp_path_factory) -> str:
    """Debian bookworm minbase with python3, venv and the `python` name."""
    root = tmp_path_factory.mktemp("rootfs")
    run("debootstrap", "--variant=minbase",
        "--include=python3,python3-venv,python-is-python3", "bookworm", str(root))
    tar = tmp_path_factory.mktemp("tar") / "rootfs.tar"
    run("tar", "-C", str(root), "-cf", str(tar), ".")
    run("podman", "import", "--change", "CMD=/bin/bash", str(tar), BASE)
    return BASE


@pytest.fixture(scope="module")
def image(base_image) -> str:
    mounts = [f"--volume={p}:{p}:ro" for p in HOST_MOUNTS if Path(p).exists()]
    run("buildah", "bud", "--isolation", "chroot", "--format", "docker",
        "--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", "TORCH_INDEX=",
        *mounts, "-t", IMAGE, str(ROOT))
    return IMAGE


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
