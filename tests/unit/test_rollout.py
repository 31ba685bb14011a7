"""Stepped canary rollouts with automatic analysis (issue 30, point 3).

A simulated serving layer splits each poll's requests by the share the registry's
canary state holds (as the replicas do) and exports its counters as Ray's metrics
endpoint does; the analysis reads them, judges the candidate against production over
the same window, and the rollout steps the share up, promotes, or aborts at once,
with its numbers and reason in the model's history. The last test goes through
`tuneserve models rollout` and a real HTTP metrics endpoint.
"""

from __future__ import annotations

import http.server
import threading
from collections import defaultdict

import pytest

from services.cli import main
from services.core.analysis import (
    RolloutPolicy,
    VersionStats,
    check,
    quantile,
    snapshot,
    window,
)
from services.core.metrics import LATENCY_BUCKETS_S
from services.core.registry import Registry
from services.rollout import Rollout
from tests.unit.test_registry import fake_checkpoint, manifest

POLICY = RolloutPolicy(steps=(5, 25, 50), min_requests=50, min_step_s=30,
                       max_step_s=300, poll_s=10)
PER_POLL = 400  # requests a poll's worth of traffic brings


class Serving:
    """Counters of a served model whose traffic follows the registry's canary share.
    `candidate`: its failure ratio and latency (s); production answers in 20 ms."""

    def __init__(self, registry: Registry, name: str, fail_every: int = 0,
                 latency_s: float = 0.02, per_poll: int = PER_POLL):
        self.registry, self.name = registry, name
        self.fail_every, self.latency_s, self.per_poll = fail_every, latency_s, per_poll
        self.counts: dict[tuple, float] = defaultdict(float)  # (version, code) -> n
        self.latencies: dict[tuple, float] = defaultdict(float)  # (version, le) -> n
        self.served: dict[str, int] = defaultdict(int)

    def poll(self) -> None:
        canary = self.registry.canary(self.name)
        production = self.registry.channel(self.name)
        share = canary["percent"] / 100 if canary else 0.0
        to_candidate = round(self.per_poll * share)
        self._answer(production, self.per_poll - to_candidate, 0, 0.02)
        if canary:
            failed = to_candidate // self.fail_every if self.fail_every else 0
            self._answer(canary["version"], to_candidate, failed, self.latency_s)

    def _answer(self, version: str, n: int, failed: int, latency_s: float) -> None:
        self.served[version] += n
        self.counts[(version, "OK")] += n - failed
        self.counts[(version, "INTERNAL")] += failed
        for le in [*LATENCY_BUCKETS_S, float("inf")]:
            if latency_s <= le:
                self.latencies[(version, le)] += n

    def text(self) -> str:
        """The Prometheus text of Ray's endpoint (with Ray's own labels)."""
        ray = 'Component="core_worker",WorkerId="w1"'
        lines = ["# TYPE ray_tuneserve_requests_total counter"]
        for (version, code), n in sorted(self.counts.items()):
            lines.append(f'ray_tuneserve_requests_total{{{ray},method="Classify",'
                         f'code="{code}",model="{self.name}",version="{version}"}} {n}')
        lines.append("# TYPE ray_tuneserve_request_duration_seconds histogram")
        for (version, le), n in sorted(self.latencies.items()):
            bound = "+Inf" if le == float("inf") else repr(le)
            lines.append(f'ray_tuneserve_request_duration_seconds_bucket{{{ray},'
                         f'method="Classify",model="{self.name}",version="{version}",'
                         f'le="{bound}"}} {n}')
        for version in sorted(self.served):
            tags = f'{ray},method="Classify",model="{self.name}",version="{version}"'
            lines.append(f"ray_tuneserve_request_duration_seconds_count{{{tags}}} "
                         f"{self.served[version]}")
            lines.append(f"ray_tuneserve_request_duration_seconds_sum{{{tags}}} 1.0")
        return "\n".join(lines) + "\n"


class Clock:
    def __init__(self, serving: Serving):
        self.now, self.serving = 0.0, serving

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.serving.poll()


@pytest.fixture
def registry(tmp_path):
    reg = Registry(tmp_path / "reg")
    ck = fake_checkpoint(tmp_path / "ck")
    reg.publish("toy", ck, manifest())  # v1, production
    reg.publish("toy", ck, manifest())  # v2, the candidate
    return reg


def _rollout(registry: Registry, serving: Serving, lines: list):
    clock = Clock(serving)
    rollout = Rollout(registry, "toy", "v2", lambda: snapshot(serving.text()), POLICY,
                      out=lines.append, clock=lambda: clock.now, sleep=clock.sleep)
    return rollout.run()


