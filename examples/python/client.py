"""A Python app's use of auth-sidecar: issue a token, validate it, check a rate limit, revoke
the token and see it rejected. Plain grpcio with its default channel options; the target is
the sidecar's --listen, over TCP or a Unix socket:

    mkdir -p gen && python -m grpc_tools.protoc -I proto --python_out=gen \\
        --grpc_python_out=gen proto/authsidecar/v1/token_service.proto
    PYTHONPATH=gen python examples/python/client.py 127.0.0.1:50051
    PYTHONPATH=gen python examples/python/client.py unix:/run/auth-sidecar/api.sock
"""

import os
import sys

import grpc

from authsidecar.v1 import token_service_pb2 as pb
from authsidecar.v1 import token_service_pb2_grpc as rpc


def main(target, policy):
    # The sidecar is in the same pod, on loopback or a socket: no TLS.
    with grpc.insecure_channel(target) as channel:
        client = rpc.TokenServiceStub(channel)
        issued = client.Issue(pb.IssueRequest(subject="python-user"), timeout=10)
        valid = client.Validate(pb.ValidateRequest(token=issued.token), timeout=10)
        assert valid.valid and valid.subject == "python-user", valid
        limit = client.CheckRateLimit(
            pb.CheckRateLimitRequest(policy=policy, key="python-user"), timeout=10)
        client.Revoke(pb.RevokeRequest(token=issued.token), timeout=10)
        after = client.Validate(pb.ValidateRequest(token=issued.token), timeout=10)
        assert not after.valid and after.reason == pb.INVALID_REASON_REVOKED, after
        # Bad input is a status naming the field, not a crash.
        try:
            client.Issue(pb.IssueRequest(), timeout=10)
            raise AssertionError("Issue without a subject succeeded")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        print(f"ok: issued, validated, rate limit allowed={limit.allowed} "
              f"remaining={limit.remaining}, revoked, rejected as "
              f"{pb.InvalidReason.Name(after.reason)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051",
         os.environ.get("RATE_LIMIT_POLICY", "api"))
