"""No name, version or symlink gets the registry to open anything outside its root.

Every entry point is driven with traversal attempts: the Registry API, the CLI
(`tuneserve models ...`), the gRPC request validation and Admin methods, and the
replica's load path (verify + load of a classifier version). A recorder logs every
path that tuneserve code opens, lists, writes or removes meanwhile (Python's audit hook
for `open`/`os.scandir`/..., with services/ on the stack, and every call into pyarrow's
LocalFileSystem, which the backend uses); a test fails if one of them resolves outside
the root, and if a file planted outside changed.
"""

import asyncio
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

import services

from services.core.errors import (
    CorruptVersion,
    InvalidInput,
    ModelNotFound,
    RegistryError,
    TuneserveError,
)
from services.core.registry import Registry
from tests.unit.test_registry import fake_checkpoint, manifest

BAD_NAMES = ["../x", "..", ".", "a/b", "/abs", "a\\b", "x\x00", "x\x00/../../etc", "",
             "a" * 129, "m\n", " m", "-m", ".hidden", "a..b", "C:\\x", "~", "é", "a b",
             "m/../../outside", "%2e%2e"]
BAD_VERSIONS = ["v0", "v01", "1", "V1", "v1\n", "v1/..", "../v1", "v1\x00", "/v1", "v-1",
                "v1 ", "v" + "9" * 10, "..", "v1/../../../outside"]
BAD_CHANNELS = ["../production", "a/b", "..", "/etc/passwd", "prod\x00", "prod\n"]

# ---- the recorder ------------------------------------------------------------------
_RECORDING: list[list[tuple[str, str]]] = []
_EVENTS = {"open", "os.listdir", "os.scandir", "os.rename", "os.remove", "os.rmdir",
           "os.mkdir", "os.symlink", "os.truncate", "os.chmod", "shutil.rmtree",
           "shutil.copyfile"}


_SERVICES = os.path.dirname(os.path.abspath(services.__file__)) + os.sep


