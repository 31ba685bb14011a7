"""A bad declarative setting (Serve user_config) never moves a replica off its target."""

from __future__ import annotations

import asyncio

from services.serving.follower import RegistryFollower


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
