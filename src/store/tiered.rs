//! Redis in front of PostgreSQL. PostgreSQL is the truth; Redis answers the hot path.
//!
//! Every write (a revocation, a logout cutoff, a session, a family) goes to PostgreSQL, then
//! to Redis, and is acknowledged only when both hold it. Session reads and refresh rotations
//! go to PostgreSQL; Validate reads Redis. Redis answers "not revoked" (and "the session
//! lives") only while it carries the *complete* marker, which a refill from PostgreSQL sets.
//! If Redis loses its data (FLUSHALL, a restart without persistence) the marker goes with it,
//! reads fall back to PostgreSQL, and a refill starts; a loss during a refill takes the
//! refill's ticket too, so that refill cannot set the marker. If Redis does not answer at
//! all, reads go to PostgreSQL. So an acknowledged revocation is never forgotten.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::postgres::PostgresStore;
use super::redis::RedisStore;
use super::{Family, Rotation, Session, Store, StoreError, Successor, TokenCheck};
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

/// Copies every live revocation, cutoff, session and family to Redis, then marks Redis
/// complete. A write made while this runs goes to Redis by its own call, so nothing falls
/// between the two.
async fn refill(redis: &RedisStore, postgres: &PostgresStore) -> Result<usize, StoreError> {
    let ticket = redis.begin_refill(COMPLETE_FOR).await?;
    let mut copied = 0;
    let mut after = String::new();
    loop {
        let batch = postgres.live_after(&after, REFILL_BATCH).await?;
        redis.revoke_all(&batch).await?;
        copied += batch.len();
        match batch.last() {
            Some((last, _)) if batch.len() as i64 == REFILL_BATCH => after = last.clone(),
            _ => break,
        }
    }
    let mut after = String::new();
    loop {
        let batch = postgres.live_cutoffs_after(&after, REFILL_BATCH).await?;
        for (subject, cutoff, until) in &batch {
            redis.put_cutoff(subject, *cutoff, *until).await?;
        }
        copied += batch.len();
        match batch.last() {
            Some((last, ..)) if batch.len() as i64 == REFILL_BATCH => after = last.clone(),
            _ => break,
        }
    }
    let mut after = String::new();
    loop {
        let batch = postgres.live_sessions_after(&after, REFILL_BATCH).await?;
        for session in &batch {
            redis.put_session(session, session.last_seen_at).await?;
        }
        copied += batch.len();
        match batch.last() {
            Some(last) if batch.len() as i64 == REFILL_BATCH => after = last.id.clone(),
            _ => break,
        }
    }
    let mut after = String::new();
    loop {
        let batch = postgres.live_families_after(&after, REFILL_BATCH).await?;
        for (family, revoked) in &batch {
            redis.put_family(family, *revoked).await?;
        }
        copied += batch.len();
        match batch.last() {
            Some((last, _)) if batch.len() as i64 == REFILL_BATCH => after = last.id.clone(),
            _ => break,
        }
    }
    if !redis.mark_complete(&ticket, COMPLETE_FOR).await? {
        return Err(StoreError {
            backend: "redis",
            detail: "redis lost data during the refill; the next read starts another".into(),
        });
    }
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

    async fn is_revoked(&self, t: &TokenCheck<'_>) -> Result<bool, StoreError> {
        match self.redis.evidence(t, true).await {
            Ok(e) if e.revoked => return Ok(true),
            // Absent from a complete Redis: absent from PostgreSQL too.
            Ok(e) if e.complete => return Ok(e.missing),
            Ok(_) => self.start_refill(),
            Err(e) => tracing::debug!(error = %e, "redis unavailable, reading postgres"),
        }
        self.postgres.is_revoked(t).await
    }

    async fn revoke_subject(
        &self,
        subject: &str,
        cutoff: SystemTime,
        until: SystemTime,
    ) -> Result<u32, StoreError> {
        let deleted = self.postgres.revoke_subject(subject, cutoff, until).await?;
        self.redis.revoke_subject(subject, cutoff, until).await?;
        Ok(deleted)
    }

    async fn create_session(&self, session: &Session) -> Result<(), StoreError> {
        self.postgres.create_session(session).await?;
        self.redis.create_session(session).await
    }

    async fn get_session(&self, id: &str, now: SystemTime) -> Result<Option<Session>, StoreError> {
        self.postgres.get_session(id, now).await
    }

    async fn touch_session(
        &self,
        id: &str,
        now: SystemTime,
        idle_until: Option<SystemTime>,
    ) -> Result<Option<Session>, StoreError> {
        let touched = self.postgres.touch_session(id, now, idle_until).await?;
        if let Some(session) = &touched {
            self.redis.put_session(session, now).await?;
        }
        Ok(touched)
    }

    async fn delete_session(&self, id: &str, now: SystemTime) -> Result<bool, StoreError> {
        let deleted = self.postgres.delete_session(id, now).await?;
        self.redis.delete_session(id, now).await?;
        Ok(deleted)
    }

    async fn list_sessions(
        &self,
        subject: &str,
        now: SystemTime,
    ) -> Result<Vec<Session>, StoreError> {
        self.postgres.list_sessions(subject, now).await
    }

    async fn create_family(&self, family: &Family) -> Result<(), StoreError> {
        self.postgres.create_family(family).await?;
        self.redis.create_family(family).await
    }

    /// Atomic in PostgreSQL; a revoked family is then marked in Redis before the answer.
    async fn rotate(
        &self,
        family_id: &str,
        presented: &str,
        successor: &Successor,
        now: SystemTime,
        replay_until: SystemTime,
    ) -> Result<Rotation, StoreError> {
        let rotation = self
            .postgres
            .rotate(family_id, presented, successor, now, replay_until)
            .await?;
        if rotation == Rotation::Reused
            && let Some((family, revoked)) = self.postgres.family(family_id).await?
        {
            self.redis.put_family(&family, revoked).await?;
        }
        Ok(rotation)
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
