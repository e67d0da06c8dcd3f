//! Several sidecars, one store: what one node revokes, every node rejects at its next call.
//! And the failure cases: a backend killed under load, lost data, a boot before the backend,
//! and the guard against per-node random keys.

mod support;

use std::time::{Duration, Instant};

use auth_sidecar::pb;
use pb::InvalidReason as R;
use pb::revoke_request::Target;
use support::backends::{Backend, PostgresServer, RedisServer, Storage};
use support::{Client, Deployment, Sidecar};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

/// Issue on A, validate on B and C; revoke on C; A and B reject once their revocation views
/// have heard of it (one push: nearly always their next call), C at once.
async fn revocation_reaches_every_node(backend: Backend) {
    let d = Deployment::start(backend, 3, &[]);
    let mut clients = Vec::new();
    for node in &d.nodes {
        clients.push(node.client().await);
    }
    let issued = clients[0].issue("alice").await;
    for c in &mut clients[1..] {
        c.assert_valid(&issued.token).await;
    }
    let r = clients[2]
        .revoke(Target::Token(issued.token.clone()))
        .await
        .unwrap();
    assert!(r.newly_revoked);
    clients[2].assert_rejected(&issued.token, R::Revoked).await;
    for c in &mut clients[..2] {
        c.assert_rejected_soon(&issued.token, R::Revoked).await;
    }
    // By id, from another node, for a token another node issued: the same.
    let other = clients[1].issue("bob").await;
    clients[0].assert_valid(&other.token).await;
    let again = clients[0]
        .revoke(Target::TokenId(other.token_id.clone()))
        .await
        .unwrap();
    assert!(again.newly_revoked);
    let twice = clients[2]
        .revoke(Target::TokenId(other.token_id.clone()))
        .await
        .unwrap();
    assert!(
        !twice.newly_revoked,
        "another node sees it as already revoked"
    );
    for c in &mut clients {
        c.assert_rejected_soon(&other.token, R::Revoked).await;
    }
}

#[tokio::test]
async fn multi_node_redis() {
    revocation_reaches_every_node(Backend::Redis).await
}

#[tokio::test]
async fn multi_node_redis_cluster() {
    revocation_reaches_every_node(Backend::RedisCluster).await
}

#[tokio::test]
async fn multi_node_postgres() {
    revocation_reaches_every_node(Backend::Postgres).await
}

/// Through PgBouncer in transaction mode: the pool without prepared statements, the
/// migrations and the feed on a direct connection.
#[tokio::test]
async fn multi_node_pgbouncer() {
    revocation_reaches_every_node(Backend::PgBouncer).await
}

#[tokio::test]
async fn multi_node_tiered() {
    revocation_reaches_every_node(Backend::Tiered).await
}

const FAST_CHECKS: [&str; 2] = ["--backend-check-interval=300ms", "--backend-timeout=300ms"];

