//! Forward-auth (`/v1/authz`) and OAuth introspection and revocation over real HTTP/1.1 on the
//! API listener, beside ext_authz over real gRPC: one decision for the three protocols, hostile
//! input, the ops port never serving them, and the discovery document listing them only where
//! a caller reaches them. tests/interop/python/test_forward_auth.py and test_oauth.py drive
//! NGINX, Caddy, the Traefik request shape, Authlib and openid-client.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use auth_sidecar::pb;
use base64::Engine;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse as Envoy;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use serde_json::{Value, json};
use support::backends::{Backend, RedisServer, Storage};
use support::{Deployment, HttpResponse, Sidecar, forge, http_raw, struct_of, tcp};

const CLIENT: &str = "rs";
const CLIENT_SECRET: &str = "resource-server-secret";

fn args() -> Vec<String> {
    use argon2::PasswordHasher;
    let salt = argon2::password_hash::SaltString::encode_b64(b"forward-auth-salt").unwrap();
    let phc = argon2::Argon2::default()
        .hash_password(CLIENT_SECRET.as_bytes(), &salt)
        .unwrap()
        .to_string();
    [
        "--rate-limit=admin=1000/1h",
        "--rate-limit=tiny=1/1h",
        "--authz-claim-header=tenant=x-auth-tenant",
        "--leeway=0s",
        "--backend-timeout=10s",
    ]
    .iter()
    .map(|a| a.to_string())
    .chain([format!("--oauth-client={CLIENT}:{phc}")])
    .collect()
}

fn start(backend: Backend, n: usize) -> Deployment {
    let args = args();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Deployment::start(backend, n, &refs)
}

fn api(node: &Sidecar) -> SocketAddr {
    node.api.parse().expect("a TCP API listener")
}

/// What a proxy acts on: the status, and the headers it copies or sends back. An empty claim
/// header is no header: forward-auth sends it empty where ext_authz removes it, and either way
/// the client's own never gets through.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    subject: Option<String>,
    tenant: Option<String>,
    challenge: Option<String>,
    retry_after: Option<String>,
}

async fn via_ext_authz(node: &Sidecar, header: Option<&str>, route: &[(&str, &str)]) -> Answer {
    let mut client = AuthorizationClient::new(node.channel().await);
    let owned = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let headers: Vec<(&str, &str)> = header.map(|h| ("authorization", h)).into_iter().collect();
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/things".into(),
                    headers: owned(&headers),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: owned(route),
            ..Default::default()
        }),
    };
    let response = client.check(request).await.unwrap().into_inner();
    let named = |options: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption],
                 name: &str| {
        options
            .iter()
            .filter_map(|o| o.header.as_ref())
            .find(|h| h.key == name)
            .map(|h| h.value.clone())
            .filter(|v| !v.is_empty())
    };
    match response.http_response.unwrap() {
        Envoy::OkResponse(ok) => Answer {
            status: 200,
            subject: named(&ok.headers, "x-auth-subject"),
            tenant: named(&ok.headers, "x-auth-tenant"),
            challenge: None,
            retry_after: None,
        },
        Envoy::DeniedResponse(denied) => Answer {
            status: denied.status.unwrap().code as u16,
            subject: None,
            tenant: None,
            challenge: named(&denied.headers, "www-authenticate"),
            retry_after: named(&denied.headers, "retry-after"),
        },
        Envoy::ErrorResponse(e) => panic!("an error response: {e:?}"),
    }
}

fn query(route: &[(&str, &str)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.extend_pairs(route);
    query.finish()
}

fn forward_auth(node: &Sidecar, headers: &[(&str, &str)], route: &[(&str, &str)]) -> HttpResponse {
    let mut request = format!(
        "GET /v1/authz?{} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         X-Forwarded-Method: POST\r\nX-Forwarded-Uri: /things?secret=1\r\n",
        query(route)
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    http_raw(tcp(api(node)), request.as_bytes())
}

fn via_forward_auth(node: &Sidecar, header: Option<&str>, route: &[(&str, &str)]) -> Answer {
    let headers: Vec<(&str, &str)> = header.map(|h| ("Authorization", h)).into_iter().collect();
    let r = forward_auth(node, &headers, route);
    let get = |name: &str| r.header(name).map(str::to_owned).filter(|v| !v.is_empty());
    Answer {
        status: r.status,
        subject: get("x-auth-subject"),
        tenant: get("x-auth-tenant"),
        challenge: get("www-authenticate"),
        retry_after: get("retry-after"),
    }
}

/// A form POST to `path` on the API listener, as `client:secret` (no Authorization when
/// `None`), with `extra` header lines.
fn post(
    node: &Sidecar,
    path: &str,
    auth: Option<(&str, &str)>,
    form: &str,
    extra: &str,
) -> HttpResponse {
    let auth = auth.map_or(String::new(), |(id, secret)| {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        format!("Authorization: Basic {basic}\r\n")
    });
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}{extra}\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    );
    http_raw(tcp(api(node)), request.as_bytes())
}

