"""The bounded local cache of object-store versions (`Registry.local_copy`).

Layout: `<root>/<store key>/<name>/<version>/` (the files), beside it `.<version>.fetched`
(the store's newest object time when fetched) and `.<version>.lock` (last use: its
mtime; in use: a shared flock on it). After every fetch the cache is pruned, least
recently used first, until it holds at most `TUNESERVE_CACHE_MAX_VERSIONS` versions and
`TUNESERVE_CACHE_MAX_BYTES` bytes; a version some process holds is never removed, so
the cache may exceed its bounds by the versions in use. A process holds the last two
versions of each model it asked for (the one it serves and the one it loads), until
it asks for a newer one or exits (the kernel drops its locks then).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from services.core.errors import InvalidInput
from services.core.names import VERSION_RE

MAX_BYTES_ENV = "TUNESERVE_CACHE_MAX_BYTES"
MAX_VERSIONS_ENV = "TUNESERVE_CACHE_MAX_VERSIONS"
# Below the 4 Gi emptyDir the k8s manifests give /tmp, leaving room for one more
# version being fetched and for Ray's own files.
DEFAULT_MAX_BYTES = 2 * 1024 ** 3
DEFAULT_MAX_VERSIONS = 8
HELD_PER_MODEL = 2

_held: dict[Path, list[tuple[str, int]]] = {}  # model folder -> [(version, lock fd)]
_held_lock = threading.Lock()


def _limit(env: str, default: int) -> int:
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 1:
        raise InvalidInput(f"{env} must be a positive integer, not {raw!r}")
    return value


def limits() -> tuple[int, int]:
    """(max bytes, max versions) from the environment, or the defaults."""
    return _limit(MAX_BYTES_ENV, DEFAULT_MAX_BYTES), _limit(MAX_VERSIONS_ENV,
                                                            DEFAULT_MAX_VERSIONS)


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def _open_locked(path: Path, flags: int) -> Optional[int]:
    """An fd holding `flags` on path's current file (re-opened if a pruner replaced
    it meanwhile), or None when a non-blocking lock is refused."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def hold(folder: Path) -> None:
    """Mark a version as used now, and held by this process (see the module doc)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder)
    with _held_lock:
        held = _held.setdefault(folder.parent, [])
        if not any(v == folder.name for v, _ in held):
            fd = _open_locked(path, fcntl.LOCK_SH)
            assert fd is not None  # a blocking lock is never refused
            held.append((folder.name, fd))
        else:
            held.append(held.pop(next(i for i, (v, _) in enumerate(held)
                                      if v == folder.name)))
        while len(held) > HELD_PER_MODEL:
            os.close(held.pop(0)[1])
    os.utime(path)


@dataclass
class Entry:
    folder: Path
    size: int
    used: float


def entries(root: Path) -> list[Entry]:
    """Every complete cached version below root, most recently used first."""
    found = []
    for folder in root.glob("*/*/*"):
        if not (folder.is_dir() and VERSION_RE.match(folder.name)):
            continue
        try:
            used = lock_path(folder).stat().st_mtime
        except FileNotFoundError:
            used = 0.0
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        found.append(Entry(folder, size, used))
    return sorted(found, key=lambda e: e.used, reverse=True)


def prune(root: Path) -> list[Path]:
    """Remove least recently used versions nobody holds until the cache is within its
    bounds; returns the folders removed."""
    max_bytes, max_versions = limits()
    kept_count, kept_bytes, removed = 0, 0, []
    for entry in entries(root):
        if kept_count + 1 <= max_versions and kept_bytes + entry.size <= max_bytes:
            kept_count, kept_bytes = kept_count + 1, kept_bytes + entry.size
            continue
        if _remove(entry.folder):
            removed.append(entry.folder)
        else:  # in use: kept, and counted
            kept_count, kept_bytes = kept_count + 1, kept_bytes + entry.size
    return removed


def _remove(folder: Path) -> bool:
    path = lock_path(folder)
    fd = _open_locked(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is None:
        return False
    try:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (folder.parent / f".{folder.name}.fetched").unlink()
        path.unlink()
    finally:
        os.close(fd)
    return True
