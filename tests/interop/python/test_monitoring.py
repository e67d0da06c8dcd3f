"""The chart's alerts and dashboard in a real Prometheus (Debian's prometheus, 2.42) that
scrapes two real sidecars on one real Redis: the rules as the chart renders them (with `for`
cut short through values), alerts that fire and resolve as the cluster breaks and mends, and
every dashboard query answered with data once traffic has flowed."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import yaml

from conftest import ROOT, SECRET, free_port, run_sidecar

HELM = os.environ.get("HELM_BIN", str(ROOT / "node_modules/.bin/helm"))
MFA_KEY = "mon-1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
ALERTS = ["AuthSidecarBackendDown", "AuthSidecarNodesDisagree", "AuthSidecarRevocationViewDown",
          "AuthSidecarUnavailableAnswers", "AuthSidecarSignerDown", "AuthSidecarForgedTokens",
          "AuthSidecarLockouts", "AuthSidecarMemoryNearLimit", "AuthSidecarMixedVersions"]


def redis_on(port):
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            assert time.time() < deadline, "redis-server did not start"
            time.sleep(0.05)


def rendered_rules(path):
    """The chart's PrometheusRule, every `for` cut to 2s, as a Prometheus rule file."""
    sets = []
    for alert in ALERTS:
        sets += ["--set", f"metrics.prometheusRule.alerts.{alert}.for=2s"]
    out = subprocess.run([HELM, "template", "rel", str(ROOT / "charts/auth-sidecar"),
                          "--set", "metrics.prometheusRule.enabled=true", *sets],
                         check=True, capture_output=True, text=True).stdout
    [rule] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "PrometheusRule"]
    path.write_text(yaml.safe_dump(rule["spec"]))


class Prometheus:
    def __init__(self, tmp, targets, rules):
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{
                "job_name": "shop/web",
                "static_configs": [
                    {"targets": [ops], "labels": {"namespace": "shop", "pod": pod}}
                    for pod, ops in targets],
            }],
        }
        path = tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "w"))
        deadline = time.time() + 30
        while True:
            try:
                self.get("/-/ready")
                break
            except OSError:
                assert self.proc.poll() is None, (tmp / "prometheus.log").read_text()
                assert time.time() < deadline, "prometheus did not start"
                time.sleep(0.2)

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read()

    def query(self, expr):
        body = json.loads(self.get("/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def alerts(self, state="firing"):
        body = json.loads(self.get("/api/v1/alerts"))
        return {a["labels"]["alertname"] for a in body["data"]["alerts"] if a["state"] == state}

    def wait(self, what, done, seconds=60):
        deadline = time.time() + seconds
        while not done():
            assert time.time() < deadline, f"timed out waiting until {what}"
            time.sleep(0.5)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def traffic(stubs, mfa_stubs, api):
    """A little of everything the dashboard shows, errors included."""
    pb, rpc = stubs
    stub = rpc.TokenServiceStub(grpc.insecure_channel(api))
    token = stub.Issue(pb.IssueRequest(subject="alice")).token
    for _ in range(5):
        stub.Validate(pb.ValidateRequest(token=token))
        stub.Validate(pb.ValidateRequest(token=token[:-4] + "AAAA"))
        stub.CheckRateLimit(pb.CheckRateLimitRequest(policy="api", key="alice"))
    with pytest.raises(grpc.RpcError):
        stub.Issue(pb.IssueRequest(subject=""))
    mfa_pb, mfa_rpc = mfa_stubs
    mfa = mfa_rpc.MfaServiceStub(grpc.insecure_channel(api))
    # Not enrolled: an answer, counted as an outcome.
    mfa.VerifyTotp(mfa_pb.VerifyTotpRequest(subject="alice", code="123456"))


def test_alerts_fire_and_resolve_and_every_panel_has_data(stubs, mfa_stubs):
    tmp = pathlib.Path(tempfile.mkdtemp())
    redis_port = free_port()
    redis = redis_on(redis_port)
    args = ["--storage", "redis", "--redis-url", f"redis://127.0.0.1:{redis_port}",
            "--rate-limit", "api=100/1s", "--cluster-heartbeat", "500ms",
            "--backend-check-interval", "500ms", "--backend-timeout", "300ms"]
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_MFA_KEY": MFA_KEY}
    runs = [run_sidecar(args, env) for _ in range(2)]
    nodes = [next(run) for run in runs]
    rules = tmp / "rules.yaml"
    rendered_rules(rules)
    prom = Prometheus(tmp, [(f"web-{i}", ops) for i, (_, ops) in enumerate(nodes)], rules)
    odd = None
    try:
        for api, _ in nodes:
            traffic(stubs, mfa_stubs, api)
        # Every panel's query, as Grafana would send it, returns data.
        dashboard = json.loads((ROOT / "charts/auth-sidecar/files/dashboard.json").read_text())
        exprs = {t["expr"].replace("$__rate_interval", "1m")
                 for p in dashboard["panels"] for t in p["targets"]}
        assert len(exprs) >= 12
        deadline = time.time() + 60
        while missing := [e for e in sorted(exprs) if not prom.query(e)]:
            assert time.time() < deadline, f"dashboard queries without data: {missing}"
            time.sleep(0.5)
        assert prom.alerts() == set()

        # A node with another secret: every node reports the disagreement on keys.
        odd = run_sidecar(args, {**env, "AUTH_JWT_SECRET": SECRET + "-other"})
        next(odd)
        prom.wait("AuthSidecarNodesDisagree fires",
                  lambda: "AuthSidecarNodesDisagree" in prom.alerts())
        # Redis killed: the backend is down on both nodes.
        redis.kill()
        redis.wait()

        def backend_down():
            alerts = json.loads(prom.get("/api/v1/alerts"))["data"]["alerts"]
            return [a for a in alerts if a["labels"]["alertname"] == "AuthSidecarBackendDown"
                    and a["state"] == "firing"]

        prom.wait("AuthSidecarBackendDown fires for both pods",
                  lambda: {a["labels"]["pod"] for a in backend_down()} == {"web-0", "web-1"})
        firing = backend_down()[0]
        assert firing["annotations"]["runbook_url"].endswith("#authsidecarbackenddown")
        assert "redis" in firing["annotations"]["summary"]
        # Both back: Redis on its port, the odd node gone.
        redis = redis_on(redis_port)
        next(odd, None)
        odd = None
        prom.wait("every alert resolves", lambda: prom.alerts() == set()
                  and prom.alerts("pending") == set(), seconds=90)
    finally:
        if odd is not None:
            next(odd, None)
        prom.stop()
        for run in runs:
            next(run, None)
        redis.kill()
        redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)
