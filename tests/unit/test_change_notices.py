"""Change notices outside Serve: the status board's long poll answers when a model's
entries change, and a replica whose poll interval is far longer than the test reads
the registry as soon as the board has a notice for its model (and keeps polling
when the board cannot be reached)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from services.core.registry import Registry
from services.serving.follower import RegistryFollower
from services.serving.status import StatusBoard
from tests.unit.test_registry import fake_checkpoint, manifest


class _Method:
    def __init__(self, fn):
        self._fn = fn

    async def remote(self, *args, **kwargs):
        result = self._fn(*args, **kwargs)
        return await result if asyncio.iscoroutine(result) else result


class BoardHandle:
    """A StatusBoard called the way a replica calls its DeploymentHandle."""

    def __init__(self, board=None, broken: bool = False):
        self.board = board or StatusBoard()
        self.broken = broken
        self.calls = 0

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls += 1
            if self.broken:
                raise ConnectionError("board gone")
            return getattr(self.board, name)(*args, **kwargs)

        return _Method(call)


class _Follower(RegistryFollower):
    def _load_version(self, version):
        return SimpleNamespace(version=version, dtype="float32")


async def _until(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_wait_change_answers_on_a_notice_and_after_its_timeout():
    async def scenario():
        board = StatusBoard()
        first = await board.wait_change("m", None)  # nothing seen yet: at once
        waiting = asyncio.ensure_future(board.wait_change("m", first, 20))
        other = asyncio.ensure_future(board.wait_change("other", None, 20))
        await asyncio.sleep(0.05)
        assert not waiting.done() and other.done()
        mark = await board.notify("m")
        assert await asyncio.wait_for(waiting, 5) == mark != first
        # no notice: the same mark after the timeout
        assert await board.wait_change("m", mark, 0.05) == mark
        # a board started again counts from zero: still a change for a replica
        assert await StatusBoard().wait_change("m", mark, 0.05) != mark

    asyncio.run(scenario())


def test_a_notice_reaches_a_replica_long_before_its_poll(tmp_path):
    reg = Registry(tmp_path / "reg")
    for _ in range(3):
        reg.publish("toy", fake_checkpoint(tmp_path / "ck"), manifest())
    handle = BoardHandle()

    async def scenario():
        f = _Follower(reg.uri, "toy", poll_interval_s=600, board=handle)
        await f.reconfigure({})
        assert f.current.version == "v1"
        await _until(lambda: handle.board._waiters.get("toy") is not None)
        for version in ("v2", "v3"):
            await asyncio.to_thread(reg.set_channel, "toy", "production", version)
            await handle.board.notify("toy")
            await _until(lambda: f.current.version == version)
        f._follower.cancel()
        f._watcher.cancel()

    asyncio.run(scenario())


def test_without_a_board_the_replica_still_polls(tmp_path):
    reg = Registry(tmp_path / "reg")
    for _ in range(2):
        reg.publish("toy", fake_checkpoint(tmp_path / "ck"), manifest())
    handle = BoardHandle(broken=True)

    async def scenario():
        f = _Follower(reg.uri, "toy", poll_interval_s=0.05, board=handle)
        await f.reconfigure({})
        await asyncio.to_thread(reg.set_channel, "toy", "production", "v2")
        await _until(lambda: f.current.version == "v2")
        assert handle.calls > 0 and not f._watcher.done()  # asked, and asks again
        f._follower.cancel()
        f._watcher.cancel()

    asyncio.run(scenario())
