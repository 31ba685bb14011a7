"""Registry implementation over a `Backend` (local/PVC folder or S3-compatible store)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from services.core.config import CLASSIFICATION
from services.core.data import file_sha256
from services.core.errors import (CorruptVersion, ModelNotFound, RegistryError,
                                  TuneserveError, UnreadableVersion)
from services.core.names import NAME_RE, VERSION_RE, validate_name, validate_version
from services.core.registry import cache
from services.core.registry.backend import Backend
from services.core.registry.rollout import RolloutMethods
from services.core.registry.safetensors_check import check_safetensors, unsafe_format

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CHANNELS_DIR = "channels"
PIN_FILE = "pin.json"
CLAIM = ".claim"  # an object-store publisher's claim on a version number
STAGING_PREFIX = ".staging-"
# Pickle-based formats can run code when loaded: a version holding one is refused (and
# any other file whose first bytes show a pickle or a torch.save archive, see
# safetensors_check.unsafe_format).
UNSAFE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy",
                   ".npz", ".h5", ".msgpack"}
STALE_STAGING_S = 24 * 3600
MAX_JSON_BYTES = 64 * 1024 * 1024  # manifests, pointers, config.json, *.index.json
HISTORY_LIMIT = 50
CACHE_DIR = Path(os.environ.get("TUNESERVE_CACHE", Path.home() / ".cache" / "tuneserve"))


def manifest_task(manifest: dict[str, Any]) -> str:
    """A manifest's task (classification when unsaid, as before the field existed)."""
    return str(manifest.get("task") or CLASSIFICATION)


def pointer_version(state: dict[str, Any]) -> Optional[str]:
    """The version a channel or pin pointer names (None: none, or not a version)."""
    version = state.get("version")
    return version if isinstance(version, str) and VERSION_RE.match(version) else None


def _history(state: dict[str, Any]) -> list[str]:
    """A channel's earlier versions, oldest first; anything else in a hand-edited
    file (not a list, not a version) is skipped."""
    history = state.get("history")
    if not isinstance(history, list):
        return []
    return [v for v in history if isinstance(v, str) and VERSION_RE.match(v)]


