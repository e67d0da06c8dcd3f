//! Redis in front of PostgreSQL. PostgreSQL is the truth; Redis answers the hot path.
//!
//! A revocation is written to PostgreSQL, then to Redis, and acknowledged only when both hold
//! it. Redis answers "not revoked" only while it carries the *complete* marker, which a refill
//! from PostgreSQL sets; if Redis loses its data (FLUSHALL, a restart without persistence) the
//! marker goes with it, reads fall back to PostgreSQL, and a refill starts. If Redis does not
//! answer at all, reads go to PostgreSQL. So an acknowledged revocation is never forgotten.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::postgres::PostgresStore;
use super::redis::RedisStore;
use super::{Store, StoreError};
use crate::ratelimit::{Decision, Gcra};

/// Rows copied per batch when refilling Redis.
const REFILL_BATCH: i64 = 1000;

/// How long a refill vouches for Redis; after that the next read starts a new refill.
const COMPLETE_FOR: Duration = Duration::from_secs(24 * 3600);

pub struct TieredStore {
    redis: RedisStore,
    postgres: PostgresStore,
    refilling: Arc<AtomicBool>,
}

impl TieredStore {
    pub fn new(redis: RedisStore, postgres: PostgresStore) -> TieredStore {
        TieredStore {
            redis,
            postgres,
            refilling: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Starts a refill of Redis from PostgreSQL unless one is running.
    fn start_refill(&self) {
        if self.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let (redis, postgres, flag) = (
            self.redis.clone(),
            self.postgres.clone(),
            self.refilling.clone(),
        );
        tokio::spawn(async move {
            match refill(&redis, &postgres).await {
                Ok(n) => tracing::info!(
                    backend = "tiered",
                    copied = n,
                    "redis refilled from postgres"
                ),
                Err(e) => tracing::warn!(backend = "tiered", error = %e, "redis refill failed"),
            }
            flag.store(false, Ordering::SeqCst);
        });
    }
}

/// Copies every live revocation to Redis, then marks Redis complete. A revocation made while
/// this runs is written to Redis by its own call, so nothing falls between the two.
async fn refill(redis: &RedisStore, postgres: &PostgresStore) -> Result<usize, StoreError> {
    let mut after = String::new();
    let mut copied = 0;
    loop {
        let batch = postgres.live_after(&after, REFILL_BATCH).await?;
        redis.revoke_all(&batch).await?;
        copied += batch.len();
        match batch.last() {
            Some((last, _)) if batch.len() as i64 == REFILL_BATCH => after = last.clone(),
            _ => break,
        }
    }
    redis.mark_complete(COMPLETE_FOR).await?;
    Ok(copied)
}

#[async_trait]
impl Store for TieredStore {
    fn backend(&self) -> &'static str {
        "tiered"
    }

    async fn revoke(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError> {
        let newly = self.postgres.revoke(token_id, until).await?;
        self.redis.revoke(token_id, until).await?;
        Ok(newly)
    }

    async fn is_revoked(&self, token_id: &str) -> Result<bool, StoreError> {
        match self.redis.revoked_and_complete(token_id).await {
            Ok((true, _)) => return Ok(true),
            Ok((false, true)) => return Ok(false),
            Ok((false, false)) => self.start_refill(),
            Err(e) => tracing::debug!(error = %e, "redis unavailable, reading postgres"),
        }
        let until = self.postgres.revoked_until(token_id).await?;
        if let Some(until) = until {
            // Fill Redis on the way, so the next read of this token stays in Redis.
            let _ = self.redis.revoke(token_id, until).await;
        }
        Ok(until.is_some())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let (redis, postgres) = tokio::join!(self.redis.ping(), self.postgres.ping());
        redis.and(postgres)
    }

    /// Counters are ephemeral: they live in Redis only.
    async fn rate_limit(
        &self,
        policy: &str,
        key: &str,
        gcra: Gcra,
        cost: u32,
    ) -> Result<Decision, StoreError> {
        self.redis.rate_limit(policy, key, gcra, cost).await
    }

    async fn reset_rate_limit(&self, policy: &str, key: &str) -> Result<(), StoreError> {
        self.redis.reset_rate_limit(policy, key).await
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        self.postgres.purge_expired().await
    }
}
