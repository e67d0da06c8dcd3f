"""Tokens every JOSE library accepts: a token the sidecar just issued is verified offline, against
the sidecar's JWKS, by PyJWT, Node's `jose` (with maxTokenAge, which checks that `iat` is in the
past) and `jsonwebtoken` (with maxAge), and Go's golang-jwt v4 into the typed StandardClaims
(int64 times) and RegisteredClaims. Rust's jsonwebtoken into `u64` times is in tests/keys.rs.
Each verifies at once after issue, many times: a NumericDate with a fraction of a second, or one
a moment in the future, fails there."""

import json
import os
import pathlib
import shutil
import subprocess

import grpc
import jwt
import pytest

from conftest import ROOT

TRIES = 20


@pytest.fixture(scope="session")
def go_verifier(tmp_path_factory):
    """The Go verifier, built offline against Debian's golang-github-golang-jwt-jwt-dev."""
    go = shutil.which("go")
    assert go, "go is missing: scripts/test installs golang-go"
    out = tmp_path_factory.mktemp("go") / "verify"
    env = dict(os.environ, GOPROXY="off", GOFLAGS="-mod=mod", GOTOOLCHAIN="local")
    env.setdefault("GOCACHE", str(tmp_path_factory.mktemp("gocache")))
    subprocess.run(
        [go, "build", "-o", str(out), "."],
        cwd=ROOT / "tests/interop/go", env=env, check=True,
    )
    return out


def test_fresh_tokens_verify_in_every_library(stubs, es256_sidecar, go_verifier, tmp_path):
    pb, pb_grpc = stubs
    _, api_addr, _ = es256_sidecar
    node = shutil.which("node")
    assert node, "node is missing: scripts/test installs nodejs"
    with grpc.insecure_channel(api_addr) as channel:
        api = pb_grpc.TokenServiceStub(channel)
        jwks = api.GetJwks(pb.GetJwksRequest()).jwks_json
        jwks_file = tmp_path / "jwks.json"
        jwks_file.write_text(jwks)
        key = jwt.PyJWKSet.from_json(jwks).keys[0].key
        for i in range(TRIES):
            token = api.Issue(pb.IssueRequest(subject=f"user-{i}")).token
            header, claims = jwt.get_unverified_header(token), jwt.decode(
                token, options={"verify_signature": False}
            )
            assert isinstance(claims["iat"], int) and isinstance(claims["exp"], int), claims
            assert isinstance(claims["auth_ms"], int), claims

            verified = jwt.decode(token, key, algorithms=[header["alg"]], issuer="auth-sidecar")
            assert verified["sub"] == f"user-{i}"

            out = subprocess.run(
                [node, str(ROOT / "tests/interop/node/verify.mjs"), str(jwks_file), token],
                capture_output=True, text=True,
            )
            assert out.returncode == 0, f"node refused a fresh token: {out.stderr}"
            assert json.loads(out.stdout) == {"jose": f"user-{i}", "jsonwebtoken": f"user-{i}"}

            out = subprocess.run(
                [str(go_verifier), str(jwks_file), token], capture_output=True, text=True
            )
            assert out.returncode == 0, f"golang-jwt refused a fresh token: {out.stderr}"
            assert json.loads(out.stdout) == {
                "standard": f"user-{i}", "registered": f"user-{i}"
            }
