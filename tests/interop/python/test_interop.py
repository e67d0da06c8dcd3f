"""A Python app's view of the sidecar: stubs generated from proto/ by grpcio-tools, calls made
by grpcio, health checked by grpcio-health-checking, services listed by grpcio-reflection."""

import grpc
from google.protobuf import descriptor_pool, duration_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def test_issue_validate_revoke_validate(stubs, sidecar):
    pb, pb_grpc = stubs
    with grpc.insecure_channel(sidecar) as channel:
        api = pb_grpc.TokenServiceStub(channel)
        claims = struct_pb2.Struct()
        claims.update({"role": "admin", "tenant": "acme"})
        issued = api.Issue(pb.IssueRequest(
            subject="py-user",
            audience=["shop"],
            ttl=duration_pb2.Duration(seconds=300),
            claims=claims,
        ))
        assert issued.token.count(".") == 2
        assert len(issued.token_id) >= 22

        valid = api.Validate(pb.ValidateRequest(token=issued.token, audience="shop"))
        assert valid.valid
        assert valid.subject == "py-user"
        assert valid.token_id == issued.token_id
        assert valid.kind == pb.TOKEN_KIND_ACCESS
        assert dict(valid.claims) == {"role": "admin", "tenant": "acme"}

        revoked = api.Revoke(pb.RevokeRequest(token=issued.token, reason="logout"))
        assert revoked.newly_revoked

        after = api.Validate(pb.ValidateRequest(token=issued.token))
        assert not after.valid
        assert after.reason == pb.INVALID_REASON_REVOKED


def test_errors_are_grpc_statuses_naming_the_field(stubs, sidecar):
    pb, pb_grpc = stubs
    with grpc.insecure_channel(sidecar) as channel:
        api = pb_grpc.TokenServiceStub(channel)
        try:
            api.Issue(pb.IssueRequest())
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "subject" in err.details()
        else:
            raise AssertionError("Issue without a subject succeeded")

        garbage = api.Validate(pb.ValidateRequest(token="not.a.token"))
        assert not garbage.valid
        assert garbage.reason == pb.INVALID_REASON_MALFORMED


def test_rate_limit_cost_unset_counts_one_and_zero_peeks(stubs, sidecar):
    pb, pb_grpc = stubs
    with grpc.insecure_channel(sidecar) as channel:
        api = pb_grpc.TokenServiceStub(channel)
        peek = api.CheckRateLimit(pb.CheckRateLimitRequest(policy="py", key="k", cost=0))
        assert peek.allowed and peek.remaining == 2
        first = api.CheckRateLimit(pb.CheckRateLimitRequest(policy="py", key="k"))
        assert first.allowed and first.remaining == 1
        api.CheckRateLimit(pb.CheckRateLimitRequest(policy="py", key="k"))
        denied = api.CheckRateLimit(pb.CheckRateLimitRequest(policy="py", key="k"))
        assert not denied.allowed
        assert denied.retry_after.seconds > 0
        api.ResetRateLimit(pb.ResetRateLimitRequest(policy="py", key="k"))
        assert api.CheckRateLimit(pb.CheckRateLimitRequest(policy="py", key="k")).allowed
        try:
            api.CheckRateLimit(pb.CheckRateLimitRequest(policy="nope", key="k"))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("an unknown policy was accepted")


def test_health_check(sidecar):
    with grpc.insecure_channel(sidecar) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", "authsidecar.v1.TokenService"]:
            resp = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_every_service(sidecar):
    with grpc.insecure_channel(sidecar) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in response.list_services_response.service}
        assert {
            "authsidecar.v1.TokenService",
            "envoy.service.auth.v3.Authorization",
            "envoy.service.ratelimit.v3.RateLimitService",
        } <= names
        # What grpcurl does: resolve a message and, through reflection, every file it imports.
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        check = pool.FindMessageTypeByName("envoy.service.auth.v3.CheckRequest")
        assert "attributes" in check.fields_by_name
        rls = pool.FindServiceByName("envoy.service.ratelimit.v3.RateLimitService")
        assert rls.FindMethodByName("ShouldRateLimit") is not None
