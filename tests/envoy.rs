//! Envoy's ext_authz Check and rate limit service over real gRPC, called as Envoy calls them:
//! the answers Envoy turns into HTTP, hostile input, counting shared with CheckRateLimit
//! across nodes, and failing closed. tests/interop/python/test_envoy.py drives a real Envoy.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use auth_sidecar::pb;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code as RlsCode;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use support::backends::{Backend, RedisServer, Storage};
use support::{Deployment, Sidecar, VIEW_BOUND, assert_status, struct_of};
use tonic::Code;
use tonic::transport::Channel;

const ARGS: [&str; 4] = [
    "--rate-limit=shared=20/1h",
    "--rate-limit=small=3/1h",
    "--authz-claim-header=tenant=x-auth-tenant",
    "--backend-timeout=10s",
];

type Authz = AuthorizationClient<Channel>;
type Rls = RateLimitServiceClient<Channel>;

/// A CheckRequest as Envoy sends it: the request's headers, the route's context extensions.
fn check_request(headers: &[(&str, &str)], route: &[(&str, &str)]) -> CheckRequest {
    let owned = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    headers: owned(headers),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: owned(route),
            ..Default::default()
        }),
    }
}

/// The HTTP status Envoy would answer (200 for an allowed request) and the headers it would
/// add to the request or send back.
fn http_of(resp: &CheckResponse) -> (u16, HashMap<String, String>, Vec<String>) {
    let header_map = |options: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| {
        options
            .iter()
            .map(|o| {
                let h = o.header.clone().unwrap();
                assert_eq!(o.append_action, 2, "{} must overwrite", h.key);
                (h.key, h.value)
            })
            .collect()
    };
    match resp.http_response.as_ref().expect("an HTTP response") {
        HttpResponse::OkResponse(ok) => {
            assert_eq!(resp.status.as_ref().unwrap().code, 0);
            (200, header_map(&ok.headers), ok.headers_to_remove.clone())
        }
        HttpResponse::DeniedResponse(denied) => {
            assert_ne!(resp.status.as_ref().unwrap().code, 0);
            let code = denied.status.as_ref().unwrap().code as u16;
            (code, header_map(&denied.headers), Vec::new())
        }
        HttpResponse::ErrorResponse(_) => panic!("an error response: {resp:?}"),
    }
}

async fn authz(authz: &mut Authz, req: CheckRequest) -> Result<CheckResponse, tonic::Status> {
    authz.check(req).await.map(|r| r.into_inner())
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

async fn issue(node: &Sidecar, subject: &str, claims: serde_json::Value) -> String {
    let mut client = node.client().await;
    client
        .issue_with(pb::IssueRequest {
            subject: subject.into(),
            claims: Some(struct_of(claims)),
            ..Default::default()
        })
        .await
        .unwrap()
        .token
}

fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        hits_addend: hits.map(|value| UInt64Value { value }),
        ..Default::default()
    }
}

async fn rls(
    rls: &mut Rls,
    descriptors: Vec<RateLimitDescriptor>,
    hits_addend: u32,
) -> Result<RateLimitResponse, tonic::Status> {
    rls.should_rate_limit(RateLimitRequest {
        domain: "app".into(),
        descriptors,
        hits_addend,
    })
    .await
    .map(|r| r.into_inner())
}