fn introspect(node: &Sidecar, token: &str) -> Value {
    let r = post(
        node,
        "/oauth2/introspect",
        Some((CLIENT, CLIENT_SECRET)),
        &query(&[("token", token)]),
        "",
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    serde_json::from_str(&r.body).unwrap()
}

async fn issue(node: &Sidecar, subject: &str, audience: &[&str], claims: Value) -> String {
    node.client()
        .await
        .issue_with(pb::IssueRequest {
            subject: subject.into(),
            audience: audience.iter().map(|a| a.to_string()).collect(),
            claims: Some(struct_of(claims)),
            ..Default::default()
        })
        .await
        .unwrap()
        .token
}

#[tokio::test]
async fn ext_authz_forward_auth_and_introspection_give_one_answer() {
    let d = start(Backend::Redis, 2);
    let (a, b) = (&d.nodes[0], &d.nodes[1]);
    let alice = issue(
        a,
        "alice",
        &["orders"],
        json!({"role": "admin", "tenant": "acme"}),
    )
    .await;
    let bob = issue(a, "bob", &[], json!({"role": ["user"]})).await;
    let forged = forge(&alice, "another-secret-0123456789abcdefghijkl", |_, _| {});
    let expired = a
        .client()
        .await
        .issue_with(pb::IssueRequest {
            subject: "carol".into(),
            ttl: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .token;
    let revoked = issue(a, "dave", &[], json!({})).await;
    a.client()
        .await
        .revoke(pb::revoke_request::Target::Token(revoked.clone()))
        .await
        .unwrap();
    let refresh = a.client().await.issue_refresh("erin").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let bearer = |t: &str| format!("Bearer {t}");
    let headers: Vec<(&str, Option<String>)> = vec![
        ("alice", Some(bearer(&alice))),
        ("bob", Some(bearer(&bob))),
        ("forged", Some(bearer(&forged))),
        ("expired", Some(bearer(&expired))),
        ("revoked", Some(bearer(&revoked))),
        ("refresh", Some(bearer(&refresh))),
        ("none", None),
        ("basic", Some("Basic dXNlcjpwYXNz".to_owned())),
        ("two tokens", Some("Bearer a b".to_owned())),
    ];
    let routes: [&[(&str, &str)]; 5] = [
        &[],
        &[("audience", "orders")],
        &[("required_claims", "role=admin")],
        &[("required_claims", "tenant,role=user")],
        &[("rate_limit_policy", "admin")],
    ];
    let mut statuses = std::collections::BTreeSet::new();
    for (name, header) in &headers {
        for route in routes {
            // The two nodes share the store: ext_authz on one, forward-auth on the other.
            let envoy = via_ext_authz(a, header.as_deref(), route).await;
            let forward = via_forward_auth(b, header.as_deref(), route);
            assert_eq!(envoy, forward, "{name} on {route:?}");
            statuses.insert(envoy.status);
        }
        // Introspection has no route: active exactly when the route-less check allows.
        let Some(token) = header.as_deref().and_then(|h| h.strip_prefix("Bearer ")) else {
            continue;
        };
        let allowed = via_forward_auth(b, header.as_deref(), &[]).status == 200;
        assert_eq!(introspect(a, token)["active"], allowed, "{name}");
    }
    assert_eq!(
        statuses.into_iter().collect::<Vec<_>>(),
        [200, 400, 401, 403],
        "the table covers every answer but the rate limit's"
    );
    // A route's rate limit is one count, whichever protocol asks.
    let tiny = [("rate_limit_policy", "tiny")];
    assert_eq!(
        via_ext_authz(a, Some(&bearer(&bob)), &tiny).await.status,
        200
    );
    let limited = via_forward_auth(b, Some(&bearer(&bob)), &tiny);
    assert_eq!(limited.status, 429);
    assert!(limited.retry_after.unwrap().parse::<u64>().unwrap() > 3000);
    assert_eq!(
        via_forward_auth(b, Some(&bearer(&alice)), &tiny).status,
        200
    );
    let limited = via_ext_authz(a, Some(&bearer(&alice)), &tiny).await;
    assert_eq!((limited.status, limited.challenge), (429, None));
    // Counted as its own method, by the HTTP status's gRPC meaning.
    let forward = |code: &str| {
        let code = format!("code=\"{code}\"");
        b.metric(
            "authsidecar_rpc_requests_total",
            &["method=\"ForwardAuth\"", &code],
        )
    };
    assert!(forward("Ok") >= 5.0 && forward("Unauthenticated") >= 5.0);
    assert!(forward("ResourceExhausted") >= 1.0);
    // The original URI is logged without its query, and no token ever is.
    let logs = b.logs().join("\n");
    for token in [&alice, &bob, &forged, &refresh] {
        assert!(!logs.contains(token.as_str()));
    }
    assert!(!logs.contains("secret=1"));
}

#[tokio::test]
async fn a_route_the_query_sets_wrong_is_a_server_error_naming_it() {
    let d = start(Backend::Memory, 1);
    let token = issue(&d, "alice", &[], json!({})).await;
    let header = format!("Bearer {token}");
    for (route, named) in [
        (&[("required_claim", "role")][..], "required_claim"),
        (&[("audience", "a"), ("audience", "b")][..], "audience"),
        (&[("audience", "")][..], "audience"),
    ] {
        let r = forward_auth(&d, &[("Authorization", &header)], route);
        assert_eq!(r.status, 500, "{route:?}");
        assert!(r.body.contains(named), "{}", r.body);
    }
    let r = forward_auth(
        &d,
        &[("Authorization", &header)],
        &[("rate_limit_policy", "nope")],
    );
    assert_eq!(r.status, 500, "{}", r.body);
}

#[tokio::test]
async fn hostile_input_gets_a_clear_answer_and_never_a_hang() {
    let d = start(Backend::Memory, 1);
    let token = issue(&d, "alice", &[], json!({})).await;
    let bearer = format!("Bearer {token}");
    let auth = Some((CLIENT, CLIENT_SECRET));
    // Two Authorization headers: one token or none, never a guess.
    let r = forward_auth(
        &d,
        &[("Authorization", &bearer), ("Authorization", &bearer)],
        &[],
    );
    assert_eq!(r.status, 400);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("invalid_request")
    );
    // A 64 KiB header: 431 on every path, before anything else is read.
    let big = "x".repeat(64 * 1024);
    let r = forward_auth(&d, &[("Authorization", &bearer), ("X-Big", &big)], &[]);
    assert_eq!(r.status, 431);
    let extra = format!("X-Big: {big}\r\n");
    let r = post(
        &d,
        "/oauth2/introspect",
        auth,
        &format!("token={token}"),
        &extra,
    );
    assert_eq!(r.status, 431);
    // A 1 MiB form: 413, read no further.
    let form = format!("token={}", "a".repeat(1024 * 1024));
    assert_eq!(post(&d, "/oauth2/introspect", auth, &form, "").status, 413);
    assert_eq!(post(&d, "/oauth2/revoke", auth, &form, "").status, 413);
    // Forms that are not one token: 400 invalid_request naming what is wrong.
    for (form, why) in [
        ("token=%ZZ", "encoding"),
        ("token=%FF%FE", "encoding"),
        ("token_type_hint=access_token", "`token`"),
        ("token=", "`token`"),
        (
            &format!("token={token}&token={token}") as &str,
            "more than once",
        ),
    ] {
        for path in ["/oauth2/introspect", "/oauth2/revoke"] {
            let r = post(&d, path, auth, form, "");
            assert_eq!(r.status, 400, "{path} {form}");
            let body: Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(body["error"], "invalid_request");
            assert!(
                body["error_description"].as_str().unwrap().contains(why),
                "{body}"
            );
        }
    }
    // A hint we do not know is no error (RFC 7009 §2.1).
    let form = format!("token={token}&token_type_hint=urn:example:jwt");
    let r = post(&d, "/oauth2/introspect", auth, &form, "");
    assert_eq!(r.status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&r.body).unwrap()["active"],
        true
    );
    // Not a form, not a POST.
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT}:{CLIENT_SECRET}"));
    let request = format!(
        "POST /oauth2/introspect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Basic {basic}\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\n\r\n{{}}"
    );
    let r = http_raw(tcp(api(&d)), request.as_bytes());
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("x-www-form-urlencoded"), "{}", r.body);
    let r = http_raw(
        tcp(api(&d)),
        b"GET /oauth2/introspect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 405);
    // The ops port, which the cluster reaches, serves none of it.
    for path in ["/v1/authz", "/oauth2/introspect", "/oauth2/revoke"] {
        for method in ["GET", "POST"] {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 Authorization: {bearer}\r\nContent-Length: 0\r\n\r\n"
            );
            assert_eq!(
                http_raw(tcp(d.ops), request.as_bytes()).status,
                404,
                "{path}"
            );
        }
    }
}

