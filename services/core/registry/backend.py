"""Where registry bytes live: a POSIX folder, or an S3-compatible object store.

Both are reached through `pyarrow.fs`, so the registry code above this is the same for
both; what atomicity needs differs and is kept here. URIs: a path (`/data/registry`),
`file:///data/registry`, or `s3://bucket/prefix` with optional pyarrow query parameters
(`?endpoint_override=http://127.0.0.1:9000&scheme=http&region=us-east-1`); credentials
come from the usual AWS environment variables or instance roles, never the URI.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

from services.core.errors import CorruptVersion, InvalidInput, RegistryError

CHUNK = 1 << 20
# A conditional write that loses to another writer is retried this many times (with a
# growing, jittered pause) before the update is reported as failed.
CAS_ATTEMPTS = 50
MAX_POINTER_BYTES = 64 * 1024 * 1024
_CLIENT_LOCK = threading.Lock()


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


class Backend:
    """Byte-level access below a root; paths are '/'-joined strings relative to it."""

    def __init__(self, uri: str | Path):
        uri = str(uri)
        self.uri = uri
        self.remote = is_remote(uri)
        if self.remote:
            if "@" in urlsplit(uri).netloc:
                # it would be printed, and saved in every manifest's config
                raise InvalidInput("--registry: no credentials in the URI; give them as "
                                   "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
            try:
                self.fs, root = pafs.FileSystem.from_uri(uri)
            except Exception as exc:  # pyarrow raises ArrowInvalid and friends
                raise RegistryError(f"cannot open registry {uri.split('?')[0]}: {exc}") from None
            self.root = root.rstrip("/")
            self.local_root: Optional[Path] = None
            self._s3: Any = None
            self._check_bucket(uri)
        else:
            path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
            self.fs = pafs.LocalFileSystem()
            self.local_root = path.absolute()
            self.root = str(self.local_root)

    def _check_bucket(self, uri: str) -> None:
        """A bucket that does not exist reads as an empty registry (and a publish fails
        only at its end): say so at once."""
        bucket = self.root.split("/", 1)[0]
        try:
            found = self.fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except Exception as exc:  # unreachable endpoint, refused credentials
            raise RegistryError(f"cannot open registry {uri.split('?')[0]}: "
                                f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        if not found:
            raise RegistryError(f"registry {uri.split('?')[0]}: bucket '{bucket}' does not "
                                "exist")

    # ---- paths -------------------------------------------------------------------
    def full(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def local_path(self, rel: str) -> Path:
        """The real path of a local entry, refusing any that leaves the root."""
        assert self.local_root is not None
        path = self.local_root / rel
        try:
            root = self.local_root.resolve()
            resolved = path.resolve()
        except (ValueError, OSError, RuntimeError):  # a NUL byte, a symlink loop
            raise InvalidInput("invalid registry path") from None
        if resolved != root and root not in resolved.parents:
            raise InvalidInput("path leaves the registry")
        return path

    def _check(self, rel: str) -> str:
        if not self.remote:
            self.local_path(rel)
        return self.full(rel)

    # ---- reading -----------------------------------------------------------------
    def info(self, rel: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self._check(rel))

    def is_file(self, rel: str) -> bool:
        return self.info(rel).type == pafs.FileType.File

    def is_dir(self, rel: str) -> bool:
        if self.remote:  # object stores have no directories, only prefixes
            sel = pafs.FileSelector(self.full(rel), allow_not_found=True, recursive=False)
            return bool(self.fs.get_file_info(sel))
        return self.info(rel).type == pafs.FileType.Directory

    def is_symlink(self, rel: str) -> bool:
        """Whether a local entry is itself a symlink (its parent must stay in the root)."""
        if self.remote:
            return False
        self.local_path(rel.rpartition("/")[0])
        return (self.local_root / rel).is_symlink()

    def list_dir(self, rel: str) -> list[tuple[str, bool]]:
        """(name, is_dir) of direct children; [] when absent."""
        full = self._check(rel)
        sel = pafs.FileSelector(full, allow_not_found=True, recursive=False)
        try:
            infos = self.fs.get_file_info(sel)
        except (NotADirectoryError, FileNotFoundError):
            return []
        return [(i.base_name, i.type == pafs.FileType.Directory) for i in infos]

    def newest_mtime(self, rel: str) -> Optional[float]:
        """The latest modification time (epoch seconds) of a file below rel, if known."""
        sel = pafs.FileSelector(self._check(rel), allow_not_found=True, recursive=True)
        times = [i.mtime.timestamp() for i in self.fs.get_file_info(sel)
                 if i.type == pafs.FileType.File and i.mtime is not None]
        return max(times) if times else None

    def list_files(self, rel: str) -> dict[str, int]:
        """Every file below rel (recursive) -> size, keyed by path relative to rel."""
        full = self._check(rel)
        sel = pafs.FileSelector(full, allow_not_found=True, recursive=True)
        out = {}
        for i in self.fs.get_file_info(sel):
            if i.type == pafs.FileType.File:
                out[i.path[len(full) + 1:]] = i.size
        return out

    def read_bytes(self, rel: str) -> bytes:
        """A whole small file. On an object store it is one GET, so that an object
        replaced while it is read gives the old or the new bytes, never the first
        bytes of the new one cut to the old one's length (a streamed read asks for
        the size first, then for ranges)."""
        if self.remote:
            data, _ = self.read_tagged(rel)
            if data is None:
                raise FileNotFoundError(rel)
            return data
        with self.fs.open_input_stream(self._check(rel)) as fh:
            return fh.read()

    def read_tail(self, rel: str, nbytes: int) -> bytes:
        """The last `nbytes` of a file (all of a shorter one)."""
        if self.remote:  # one GET, as read_bytes: the logs are kept small
            return self.read_bytes(rel)[-nbytes:]
        with self.fs.open_input_file(self._check(rel)) as fh:
            size = fh.size()
            fh.seek(max(0, size - nbytes))
            return fh.read()

    # ---- writing -----------------------------------------------------------------
    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace a small file whole: readers see the old or the new, never a mix."""
        if self.remote:
            with self.fs.open_output_stream(self.full(rel)) as fh:
                fh.write(data)
            return
        path = self.local_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    def append(self, rel: str, data: bytes, keep_bytes: int) -> None:
        """Add bytes at the end of a small log file. Local: one O_APPEND write, synced
        (callers hold the model's lock). Object stores cannot append: the object is
        read and written again whole, its oldest bytes beyond `keep_bytes` dropped
        (whole lines: the caller's data ends with a newline), as a conditional write
        that is made again on the fresh object when another writer got in first (no
        concurrent entry lost)."""
        if self.remote:
            def appended(old: Optional[bytes]) -> bytes:
                old = old or b""
                budget = max(0, keep_bytes - len(data))
                if len(old) > budget:  # cut, then drop what is left of the line cut
                    old = old[len(old) - budget:].partition(b"\n")[2] if budget else b""
                return old + data

            self.update(rel, appended, rel)
            return
        path = self.local_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def upload(self, local: Path, rel: str) -> tuple[str, int]:
        """Copy a local file in; returns (sha256, size) of what was written."""
        h = hashlib.sha256()
        size = 0
        if self.remote:
            with open(local, "rb") as src, self.fs.open_output_stream(self.full(rel)) as dst:
                while block := src.read(CHUNK):
                    h.update(block)
                    size += len(block)
                    dst.write(block)
            return h.hexdigest(), size
        dest = self.local_path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "rb") as src, open(dest, "wb") as dst:
            while block := src.read(CHUNK):
                h.update(block)
                size += len(block)
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        return h.hexdigest(), size

    def download_tree(self, rel: str, dest: Path) -> None:
        """Copy every object below rel into dest, refusing keys that would land outside
        it (an object store allows keys such as `v1/../../x` or `v1//etc/x`)."""
        dest.mkdir(parents=True, exist_ok=True)
        names = list(self.list_files(rel))
        for name in names:
            parts = name.split("/")
            if any(p in ("", ".", "..") for p in parts) or "\\" in name or "\x00" in name:
                raise CorruptVersion(f"refusing to download object {name[:64]!r}: "
                                     "its key leaves the version's folder")
        for name in names:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(self.full(f"{rel}/{name}")) as src, \
                    open(target, "wb") as dst:
                while block := src.read(CHUNK):
                    dst.write(block)

    # ---- conditional writes (object stores) ---------------------------------------
    def s3_client(self) -> Any:
        """A boto3 S3 client for the same endpoint as the pyarrow filesystem: pyarrow
        has no conditional writes, which the version claim and pointer updates need."""
        if self._s3 is None:
            import boto3  # lazy: only an object-store registry needs it
            from botocore.config import Config

            query = {k: v[-1] for k, v in parse_qs(urlsplit(self.uri).query).items()}
            endpoint = query.get("endpoint_override")
            if endpoint and "://" not in endpoint:
                endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
            with _CLIENT_LOCK:  # creating clients is not thread-safe; using one is
                self._s3 = boto3.session.Session().client(
                    "s3", endpoint_url=endpoint, region_name=query.get("region"),
                    config=Config(retries={"max_attempts": 5, "mode": "standard"}))
        return self._s3

    def _key(self, rel: str) -> tuple[str, str]:
        bucket, _, prefix = self.full(rel).partition("/")
        return bucket, prefix

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create a small object only if nothing is there yet (S3 `If-None-Match: *`):
        True if this call created it, False if it existed (or another writer won)."""
        bucket, key = self._key(rel)
        return self._conditional_put(bucket, key, data, IfNoneMatch="*")

    def read_tagged(self, rel: str) -> tuple[Optional[bytes], Optional[str]]:
        """(bytes, ETag) of a small object, or (None, None) when it does not exist."""
        from botocore.exceptions import ClientError

        bucket, key = self._key(rel)
        try:
            got = self.s3_client().get_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise RegistryError(f"cannot read {rel}: {_client_error(exc)}") from None
        if got.get("ContentLength", 0) > MAX_POINTER_BYTES:
            raise ValueError(f"larger than {MAX_POINTER_BYTES // (1024 * 1024)} MiB")
        return got["Body"].read(), got["ETag"]

    def replace_if(self, rel: str, data: bytes, etag: Optional[str]) -> bool:
        """Write a small object only if it is still the one read (its ETag), or still
        absent when `etag` is None; False when another writer changed it meanwhile."""
        bucket, key = self._key(rel)
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        return self._conditional_put(bucket, key, data, **condition)

    def _conditional_put(self, bucket: str, key: str, data: bytes, **condition: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)
        except ClientError as exc:
            # 412: the condition failed; 409: a concurrent conditional write is in flight
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (409, 412):
                return False
            raise RegistryError(f"cannot write to the registry: {_client_error(exc)}") from None
        return True

    def update(self, rel: str, change: Callable[[Optional[bytes]], Optional[bytes]],
               what: str) -> bool:
        """Read-modify-write of a small object that never loses a concurrent update:
        `change(old bytes or None)` gives the new bytes (None: write nothing) and runs
        again on the fresh value whenever another writer got in first (If-Match)."""
        for attempt in range(CAS_ATTEMPTS):
            data, etag = self.read_tagged(rel)
            new = change(data)
            if new is None:
                return False
            if self.replace_if(rel, new, etag):
                return True
            time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** attempt)))
        raise RegistryError(f"{what}: too many concurrent writers; try again")

    def delete_tree(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(self._check(rel))

    def rename_dir(self, src: str, dst: str) -> bool:
        """Local only: atomic rename; False if dst already exists."""
        target = self.local_path(dst)
        if target.exists():
            return False
        try:
            os.rename(self.local_path(src), target)
        except OSError:
            if target.exists():
                return False
            raise
        fsync_dir(target.parent)
        return True

    @contextlib.contextmanager
    def lock(self, rel: str) -> Iterator[None]:
        """Serialise writers of one model on a local or shared POSIX filesystem.

        Object stores have no locks: there, version claims and pointer updates are
        conditional writes instead (create_exclusive, update).
        """
        if self.remote:
            yield
            return
        path = self.local_path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _client_error(exc: Any) -> str:
    err = exc.response.get("Error", {})
    return f"{err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": ")