def _from_services() -> bool:
    """Whether tuneserve code is on the stack (not the test planting its traps)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_SERVICES):
            return True
        frame = frame.f_back
    return False


def _audit(event, args):
    if _RECORDING and event in _EVENTS and args:
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)) and _from_services():
            _RECORDING[-1].append((event, os.fsdecode(path)))


sys.addaudithook(_audit)  # cannot be removed; costs one list check while not recording


class _SpyFS:
    """pyarrow's LocalFileSystem, logging the paths it is asked about."""

    def __init__(self, fs, log):
        self._fs, self._log = fs, log

    def __getattr__(self, attr):
        target = getattr(self._fs, attr)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            for arg in args:
                if isinstance(arg, str):
                    self._log.append((f"pyarrow.{attr}", arg))
                elif isinstance(arg, pafs.FileSelector):
                    self._log.append((f"pyarrow.{attr}", arg.base_dir))
            return target(*args, **kwargs)
        return call


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A registry with m v1, v2 (v1 in production) and, outside its root, a complete
    copy of a version, a model folder, pointer files and a secret; plus the recorder."""
    root = tmp_path / "reg"
    reg = Registry(root)
    ck = fake_checkpoint(tmp_path / "ck")
    reg.publish("m", ck, manifest())
    reg.publish("m", ck, manifest())
    outside = tmp_path / "outside"
    shutil.copytree(root / "m" / "v1", outside / "v3")
    body = json.loads((outside / "v3" / "manifest.json").read_text())
    (outside / "v3" / "manifest.json").write_text(json.dumps({**body, "version": "v3"}))
    shutil.copytree(root / "m", outside / "model")
    (outside / "pointer.json").write_text(json.dumps({"version": "v1", "history": []}))
    (outside / "secret").write_text("secret")

    log: list[tuple[str, str]] = []
    real_fs = pafs.LocalFileSystem
    monkeypatch.setattr(pafs, "LocalFileSystem", lambda *a, **k: _SpyFS(real_fs(*a, **k), log))
    snapshot = {p: (p.stat().st_size, p.stat().st_mtime_ns)
                for p in outside.rglob("*") if p.is_file()}
    for module in ("services.cli", "services.serving.classifier", "services.serving.admin",
                   "services.serving.validation", "services.core.modeling"):
        importlib.import_module(module)  # imports open files by the thousand: not here
    _RECORDING.append(log)
    w = SimpleNamespace(root=root, outside=outside, tmp=tmp_path, log=log,
                        reg=Registry(root))  # a Registry made after the spy is in place
    yield w
    _RECORDING.remove(log)
    leaks = sorted({(event, path) for event, path in log if _leaves(path, root, outside)})
    assert not leaks, f"touched outside the registry: {leaks[:5]}"
    after = {p: (p.stat().st_size, p.stat().st_mtime_ns)
             for p in outside.rglob("*") if p.is_file()}
    assert after == snapshot, "a file outside the registry was written"


def _leaves(path: str, root: Path, outside: Path) -> bool:
    """A recorded path that resolves outside the root: into `outside`, to /etc, or from
    a path below the root (a symlink followed out of it)."""
    real = Path(os.path.realpath(path))
    root_real, outside_real = root.resolve(), outside.resolve()
    if real == outside_real or outside_real in real.parents:
        return True
    if real == Path("/etc/passwd") or Path("/etc") in real.parents:
        return True
    lexical = Path(os.path.abspath(path))
    below_root = lexical == root_real or root_real in lexical.parents
    return below_root and not (real == root_real or root_real in real.parents)


def cli(*argv) -> int:
    from services.cli import main

    return main(list(argv))


def load_version(reg, name, version):
    """What a classifier replica does with a new version: verify, then load."""
    from services.runtime.classifier import load_classifier

    return load_classifier(reg, name, version)


# ---- names and versions ----------------------------------------------------------------
def registry_calls_with_name(reg, name, ck):
    return {
        "versions": lambda: reg.versions(name),
        "exists": lambda: reg.exists(name),
        "exists version": lambda: reg.exists(name, "v1"),
        "manifest": lambda: reg.manifest(name, "v1"),
        "verify": lambda: reg.verify(name, "v1"),
        "local_copy": lambda: reg.local_copy(name, "v1"),
        "resolve": lambda: reg.resolve(name),
        "channel": lambda: reg.channel(name),
        "channel_state": lambda: reg.channel_state(name),
        "channels_of": lambda: reg.channels_of(name),
        "pinned": lambda: reg.pinned(name),
        "publish": lambda: reg.publish(name, ck, manifest()),
        "set_channel": lambda: reg.set_channel(name, "production", "v1"),
        "rollback": lambda: reg.rollback(name),
        "pin": lambda: reg.pin(name, "v1"),
        "unpin": lambda: reg.unpin(name),
    }


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_model_names_are_refused_by_every_registry_method(world, name):
    ck = world.tmp / "ck"
    before = tree(world.root), set(os.listdir(world.tmp))
    for what, call in registry_calls_with_name(world.reg, name, ck).items():
        with pytest.raises(InvalidInput, match="name"):
            call()
            pytest.fail(f"{what} accepted {name!r}")
    assert (tree(world.root), set(os.listdir(world.tmp))) == before  # not even a lock file


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_bad_versions_are_refused_by_every_registry_method(world, version):
    reg = world.reg
    calls = {
        "exists": lambda: reg.exists("m", version),
        "manifest": lambda: reg.manifest("m", version),
        "verify": lambda: reg.verify("m", version),
        "local_copy": lambda: reg.local_copy("m", version),
        "resolve": lambda: reg.resolve("m", version),
        "set_channel": lambda: reg.set_channel("m", "production", version),
        "pin": lambda: reg.pin("m", version),
    }
    for what, call in calls.items():
        with pytest.raises(InvalidInput, match="version"):
            call()
            pytest.fail(f"{what} accepted {version!r}")


@pytest.mark.parametrize("channel", BAD_CHANNELS)
def test_bad_channel_names_are_refused(world, channel):
    reg = world.reg
    for call in (lambda: reg.channel("m", channel), lambda: reg.channel_state("m", channel),
                 lambda: reg.set_channel("m", channel, "v1"),
                 lambda: reg.rollback("m", channel)):
        with pytest.raises(InvalidInput, match="channel name"):
            call()
    assert reg.channels_of("m") == {"production": "v1"}


def test_stray_channel_files_are_ignored_by_listing(world):
    channels = world.root / "m" / "channels"
    (channels / "..json").write_text(json.dumps({"version": "v2"}))
    (channels / "a..b.json").write_text(json.dumps({"version": "v2"}))
    (channels / "staging.json\n").write_text(json.dumps({"version": "v2"}))
    assert world.reg.channels_of("m") == {"production": "v1"}


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "..", "a\\b", "m\n"])
def test_cli_refuses_bad_names(world, name, capsys):
    root = str(world.root)
    assert cli("models", "verify", "--registry", root, name, "v1") == 2
    assert cli("models", "promote", "--registry", root, name, "v1") == 2
    assert cli("models", "pin", "--registry", root, name, "v1") == 2
    assert cli("models", "rollback", "--registry", root, name) == 2
    assert cli("models", "verify", "--registry", root, "m", f"v1/{name}") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(world.tmp) not in err


def test_grpc_requests_refuse_bad_names(world):
    from services.core.config import ServeLimits
    from services.protocol.tuneserve.v1 import inference_pb2
    from services.serving.admin import AdminMethods
    from services.serving.validation import validate_classify, validate_generate

    limits = ServeLimits()

    class Admin(AdminMethods):
        registry, limits = world.reg, ServeLimits()

    admin = Admin()
    for name in ["../x", "a/b", "/abs", "..", ".", "a\\b", "x\x00", "m\n", "a" * 200]:
        with pytest.raises(InvalidInput, match="model"):
            validate_classify(inference_pb2.ClassifyRequest(model=name, texts=["hi"]), limits)
        with pytest.raises(InvalidInput, match="model"):
            validate_generate(inference_pb2.GenerateRequest(model=name, prompt="hi"), limits)
        for method in (admin._promote, admin._pin, admin._rollback, admin._unpin):
            with pytest.raises(InvalidInput, match="model"):
                asyncio.run(method(SimpleNamespace(model=name, version="v1",
                                                   channel="production")))
    for version in ["../v1", "v1/..", "v1\x00", "/v1", "v1\n"]:
        with pytest.raises(InvalidInput, match="version"):
            validate_classify(inference_pb2.ClassifyRequest(model="m", version=version,
                                                            texts=["hi"]), limits)
        with pytest.raises(InvalidInput, match="version"):
            asyncio.run(admin._promote(SimpleNamespace(model="m", version=version,
                                                       channel="")))
    for channel in BAD_CHANNELS:
        with pytest.raises(InvalidInput, match="channel"):
            asyncio.run(admin._promote(SimpleNamespace(model="m", version="v1",
                                                       channel=channel)))
    assert world.reg.channel("m") == "v1"


# ---- symlinks planted in the registry --------------------------------------------------
def test_version_folder_symlinked_outside_is_refused_everywhere(world, capsys):
    reg, root = world.reg, world.root
    (root / "m" / "v3").symlink_to(world.outside / "v3")
    assert reg.versions("m") == ["v1", "v2"]
    assert not reg.exists("m", "v3")
    with pytest.raises(CorruptVersion, match="symlink"):
        reg.manifest("m", "v3")
    with pytest.raises(CorruptVersion, match="symlink"):
        reg.verify("m", "v3")
    with pytest.raises(CorruptVersion, match="symlink"):
        reg.local_copy("m", "v3")
    with pytest.raises(TuneserveError):
        load_version(reg, "m", "v3")
    for call in (lambda: reg.resolve("m", "v3"), lambda: reg.set_channel("m", "production", "v3"),
                 lambda: reg.pin("m", "v3")):
        with pytest.raises(ModelNotFound):
            call()
    assert cli("models", "verify", "--registry", str(root), "m", "v3") == 1
    assert cli("models", "promote", "--registry", str(root), "m", "v3") == 1
    assert cli("models", "list", "--registry", str(root), "--json") == 0
    out = capsys.readouterr().out
    assert '"v3"' not in out and '"v2"' in out
    assert reg.channel("m") == "v1" and reg.pinned("m") is None


def test_version_folder_symlinked_inside_the_root_is_refused(world):
    reg = world.reg
    (world.root / "m" / "v4").symlink_to(world.root / "m" / "v1")
    assert reg.versions("m") == ["v1", "v2"] and not reg.exists("m", "v4")
    with pytest.raises(CorruptVersion, match="symlink"):
        reg.verify("m", "v4")


def test_model_folder_symlinked_outside_is_refused(world):
    reg, root = world.reg, world.root
    (root / "evil").symlink_to(world.outside / "model")
    assert reg.model_names() == ["m"]
    for call in (lambda: reg.versions("evil"), lambda: reg.verify("evil", "v1"),
                 lambda: reg.local_copy("evil", "v1"), lambda: reg.channel("evil"),
                 lambda: reg.set_channel("evil", "production", "v1"),
                 lambda: load_version(reg, "evil", "v1")):
        with pytest.raises(InvalidInput, match="leaves the registry"):
            call()
    assert cli("models", "verify", "--registry", str(root), "evil", "v1") == 2


@pytest.mark.parametrize("target", ["outside weights", "/etc/passwd", "outside folder",
                                    "weights of another version"])
def test_file_symlinked_in_a_version_is_refused(world, target):
    reg, v1 = world.reg, world.root / "m" / "v1"
    if target == "outside weights":  # the same bytes: the checksums alone would pass
        (v1 / "model.safetensors").unlink()
        (v1 / "model.safetensors").symlink_to(world.outside / "v3" / "model.safetensors")
    elif target == "/etc/passwd":
        if not Path("/etc/passwd").is_file():
            pytest.skip("no /etc/passwd here")
        (v1 / "tokenizer.json").unlink()
        (v1 / "tokenizer.json").symlink_to("/etc/passwd")
    elif target == "outside folder":
        (v1 / "extra").symlink_to(world.outside, target_is_directory=True)
    else:
        (v1 / "model.safetensors").unlink()
        (v1 / "model.safetensors").symlink_to(world.root / "m" / "v2" / "model.safetensors")
    with pytest.raises(CorruptVersion, match="is a symlink"):
        reg.verify("m", "v1")
    with pytest.raises(CorruptVersion, match="is a symlink"):
        load_version(reg, "m", "v1")
    assert cli("models", "verify", "--registry", str(world.root), "m", "v1") == 1
    assert cli("models", "promote", "--registry", str(world.root), "m", "v1") == 1


def test_manifest_symlinked_outside_hides_the_version(world):
    reg, v2 = world.reg, world.root / "m" / "v2"
    (v2 / "manifest.json").unlink()
    (v2 / "manifest.json").symlink_to(world.outside / "v3" / "manifest.json")
    assert reg.versions("m") == ["v1"] and not reg.exists("m", "v2")
    with pytest.raises(CorruptVersion, match="manifest.json is a symlink"):
        reg.manifest("m", "v2")
    with pytest.raises(CorruptVersion, match="manifest.json is a symlink"):
        reg.verify("m", "v2")
    with pytest.raises(ModelNotFound):
        reg.set_channel("m", "production", "v2")


@pytest.mark.parametrize("pointer", ["channels/production.json", "pin.json", ".lock"])
def test_pointer_and_lock_symlinked_outside_are_neither_read_nor_written(world, pointer):
    reg, rel = world.reg, world.root / "m" / pointer
    rel.unlink(missing_ok=True)
    rel.symlink_to(world.outside / "pointer.json")
    if pointer != ".lock":
        with pytest.raises(RegistryError, match="symlink"):
            reg.channel("m") if "channels" in pointer else reg.pinned("m")
    with pytest.raises(TuneserveError):
        reg.set_channel("m", "production", "v2") if pointer != "pin.json" else \
            reg.pin("m", "v2")
    with pytest.raises(TuneserveError):
        reg.rollback("m") if pointer != "pin.json" else reg.unpin("m")


def test_symlink_loop_is_refused_cleanly(world):
    (world.root / "loop").symlink_to(world.root / "loop")
    assert world.reg.model_names() == ["m"]
    with pytest.raises(InvalidInput):
        world.reg.versions("loop")


def test_remote_keys_cannot_escape_the_download_folder(tmp_path, monkeypatch):
    """An object store accepts keys such as `m/v1/../../x`: local copies refuse them."""
    from services.core.registry.backend import Backend

    backend = Backend(tmp_path / "src")
    (tmp_path / "src" / "m" / "v1").mkdir(parents=True)
    dest = tmp_path / "cache" / "m" / "v1"
    for key in ["../../escaped", "a//b", "./x", "sub/../../../escaped", "a\\..\\b"]:
        monkeypatch.setattr(backend, "list_files", lambda rel, key=key: {key: 1})
        with pytest.raises(CorruptVersion, match="leaves the version"):
            backend.download_tree("m/v1", dest)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "cache" / "escaped").exists()
    assert list(dest.iterdir()) == []


def test_the_recorder_sees_a_read_through_a_symlink(world):
    """The check the fixture makes can fail: a read through a planted link is seen."""
    from services.core.data import file_sha256

    link = world.root / "m" / "v1" / "link"
    link.symlink_to(world.outside / "secret")
    file_sha256(link)
    world.reg.backend.fs.get_file_info(str(world.outside / "v3"))
    leaks = [(e, p) for e, p in world.log if _leaves(p, world.root, world.outside)]
    assert ("open", str(link)) in leaks
    assert ("pyarrow.get_file_info", str(world.outside / "v3")) in leaks
    world.log.clear()
