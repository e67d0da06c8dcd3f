//! CheckRateLimit and ResetRateLimit over real gRPC: one answer for the whole cluster, exact
//! under concurrency, smooth, with lockouts every node honours, on every backend.

mod support;

use std::time::{Duration, Instant};

use auth_sidecar::pb;
use support::backends::{Backend, RedisServer, Storage};
use support::{Deployment, assert_status};
use tonic::Code;
use tonic::transport::Channel;

type Api = pb::token_service_client::TokenServiceClient<Channel>;

/// The policies, and a backend timeout generous enough that 50 callers queueing on one hot
/// PostgreSQL row on a loaded machine are counted rather than timed out (these tests are
/// about counting; failing closed on a timeout is tested elsewhere).
const POLICIES: [&str; 6] = [
    "--backend-timeout=10s",
    "--rate-limit=exact=100/1m",
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

/// 50 concurrent callers spread over the nodes, 4 calls each, one key under 100/1m: exactly
/// 100 pass. (A unit comes back every 600 ms; the burst takes far less, and any unit that
/// did come back while it ran is allowed for.)
async fn exact_across_nodes(d: &Deployment) {
    let apis = clients(d).await;
    let started = Instant::now();
    let mut callers = Vec::new();
    for i in 0..50 {
        let mut api = apis[i % apis.len()].clone();
        callers.push(tokio::spawn(async move {
            let mut allowed = 0;
            for _ in 0..4 {
                if check(&mut api, "exact", "one-key", None)
                    .await
                    .unwrap()
                    .allowed
                {
                    allowed += 1;
                }
            }
            allowed
        }));
    }
    let mut allowed = 0;
    for c in callers {
        allowed += c.await.unwrap();
    }
    let regained = (started.elapsed().as_millis() / 600) as usize;
    assert!(
        (100..=100 + regained).contains(&allowed),
        "{allowed} allowed across {} nodes in {:?}, expected exactly 100 (+{regained} regained)",
        apis.len(),
        started.elapsed()
    );
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
    for api in apis.iter_mut() {
        let r = check(api, "login", "eve", Some(0)).await.unwrap();
        assert!(
            r.allowed && r.remaining == 3,
            "reset not seen by every node: {r:?}"
        );
    }
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