def _now() -> str:
    """When a pointer was written: to the microsecond, since replicas take a pointer
    written again (a Promote of the version it already names) as a request to retry a
    refused version (services/serving/follower.py)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode()


@dataclass
class PublishResult:
    name: str
    version: str
    path: str
    promoted: bool


class Registry(RolloutMethods):
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
            if m and is_dir and self._has_manifest(name, child):
                found.append((int(m.group(1)), child))
        return [v for _, v in sorted(found)]

    def _has_manifest(self, name: str, version: str) -> bool:
        """A complete version: a real folder (no symlink) with a real manifest file.

        Symlinks are checked before anything follows them, so one planted in the
        registry hides that version instead of reading through it."""
        folder = f"{name}/{version}"
        if self.backend.is_symlink(folder) or self.backend.is_symlink(f"{folder}/{MANIFEST}"):
            return False
        return self.backend.is_file(f"{folder}/{MANIFEST}")

    def exists(self, name: str, version: Optional[str] = None) -> bool:
        if version is not None:
            return self._has_manifest(validate_name(name), validate_version(version))
        return bool(self.versions(name))

    def manifest(self, name: str, version: str) -> dict[str, Any]:
        validate_name(name), validate_version(version)
        if self.backend.is_symlink(f"{name}/{version}"):
            raise CorruptVersion(f"{name} {version}: version folder is a symlink")
        rel = f"{name}/{version}/{MANIFEST}"
        if self.backend.is_symlink(rel):
            raise CorruptVersion(f"{name} {version}: {MANIFEST} is a symlink")
        if not self.backend.is_file(rel):
            if not self.exists(name):
                raise ModelNotFound(f"model '{name}' not found in the registry")
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        try:
            data = self._read_json(rel)
        except ValueError as exc:
            raise CorruptVersion(f"{name} {version}: unreadable manifest ({exc})") from None
        if not isinstance(data, dict):
            raise CorruptVersion(f"{name} {version}: manifest is not a JSON object")
        return data

    def _read_json(self, rel: str) -> Any:
        """A small JSON file of the registry; ValueError (naming no path) if it is too
        big or unreadable, so that a planted file cannot exhaust memory."""
        size = self.backend.info(rel).size
        if size is not None and size > MAX_JSON_BYTES:
            raise ValueError(f"larger than {MAX_JSON_BYTES // (1024 * 1024)} MiB")
        try:
            return json.loads(self.backend.read_bytes(rel))
        except OSError as exc:
            raise ValueError(exc.strerror or type(exc).__name__) from None
        except RecursionError:
            raise ValueError("nested too deeply") from None

    def _pointer(self, rel: str, what: str) -> dict[str, Any]:
        if self.backend.is_symlink(rel):
            raise RegistryError(f"{what} pointer is a symlink; refusing to follow it")
        if not self.backend.is_file(rel):
            return {}
        try:
            data = self._read_json(rel)
        except ValueError as exc:
            raise RegistryError(f"unreadable {what} pointer ({exc})") from None
        return data if isinstance(data, dict) else {}

    def _channel_rel(self, name: str, channel: str) -> str:
        return f"{validate_name(name)}/{CHANNELS_DIR}/{validate_name(channel, 'channel')}.json"

    def channel_state(self, name: str, channel: str = "production") -> dict[str, Any]:
        return self._pointer(self._channel_rel(name, channel), f"{name} {channel}")

    def channel(self, name: str, channel: str = "production") -> Optional[str]:
        return pointer_version(self.channel_state(name, channel))

    def channels_of(self, name: str) -> dict[str, str]:
        """channel name -> version, for every channel of a model."""
        out: dict[str, str] = {}
        for fname, is_dir in sorted(self.backend.list_dir(f"{validate_name(name)}/{CHANNELS_DIR}")):
            stem = fname[:-5] if fname.endswith(".json") else ""
            if not is_dir and stem and NAME_RE.match(stem) and ".." not in stem \
                    and (v := self.channel(name, stem)):
                out[stem] = v
        return out

    def pin_state(self, name: str) -> dict[str, Any]:
        """The pin pointer as written ({} when there is none)."""
        return self._pointer(f"{validate_name(name)}/{PIN_FILE}", f"{name} pin")

    def pinned(self, name: str) -> Optional[str]:
        """A version every replica must serve, whatever the channel says (or None)."""
        return pointer_version(self.pin_state(name))

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
    def local_copy(self, name: str, version: str, refresh: bool = False) -> Path:
        """A local folder holding the version's files (the folder itself when local).
        From an object store, a cached copy, fetched again when an object of the
        version changed since, or when `refresh`; the cache is bounded (cache.py)."""
        validate_name(name), validate_version(version)
        if not self.backend.remote:
            if self.backend.is_symlink(f"{name}/{version}"):
                raise CorruptVersion(f"{name} {version}: version folder is a symlink")
            return self.backend.local_path(f"{name}/{version}")
        key = hashlib.sha256(self.backend.uri.encode()).hexdigest()[:16]
        dest = CACHE_DIR / key / name / version
        cache.hold(dest)  # before anything: a concurrent prune must not remove it
        # When the copy was fetched (the store's clock, from its newest object then):
        # an object written since (a bad file replaced) fetches the version again.
        fetched = dest.parent / f".{version}.fetched"
        newest = self.backend.newest_mtime(f"{name}/{version}")
        if (dest / MANIFEST).is_file() and not refresh and fetched.is_file():
            try:
                stale = newest is not None and newest > float(fetched.read_text())
            except ValueError:
                stale = True
            if not stale:
                return dest
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
        fetched.write_text(repr(newest if newest is not None else time.time()))
        cache.prune(CACHE_DIR)
        return dest

    def verify(self, name: str, version: str) -> dict[str, Any]:
        """Check a version completely; return its manifest or raise CorruptVersion.

        Returns the manifest read from the verified local copy (see local_copy)."""
        manifest = self.manifest(name, version)
        folder = self.local_copy(name, version)
        try:
            try:
                verify_folder(folder, name, version, manifest)
            except CorruptVersion:
                if not self.backend.remote:
                    raise
                # The cached copy may predate a fix of the store's objects (or be
                # damaged itself): judge the store's bytes, fetched again.
                folder = self.local_copy(name, version, refresh=True)
                verify_folder(folder, name, version, manifest)
        except OSError as exc:  # unreadable, not corrupt: no CorruptVersion
            raise UnreadableVersion(f"{name} {version}: cannot read "
                                    f"{_relative(exc.filename, folder)}: "
                                    f"{exc.strerror or type(exc).__name__}") from None
        return manifest

    def task(self, name: str, version: str) -> str:
        """A version's task, as its manifest says."""
        return manifest_task(self.manifest(name, version))

    def model_task(self, name: str, skip: Optional[str] = None) -> Optional[tuple[str, str]]:
        """(version, task) that says a model's task: its production version's, else its
        newest readable version's (a model name keeps its task: check_task); `skip`: a
        version not to ask. None without another version; the first read error when
        none can be read."""
        try:
            production = self.channel(name, "production")
        except TuneserveError:  # an unreadable pointer: the versions still say
            production = None
        first_error: Optional[TuneserveError] = None
        for version in dict.fromkeys([production, *reversed(self.versions(name))]):
            if version is None or version == skip:
                continue
            try:
                return version, self.task(name, version)
            except TuneserveError as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return None

    def check_task(self, name: str, version: str, task: Optional[str] = None) -> None:
        """Refuse to serve `version` where `name` serves another task: a model name
        keeps its task (the server builds one kind of deployment per name from it).
        `task`: the version's, when not yet in the registry (publish)."""
        task = task or self.task(name, version)
        try:
            served = self.model_task(name, skip=version)
        except (TuneserveError, OSError):  # nothing readable to compare with (a broken
            return                         # pointer must not block Pin, the way around it)
        if served is not None and served[1] != task:
            raise RegistryError(
                f"model '{name}' is a {served[1]} model ({served[0]}); {version or 'this'} "
                f"is a {task} model: a model name keeps its task, so publish it under "
                "another name")

    def pinned_or_unreadable(self, name: str) -> Optional[str]:
        """The pinned version, or "(unreadable)" for a pin file that cannot be read
        (which Pin and Unpin overwrite: the way to repair it), for showing what a pin
        change replaces."""
        try:
            return self.pinned(name)
        except RegistryError:
            return "(unreadable)"

    # ---- writing ---------------------------------------------------------------
    def publish(self, name: str, source: str | Path, manifest: dict[str, Any],
                promote: Optional[bool] = None) -> PublishResult:
        """Copy a checkpoint folder in as the next version.

        `promote=None` promotes only the first version of a name (so that a fresh
        train + serve works); True always; False never.
        """
        validate_name(name)
        source = Path(source)
        self.check_task(name, "", manifest_task(manifest))
        files = _checkpoint_files(source)
        body = dict(manifest)
        body.update(format=MANIFEST_FORMAT, name=name,
                    created_at=body.get("created_at") or _now())
        version = (self._publish_local if not self.backend.remote else self._publish_remote)(
            name, source, files, body)
        if promote:
            self.set_channel(name, "production", version)
            promoted = True
        elif promote is None:  # the first of concurrent publishes only
            promoted = self.set_channel(name, "production", version, only_if_unset=True) \
                is not None
        else:
            promoted = False
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
        # No rename on object stores: claim a version number with a create-if-absent
        # write, upload the files under its prefix, then the manifest last. Until the
        # manifest exists the version is invisible and unloadable.
        claim = uuid.uuid4().hex.encode()
        for _attempt in range(100):
            version = self._next_version(name)
            if self.backend.create_exclusive(f"{name}/{version}/{CLAIM}", claim):
                break
        else:
            raise RegistryError(f"{name}: could not claim a version number; try again")
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

    def _update_pointer(self, name: str, rel: str, what: str,
                        change: Callable[[dict[str, Any]], Optional[dict[str, Any]]]
                        ) -> Optional[dict[str, Any]]:
        """Replace a pointer with change(its current state), or leave it when change
        gives None, never losing a concurrent writer's update: under the model's lock
        on a filesystem, as a conditional write (If-Match, retried) on an object store."""
        if not self.backend.remote:
            with self.backend.lock(f"{name}/.lock"):
                new = change(self._pointer(rel, what))
                if new is not None:
                    self.backend.write_atomic(rel, _dumps(new))
            return new
        result: list[Optional[dict[str, Any]]] = [None]

        def change_bytes(data: Optional[bytes]) -> Optional[bytes]:
            state: Any = {}
            if data is not None:
                try:
                    state = json.loads(data)
                except (ValueError, RecursionError):
                    raise RegistryError(f"unreadable {what} pointer (not JSON)") from None
            result[0] = change(state if isinstance(state, dict) else {})
            return None if result[0] is None else _dumps(result[0])

        try:
            written = self.backend.update(rel, change_bytes, what)
        except ValueError as exc:
            raise RegistryError(f"unreadable {what} pointer ({exc})") from None
        return result[0] if written else None

    def set_channel(self, name: str, channel: str, version: str,
                    only_if_unset: bool = False) -> Optional[dict[str, Any]]:
        """Point a channel at a version (atomically), remembering the previous one.
        `only_if_unset`: only if the channel points nowhere yet (else None)."""
        rel = self._channel_rel(name, channel)
        validate_version(version)
        if not self.exists(name, version):
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        self.check_task(name, version)
        before: dict[str, Any] = {}  # the pointer as the write that landed found it

        def point(state: dict[str, Any]) -> Optional[dict[str, Any]]:
            if only_if_unset and pointer_version(state) is not None:
                return None
            before.clear()
            before.update(state)
            return _moved(state, version)

        new = self._update_pointer(name, rel, f"{name} {channel}", point)
        if new is not None:
            self.record(name, "promote", channel=channel, version=version,
                        previous=pointer_version(before))
        return new

    def _write_channel(self, name: str, channel: str, version: str,
                       state: dict[str, Any]) -> dict[str, Any]:
        """Replace a channel pointer read as `state` (the model's lock held); on an
        object store, a conditional write over the pointer as it is by then."""
        rel = self._channel_rel(name, channel)
        if self.backend.remote:
            new = self._update_pointer(name, rel, f"{name} {channel}",
                                       lambda current: _moved(current, version))
            assert new is not None
            return new
        new = _moved(state, version)
        self.backend.write_atomic(rel, _dumps(new))
        return new

    def rollback(self, name: str, channel: str = "production") -> str:
        """Move a channel back to the version it pointed at before."""
        rel = self._channel_rel(name, channel)  # validates both names before any I/O
        if not self.exists(name):
            raise ModelNotFound(f"model '{name}' not found in the registry")
        before: dict[str, Any] = {}

        def back(state: dict[str, Any]) -> dict[str, Any]:
            current = state.get("version")
            if current is None and not _history(state):
                others = ", ".join(self.channels_of(name)) or "none yet"
                raise ModelNotFound(f"model '{name}' has no channel '{channel}' (its "
                                    f"channels: {others})")
            history = [v for v in _history(state) if self.exists(name, v)]
            while history and history[-1] == current:
                history.pop()
            if not history:
                raise RegistryError(f"{name}: no earlier {channel} version to roll back to")
            before.clear()
            before.update(state)
            return {"version": history.pop(), "history": history, "updated_at": _now()}

        new = self._update_pointer(name, rel, f"{name} {channel}", back)
        assert new is not None
        current = before.get("version")
        self.record(name, "rollback", channel=channel, version=new["version"],
                    previous=current if isinstance(current, str) else None)
        return new["version"]

    def pin(self, name: str, version: str) -> None:
        validate_name(name), validate_version(version)
        if not self.exists(name, version):
            raise ModelNotFound(f"model '{name}' has no version '{version}'")
        self.check_task(name, version)
        self._write_pin(name, version)
        self.record(name, "pin", version=version)

    def unpin(self, name: str) -> None:
        if not self.exists(name):
            raise ModelNotFound(f"model '{name}' not found in the registry")
        self._write_pin(name, None)
        self.record(name, "unpin")

    def _write_pin(self, name: str, version: Optional[str]) -> None:
        """Replace the pin whatever it held (an unreadable pin is repaired this way);
        on an object store still a conditional write, so pins are ordered."""
        rel = f"{name}/{PIN_FILE}"
        if not self.backend.remote:
            self.backend.write_atomic(rel, _dumps({"version": version, "updated_at": _now()}))
            return
        try:
            self.backend.update(rel, lambda _old: _dumps({"version": version,
                                                          "updated_at": _now()}), f"{name} pin")
        except ValueError as exc:
            raise RegistryError(f"unreadable {name} pin pointer ({exc})") from None


