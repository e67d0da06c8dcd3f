//! Sessions, logout everywhere and refresh-token rotation, on every backend. On the shared
//! backends each scenario runs on two nodes and crosses between them ("node A" does one
//! thing, "node B" sees it); on memory both are the same node.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use auth_sidecar::pb;
use pb::InvalidReason as R;
use pb::revoke_request::Target;
use support::backends::Backend;
use support::{Client, Deployment, parts};
use tonic::Code;

macro_rules! suite {
    ($name:ident, $backend:expr, $nodes:expr) => {
        mod $name {
            use super::*;

            fn start(args: &[&str]) -> Deployment {
                Deployment::start($backend, $nodes, args)
            }

            #[tokio::test]
            async fn session_lifecycle() {
                super::session_lifecycle(&start(&[])).await
            }

            #[tokio::test]
            async fn idle_timeout_and_expiry() {
                super::idle_timeout_and_expiry(&start(&["--session-idle-timeout=2s"])).await
            }

            #[tokio::test]
            async fn logout_everywhere() {
                super::logout_everywhere(&start(&[])).await
            }

            #[tokio::test]
            async fn logout_is_exact_to_the_call() {
                super::logout_is_exact_to_the_call(&start(&[])).await
            }

            #[tokio::test]
            async fn a_stolen_refresh_chain_ends_at_logout() {
                super::a_stolen_refresh_chain_ends_at_logout(&start(&[])).await
            }

            #[tokio::test]
            async fn refresh_chain_and_reuse() {
                super::refresh_chain_and_reuse(&start(&[])).await
            }

            #[tokio::test]
            async fn a_revoked_spent_refresh_token_presented_again_revokes_its_family() {
                super::a_revoked_spent_refresh_token_presented_again_revokes_its_family(&start(&[]))
                    .await
            }

            #[tokio::test]
            async fn parallel_refreshes() {
                super::parallel_refreshes(&start(&[])).await
            }

            #[tokio::test]
            async fn parallel_refreshes_within_grace() {
                super::parallel_refreshes_within_grace(&start(&["--refresh-reuse-grace=30s"])).await
            }

            #[tokio::test]
            async fn family_lifetime_ends_the_chain() {
                super::family_lifetime_ends_the_chain(&start(&["--refresh-max-lifetime=3s"])).await
            }
        }
    };
}

suite!(memory, Backend::Memory, 1);
suite!(redis, Backend::Redis, 2);
suite!(redis_cluster, Backend::RedisCluster, 2);
suite!(postgres, Backend::Postgres, 2);
suite!(pgbouncer, Backend::PgBouncer, 2);
suite!(tiered, Backend::Tiered, 2);

/// Clients of the first and the last node.
async fn clients(d: &Deployment) -> (Client, Client) {
    (
        d.nodes[0].client().await,
        d.nodes[d.nodes.len() - 1].client().await,
    )
}

async fn create_session(c: &mut Client, subject: &str, metadata: &[(&str, &str)]) -> pb::Session {
    c.0.create_session(pb::CreateSessionRequest {
        subject: subject.into(),
        ttl: None,
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })
    .await
    .expect("create session")
    .into_inner()
    .session
    .unwrap()
}

async fn get_session(c: &mut Client, id: &str) -> Result<pb::Session, tonic::Status> {
    c.0.get_session(pb::GetSessionRequest {
        session_id: id.into(),
    })
    .await
    .map(|r| r.into_inner().session.unwrap())
}

async fn issue_in(
    c: &mut Client,
    subject: &str,
    session_id: &str,
    kind: pb::TokenKind,
) -> pb::IssueResponse {
    c.issue_with(pb::IssueRequest {
        subject: subject.into(),
        session_id: session_id.into(),
        kind: kind.into(),
        ..Default::default()
    })
    .await
    .expect("issue")
}

