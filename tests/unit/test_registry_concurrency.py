"""The S3 registry under concurrency, against a real local S3 server (moto): version
claims and pointer updates are conditional writes, so concurrent publishers and a
Promote racing a publish lose nothing; the download cache stays within its bounds."""

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.core.errors import InvalidInput
from services.core.registry import Registry, cache
from tests.unit.test_registry import fake_checkpoint, manifest
from tests.unit.test_registry_s3 import s3_endpoint, s3_registry  # noqa: F401 (fixtures)

WRITERS = 8


def _race(reg, count, work):
    """Run work(i, registry) in `count` threads released together, each thread with its
    own Registry (its own connections), as separate publishers would be."""
    regs = [Registry(reg.uri) for _ in range(count)]
    for r in regs:
        r.backend.s3_client()
    start = threading.Barrier(count)

    def run(i):
        start.wait()
        return work(i, regs[i])

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def test_concurrent_publishers_get_distinct_versions(s3_registry, tmp_path):
    ck = fake_checkpoint(tmp_path / "ck")
    results = _race(s3_registry, WRITERS, lambda i, r: r.publish("m", ck, manifest()))
    versions = sorted((res.version for res in results), key=lambda v: int(v[1:]))
    assert versions == [f"v{i}" for i in range(1, WRITERS + 1)]
    assert s3_registry.versions("m") == versions
    for v in versions:
        assert s3_registry.verify("m", v)["version"] == v
    # promote=None promotes the first version only: exactly one publisher did
    promoted = [res.version for res in results if res.promoted]
    assert len(promoted) == 1 and s3_registry.channel("m") == promoted[0]


def test_promote_racing_publish_loses_no_update(s3_registry, tmp_path):
    """Every publisher promotes its version while others do the same: the channel ends
    on one of them and its history holds every other, none lost."""
    ck = fake_checkpoint(tmp_path / "ck")
    results = _race(s3_registry, WRITERS,
                    lambda i, r: r.publish("m", ck, manifest(), promote=True))
    versions = {res.version for res in results}
    assert len(versions) == WRITERS and all(res.promoted for res in results)
    state = s3_registry.channel_state("m")
    assert {state["version"], *state["history"]} == versions
    assert len(state["history"]) == WRITERS - 1


def test_promotes_and_pins_race_on_one_model(s3_registry, tmp_path):
    """Promotes to two channels and pins, all at once: each channel records every
    promote made to it."""
    ck = fake_checkpoint(tmp_path / "ck")
    for _ in range(WRITERS):
        s3_registry.publish("m", ck, manifest(), promote=False)

    def work(i, r):
        version = f"v{i + 1}"
        r.set_channel("m", "staging" if i % 2 else "production", version)
        r.pin("m", version)

    _race(s3_registry, WRITERS, work)
    for channel, parity in (("production", 0), ("staging", 1)):
        state = s3_registry.channel_state("m", channel)
        wanted = {f"v{i + 1}" for i in range(WRITERS) if i % 2 == parity}
        assert {state["version"], *state["history"]} == wanted
    assert s3_registry.pinned("m") in {f"v{i}" for i in range(1, WRITERS + 1)}


def test_a_stale_pointer_write_is_refused(s3_registry, tmp_path):
    reg = s3_registry
    reg.publish("m", fake_checkpoint(tmp_path / "ck"), manifest())
    rel = "m/channels/production.json"
    data, etag = reg.backend.read_tagged(rel)
    assert reg.backend.replace_if(rel, data + b" ", etag)  # unchanged since read: written
    assert not reg.backend.replace_if(rel, b"{}", etag)  # changed since: refused
    assert not reg.backend.create_exclusive(rel, b"{}")
    assert reg.channel("m") == "v1"


