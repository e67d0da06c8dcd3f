"""Tokens signed in a PKCS#11 token (a throwaway SoftHSM2 token), verified offline by PyJWT's
PyJWKClient against the JWKS, as an app that never calls Validate would: the public key the
sidecar read from the token is the one that verifies."""

import http.cookiejar
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request

import grpc
import jwt
import pytest

from conftest import BINARY, free_port, run_sidecar

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


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def admin_login(admin_addr, opener=None):
    """Logs in to the admin UI over HTTP: the status of the login POST."""
    opener = opener or urllib.request.build_opener(urllib.request.HTTPCookieProcessor(),
                                                   NoRedirect)
    with opener.open(f"http://{admin_addr}/login") as r:
        csrf = re.search(r'name="csrf" value="([^"]+)"', r.read().decode()).group(1)
    data = urllib.parse.urlencode({"username": "admin", "password": "hsm-admin-pw",
                                   "csrf": csrf}).encode()
    try:
        with opener.open(urllib.request.Request(f"http://{admin_addr}/login", data=data)) as r:
            return r.status, ""
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_admin_ui_logs_in_with_an_hsm_key_active_and_a_file_key_beside_it(hsm_env, tmp_path):
    """A key in a token cannot key the admin UI's cookie: the UI uses a file key of the set,
    and says what to add when there is none."""
    hsm_entry = subprocess.run(
        [BINARY, "keys", "generate", "--pkcs11", "--alg", "ES256", "--kid", "hsm-ui"],
        env=hsm_env, check=True, capture_output=True, text=True,
    ).stdout.replace('"verify"', '"active"')
    keys = tmp_path / "keys"
    keys.mkdir()
    file_entry = subprocess.run(
        [BINARY, "keys", "generate", "--alg", "ES256", "--kid", "file-ui", "--dir", str(keys)],
        check=True, capture_output=True, text=True,
    ).stdout
    env = dict(hsm_env, ADMIN_GUI_PASSWORD="hsm-admin-pw")
    for manifest, expected in [(hsm_entry, 403), (hsm_entry + "\n" + file_entry, 303)]:
        (keys / "keys.toml").write_text(manifest)
        port = free_port()
        args = ["--keys-dir", str(keys), "--admin-listen", f"127.0.0.1:{port}"]
        for _ in run_sidecar(args, env):
            jar = http.cookiejar.CookieJar()
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar),
                                                 NoRedirect)
            status, page = admin_login(f"127.0.0.1:{port}", opener)
            assert status == expected, (status, page)
            if expected == 403:
                assert "PKCS#11" in page, page
                continue
            # Logged in, it can act: the forms' CSRF token is keyed as the cookie is (it was
            # keyed under 32 zero bytes, and every POST was 403).
            with opener.open(f"http://127.0.0.1:{port}/") as r:
                csrf = re.search(r'name="csrf" value="([^"]+)"', r.read().decode()).group(1)
            cookie = next(f"{c.name}={c.value}" for c in jar)
            data = urllib.parse.urlencode({"csrf": csrf}).encode()
            try:
                opener.open(urllib.request.Request(f"http://127.0.0.1:{port}/logout", data=data))
                raise AssertionError("logout answered 2xx, not a redirect")
            except urllib.error.HTTPError as e:
                assert e.code == 303 and e.headers["Location"] == "/login", e.code
            try:
                bare = urllib.request.build_opener(NoRedirect)
                bare.open(urllib.request.Request(f"http://127.0.0.1:{port}/",
                                                 headers={"Cookie": cookie}))
                raise AssertionError("the logged-out cookie still works")
            except urllib.error.HTTPError as e:
                assert e.code == 303, e.code
