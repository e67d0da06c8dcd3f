//! The TokenService behaviour suite, over real gRPC against a real sidecar process. Every
//! scenario takes a started sidecar, so the same suite runs on every backend (memory, Redis,
//! Redis Cluster, PostgreSQL, tiered) and over a Unix socket.

mod support;

use pb::InvalidReason as R;
use pb::revoke_request::Target;
use serde_json::{Value, json};
use support::backends::Backend;
use support::{
    Deployment, SECRET, Sidecar, assert_status, forge, now, parts, struct_of, with_claim,
};
use tonic::Code;

use auth_sidecar::pb;

/// Generates one test per scenario for a way of starting the sidecar.
macro_rules! suite {
    ($name:ident, $start:expr) => {
        mod $name {
            use super::*;

            fn start() -> Deployment {
                $start
            }

            #[tokio::test]
            async fn issue_validate_revoke() {
                super::issue_validate_revoke(&start()).await
            }

            #[tokio::test]
            async fn every_invalid_reason() {
                super::every_invalid_reason(&start()).await
            }

            #[tokio::test]
            async fn bad_requests_name_the_field() {
                super::bad_requests_name_the_field(&start()).await
            }

            #[tokio::test]
            async fn ttl_audience_and_kind() {
                super::ttl_audience_and_kind(&start()).await
            }

            #[tokio::test]
            async fn absurd_times_are_answered() {
                super::absurd_times_are_answered(&start()).await
            }

            #[tokio::test]
            async fn hostile_input_gets_a_clear_status() {
                super::hostile_input_gets_a_clear_status(&start()).await
            }
        }
    };
}

suite!(memory, Deployment::start(Backend::Memory, 1, &[]));
suite!(redis, Deployment::start(Backend::Redis, 1, &[]));
suite!(
    redis_cluster,
    Deployment::start(Backend::RedisCluster, 1, &[])
);
suite!(postgres, Deployment::start(Backend::Postgres, 1, &[]));
suite!(pgbouncer, Deployment::start(Backend::PgBouncer, 1, &[]));
suite!(tiered, Deployment::start(Backend::Tiered, 1, &[]));
suite!(
    unix_socket,
    Deployment::start(
        Backend::Memory,
        1,
        &[&format!(
            "--listen=unix:{}/auth-sidecar-test-{}.sock",
            std::env::temp_dir().display(),
            support::now_nanos()
        )]
    )
);