def test_canary_writers_race_on_one_model(s3_registry, tmp_path):
    """Canary starts racing: one wins, the others are refused as if it had run first;
    then share changes, history records and a promote racing an abort: every history
    entry is kept, and exactly one of the promote and the abort ends the canary."""
    from services.core.errors import RegistryError

    ck = fake_checkpoint(tmp_path / "ck")
    for _ in range(WRITERS + 1):
        s3_registry.publish("m", ck, manifest())  # v1 production, v2.. candidates

    def start(i, r):
        try:
            return r.start_canary("m", f"v{i + 2}", 10)["version"]
        except RegistryError as exc:
            assert "has a canary running" in exc.message, exc.message
            return None

    won = [v for v in _race(s3_registry, WRITERS, start) if v]
    assert len(won) == 1 and s3_registry.canary("m")["version"] == won[0]

    def share(i, r):
        if i % 2:
            r.record("m", "note", n=i)
        else:
            r.set_canary_share("m", 10 + i, step=i)

    _race(s3_registry, WRITERS, share)
    history = s3_registry.history("m")
    assert sum(e["action"] == "canary-start" for e in history) == 1
    assert sorted(e["n"] for e in history if e["action"] == "note") == \
        [i for i in range(WRITERS) if i % 2]
    shares = [e for e in history if e["action"] == "canary-share"]
    assert sorted(e["percent"] for e in shares) == [10 + i for i in range(0, WRITERS, 2)]
    # the last write wins whole (its share with its step); the history's order is
    # the order of its appends, which may differ from the pointer writes'
    final = s3_registry.canary("m")
    assert final["percent"] in {e["percent"] for e in shares}
    assert final["step"] == final["percent"] - 10

    def end(i, r):
        try:
            (r.promote_canary if i == 0 else r.abort_canary)("m")
            return "promote" if i == 0 else "abort"
        except RegistryError as exc:
            assert "has no canary running" in exc.message, exc.message
            return None

    ended = [e for e in _race(s3_registry, 2, end) if e]
    assert len(ended) == 1 and s3_registry.canary("m") is None
    assert [e["action"] for e in s3_registry.history("m")].count(
        f"canary-{ended[0]}") == 1
    assert s3_registry.canary_state("m")["ended"]["how"] == ended[0]


def _cached(root):
    found = cache.entries(root)
    return len(found), sum(e.size for e in found)


def test_the_cache_stays_within_its_bounds(s3_registry, tmp_path, monkeypatch):
    from services.core.registry import store

    reg = s3_registry
    root = store.CACHE_DIR
    ck = fake_checkpoint(tmp_path / "ck")
    reg.publish("m", ck, manifest())
    size = _cached(root)[1] or sum(f.stat().st_size for f in reg.local_copy("m", "v1").iterdir())
    monkeypatch.setenv(cache.MAX_VERSIONS_ENV, "3")
    monkeypatch.setenv(cache.MAX_BYTES_ENV, str(int(size * 3.5)))
    # another process serves v1 the whole time: its copy must survive every prune
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys; f=open(sys.argv[1],'a'); "
         "fcntl.flock(f, fcntl.LOCK_SH); print('held', flush=True); sys.stdin.read()",
         str(cache.lock_path(reg.local_copy("m", "v1")))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for _ in range(20):
            version = reg.publish("m", ck, manifest(), promote=True).version
            assert reg.resolve("m") == version and reg.verify("m", version)["version"] == version
            count, total = _cached(root)
            # the bound, plus v1 held by the other process
            assert count <= 3 + 1 and total <= size * 3.5 + size, (count, total)
            folders = {e.folder.name for e in cache.entries(root)}
            assert {"v1", version} <= folders
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert len(reg.versions("m")) == 21
    removed = cache.prune(root)  # v1 released now: the next prune removes it
    assert [f.name for f in removed] == ["v1"]
    assert {e.folder.name for e in cache.entries(root)} == {"v19", "v20", "v21"}


def test_a_bad_cache_limit_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(cache.MAX_VERSIONS_ENV, "lots")
    with pytest.raises(InvalidInput, match="TUNESERVE_CACHE_MAX_VERSIONS"):
        cache.limits()


def test_a_pointer_replaced_while_it_is_read_reads_whole(s3_registry):
    """A reader racing a writer that replaces a pointer with one of another length gets
    the old or the new bytes, never the new ones cut to the old length."""
    rel = "m/channels/production.json"
    short = b'{"version": "v1"}'
    long = b'{"version": "v2", "history": ["' + b"x" * 4000 + b'"]}'
    s3_registry.backend.write_atomic(rel, short)
    stop = threading.Event()

    def write():
        writer = Registry(s3_registry.uri).backend
        i = 0
        while not stop.is_set():
            writer.write_atomic(rel, long if i % 2 else short)
            i += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        seen = {s3_registry.backend.read_bytes(rel) for _ in range(300)}
    finally:
        stop.set()
        thread.join()
    assert seen <= {short, long}, sorted(len(b) for b in seen)
    assert seen == {short, long}  # the race did run
