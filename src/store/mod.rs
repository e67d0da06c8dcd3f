//! Where state that every node must agree on lives. One trait, one factory; the domain layer
//! computes every lifetime and hands the store absolute instants.

mod memory;
pub mod postgres;
mod redis;
mod tiered;

use std::sync::Arc;
use std::time::SystemTime;

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