async fn peek(node: &Sidecar, policy: &str, key: &str) -> pb::CheckRateLimitResponse {
    let mut client = node.client().await;
    client
        .0
        .check_rate_limit(pb::CheckRateLimitRequest {
            policy: policy.into(),
            key: key.into(),
            cost: Some(0),
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_valid_token_passes_with_its_subject_and_claims_and_the_rest_is_removed() {
    let node = Sidecar::builder()
        .arg(ARGS[2])
        .arg("--authz-strip-token")
        .start();
    let mut client = Authz::new(node.channel().await);
    let token = issue(
        &node,
        "alice",
        serde_json::json!({"tenant": "acme", "n": 7}),
    )
    .await;
    let resp = authz(
        &mut client,
        check_request(&[("authorization", &bearer(&token))], &[]),
    )
    .await
    .unwrap();
    let (status, headers, removed) = http_of(&resp);
    assert_eq!(status, 200);
    assert_eq!(headers["x-auth-subject"], "alice");
    assert_eq!(headers["x-auth-tenant"], "acme");
    assert_eq!(removed, ["authorization"]);
    // No tenant claim: the header is removed, so a client cannot supply it.
    let token = issue(&node, "bob", serde_json::json!({})).await;
    let resp = authz(
        &mut client,
        check_request(&[("authorization", &bearer(&token))], &[]),
    )
    .await
    .unwrap();
    let (_, headers, removed) = http_of(&resp);
    assert!(!headers.contains_key("x-auth-tenant"));
    assert_eq!(removed, ["x-auth-tenant", "authorization"]);
    // Counted as Envoy's Check, not as a health check; another service's Check as neither.
    let checks = ["method=\"ExtAuthzCheck\"", "code=\"Ok\""];
    assert_eq!(node.metric("authsidecar_rpc_requests_total", &checks), 2.0);
    let mut grpc = tonic::client::Grpc::new(node.channel().await);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = http::uri::PathAndQuery::from_static("/no.such.Service/Check");
    let unknown = grpc.unary(tonic::Request::new(()), path, codec).await;
    assert_eq!(unknown.unwrap_err().code(), Code::Unimplemented);
    let method = |m: &str| {
        let label = format!("method=\"{m}\"");
        node.metric("authsidecar_rpc_requests_total", &[&label])
    };
    assert_eq!((method("other"), method("Check")), (1.0, 0.0));
}

#[tokio::test]
async fn every_rejection_is_the_http_answer_rfc_6750_gives() {
    let node = Sidecar::builder().args(ARGS).start();
    let mut client = Authz::new(node.channel().await);
    let token = issue(&node, "carol", serde_json::json!({"role": ["user"]})).await;
    let refresh = node.client().await.issue_refresh("carol").await;
    let huge = "A".repeat(64 * 1024);
    let two = format!("Bearer {token}, Bearer {token}");
    // (request headers, route settings, HTTP status, the challenge's error)
    type Case<'a> = (
        Vec<(&'a str, String)>,
        Vec<(&'a str, &'a str)>,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (vec![], vec![], 401, "Bearer"),
        (
            vec![("authorization", "".into())],
            vec![],
            400,
            "invalid_request",
        ),
        (
            vec![("authorization", "Bearer".into())],
            vec![],
            400,
            "invalid_request",
        ),
        (vec![("authorization", two)], vec![], 400, "invalid_request"),
        (
            vec![("authorization", bearer(&huge))],
            vec![],
            401,
            "invalid_token",
        ),
        (
            vec![("authorization", bearer("a.b.c"))],
            vec![],
            401,
            "invalid_token",
        ),
        (
            vec![("authorization", bearer(&refresh))],
            vec![],
            401,
            "invalid_token",
        ),
        (
            vec![("authorization", bearer(&token))],
            vec![("audience", "billing")],
            401,
            "invalid_token",
        ),
        (
            vec![("authorization", bearer(&token))],
            vec![("required_claims", "role=admin")],
            403,
            "insufficient_scope",
        ),
        (
            vec![("authorization", bearer(&token))],
            vec![("required_claims", "tenant")],
            403,
            "insufficient_scope",
        ),
    ];
    for (headers, route, want, error) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let resp = authz(&mut client, check_request(&headers, &route))
            .await
            .unwrap();
        let (status, got, _) = http_of(&resp);
        assert_eq!(status, want, "{route:?}: {resp:?}");
        assert!(
            got["www-authenticate"].contains(error),
            "{route:?}: {got:?}"
        );
    }
    // The same token passes where it meets the route's needs.
    let ok = authz(
        &mut client,
        check_request(
            &[("authorization", &bearer(&token))],
            &[("required_claims", "role=user")],
        ),
    )
    .await
    .unwrap();
    assert_eq!(http_of(&ok).0, 200);
    // Envoy's encode_raw_headers: the raw list instead of the map; a repeated header is two.
    let raw = |values: &[&str]| {
        let mut req = check_request(&[], &[]);
        let http = req.attributes.as_mut().unwrap().request.as_mut().unwrap();
        http.http.as_mut().unwrap().header_map = Some(HeaderMap {
            headers: values
                .iter()
                .map(|v| HeaderValue {
                    key: "authorization".into(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        });
        req
    };
    let one = authz(&mut client, raw(&[&bearer(&token)])).await.unwrap();
    assert_eq!(http_of(&one).0, 200);
    let two = authz(&mut client, raw(&[&bearer(&token), &bearer(&token)]))
        .await
        .unwrap();
    assert_eq!(http_of(&two).0, 400);
    // A route's misconfiguration is an error, so Envoy's status_on_error decides.
    assert_status(
        authz(&mut client, check_request(&[], &[("required_claim", "x")])).await,
        Code::InvalidArgument,
        "context_extensions.required_claim",
    );
    let header = [("authorization", bearer(&token))];
    let header: Vec<(&str, &str)> = header.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_status(
        authz(
            &mut client,
            check_request(&header, &[("rate_limit_policy", "nope")]),
        )
        .await,
        Code::NotFound,
        "nope",
    );
    // No attributes at all: no token.
    let resp = authz(&mut client, CheckRequest::default()).await.unwrap();
    assert_eq!(http_of(&resp).0, 401);
    // Past Envoy's default header limit twice over: refused before it is buffered whole.
    let cookie = "c".repeat(200 * 1024);
    assert_status(
        authz(&mut client, check_request(&[("cookie", &cookie)], &[])).await,
        Code::ResourceExhausted,
        "",
    );
}

#[tokio::test]
async fn a_route_policy_counts_each_allowed_request_per_subject() {
    let node = Sidecar::builder().args(ARGS).start();
    let mut client = Authz::new(node.channel().await);
    let token = issue(&node, "dave", serde_json::json!({})).await;
    let header = bearer(&token);
    let req = || {
        check_request(
            &[("authorization", &header)],
            &[("rate_limit_policy", "small")],
        )
    };
    for _ in 0..3 {
        assert_eq!(http_of(&authz(&mut client, req()).await.unwrap()).0, 200);
    }
    let (status, headers, _) = http_of(&authz(&mut client, req()).await.unwrap());
    assert_eq!(status, 429);
    assert!(headers["retry-after"].parse::<u64>().unwrap() > 0);
    assert!(!peek(&node, "small", "dave").await.allowed);
    // A rejected token is not counted.
    let bad = bearer("x.y.z");
    let bad = check_request(
        &[("authorization", &bad)],
        &[("rate_limit_policy", "small")],
    );
    assert_eq!(http_of(&authz(&mut client, bad).await.unwrap()).0, 401);
}

#[tokio::test]
async fn a_revocation_on_one_node_is_honoured_by_another_nodes_check() {
    let d = Deployment::start(Backend::Redis, 2, &ARGS);
    let token = issue(&d.nodes[0], "erin", serde_json::json!({})).await;
    let header = bearer(&token);
    let req = || check_request(&[("authorization", &header)], &[]);
    let mut other = Authz::new(d.nodes[1].channel().await);
    assert_eq!(http_of(&authz(&mut other, req()).await.unwrap()).0, 200);
    d.nodes[0]
        .client()
        .await
        .revoke(pb::revoke_request::Target::Token(token.clone()))
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let sent = start.elapsed();
        let status = http_of(&authz(&mut other, req()).await.unwrap()).0;
        if status == 401 {
            break;
        }
        assert!(sent < VIEW_BOUND, "still allowed after the view's bound");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Concurrent callers on three nodes, half through ShouldRateLimit and half through
/// CheckRateLimit, one key under 20/1h: exactly 20 pass, whichever way they came.
async fn rls_and_check_rate_limit_share_one_exact_count(backend: Backend) {
    let d = Deployment::start(backend, 3, &ARGS);
    let mut calls = Vec::new();
    for i in 0..40 {
        let node = &d.nodes[i % 3];
        let (mut rls_client, mut api) = (Rls::new(node.channel().await), node.client().await);
        calls.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let d = descriptor(&[("policy", "shared"), ("user", "u1")], None);
                let resp = rls(&mut rls_client, vec![d], 0).await.unwrap();
                resp.overall_code == RlsCode::Ok as i32
            } else {
                let req = pb::CheckRateLimitRequest {
                    policy: "shared".into(),
                    key: "u1".into(),
                    cost: None,
                };
                api.0
                    .check_rate_limit(req)
                    .await
                    .unwrap()
                    .into_inner()
                    .allowed
            }
        }));
    }
    let mut allowed = 0;
    for call in calls {
        allowed += usize::from(call.await.unwrap());
    }
    assert_eq!(allowed, 20);
    let mut client = Rls::new(d.nodes[2].channel().await);
    let d0 = descriptor(&[("policy", "shared"), ("user", "u1")], None);
    let resp = rls(&mut client, vec![d0], 0).await.unwrap();
    assert_eq!(resp.overall_code, RlsCode::OverLimit as i32);
    let status = &resp.statuses[0];
    assert_eq!(
        (status.code, status.limit_remaining),
        (RlsCode::OverLimit as i32, 0)
    );
    assert!(status.duration_until_reset.unwrap().seconds > 0);
    let retry = &resp.response_headers_to_add[0];
    assert_eq!(retry.key, "retry-after");
    assert!(retry.value.parse::<u64>().unwrap() > 0);
}

#[tokio::test]
async fn rls_and_check_rate_limit_share_one_exact_count_on_redis() {
    rls_and_check_rate_limit_share_one_exact_count(Backend::Redis).await
}

#[tokio::test]
async fn rls_and_check_rate_limit_share_one_exact_count_on_postgres() {
    rls_and_check_rate_limit_share_one_exact_count(Backend::Postgres).await
}

#[tokio::test]
async fn hits_addend_counts_as_cost_does_and_a_bad_descriptor_counts_nothing() {
    let node = Sidecar::builder().args(ARGS).start();
    let mut client = Rls::new(node.channel().await);
    let small = |key: &str, hits: Option<u64>| descriptor(&[("policy", "small"), ("k", key)], hits);
    // Request-level hits: 0 means 1; 2 counts 2.
    let resp = rls(&mut client, vec![small("a", None)], 0).await.unwrap();
    assert_eq!(resp.statuses[0].limit_remaining, 2);
    let resp = rls(&mut client, vec![small("a", None)], 2).await.unwrap();
    assert_eq!(resp.statuses[0].limit_remaining, 0);
    // Descriptor-level hits override; 0 peeks.
    let resp = rls(&mut client, vec![small("b", Some(0))], 3)
        .await
        .unwrap();
    assert_eq!(
        (resp.overall_code, resp.statuses[0].limit_remaining),
        (1, 3)
    );
    let resp = rls(&mut client, vec![small("b", Some(3))], 1)
        .await
        .unwrap();
    assert_eq!(resp.statuses[0].limit_remaining, 0);
    // The status shows the policy as Envoy's x-ratelimit-limit does, when it can.
    let limit = resp.statuses[0].current_limit.clone().unwrap();
    assert_eq!(
        (limit.name.as_str(), limit.requests_per_unit, limit.unit),
        ("small", 3, 3)
    );

    // Each bad request is refused whole: the good descriptor before it is not counted.
    let fresh = || small("c", None);
    let with_limit = RateLimitDescriptor {
        limit: Some(RateLimitOverride::default()),
        ..small("c", None)
    };
    let cases: Vec<(Vec<RateLimitDescriptor>, u32, Code, &str)> = vec![
        (vec![], 0, Code::InvalidArgument, "descriptors"),
        (
            vec![fresh(), small("c", Some(4))],
            0,
            Code::InvalidArgument,
            "descriptors[1]: cost",
        ),
        (
            vec![fresh(), small("c", Some(u64::MAX))],
            0,
            Code::InvalidArgument,
            "descriptors[1].hits_addend",
        ),
        (
            vec![fresh()],
            1_000_000,
            Code::InvalidArgument,
            "descriptors[0]: cost",
        ),
        (
            vec![fresh(), descriptor(&[("user", "x")], None)],
            0,
            Code::InvalidArgument,
            "descriptors[1].entries",
        ),
        (
            vec![
                fresh(),
                descriptor(&[("policy", "a"), ("policy", "b")], None),
            ],
            0,
            Code::InvalidArgument,
            "descriptors[1].entries",
        ),
        (
            vec![fresh(), descriptor(&[("policy", "nope")], None)],
            0,
            Code::NotFound,
            "nope",
        ),
        (
            vec![
                fresh(),
                descriptor(&[("policy", "small"), ("k", &"x".repeat(300))], None),
            ],
            0,
            Code::InvalidArgument,
            "descriptors[1]: key",
        ),
        (
            vec![fresh(), with_limit],
            0,
            Code::InvalidArgument,
            "descriptors[1].limit",
        ),
        (vec![fresh(); 65], 0, Code::InvalidArgument, "descriptors"),
    ];
    for (descriptors, hits, code, field) in cases {
        assert_status(rls(&mut client, descriptors, hits).await, code, field);
    }
    assert_eq!(
        peek(&node, "small", "c").await.remaining,
        3,
        "a refused request counted"
    );
    // Several descriptors: each counted once; OVER_LIMIT if any is.
    let resp = rls(&mut client, vec![small("d", None), small("a", None)], 0)
        .await
        .unwrap();
    assert_eq!(resp.overall_code, RlsCode::OverLimit as i32);
    assert_eq!(resp.statuses[0].code, RlsCode::Ok as i32);
    assert_eq!(resp.statuses[1].code, RlsCode::OverLimit as i32);
    assert_eq!(peek(&node, "small", "d").await.remaining, 2);
    // No entry but the policy: the key is the domain.
    rls(
        &mut client,
        vec![descriptor(&[("policy", "small")], None)],
        0,
    )
    .await
    .unwrap();
    assert_eq!(peek(&node, "small", "app").await.remaining, 2);
}

#[tokio::test]
async fn redis_down_is_an_error_for_envoy_to_handle_never_an_answer() {
    let mut redis = RedisServer::start();
    let d = Deployment::on(Storage::on_redis(&redis), 1, &ARGS[..3]);
    let token = issue(&d, "frank", serde_json::json!({})).await;
    let header = bearer(&token);
    let (mut authz_client, mut rls_client) =
        (Authz::new(d.channel().await), Rls::new(d.channel().await));
    let req = || check_request(&[("authorization", &header)], &[]);
    assert_eq!(
        http_of(&authz(&mut authz_client, req()).await.unwrap()).0,
        200
    );
    redis.kill();
    // Until the view hears its feed is gone (within VIEW_BOUND) it may answer from what it
    // holds: no revocation can be stored meanwhile. Then every answer is an error.
    let start = Instant::now();
    while let Ok(resp) = authz(&mut authz_client, req()).await {
        assert_eq!(http_of(&resp).0, 200);
        assert!(
            start.elapsed() < VIEW_BOUND,
            "answered from the view past its bound"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for _ in 0..3 {
        let status = authz(&mut authz_client, req()).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let d0 = descriptor(&[("policy", "small"), ("k", "x")], None);
        let status = rls(&mut rls_client, vec![d0], 0).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
}

/// A header value a client chose cannot lock out another key: `[user="alice|10.0.0.7"]` is
/// not `[user="alice", remote_address="10.0.0.7"]`, nor an app's
/// `CheckRateLimit(lock, "alice|10.0.0.7")`. (The values were joined with `|` before, and
/// all three shared one count.)
#[tokio::test]
async fn descriptor_keys_do_not_collide_through_a_separator() {
    let node = Sidecar::builder().args(ARGS).start();
    let mut client = Rls::new(node.channel().await);
    let forged = descriptor(&[("policy", "small"), ("user", "alice|10.0.0.7")], Some(3));
    let resp = rls(&mut client, vec![forged], 1).await.unwrap();
    assert_eq!(resp.statuses[0].limit_remaining, 0);
    let genuine = descriptor(
        &[
            ("policy", "small"),
            ("user", "alice"),
            ("remote_address", "10.0.0.7"),
        ],
        Some(0),
    );
    let resp = rls(&mut client, vec![genuine], 1).await.unwrap();
    assert_eq!(
        resp.statuses[0].limit_remaining, 3,
        "the genuine key was spent"
    );
    assert_eq!(peek(&node, "small", "alice|10.0.0.7").await.remaining, 3);
    // One entry is still the app's key, as documented.
    let address = descriptor(
        &[("policy", "small"), ("remote_address", "10.0.0.9")],
        Some(1),
    );
    rls(&mut client, vec![address], 1).await.unwrap();
    assert_eq!(peek(&node, "small", "10.0.0.9").await.remaining, 2);
}

/// A subject HTTP would trim is refused at Issue (and at CreateSession), naming the field;
/// a claim that would be trimmed is not passed as a header.
#[tokio::test]
async fn identities_that_http_would_trim_never_reach_the_app() {
    let node = Sidecar::builder().args(ARGS).start();
    let mut client = node.client().await;
    for subject in [" admin", "admin ", "admin\t"] {
        let refused = client
            .issue_with(pb::IssueRequest {
                subject: subject.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains("subject"), "{refused:?}");
    }
    let token = issue(&node, "alice", serde_json::json!({"tenant": " acme"})).await;
    let mut authz_client = Authz::new(node.channel().await);
    let resp = authz(
        &mut authz_client,
        check_request(&[("authorization", &bearer(&token))], &[]),
    )
    .await
    .unwrap();
    let (status, headers, removed) = http_of(&resp);
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("x-auth-subject").map(String::as_str),
        Some("alice")
    );
    assert!(!headers.contains_key("x-auth-tenant"), "{headers:?}");
    assert!(removed.contains(&"x-auth-tenant".to_owned()), "{removed:?}");
}
