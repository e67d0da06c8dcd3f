//! The retry contract (README, "Retrying a call"): a call that answers UNAVAILABLE or
//! DEADLINE_EXCEEDED may be retried, and the retry must not trip on what the failed call did.
//! The failures are real: a backend whose answer is lost after it committed (a proxy that
//! closes the connection instead of forwarding that answer). Signing failures in a PKCS#11
//! token are in tests/hsm.rs.

mod support;

use std::time::{Duration, Instant};

use support::Sidecar;
use support::backends::{Backend, SlowLink, Storage};
use tonic::Code;

/// A node on `backend` whose data connections pass through a link that can lose answers.
fn node_behind_link(backend: Backend) -> (Storage, SlowLink, Sidecar) {
    let storage = Storage::new(backend);
    let setting = match backend {
        Backend::Redis => "REDIS_URL",
        _ => "DATABASE_URL",
    };
    let (link, url) = storage.through_link(setting);
    let node = Sidecar::builder()
        .storage(&storage)
        .env(setting, url)
        .arg("--backend-timeout=1s")
        .arg("--revocation-cache=0")
        .start();
    (storage, link, node)
}

/// Retries a call while it answers UNAVAILABLE (a connection the lost answer broke is being
/// replaced), at most for five seconds: the first other answer.
async fn settled<T>(
    mut call: impl AsyncFnMut() -> Result<T, tonic::Status>,
) -> Result<T, tonic::Status> {
    let started = Instant::now();
    loop {
        match call().await {
            Err(s)
                if s.code() == Code::Unavailable && started.elapsed() < Duration::from_secs(5) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// A refresh whose answer was lost after the store rotated the family may be retried once,
/// with the default zero grace: the retry gets the successor the lost answer held, and the
/// family lives on. A second retry is a reuse, as RFC 9700 asks.
async fn a_refresh_whose_answer_was_lost_is_retried_once(backend: Backend) {
    let (_storage, link, node) = node_behind_link(backend);
    let mut client = node.client().await;
    let spent = client.issue_refresh("dora").await;

    // The backend's answer that says the family rotated (Redis's reply and PostgreSQL's row
    // both carry the word).
    link.lose_answer_with(b"rotated");
    let lost = client.refresh(&spent).await.unwrap_err();
    assert!(
        matches!(lost.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{lost:?}"
    );

    let retried = settled(async || client.refresh(&spent).await)
        .await
        .expect("the retry of a refresh whose answer was lost refreshes");
    client
        .assert_valid(&retried.access.as_ref().unwrap().token)
        .await;
    let again = client.refresh(&spent).await.unwrap_err();
    assert_eq!(again.code(), Code::Unauthenticated, "{again:?}");
    assert!(again.message().contains("already spent"), "{again:?}");
}

#[tokio::test]
async fn redis_a_refresh_whose_answer_was_lost_is_retried_once() {
    a_refresh_whose_answer_was_lost_is_retried_once(Backend::Redis).await;
}

#[tokio::test]
async fn postgres_a_refresh_whose_answer_was_lost_is_retried_once() {
    a_refresh_whose_answer_was_lost_is_retried_once(Backend::Postgres).await;
}
