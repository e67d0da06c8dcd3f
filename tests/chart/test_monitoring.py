"""The chart's monitoring objects (PodMonitor, PrometheusRule, Grafana dashboard ConfigMap):
rendered only when enabled, with the fields the Prometheus Operator and Grafana's sidecar read,
and the alerts checked and unit-tested by promtool (Debian's prometheus package) as rendered.
tests/interop/python/test_monitoring.py runs them in a real Prometheus against real sidecars."""

import json
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

from test_chart import CHART, ROOT, helm, kinds, render

ALL_ON = ["--set", "metrics.podMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true",
          "--set", "metrics.dashboard.enabled=true"]
MONITORING_KINDS = {"PodMonitor", "PrometheusRule"}


def readme_anchors():
    text = (ROOT / "README.md").read_text()
    return {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_nothing_renders_unless_enabled_and_the_default_render_is_unchanged():
    default = render()
    off = render("--set", "metrics.podMonitor.enabled=false",
                 "--set", "metrics.prometheusRule.enabled=false",
                 "--set", "metrics.dashboard.enabled=false")
    assert default == off
    assert not {d["kind"] for d in default} & MONITORING_KINDS
    assert not [d for d in default if d["kind"] == "ConfigMap"]
    on = render(*ALL_ON)
    assert {d["kind"] for d in on} - {d["kind"] for d in default} == MONITORING_KINDS | {"ConfigMap"}
    # Nothing else changes when they are on.
    assert [d for d in on if d["kind"] not in MONITORING_KINDS | {"ConfigMap"}] == default


def test_helm_lint_strict_passes_with_every_monitoring_object():
    result = helm("lint", "--strict", str(CHART), *ALL_ON, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_pod_monitor_scrapes_the_ops_port_of_this_charts_pods():
    docs = render(*ALL_ON, "--set", "metrics.podMonitor.labels.release=kube-prometheus",
                  "--set", "metrics.podMonitor.interval=15s")
    [monitor] = kinds(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    [deployment] = kinds(docs, "Deployment")
    pod = deployment["spec"]["template"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["path"], endpoint["interval"]) == ("/metrics", "15s")
    sidecar = next(c for c in pod["spec"]["containers"] if c["name"] == "auth-sidecar")
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    ops = next(int(e["value"].rsplit(":", 1)[1]) for e in sidecar["env"]
               if e["name"] == "AUTH_OPS_LISTEN")
    assert ports[endpoint["port"]] == ops, "the PodMonitor's port is not the ops listener's"


def rendered_rules(tmp_path, *args):
    docs = render("--set", "metrics.prometheusRule.enabled=true", *args)
    [rule] = kinds(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return rule, path


def test_promtool_checks_the_rendered_rules_and_every_alert_fires_and_holds_as_tested(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/test installs Debian's prometheus package"
    rule, path = rendered_rules(tmp_path)
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    shutil.copy(ROOT / "tests/chart/alerts_test.yaml", tmp_path)
    test = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    # Every alert has a unit test, a summary, a description and a runbook that exists.
    tested = set(re.findall(r"alertname: (\w+)", (ROOT / "tests/chart/alerts_test.yaml").read_text()))
    anchors = readme_anchors()
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(alerts) == 9
    for alert in alerts:
        assert alert["alert"] in tested, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        anchor = alert["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert anchor in anchors, f"README has no runbook #{anchor}"


def test_each_alert_takes_its_for_threshold_and_severity_from_values_or_is_left_out(tmp_path):
    # A number from a values file: `--set` would make 0.2 a string, which the schema refuses.
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"metrics": {"prometheusRule": {"alerts": {
        "AuthSidecarUnavailableAnswers": {"threshold": 0.2}}}}}))
    rule, _ = rendered_rules(
        tmp_path,
        "-f", str(values),
        "--set", "metrics.prometheusRule.alerts.AuthSidecarBackendDown.for=3m",
        "--set", "metrics.prometheusRule.alerts.AuthSidecarLockouts.severity=page",
        "--set", "metrics.prometheusRule.alerts.AuthSidecarMixedVersions.enabled=false",
        "--set", "metrics.prometheusRule.labels.release=kube-prometheus")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    assert alerts["AuthSidecarBackendDown"]["for"] == "3m"
    assert alerts["AuthSidecarUnavailableAnswers"]["expr"].endswith("> 0.2")
    assert alerts["AuthSidecarLockouts"]["labels"]["severity"] == "page"
    assert "AuthSidecarMixedVersions" not in alerts
    assert all("$threshold" not in a["expr"] for a in alerts.values())


def test_the_dashboard_is_a_configmap_grafanas_sidecar_loads():
    docs = render(*ALL_ON, "--set", "metrics.dashboard.annotations.grafana_folder=Auth")
    [config] = [d for d in docs if d["kind"] == "ConfigMap"]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config["metadata"]["annotations"]["grafana_folder"] == "Auth"
    [(name, text)] = config["data"].items()
    assert name.endswith(".json")
    dashboard = json.loads(text)
    assert dashboard == json.loads((CHART / "files/dashboard.json").read_text())
    assert all(t["expr"] for p in dashboard["panels"] for t in p["targets"])
