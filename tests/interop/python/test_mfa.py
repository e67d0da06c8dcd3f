"""MfaService against an independent TOTP implementation, PyPI's pyotp, through grpcio: an
enrollment begun on one node is confirmed on another with pyotp's code, the otpauth:// URI
parses with pyotp to the same secret and parameters, and pyotp's codes verify once across
the two nodes."""

import contextlib
import time

import grpc
import pyotp
import pytest

from conftest import run_sidecar, start_redis

MFA_KEY = "py-1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
SECRET = "python-mfa-secret-0123456789abcdefghijk"


@pytest.fixture(scope="module")
def two_nodes():
    proc, port = start_redis()
    env = {"AUTH_JWT_SECRET": SECRET, "AUTH_MFA_KEY": MFA_KEY,
           "REDIS_URL": f"redis://127.0.0.1:{port}"}
    args = ["--storage", "redis", "--redis-prefix", "mfa-py:", "--issuer", "https://id.example.com"]
    with contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(contextlib.contextmanager(run_sidecar)(args, env))
                 for _ in range(2)]
        yield [api for api, _ in nodes]
    proc.kill()


def clients(mfa_stubs, addrs):
    _, pb_grpc = mfa_stubs
    return [pb_grpc.MfaServiceStub(grpc.insecure_channel(a)) for a in addrs]


def test_enrollment_and_codes_agree_with_pyotp(mfa_stubs, two_nodes):
    pb, _ = mfa_stubs
    a, b = clients(mfa_stubs, two_nodes)
    subject = f"user-{time.time_ns()}"
    begun = a.BeginTotpEnrollment(pb.BeginTotpEnrollmentRequest(
        subject=subject, account_label="alice@example.com"))

    parsed = pyotp.parse_uri(begun.otpauth_uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert parsed.secret == begun.secret
    assert parsed.issuer == "id.example.com"  # --issuer's host
    assert parsed.name == "alice@example.com"
    assert (parsed.digits, parsed.interval, parsed.digest().name) == (6, 30, "sha1")

    totp = pyotp.TOTP(begun.secret)
    now = time.time()
    confirmed = b.ConfirmTotpEnrollment(pb.ConfirmTotpEnrollmentRequest(
        subject=subject, code=totp.at(now)))
    assert len(confirmed.backup_codes) == 10

    # The next period's code (one step of skew) verifies once, on either node.
    nxt = totp.at(now + 30)
    first = a.VerifyTotp(pb.VerifyTotpRequest(subject=subject, code=nxt))
    assert first.valid and first.reason == pb.MFA_INVALID_REASON_UNSPECIFIED
    again = b.VerifyTotp(pb.VerifyTotpRequest(subject=subject, code=nxt))
    assert not again.valid and again.reason == pb.MFA_INVALID_REASON_REPLAYED
    # Three periods ahead is past the skew allowed.
    far = b.VerifyTotp(pb.VerifyTotpRequest(subject=subject, code=totp.at(now + 90)))
    if totp.at(now + 90) not in (totp.at(now), nxt, totp.at(now - 30)):
        assert not far.valid and far.reason == pb.MFA_INVALID_REASON_WRONG_CODE

    spent = b.VerifyBackupCode(pb.VerifyBackupCodeRequest(
        subject=subject, code=confirmed.backup_codes[0]))
    assert spent.valid and spent.backup_codes_remaining == 9
    reused = a.VerifyBackupCode(pb.VerifyBackupCodeRequest(
        subject=subject, code=confirmed.backup_codes[0]))
    assert not reused.valid and reused.reason == pb.MFA_INVALID_REASON_WRONG_CODE

    status = a.GetMfaStatus(pb.GetMfaStatusRequest(subject=subject))
    assert status.enrolled and status.backup_codes_remaining == 9


def test_bad_input_names_the_field(mfa_stubs, two_nodes):
    pb, _ = mfa_stubs
    a, _ = clients(mfa_stubs, two_nodes)
    for request, field in [
        (lambda: a.VerifyTotp(pb.VerifyTotpRequest(subject="", code="123456")), "subject"),
        (lambda: a.VerifyTotp(pb.VerifyTotpRequest(subject="s", code="12345")), "code"),
        (lambda: a.BeginTotpEnrollment(pb.BeginTotpEnrollmentRequest(
            subject="s", account_label="x" * (1 << 20))), "account_label"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            request()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{field}:"), err.value.details()