def test_a_good_candidate_goes_through_every_step_and_is_promoted(registry):
    lines: list[str] = []
    outcome = _rollout(registry, Serving(registry, "toy"), lines)
    assert outcome.promoted, outcome.reason
    assert [s["percent"] for s in outcome.steps] == [5, 25, 50]
    assert all(s["state"] == "pass" and s["seconds"] >= 30 for s in outcome.steps)
    assert registry.channel("toy") == "v2" and registry.canary("toy") is None
    history = registry.history("toy")
    assert [e["action"] for e in history[-4:]] == [
        "canary-start", "canary-share", "canary-share", "canary-promote"]
    assert [e.get("percent") for e in history[-4:-1]] == [5, 25, 50]
    assert history[-1]["candidate_requests"] >= 50
    assert "passed every step (5 % -> 25 % -> 50 % -> 100 %)" in history[-1]["reason"]


def test_a_candidate_failing_a_tenth_is_rolled_back_in_the_first_step(registry):
    lines: list[str] = []
    serving = Serving(registry, "toy", fail_every=10)
    outcome = _rollout(registry, serving, lines)
    assert not outcome.promoted and len(outcome.steps) == 1
    assert outcome.reason.startswith("rolled back at 5 % (step 1): error check: v2 failed")
    assert registry.channel("toy") == "v1" and registry.canary("toy") is None
    abort = registry.history("toy")[-1]
    assert abort["action"] == "canary-abort" and "error check" in abort["reason"]
    assert abort["candidate_error_ratio"] == pytest.approx(0.1, abs=0.02)
    assert abort["production_error_ratio"] == 0
    # nothing more went to v2 after the abort
    served = serving.served["v2"]
    serving.poll()
    assert serving.served["v2"] == served


def test_a_candidate_three_times_slower_is_rolled_back_on_latency(registry):
    outcome = _rollout(registry, Serving(registry, "toy", latency_s=0.06), [])
    assert not outcome.promoted
    assert "latency check: v2 p99" in outcome.reason
    assert registry.history("toy")[-1]["candidate_p99_s"] > \
        1.5 * registry.history("toy")[-1]["production_p99_s"]


def test_a_step_without_enough_requests_rolls_back_at_its_time_limit(registry):
    outcome = _rollout(registry, Serving(registry, "toy", per_poll=10), [])
    assert not outcome.promoted
    assert "too few requests to judge in 300 s" in outcome.reason
    assert outcome.steps[0]["seconds"] >= 300


def test_window_counts_each_version_over_the_same_span_and_survives_restarts():
    def text(ok_v1, err_v2, worker="w1"):
        return ("# TYPE ray_tuneserve_requests_total counter\n"
                f'ray_tuneserve_requests_total{{WorkerId="{worker}",method="Classify",'
                f'code="OK",model="m",version="v1"}} {ok_v1}\n'
                f'ray_tuneserve_requests_total{{WorkerId="{worker}",method="Classify",'
                f'code="INTERNAL",model="m",version="v2"}} {err_v2}\n'
                f'ray_tuneserve_requests_total{{WorkerId="{worker}",method="Classify",'
                f'code="NOT_FOUND",model="m",version="-"}} 7\n'
                f'ray_tuneserve_requests_total{{WorkerId="{worker}",method="ListModels",'
                f'code="OK",model="m",version="v1"}} 9\n')

    before = snapshot(text(100, 5))
    stats = window(before, snapshot(text(160, 8)), "m")
    assert stats == {"v1": VersionStats(60, 0, None), "v2": VersionStats(3, 3, None)}
    # a worker that restarted (counts from zero) and a new one add, never subtract
    after = {**snapshot(text(10, 1)), **snapshot(text(4, 0, worker="w2"))}
    assert window(before, after, "m")["v1"].requests == 4
    assert window(before, before, "other") == {}


def test_quantile_is_prometheus_histogram_quantile():
    assert quantile(0.5, {0.1: 50, 0.2: 100, float("inf"): 100}) == pytest.approx(0.1)
    assert quantile(0.99, {0.1: 0, 0.2: 100, float("inf"): 100}) == pytest.approx(0.199)
    assert quantile(0.99, {0.1: 0, float("inf"): 10}) == 0.1
    assert quantile(0.99, {0.1: 0, float("inf"): 0}) is None


