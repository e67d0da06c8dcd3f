//! Tiered storage under races and faults: a refill of Redis that races logouts, session ends
//! and refresh reuses must not undo one of them, and a write PostgreSQL took but Redis did not
//! must make Redis stop vouching. Each test here failed on the store before the monotone
//! mirror writes and the voided marker.

mod support;

use std::time::{Duration, Instant};

use auth_sidecar::pb;
use base64::Engine;
use futures_util::future::join_all;
use pb::InvalidReason as R;
use pb::revoke_request::Target;
use support::backends::{RedisServer, SlowLink, Storage, psql_on};
use support::{Client, Deployment, Sidecar};
use tonic::Code;

/// Targets of each kind: subjects logged out, sessions ended, families reused.
const TARGETS: usize = 200;

/// Filler rows of each kind that sort before the targets, in the refill's first batch: the
/// refill reads the batch, then writes these before it writes the targets.
const BEFORE: usize = 400;

/// A Redis client of the test's own, for watching the refill.
async fn redis_conn(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn key_exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

async fn wait_for_key(conn: &mut redis::aio::MultiplexedConnection, key: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if key_exists(conn, key).await {
            return;
        }
        assert!(Instant::now() < deadline, "{key} never appeared");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The hash tag Redis keys of a subject carry (base64url of three bytes of its SHA-256).
fn subject_tag(subject: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, subject.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest.as_ref()[..3])
}

/// `BEFORE` rows of each kind whose ids and subjects (`0000…`) sort before every target's.
fn insert_fillers(database_url: &str) {
    let now = support::now() * 1000;
    let end = now + 3_600_000;
    let id = "'0000' || lpad(g::text, 18, '0')";
    let series = format!("generate_series(1, {BEFORE}) g");
    psql_on(
        database_url,
        &format!(
            "INSERT INTO subject_cutoffs SELECT {id}, 1, {end} FROM {series}; \
             INSERT INTO sessions (id, subject, created_ms, expires_ms, last_seen_ms, \
             live_until_ms) SELECT {id}, 'filler', {now}, {end}, {now}, {end} FROM {series}; \
             INSERT INTO token_families (id, subject, expires_ms, current_id) \
             SELECT {id}, 'filler', {end}, 'x' FROM {series}"
        ),
    );
}

/// Redis loses everything; node B starts a refill; while it copies each kind, hundreds of
/// subjects are logged out, sessions ended and refresh families reused. Once Redis is complete
/// again, every token they revoked is rejected on every node. Node B reaches Redis over a slow
/// link, so that its refill takes long enough between reading a batch from PostgreSQL and
/// writing each target for the revocations to land in between. (Reuses go to node B too: a
/// Refresh reads, and on node A a read would start a second, fast refill that copies the newer
/// state and hides what the first one did.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refill_never_undoes_a_revocation_it_races() {
    let redis = RedisServer::start();
    let storage = Storage::tiered_on(&redis);
    let prefix = storage.redis_prefix();
    let database_url = storage.database_url();
    let slow = SlowLink::to(redis.port, Duration::from_millis(1));
    // Hundreds of calls at once on a loaded machine queue for the connection pool: a generous
    // timeout, as this is about what is stored, not how fast.
    let patient = Sidecar::builder()
        .storage(&storage)
        .arg("--backend-timeout=10s");
    let nodes = [
        patient.clone().start(),
        patient
            .env("REDIS_URL", format!("redis://127.0.0.1:{}", slow.port))
            .start(),
    ];
    for node in &nodes {
        node.wait_ops_status(200, Duration::from_secs(15));
    }
    let a = nodes[0].client().await;
    let b = nodes[1].client().await;

    // Each target's token, valid now. Subjects to log out have an older cutoff already, which
    // the refill will read and could copy over the newer one.
    let subjects: Vec<String> = (0..TARGETS).map(|i| format!("a-cut-{i:04}")).collect();
    join_all(subjects.iter().map(|s| {
        let mut a = a.clone();
        async move { a.revoke(Target::Subject(s.clone())).await.unwrap() }
    }))
    .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cut_tokens = join_all(subjects.iter().map(|s| {
        let mut a = a.clone();
        async move { a.issue(s).await.token }
    }))
    .await;
    let sessions = join_all((0..TARGETS).map(|i| {
        let mut a = a.clone();
        async move {
            let subject = format!("a-ses-{i:04}");
            let session = a.create_session(&subject).await;
            let token = a
                .issue_with(pb::IssueRequest {
                    subject,
                    session_id: session.id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .token;
            (session.id, token)
        }
    }))
    .await;
    let families = join_all((0..TARGETS).map(|i| {
        let mut a = a.clone();
        async move {
            let refresh = a
                .issue_with(pb::IssueRequest {
                    subject: format!("a-fam-{i:04}"),
                    kind: pb::TokenKind::Refresh.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .token;
            let access = a.refresh(&refresh).await.unwrap().access.unwrap().token;
            (refresh, access)
        }
    }))
    .await;
    let tokens: Vec<&String> = cut_tokens
        .iter()
        .chain(sessions.iter().map(|(_, t)| t))
        .chain(families.iter().map(|(_, t)| t))
        .collect();
    let mut check = b.clone();
    for token in &tokens {
        check.assert_valid(token).await;
    }

    // Any refill the setup started (node B's is slow) is over: Redis is complete, and no
    // refill holds a ticket. Only then is the refill the flush starts the one that races.
    let mut conn = redis_conn(&redis).await;
    let marker = format!("{prefix}tier:{{marker}}:");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (complete, filling): (bool, bool) = redis::pipe()
            .exists(format!("{marker}complete"))
            .exists(format!("{marker}filling"))
            .query_async(&mut conn)
            .await
            .unwrap();
        if complete && !filling {
            break;
        }
        assert!(Instant::now() < deadline, "the setup's refill never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    insert_fillers(&database_url);
    let flushes = nodes[1].view_flushes();
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    // The first Validate that reads Redis after the loss starts the refill: one after node
    // B's revocation view has heard of the flush.
    nodes[1].wait_view_flushed(flushes);
    // It may find node B's previous refill not yet over on B's side (its last reply comes
    // over the slow link after Redis already shows it complete), and start none: so validate
    // until the new refill has begun writing. A Validate never starts a second one.
    let first = format!("0000{:018}", 1);
    let limit = Duration::from_secs(60);
    let first_cutoff = format!("{prefix}cutoff:{{{}}}:{first}", subject_tag(&first));
    let deadline = Instant::now() + limit;
    loop {
        check.assert_valid(tokens[0]).await;
        if key_exists(&mut conn, &first_cutoff).await {
            break;
        }
        assert!(Instant::now() < deadline, "{first_cutoff} never appeared");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    join_all(subjects.iter().map(|s| {
        let mut a = a.clone();
        async move { a.revoke(Target::Subject(s.clone())).await.unwrap() }
    }))
    .await;
    wait_for_key(
        &mut conn,
        &format!("{prefix}session:{{0000}}:{first}"),
        limit,
    )
    .await;
    join_all(sessions.iter().map(|(id, _)| {
        let mut a = a.clone();
        async move {
            let ended =
                a.0.delete_session(pb::DeleteSessionRequest {
                    session_id: id.clone(),
                })
                .await
                .unwrap();
            assert!(ended.into_inner().deleted);
        }
    }))
    .await;
    wait_for_key(&mut conn, &format!("{prefix}family:{first}"), limit).await;
    join_all(families.iter().map(|(spent, _)| {
        let mut b = b.clone();
        async move {
            // The first presentation again is the one retry a lost answer gets; the second
            // is a reuse.
            b.refresh(spent).await.expect("the one retry");
            let reuse = b.refresh(spent).await.unwrap_err();
            assert_eq!(reuse.code(), Code::Unauthenticated);
        }
    }))
    .await;
    wait_for_key(
        &mut conn,
        &format!("{prefix}tier:{{marker}}:complete"),
        limit,
    )
    .await;

    for node in &nodes {
        let mut c = node.client().await;
        let mut accepted = Vec::new();
        for (i, token) in tokens.iter().enumerate() {
            if c.validate(token).await.unwrap().valid {
                accepted.push(i);
            }
        }
        assert!(
            accepted.is_empty(),
            "{} revoked tokens accepted from a complete Redis (logouts 0..{TARGETS}, sessions, \
             families after): {accepted:?}",
            accepted.len()
        );
    }
}

/// Waits until the refill has marked Redis complete.
async fn wait_complete(redis: &RedisServer, prefix: &str, c: &mut Client, token: &str) {
    let mut conn = redis_conn(redis).await;
    c.assert_valid(token).await; // starts a refill if none ran yet
    wait_for_key(
        &mut conn,
        &format!("{prefix}tier:{{marker}}:complete"),
        Duration::from_secs(20),
    )
    .await;
}

/// PostgreSQL takes a revocation and Redis does not: Redis must stop vouching, so that the
/// token is rejected, by the node that saw the failure at once, by every node once Redis
/// takes the void.
#[tokio::test]
async fn a_write_redis_missed_voids_the_complete_marker() {
    let redis = RedisServer::start();
    let storage = Storage::tiered_on(&redis);
    let prefix = storage.redis_prefix();
    let d = Deployment::on(storage, 2, &["--backend-timeout=1s"]);
    let mut a = d.nodes[0].client().await;
    let mut b = d.nodes[1].client().await;
    let kept = a.issue("kept").await.token;
    wait_complete(&redis, &prefix, &mut b, &kept).await;

    // Redis full: it refuses the revocation's script, and still takes the marker's deletion.
    let token = a.issue("alice").await.token;
    b.assert_valid(&token).await;
    redis.cli(&["CONFIG", "SET", "maxmemory", "1"]);
    let refused = a.revoke(Target::Token(token.clone())).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    a.assert_rejected(&token, R::Revoked).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while b.validate(&token).await.unwrap().valid {
        assert!(
            Instant::now() < deadline,
            "node B still trusts a Redis that missed a revocation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.assert_rejected(&token, R::Revoked).await;
    b.assert_valid(&kept).await;
    redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
    wait_complete(&redis, &prefix, &mut b, &kept).await;
    b.assert_rejected(&token, R::Revoked).await;

    // Redis pausing writes past the timeout: the revocation answers UNAVAILABLE, the node
    // that saw it fail rejects the token at once, and every node does once the pause ends.
    let token = a.issue("bob").await.token;
    b.assert_valid(&token).await;
    redis.cli(&["CLIENT", "PAUSE", "2000", "WRITE"]);
    let refused = a.revoke(Target::Token(token.clone())).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    a.assert_rejected(&token, R::Revoked).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for c in [&mut a, &mut b] {
        c.assert_rejected(&token, R::Revoked).await;
        c.assert_valid(&kept).await;
    }
}

/// A FLUSHALL between the view's copy of the complete marker and a record read from Redis:
/// the record is gone, and a marker from before the flush must not vouch for its absence. Node
/// B's feed is slowed (300 ms), so its view still holds the marker when it reads the revoked
/// token's records from the flushed Redis. (B answered `valid` for tokens revoked long before:
/// the view's marker was older than the record it vouched for.)
#[tokio::test]
async fn a_flush_is_never_vouched_for_by_a_marker_the_view_kept() {
    let redis = RedisServer::start();
    let storage = Storage::tiered_on(&redis);
    let prefix = storage.redis_prefix();
    let feed = SlowLink::slow_feed(redis.port, Duration::from_millis(300));
    let a = Sidecar::builder().storage(&storage).start();
    let b = Sidecar::builder()
        .storage(&storage)
        .env("REDIS_URL", format!("redis://127.0.0.1:{}", feed.port))
        .start();
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.metric("authsidecar_revocation_cache_feed_up", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "B's feed never went live");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let revoked: Vec<String> = join_all((0..20).map(|i| {
        let mut ca = ca.clone();
        async move {
            let token = ca.issue(&format!("rev-{i}")).await.token;
            ca.revoke(Target::Token(token.clone())).await.unwrap();
            token
        }
    }))
    .await;
    let unrelated = ca.issue("unrelated").await.token;
    wait_complete(&redis, &prefix, &mut cb, &unrelated).await;
    // B's view now holds the marker.
    cb.assert_valid(&unrelated).await;
    cb.assert_valid(&unrelated).await;

    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    for token in &revoked {
        cb.assert_rejected(token, R::Revoked).await;
    }
}

/// A session write held on a frozen link lands after its session was deleted and Redis lost
/// everything (the tombstone with it): the refill that follows must end the session again
/// before it vouches for Redis. Node A touches the session while its Redis link is frozen
/// (A answers UNAVAILABLE, PostgreSQL took the touch); B deletes the session; FLUSHALL; A's
/// link thaws and the touch's copy lands. (Every node answered `valid` after the next
/// refill before: the refill copied live sessions only, never the ends.)
#[tokio::test]
async fn a_held_session_write_after_a_flush_never_brings_a_deleted_session_back() {
    let redis = RedisServer::start();
    let storage = Storage::tiered_on(&redis);
    let prefix = storage.redis_prefix();
    let link = SlowLink::to(redis.port, Duration::ZERO);
    let a = Sidecar::builder()
        .storage(&storage)
        .env("REDIS_URL", format!("redis://127.0.0.1:{}", link.port))
        .args(["--backend-timeout=500ms", "--session-idle-timeout=1h"])
        .start();
    let b = Sidecar::builder()
        .storage(&storage)
        .args(["--backend-timeout=500ms", "--session-idle-timeout=1h"])
        .start();
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let session = cb.create_session("kim").await;
    let token = cb
        .issue_with(pb::IssueRequest {
            subject: "kim".into(),
            session_id: session.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .token;
    wait_complete(&redis, &prefix, &mut cb, &token).await;

    link.freeze();
    let held =
        ca.0.touch_session(pb::TouchSessionRequest {
            session_id: session.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(held.code(), Code::Unavailable, "{held:?}");
    delete_session(&mut cb, &session.id).await;
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    link.thaw();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The next refill, then every node, from the view or from Redis.
    cb.assert_rejected(&token, R::Revoked).await;
    let mut conn = redis_conn(&redis).await;
    wait_for_key(
        &mut conn,
        &format!("{prefix}tier:{{marker}}:complete"),
        Duration::from_secs(20),
    )
    .await;
    for c in [&mut ca, &mut cb] {
        c.assert_rejected_soon(&token, R::Revoked).await;
        for _ in 0..20 {
            c.assert_rejected(&token, R::Revoked).await;
        }
    }
}

/// Deletes a live session through `c`.
async fn delete_session(c: &mut Client, id: &str) {
    let ended =
        c.0.delete_session(pb::DeleteSessionRequest {
            session_id: id.to_owned(),
        })
        .await
        .unwrap();
    assert!(ended.into_inner().deleted);
}

/// A subject whose session ids sort first (`first`) or last among sessions: its tag starts
/// with a digit, or with `zz`.
fn subject_sorting(first: bool, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("sort-{first}-{i}"))
        .filter(|s| {
            let tag = subject_tag(s);
            if first {
                tag.starts_with(|c: char| c.is_ascii_digit())
            } else {
                tag.starts_with("zz")
            }
        })
        .take(n)
        .collect()
}

/// A refill that copies a session, then sees it deleted and Redis flushed again (the tombstone
/// with it), writes its copy after the flush: the next refill must end it again before it
/// vouches. Node A reaches Redis over a link with 10 ms each way, so its refill of 300
/// sessions takes seconds, and the target's session sorts last. (Every node answered `valid`
/// from about 15 s on before: nothing removed the stray copy.)
#[tokio::test]
async fn a_refill_copy_after_a_flush_never_brings_a_deleted_session_back() {
    let redis = RedisServer::start();
    let storage = Storage::tiered_on(&redis);
    let prefix = storage.redis_prefix();
    let slow = SlowLink::to(redis.port, Duration::from_millis(10));
    let a = Sidecar::builder()
        .storage(&storage)
        .env("REDIS_URL", format!("redis://127.0.0.1:{}", slow.port))
        .arg("--backend-timeout=5s")
        .start();
    let b = Sidecar::builder()
        .storage(&storage)
        .arg("--backend-timeout=5s")
        .start();
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    join_all(subject_sorting(true, 299).into_iter().map(|s| {
        let mut cb = cb.clone();
        async move { cb.create_session(&s).await }
    }))
    .await;
    let target = &subject_sorting(false, 1)[0];
    let session = cb.create_session(target).await;
    let token = cb
        .issue_with(pb::IssueRequest {
            subject: target.clone(),
            session_id: session.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .token;

    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    ca.assert_valid(&token).await; // from PostgreSQL; A's slow refill starts
    tokio::time::sleep(Duration::from_millis(1500)).await;
    delete_session(&mut cb, &session.id).await;
    ca.assert_rejected(&token, R::Revoked).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");

    // A's first refill fails (its ticket went with the flush); a later one vouches.
    let mut conn = redis_conn(&redis).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let marker = format!("{prefix}tier:{{marker}}:complete");
    loop {
        ca.assert_rejected(&token, R::Revoked).await;
        if key_exists(&mut conn, &marker).await {
            break;
        }
        assert!(Instant::now() < deadline, "no refill completed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for c in [&mut ca, &mut cb] {
        for _ in 0..20 {
            c.assert_rejected(&token, R::Revoked).await;
        }
    }
}