def _moved(state: dict[str, Any], version: str) -> dict[str, Any]:
    """A channel pointer `state` moved to `version`, the version it left in history."""
    history = _history(state)
    previous = state.get("version")
    if previous and previous != version:
        history.append(previous)
    return {"version": version, "history": history[-HISTORY_LIMIT:], "updated_at": _now()}


def _relative(filename: Any, folder: Path) -> str:
    """A file named in an error, relative to the version folder (no server paths)."""
    try:
        return Path(filename).relative_to(folder).as_posix()
    except (TypeError, ValueError):
        return Path(str(filename or "a file")).name


def _file_problem(rel: str, path: Path) -> Optional[str]:
    """Why a checkpoint file must never be published or loaded, or None.

    A pickle-based file name; a file whose first bytes show a pickle or a torch.save
    archive whatever its name; a safetensors file whose structure is unsound."""
    if Path(rel).suffix.lower() in UNSAFE_SUFFIXES:
        return f"refusing pickle-based file {rel}; save weights as safetensors"
    if rel.endswith(".safetensors"):
        try:
            check_safetensors(path)
        except ValueError as exc:
            return f"{rel}: {exc}"
        return None
    what = unsafe_format(path)
    if what:
        return (f"refusing {rel}: it is {what}, and pickle-based files can run code "
                "when loaded")
    return None


