"""OAuth 2.0 token introspection (RFC 7662) and revocation (RFC 7009) from third-party clients:
Authlib's requests client (Python) and openid-client (npm, through discovery), against two
sidecars on one real Redis."""

import json
import subprocess
import time

import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session
from google.protobuf import struct_pb2

import grpc
from conftest import BINARY, ROOT, SECRET, free_port, run_sidecar, start_redis

CLIENT, CLIENT_SECRET = "resource-server", "rs-secret-that-is-long-enough"


def hash_secret(secret):
    return subprocess.run([BINARY, "hash-password"], input=secret + "\n", check=True,
                          capture_output=True, text=True).stdout.strip()


class Pair:
    """Two sidecars on one Redis, each serving the OAuth endpoints to one client, with a
    discovery document that lists them."""

    def __init__(self, stubs):
        self.pb, self.rpc = stubs

    def __enter__(self):
        self.redis, port = start_redis()
        phc = hash_secret(CLIENT_SECRET)
        self.nodes, self.runs = [], []
        for _ in range(2):
            api_port, ops_port = free_port(), free_port()
            ops = f"http://127.0.0.1:{ops_port}"
            run = run_sidecar(
                ["--storage", "redis", "--redis-url", f"redis://127.0.0.1:{port}",
                 "--issuer", ops, "--public-url", ops,
                 "--oauth-public-url", f"http://127.0.0.1:{api_port}",
                 "--oauth-client", f"{CLIENT}:{phc}", "--oauth-client-limit", "3/1h:lockout=1h"],
                {"AUTH_JWT_SECRET": SECRET}, listen=f"127.0.0.1:{api_port}", ops=f"127.0.0.1:{ops_port}")
            api, _ = next(run)
            self.runs.append(run)
            self.nodes.append((api, ops))
        self.stub = self.rpc.TokenServiceStub(grpc.insecure_channel(self.nodes[0][0]))
        return self

    def __exit__(self, *exc):
        for run in self.runs:
            next(run, None)
        self.redis.kill()
        self.redis.wait()

    def url(self, node, path):
        return f"http://{self.nodes[node][0]}/oauth2/{path}"

    def issue(self, subject, refresh=False, **claims):
        struct = struct_pb2.Struct()
        struct.update(claims)
        kind = self.pb.TOKEN_KIND_REFRESH if refresh else self.pb.TOKEN_KIND_ACCESS
        return self.stub.Issue(self.pb.IssueRequest(
            subject=subject, claims=struct, audience=["orders"], kind=kind)).token


@pytest.fixture(scope="module")
def pair(stubs):
    with Pair(stubs) as p:
        yield p


def session(secret=CLIENT_SECRET):
    # Authlib's default for a client with a secret is client_secret_basic.
    return OAuth2Session(CLIENT, secret)


def test_authlib_introspects_and_revokes_across_nodes(pair):
    token = pair.issue("alice", scope=["read", "write"], tenant="acme")
    answer = session().introspect_token(pair.url(0, "introspect"), token=token).json()
    assert answer["active"] is True
    assert answer["sub"] == "alice" and answer["aud"] == "orders"
    assert answer["scope"] == "read write" and answer["tenant"] == "acme"
    assert answer["token_type"] == "Bearer"
    for claim in ("exp", "iat", "jti", "iss"):
        assert claim in answer, claim
    resp = session().revoke_token(pair.url(1, "revoke"), token=token,
                                  token_type_hint="access_token")
    assert resp.status_code == 200
    # Revoked on node 1: inactive on node 0, through the same view as Validate.
    deadline = time.time() + 2
    while session().introspect_token(pair.url(0, "introspect"), token=token).json()["active"]:
        assert time.time() < deadline, "still active on the other node"
        time.sleep(0.02)
    assert session().introspect_token(pair.url(0, "introspect"), token=token).json() == {
        "active": False}
    # Anything else is inactive too, without a reason.
    for junk in ("junk", token[:-3] + "abc", "a" * 9000):
        resp = session().introspect_token(pair.url(0, "introspect"), token=junk)
        assert (resp.status_code, resp.json()) == (200, {"active": False})
    # An unknown token revokes as nothing, with 200.
    assert session().revoke_token(pair.url(0, "revoke"), token="junk").status_code == 200


def test_a_revoked_refresh_token_takes_its_family_with_it(pair):
    refresh = pair.issue("bob", refresh=True)
    pair_of = pair.stub.Refresh(pair.pb.RefreshRequest(refresh_token=refresh))
    access, next_refresh = pair_of.access.token, pair_of.refresh.token
    assert session().introspect_token(pair.url(0, "introspect"), token=access).json()["active"]
    # A refresh token is active only to a caller that asks about refresh tokens, so that a
    # resource server that reads `active` alone never takes one for an access token.
    answer = session().introspect_token(pair.url(0, "introspect"), token=next_refresh).json()
    assert answer == {"active": False}
    answer = session().introspect_token(pair.url(0, "introspect"), token=next_refresh,
                                        token_type_hint="refresh_token").json()
    assert (answer["active"], answer["token_type"]) == (True, "refresh_token")
    resp = session().revoke_token(pair.url(1, "revoke"), token=next_refresh,
                                  token_type_hint="refresh_token")
    assert resp.status_code == 200
    deadline = time.time() + 2
    while session().introspect_token(pair.url(0, "introspect"), token=access).json()["active"]:
        assert time.time() < deadline, "the family's access token is still active"
        time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as refused:
        pair.stub.Refresh(pair.pb.RefreshRequest(refresh_token=next_refresh))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_openid_client_finds_the_endpoints_by_discovery_and_uses_them(pair):
    token = pair.issue("carol")
    out = subprocess.run(
        ["node", str(ROOT / "tests/interop/node/oauth.mjs"), pair.nodes[0][1], CLIENT,
         CLIENT_SECRET, token],
        check=True, capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    seen = json.loads(out)
    assert seen["introspection_endpoint"] == pair.url(0, "introspect")
    assert seen["revocation_endpoint"] == pair.url(0, "revoke")
    assert seen["before"]["active"] is True and seen["before"]["sub"] == "carol"
    assert seen["after"] == {"active": False}
    assert seen["wrongSecret"] == {"status": 401, "name": "WWWAuthenticateChallengeError", "scheme": "basic"}, seen["wrongSecret"]


def test_a_wrong_or_missing_secret_is_invalid_client_and_locks_out_on_every_node(stubs):
    with Pair(stubs) as p:
        token = p.issue("dave")
        url0, url1 = p.url(0, "introspect"), p.url(1, "introspect")
        resp = requests.post(url0, data={"token": token}, timeout=10)
        assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"
        assert resp.headers["www-authenticate"].startswith("Basic")
        for n in range(3):
            resp = session("wrong").introspect_token([url0, url1][n % 2], token=token)
            assert resp.status_code == 401, resp.text
        # Locked out on both nodes, the right secret too, until the lockout ends.
        for url in (url0, url1):
            resp = session().introspect_token(url, token=token)
            assert resp.status_code == 429, resp.text
            assert int(resp.headers["retry-after"]) > 3000
        assert session().revoke_token(p.url(1, "revoke"), token=token).status_code == 429
