"""Where a data set lives: one file, a folder of shards or a glob, local or s3://.

`resolve(spec)` lists the files a `--train`/`--eval` value names (a folder: every data
file below it, hidden files and `_SUCCESS`-style markers skipped; a glob: `*`, `?` and
`[...]` in the last parts of the path), checks that they share one format and returns a
`DataSource` that Ray Data can read (paths plus the pyarrow filesystem for s3://).
`identity(source)` is what the manifest records about it: each file's size and
sha256 (local) or ETag (object storage), and one sha256 over them all.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, urlsplit

from services.core import objectstore
from services.core.data import FORMATS, detect_format, file_sha256
from services.core.errors import DataError

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class DataSource:
    """The files of a data set, in sorted order, all of one format."""

    given: str
    """The spec as given (an s3:// URI keeps its query: endpoint, region)."""
    shown: str
    """The spec as printed and recorded (no query)."""
    paths: tuple[str, ...]
    """What Ray Data reads: absolute local paths, or bucket/key with `filesystem`."""
    sizes: tuple[int, ...]
    fmt: str
    """csv, tsv, jsonl or parquet (services.core.data.FORMATS)."""
    remote: bool
    many: bool
    """A folder or a glob (not one named file)."""

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    def filesystem(self):
        """The pyarrow filesystem of an s3:// source (None for local files). AWS_*
        credentials set here go with it to the Ray tasks that read (the nodes need
        none of their own); without them each node uses its own (instance roles)."""
        if not self.remote:
            return None
        import pyarrow.fs as pafs

        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not (key and secret):
            return pafs.FileSystem.from_uri(_base_uri(self.given))[0]
        query = {k: v[-1] for k, v in parse_qs(urlsplit(self.given).query).items()}
        return pafs.S3FileSystem(access_key=key, secret_key=secret,
                                 session_token=os.environ.get("AWS_SESSION_TOKEN"),
                                 endpoint_override=query.get("endpoint_override"),
                                 scheme=query.get("scheme", "https"),
                                 region=query.get("region") or os.environ.get("AWS_REGION"))

    def shown_path(self, path: str) -> str:
        return f"s3://{path}" if self.remote else path


def _base_uri(uri: str) -> str:
    """An s3:// URI cut before its first glob character, keeping its query."""
    head, sep, query = uri.partition("?")
    cut = min((head.find(c) for c in GLOB_CHARS if c in head), default=-1)
    if cut >= 0:
        head = head[:head.rfind("/", 0, cut) + 1]
    return head + sep + query


def _has_glob(text: str) -> bool:
    return any(c in text for c in GLOB_CHARS)


def _is_data_file(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith((".", "_")) and Path(base).suffix.lower() in FORMATS


def resolve(spec: str) -> DataSource:
    """The data set `spec` names; DataError when nothing readable is there."""
    spec = str(spec)
    if objectstore.is_remote(spec):
        return _resolve_remote(spec)
    path = Path(spec).expanduser()
    if _has_glob(spec):
        import glob

        found = sorted(p for p in glob.glob(str(path), recursive=True)
                       if os.path.isfile(p) and _is_data_file(p))
        many = True
    elif path.is_dir():
        found = sorted(str(p) for p in path.rglob("*")
                       if p.is_file() and _is_data_file(str(p.relative_to(path))))
        many = True
    elif path.is_file():
        found, many = [str(path)], False
    else:
        raise DataError(f"data file not found: {spec}")
    if not found:
        raise DataError(f"{spec}: no data files there (.csv, .tsv, .jsonl, .json or "
                        ".parquet)")
    paths = tuple(str(Path(p).resolve()) for p in found)
    return DataSource(given=spec, shown=spec, paths=paths,
                      sizes=tuple(os.path.getsize(p) for p in paths),
                      fmt=_one_format(spec, paths), remote=False, many=many)


def _resolve_remote(spec: str) -> DataSource:
    import pyarrow.fs as pafs

    shown = objectstore.shown(spec)
    if "@" in urlsplit(spec).netloc:
        raise DataError(f"{shown.split('@')[-1]}: no credentials in the URI; give them "
                        "as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    pattern = urlsplit(shown).netloc + urlsplit(shown).path
    try:
        fs, base = pafs.FileSystem.from_uri(_base_uri(spec))
        base = base.rstrip("/")
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File and not _has_glob(pattern):
            files = [(base, info.size)]
            many = False
        else:
            listing = fs.get_file_info(pafs.FileSelector(base, recursive=True,
                                                         allow_not_found=True))
            files = sorted((f.path, f.size) for f in listing
                           if f.type == pafs.FileType.File
                           and _is_data_file(f.path[len(base):])
                           and (not _has_glob(pattern) or fnmatch.fnmatch(f.path, pattern)))
            many = True
    except DataError:
        raise
    except Exception as exc:  # pyarrow: ArrowInvalid, OSError (endpoint, credentials)
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise DataError(f"cannot read {shown}: {first}") from None
    if not files:
        raise DataError(f"{shown}: no such object, and no data files below it")
    paths = tuple(p for p, _ in files)
    return DataSource(given=spec, shown=shown, paths=paths,
                      sizes=tuple(int(s or 0) for _, s in files),
                      fmt=_one_format(shown, paths), remote=True, many=many)


def _one_format(spec: str, paths: tuple[str, ...]) -> str:
    fmts = {detect_format(Path(p)) for p in paths}
    if len(fmts) > 1:
        raise DataError(f"{spec}: holds files of several formats ({', '.join(sorted(fmts))}); "
                        "a data set is read as one format")
    return fmts.pop()


def identity(source: DataSource) -> dict[str, Any]:
    """The manifest's record of the data: its files with size and sha256 (local) or
    ETag (object storage), and `sha256`: the file's own for one local file, else the
    sha256 of the listing (one 'path<TAB>size<TAB>digest' line per file)."""
    files: list[dict[str, Any]] = []
    etags = _etags(source) if source.remote else {}
    for path, size in zip(source.paths, source.sizes):
        entry: dict[str, Any] = {"path": source.shown_path(path), "size": size}
        if source.remote:
            entry["etag"] = etags.get(path)
        else:
            entry["sha256"] = file_sha256(path)
        files.append(entry)
    if not source.remote and len(files) == 1:
        digest = files[0]["sha256"]
    else:
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f['path']}\t{f['size']}\t{f.get('sha256') or f.get('etag')}\n"
                     .encode())
        digest = h.hexdigest()
    return {"path": source.shown, "format": source.fmt, "files": files,
            "bytes": source.total_bytes, "sha256": digest}


def _etags(source: DataSource) -> dict[str, Optional[str]]:
    """bucket/key -> ETag of every object of a remote source (one listing per bucket
    prefix: boto3, as pyarrow does not report ETags)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    query = {k: v[-1] for k, v in parse_qs(urlsplit(source.given).query).items()}
    endpoint = query.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
    client = boto3.session.Session().client("s3", endpoint_url=endpoint,
                                            region_name=query.get("region"))
    wanted = set(source.paths)
    prefix = os.path.commonprefix(list(wanted))
    bucket, _, key_prefix = prefix.partition("/")
    found: dict[str, Optional[str]] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                      Prefix=key_prefix):
            for obj in page.get("Contents", []):
                path = f"{bucket}/{obj['Key']}"
                if path in wanted:
                    found[path] = obj["ETag"].strip('"')
    except (BotoCoreError, ClientError) as exc:
        raise DataError(f"cannot list {source.shown}: {exc}") from None
    return found
