//! Where state that every node must agree on lives. One trait, one factory; the domain layer
//! computes every lifetime and hands the store absolute instants.

mod memory;
pub mod postgres;
mod redis;
mod tiered;

use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::clock::Clock;
use crate::config::{Config, Storage};
use crate::ratelimit::{Decision, Gcra};

pub use memory::MemoryStore;
pub use postgres::PostgresStore;
pub use redis::RedisStore;
pub use tiered::TieredStore;

/// A store that could not answer. The detail is for the log, never for the client.
#[derive(Debug, thiserror::Error)]
#[error("{backend} store unavailable: {detail}")]
pub struct StoreError {
    pub backend: &'static str,
    pub detail: String,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short backend name for logs and metrics.
    fn backend(&self) -> &'static str;

    /// Records that `token_id` is revoked until `until`, after which the token would be
    /// rejected as expired anyway. Returns whether it was not revoked before. Returns only
    /// once the record is stored.
    async fn revoke(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError>;

    /// Whether `token_id` is revoked.
    async fn is_revoked(&self, token_id: &str) -> Result<bool, StoreError>;

    /// Whether the backend answers. Never writes, never scans.
    async fn ping(&self) -> Result<(), StoreError>;

    /// One rate-limit step for `key` under `policy`, atomic in the backend, on the backend's
    /// clock (so the nodes' clocks do not matter).
    async fn rate_limit(
        &self,
        policy: &str,
        key: &str,
        gcra: Gcra,
        cost: u32,
    ) -> Result<Decision, StoreError>;

    /// Forgets `key` under `policy`: full allowance, no lockout.
    async fn reset_rate_limit(&self, policy: &str, key: &str) -> Result<(), StoreError>;

    /// Drops records whose lifetime has passed, in bounded batches; returns how many. Runs
    /// from a background task, never on a request or probe path.
    async fn purge_expired(&self) -> Result<usize, StoreError>;
}

/// First and longest wait between attempts of [`retry_in_background`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs `attempt` in a background task until it succeeds (connecting, migrating), waiting
/// 100 ms after the first failure and twice as long after each next one, up to 5 s; then
/// hands the result to `done`. A backend that is down at start thus never stops the sidecar.
fn retry_in_background<T, E, F, Fut>(
    backend: &'static str,
    what: &'static str,
    mut attempt: F,
    done: impl FnOnce(T) + Send + 'static,
) where
    T: Send + 'static,
    E: Display + Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, E>> + Send,
{
    tokio::spawn(async move {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match attempt().await {
                Ok(value) => {
                    tracing::info!(backend, "{what}: done");
                    return done(value);
                }
                Err(e) => {
                    tracing::warn!(backend, error = %e, retry_in = ?backoff, "{what}: failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    });
}

/// Runs one backend call, bounded by `timeout`; a failure or a timeout is a [`StoreError`]
/// naming the operation.
async fn bounded<T, E: Display>(
    backend: &'static str,
    op: &'static str,
    timeout: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StoreError {
            backend,
            detail: format!("{op}: {e}"),
        }),
        Err(_) => Err(StoreError {
            backend,
            detail: format!("{op}: timed out after {timeout:?}"),
        }),
    }
}

/// The one place that turns the configured backend into a store. Returns at once: shared
/// backends connect in the background, and calls fail with UNAVAILABLE until they have.
pub fn open(config: &Config, clock: Arc<dyn Clock>) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match config.storage {
        Storage::Memory => Arc::new(MemoryStore::new(clock)),
        Storage::Redis => Arc::new(RedisStore::open(config)?),
        Storage::Postgres => Arc::new(PostgresStore::open(config, clock)?),
        Storage::Tiered => Arc::new(TieredStore::new(
            RedisStore::open(config)?,
            PostgresStore::open(config, clock)?,
        )),
    })
}