async fn issue_validate_revoke(sidecar: &Sidecar) {
    let mut c = sidecar.client().await;
    let issued = c
        .issue_with(pb::IssueRequest {
            subject: "alice".into(),
            claims: Some(struct_of(json!({"role": "admin", "n": 3}))),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(issued.token_id.len() >= 22, "jti carries 128 bits");
    assert!(!issued.key_id.is_empty());
    let (header, _) = parts(&issued.token);
    assert_eq!(header["kid"], json!(issued.key_id));
    assert_eq!(header["alg"], json!("HS256"));
    // The log scan every test sidecar gets when dropped would see this token in a log line.
    let line = format!(r#"{{"message":"oops","token":"{}"}}"#, issued.token);
    assert_eq!(support::find_jwt(&line), Some(issued.token.as_str()));

    let v = c.assert_valid(&issued.token).await;
    assert_eq!(v.subject, "alice");
    assert_eq!(v.token_id, issued.token_id);
    assert_eq!(v.kind(), pb::TokenKind::Access);
    assert_eq!(v.claims, Some(struct_of(json!({"role": "admin", "n": 3}))));
    let exp = v.expires_at.unwrap().seconds;
    assert!(
        (exp - (now() + 15 * 60)).abs() <= 2,
        "default ttl is 15 minutes"
    );

    let r = c.revoke(Target::Token(issued.token.clone())).await.unwrap();
    assert!(r.newly_revoked);
    c.assert_rejected(&issued.token, R::Revoked).await;
    let again = c.revoke(Target::Token(issued.token.clone())).await.unwrap();
    assert!(!again.newly_revoked, "revoke is idempotent");

    let other = c.issue("bob").await;
    let r = c
        .revoke(Target::TokenId(other.token_id.clone()))
        .await
        .unwrap();
    assert!(r.newly_revoked);
    c.assert_rejected(&other.token, R::Revoked).await;
}

async fn every_invalid_reason(sidecar: &Sidecar) {
    let mut c = sidecar.client().await;
    let good = c.issue("alice").await.token;
    let t = now();
    let cases: Vec<(&str, String, R)> = vec![
        (
            "expired",
            forge(&good, SECRET, with_claim("exp", json!(t - 120))),
            R::Expired,
        ),
        (
            "nbf in the future",
            forge(&good, SECRET, with_claim("nbf", json!(t + 600))),
            R::NotYetValid,
        ),
        (
            "iat in the future",
            forge(&good, SECRET, with_claim("iat", json!(t + 600))),
            R::NotYetValid,
        ),
        (
            "wrong issuer",
            forge(&good, SECRET, with_claim("iss", json!("evil"))),
            R::WrongIssuer,
        ),
        (
            "signed with another secret",
            forge(&good, "another-secret-another-secret-0123456", |_, _| {}),
            R::BadSignature,
        ),
        (
            "alg none",
            forge(&good, SECRET, |h, _| {
                h.insert("alg".into(), json!("none"));
            }),
            R::BadSignature,
        ),
        (
            "HS512 with the same secret",
            forge(&good, SECRET, |h, _| {
                h.insert("alg".into(), json!("HS512"));
            }),
            R::BadSignature,
        ),
        (
            "RS256 header",
            forge(&good, SECRET, |h, _| {
                h.insert("alg".into(), json!("RS256"));
            }),
            R::BadSignature,
        ),
        (
            "unknown kid",
            forge(&good, SECRET, |h, _| {
                h.insert("kid".into(), json!("nope"));
            }),
            R::UnknownKey,
        ),
        (
            "no kid",
            forge(&good, SECRET, |h, _| {
                h.remove("kid");
            }),
            R::UnknownKey,
        ),
        (
            "exp as a string",
            forge(
                &good,
                SECRET,
                with_claim("exp", json!((t + 600).to_string())),
            ),
            R::Malformed,
        ),
        (
            "sub as a number",
            forge(&good, SECRET, with_claim("sub", json!(7))),
            R::Malformed,
        ),
        (
            "no jti",
            forge(&good, SECRET, |_, c| {
                c.remove("jti");
            }),
            R::Malformed,
        ),
        ("broken base64", broken_base64(&good), R::Malformed),
        (
            "truncated",
            good.rsplit_once('.').unwrap().0.to_owned(),
            R::Malformed,
        ),
        ("not a JWT", "hello".to_owned(), R::Malformed),
        (
            "tampered signature",
            tampered_signature(&good),
            R::BadSignature,
        ),
    ];
    for (what, token, reason) in cases {
        let resp = c
            .validate(&token)
            .await
            .unwrap_or_else(|s| panic!("{what}: {s:?}"));
        assert!(!resp.valid, "{what}: accepted");
        assert_eq!(resp.reason(), reason, "{what}");
        assert!(resp.claims.is_none(), "{what}: claims leaked");
    }
    let wrong_aud = c
        .validate_with(pb::ValidateRequest {
            token: good.clone(),
            audience: "billing".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(wrong_aud.reason(), R::WrongAudience);
    let refresh = c
        .issue_with(pb::IssueRequest {
            subject: "alice".into(),
            kind: pb::TokenKind::Refresh.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    c.assert_rejected(&refresh.token, R::WrongKind).await;
    // Still good after all of that: the failures above were about the forgeries.
    c.assert_valid(&good).await;
}

/// Changes the first character of the signature, keeping it valid base64url.
fn tampered_signature(token: &str) -> String {
    let (message, sig) = token.rsplit_once('.').unwrap();
    let first = if sig.starts_with('A') { 'B' } else { 'A' };
    format!("{message}.{first}{}", &sig[1..])
}

/// Replaces one character of the payload with one outside the base64url alphabet.
fn broken_base64(token: &str) -> String {
    let (header, rest) = token.split_once('.').unwrap();
    format!("{header}.*{}", &rest[1..])
}

async fn bad_requests_name_the_field(sidecar: &Sidecar) {
    let mut c = sidecar.client().await;
    assert_status(c.validate("").await, Code::InvalidArgument, "token");
    // Over the 8 KiB token limit but within the request limit: the field is named.
    let long = "a".repeat(16 * 1024);
    assert_status(c.validate(&long).await, Code::InvalidArgument, "token");
    assert_status(
        c.revoke(Target::Token(long)).await,
        Code::InvalidArgument,
        "token",
    );
    // Over the request limit: refused before it is decoded.
    let huge = "a".repeat(1 << 20);
    assert_eq!(
        c.revoke(Target::Token(huge)).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    assert_status(
        c.issue_with(pb::IssueRequest::default()).await,
        Code::InvalidArgument,
        "subject",
    );
    for reserved in [
        "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "sid", "typ", "fam", "auth_ms",
    ] {
        let res = c
            .issue_with(pb::IssueRequest {
                subject: "alice".into(),
                claims: Some(struct_of(json!({ reserved: "x" }))),
                ..Default::default()
            })
            .await;
        assert_status(res, Code::InvalidArgument, "claims");
    }
    for ttl in [25 * 3600, 0, -5] {
        let res = c
            .issue_with(pb::IssueRequest {
                subject: "alice".into(),
                ttl: Some(prost_types::Duration {
                    seconds: ttl,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await;
        assert_status(res, Code::InvalidArgument, "ttl");
    }
    let res = c
        .issue_with(pb::IssueRequest {
            subject: "alice".into(),
            kind: 7,
            ..Default::default()
        })
        .await;
    assert_status(res, Code::InvalidArgument, "kind");
    let res = c.0.revoke(pb::RevokeRequest::default()).await;
    assert_status(res, Code::InvalidArgument, "target");
    let good = c.issue("alice").await.token;
    let forged = forge(&good, "another-secret-another-secret-0123456", |_, _| {});
    assert_status(
        c.revoke(Target::Token(forged)).await,
        Code::InvalidArgument,
        "token",
    );
    c.assert_valid(&good).await;
    assert_status(
        c.revoke(Target::TokenId(String::new())).await,
        Code::InvalidArgument,
        "token_id",
    );
}

async fn ttl_audience_and_kind(sidecar: &Sidecar) {
    let mut c = sidecar.client().await;
    let session = c.create_session("alice").await;
    let issued = c
        .issue_with(pb::IssueRequest {
            subject: "alice".into(),
            audience: vec!["billing".into(), "shop".into()],
            ttl: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            session_id: session.id.clone(),
            kind: pb::TokenKind::Refresh.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!((issued.expires_at.unwrap().seconds - (now() + 60)).abs() <= 2);
    let (_, claims) = parts(&issued.token);
    assert_eq!(claims["aud"], json!(["billing", "shop"]));
    let resp = c
        .validate_with(pb::ValidateRequest {
            token: issued.token.clone(),
            audience: "shop".into(),
            kind: pb::TokenKind::Refresh.into(),
        })
        .await
        .unwrap();
    assert!(resp.valid, "{:?}", resp.reason());
    assert_eq!(resp.session_id, session.id);
    assert_eq!(resp.kind(), pb::TokenKind::Refresh);
}

/// A signed token with a time no clock reaches (or one beyond the longest lifetime) is
/// MALFORMED to Validate, and refused by Revoke as not a token of this sidecar: an answer,
/// never a dropped call.
async fn absurd_times_are_answered(sidecar: &Sidecar) {
    let mut c = sidecar.client().await;
    let issued = c.issue("alice").await;
    for (claim, value) in [
        ("exp", json!(1e300)),
        ("exp", json!(18446744073709551615u64)),
        ("exp", json!(-1e300)),
        ("exp", json!(now() + 25 * 3600)),
        ("iat", json!(1e300)),
        ("nbf", json!(-1)),
    ] {
        let token = forge(&issued.token, SECRET, with_claim(claim, value.clone()));
        c.assert_rejected(&token, R::Malformed).await;
        assert_status(
            c.revoke(Target::Token(token)).await,
            Code::InvalidArgument,
            "token",
        );
    }
    // The call after still works: nothing was dropped.
    c.assert_valid(&issued.token).await;
}

/// What a hostile caller sends gets a status that names the problem, the same on every
/// backend, and never a backend error: NUL in any string a backend stores, a session of another
/// subject, a `crit` header, an oversized message, claims nested past the decoder's limit.
async fn hostile_input_gets_a_clear_status(sidecar: &Sidecar) {
    let mut c = sidecar.client().await;
    let nul = "mallory\0".to_owned();
    assert_status(
        c.issue_with(pb::IssueRequest {
            subject: nul.clone(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "subject",
    );
    assert_status(
        c.issue_with(pb::IssueRequest {
            subject: "alice".into(),
            audience: vec![nul.clone()],
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "audience",
    );
    assert_status(
        c.revoke(Target::TokenId(nul.clone())).await,
        Code::InvalidArgument,
        "token_id",
    );
    assert_status(
        c.revoke(Target::Subject(nul.clone())).await,
        Code::InvalidArgument,
        "subject",
    );
    for metadata in [
        [(nul.clone(), "v".to_owned())],
        [("k".to_owned(), nul.clone())],
    ] {
        assert_status(
            c.0.create_session(pb::CreateSessionRequest {
                subject: "alice".into(),
                metadata: metadata.into_iter().collect(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "metadata",
        );
    }
    assert_status(
        c.0.get_session(pb::GetSessionRequest {
            session_id: nul.clone(),
        })
        .await,
        Code::InvalidArgument,
        "session_id",
    );
    assert_status(
        c.0.list_sessions(pb::ListSessionsRequest {
            subject: nul.clone(),
        })
        .await,
        Code::InvalidArgument,
        "subject",
    );
    assert_status(
        c.0.check_rate_limit(pb::CheckRateLimitRequest {
            policy: "none".into(),
            key: nul.clone(),
            cost: None,
        })
        .await,
        Code::InvalidArgument,
        "key",
    );
    assert_status(
        c.0.reset_rate_limit(pb::ResetRateLimitRequest {
            policy: "none".into(),
            key: nul.clone(),
        })
        .await,
        Code::InvalidArgument,
        "key",
    );

    // A session binds tokens of its own subject only, and says no more than a missing one.
    let session = c.create_session("alice").await;
    assert_status(
        c.issue_with(pb::IssueRequest {
            subject: "mallory".into(),
            session_id: session.id.clone(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "session_id",
    );

    // A critical header extension this sidecar does not understand (it understands none).
    let good = c.issue("alice").await.token;
    for crit in [json!(["exp"]), json!(["x-unknown"]), json!([])] {
        let token = forge(&good, SECRET, |header, _| {
            header.insert("crit".into(), crit.clone());
            header.insert("x-unknown".into(), json!(true));
        });
        c.assert_rejected(&token, R::Malformed).await;
    }

    // Larger than any valid request: refused before it is buffered.
    let huge = "x".repeat(40 * 1024);
    assert_eq!(
        c.validate(&huge).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    // Claims nested past protobuf's recursion limit do not decode: the caller's fault.
    let mut deep = json!("bottom");
    for _ in 0..120 {
        deep = json!({ "k": deep });
    }
    let Value::Object(deep) = deep else {
        unreachable!()
    };
    let res = c
        .issue_with(pb::IssueRequest {
            subject: "alice".into(),
            claims: Some(auth_sidecar::grpc::json_to_struct(deep)),
            ..Default::default()
        })
        .await;
    assert_eq!(res.unwrap_err().code(), Code::InvalidArgument);
    c.assert_valid(&good).await;
}