def _read_json(path: Path, rel: str) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{rel} is larger than {MAX_JSON_BYTES // (1024 * 1024)} MiB")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, RecursionError, ValueError):
        raise ValueError(f"{rel} is not valid JSON") from None


def _weight_reference_problem(files: dict[str, Path]) -> Optional[str]:
    """Files that tell transformers which weights to read (a sharded checkpoint's
    `*.index.json`, `transformers_weights` in config.json) may only name safetensors
    files of the same folder: never a pickle, never a path out of the folder."""
    weights = {rel for rel in files if rel.endswith(".safetensors")}
    indexes = {rel for rel in files if rel.endswith(".safetensors.index.json")}

    def local_ref(base: str, ref: Any, allowed: set[str]) -> bool:
        return (isinstance(ref, str) and ref not in ("", ".", "..") and "/" not in ref
                and "\\" not in ref and "\x00" not in ref
                and posixpath.join(base, ref) in allowed)

    for rel, path in files.items():
        base, fname = posixpath.split(rel)
        try:
            if rel.endswith(".index.json"):
                data = _read_json(path, rel)
                weight_map = data.get("weight_map") if isinstance(data, dict) else None
                if not isinstance(weight_map, dict):
                    return f"{rel} has no weight_map"
                for ref in weight_map.values():
                    if not local_ref(base, ref, weights):
                        return (f"{rel} names {str(ref)[:64]!r}, which is not a safetensors "
                                "file of this checkpoint")
            elif fname == "config.json":
                data = _read_json(path, rel)
                if isinstance(data, dict) and "transformers_weights" in data:
                    ref = data["transformers_weights"]
                    if not local_ref(base, ref, weights | indexes):
                        return (f"{rel}: transformers_weights {str(ref)[:64]!r} is not a "
                                "safetensors file of this checkpoint")
        except ValueError as exc:
            return str(exc)
    return None


def _checkpoint_files(source: Path) -> list[str]:
    """The files to publish from a checkpoint folder, after the checks `verify_folder`
    will make (so that a publish never creates a version that cannot be loaded)."""
    if not source.is_dir():
        raise RegistryError(f"checkpoint folder not found: {source}")
    files: dict[str, Path] = {}
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source).as_posix()
        if path.is_symlink():
            raise RegistryError(f"refusing to publish symlink {rel}")
        if path.is_dir() or rel in (MANIFEST, CLAIM):  # the registry's own files
            continue
        if not path.is_file():
            raise RegistryError(f"refusing to publish {rel}: not a regular file")
        problem = _file_problem(rel, path)
        if problem:
            raise RegistryError(f"{problem} (not published)")
        files[rel] = path
    if not any(rel.endswith(".safetensors") for rel in files):
        raise RegistryError(f"{source}: no safetensors weights to publish")
    problem = _weight_reference_problem(files)
    if problem:
        raise RegistryError(f"{problem} (not published)")
    return list(files)


