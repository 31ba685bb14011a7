"""The registry follower outside Serve: a bad declarative setting (Serve user_config)
never moves a replica off its target; a version whose load fails unexpectedly is tried
again, with waits, before it is refused, and one failing a check is refused at once."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from services.core.errors import CorruptVersion, ModelLoading
from services.serving.follower import LOAD_ATTEMPTS, RegistryFollower


class _Follower(RegistryFollower):
    def _load_version(self, version):  # never reached: nothing is published
        raise AssertionError("no version should load")


def test_invalid_pin_or_channel_in_user_config_is_ignored_and_reported(tmp_path):
    async def scenario():
        f = _Follower(str(tmp_path), "toy", poll_interval_s=60)
        await f.reconfigure({"pinned_version": "v2", "channel": "staging"})
        assert (f.pinned, f.channel) == ("v2", "staging")
        for bad in ({"pinned_version": "../v1"}, {"pinned_version": "v1\n"},
                    {"channel": "a/b"}, {"channel": ".."}):
            await f.reconfigure(bad)
            assert (f.pinned, f.channel) == ("v2", "staging"), bad
            assert f.last_error.startswith("user_config ignored:")
        await f.reconfigure({})
        assert (f.pinned, f.channel) == (None, "staging")
        if f._follower is not None:
            f._follower.cancel()

    asyncio.run(scenario())


# ---- a version whose load fails -----------------------------------------------------------
class _Flaky(RegistryFollower):
    """Loads fail with the errors in `failures`, one per try, then succeed."""

    def __init__(self, *args, failures=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.failures = list(failures)
        self.tries = 0
        self.polls = 0

    def _target(self):
        self.polls += 1
        return super()._target()

    def _load_version(self, version):
        self.tries += 1
        if self.failures:
            raise self.failures.pop(0)
        return SimpleNamespace(version=version, dtype="float32")


def _published(tmp_path):
    from services.core.registry import Registry
    from tests.unit.test_registry import fake_checkpoint, manifest

    reg = Registry(tmp_path / "reg")
    reg.publish("toy", fake_checkpoint(tmp_path / "ck"), manifest())
    return reg.uri


async def _until(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_a_load_that_fails_unexpectedly_is_tried_again_then_serves(tmp_path):
    async def scenario():
        f = _Flaky(_published(tmp_path), "toy", poll_interval_s=0.05,
                   failures=[OSError("read error"), MemoryError()])
        started = time.monotonic()
        await f.reconfigure({})  # the first try, at start
        assert (f.tries, f.state, f.current, f.refused) == (1, "loading", None, {})
        assert f.last_error == ("load of v1 failed (attempt 1 of 3, next in 0.05 s): "
                                "OSError")
        with pytest.raises(ModelLoading, match="toy' is loading; retry shortly"):
            await f._model_for(None)
        await _until(lambda: f.current is not None)
        # waits of one, then two poll intervals between the tries
        assert time.monotonic() - started >= 0.15 - 0.01
        assert (f.tries, f.state, f.current.version) == (3, "ready", "v1")
        assert f.refused == {} and f.failed_loads == {} and f.last_error is None
        f._follower.cancel()

    asyncio.run(scenario())


def test_a_load_that_keeps_failing_is_refused_after_three_tries(tmp_path):
    async def scenario():
        f = _Flaky(_published(tmp_path), "toy", poll_interval_s=0.02,
                   failures=[OSError("read error")] * 5)
        await f.reconfigure({})
        await _until(lambda: "v1" in f.refused)
        assert f.refused["v1"] == "load failed 3 times: OSError"
        assert f.state == "failed" and f.current is None
        # refused for good: more polls try nothing
        polls = f.polls
        await _until(lambda: f.polls >= polls + 5)
        assert f.tries == LOAD_ATTEMPTS
        with pytest.raises(CorruptVersion, match="v1 of 'toy' was refused: load failed 3"):
            await f._get_or_load("v1")
        f._follower.cancel()

    asyncio.run(scenario())


def test_a_version_failing_a_check_is_refused_at_once(tmp_path):
    async def scenario():
        f = _Flaky(_published(tmp_path), "toy", poll_interval_s=0.02,
                   failures=[CorruptVersion("toy v1: smoke inference gave invalid output")])
        await f.reconfigure({})
        assert f.refused == {"v1": "toy v1: smoke inference gave invalid output"}
        polls = f.polls
        await _until(lambda: f.polls >= polls + 5)
        assert (f.tries, f.state) == (1, "failed")
        f._follower.cancel()

    asyncio.run(scenario())


def test_a_request_for_a_version_in_its_wait_does_not_load_it_again(tmp_path):
    async def scenario():
        f = _Flaky(_published(tmp_path), "toy", poll_interval_s=30,
                   failures=[OSError("read error")])
        with pytest.raises(ModelLoading, match=r"failed to load \(attempt 1 of 3\)"):
            await f._get_or_load("v1")
        with pytest.raises(ModelLoading, match=r"failed to load \(1 of 3 attempts\); "
                                               r"next try in (29|30) s"):
            await f._get_or_load("v1")
        assert f.tries == 1
        f.failed_loads["v1"] = (1, time.monotonic())  # the wait is over
        assert (await f._get_or_load("v1")).version == "v1" and f.tries == 2

    asyncio.run(scenario())


def test_a_replica_started_on_a_refused_version_serves_the_one_before(tmp_path):
    """A replica that starts (e.g. added by autoscaling) while the channel points at a
    version it refuses serves what the channel pointed at before, as the replicas that
    were already running do; it moves on when the channel does."""
    from services.core.registry import Registry
    from tests.unit.test_registry import fake_checkpoint, manifest

    reg = Registry(tmp_path / "reg")
    for _ in range(4):
        reg.publish("toy", fake_checkpoint(tmp_path / "ck"), manifest())
    for version in ("v2", "v3"):  # production: v1 -> v2 -> v3, v3 bad
        reg.set_channel("toy", "production", version)

    class Picky(_Flaky):
        def _load_version(self, version):
            if version == "v3":
                self.bad_tries = getattr(self, "bad_tries", 0) + 1
                raise CorruptVersion("toy v3: smoke inference gave invalid output")
            return super()._load_version(version)

    async def scenario():
        f = Picky(reg.uri, "toy", poll_interval_s=0.02)
        await f.reconfigure({})
        assert (f.current.version, f.state) == ("v2", "ready")
        assert f.refused == {"v3": "toy v3: smoke inference gave invalid output"}
        assert f.last_error.startswith("serving v2: v3 was refused")
        polls = f.polls
        await _until(lambda: f.polls >= polls + 5)
        assert f.current.version == "v2" and (f.tries, f.bad_tries) == (1, 1)
        reg.set_channel("toy", "production", "v4")
        await _until(lambda: f.current.version == "v4")
        f._follower.cancel()

    asyncio.run(scenario())


def test_a_refused_version_is_tried_again_when_promoted_again(tmp_path):
    """An operator who fixed the files promotes the same version again: the replica
    forgets the refusal (of either kind) and loads it."""
    from services.core.registry import Registry

    async def scenario():
        uri = _published(tmp_path)
        f = _Flaky(uri, "toy", poll_interval_s=0.02, failures=[OSError("read error")] * 3)
        await f.reconfigure({})
        await _until(lambda: "v1" in f.refused)
        assert f.tries == LOAD_ATTEMPTS and f.current is None
        await asyncio.to_thread(Registry(uri).set_channel, "toy", "production", "v1")
        await _until(lambda: f.current is not None)
        assert f.current.version == "v1" and f.refused == {} and f.tries == LOAD_ATTEMPTS + 1
        # a check failure, then the files are fixed and the version pinned
        f._follower.cancel()
        await asyncio.sleep(0)
        f.failures = [CorruptVersion("toy v1: model.safetensors fails its sha256 check")]
        f.current = None
        f.refused, f.state = {}, "loading"
        await f._switch_to("v1")
        assert "v1" in f.refused and f.current is None
        await asyncio.to_thread(Registry(uri).pin, "toy", "v1")
        f._ensure_follower()
        await _until(lambda: f.current is not None)
        f._follower.cancel()

    asyncio.run(scenario())


def test_a_version_refused_for_unexpected_failures_is_tried_again_later(tmp_path,
                                                                       monkeypatch):
    from services.serving import follower

    monkeypatch.setattr(follower, "REFUSED_RETRY_S", 0.3)

    async def scenario():
        f = _Flaky(_published(tmp_path), "toy", poll_interval_s=0.02,
                   failures=[OSError("read error")] * 3)
        await f.reconfigure({})
        await _until(lambda: "v1" in f.refused)
        refused_at = time.monotonic()
        await _until(lambda: f.current is not None)
        assert time.monotonic() - refused_at >= 0.3 - 0.05
        assert f.tries == LOAD_ATTEMPTS + 1 and f.refused == {}
        f._follower.cancel()

    asyncio.run(scenario())


def test_an_unreadable_file_is_retried_like_a_read_error(tmp_path):
    from services.core.errors import UnreadableVersion

    async def scenario():
        f = _Flaky(_published(tmp_path), "toy", poll_interval_s=0.02,
                   failures=[UnreadableVersion("toy v1: cannot read config.json: I/O error")])
        await f.reconfigure({})
        assert f.refused == {} and f.state == "loading"
        assert "cannot read config.json" in f.last_error
        await _until(lambda: f.current is not None)
        assert f.tries == 2
        f._follower.cancel()

    asyncio.run(scenario())


def test_an_unpin_does_not_retry_what_the_channel_named_and_was_refused(tmp_path):
    from services.core.registry import Registry

    async def scenario():
        uri = _published(tmp_path)
        f = _Flaky(uri, "toy", poll_interval_s=0.02,
                   failures=[CorruptVersion("toy v1: model.safetensors fails its sha256")])
        await f.reconfigure({})
        assert "v1" in f.refused
        reg = Registry(uri)
        await asyncio.to_thread(reg.pin, "toy", "v1")  # a pin naming it: tried again
        await _until(lambda: f.current is not None)
        f._follower.cancel()
        await asyncio.sleep(0)
        f.current, f.refused, f.failures = None, {"v1": "refused"}, []
        tries = f.tries
        await asyncio.to_thread(reg.unpin, "toy")  # back to the channel: not a request
        f._ensure_follower()
        polls = f.polls
        await _until(lambda: f.polls >= polls + 5)
        assert f.tries == tries and "v1" in f.refused
        f._follower.cancel()

    asyncio.run(scenario())


def test_a_model_with_no_version_to_serve_is_failed_not_loading(tmp_path):
    from services.core.registry import Registry
    from tests.unit.test_registry import fake_checkpoint, manifest

    async def scenario():
        reg = Registry(tmp_path / "reg")
        reg.publish("toy", fake_checkpoint(tmp_path / "ck"), manifest(), promote=False)
        f = _Flaky(reg.uri, "toy", poll_interval_s=0.02)
        await f.reconfigure({})
        await _until(lambda: f.state == "failed")
        assert f.last_error == "model 'toy' has no production version" and f.tries == 0
        await asyncio.to_thread(reg.set_channel, "toy", "production", "v1")
        await _until(lambda: f.state == "ready")
        f._follower.cancel()

    asyncio.run(scenario())
