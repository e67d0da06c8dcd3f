"""A real NGINX (Debian nginx, auth_request) and a real Caddy (Debian caddy, forward_auth), each
running its example from examples/ unchanged but for ports, in front of an app that echoes
the headers it got, with the sidecar on a real Redis deciding every request. Traefik is not on
this machine: its example's middlewares are read, and the sidecar is sent the requests
Traefik's ForwardAuth sends; what Traefik does with the answers is its documented behaviour."""

import http.client
import json
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time

import jwt
import pytest
import yaml
from google.protobuf import duration_pb2, struct_pb2

import grpc
from conftest import ROOT, SECRET, free_port, run_sidecar, start_redis
from test_envoy import Echo, bearer

SIDECAR_ARGS = ["--rate-limit", "admin=3/1h", "--authz-claim-header", "tenant=x-auth-tenant",
                "--leeway", "0s"]


def with_ports(text, proxy, sidecar, app):
    """The example with its three ports replaced, and nothing else."""
    for old, new in (("8000", proxy), ("50051", sidecar), ("8080", app)):
        text, count = re.subn(rf"(?<=127\.0\.0\.1:){old}\b", str(new), text)
        assert count > 0, f"port {old} not in the example"
    return text


def get(port, path, headers, method="GET"):
    """`headers` is a dict or a list of pairs (to repeat one). (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for name, value in headers.items() if isinstance(headers, dict) else headers:
        conn.putheader(name, value)
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def wait_port(port, proc, log):
    deadline = time.time() + 20
    while True:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).connect()
            return
        except OSError:
            assert proc.poll() is None, pathlib.Path(log).read_text()
            assert time.time() < deadline, "the proxy did not start"
            time.sleep(0.05)


def start_nginx(tmp, port, sidecar_port, app_port):
    for name in ("auth_sidecar_subrequest", "auth_sidecar_identity"):
        shutil.copy(ROOT / "examples/nginx" / name, tmp / name)
    conf = tmp / "nginx.conf"
    conf.write_text(with_ports((ROOT / "examples/nginx/nginx.conf").read_text(),
                               port, sidecar_port, app_port))
    log = tmp / "proxy.log"
    proc = subprocess.Popen(
        ["nginx", "-p", str(tmp), "-c", str(conf),
         "-g", f"daemon off; pid {tmp}/nginx.pid; error_log {log};"],
        stdout=subprocess.DEVNULL, stderr=open(log, "a"))
    wait_port(port, proc, log)
    return proc


def start_caddy(tmp, port, sidecar_port, app_port):
    conf = tmp / "Caddyfile"
    conf.write_text(with_ports((ROOT / "examples/caddy/Caddyfile").read_text(),
                               port, sidecar_port, app_port))
    log = tmp / "proxy.log"
    env = {**os.environ, "HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp), "XDG_DATA_HOME": str(tmp)}
    proc = subprocess.Popen(["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    wait_port(port, proc, log)
    return proc


class Stack:
    """Redis, the sidecar on it, the echo app and the proxy in front."""

    def __init__(self, stubs, proxy):
        self.pb, self.rpc = stubs
        self.proxy = proxy

    def __enter__(self):
        self.redis, redis_port = start_redis()
        self.app = Echo()
        self.tmp = pathlib.Path(tempfile.mkdtemp())
        self._sidecar = run_sidecar(
            ["--storage", "redis", "--redis-url", f"redis://127.0.0.1:{redis_port}",
             *SIDECAR_ARGS],
            {"AUTH_JWT_SECRET": SECRET},
        )
        self.api, _ = next(self._sidecar)
        self.channel = grpc.insecure_channel(self.api)
        self.stub = self.rpc.TokenServiceStub(self.channel)
        self.port = free_port()
        start = start_nginx if self.proxy == "nginx" else start_caddy
        self.proc = start(self.tmp, self.port, int(self.api.rsplit(":", 1)[1]),
                          self.app.server_address[1])
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)
        self.channel.close()
        next(self._sidecar, None)
        if self.redis.poll() is None:
            self.redis.kill()
        self.redis.wait()
        self.app.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def get(self, path, headers, method="GET"):
        return get(self.port, path, headers, method)

    def issue(self, subject, ttl=None, audience=(), **claims):
        struct = struct_pb2.Struct()
        struct.update(claims)
        req = self.pb.IssueRequest(subject=subject, claims=struct, audience=list(audience))
        if ttl is not None:
            req.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl))
        return self.stub.Issue(req).token


@pytest.fixture(scope="module", params=["nginx", "caddy"])
def stack(stubs, request):
    with Stack(stubs, request.param) as s:
        yield s


def test_a_valid_token_reaches_the_app_with_its_identity_and_never_the_clients(stack):
    token = stack.issue("alice", tenant="acme")
    before = stack.app.hits
    status, _, body = stack.get(
        "/things", {**bearer(token), "x-auth-subject": "mallory", "x-auth-tenant": "evil"},
        method="POST")
    assert status == 200, body
    seen = json.loads(body)
    assert seen["x-auth-subject"] == "alice"
    assert seen["x-auth-tenant"] == "acme"
    assert stack.app.hits == before + 1
    # A token without the claim: the client's own header does not get through either. The
    # sidecar answers it empty; NGINX then sends none, Caddy sends it empty.
    status, _, body = stack.get("/things", {**bearer(stack.issue("bob")), "x-auth-tenant": "evil"})
    assert status == 200, body
    seen = json.loads(body)
    assert seen["x-auth-subject"] == "bob"
    assert seen.get("x-auth-tenant", "") == "", seen
    status, _, body = stack.get("/orders/1", bearer(stack.issue("bob", audience=["orders"])))
    assert status == 200, body


def test_forged_expired_revoked_wrong_audience_and_refresh_tokens_never_reach_the_app(stack):
    good = stack.issue("carol")
    head, payload, sig = good.split(".")
    forged = head + "." + payload + "." + ("A" if sig[0] != "A" else "B") + sig[1:]
    claims = jwt.decode(good, options={"verify_signature": False})
    other_key = jwt.encode(claims, "another-secret-0123456789abcdefghijkl", algorithm="HS256")
    expired = stack.issue("carol", ttl=1)
    revoked = stack.issue("carol")
    stack.stub.Revoke(stack.pb.RevokeRequest(token=revoked))
    refresh = stack.stub.Issue(stack.pb.IssueRequest(
        subject="carol", kind=stack.pb.TOKEN_KIND_REFRESH)).token
    time.sleep(1.1)
    before = stack.app.hits
    for path, token in [("/things", forged), ("/things", other_key), ("/things", expired),
                        ("/things", revoked), ("/orders/1", good), ("/things", refresh)]:
        status, headers, body = stack.get(path, bearer(token))
        assert status == 401, (path, status, body)
        assert headers["www-authenticate"].startswith('Bearer error="invalid_token"'), headers
    status, headers, _ = stack.get("/things", {})
    assert (status, headers["www-authenticate"]) == (401, "Bearer")
    # Two tokens at once: 400. NGINX refuses a repeated Authorization itself ("client sent
    # duplicate header line"); Caddy passes both on, and the sidecar says invalid_request.
    status, headers, body = stack.get(
        "/things", [("authorization", f"Bearer {good}"), ("authorization", f"Bearer {good}")])
    assert status == 400, status
    if stack.proxy == "caddy":
        assert 'error="invalid_request"' in headers["www-authenticate"], (headers, body)
    assert stack.app.hits == before


def test_a_missing_claim_is_403_and_the_rate_limit_429_with_retry_after(stack):
    user = stack.issue("dave", role="user")
    before = stack.app.hits
    status, headers, _ = stack.get("/admin/x", bearer(user))
    assert status == 403
    assert headers["www-authenticate"].startswith('Bearer error="insufficient_scope"')
    admin = stack.issue(f"erin-{stack.proxy}", role="admin")
    for _ in range(3):
        status, _, body = stack.get("/admin/x", bearer(admin))
        assert status == 200, body
    status, headers, _ = stack.get("/admin/x", bearer(admin))
    assert status == 429
    # 3 an hour: the next one in 20 minutes.
    assert 1100 <= int(headers["retry-after"]) <= 1200, headers
    assert stack.app.hits == before + 3


def test_redis_down_is_a_server_error_and_never_the_app(stubs):
    # A stack of its own per proxy: Redis dies here.
    for proxy in ("nginx", "caddy"):
        with Stack(stubs, proxy) as s:
            token = s.issue("frank")
            assert s.get("/things", bearer(token))[0] == 200
            s.redis.kill()
            s.redis.wait()
            before = s.app.hits
            # The view may answer from what it holds for up to a second after the feed drops.
            deadline = time.time() + 10
            while (status := s.get("/things", bearer(token))[0]) == 200:
                assert time.time() < deadline
                time.sleep(0.05)
            hits = s.app.hits
            for _ in range(3):
                status, _, _ = s.get("/things", bearer(token))
                assert 500 <= status < 600, (proxy, status)
            assert s.app.hits == hits
            assert hits - before <= 25


def traefik_middlewares():
    config = yaml.safe_load((ROOT / "examples/traefik/dynamic.yml").read_text())
    return {name: m["forwardAuth"] for name, m in config["http"]["middlewares"].items()}


def test_traefik_forward_auth_requests_get_the_answers_traefik_acts_on(stubs):
    """What Traefik's ForwardAuth does, per its documentation and source: a GET to `address`
    with the client's headers and X-Forwarded-*; a 2xx passes the request on with the
    `authResponseHeaders` copied (after deleting the client's); anything else goes back to the
    client as answered."""
    middlewares = traefik_middlewares()
    redis, redis_port = start_redis()
    sidecar = run_sidecar(["--storage", "redis", "--redis-url", f"redis://127.0.0.1:{redis_port}",
                           *SIDECAR_ARGS], {"AUTH_JWT_SECRET": SECRET})
    api, _ = next(sidecar)
    try:
        pb, rpc = stubs
        stub = rpc.TokenServiceStub(grpc.insecure_channel(api))

        def issue(subject, **claims):
            struct = struct_pb2.Struct()
            struct.update(claims)
            return stub.Issue(pb.IssueRequest(subject=subject, claims=struct)).token

        def forward(middleware, token, uri="/things?page=2", method="POST"):
            m = middlewares[middleware]
            address = m["address"].replace("127.0.0.1:50051", api)
            target = address.split(api, 1)[1]
            headers = {
                "authorization": f"Bearer {token}",
                "x-auth-subject": "mallory",
                "x-forwarded-method": method,
                "x-forwarded-proto": "http",
                "x-forwarded-host": "app.example.com",
                "x-forwarded-uri": uri,
                "x-forwarded-for": "203.0.113.7",
                "user-agent": "curl/8",
            }
            status, got, body = get(int(api.rsplit(":", 1)[1]), target, headers)
            copied = {h.lower(): got.get(h.lower()) for h in m["authResponseHeaders"]}
            return status, got, copied, body

        status, _, copied, _ = forward("auth-sidecar", issue("alice", tenant="acme"))
        assert status == 200
        assert copied == {"x-auth-subject": "alice", "x-auth-tenant": "acme"}
        status, _, copied, _ = forward("auth-sidecar", issue("bob"))
        # Sent empty: Traefik sets what the answer holds, so never the client's own.
        assert (status, copied) == (200, {"x-auth-subject": "bob", "x-auth-tenant": ""})
        status, headers, _, _ = forward("auth-sidecar-orders", issue("bob"))
        assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]
        status, headers, _, body = forward("auth-sidecar-admin", issue("carol", role="user"))
        assert status == 403 and json.loads(body)["error"] == "insufficient_scope"
        admin = issue("dave", role="admin")
        assert [forward("auth-sidecar-admin", admin)[0] for _ in range(4)] == [200, 200, 200, 429]
        status, headers, _, _ = forward("auth-sidecar-admin", admin)
        assert status == 429 and int(headers["retry-after"]) > 0
    finally:
        next(sidecar, None)
        redis.kill()
        redis.wait()
