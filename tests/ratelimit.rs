//! CheckRateLimit and ResetRateLimit over real gRPC: one answer for the whole cluster, exact
//! under concurrency, smooth, with lockouts every node honours, on every backend.

mod support;

use std::time::{Duration, Instant};

use auth_sidecar::pb;
use support::backends::{Backend, RedisServer, SlowLink, Storage};
use support::{Deployment, Sidecar, assert_status};
use tonic::Code;
use tonic::transport::Channel;

type Api = pb::token_service_client::TokenServiceClient<Channel>;

/// The policies, and a backend timeout generous enough that 50 callers queueing on one hot
/// PostgreSQL row on a loaded machine are counted rather than timed out (these tests are
/// about counting; failing closed on a timeout is tested elsewhere).
const POLICIES: [&str; 6] = [
    "--backend-timeout=10s",
    "--rate-limit=exact=100/1h",
    "--rate-limit=smooth=5/5s",
    "--rate-limit=login=3/3s:lockout=2s",
    "--rate-limit=api=10/1s:burst=4",
    "--rate-limit=peek=2/1h",
];

async fn check(
    api: &mut Api,
    policy: &str,
    key: &str,
    cost: Option<u32>,
) -> Result<pb::CheckRateLimitResponse, tonic::Status> {
    api.check_rate_limit(pb::CheckRateLimitRequest {
        policy: policy.into(),
        key: key.into(),
        cost,
    })
    .await
    .map(|r| r.into_inner())
}

async fn clients(d: &Deployment) -> Vec<Api> {
    let mut out = Vec::new();
    for node in &d.nodes {
        out.push(Api::new(node.channel().await));
    }
    out
}

fn secs(d: &Option<prost_types::Duration>) -> f64 {
    let d = d.unwrap_or_default();
    d.seconds as f64 + d.nanos as f64 / 1e9
}