#[tokio::test]
async fn forward_auth_answers_on_the_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let node = Sidecar::builder()
        .listen(format!("unix:{}", socket.display()))
        .start();
    node.wait_ops_status(200, Duration::from_secs(15));
    let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let r = http_raw(
        stream,
        b"GET /v1/authz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        (r.status, r.header("www-authenticate")),
        (401, Some("Bearer"))
    );
}

#[tokio::test]
async fn a_store_that_does_not_answer_is_503_never_an_answer() {
    let mut redis = RedisServer::start();
    // The default backend timeout: an answer within the test's reads.
    let args: Vec<String> = args()
        .into_iter()
        .filter(|a| !a.starts_with("--backend-timeout"))
        .collect();
    let node = args
        .iter()
        .fold(
            Sidecar::builder().storage(&Storage::on_redis(&redis)),
            |b, a| b.arg(a.as_str()),
        )
        .start();
    node.wait_ops_status(200, Duration::from_secs(15));
    let token = issue(&node, "frank", &[], json!({})).await;
    let bearer = format!("Bearer {token}");
    assert_eq!(via_forward_auth(&node, Some(&bearer), &[]).status, 200);
    redis.kill();
    support::wait_until("the view to drop its facts", async || {
        via_forward_auth(&node, Some(&bearer), &[]).status != 200
    })
    .await;
    for _ in 0..3 {
        let r = forward_auth(&node, &[("Authorization", &bearer)], &[]);
        assert_eq!(r.status, 503, "{}", r.body);
        let form = format!("token={token}");
        let auth = Some((CLIENT, CLIENT_SECRET));
        assert_eq!(
            post(&node, "/oauth2/introspect", auth, &form, "").status,
            503
        );
        assert_eq!(post(&node, "/oauth2/revoke", auth, &form, "").status, 503);
    }
}