async fn assert_valid_refresh(c: &mut Client, token: &str) {
    let v = c
        .validate_with(pb::ValidateRequest {
            token: token.into(),
            kind: pb::TokenKind::Refresh.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(v.valid, "refresh token rejected: {:?}", v.reason());
}

async fn assert_rejected_refresh(c: &mut Client, token: &str, reason: R) {
    let v = c
        .validate_with(pb::ValidateRequest {
            token: token.into(),
            kind: pb::TokenKind::Refresh.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!v.valid, "refresh token accepted");
    assert_eq!(v.reason(), reason);
}

async fn session_lifecycle(d: &Deployment) {
    let (mut a, mut b) = clients(d).await;
    let first = create_session(&mut a, "alice", &[("device", "phone")]).await;
    assert!(first.id.len() >= 26, "{}", first.id);
    assert_eq!(first.metadata["device"], "phone");
    let second = create_session(&mut b, "alice", &[]).await;
    create_session(&mut a, "bob", &[]).await;

    // Seen from the other node.
    let got = get_session(&mut b, &first.id).await.unwrap();
    assert_eq!(got, first);
    let listed =
        b.0.list_sessions(pb::ListSessionsRequest {
            subject: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    let ids: Vec<_> = listed.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [first.id.as_str(), second.id.as_str()], "oldest first");

    let touched =
        b.0.touch_session(pb::TouchSessionRequest {
            session_id: first.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let seen = |s: &pb::Session| {
        let t = s.last_seen_at.unwrap();
        (t.seconds, t.nanos)
    };
    assert!(seen(&touched) >= seen(&first));
    assert_eq!(
        touched.expires_at, first.expires_at,
        "a touch never extends the end"
    );

    // A token of the session lives with it, on every node.
    let token = issue_in(&mut a, "alice", &first.id, pb::TokenKind::Access).await;
    b.assert_valid(&token.token).await;
    let deleted =
        a.0.delete_session(pb::DeleteSessionRequest {
            session_id: first.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    a.assert_rejected(&token.token, R::Revoked).await;
    b.assert_rejected_soon(&token.token, R::Revoked).await;
    assert_eq!(
        get_session(&mut b, &first.id).await.unwrap_err().code(),
        Code::NotFound
    );
    let again =
        b.0.delete_session(pb::DeleteSessionRequest {
            session_id: first.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.deleted);

    // No token for a session that does not exist; bad requests name the field.
    let err = a
        .issue_with(pb::IssueRequest {
            subject: "alice".into(),
            session_id: first.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("session_id"), "{}", err.message());
    let err = get_session(&mut a, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("session_id"), "{}", err.message());
    let err = get_session(&mut a, "made-up").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err =
        a.0.create_session(pb::CreateSessionRequest {
            subject: "alice".into(),
            ttl: Some(prost_types::Duration {
                seconds: 25 * 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("ttl"), "{}", err.message());
    let list_left =
        a.0.list_sessions(pb::ListSessionsRequest {
            subject: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(list_left.len(), 1);
    assert_eq!(list_left[0].id, second.id);
}

async fn idle_timeout_and_expiry(d: &Deployment) {
    let (mut a, mut b) = clients(d).await;
    let idle = create_session(&mut a, "carol", &[]).await;
    assert!(idle.idle_expires_at.is_some());
    let short =
        a.0.create_session(pb::CreateSessionRequest {
            subject: "carol".into(),
            ttl: Some(prost_types::Duration {
                seconds: 3,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let token = issue_in(&mut a, "carol", &short.id, pb::TokenKind::Access).await;
    // Touched every half second, the idle session outlives its 2 s idle timeout, but the
    // 3 s session does not outlive its end however often it is touched.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for id in [&idle.id, &short.id] {
            let _ =
                b.0.touch_session(pb::TouchSessionRequest {
                    session_id: id.clone(),
                })
                .await;
        }
    }
    get_session(&mut b, &idle.id)
        .await
        .expect("touched session lives");
    assert_eq!(
        get_session(&mut a, &short.id).await.unwrap_err().code(),
        Code::NotFound
    );
    b.assert_rejected(&token.token, R::Revoked).await;
    // Left alone, the idle session ends.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        get_session(&mut a, &idle.id).await.unwrap_err().code(),
        Code::NotFound
    );
}

async fn logout_everywhere(d: &Deployment) {
    let (mut a, mut b) = clients(d).await;
    let session = create_session(&mut a, "dave", &[]).await;
    let plain = a.issue("dave").await;
    let in_session = issue_in(&mut b, "dave", &session.id, pb::TokenKind::Access).await;
    let refresh_token = issue_in(&mut a, "dave", "", pb::TokenKind::Refresh).await;
    let other = a.issue("erin").await;

    let r = a.revoke(Target::Subject("dave".into())).await.unwrap();
    assert!(r.newly_revoked);
    assert_eq!(r.sessions_deleted, 1);
    a.assert_rejected(&plain.token, R::Revoked).await;
    a.assert_rejected(&in_session.token, R::Revoked).await;
    b.assert_rejected_soon(&plain.token, R::Revoked).await;
    b.assert_rejected_soon(&in_session.token, R::Revoked).await;
    for c in [&mut a, &mut b] {
        c.assert_valid(&other.token).await;
    }
    assert_rejected_refresh(&mut b, &refresh_token.token, R::Revoked).await;
    assert_eq!(
        b.refresh(&refresh_token.token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        get_session(&mut b, &session.id).await.unwrap_err().code(),
        Code::NotFound
    );
    // Issued after the call, at once: valid everywhere.
    let after = b.issue("dave").await;
    a.assert_valid(&after.token).await;
    b.assert_valid(&after.token).await;
}

/// Hundreds of times: a token issued and answered, then a logout, then the token is revoked,
/// even when both fall in one millisecond: at once on the node that logged out, and on the
/// other once its revocation view has heard of it; and a token issued once the logout has
/// answered is valid.
async fn logout_is_exact_to_the_call(d: &Deployment) {
    let (mut a, mut b) = clients(d).await;
    for i in 0..300 {
        let before = a.issue("yves").await;
        a.revoke(Target::Subject("yves".into())).await.unwrap();
        let v = a.validate(&before.token).await.unwrap();
        assert!(
            !v.valid,
            "try {i}: a token issued before the logout is valid"
        );
        assert_eq!(v.reason(), R::Revoked);
        b.assert_rejected_soon(&before.token, R::Revoked).await;
        let after = b.issue("yves").await;
        a.assert_valid(&after.token).await;
    }
}

/// An attacker refreshes a stolen refresh token in a loop while the victim logs out: once the
/// logout has answered, no refresh succeeds (beyond the one in flight), and every token the
/// chain produced, the last included, is revoked. Ten trials, as the race is a narrow one.
async fn a_stolen_refresh_chain_ends_at_logout(d: &Deployment) {
    for trial in 0..10 {
        stolen_chain_trial(d, &format!("zoe{trial}")).await;
    }
}

async fn stolen_chain_trial(d: &Deployment, subject: &str) {
    let (mut a, b) = clients(d).await;
    let first = issue_in(&mut a, subject, "", pb::TokenKind::Refresh)
        .await
        .token;
    let logged_out = std::sync::Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
    let refreshed = std::sync::Arc::new(tokio::sync::Notify::new());
    let attacker = {
        let (mut b, logged_out, refreshed) = (b.clone(), logged_out.clone(), refreshed.clone());
        tokio::spawn(async move {
            let mut current = first;
            let mut minted = Vec::new();
            let mut after_logout = 0;
            loop {
                let started = std::time::Instant::now();
                let Ok(r) = b.refresh(&current).await else {
                    return (minted, after_logout);
                };
                if logged_out.lock().unwrap().is_some_and(|at| started > at) {
                    after_logout += 1;
                }
                minted.push(r.access.unwrap().token);
                current = r.refresh.unwrap().token;
                minted.push(current.clone());
                refreshed.notify_one();
                assert!(minted.len() < 20_000, "the chain never ended");
            }
        })
    };
    // The logout lands while the loop runs: after its first refresh (however slow the
    // machine), and a little later.
    tokio::time::timeout(Duration::from_secs(10), refreshed.notified())
        .await
        .expect("the loop never refreshed");
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.revoke(Target::Subject(subject.into())).await.unwrap();
    *logged_out.lock().unwrap() = Some(std::time::Instant::now());
    let (minted, after_logout) = attacker.await.unwrap();
    assert!(
        minted.len() > 2,
        "{subject}: the loop never ran before the logout"
    );
    assert_eq!(
        after_logout, 0,
        "{subject}: refreshes started after the logout succeeded"
    );
    let mut b = b;
    for (i, token) in minted.iter().enumerate() {
        let kind = if i % 2 == 0 {
            pb::TokenKind::Access
        } else {
            pb::TokenKind::Refresh
        };
        let v = b
            .validate_with(pb::ValidateRequest {
                token: token.clone(),
                kind: kind.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            v.reason(),
            R::Revoked,
            "{subject}: token {i} of {}",
            minted.len()
        );
    }
}

async fn refresh_chain_and_reuse(d: &Deployment) {
    let (mut a, mut b) = clients(d).await;
    let session = create_session(&mut a, "frank", &[]).await;
    let first = issue_in(&mut a, "frank", &session.id, pb::TokenKind::Refresh).await;
    let (_, claims) = parts(&first.token);
    let family = claims["fam"].as_str().expect("a family").to_owned();

    // Generations 1 to 6, alternating nodes; each access token valid on the other node.
    let mut refresh_tokens = vec![first.token.clone()];
    let mut access_tokens = Vec::new();
    for generation in 0..5 {
        let (from, to) = if generation % 2 == 0 {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        let r = from.refresh(refresh_tokens.last().unwrap()).await.unwrap();
        let (access, next) = (r.access.unwrap(), r.refresh.unwrap());
        to.assert_valid(&access.token).await;
        assert_valid_refresh(to, &next.token).await;
        let (_, claims) = parts(&next.token);
        assert_eq!(claims["fam"], family.as_str());
        assert_eq!(claims["sid"], session.id.as_str());
        assert_eq!(claims["sub"], "frank");
        access_tokens.push(access.token);
        refresh_tokens.push(next.token);
    }
    assert_eq!(refresh_tokens.len(), 6);

    // Generation 2 again: the whole family is revoked, on every node.
    let err = b.refresh(&refresh_tokens[1]).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("already spent"), "{}", err.message());
    // Node B spent the token, so it knows at once; node A within its view's bound.
    for token in &access_tokens {
        a.assert_rejected_soon(token, R::Revoked).await;
    }
    for c in [&mut a, &mut b] {
        for token in &refresh_tokens {
            assert_rejected_refresh(c, token, R::Revoked).await;
        }
        for token in &access_tokens {
            c.assert_rejected(token, R::Revoked).await;
        }
    }
    // Even the newest refresh token is spent.
    let err = a.refresh(refresh_tokens.last().unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // The session itself is untouched: a new login in it starts a new family.
    let fresh = issue_in(&mut b, "frank", &session.id, pb::TokenKind::Refresh).await;
    a.refresh(&fresh.token).await.expect("a new family");

    // An access token is not a refresh token.
    let access = a.issue("frank").await;
    assert_eq!(
        a.refresh(&access.token).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        a.refresh("").await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

/// R0 refreshed to R1, then R0 revoked by token and presented again: still a reuse of a spent
/// token, so the family goes, R1 and its access token with it. (Revoked was answered first,
/// and R1 lived on.)
async fn a_revoked_spent_refresh_token_presented_again_revokes_its_family(d: &Deployment) {
    let (mut a, mut b) = clients(d).await;
    let spent = a.issue_refresh("ivan").await;
    let r = a.refresh(&spent).await.unwrap();
    let (access, next) = (r.access.unwrap().token, r.refresh.unwrap().token);
    a.revoke(Target::Token(spent.clone())).await.unwrap();
    let err = b.refresh(&spent).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("family is now revoked"), "{err:?}");
    b.assert_rejected(&access, R::Revoked).await;
    a.assert_rejected_soon(&access, R::Revoked).await;
    assert_eq!(
        a.refresh(&next).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    // A revoked token of a live family that was never spent is refused, and changes nothing.
    let current = a.issue_refresh("judy").await;
    a.revoke(Target::Token(current.clone())).await.unwrap();
    let err = b.refresh(&current).await.unwrap_err();
    assert!(err.message().contains("revoked"), "{err:?}");
}

/// 20 refreshes of one token at once, half on each node.
async fn race(d: &Deployment, token: &str) -> Vec<Result<pb::RefreshResponse, tonic::Status>> {
    let mut calls = Vec::new();
    for i in 0..20 {
        let mut c = d.nodes[i % d.nodes.len()].client().await;
        let token = token.to_owned();
        calls.push(tokio::spawn(async move { c.refresh(&token).await }));
    }
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    results
}

async fn parallel_refreshes(d: &Deployment) {
    let mut a = d.nodes[0].client().await;
    let first = issue_in(&mut a, "grace", "", pb::TokenKind::Refresh).await;
    let results = race(d, &first.token).await;
    let won: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    // One rotates, and the next gets the same successor (the one retry a lost answer gets).
    assert_eq!(
        won.len(),
        2,
        "one rotation and one retry succeed: {results:?}"
    );
    assert_eq!(
        won[0].refresh.as_ref().unwrap().token_id,
        won[1].refresh.as_ref().unwrap().token_id
    );
    for r in &results {
        if let Err(status) = r {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        }
    }
    // Without a grace period the others are reuses: the family, and with it the winner's
    // new tokens, is revoked (RFC 9700: a reuse cannot be told from a theft).
    let winner = won[0].refresh.as_ref().unwrap();
    assert_rejected_refresh(&mut a, &winner.token, R::Revoked).await;
}

async fn parallel_refreshes_within_grace(d: &Deployment) {
    let mut a = d.nodes[0].client().await;
    let first = issue_in(&mut a, "heidi", "", pb::TokenKind::Refresh).await;
    let results = race(d, &first.token).await;
    // One rotation; every other call is a replay of it: the same token ids.
    let mut refresh_ids = BTreeSet::new();
    let mut access_ids = BTreeSet::new();
    for r in &results {
        let r = r
            .as_ref()
            .expect("within the grace period every retry succeeds");
        refresh_ids.insert(r.refresh.as_ref().unwrap().token_id.clone());
        access_ids.insert(r.access.as_ref().unwrap().token_id.clone());
    }
    assert_eq!(refresh_ids.len(), 1, "{refresh_ids:?}");
    assert_eq!(access_ids.len(), 1, "{access_ids:?}");
    let successor = results[0].as_ref().unwrap().refresh.clone().unwrap();
    assert_valid_refresh(&mut a, &successor.token).await;
    // Spending the successor moves on; the first token is two generations old now: reuse.
    a.refresh(&successor.token).await.expect("rotate on");
    let err = a.refresh(&first.token).await.unwrap_err();
    assert!(err.message().contains("already spent"), "{}", err.message());
}

async fn family_lifetime_ends_the_chain(d: &Deployment) {
    let (mut a, mut b) = clients(d).await;
    let first = issue_in(&mut a, "ivan", "", pb::TokenKind::Refresh).await;
    let r = b.refresh(&first.token).await.unwrap();
    let next = r.refresh.unwrap();
    // No token of the family outlives it.
    assert!(next.expires_at.unwrap().seconds <= first.expires_at.unwrap().seconds + 3);
    assert!(r.access.unwrap().expires_at.unwrap().seconds <= support::now() + 4);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let err = a.refresh(&next.token).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}
