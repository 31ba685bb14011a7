"""--address (or RAY_ADDRESS) that does not answer: one clear line in seconds, before
ray.init, which would retry the connection without end."""

from __future__ import annotations

import socket
import time

import pytest

from services.core.errors import ConfigError
from services.core.raycluster import check_reachable, ensure_ray


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_addresses_name_the_flag(monkeypatch):
    port = closed_port()
    started = time.monotonic()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match=f"--address {address}: cannot reach a Ray "
                                              "cluster there"):
            check_reachable(address)
    with pytest.raises(ConfigError, match="--address 'head-node': expected HOST:PORT"):
        check_reachable("head-node")
    assert time.monotonic() - started < 5
    check_reachable("auto")  # Ray's own discovery: left to it
    # through ensure_ray, from the environment: refused before ray.init is called
    import ray

    def no_init(**kwargs):
        raise AssertionError("ray.init called for an unreachable address")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_init)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=f"RAY_ADDRESS 127.0.0.1:{port}: cannot reach"):
        ensure_ray()
    with pytest.raises(ConfigError, match=f"--address 127.0.0.1:{port}: cannot reach"):
        ensure_ray(f"127.0.0.1:{port}")


def test_a_listening_head_passes():
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen(1)
        check_reachable(f"127.0.0.1:{head.getsockname()[1]}")
