"""/metrics as a Prometheus scraper reads it: the official client library's text parser, and
counters that move by exactly the calls made between two scrapes."""

import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families


def scrape(ops):
    with urllib.request.urlopen(f"http://{ops}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def delta(before, after, name, **labels):
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0) - before.get(key, 0)


def test_counters_move_by_exactly_the_calls_made(stubs, sidecar_addrs):
    pb, pb_grpc = stubs
    api_addr, ops = sidecar_addrs
    before = scrape(ops)
    with grpc.insecure_channel(api_addr) as channel:
        api = pb_grpc.TokenServiceStub(channel)
        tokens = [api.Issue(pb.IssueRequest(subject=f"m{i}")).token for i in range(3)]
        for token in tokens[:2]:
            assert api.Validate(pb.ValidateRequest(token=token)).valid
        tampered = tokens[2][:-4] + "AAAA"
        assert not api.Validate(pb.ValidateRequest(token=tampered)).valid
        for _ in range(3):
            api.CheckRateLimit(pb.CheckRateLimitRequest(policy="py", key="k"))
        try:
            api.Validate(pb.ValidateRequest(token=""))
            raise AssertionError("an empty token was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(ops)

    rpc = "authsidecar_rpc_requests_total"
    assert delta(before, after, rpc, method="Issue", code="Ok") == 3
    assert delta(before, after, rpc, method="Validate", code="Ok") == 3
    assert delta(before, after, rpc, method="Validate", code="InvalidArgument") == 1
    assert delta(before, after, rpc, method="CheckRateLimit", code="Ok") == 3
    validations = "authsidecar_validations_total"
    assert delta(before, after, validations, result="valid") == 2
    assert delta(before, after, validations, result="bad_signature") == 1
    decisions = "authsidecar_rate_limit_decisions_total"
    assert delta(before, after, decisions, policy="py", decision="allowed") == 2
    assert delta(before, after, decisions, policy="py", decision="denied") == 1
    assert delta(before, after, "authsidecar_rpc_duration_seconds_count", method="Issue") == 3
    assert after[("authsidecar_backend_up", (("backend", "memory"),))] == 1
    build = [k for k in after if k[0] == "authsidecar_build_info"]
    assert len(build) == 1 and dict(build[0][1])["version"]
    assert [k for k in after if k[0] == "authsidecar_keys_active" and after[k] == 1]
    # What the chart's alerts read: the signer, and resident memory (with the cgroup's limit
    # where the container has one).
    assert after[("authsidecar_signer_up", ())] == 1
    resident = after[("process_resident_memory_bytes", ())]
    assert 1 << 20 < resident < 1 << 30, resident
    limit = after.get(("authsidecar_memory_limit_bytes", ()))
    assert limit is None or limit > resident