/// 300 concurrent calls spread over the nodes, one key under 100/1h: exactly 100 pass. They
/// arrive together, so each node gathers many into one round trip (`--store-batch`, on by
/// default), and the batches of the three nodes meet on the one key. Bad calls among them (an
/// unknown policy, a cost above the burst) are refused before they join a batch, and change
/// nothing for the others.
async fn exact_across_nodes(d: &Deployment) {
    let apis = clients(d).await;
    let calls = (0..330).map(|i| {
        let mut api = apis[i % apis.len()].clone();
        let (policy, cost) = match i % 11 {
            5 => ("unknown", None),
            10 => ("exact", Some(101)),
            _ => ("exact", None),
        };
        tokio::spawn(async move { check(&mut api, policy, "one-key", cost).await })
    });
    let (mut allowed, mut refused) = (0, 0);
    for call in futures_util::future::join_all(calls).await {
        match call.unwrap() {
            Ok(r) => allowed += usize::from(r.allowed),
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::NotFound | Code::InvalidArgument),
                    "{s:?}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 60, "the bad calls, each refused");
    assert_eq!(allowed, 100, "allowed across {} nodes", apis.len());
}

/// After the limit is hit, one more call passes after PERIOD/COUNT (1 s, less what has come
/// back while the burst ran, as retry_after says) and not before. Margins are wide, since a
/// call itself may take a while on a loaded machine.
async fn smooth(d: &Deployment) {
    let mut api = clients(d).await.remove(0);
    for _ in 0..5 {
        assert!(check(&mut api, "smooth", "k", None).await.unwrap().allowed);
    }
    let denied = check(&mut api, "smooth", "k", None).await.unwrap();
    let denied_at = Instant::now();
    assert!(!denied.allowed);
    let wait = secs(&denied.retry_after);
    assert!(wait > 0.5 && wait <= 1.0, "retry_after {wait}");
    tokio::time::sleep(Duration::from_secs_f64(wait - 0.3)).await;
    assert!(
        !check(&mut api, "smooth", "k", None).await.unwrap().allowed,
        "passed early"
    );
    let after = Duration::from_secs_f64(wait + 0.05).saturating_sub(denied_at.elapsed());
    tokio::time::sleep(after).await;
    assert!(
        check(&mut api, "smooth", "k", None).await.unwrap().allowed,
        "did not pass after PERIOD/COUNT"
    );
}

/// The first denied call locks the key on every node; it ends after its duration; a reset on
/// any node clears it everywhere.
async fn lockout_and_reset_on_every_node(d: &Deployment) {
    let mut apis = clients(d).await;
    let n = apis.len();
    for _ in 0..3 {
        assert!(
            check(&mut apis[0], "login", "mallory", None)
                .await
                .unwrap()
                .allowed
        );
    }
    let denied = check(&mut apis[0], "login", "mallory", None).await.unwrap();
    assert!(!denied.allowed);
    assert!(
        (secs(&denied.retry_after) - 2.0).abs() < 0.05,
        "retry_after says the lockout: {denied:?}"
    );
    // Past the rate's own recovery (a unit a second), every node still refuses.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for api in apis.iter_mut() {
        let r = check(api, "login", "mallory", None).await.unwrap();
        assert!(!r.allowed, "a node ignored the lockout");
        assert!(secs(&r.retry_after) > 0.2, "{r:?}");
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        check(&mut apis[n - 1], "login", "mallory", None)
            .await
            .unwrap()
            .allowed,
        "lockout did not end"
    );

    for _ in 0..4 {
        check(&mut apis[0], "login", "eve", None).await.unwrap();
    }
    assert!(
        !check(&mut apis[0], "login", "eve", None)
            .await
            .unwrap()
            .allowed
    );
    apis[n / 2]
        .reset_rate_limit(pb::ResetRateLimitRequest {
            policy: "login".into(),
            key: "eve".into(),
        })
        .await
        .unwrap();
    // A node that holds the denial in its revocation view hears of the reset through its
    // feed: at once on Redis and through LISTEN, within the view's bound of 1 s through a
    // transaction pooler (a call may take a while more on a loaded machine).
    let reset = Instant::now();
    for api in apis.iter_mut() {
        loop {
            let r = check(api, "login", "eve", Some(0)).await.unwrap();
            if r.allowed && r.remaining == 3 {
                break;
            }
            assert!(
                reset.elapsed() < Duration::from_millis(1500),
                "reset not seen by every node: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // A peek that finds the allowance spent locks nothing out, and the counted call after
    // it does: the node's view must not answer that call with the peek's shorter denial.
    for _ in 0..3 {
        check(&mut apis[0], "login", "trudy", None).await.unwrap();
    }
    let peek = check(&mut apis[0], "login", "trudy", Some(0))
        .await
        .unwrap();
    assert!(!peek.allowed && secs(&peek.retry_after) < 1.05, "{peek:?}");
    let counted = check(&mut apis[0], "login", "trudy", None).await.unwrap();
    assert!(
        !counted.allowed && secs(&counted.retry_after) > 1.9,
        "the lockout did not engage: {counted:?}"
    );
}

/// cost 0 never consumes; a cost above the burst is INVALID_ARGUMENT; bad requests name the
/// field or the policy.
async fn costs_and_bad_requests(d: &Deployment) {
    let mut api = clients(d).await.remove(0);
    for _ in 0..10 {
        let r = check(&mut api, "peek", "k", Some(0)).await.unwrap();
        assert!(r.allowed && r.remaining == 2 && r.limit == 2, "{r:?}");
    }
    assert_eq!(
        check(&mut api, "peek", "k", None).await.unwrap().remaining,
        1
    );
    assert_eq!(
        check(&mut api, "peek", "k", Some(1))
            .await
            .unwrap()
            .remaining,
        0
    );
    let r = check(&mut api, "peek", "k", Some(0)).await.unwrap();
    assert!(!r.allowed, "peek must say the next call would fail: {r:?}");

    let r = check(&mut api, "api", "k", Some(4)).await.unwrap();
    assert!(r.allowed && r.limit == 4 && r.remaining == 0, "{r:?}");
    assert_status(
        check(&mut api, "api", "k", Some(5)).await,
        Code::InvalidArgument,
        "cost",
    );
    assert_status(
        check(&mut api, "nope", "k", None).await,
        Code::NotFound,
        "nope",
    );
    assert_status(
        check(&mut api, "api", "", None).await,
        Code::InvalidArgument,
        "key",
    );
    let long = "k".repeat(257);
    assert_status(
        check(&mut api, "api", &long, None).await,
        Code::InvalidArgument,
        "key",
    );
}

macro_rules! per_backend {
    ($($name:ident: $backend:expr, $nodes:expr;)*) => {
        $(mod $name {
            use super::*;

            fn start() -> Deployment {
                Deployment::start($backend, $nodes, &POLICIES)
            }

            #[tokio::test]
            async fn exact_across_nodes() {
                super::exact_across_nodes(&start()).await
            }

            #[tokio::test]
            async fn smooth() {
                super::smooth(&start()).await
            }

            #[tokio::test]
            async fn lockout_and_reset_on_every_node() {
                super::lockout_and_reset_on_every_node(&start()).await
            }

            #[tokio::test]
            async fn costs_and_bad_requests() {
                super::costs_and_bad_requests(&start()).await
            }
        })*
    };
}

// Memory is one node's alone; every shared backend runs three.
per_backend! {
    memory: Backend::Memory, 1;
    redis: Backend::Redis, 3;
    redis_cluster: Backend::RedisCluster, 3;
    postgres: Backend::Postgres, 3;
    pgbouncer: Backend::PgBouncer, 3;
    tiered: Backend::Tiered, 3;
}

#[tokio::test]
async fn redis_down_is_unavailable_never_a_silent_allow() {
    let mut redis = RedisServer::start();
    // The policies without the generous timeout: here the bound is the point.
    let d = Deployment::on(Storage::on_redis(&redis), 1, &POLICIES[1..]);
    let mut api = clients(&d).await.remove(0);
    assert!(check(&mut api, "exact", "k", None).await.unwrap().allowed);
    redis.kill();
    for _ in 0..5 {
        let status = check(&mut api, "exact", "k", None).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
    }
}

/// A node whose store connection passes through a link that can stop carrying packets.
fn node_behind_link(backend: Backend) -> (Storage, SlowLink, Sidecar) {
    let storage = Storage::new(backend);
    let setting = match backend {
        Backend::Redis => "REDIS_URL",
        _ => "DATABASE_URL",
    };
    let (link, url) = storage.through_link(setting);
    let node = POLICIES[1..]
        .iter()
        .fold(Sidecar::builder().storage(&storage), |b, a| b.arg(*a))
        .arg("--backend-timeout=1s")
        .env(setting, url)
        .start();
    (storage, link, node)
}

/// Calls in flight when the store stops answering: every one of them, those sent in a batch
/// and those still gathering, is UNAVAILABLE, and none is allowed. Those already sent may be
/// counted when the store gets them after all (as README, "Batching", says), but never more
/// than were sent, and only once.
async fn a_cut_batch_allows_nothing(backend: Backend) {
    let (_storage, link, node) = node_behind_link(backend);
    let api = Api::new(node.channel().await);
    assert!(
        check(&mut api.clone(), "exact", "cut", None)
            .await
            .unwrap()
            .allowed
    );
    link.freeze();
    let calls = (0..40).map(|_| {
        let mut api = api.clone();
        tokio::spawn(async move { check(&mut api, "exact", "cut", None).await })
    });
    for call in futures_util::future::join_all(calls).await {
        let status = call
            .unwrap()
            .expect_err("no answer but UNAVAILABLE while the store is cut off");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    link.thaw();
    // A peek (cost 0) once the store answers again: what the cut calls left counted.
    let started = Instant::now();
    let remaining = loop {
        match check(&mut api.clone(), "exact", "cut", Some(0)).await {
            Ok(r) => break r.remaining,
            Err(s)
                if s.code() == Code::Unavailable && started.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    let counted = 99 - remaining as usize;
    assert!(counted <= 40, "{counted} of 40 cut calls counted");
}

#[tokio::test]
async fn a_cut_batch_allows_nothing_on_redis() {
    a_cut_batch_allows_nothing(Backend::Redis).await
}

#[tokio::test]
async fn a_cut_batch_allows_nothing_on_postgres() {
    a_cut_batch_allows_nothing(Backend::Postgres).await
}
