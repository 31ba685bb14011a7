"""Registry implementation over a `Backend` (local/PVC folder or S3-compatible store)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from services.data import file_sha256
from services.errors import CorruptVersion, InvalidInput, ModelNotFound, RegistryError
from services.registry.backend import Backend
from services.registry.safetensors_check import check_safetensors

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CHANNELS_DIR = "channels"
PIN_FILE = "pin.json"
STAGING_PREFIX = ".staging-"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^v([1-9][0-9]{0,8})$")
# Pickle-based formats can run code when loaded: a version holding one is refused.
UNSAFE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy",
                   ".npz", ".h5", ".msgpack"}
STALE_STAGING_S = 24 * 3600
HISTORY_LIMIT = 50
CACHE_DIR = Path(os.environ.get("TUNESERVE_CACHE", Path.home() / ".cache" / "tuneserve"))


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


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


@dataclass
class PublishResult:
    name: str
    version: str
    path: str
    promoted: bool


class Registry:
    def __init__(self, root: str | Path):
        self.backend = Backend(root)

    @property
    def uri(self) -> str:
        """Absolute location, usable by another process (replicas, CLI)."""
        return self.backend.uri if self.backend.remote else self.backend.root

    def __repr__(self) -> str:
        return f"Registry({self.uri.split('?')[0]!r})"

    # ---- reading ---------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [n for n, is_dir in sorted(self.backend.list_dir(""))
                if is_dir and NAME_RE.match(n) and ".." not in n
                and not self.backend.is_symlink(n) and self.versions(n)]

    def versions(self, name: str) -> list[str]:
        validate_name(name)
        found = []
        for child, is_dir in self.backend.list_dir(name):
            m = VERSION_RE.match(child)
            if m and is_dir and not self.backend.is_symlink(f"{name}/{child}") \
                    and self.backend.is_file(f"{name}/{child}/{MANIFEST}"):
                found.append((int(m.group(1)), child))
        return [v for _, v in sorted(found)]

    def exists(self, name: str, version: Optional[str] = None) -> bool:
        if version is not None:
            validate_version(version)
            return (self.backend.is_file(f"{validate_name(name)}/{version}/{MANIFEST}")
                    and not self.backend.is_symlink(f"{name}/{version}"))
        return bool(self.versions(name))

    def manifest(self, name: str, version: str) -> dict[str, Any]:
        validate_name(name), validate_version(version)
        if self.backend.is_symlink(f"{name}/{version}"):
            raise CorruptVersion(f"{name} {version}: version folder is a symlink")
        rel = f"{name}/{version}/{MANIFEST}"
        if not self.backend.is_file(rel):
            if not self.exists(name):
                raise ModelNotFound(f"model '{name}' not found in the registry")
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        try:
            data = json.loads(self.backend.read_bytes(rel))
        except (OSError, ValueError) as exc:
            raise CorruptVersion(f"{name} {version}: unreadable manifest ({exc})") from None
        if not isinstance(data, dict):
            raise CorruptVersion(f"{name} {version}: manifest is not a JSON object")
        return data

    def _pointer(self, rel: str, what: str) -> dict[str, Any]:
        if not self.backend.is_file(rel):
            return {}
        try:
            data = json.loads(self.backend.read_bytes(rel))
        except (OSError, ValueError) as exc:
            raise RegistryError(f"unreadable {what} pointer ({exc})") from None
        return data if isinstance(data, dict) else {}

    def _channel_rel(self, name: str, channel: str) -> str:
        return f"{validate_name(name)}/{CHANNELS_DIR}/{validate_name(channel, 'channel')}.json"

    def channel_state(self, name: str, channel: str = "production") -> dict[str, Any]:
        return self._pointer(self._channel_rel(name, channel), f"{name} {channel}")

    def channel(self, name: str, channel: str = "production") -> Optional[str]:
        version = self.channel_state(name, channel).get("version")
        return version if isinstance(version, str) and VERSION_RE.match(version) else None

    def channels_of(self, name: str) -> dict[str, str]:
        """channel name -> version, for every channel of a model."""
        out: dict[str, str] = {}
        for fname, is_dir in sorted(self.backend.list_dir(f"{validate_name(name)}/{CHANNELS_DIR}")):
            stem = fname[:-5] if fname.endswith(".json") else ""
            if not is_dir and stem and NAME_RE.match(stem) and (v := self.channel(name, stem)):
                out[stem] = v
        return out

    def pinned(self, name: str) -> Optional[str]:
        """A version every replica must serve, whatever the channel says (or None)."""
        version = self._pointer(f"{validate_name(name)}/{PIN_FILE}", f"{name} pin").get("version")
        return version if isinstance(version, str) and VERSION_RE.match(version) else None

    def resolve(self, name: str, version: Optional[str] = None,
                channel: str = "production") -> str:
        """The version to serve: the one asked for, else the pin, else the channel's."""
        if not self.exists(name):
            raise ModelNotFound(f"model '{name}' not found in the registry")
        if version:
            if not self.exists(name, version):
                raise ModelNotFound(f"model '{name}' has no version '{version}'")
            return version
        target = self.pinned(name) or self.channel(name, channel)
        if target is None:
            raise ModelNotFound(f"model '{name}' has no '{channel}' version")
        return target

    # ---- local copies and verification -----------------------------------------
    def local_copy(self, name: str, version: str) -> Path:
        """A local folder holding the version's files (the folder itself when local)."""
        validate_name(name), validate_version(version)
        if not self.backend.remote:
            path = self.backend.local_path(f"{name}/{version}")
            if path.is_symlink():
                raise CorruptVersion(f"{name} {version}: version folder is a symlink")
            return path
        key = hashlib.sha256(self.backend.uri.encode()).hexdigest()[:16]
        dest = CACHE_DIR / key / name / version
        if not (dest / MANIFEST).is_file():
            if not self.exists(name, version):
                raise ModelNotFound(f"model '{name}' has no version '{version}'")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=dest.parent))
            try:
                self.backend.download_tree(f"{name}/{version}", tmp)
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def verify(self, name: str, version: str) -> dict[str, Any]:
        """Check a version completely; return its manifest or raise CorruptVersion.

        Returns the manifest read from the verified local copy (see local_copy)."""
        manifest = self.manifest(name, version)
        folder = self.local_copy(name, version)
        verify_folder(folder, name, version, manifest)
        return manifest

    # ---- writing ---------------------------------------------------------------
    def publish(self, name: str, source: str | Path, manifest: dict[str, Any],
                promote: Optional[bool] = None) -> PublishResult:
        """Copy a checkpoint folder in as the next version.

        `promote=None` promotes only the first version of a name (so that a fresh
        train + serve works); True always; False never.
        """
        validate_name(name)
        source = Path(source)
        files = _checkpoint_files(source)
        body = dict(manifest)
        body.update(format=MANIFEST_FORMAT, name=name,
                    created_at=body.get("created_at") or _now())
        version = (self._publish_local if not self.backend.remote else self._publish_remote)(
            name, source, files, body)
        first = self.channel(name, "production") is None
        promoted = bool(promote) or (promote is None and first)
        if promoted:
            self.set_channel(name, "production", version)
        path = (str(self.backend.local_path(f"{name}/{version}")) if not self.backend.remote
                else f"{self.uri.split('?')[0].rstrip('/')}/{name}/{version}")
        return PublishResult(name, version, path, promoted)

    def _next_version(self, name: str) -> str:
        existing = self.versions(name)
        taken = {c for c, _ in self.backend.list_dir(name) if VERSION_RE.match(c)}
        number = int(existing[-1][1:]) + 1 if existing else 1
        while f"v{number}" in taken:
            number += 1
        return f"v{number}"

    def _publish_local(self, name: str, source: Path, files: list[str], body: dict) -> str:
        self._clean_stale_staging(name)
        staging = f"{name}/{STAGING_PREFIX}{uuid.uuid4().hex}"
        try:
            body["files"] = {rel: self._upload(source / rel, f"{staging}/{rel}") for rel in files}
            for _attempt in range(100):
                with self.backend.lock(f"{name}/.lock"):
                    version = self._next_version(name)
                    body["version"] = version
                    self.backend.write_atomic(f"{staging}/{MANIFEST}", _dumps(body))
                    if self.backend.rename_dir(staging, f"{name}/{version}"):
                        return version
            raise RegistryError(f"{name}: could not allocate a version number")
        except BaseException:
            self.backend.delete_tree(staging)
            raise

    def _publish_remote(self, name: str, source: Path, files: list[str], body: dict) -> str:
        # No rename on object stores: write the files under the version's prefix, then the
        # manifest last. Until the manifest exists the version is invisible and unloadable.
        version = self._next_version(name)
        claim = uuid.uuid4().hex
        self.backend.write_atomic(f"{name}/{version}/.claim", claim.encode())
        if self.backend.read_bytes(f"{name}/{version}/.claim").decode() != claim:
            raise RegistryError(f"{name}: another publisher claimed {version}; retry")
        body["version"] = version
        body["files"] = {rel: self._upload(source / rel, f"{name}/{version}/{rel}")
                         for rel in files}
        self.backend.write_atomic(f"{name}/{version}/{MANIFEST}", _dumps(body))
        return version

    def _upload(self, local: Path, rel: str) -> dict[str, Any]:
        sha, size = self.backend.upload(local, rel)
        return {"sha256": sha, "size": size}

    def _clean_stale_staging(self, name: str) -> None:
        cutoff = time.time() - STALE_STAGING_S
        for child, is_dir in self.backend.list_dir(name):
            if is_dir and child.startswith(STAGING_PREFIX):
                mtime = self.backend.info(f"{name}/{child}").mtime
                if mtime is not None and mtime.timestamp() < cutoff:
                    self.backend.delete_tree(f"{name}/{child}")

    def set_channel(self, name: str, channel: str, version: str) -> dict[str, Any]:
        """Point a channel at a version (atomically), remembering the previous one."""
        validate_version(version)
        if not self.exists(name, version):
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        with self.backend.lock(f"{name}/.lock"):
            state = self.channel_state(name, channel)
            history = list(state.get("history") or [])
            previous = state.get("version")
            if previous and previous != version:
                history.append(previous)
            new = {"version": version, "history": history[-HISTORY_LIMIT:],
                   "updated_at": _now()}
            self.backend.write_atomic(self._channel_rel(name, channel), _dumps(new))
        return new

    def rollback(self, name: str, channel: str = "production") -> str:
        """Move a channel back to the version it pointed at before."""
        with self.backend.lock(f"{name}/.lock"):
            state = self.channel_state(name, channel)
            history = [v for v in state.get("history") or [] if self.exists(name, v)]
            current = state.get("version")
            while history and history[-1] == current:
                history.pop()
            if not history:
                raise RegistryError(f"{name}: no earlier {channel} version to roll back to")
            version = history.pop()
            new = {"version": version, "history": history, "updated_at": _now()}
            self.backend.write_atomic(self._channel_rel(name, channel), _dumps(new))
        return version

    def pin(self, name: str, version: str) -> None:
        validate_version(version)
        if not self.exists(name, version):
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        self.backend.write_atomic(f"{name}/{PIN_FILE}",
                                  _dumps({"version": version, "updated_at": _now()}))

    def unpin(self, name: str) -> None:
        if not self.exists(name):
            raise ModelNotFound(f"model '{name}' not found in the registry")
        self.backend.write_atomic(f"{name}/{PIN_FILE}", _dumps({"version": None,
                                                                "updated_at": _now()}))


