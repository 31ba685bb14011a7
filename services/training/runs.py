"""Where training runs live: `runs_dir` is a local folder (or a shared volume) or a
prefix in S3-compatible object storage, `s3://bucket/runs` with the registry's optional
pyarrow query (`?endpoint_override=minio:9000&scheme=http&region=us-east-1`).

    runs = RunsDir.of("s3://tuneserve/runs")
    runs.write_text("sentiment-1", "tuneserve_run.json", "{...}")
    runs.read_text("sentiment-1", "tuneserve_run.json")

Ray Train gets `runs.storage_path` as its RunConfig storage path and keeps each run's
checkpoints in `<runs_dir>/<run name>/`, beside the files tuneserve writes there; every
node of the run reaches the folder (a bucket needs no shared volume). Credentials come
from the usual AWS environment variables or roles of each node, never the URI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from services.core.errors import ConfigError
from services.core.objectstore import is_remote, shown


@dataclass(frozen=True)
class RunsDir:
    """The folder of runs on its filesystem (pyarrow's local or S3 filesystem)."""

    storage_path: str
    """What Ray Train's RunConfig gets: an absolute folder, or the URI with its query."""
    fs: pafs.FileSystem
    root: str
    """The folder on `fs` (for S3: bucket/prefix)."""

    @classmethod
    def of(cls, runs_dir: str | Path) -> "RunsDir":
        """ConfigError naming runs_dir when it is not a folder or a URI pyarrow reads."""
        text = str(runs_dir)
        if not is_remote(text):
            folder = Path(text.removeprefix("file://")).expanduser().resolve()
            return cls(str(folder), pafs.LocalFileSystem(), str(folder))
        if "@" in urlsplit(text).netloc:
            raise ConfigError(f"invalid config field 'runs_dir': "
                              f"{shown(text).split('@')[-1]}: no credentials in the URI; "
                              "give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        try:
            fs, root = pafs.FileSystem.from_uri(text)
        except Exception as exc:  # pyarrow: ArrowInvalid (scheme, query), OSError
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"invalid config field 'runs_dir': {shown(text)}: {first}") \
                from None
        return cls(text, fs, root.rstrip("/"))

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def shown(self, run: Optional[str] = None) -> str:
        """The folder (or a run's folder) as printed and recorded: a path, or the URI
        without its query."""
        base = shown(self.storage_path).rstrip("/")
        return base if run is None else f"{base}/{run}"

    def path(self, run: str, *names: str) -> str:
        """A path on `fs` inside a run's folder."""
        return str(PurePosixPath(self.root, run, *names))

    def check(self) -> None:
        """ConfigError when the store cannot be reached (endpoint, credentials, no such
        bucket): said before the data is read and Ray starts."""
        if self.local:
            return
        bucket = self.root.split("/", 1)[0]
        try:
            info = self.fs.get_file_info(bucket)
        except Exception as exc:  # pyarrow: OSError with the store's message
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"invalid config field 'runs_dir': cannot reach "
                              f"{self.shown()}: {first}") from None
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"invalid config field 'runs_dir': {self.shown()}: no bucket "
                              f"{bucket!r}")

    def exists(self, run: str, name: str) -> bool:
        return self.fs.get_file_info(self.path(run, name)).type == pafs.FileType.File

    def read_text(self, run: str, name: str) -> str:
        """A file of a run's folder; OSError (FileNotFoundError) when it cannot be read."""
        with self.fs.open_input_stream(self.path(run, name)) as src:
            return src.read().decode("utf-8")

    def write_text(self, run: str, name: str, text: str) -> None:
        """A file of a run's folder, written whole (an object is replaced at once; a
        local file through a rename)."""
        data = text.encode("utf-8")
        if not self.local:
            with self.fs.open_output_stream(self.path(run, name)) as dst:
                dst.write(data)
            return
        target = Path(self.path(run, name))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_bytes(data)
        os.replace(partial, target)

    def upload(self, run: str, folder: Path) -> None:
        """Copies a local folder's files into a run's folder (what the driver wrote
        beside the run: TensorBoard events, the curves)."""
        pafs.copy_files(str(folder), self.path(run), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)


def checkpoint_location(checkpoint) -> str:
    """A Ray Train checkpoint's folder as printed and recorded: a path, or a URI."""
    fs = checkpoint.filesystem
    if fs is None or isinstance(fs, pafs.LocalFileSystem):
        return str(checkpoint.path)
    return f"{fs.type_name}://{checkpoint.path}"
