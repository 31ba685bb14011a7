"""Serving metrics proven with a real Prometheus server (Debian's `prometheus`).

Prometheus scrapes Ray's metrics endpoint of the session cluster on loopback; the test
sends known traffic (including bad requests) and asserts, with PromQL over the HTTP API,
the request counts by method and code, a latency quantile from the histogram and the
served version in tuneserve_model_info; the request, batch and generation series carry
the version that answered. `promtool check metrics` passes on the scraped
tuneserve series.
"""

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest

from services.core.analysis import snapshot, window
from services.core.metrics import PREFIX, SPECS
from tests.conftest import GEN_MODEL
from tests.helpers import free_port

EXPORT_SETTLE_S = 12.0  # longer than Ray's metrics export interval (10 s)
RAY_LABELS = ("Component", "NodeAddress", "SessionName", "Version", "WorkerId")

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="the prometheus binary is absent (Debian package 'prometheus'; "
                              ".ci/run installs it)"),
]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def ours(text: str) -> str:
    """Only the tuneserve series (HELP/TYPE lines and samples)."""
    keep = []
    for line in text.splitlines():
        name = line.split()[2] if line.startswith("# ") and len(line.split()) > 2 else \
            line.split("{")[0].split(" ")[0]
        if name.startswith(PREFIX + "tuneserve_"):
            keep.append(line)
    return "\n".join(keep) + "\n"


