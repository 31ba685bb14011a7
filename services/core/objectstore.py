"""Single files read from S3-compatible object storage (training and eval data).

URIs as for the registry: `s3://bucket/key` with optional pyarrow query parameters
(`?endpoint_override=minio:9000&scheme=http&region=us-east-1`); credentials from the usual
AWS environment variables or instance roles, never the URI. A file is copied once into a
local cache (`$TUNESERVE_CACHE/data`) and copied again when the object changes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from services.core.errors import DataError

CHUNK = 1 << 20


def is_remote(path: str | Path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def shown(uri: str) -> str:
    """A URI as printed and recorded: without its query (endpoint, region)."""
    return uri.split("?", 1)[0]


def cache_dir() -> Path:
    return Path(os.environ.get("TUNESERVE_CACHE", Path.home() / ".cache" / "tuneserve")) / "data"


def fetch(uri: str) -> Path:
    """A local copy of the object `uri` names, keeping its file name (its suffix says
    the format); DataError when it cannot be read."""
    if "@" in urlsplit(uri).netloc:
        raise DataError(f"{shown(uri).split('@')[-1]}: no credentials in the URI; give them "
                        "as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    try:
        fs, key = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(key)
    except Exception as exc:  # pyarrow: ArrowInvalid, OSError (endpoint, credentials)
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise DataError(f"cannot read {shown(uri)}: {first}") from None
    if info.type != pafs.FileType.File:
        raise DataError(f"{shown(uri)}: no such object")
    stamp = f"{info.size}:{info.mtime.timestamp() if info.mtime else ''}"
    folder = cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = folder / info.base_name
    marker = folder / ".fetched"
    if dest.is_file() and marker.is_file() and marker.read_text() == stamp:
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(key) as src:
            while block := src.read(CHUNK):
                out.write(block)
        os.replace(tmp, dest)
    except OSError as exc:
        raise DataError(f"cannot read {shown(uri)}: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    marker.write_text(stamp)
    return dest