def verify_folder(vdir: Path, name: str, version: str, manifest: dict[str, Any]) -> None:
    """Every check a version must pass before anything loads it.

    Reads only below vdir: a symlink anywhere in it is refused, not followed."""
    where = f"{name} {version}"
    listed = _listed_files(where, name, version, manifest)
    present = _present_files(vdir, where)
    _check_present_files(where, present, listed)
    _check_listed_files(where, present, listed)
    _check_weights(where, present)
    if manifest.get("task") == "classification":  # services.core.config.CLASSIFICATION
        _check_labels(where, present, manifest)


def _listed_files(where: str, name: str, version: str,
                  manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's files (path -> {size, sha256}), once it names this version."""
    if manifest.get("name") != name or manifest.get("version") != version:
        raise CorruptVersion(f"{where}: manifest names {manifest.get('name')!r} "
                             f"{manifest.get('version')!r}")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise CorruptVersion(f"{where}: manifest lists no files")
    return listed


def _present_files(vdir: Path, where: str) -> dict[str, Path]:
    """The version folder's regular files but the registry's own, by relative path;
    a symlink or anything else that is not a regular file is refused."""
    present: dict[str, Path] = {}
    for path in vdir.rglob("*"):
        rel = path.relative_to(vdir).as_posix()
        if path.is_symlink():
            raise CorruptVersion(f"{where}: {rel} is a symlink")
        if path.is_dir():
            continue
        if not path.is_file():
            raise CorruptVersion(f"{where}: {rel} is not a regular file")
        if rel not in (MANIFEST, CLAIM):
            present[rel] = path
    return present


def _check_present_files(where: str, present: dict[str, Path], listed: dict[str, Any]) -> None:
    """No file is pickle-based (by name, or by its first bytes), and every one is listed."""
    for rel, path in present.items():
        if Path(rel).suffix.lower() in UNSAFE_SUFFIXES:
            raise CorruptVersion(f"{where}: refusing pickle-based file {rel}")
        if not rel.endswith(".safetensors") and (what := unsafe_format(path)):
            raise CorruptVersion(f"{where}: refusing {rel}: it is {what}, and "
                                 "pickle-based files can run code when loaded")
        if rel not in listed:
            raise CorruptVersion(f"{where}: {rel} is not in the manifest")


def _check_listed_files(where: str, present: dict[str, Path], listed: dict[str, Any]) -> None:
    """Every listed file is there, with the manifest's size and sha256."""
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


def _check_weights(where: str, present: dict[str, Path]) -> None:
    """Sound safetensors weights, referenced only from within the folder, and a
    config.json."""
    weights = [rel for rel in present if rel.endswith(".safetensors")]
    if not weights:
        raise CorruptVersion(f"{where}: no safetensors weights")
    for rel in weights:
        try:
            check_safetensors(present[rel])
        except ValueError as exc:
            raise CorruptVersion(f"{where}: {rel}: {exc}") from None
    problem = _weight_reference_problem(present)
    if problem:
        raise CorruptVersion(f"{where}: {problem}")
    if "config.json" not in present:
        raise CorruptVersion(f"{where}: missing config.json")


def _check_labels(where: str, present: dict[str, Path], manifest: dict[str, Any]) -> None:
    """A classifier's config.json id2label names the manifest's labels, in order."""
    try:
        config = _read_json(present["config.json"], "config.json")
    except ValueError as exc:
        raise CorruptVersion(f"{where}: {exc}") from None
    id2label = (config.get("id2label") if isinstance(config, dict) else None) or {}
    if not isinstance(id2label, dict):
        raise CorruptVersion(f"{where}: config.json id2label is not a JSON object")
    names = [id2label.get(str(i)) for i in range(len(id2label))]
    labels = manifest.get("labels")
    if not labels or names != labels:
        raise CorruptVersion(f"{where}: config labels {names} differ from the "
                             f"manifest's {labels}")