def _checkpoint_files(source: Path) -> list[str]:
    if not source.is_dir():
        raise RegistryError(f"checkpoint folder not found: {source}")
    files = []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source).as_posix()
        if path.is_symlink():
            raise RegistryError(f"refusing to publish symlink {rel}")
        if path.is_dir() or rel == MANIFEST:
            continue
        if path.suffix.lower() in UNSAFE_SUFFIXES:
            raise RegistryError(f"refusing to publish pickle-based file {rel}; "
                                "save weights as safetensors")
        files.append(rel)
    if not any(rel.endswith(".safetensors") for rel in files):
        raise RegistryError(f"{source}: no safetensors weights to publish")
    return files


def verify_folder(vdir: Path, name: str, version: str, manifest: dict[str, Any]) -> None:
    """Every check a version must pass before anything loads it."""
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
        if path.is_file() and rel not in (MANIFEST, ".claim"):
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
    if manifest.get("task") == "classification":
        try:
            config = json.loads(present["config.json"].read_text(encoding="utf-8"))
        except ValueError:
            raise CorruptVersion(f"{where}: config.json is not valid JSON") from None
        id2label = config.get("id2label") or {}
        names = [id2label.get(str(i)) for i in range(len(id2label))]
        labels = manifest.get("labels")
        if not labels or names != labels:
            raise CorruptVersion(f"{where}: config labels {names} differ from the "
                                 f"manifest's {labels}")
