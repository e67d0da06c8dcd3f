"""Keys in AWS KMS (`source = "aws-kms"`), against an emulator: moto's KMS server
(`kms_emulator.py`), since there is no AWS here, with the official AWS SDK for Rust on the
sidecar's side and boto3 making the keys. A counting proxy in front of the emulator sees every
call the sidecar makes, and throttles or delays `Sign` as a busy KMS does."""

import base64
import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import load_der_public_key
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import BINARY, run_sidecar
from kms_emulator import Emulator
from test_metrics import scrape

# Credentials of the kind the AWS chain reads from the environment; none may reach a log.
ACCESS_KEY = "AKIAKMSTESTDONOTLOG7"
SECRET_KEY = "kms-test-secret-key-do-not-log-0123456789"
SESSION_TOKEN = "kms-test-session-token-do-not-log-IQoJb3JpZ2luX2Vj"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_SESSION_TOKEN": SESSION_TOKEN,
    # No instance metadata here: the chain must not wait for it.
    "AWS_EC2_METADATA_DISABLED": "true",
}
SPECS = {"ES256": "ECC_NIST_P256", "ES384": "ECC_NIST_P384", "RS256": "RSA_2048",
         "PS256": "RSA_3072"}


@pytest.fixture(scope="module")
def kms():
    emulator = Emulator()
    yield emulator
    emulator.close()


@pytest.fixture()
def proxy(kms):
    kms.proxy.reset()
    yield kms.proxy
    kms.proxy.reset()


def kms_entry(kms, kid, alg, key_id, state="active", **extra):
    lines = [
        "[[key]]", f'kid = "{kid}"', f'alg = "{alg}"', 'source = "aws-kms"',
        f'key_id = "{key_id}"', f'region = "{kms.REGION}"',
        f'endpoint_url = "{kms.proxy.url}"', f'state = "{state}"',
    ]
    for name, value in extra.items():
        lines.append(f"{name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def file_entry(keys, kid, state):
    entry = subprocess.run(
        [BINARY, "keys", "generate", "--alg", "ES256", "--kid", kid, "--dir", str(keys)],
        check=True, capture_output=True, text=True,
    ).stdout
    return entry.replace('"verify"', f'"{state}"') + "\n"


def keys_dir(tmp_path, *entries):
    """A new keys directory, with a manifest of `entries` when any are given."""
    keys = tmp_path / "keys"
    keys.mkdir()
    if entries:
        write_manifest(keys, *entries)
    return keys


def write_manifest(keys, *entries):
    """Replaces the manifest at once (a rename), as a Secret's update does."""
    tmp = keys / ".keys.toml.tmp"
    tmp.write_text("\n".join(entries))
    os.replace(tmp, keys / "keys.toml")


def health(api):
    with grpc.insecure_channel(api) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5).status


def wait_for(predicate, seconds, what):
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.05)


def jwks(ops):
    with urllib.request.urlopen(f"http://{ops}/.well-known/jwks.json", timeout=5) as r:
        return {k["kid"]: k for k in json.load(r)["keys"]}