#[tokio::test]
async fn the_discovery_document_lists_the_oauth_endpoints_only_where_callers_reach_them() {
    let document = |extra: &[&str]| {
        let node = extra
            .iter()
            .fold(
                Sidecar::builder().arg("--public-url=https://auth.example.com"),
                |b, a| b.arg(*a),
            )
            .start();
        node.wait_ops_status(200, Duration::from_secs(15));
        let r = support::http_get(node.ops, "/.well-known/openid-configuration");
        serde_json::from_str::<Value>(&r.body).unwrap()
    };
    let args = args();
    let client = args.last().unwrap().as_str();
    // The API listener is the pod's own: without an address callers reach, none is listed.
    assert!(document(&[client]).get("introspection_endpoint").is_none());
    // An address, but no client that may call: none either.
    let url = "--oauth-public-url=https://auth.example.com/";
    assert!(document(&[url]).get("introspection_endpoint").is_none());
    let both = document(&[url, client]);
    assert_eq!(
        both["introspection_endpoint"],
        "https://auth.example.com/oauth2/introspect"
    );
    assert_eq!(
        both["revocation_endpoint"],
        "https://auth.example.com/oauth2/revoke"
    );
    assert_eq!(
        both["introspection_endpoint_auth_methods_supported"],
        json!(["client_secret_basic"])
    );
}

#[tokio::test]
async fn guesses_sent_at_once_run_no_more_argon2_checks_than_the_policy_allows() {
    let args = args();
    let node = args
        .iter()
        .fold(Sidecar::builder(), |b, a| b.arg(a.as_str()))
        .arg("--oauth-client-limit=3/1h:lockout=1h")
        .start();
    node.wait_ops_status(200, Duration::from_secs(15));
    let api = api(&node);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let guesses: Vec<_> = (0..30)
            .map(|n| {
                s.spawn(move || {
                    let basic = base64::engine::general_purpose::STANDARD
                        .encode(format!("{CLIENT}:guess-{n}"));
                    let request = format!(
                        "POST /oauth2/introspect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                         Authorization: Basic {basic}\r\n\
                         Content-Type: application/x-www-form-urlencoded\r\n\
                         Content-Length: 7\r\n\r\ntoken=x"
                    );
                    http_raw(tcp(api), request.as_bytes()).status
                })
            })
            .collect();
        guesses.into_iter().map(|g| g.join().unwrap()).collect()
    });
    let wrong = statuses.iter().filter(|s| **s == 401).count();
    let locked = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((wrong, locked), (3, 27), "{statuses:?}");
    assert_eq!(
        node.metric("authsidecar_oauth_client_failures_total", &[]),
        3.0
    );
    // The right secret is refused too, now.
    let form = "token=x";
    let r = post(
        &node,
        "/oauth2/introspect",
        Some((CLIENT, CLIENT_SECRET)),
        form,
        "",
    );
    assert_eq!(r.status, 429);
    // 27 guesses and the right secret, each refused by the lockout.
    let lockouts = node.metric("authsidecar_lockouts_total", &["policy=\"oauth_client\""]);
    assert_eq!(lockouts, 28.0);
}
