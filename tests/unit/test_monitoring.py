"""k8s/monitoring: the PrometheusRule alerts and the Grafana dashboard.

promtool (Debian package `prometheus`; .ci/run installs it) checks the rules and the
dashboard's PromQL, and unit-tests the alerts on made-up series with Ray's exported names
and labels; every metric name and label they use must be one services/core/metrics.py
defines (Ray adds the `ray_` prefix; histograms export `_bucket`, `_sum`, `_count`).
The PrometheusRule's schema is checked with the rest of k8s/ in test_k8s_manifests.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.core.metrics import PREFIX, SPECS

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "k8s" / "monitoring"
RULES = MONITORING / "prometheus-rules.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
# Labels Ray adds to every series it exports, and Prometheus' histogram bucket label.
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                "and", "or", "unless", "offset"}


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["spec"]["groups"]


def alert_rules() -> dict[str, dict]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.skip("promtool is not installed (Debian package `prometheus`; .ci/run "
                    "installs it): cannot check the alert rules")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60)


# ---- names and labels ---------------------------------------------------------------
def spec_for(exported: str):
    """The Spec behind an exported series name, or None."""
    if not exported.startswith(PREFIX):
        return None
    name = exported[len(PREFIX):]
    if name in SPECS:
        return SPECS[name]
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and SPECS.get(base) and SPECS[base].kind == "histogram":
            return SPECS[base]
    return None


def name_problems(expr: str) -> list[str]:
    """Unknown metric names, names without Ray's prefix, unknown labels in selectors and
    in by/on/ignoring/without clauses."""
    problems = []
    used = re.findall(r"(?<![\w:])(\w*tuneserve_\w+)", expr)
    if not used:
        problems.append(f"no tuneserve metric in {expr!r}")
    allowed = set(RAY_LABELS) | {"le"}
    for name in used:
        spec = spec_for(name)
        if spec is None:
            problems.append(f"{name} is not an exported name of services/core/metrics.py")
        else:
            allowed |= set(spec.labels)
    for name, selector in re.findall(r"(\w*tuneserve_\w+)\{([^}]*)\}", expr):
        spec = spec_for(name)
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            if spec and label not in set(spec.labels) | RAY_LABELS | {"le"}:
                problems.append(f"{name} has no label {label}")
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        for label in filter(None, (x.strip() for x in clause.split(","))):
            if label not in allowed:
                problems.append(f"label {label} in {expr!r} belongs to none of its metrics")
    for fn_label in re.findall(r"label_values\(\s*\w+\s*,\s*(\w+)\s*\)", expr):
        if fn_label not in allowed:
            problems.append(f"label_values of unknown label {fn_label}")
    return problems


def test_every_metric_and_label_in_rules_and_dashboard_is_defined():
    exprs = [r["expr"] for r in alert_rules().values()] + dashboard_exprs()
    assert len(exprs) >= 25
    problems = [p for e in exprs for p in name_problems(e)]
    assert problems == []


def test_the_name_check_can_fail():
    assert name_problems("rate(tuneserve_requests_total[5m])")  # Ray's prefix missing
    assert name_problems("rate(ray_tuneserve_request_total[5m])")  # misspelt
    assert name_problems("ray_tuneserve_requests_total_bucket")  # a counter has no buckets
    assert name_problems('sum(ray_tuneserve_batch_size_count{method="x"})')  # no such label
    assert name_problems("sum by (result) (rate(ray_tuneserve_requests_total[1m]))")
    assert name_problems("histogram_quantile(0.9, sum by (le) "
                         "(rate(ray_tuneserve_request_duration_seconds_bucket[5m])))") == []


def test_dashboard_shows_what_the_issue_asks_for():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    text = "\n".join(dashboard_exprs())
    for needle in [
        "sum by (method, code) (rate(ray_tuneserve_requests_total",  # requests by code
        'code!="OK"',  # errors
        "histogram_quantile(0.99, sum by (le, method) "
        "(rate(ray_tuneserve_request_duration_seconds_bucket",  # latency quantiles
        "ray_tuneserve_batch_size_bucket",
        "rate(ray_tuneserve_generated_tokens_total",  # tokens/s
        "sum by (model, version) (ray_tuneserve_model_info",  # the served version
        "sum by (model, result) (increase(ray_tuneserve_model_loads_total",
        "ray_tuneserve_train_loss",
        # the per-version view: a canary's share, errors and latency beside production's
        "sum by (model, version) (rate(ray_tuneserve_requests_total",
        "histogram_quantile(0.99, sum by (le, model, version, method) "
        "(rate(ray_tuneserve_request_duration_seconds_bucket",
        "max by (model, version) (ray_tuneserve_canary_percent",  # a rollout's steps
    ]:
        assert needle in text, needle
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


# ---- promtool ---------------------------------------------------------------------
def test_rules_pass_promtool_check_rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}))
    proc = run_promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout + proc.stderr


def test_dashboard_promql_parses(tmp_path):
    """Each dashboard query, with Grafana's variables filled in, as a recording rule:
    promtool then parses it as Prometheus would."""
    exprs = [e.replace("$__rate_interval", "1m").replace("$model", ".*")
             for e in dashboard_exprs() if not e.startswith("label_values")]
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run_promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_catches_a_broken_rule(tmp_path):
    groups = rule_groups()
    groups[0]["rules"][0]["expr"] = "sum by (model) (rate(ray_tuneserve_requests_total[5m])"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    assert run_promtool("check", "rules", str(path)).returncode != 0


def _series(name: str, values: str, **labels: str) -> dict:
    labels = {"WorkerId": "w1", "Component": "core_worker", **labels}
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def _fired(alert: str, eval_time: str, *models: str) -> dict:
    rule = alert_rules()[alert]
    return {"eval_time": eval_time, "alertname": alert, "exp_alerts": [
        {"exp_labels": {**rule["labels"], **({"model": m} if m else {})}} for m in models]}


def test_alerts_fire_on_the_exported_series(tmp_path):
    """promtool test rules: each alert fires on made-up series named and labelled as Ray
    exports them, and stays quiet where it should (client errors, healthy models)."""
    groups = rule_groups()
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # promtool would compare their rendered text
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    req = "ray_tuneserve_requests_total"
    lat = "ray_tuneserve_request_duration_seconds_bucket"
    info = "ray_tuneserve_model_info"
    serving = {
        "interval": "1m",
        "input_series": [
            # toy: 10% INTERNAL -> error ratio alert; "good": 10% INVALID_ARGUMENT only.
            _series(req, "0+90x40", model="toy", method="Classify", code="OK"),
            _series(req, "0+10x40", model="toy", method="Classify", code="INTERNAL"),
            _series(req, "0+90x40", model="good", method="Classify", code="OK"),
            _series(req, "0+10x40", model="good", method="Classify",
                    code="INVALID_ARGUMENT"),
            # toy's Classify takes 1-2.5 s; good's under 50 ms.
            *[_series(lat, f"0+{n}x40", model="toy", method="Classify", le=le)
              for le, n in [("0.05", 0), ("1.0", 0), ("2.5", 100), ("+Inf", 100)]],
            *[_series(lat, f"0+{n}x40", model="good", method="Classify", le=le)
              for le, n in [("0.05", 100), ("1.0", 100), ("2.5", 100), ("+Inf", 100)]],
            # toy v2 refused once at minute 10.
            _series("ray_tuneserve_model_loads_total", "1x9 2x30", model="toy",
                    result="refused"),
            _series("ray_tuneserve_model_loads_total", "1x40", model="toy",
                    result="loaded"),
            # toy's replica stops serving at minute 20 (0, then the series is gone);
            # good is served throughout.
            _series(info, "1x19 0x5 _x15", model="toy", version="v1"),
            _series(info, "1x40", model="good", version="v1"),
            # toy v3's rollout passes a step at minute 5 and is rolled back at 8; good
            # v2's passes its steps and is promoted.
            _series("ray_tuneserve_rollout_decisions_total", "_x5 1x35", model="toy",
                    version="v3", decision="step_passed"),
            _series("ray_tuneserve_rollout_decisions_total", "_x8 1x32", model="toy",
                    version="v3", decision="rolled_back"),
            _series("ray_tuneserve_rollout_decisions_total", "_x5 1x2 3x30", model="good",
                    version="v2", decision="step_passed"),
            _series("ray_tuneserve_rollout_decisions_total", "_x8 1x32", model="good",
                    version="v2", decision="promoted"),
        ],
        "alert_rule_test": [
            _fired("TuneserveHighErrorRatio", "5m"),  # not yet: `for: 10m`
            _fired("TuneserveHighErrorRatio", "20m", "toy"),
            _fired("TuneserveClassifyLatencyHigh", "20m", "toy"),
            _fired("TuneserveGenerateLatencyHigh", "20m"),
            _fired("TuneserveModelLoadFailures", "5m"),
            _fired("TuneserveModelLoadFailures", "12m", "toy"),
            _fired("TuneserveModelLoadFailures", "30m"),  # past the 15 m window
            _fired("TuneserveNoModelServed", "15m"),
            _fired("TuneserveNoModelServed", "30m", "toy"),
            _fired("TuneserveNothingServed", "30m"),
            _fired("TuneserveRolloutRolledBack", "7m"),
            {"eval_time": "20m", "alertname": "TuneserveRolloutRolledBack", "exp_alerts": [
                {"exp_labels": {**alert_rules()["TuneserveRolloutRolledBack"]["labels"],
                                "model": "toy", "version": "v3"}}]},
            _fired("TuneserveRolloutRolledBack", "39m"),  # past the 30 m window
        ],
    }
    nothing = {
        "interval": "1m",
        "input_series": [_series(info, "1x10", model="toy", version="v1")],
        "alert_rule_test": [_fired("TuneserveNothingServed", "20m"),
                            _fired("TuneserveNothingServed", "40m", None)],
    }
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m",
                                     "tests": [serving, nothing]}))
    proc = subprocess.run([promtool(), "test", "rules", tests.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docs_list_every_exported_metric():
    docs = (ROOT / "docs" / "observability.md").read_text()
    missing = [PREFIX + name for name in SPECS if f"`{PREFIX}{name}`" not in docs]
    assert missing == []