@pytest.mark.parametrize("alg", ["ES256", "ES384", "RS256", "PS256"])
def test_tokens_verify_with_pyjwt_against_the_jwks_and_kms_public_key(stubs, kms, proxy,
                                                                     tmp_path, alg):
    pb, pb_grpc = stubs
    key_id = kms.create_key(SPECS[alg])
    kms.client.create_alias(AliasName=f"alias/auth-{alg.lower()}", TargetKeyId=key_id)
    keys = keys_dir(tmp_path, kms_entry(kms, f"kms-{alg}", alg, f"alias/auth-{alg.lower()}"))
    checked = subprocess.run([BINARY, "keys", "check", "--keys-dir", str(keys)],
                             env=dict(os.environ, **AWS_ENV), capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    # The entry is reported with the key the alias resolved to (AWS gives its ARN, moto its
    # id).
    assert re.search(rf"kms-{alg} {alg} active: AWS KMS key alias/auth-{alg.lower()} = "
                     rf"(arn:aws:kms:{kms.REGION}:\d+:key/)?{key_id} \({kms.REGION}\)",
                     checked.stdout), checked.stdout
    kms_public = load_der_public_key(kms.client.get_public_key(KeyId=key_id)["PublicKey"])
    # Long claims make a signing input over 4096 bytes, which KMS signs as a digest.
    for claims in [{}, {"blob": "x" * 5000}]:
        for api, ops in run_sidecar(["--keys-dir", str(keys)], AWS_ENV):
            request = pb.IssueRequest(subject="kms-user", audience=["shop"])
            if claims:
                request.claims.update(claims)
            with grpc.insecure_channel(api) as channel:
                issued = pb_grpc.TokenServiceStub(channel).Issue(request, timeout=10)
            assert issued.key_id == f"kms-{alg}"
            assert len(issued.token.rpartition(".")[0]) > 4096 or not claims
            client = jwt.PyJWKClient(f"http://{ops}/.well-known/jwks.json")
            signing_key = client.get_signing_key_from_jwt(issued.token)
            for key in (signing_key.key, kms_public):
                decoded = jwt.decode(issued.token, key, algorithms=[alg], audience="shop",
                                     issuer="auth-sidecar")
                assert decoded["sub"] == "kms-user"
            header, payload, signature = issued.token.split(".")
            with pytest.raises(jwt.InvalidTokenError):
                jwt.decode(f"{header}.{payload[:-2]}AA.{signature}", kms_public,
                           algorithms=[alg], audience="shop")
    # Sign calls went to the resolved key, never to the alias.
    assert proxy.count("GetPublicKey") >= 2 and proxy.count("Sign") >= 4


def test_rotation_from_a_file_key_to_a_kms_key_rejects_no_token(stubs, kms, proxy, tmp_path):
    """Two nodes share a keys directory, as the pods of one Deployment share a Secret: node A
    issues, node B validates every token issued so far, while the KMS key is introduced as
    verify, made active, and the file key kept as verify."""
    pb, pb_grpc = stubs
    key_id = kms.create_key("ECC_NIST_P256")
    keys = keys_dir(tmp_path)
    old = file_entry(keys, "file-old", "active")
    write_manifest(keys, old)
    issued, rejected, errors = [], [], []
    stop = threading.Event()
    runs = [run_sidecar(["--keys-dir", str(keys)], AWS_ENV),
            run_sidecar(["--keys-dir", str(keys)], AWS_ENV)]
    (api_a, ops_a), (api_b, ops_b) = next(runs[0]), next(runs[1])
    try:
        def issue_loop():
            with grpc.insecure_channel(api_a) as channel:
                api = pb_grpc.TokenServiceStub(channel)
                while not stop.is_set():
                    try:
                        r = api.Issue(pb.IssueRequest(subject="rot"), timeout=5)
                        issued.append((r.key_id, r.token))
                    except grpc.RpcError as e:
                        errors.append(f"Issue: {e.code()} {e.details()}")

        def validate_loop():
            with grpc.insecure_channel(api_b) as channel:
                api = pb_grpc.TokenServiceStub(channel)
                while not stop.is_set():
                    for kid, token in list(issued[-20:]):
                        r = api.Validate(pb.ValidateRequest(token=token), timeout=5)
                        if not r.valid:
                            rejected.append((kid, r.reason))

        threads = [threading.Thread(target=issue_loop)] + [
            threading.Thread(target=validate_loop) for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: len(issued) > 20, 10, "no tokens issued")
        # 1. The KMS key joins as verify: both nodes publish it before it signs anything.
        write_manifest(keys, old, kms_entry(kms, "kms-new", "ES256", key_id, "verify"))
        wait_for(lambda: "kms-new" in jwks(ops_a) and "kms-new" in jwks(ops_b), 10,
                 "the KMS key was not published as verify")
        # 2. The KMS key signs; the file key only verifies.
        write_manifest(keys, old.replace('"active"', '"verify"'),
                       kms_entry(kms, "kms-new", "ES256", key_id, "active"))
        wait_for(lambda: issued and issued[-1][0] == "kms-new", 10, "node A never used KMS")
        count = len(issued)
        wait_for(lambda: len(issued) > count + 50, 20, "too few tokens signed in KMS")
        stop.set()
        for t in threads:
            t.join(10)
        # Every token issued, by either key, validates on B after the rotation too.
        with grpc.insecure_channel(api_b) as channel:
            api = pb_grpc.TokenServiceStub(channel)
            for kid, token in issued:
                r = api.Validate(pb.ValidateRequest(token=token), timeout=5)
                if not r.valid:
                    rejected.append((kid, r.reason))
    finally:
        stop.set()
        for run in runs:
            next(run, None)
    kids = {kid for kid, _ in issued}
    assert kids == {"file-old", "kms-new"}, kids
    assert not errors, errors[:5]
    assert not rejected, rejected[:5]


def test_an_unreachable_kms_stops_issue_and_readiness_but_not_validate(stubs, kms, proxy,
                                                                       tmp_path):
    pb, pb_grpc = stubs
    key_id = kms.create_key("ECC_NIST_P256")
    keys = keys_dir(tmp_path, kms_entry(kms, "kms-down", "ES256", key_id, timeout="1s"))
    for api, ops in run_sidecar(["--keys-dir", str(keys)], AWS_ENV):
        with grpc.insecure_channel(api) as channel:
            stub = pb_grpc.TokenServiceStub(channel)
            token = stub.Issue(pb.IssueRequest(subject="before")).token
            wait_for(lambda: health(api) == health_pb2.HealthCheckResponse.SERVING, 10,
                     "never ready")
            kms.stop()
            try:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Issue(pb.IssueRequest(subject="during"), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
                assert time.monotonic() - started < 3, "Issue outlived the key's 1s timeout"
                # The failed Issue woke the probe: not ready, though the idle probe is 60s.
                wait_for(lambda: health(api) == health_pb2.HealthCheckResponse.NOT_SERVING, 10,
                         "readiness did not follow the KMS")
                samples = scrape(ops)
                assert samples[("authsidecar_signer_up", ())] == 0
                # Validation never needs KMS.
                assert stub.Validate(pb.ValidateRequest(token=token)).valid
                with pytest.raises(urllib.error.HTTPError) as down:
                    urllib.request.urlopen(f"http://{ops}/healthz", timeout=5)
                assert down.value.code == 503
                assert "does not sign" in down.value.read().decode()
            finally:
                kms.resume()
            wait_for(lambda: health(api) == health_pb2.HealthCheckResponse.SERVING, 15,
                     "readiness did not come back with the KMS")
            again = stub.Issue(pb.IssueRequest(subject="after"), timeout=10)
            assert stub.Validate(pb.ValidateRequest(token=again.token)).valid
        samples = scrape(ops)
        assert samples[("authsidecar_signer_up", ())] == 1
        assert samples.get(("authsidecar_signer_calls_total",
                            (("result", "error"), ("source", "aws-kms"))), 0) >= 1
        # Every Sign that reached KMS is counted once, those the 1s budget cut off included.
        counted = sum(v for (name, _), v in samples.items()
                      if name == "authsidecar_signer_calls_total")
        assert counted == proxy.calls["Sign"], (counted, proxy.calls)


def test_a_signature_by_another_key_is_never_minted(stubs, kms, proxy, tmp_path):
    """KMS answers Sign with a signature of another key (here the proxy sends the call to
    one): the signature does not verify with the published key, and Issue is UNAVAILABLE
    rather than a token nobody can verify."""
    pb, pb_grpc = stubs
    key_id, other = kms.create_key("ECC_NIST_P256"), kms.create_key("ECC_NIST_P256")
    keys = keys_dir(tmp_path, kms_entry(kms, "kms-mine", "ES256", key_id))
    logs = []
    for api, ops in run_sidecar(["--keys-dir", str(keys)], AWS_ENV, logs=logs):
        with grpc.insecure_channel(api) as channel:
            stub = pb_grpc.TokenServiceStub(channel)
            stub.Issue(pb.IssueRequest(subject="ok"))
            proxy.sign_with = other
            with pytest.raises(grpc.RpcError) as refused:
                stub.Issue(pb.IssueRequest(subject="other"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            proxy.sign_with = None
            assert stub.Validate(pb.ValidateRequest(
                token=stub.Issue(pb.IssueRequest(subject="ok")).token)).valid
    assert any("signed with another key than the one it published" in line for line in logs)


def test_readiness_follows_the_key_a_reload_made_active(stubs, kms, proxy, tmp_path):
    """After a reload makes another KMS key active, readiness follows that key at once: when it
    signs with another key than it published, the node turns NOT_SERVING within seconds, not
    at the end of the 60 s probe interval it was waiting out for the old key."""
    pb, pb_grpc = stubs
    old, new = kms.create_key("ECC_NIST_P256"), kms.create_key("ECC_NIST_P256")
    keys = keys_dir(tmp_path, kms_entry(kms, "kms-old", "ES256", old))
    for api, ops in run_sidecar(["--keys-dir", str(keys)], AWS_ENV):
        with grpc.insecure_channel(api) as channel:
            stub = pb_grpc.TokenServiceStub(channel)
            wait_for(lambda: health(api) == health_pb2.HealthCheckResponse.SERVING, 10,
                     "never ready")
            write_manifest(keys, kms_entry(kms, "kms-old", "ES256", old, "verify"),
                           kms_entry(kms, "kms-new", "ES256", new))
            wait_for(lambda: stub.Issue(pb.IssueRequest(subject="r")).key_id == "kms-new", 10,
                     "the reload did not make kms-new active")
            proxy.sign_with = old
            with pytest.raises(grpc.RpcError) as refused:
                stub.Issue(pb.IssueRequest(subject="r"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            wait_for(lambda: health(api) == health_pb2.HealthCheckResponse.NOT_SERVING, 5,
                     "readiness still followed the key active before the reload")
            proxy.sign_with = None


def serve_exit(keys):
    """`serve`'s exit code and error output with this keys directory."""
    proc = subprocess.run(
        [BINARY, "serve", "--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0",
         "--keys-dir", str(keys)],
        env=dict({k: v for k, v in os.environ.items() if not k.startswith("AUTH_")}, **AWS_ENV),
        capture_output=True, text=True, timeout=30,
    )
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("alg,spec,usage,expected", [
    ("ES256", "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", "its usage is ENCRYPT_DECRYPT"),
    ("ES256", "RSA_2048", "ENCRYPT_DECRYPT", "its usage is ENCRYPT_DECRYPT"),
    ("ES256", "ECC_NIST_P384", "SIGN_VERIFY", "is a ECC_NIST_P384 key; ES256 needs ECC_NIST_P256"),
    ("RS256", "ECC_NIST_P256", "SIGN_VERIFY", "RS256 needs RSA_2048 or RSA_3072 or RSA_4096"),
    ("ES384", "RSA_4096", "SIGN_VERIFY", "ES384 needs ECC_NIST_P384"),
])
def test_a_key_of_the_wrong_usage_or_spec_exits_2_naming_it(kms, tmp_path, alg, spec, usage,
                                                             expected):
    key_id = kms.client.create_key(KeySpec=spec, KeyUsage=usage)["KeyMetadata"]["KeyId"]
    keys = keys_dir(tmp_path, kms_entry(kms, "kms-wrong", alg, key_id))
    code, stderr = serve_exit(keys)
    assert code == 2, stderr
    assert "key `kms-wrong`" in stderr and key_id in stderr and expected in stderr, stderr
    checked = subprocess.run([BINARY, "check-config", "--keys-dir", str(keys)],
                             env=dict(os.environ, **AWS_ENV), capture_output=True, text=True)
    assert checked.returncode != 0 and expected in checked.stdout, checked.stdout


def test_concurrent_issues_never_exceed_max_in_flight(stubs, kms, proxy, tmp_path):
    pb, pb_grpc = stubs
    key_id = kms.create_key("ECC_NIST_P256")
    keys = keys_dir(tmp_path, kms_entry(kms, "kms-bound", "ES256", key_id, max_in_flight=8,
                                        timeout="20s"))
    for api, ops in run_sidecar(["--keys-dir", str(keys)], AWS_ENV):
        proxy.reset()
        # Each Sign takes 50 ms at the emulator, so that 200 Issues at once pile up on it.
        proxy.sign_delay = 0.05
        with grpc.insecure_channel(api) as channel:
            stub = pb_grpc.TokenServiceStub(channel)
            calls = [stub.Issue.future(pb.IssueRequest(subject=f"c{i}"), timeout=60)
                     for i in range(200)]
            tokens = [c.result().token for c in calls]
        assert len(set(tokens)) == 200
        assert proxy.count("Sign") == 200
        # The bound, and concurrency up to it (on a loaded machine the proxy's threads may not
        # hold all 8 at one instant; without the bound they hold dozens).
        assert 4 <= proxy.max_in_flight <= 8, proxy.max_in_flight
        samples = scrape(ops)
        assert samples[("authsidecar_signer_in_flight", (("source", "aws-kms"),))] == 0


def test_throttled_signs_are_retried_within_the_deadline_and_counted(stubs, kms, proxy,
                                                                     tmp_path):
    pb, pb_grpc = stubs
    key_id = kms.create_key("ECC_NIST_P256")
    keys = keys_dir(tmp_path, kms_entry(kms, "kms-busy", "ES256", key_id, timeout="2s"))
    for api, ops in run_sidecar(["--keys-dir", str(keys)], AWS_ENV):
        before = scrape(ops)
        proxy.reset()
        proxy.throttle_next = 30
        with grpc.insecure_channel(api) as channel:
            stub = pb_grpc.TokenServiceStub(channel)
            calls = [stub.Issue.future(pb.IssueRequest(subject=f"t{i}"), timeout=10)
                     for i in range(20)]
            for c in calls:
                assert stub.Validate(pb.ValidateRequest(token=c.result().token)).valid
            after = scrape(ops)
            label = lambda result: ("authsidecar_signer_calls_total",  # noqa: E731
                                    (("result", result), ("source", "aws-kms")))
            assert after[label("throttled")] - before.get(label("throttled"), 0) == 30
            assert after[label("ok")] - before.get(label("ok"), 0) == 20
            # A KMS that throttles every call: UNAVAILABLE once the 2s budget is spent.
            proxy.throttle_next = 10**6
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                stub.Issue(pb.IssueRequest(subject="never"), timeout=10)
            elapsed = time.monotonic() - started
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert 1.0 < elapsed < 2.5, elapsed
            # A caller's deadline shorter than the budget ends the retries with it: no Sign
            # is sent for a call that has given up (the probe's own retries aside).
            tokens = lambda: sum(m != b"auth-sidecar signing probe"  # noqa: E731
                                 for m in proxy.messages)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as expired:
                stub.Issue(pb.IssueRequest(subject="hurried"), timeout=0.3)
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 0.8
            time.sleep(0.1)
            sent = tokens()
            time.sleep(1.0)
            assert tokens() == sent
            proxy.throttle_next = 0


def test_no_credential_reaches_a_log_healthz_or_check_config(stubs, kms, proxy, tmp_path):
    pb, pb_grpc = stubs
    key_id = kms.create_key("ECC_NIST_P256")
    keys = keys_dir(tmp_path, kms_entry(kms, "kms-quiet", "ES256", key_id, timeout="1s"))
    logs = []
    outputs = []
    env = dict(AWS_ENV, RUST_LOG="debug")
    for api, ops in run_sidecar(["--keys-dir", str(keys)], env, logs=logs):
        with grpc.insecure_channel(api) as channel:
            stub = pb_grpc.TokenServiceStub(channel)
            stub.Issue(pb.IssueRequest(subject="quiet"))
            proxy.throttle_next = 3
            stub.Issue(pb.IssueRequest(subject="quiet"))
            kms.stop()
            try:
                with pytest.raises(grpc.RpcError):
                    stub.Issue(pb.IssueRequest(subject="quiet"), timeout=10)
                try:
                    with urllib.request.urlopen(f"http://{ops}/healthz") as r:
                        outputs.append(r.read().decode())
                except urllib.error.HTTPError as e:
                    outputs.append(e.read().decode())
            finally:
                kms.resume()
        with urllib.request.urlopen(f"http://{ops}/metrics") as r:
            outputs.append(r.read().decode())
    checked = subprocess.run([BINARY, "check-config", "--keys-dir", str(keys)],
                             env=dict(os.environ, **env), capture_output=True, text=True)
    outputs += [checked.stdout, checked.stderr]
    text = "".join(logs) + "".join(outputs)
    assert " DEBUG " in text, "the sidecar was expected to log at debug"
    for secret in (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN,
                   base64.b64encode(SECRET_KEY.encode()).decode()):
        assert secret not in text, f"a credential reached the output: {secret[:6]}..."
