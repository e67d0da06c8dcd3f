"""Offline verification by a third party: PyJWT's PyJWKClient fetches the sidecar's JWKS over
HTTP and verifies tokens the sidecar signed, as an app that never calls Validate would."""

import grpc
import jwt
import pytest


def test_pyjwt_verifies_sidecar_tokens_against_the_jwks(stubs, keyed_sidecar):
    pb, pb_grpc = stubs
    alg, api_addr, ops_addr = keyed_sidecar
    with grpc.insecure_channel(api_addr) as channel:
        api = pb_grpc.TokenServiceStub(channel)
        issued = api.Issue(pb.IssueRequest(subject="py-user", audience=["shop"]))
        jwks = api.GetJwks(pb.GetJwksRequest())

    client = jwt.PyJWKClient(f"http://{ops_addr}/.well-known/jwks.json")
    signing_key = client.get_signing_key_from_jwt(issued.token)
    assert signing_key.key_id == f"py-{alg}" == jwks.active_key_id
    claims = jwt.decode(
        issued.token,
        signing_key.key,
        algorithms=[alg],
        audience="shop",
        issuer="auth-sidecar",
    )
    assert claims["sub"] == "py-user"
    assert claims["jti"] == issued.token_id

    # The same verifier refuses a token whose payload was changed after signing.
    header, payload, signature = issued.token.split(".")
    tampered = f"{header}.{payload[:-2]}AA.{signature}"
    with pytest.raises(jwt.InvalidTokenError):
        jwt.decode(tampered, signing_key.key, algorithms=[alg], audience="shop")