async fn health_status(node: &Sidecar) -> ServingStatus {
    let mut h = node.health().await;
    h.check(HealthCheckRequest {
        service: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .status()
}

/// Keeps Validate calls in flight across the loss of the backend: each answers with the truth
/// or UNAVAILABLE, none hangs past the backend timeout, and once the backend has been down for
/// a moment every answer is UNAVAILABLE. Health turns NOT_SERVING within two check intervals.
async fn fails_closed_while_down(node: &Sidecar, token: &str, kill: impl FnOnce()) {
    let calls = {
        let api = node.api.clone();
        let token = token.to_owned();
        tokio::spawn(async move {
            let mut c = Client(pb::token_service_client::TokenServiceClient::new(
                support::connect(&api).await,
            ));
            let mut seen = Vec::new();
            let end = Instant::now() + Duration::from_millis(2500);
            while Instant::now() < end {
                let started = Instant::now();
                let result = c.validate(&token).await;
                seen.push((
                    started,
                    started.elapsed(),
                    result.map(|r| r.valid).map_err(|s| s.code()),
                ));
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    kill();

    let deadline = killed_at + Duration::from_millis(2 * 300 + 400);
    loop {
        if health_status(node).await == ServingStatus::NotServing {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "health still SERVING two intervals after the kill"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(node.ops_get("/healthz"), 503);

    let seen = calls.await.unwrap();
    assert!(
        seen.iter().any(|(_, _, r)| *r == Ok(true)),
        "no call before the kill answered"
    );
    for (started, took, result) in &seen {
        assert!(
            *took < Duration::from_millis(1500),
            "a call hung for {took:?}"
        );
        match result {
            Ok(true) => assert!(
                *started < killed_at + Duration::from_millis(300),
                "valid after the kill"
            ),
            Err(Code::Unavailable) => {}
            other => panic!("unexpected answer while the backend died: {other:?}"),
        }
    }
    assert!(
        seen.iter().any(|(_, _, r)| *r == Err(Code::Unavailable)),
        "no call saw the outage"
    );
}

/// After the backend returns: SERVING again and correct answers, without a restart.
async fn recovers(node: &Sidecar, client: &mut Client) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while health_status(node).await != ServingStatus::Serving {
        assert!(
            Instant::now() < deadline,
            "not SERVING after the backend returned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fresh = client.issue("after").await;
    client.assert_valid(&fresh.token).await;
    client
        .revoke(Target::Token(fresh.token.clone()))
        .await
        .unwrap();
    client.assert_rejected(&fresh.token, R::Revoked).await;
}

#[tokio::test]
async fn redis_killed_under_load_fails_closed_then_recovers() {
    let mut redis = RedisServer::start();
    let d = Deployment::on(Storage::on_redis(&redis), 1, &FAST_CHECKS);
    let mut c = d.client().await;
    let token = c.issue("alice").await.token;
    fails_closed_while_down(&d, &token, || redis.kill()).await;
    let revoke = c.revoke(Target::Token(token.clone())).await;
    assert_eq!(
        revoke.unwrap_err().code(),
        Code::Unavailable,
        "an unstored revoke said OK"
    );
    redis.restart();
    recovers(&d, &mut c).await;
}

#[tokio::test]
async fn postgres_killed_under_load_fails_closed_then_recovers() {
    let mut postgres = PostgresServer::start();
    let d = Deployment::on(Storage::on_postgres(&postgres), 1, &FAST_CHECKS);
    let mut c = d.client().await;
    let token = c.issue("alice").await.token;
    fails_closed_while_down(&d, &token, || postgres.kill()).await;
    let revoke = c.revoke(Target::Token(token.clone())).await;
    assert_eq!(
        revoke.unwrap_err().code(),
        Code::Unavailable,
        "an unstored revoke said OK"
    );
    postgres.restart();
    recovers(&d, &mut c).await;
}

/// Revocations, logouts, sessions and revoked refresh families all survive Redis losing its
/// data under tiered storage: PostgreSQL answers until Redis is refilled from it.
#[tokio::test]
async fn tiered_keeps_revocations_when_redis_loses_everything() {
    let redis = RedisServer::start();
    let storage = Storage::tiered_on(&redis);
    let d = Deployment::on(storage, 2, &[]);
    let mut a = d.nodes[0].client().await;
    let mut b = d.nodes[1].client().await;
    let issued = a.issue("alice").await;
    let kept = a.issue("bob").await;
    a.revoke(Target::Token(issued.token.clone())).await.unwrap();
    let logged_out = a.issue("carol").await;
    a.revoke(Target::Subject("carol".into())).await.unwrap();
    let session = a.create_session("dave").await;
    let in_session = a
        .issue_with(pb::IssueRequest {
            subject: "dave".into(),
            session_id: session.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let refresh = a
        .issue_with(pb::IssueRequest {
            subject: "erin".into(),
            kind: pb::TokenKind::Refresh.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let rotated = a.refresh(&refresh.token).await.unwrap();
    b.refresh(&refresh.token).await.unwrap(); // the one retry of a lost answer
    b.refresh(&refresh.token).await.unwrap_err(); // a reuse: the family is revoked
    let family_access = rotated.access.unwrap().token;

    let flushes: Vec<f64> = d.nodes.iter().map(|n| n.view_flushes()).collect();
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    // At once (from a view that has not heard of the flush yet, else from PostgreSQL), and
    // again once every view has, when a Validate reads Redis and starts the refill.
    for settled in [false, true] {
        if settled {
            for (node, before) in d.nodes.iter().zip(&flushes) {
                node.wait_view_flushed(*before);
            }
        }
        for c in [&mut b, &mut a] {
            c.assert_rejected(&issued.token, R::Revoked).await;
            c.assert_rejected(&logged_out.token, R::Revoked).await;
            c.assert_rejected(&family_access, R::Revoked).await;
            c.assert_valid(&kept.token).await;
            c.assert_valid(&in_session.token).await;
        }
    }

    // Redis is refilled from PostgreSQL: the record and the completeness marker are back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys = redis.cli(&["--scan", "--pattern", "*"]);
        if keys.contains(&format!("revoked:{}", issued.token_id))
            && keys.contains("tier:{marker}:complete")
            && keys.contains(&session.id)
            && keys.contains("cutoff:")
            && keys.contains("family:")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "redis was not refilled; keys: {keys}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.assert_rejected(&issued.token, R::Revoked).await;
    b.assert_rejected(&logged_out.token, R::Revoked).await;
    b.assert_rejected(&family_access, R::Revoked).await;
    b.assert_valid(&in_session.token).await;
}

#[tokio::test]
async fn starts_before_its_backend_and_serves_once_it_answers() {
    let port = support::backends::free_port();
    let node = Sidecar::builder()
        .arg("--storage=redis")
        .env("REDIS_URL", format!("redis://127.0.0.1:{port}"))
        .start();
    assert_eq!(health_status(&node).await, ServingStatus::NotServing);
    let mut c = node.client().await;
    let token = c.issue("alice").await.token;
    assert_eq!(
        c.validate(&token).await.unwrap_err().code(),
        Code::Unavailable
    );

    let _redis = RedisServer::on_port(port);
    node.wait_ops_status(200, Duration::from_secs(15));
    c.assert_valid(&token).await;
}

#[test]
fn shared_storage_without_a_shared_secret_is_refused() {
    for backend in ["redis", "postgres", "tiered"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_auth-sidecar"))
            .args(["serve", "--storage", backend])
            .env_remove("AUTH_JWT_SECRET")
            .env("REDIS_URL", "redis://127.0.0.1:1")
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{backend}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.contains("AUTH_JWT_SECRET") && stderr.contains("random key"),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

#[tokio::test]
async fn migrate_subcommand_prepares_the_schema_for_nodes_that_do_not_migrate() {
    let storage = Storage::new(Backend::Postgres);
    let url = storage
        .env
        .iter()
        .find(|(k, _)| k == "DATABASE_URL")
        .map(|(_, v)| v.clone())
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_auth-sidecar"))
        .arg("migrate")
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = Deployment::on(storage, 1, &["--migrate=false"]);
    let mut c = d.client().await;
    let issued = c.issue("alice").await;
    c.revoke(Target::Token(issued.token.clone())).await.unwrap();
    c.assert_rejected(&issued.token, R::Revoked).await;

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_auth-sidecar"))
        .args(["migrate", "--timeout", "1s"])
        .env(
            "DATABASE_URL",
            format!(
                "postgres://postgres@127.0.0.1:{}/x",
                support::backends::free_port()
            ),
        )
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
}