class Prometheus:
    def __init__(self, target_port: int, workdir):
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: ray\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(self, promql: str) -> list[dict]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql}))
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else 0.0

    def wait(self, predicate, timeout_s: float = 90, poll_s: float = 1.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except (OSError, AssertionError):
                pass
            time.sleep(poll_s)
        return None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def requests_total(prom, method, code, model, version=None):
    by_version = f',version="{version}"' if version else ""
    return prom.value(f'sum({PREFIX}tuneserve_requests_total{{method="{method}",'
                      f'code="{code}",model="{model}"{by_version}}})')


def test_metrics_through_a_real_prometheus(server, ray_cluster, tmp_path):
    port = ray_cluster["metrics_port"]
    server.classify("toy", ["a superb film with lovely acting"])  # series exist
    prom = Prometheus(port, tmp_path)
    try:
        assert prom.wait(lambda: prom.query(f"{PREFIX}tuneserve_requests_total")), \
            "Prometheus never scraped a tuneserve series"
        # Ray exports on an interval: the baseline is taken once the counts have stayed
        # the same for longer than one export interval (earlier calls have landed).
        assert prom.wait(lambda: requests_total(prom, "Classify", "OK", "toy"))

        def counts():
            return (requests_total(prom, "Classify", "OK", "toy"),
                    requests_total(prom, "Classify", "INVALID_ARGUMENT", "toy"),
                    requests_total(prom, "Classify", "NOT_FOUND", "-"),
                    requests_total(prom, "Classify", "OK", "toy", "v1"))

        baseline = counts()
        for _ in range(6):
            time.sleep(EXPORT_SETTLE_S)  # a quiet period, not synchronisation on a result
            now = counts()
            if now == baseline:
                break
            baseline = now
        before_ok, before_bad, before_unknown, before_v1 = baseline
        gen = server.generate(GEN_MODEL, "hello", max_new_tokens=3)
        for _ in range(7):
            server.classify("toy", ["a superb film with lovely acting", "a dull story"])
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                server.classify("toy", [])
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                server.classify("no-such-model", ["x"])
        assert prom.wait(lambda: requests_total(prom, "Classify", "OK", "toy")
                         >= before_ok + 7, timeout_s=120)
        assert prom.wait(lambda: requests_total(prom, "Classify", "NOT_FOUND", "-")
                         >= before_unknown + 2, timeout_s=60)
        # exact counts once the exporter has caught up
        assert requests_total(prom, "Classify", "OK", "toy") == before_ok + 7
        assert requests_total(prom, "Classify", "INVALID_ARGUMENT", "toy") == before_bad + 3
        assert requests_total(prom, "Classify", "NOT_FOUND", "-") == before_unknown + 2
        # no label carries a request's text or an unknown model name
        labels = {r["metric"].get("model") for r in prom.query(
            f"{PREFIX}tuneserve_requests_total")}
        assert "no-such-model" not in labels
        # by version: the answers came from v1 (earlier tests of the session had other
        # versions answer too); the failures no version answered
        assert requests_total(prom, "Classify", "OK", "toy", "v1") == before_v1 + 7
        assert prom.value(f'sum({PREFIX}tuneserve_request_duration_seconds_count'
                          f'{{method="Classify",model="toy",version="v1"}})') >= 7
        p50 = prom.value(
            f'histogram_quantile(0.5, sum by (le) ({PREFIX}tuneserve_request_duration_seconds'
            f'_bucket{{method="Classify",model="toy"}}))')
        assert 0 < p50 < 10
        # Replica-side series come from other processes, each exporting on its own
        # interval: wait for them rather than assume they are in step.
        info = prom.wait(lambda: prom.query(
            f'{PREFIX}tuneserve_model_info{{model="toy"}} == 1'))
        assert info and {r["metric"]["version"] for r in info} == {"v1"}
        assert prom.wait(lambda: prom.value(
            f'sum({PREFIX}tuneserve_model_loads_total{{model="toy",result="loaded"}})') >= 1)
        assert prom.wait(lambda: prom.value(
            f'sum({PREFIX}tuneserve_batch_size_count{{model="toy",version="v1"}})') >= 7,
            timeout_s=60)
        assert prom.wait(lambda: prom.value(
            f'sum({PREFIX}tuneserve_batch_wait_seconds_count{{model="toy"}})') >= 7,
            timeout_s=60)
        # Ray rebuilds a histogram's _sum from bucket midpoints (a batch of 1 adds 0.5);
        # the companion counter holds the exact sum: every batch holds a request or more.
        batches = f'sum({PREFIX}tuneserve_batch_size_count{{model="toy"}})'
        exact = f'sum({PREFIX}tuneserve_batch_size_exact_sum_total{{model="toy"}})'
        assert prom.wait(lambda: prom.value(exact) >= prom.value(batches) >= 7, timeout_s=60)
        assert prom.wait(lambda: prom.value(
            f'sum({PREFIX}tuneserve_generated_tokens_total{{model="{GEN_MODEL}",'
            f'version="{gen.version}"}})') >= gen.completion_tokens > 0, timeout_s=60)
        assert prom.value(f'sum({PREFIX}tuneserve_time_to_first_token_seconds_count'
                          f'{{model="{GEN_MODEL}",version="{gen.version}"}})') >= 1

    finally:
        prom.stop()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is absent")
def test_promtool_check_metrics_on_scraped_text(server, ray_cluster):
    port = ray_cluster["metrics_port"]
    server.classify("toy", ["a superb film with lovely acting"])
    text = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = ours(scrape(port))
        if f"{PREFIX}tuneserve_requests_total" in text:
            break
        time.sleep(1)
    assert f"{PREFIX}tuneserve_requests_total" in text
    # Ray's exporter adds its own labels (Component, NodeAddress, SessionName, Version,
    # WorkerId); promtool's only complaint may be their CamelCase. Without them, our
    # series must pass clean.
    raw = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                         capture_output=True, timeout=60)
    problems = [line for line in (raw.stdout + raw.stderr).splitlines() if line.strip()]
    assert all("label names should be written in 'snake_case'" in p for p in problems), problems
    stripped = re.sub(r'\b(?:%s)="[^"]*",?' % "|".join(RAY_LABELS), "", text)
    proc = subprocess.run(["promtool", "check", "metrics"], input=stripped, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the rollout's analysis (services/core/analysis.py) reads Ray's text as it is
    assert window({}, snapshot(text), "toy")["v1"].requests >= 1
    exported = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert exported <= {PREFIX + n for n in SPECS}, exported - {PREFIX + n for n in SPECS}
