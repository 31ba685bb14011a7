"""Registry implementation on a POSIX filesystem (local disk or a ReadWriteMany PVC)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from services.data import file_sha256
from services.errors import CorruptVersion, InvalidInput, ModelNotFound, RegistryError
from services.registry.safetensors_check import check_safetensors

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CHANNELS_DIR = "channels"
STAGING_PREFIX = ".staging-"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^v([1-9][0-9]{0,8})$")
# Pickle-based formats can run code when loaded: a version holding one is refused.
UNSAFE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy",
                   ".npz", ".h5", ".msgpack"}
STALE_STAGING_S = 24 * 3600
HISTORY_LIMIT = 50


def validate_name(name: str, what: str = "model") -> str:
    """Model and channel names: letters, digits, '.', '_', '-'; no path tricks."""
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{what} name is empty")
    if not NAME_RE.match(name) or ".." in name:
        raise InvalidInput(
            f"invalid {what} name {name[:64]!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise InvalidInput(f"invalid version {str(version)[:64]!r}: expected v1, v2, ...")
    return version


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class PublishResult:
    name: str
    version: str
    path: Path
    promoted: bool


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- paths -----------------------------------------------------------------
    def _model_dir(self, name: str) -> Path:
        return self._inside(self.root / validate_name(name))

    def _inside(self, path: Path) -> Path:
        """Refuse any path (or symlink) that leaves the registry root."""
        root = self.root.resolve()
        resolved = path.resolve()
        if resolved != root and root not in resolved.parents:
            raise InvalidInput("path leaves the registry")
        return path

    def version_dir(self, name: str, version: str) -> Path:
        path = self._model_dir(name) / validate_version(version)
        if path.is_symlink():
            raise CorruptVersion(f"{name} {version}: version folder is a symlink")
        return self._inside(path)

    # ---- reading ---------------------------------------------------------------
    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = []
        for child in sorted(self.root.iterdir()):
            if child.is_dir() and not child.is_symlink() and NAME_RE.match(child.name) \
                    and ".." not in child.name and self.versions(child.name):
                names.append(child.name)
        return names

    def versions(self, name: str) -> list[str]:
        mdir = self._model_dir(name)
        if not mdir.is_dir():
            return []
        found = []
        for child in mdir.iterdir():
            m = VERSION_RE.match(child.name)
            if m and child.is_dir() and not child.is_symlink() and (child / MANIFEST).is_file():
                found.append((int(m.group(1)), child.name))
        return [v for _, v in sorted(found)]

    def exists(self, name: str, version: Optional[str] = None) -> bool:
        versions = self.versions(name)
        return bool(versions) if version is None else version in versions

    def manifest(self, name: str, version: str) -> dict[str, Any]:
        path = self.version_dir(name, version) / MANIFEST
        if not path.is_file():
            if not self.exists(name):
                raise ModelNotFound(f"model '{name}' not found in the registry")
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CorruptVersion(f"{name} {version}: unreadable manifest ({exc})") from None
        if not isinstance(data, dict):
            raise CorruptVersion(f"{name} {version}: manifest is not a JSON object")
        return data

    def channel_file(self, name: str, channel: str) -> Path:
        return self._model_dir(name) / CHANNELS_DIR / f"{validate_name(channel, 'channel')}.json"

    def channel_state(self, name: str, channel: str = "production") -> dict[str, Any]:
        path = self.channel_file(name, channel)
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{name}: unreadable {channel} pointer ({exc})") from None
        return data if isinstance(data, dict) else {}

    def channel(self, name: str, channel: str = "production") -> Optional[str]:
        version = self.channel_state(name, channel).get("version")
        return version if isinstance(version, str) and VERSION_RE.match(version) else None

    def channels_of(self, name: str) -> dict[str, str]:
        """channel name -> version, for every channel of a model."""
        cdir = self._model_dir(name) / CHANNELS_DIR
        out: dict[str, str] = {}
        if cdir.is_dir():
            for f in sorted(cdir.glob("*.json")):
                if NAME_RE.match(f.stem) and (v := self.channel(name, f.stem)):
                    out[f.stem] = v
        return out

    def resolve(self, name: str, version: Optional[str] = None,
                channel: str = "production") -> str:
        """The version to serve: the one asked for, else the channel's."""
        if not self.exists(name):
            raise ModelNotFound(f"model '{name}' not found in the registry")
        if version:
            validate_version(version)
            if not self.exists(name, version):
                raise ModelNotFound(f"model '{name}' has no version '{version}'")
            return version
        target = self.channel(name, channel)
        if target is None:
            raise ModelNotFound(f"model '{name}' has no '{channel}' version")
        return target

    # ---- verification ----------------------------------------------------------
    def verify(self, name: str, version: str) -> dict[str, Any]:
        """Check a version completely; return its manifest or raise CorruptVersion."""
        vdir = self.version_dir(name, version)
        manifest = self.manifest(name, version)
        where = f"{name} {version}"
        if manifest.get("name") != name or manifest.get("version") != version:
            raise CorruptVersion(f"{where}: manifest names {manifest.get('name')!r} "
                                 f"{manifest.get('version')!r}")
        listed = manifest.get("files")
        if not isinstance(listed, dict) or not listed:
            raise CorruptVersion(f"{where}: manifest lists no files")
        present = {}
        for path in vdir.rglob("*"):
            rel = path.relative_to(vdir).as_posix()
            if path.is_symlink():
                raise CorruptVersion(f"{where}: {rel} is a symlink")
            if path.is_file() and rel != MANIFEST:
                present[rel] = path
        for rel in present:
            if Path(rel).suffix.lower() in UNSAFE_SUFFIXES:
                raise CorruptVersion(f"{where}: refusing pickle-based file {rel}")
            if rel not in listed:
                raise CorruptVersion(f"{where}: {rel} is not in the manifest")
        for rel, meta in listed.items():
            path = present.get(rel)
            if path is None:
                raise CorruptVersion(f"{where}: missing file {rel}")
            if not isinstance(meta, dict):
                raise CorruptVersion(f"{where}: bad manifest entry for {rel}")
            if path.stat().st_size != meta.get("size"):
                raise CorruptVersion(f"{where}: {rel} has the wrong size")
            if file_sha256(path) != meta.get("sha256"):
                raise CorruptVersion(f"{where}: {rel} fails its sha256 check")
        weights = [p for rel, p in present.items() if rel.endswith(".safetensors")]
        if not weights:
            raise CorruptVersion(f"{where}: no safetensors weights")
        for path in weights:
            try:
                check_safetensors(path)
            except ValueError as exc:
                raise CorruptVersion(f"{where}: {path.name}: {exc}") from None
        if "config.json" not in present:
            raise CorruptVersion(f"{where}: missing config.json")
        labels = manifest.get("labels")
        if manifest.get("task") == "classification":
            try:
                config = json.loads(present["config.json"].read_text(encoding="utf-8"))
            except ValueError:
                raise CorruptVersion(f"{where}: config.json is not valid JSON") from None
            id2label = config.get("id2label") or {}
            names = [id2label.get(str(i)) for i in range(len(id2label))]
            if not labels or names != labels:
                raise CorruptVersion(f"{where}: config labels {names} differ from the "
                                     f"manifest's {labels}")
        return manifest

    # ---- writing ---------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        mdir = self._model_dir(name)
        mdir.mkdir(parents=True, exist_ok=True)
        with open(mdir / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def publish(self, name: str, source: str | Path, manifest: dict[str, Any],
                promote: Optional[bool] = None) -> PublishResult:
        """Copy a checkpoint folder in as the next version.

        `promote=None` promotes only the first version of a name (so that a fresh
        train + serve works); True always; False never.
        """
        source = Path(source)
        mdir = self._model_dir(name)
        mdir.mkdir(parents=True, exist_ok=True)
        self._clean_stale_staging(mdir)
        staging = mdir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        try:
            files = self._copy_into(source, staging)
            body = dict(manifest)
            body.update(format=MANIFEST_FORMAT, name=name, files=files,
                        created_at=body.get("created_at") or _now())
            for _attempt in range(100):
                with self._lock(name):
                    existing = self.versions(name)
                    number = int(existing[-1][1:]) + 1 if existing else 1
                    version = f"v{number}"
                    body["version"] = version
                    _write_atomic(staging / MANIFEST,
                                  json.dumps(body, indent=2, sort_keys=True).encode())
                    target = mdir / version
                    if target.exists():
                        continue
                    os.rename(staging, target)
                    _fsync_dir(mdir)
                    break
            else:
                raise RegistryError(f"{name}: could not allocate a version number")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        first = self.channel(name, "production") is None
        promoted = bool(promote) or (promote is None and first)
        if promoted:
            self.set_channel(name, "production", version)
        return PublishResult(name, version, target, promoted)

    def _copy_into(self, source: Path, staging: Path) -> dict[str, dict[str, Any]]:
        if not source.is_dir():
            raise RegistryError(f"checkpoint folder not found: {source}")
        staging.mkdir(parents=True)
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source).as_posix()
            if path.is_dir() or rel == MANIFEST:
                continue
            if path.is_symlink():
                raise RegistryError(f"refusing to publish symlink {rel}")
            if path.suffix.lower() in UNSAFE_SUFFIXES:
                raise RegistryError(f"refusing to publish pickle-based file {rel}; "
                                    "save weights as safetensors")
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            with open(dest, "rb+") as fh:
                os.fsync(fh.fileno())
            files[rel] = {"sha256": file_sha256(dest), "size": dest.stat().st_size}
        if not any(rel.endswith(".safetensors") for rel in files):
            raise RegistryError(f"{source}: no safetensors weights to publish")
        return files

    def _clean_stale_staging(self, mdir: Path) -> None:
        cutoff = time.time() - STALE_STAGING_S
        for child in mdir.glob(f"{STAGING_PREFIX}*"):
            with contextlib.suppress(OSError):
                if child.stat().st_mtime < cutoff:
                    shutil.rmtree(child, ignore_errors=True)

    def set_channel(self, name: str, channel: str, version: str) -> dict[str, Any]:
        """Point a channel at a version (atomically), remembering the previous one."""
        validate_version(version)
        if not self.exists(name, version):
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        with self._lock(name):
            state = self.channel_state(name, channel)
            history = list(state.get("history") or [])
            previous = state.get("version")
            if previous and previous != version:
                history.append(previous)
            new = {"version": version, "history": history[-HISTORY_LIMIT:],
                   "updated_at": _now()}
            path = self.channel_file(name, channel)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(path, json.dumps(new, indent=2).encode())
        return new

    def rollback(self, name: str, channel: str = "production") -> str:
        """Move a channel back to the version it pointed at before."""
        with self._lock(name):
            state = self.channel_state(name, channel)
            history = [v for v in state.get("history") or [] if self.exists(name, v)]
            if not history:
                raise RegistryError(f"{name}: no earlier {channel} version to roll back to")
            version = history.pop()
            new = {"version": version, "history": history, "updated_at": _now()}
            _write_atomic(self.channel_file(name, channel), json.dumps(new, indent=2).encode())
        return version
