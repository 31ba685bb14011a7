"""`tuneserve serve` as a user runs it: a separate process with its own local Ray
cluster, answering over gRPC, stopped cleanly by Ctrl-C (SIGINT).

It runs the default layout (--layout colocated: the ingress replica answers on the
port with a gRPC server of its own and runs the model itself), as a user who passes no
layout flag gets it. The test session's own server (tests/conftest.py) covers the path
through Serve's proxy, tests/integration/test_train_serve.py direct ingress."""

import concurrent.futures
import os
import signal
import subprocess
import sys

import pytest

from services.client import Client
from tests.helpers import free_port, listening_process, poll_until

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
            # concurrent calls, which the replica batches: each gets its own answer,
            # the one it gets alone
            texts = [f"{w} film" for w in ("a superb", "an awful", "a lovely", "a dull",
                                           "a brilliant", "a terrible")] * 4
            def top(t):
                result = client.classify("toy", [t]).results[0]
                return result.label, result.score

            alone = {t: top(t) for t in set(texts)}
            with concurrent.futures.ThreadPoolExecutor(12) as pool:
                together = list(pool.map(top, texts))
            assert [label for label, _ in together] == [alone[t][0] for t in texts]
            assert [s for _, s in together] == pytest.approx([alone[t][1] for t in texts],
                                                             abs=1e-4)
        # no proxy in front: the ingress replica's own process holds the port
        assert listening_process(port).startswith("ray::ServeReplica:tuneserve:ingress"), \
            listening_process(port)
        # The replica can answer before the command's own start-up wait has seen the
        # app running; a Ctrl-C before that line interrupts the start (exit 130).
        assert poll_until(lambda: f"serving gRPC on port {port}" in
                          (tmp_path / "serve.log").read_text(), timeout_s=120)
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


def test_ctrl_c_while_starting_stops_the_start(trained, tmp_path):
    """Ctrl-C before the models are up ends the start at once (it used to wait for
    them, up to 300 s) and leaves no Ray processes."""
    import time

    from tests.helpers import poll_until

    cfg, _ = trained
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services", "serve", "--registry", cfg.registry,
             "--grpc-port", str(free_port()), "--http-port", str(free_port()),
             "--replica-cpus", "0.5"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        assert poll_until(lambda: "starting Ray Serve" in log.read_text(), timeout_s=60)
        time.sleep(2)  # into Ray's start, not before it (no condition to poll there)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "shutting down" in text and "interrupted" in text and "serving gRPC" not in text
    assert "Traceback" not in text