def test_check_waits_for_requests_and_fails_on_either_check():
    good = {"v1": VersionStats(900, 9, 0.02), "v2": VersionStats(100, 1, 0.025)}
    assert check(good, "v2", "v1", POLICY).state == "pass"
    few = {"v1": VersionStats(900, 0, 0.02), "v2": VersionStats(10, 10, 1.0)}
    assert check(few, "v2", "v1", POLICY).state == "wait"
    errs = {"v1": VersionStats(900, 9, 0.02), "v2": VersionStats(100, 4, 0.02)}
    assert check(errs, "v2", "v1", POLICY).reason.startswith("error check: v2 failed 4 of 100")
    slow = {"v1": VersionStats(900, 0, 0.02), "v2": VersionStats(100, 0, 0.05)}
    assert check(slow, "v2", "v1", POLICY).reason == \
        "latency check: v2 p99 50.0 ms, production v1 20.0 ms; the limit is 40.0 ms"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "5,x"], "--steps: expected shares like 5,25,50"),
    (["--steps", "50,25"], "--steps: expected rising shares"),
    (["--min-requests", "0"], "--min-requests: expected at least 1"),
    (["--poll-s", "0"], "--poll-s: expected a number > 0"),
    (["--p99-factor", "0"], "--p99-factor: expected a number > 0"),
    (["--p99-slack-s", "-1"], "--p99-slack-s: expected a number >= 0"),
])
def test_bad_flags_name_the_flag(registry, capsys, argv, message):
    code = main(["models", "rollout", "--registry", registry.uri, "toy", "v2",
                 "--metrics-url", "http://127.0.0.1:1/metrics", *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_the_cli_rolls_out_through_a_real_metrics_endpoint(registry, capsys):
    server = _metrics_endpoint(Serving(registry, "toy"))
    try:
        code = main(["models", "rollout", "--registry", registry.uri, "toy", "v2",
                     "--metrics-url", f"http://127.0.0.1:{server.server_port}/metrics",
                     "--steps", "10,50", "--min-requests", "30", "--min-step-s", "0",
                     "--poll-s", "0.01"])
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    assert code == 0, out
    assert "step 1 of 2: v2 at 10 %" in out and "step 2 of 2: v2 at 50 %" in out
    assert "promoted: v2 passed every step (10 % -> 50 % -> 100 %) against v1" in out
    assert registry.channel("toy") == "v2"
    assert main(["models", "history", "--registry", registry.uri, "toy"]) == 0
    assert "canary-promote" in capsys.readouterr().out


def test_metrics_that_stop_answering_abort_the_canary(registry):
    from services.rollout import MetricsUnreadable

    serving, reads = Serving(registry, "toy"), []

    def read():
        reads.append(1)
        if len(reads) > 2:
            raise MetricsUnreadable("--metrics-url http://x/metrics: cannot read it")
        return snapshot(serving.text())

    clock = Clock(serving)
    with pytest.raises(MetricsUnreadable):
        Rollout(registry, "toy", "v2", read, POLICY, out=lambda line: None,
                clock=lambda: clock.now, sleep=clock.sleep).run()
    assert registry.canary("toy") is None and registry.channel("toy") == "v1"
    assert registry.history("toy")[-1]["reason"].startswith("rollout stopped: --metrics-url")


def _metrics_endpoint(serving: Serving) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # each scrape brings a poll's worth of traffic
            serving.poll()
            body = serving.text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def keyword_models(tmp_path_factory):
    from tests.unit.test_fair_gate import NEGATIVE, POSITIVE, keyword_bert

    root = tmp_path_factory.mktemp("keyword-berts")
    return {"full": keyword_bert(root / "full", POSITIVE, NEGATIVE),
            "partial": keyword_bert(root / "partial", ("good",), NEGATIVE)}


@pytest.mark.parametrize("production, candidate, promoted", [
    ("full", "partial", False), ("partial", "full", True)])
def test_analysis_data_rolls_back_a_less_accurate_candidate(
        tmp_path, capsys, keyword_models, production, candidate, promoted):
    """Both versions answer every request (the metrics are clean); on the labelled
    rows the "partial" keyword model misses 4 of 32 that "full" gets right."""
    from tests.helpers import write_csv
    from tests.unit.test_fair_gate import ROW_LABELS, ROWS

    models = keyword_models
    reg = Registry(tmp_path / "reg")
    for which in (production, candidate):
        reg.publish("sent", models[which], {"task": "classification",
                                            "labels": ["neg", "pos"], "metrics": {}})
    data = write_csv(tmp_path / "analysis.csv", list(zip(ROWS, ROW_LABELS)))
    server = _metrics_endpoint(Serving(reg, "sent"))
    try:
        code = main(["models", "rollout", "--registry", reg.uri, "sent", "v2",
                     "--metrics-url", f"http://127.0.0.1:{server.server_port}/metrics",
                     "--steps", "10,50", "--min-requests", "30", "--min-step-s", "0",
                     "--poll-s", "0.01", "--analysis-data", str(data)])
    finally:
        server.shutdown()
    out = capsys.readouterr().out
    last = reg.history("sent")[-1]
    if promoted:
        assert code == 0 and reg.channel("sent") == "v2", out
        assert (last["candidate_accuracy"], last["production_accuracy"]) == (1.0, 0.875)
    else:
        assert code == 1 and reg.channel("sent") == "v1", out
        assert "accuracy check: v2 accuracy 0.8750, production v1 1.0000 on the 32 rows" \
            in out
        assert last["action"] == "canary-abort" and "accuracy check" in last["reason"]


def test_a_restarted_rollout_resumes_at_its_step(registry):
    """The step is in the registry's canary state: a rollout whose process died in
    step 2 is resumed there by the next one, not started over."""
    serving = Serving(registry, "toy")
    clock = Clock(serving)

    def dies_in_step_two(seconds):
        clock.sleep(seconds)
        canary = registry.canary("toy")
        if canary and canary["step"] == 1:
            raise KeyboardInterrupt  # the process is gone; the canary stays

    with pytest.raises(KeyboardInterrupt):
        Rollout(registry, "toy", "v2", lambda: snapshot(serving.text()), POLICY,
                out=lambda line: None, clock=lambda: clock.now,
                sleep=dies_in_step_two).run()
    assert registry.canary("toy")["step"] == 1 and registry.canary("toy")["percent"] == 25

    lines: list[str] = []
    outcome = Rollout(registry, "toy", "v2", lambda: snapshot(serving.text()), POLICY,
                      out=lines.append, clock=lambda: clock.now, sleep=clock.sleep).run()
    assert lines[0] == "resuming the rollout of v2 at step 2 of 3"
    assert outcome.promoted and [s["percent"] for s in outcome.steps] == [25, 50]
    actions = [e["action"] for e in registry.history("toy")]
    assert actions.count("canary-start") == 1
    assert actions[-3:] == ["canary-share", "canary-share", "canary-promote"]


def test_a_resumed_rollout_takes_the_share_of_its_step(registry):
    """A canary of the version set by hand (or under another policy) is taken over at
    its recorded step, its share moved to that step's."""
    registry.start_canary("toy", "v2", 12)
    serving = Serving(registry, "toy")
    clock = Clock(serving)
    lines: list[str] = []
    outcome = Rollout(registry, "toy", "v2", lambda: snapshot(serving.text()), POLICY,
                      out=lines.append, clock=lambda: clock.now, sleep=clock.sleep).run()
    assert lines[0] == "resuming the rollout of v2 at step 1 of 3"
    assert outcome.promoted and [s["percent"] for s in outcome.steps] == [5, 25, 50]
    resumed = [e for e in registry.history("toy") if e["action"] == "canary-share"][0]
    assert (resumed["previous_percent"], resumed["percent"]) == (12, 5)
    assert resumed["reason"] == "rollout resumed at step 1 of 3"


@pytest.mark.parametrize("fail_every, decisions", [
    (0, ["step_passed", "step_passed", "step_passed", "promoted"]),
    (10, ["rolled_back"])])
def test_decisions_are_recorded_as_metrics(registry, monkeypatch, fail_every, decisions):
    from services.core import metrics

    recorded: list[tuple] = []
    monkeypatch.setattr(metrics, "inc", lambda name, value=1.0, **tags: recorded.append(
        (name, tags)))
    monkeypatch.setattr(metrics, "set_gauge", lambda name, value, **tags: recorded.append(
        (name, value, tags)))
    _rollout(registry, Serving(registry, "toy", fail_every=fail_every), [])
    for entry in recorded:
        assert set(entry[-1]) == set(metrics.SPECS[entry[0]].labels), entry
    assert [e[-1]["decision"] for e in recorded
            if e[0] == "tuneserve_rollout_decisions_total"] == decisions
    steps = [(e[1], e[-1]["version"]) for e in recorded if e[0] == "tuneserve_rollout_step"]
    assert steps[0] == (1, "v2") and steps[-1] == (0, "v2")
    assert max(value for value, _ in steps) == (3 if not fail_every else 1)
