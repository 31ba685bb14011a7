"""`tuneserve serve` as a user runs it: a separate process with its own local Ray
cluster, answering over gRPC, stopped cleanly by Ctrl-C (SIGINT)."""

import os
import signal
import subprocess
import sys

import pytest

from services.client import Client
from tests.helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_serve_command_foreground_and_ctrl_c(trained, tmp_path):
    cfg, _ = trained
    port = free_port()
    env = dict(os.environ, RAY_ADDRESS="", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services", "serve", "--registry", cfg.registry,
         "--grpc-port", str(port), "--http-port", str(free_port()), "--replica-cpus", "0.5"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        with Client(f"127.0.0.1:{port}", timeout_s=60) as client:
            client.wait_until_serving(timeout_s=240)
            resp = client.classify("toy", ["a superb film with lovely acting"])
            assert resp.results[0].label == "positive" and resp.version == "v1"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    out = log.read()
    assert f"serving gRPC on port {port}" in out
    assert "shutting down" in out
    assert "Traceback" not in out
