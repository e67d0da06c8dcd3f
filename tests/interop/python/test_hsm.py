"""Tokens signed in a PKCS#11 token (a throwaway SoftHSM2 token), verified offline by PyJWT's
PyJWKClient against the JWKS, as an app that never calls Validate would: the public key the
sidecar read from the token is the one that verifies."""

import subprocess

import grpc
import jwt
import pytest

from conftest import BINARY, run_sidecar

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "py-hsm-pin-2718"


@pytest.fixture()
def hsm_env(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    env = {"SOFTHSM2_CONF": str(conf), "CRYPTOKI_LIB": MODULE, "PKCS11_PIN": PIN}
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "py", "--so-pin",
                    "so-pin-1", "--pin", PIN], env=env, check=True, capture_output=True)
    return env


@pytest.mark.parametrize("alg", ["ES256", "ES384", "PS256"])
def test_pyjwt_verifies_hsm_signed_tokens_against_the_jwks(stubs, hsm_env, tmp_path, alg):
    pb, pb_grpc = stubs
    entry = subprocess.run(
        [BINARY, "keys", "generate", "--pkcs11", "--alg", alg, "--kid", f"hsm-{alg}"],
        env=hsm_env, check=True, capture_output=True, text=True,
    ).stdout
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "keys.toml").write_text(entry.replace('"verify"', '"active"'))
    for api_addr, ops_addr in run_sidecar(["--keys-dir", str(keys)], hsm_env):
        with grpc.insecure_channel(api_addr) as channel:
            issued = pb_grpc.TokenServiceStub(channel).Issue(
                pb.IssueRequest(subject="py-user", audience=["shop"]))
        client = jwt.PyJWKClient(f"http://{ops_addr}/.well-known/jwks.json")
        signing_key = client.get_signing_key_from_jwt(issued.token)
        assert signing_key.key_id == f"hsm-{alg}"
        claims = jwt.decode(issued.token, signing_key.key, algorithms=[alg], audience="shop",
                            issuer="auth-sidecar")
        assert claims["sub"] == "py-user"
        header, payload, signature = issued.token.split(".")
        with pytest.raises(jwt.InvalidTokenError):
            jwt.decode(f"{header}.{payload[:-2]}AA.{signature}", signing_key.key,
                       algorithms=[alg], audience="shop")
