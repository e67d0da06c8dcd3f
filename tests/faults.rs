//! The randomized fault test on every backend (see `support::faults`): three nodes (one on
//! memory) under a seeded schedule of faults for a minute, every call recorded, and the
//! history checked against the documented invariants. A failure prints the seed;
//! `AUTH_FAULT_SEED=S AUTH_FAULT_SECONDS=T cargo test --test faults BACKEND` replays its
//! schedule, and `cargo bench --bench soak` runs it long.

mod support;

use support::backends::Backend;
use support::faults::{Options, run};

const SECONDS: u64 = 60;

async fn fault_run(backend: Backend, seed: u64) {
    let report = run(Options::from_env(backend, seed, SECONDS)).await;
    println!("{report}");
    report.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    fault_run(Backend::Memory, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis() {
    fault_run(Backend::Redis, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres() {
    fault_run(Backend::Postgres, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiered() {
    fault_run(Backend::Tiered, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster() {
    fault_run(Backend::RedisCluster, 5).await;
}
