//! Redis in front of PostgreSQL. PostgreSQL is the truth; Redis answers the hot path.
//!
//! Every write (a revocation, a logout cutoff, a session, a family) goes to PostgreSQL, then
//! to Redis, and is acknowledged only when both hold it. Session reads and refresh rotations
//! go to PostgreSQL; Validate reads Redis. Redis answers "not revoked" (and "the session
//! lives") only while it carries the *complete* marker, which a refill from PostgreSQL sets.
//!
//! Three rules keep Redis from ever vouching for less than PostgreSQL holds:
//! - **Monotone mirror.** Every write to Redis only moves state forward (a cutoff only rises,
//!   a family only goes from live to revoked, an ended session leaves a tombstone, a
//!   revocation only adds), so a refill's copy and a live write end in the newest state in
//!   either order.
//! - **A lost ticket voids the refill.** A refill sets the marker only if the ticket it wrote
//!   at its start survived; a loss of Redis data takes the ticket, and so does the next rule.
//! - **A failed mirror write voids trust.** When PostgreSQL took a write and Redis did not, the
//!   marker and any refill's ticket are deleted (retried in the background until Redis takes
//!   it, while this node trusts no marker), so every node reads PostgreSQL until a refill that
//!   started after the failure, and so read the write, has run.
//!
//! ARCHITECTURE.md argues why these hold in every interleaving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use super::postgres::PostgresStore;
use super::redis::RedisStore;
use super::{
    Beat, Family, MfaRecord, Registry, Rotation, Session, StepAccept, Store, StoreError, Successor,
    TokenCheck,
};
use crate::rules::gcra::{Decision, Gcra};

/// Rows copied per batch when refilling Redis.
const REFILL_BATCH: i64 = 1000;

/// How long a refill vouches for Redis; after that the next read starts a new refill.
const COMPLETE_FOR: Duration = Duration::from_secs(24 * 3600);

pub struct TieredStore {
    redis: RedisStore,
    postgres: PostgresStore,
    refilling: Arc<AtomicBool>,
    trust: Arc<Trust>,
}

/// Whether this node may believe Redis's complete marker: not while a failed mirror write has
/// not yet been followed by a successful void of the marker.
#[derive(Default)]
struct Trust {
    /// Mirror writes that failed, counted.
    failed: AtomicU64,
    /// The count of failures the last successful void came after.
    voided: AtomicU64,
    /// A void task is running.
    voiding: AtomicBool,
}

impl Trust {
    fn trusted(&self) -> bool {
        self.voided.load(Ordering::SeqCst) >= self.failed.load(Ordering::SeqCst)
    }
}

impl TieredStore {
    pub fn new(redis: RedisStore, postgres: PostgresStore) -> TieredStore {
        TieredStore {
            redis,
            postgres,
            refilling: Arc::new(AtomicBool::new(false)),
            trust: Arc::new(Trust::default()),
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

    /// Mirrors a write PostgreSQL has taken to Redis. If Redis does not take it, Redis must
    /// stop vouching for completeness: see [`TieredStore::void_trust`].
    async fn mirror<T>(
        &self,
        write: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = write.await;
        if let Err(e) = &result {
            tracing::warn!(
                backend = "tiered",
                error = %e,
                "redis missed a write postgres took: voiding the complete marker"
            );
            self.void_trust();
        }
        result
    }

    /// Counts a failed mirror write and makes sure a task deletes the marker after it. Until
    /// a void that began after the last failure has succeeded, this node trusts no marker; a
    /// void deletes every refill's ticket too, so no refill that might have missed the write
    /// can set the marker again.
    fn void_trust(&self) {
        self.trust.failed.fetch_add(1, Ordering::SeqCst);
        if self.trust.voiding.swap(true, Ordering::SeqCst) {
            return;
        }
        let (redis, trust) = (self.redis.clone(), self.trust.clone());
        tokio::spawn(async move {
            let mut backoff = super::FIRST_BACKOFF;
            loop {
                let failed = trust.failed.load(Ordering::SeqCst);
                match redis.void_marker().await {
                    Ok(()) => {
                        trust.voided.fetch_max(failed, Ordering::SeqCst);
                        trust.voiding.store(false, Ordering::SeqCst);
                        // A failure counted since the load above needs a void after it: keep
                        // going, unless a task started for it has taken over.
                        if trust.trusted() || trust.voiding.swap(true, Ordering::SeqCst) {
                            return;
                        }
                        backoff = super::FIRST_BACKOFF;
                    }
                    Err(e) => {
                        tracing::warn!(backend = "tiered", error = %e, retry_in = ?backoff,
                            "voiding the complete marker failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(super::MAX_BACKOFF);
                    }
                }
            }
        });
    }
}

/// Copies every live revocation, cutoff, session, session end and family to Redis, then marks
/// Redis complete if its ticket survived. A write made while this runs goes to Redis by its
/// own call; the copies only move state forward, so neither undoes the other.
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
    // Sessions that ended, as tombstones: each deletes a copy of its session that a write
    // landing after a loss of Redis data put back (a copy read before the end, a mirror write
    // held on a link), and refuses any that lands later.
    let mut after = String::new();
    let now = postgres.now();
    loop {
        let batch = postgres.session_ends_after(&after, REFILL_BATCH).await?;
        for (id, ends) in &batch {
            redis.end_session(id, now, Some(*ends)).await?;
        }
        copied += batch.len();
        match batch.last() {
            Some((last, _)) if batch.len() as i64 == REFILL_BATCH => after = last.clone(),
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
            detail: "redis lost data or missed a write during the refill; the next read \
                     starts another"
                .into(),
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
        self.mirror(self.redis.revoke(token_id, until)).await?;
        Ok(newly)
    }

    async fn is_revoked(&self, t: &TokenCheck<'_>) -> Result<bool, StoreError> {
        match self.redis.evidence(t, true).await {
            Ok(e) if e.revoked => return Ok(true),
            // Absent from a complete Redis: absent from PostgreSQL too.
            Ok(e) if e.complete && self.trust.trusted() => return Ok(e.missing),
            Ok(e) if !e.complete => self.start_refill(),
            Ok(_) => {} // a void of the marker is under way
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
        let ended = self.postgres.logout(subject, cutoff, until).await?;
        let tombstones: Vec<(String, SystemTime)> =
            ended.iter().map(|e| (e.id.clone(), e.expires_at)).collect();
        self.mirror(
            self.redis
                .logout(subject, cutoff, until, cutoff, &tombstones),
        )
        .await?;
        Ok(ended.iter().filter(|e| e.live).count() as u32)
    }

    async fn create_session(&self, session: &Session) -> Result<(), StoreError> {
        self.postgres.create_session(session).await?;
        self.mirror(self.redis.create_session(session)).await
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
            self.mirror(self.redis.put_session(session, now)).await?;
        }
        Ok(touched)
    }

    async fn delete_session(&self, id: &str, now: SystemTime) -> Result<bool, StoreError> {
        let (live, ends) = self.postgres.end_session(id, now).await?;
        self.mirror(self.redis.end_session(id, now, ends)).await?;
        Ok(live)
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
        self.mirror(self.redis.create_family(family)).await
    }

    /// Atomic in PostgreSQL; a revoked family is then marked in Redis before the answer.
    async fn rotate(
        &self,
        family_id: &str,
        presented: &str,
        presented_revoked: bool,
        successor: &Successor,
        now: SystemTime,
        replay_until: SystemTime,
    ) -> Result<Rotation, StoreError> {
        let rotation = self
            .postgres
            .rotate(
                family_id,
                presented,
                presented_revoked,
                successor,
                now,
                replay_until,
            )
            .await?;
        if rotation == Rotation::Reused
            && let Some((family, revoked)) = self.postgres.family(family_id).await?
        {
            self.mirror(self.redis.put_family(&family, revoked)).await?;
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
        at: Option<SystemTime>,
    ) -> Result<Decision, StoreError> {
        self.redis.rate_limit(policy, key, gcra, cost, at).await
    }

    async fn reset_rate_limit(&self, policy: &str, key: &str) -> Result<(), StoreError> {
        self.redis.reset_rate_limit(policy, key).await
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        self.postgres.purge_expired().await
    }

    /// The registry is ephemeral, as counters are: Redis only. A flush loses it until the
    /// next heartbeat of every node.
    async fn heartbeat(&self, me: Beat<'_>, ttl: Duration) -> Result<Registry, StoreError> {
        self.redis.heartbeat(me, ttl).await
    }

    async fn nodes(
        &self,
        ttl: Duration,
        unlike: Option<&str>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.redis.nodes(ttl, unlike).await
    }

    async fn leave(&self, node: &str) -> Result<(), StoreError> {
        self.redis.leave(node).await
    }

    // Second factors live in PostgreSQL alone: an enrolled secret must outlive a Redis that
    // loses its data, and each step is atomic there. MFA calls are few (a login's), so they
    // need no Redis in front.

    async fn mfa_begin(
        &self,
        subject: &str,
        sealed: &str,
        until: SystemTime,
    ) -> Result<(), StoreError> {
        self.postgres.mfa_begin(subject, sealed, until).await
    }

    async fn mfa_get(&self, subject: &str, now: SystemTime) -> Result<MfaRecord, StoreError> {
        self.postgres.mfa_get(subject, now).await
    }

    async fn mfa_confirm(
        &self,
        subject: &str,
        sealed: &str,
        reseal: Option<&str>,
        step: i64,
        backup: &[String],
        now: SystemTime,
    ) -> Result<bool, StoreError> {
        self.postgres
            .mfa_confirm(subject, sealed, reseal, step, backup, now)
            .await
    }

    async fn mfa_accept(
        &self,
        subject: &str,
        sealed: &str,
        step: i64,
        reseal: Option<&str>,
    ) -> Result<StepAccept, StoreError> {
        self.postgres
            .mfa_accept(subject, sealed, step, reseal)
            .await
    }

    async fn mfa_spend_backup(
        &self,
        subject: &str,
        candidates: &[String],
    ) -> Result<Option<u32>, StoreError> {
        self.postgres.mfa_spend_backup(subject, candidates).await
    }

    async fn mfa_set_backup(&self, subject: &str, backup: &[String]) -> Result<bool, StoreError> {
        self.postgres.mfa_set_backup(subject, backup).await
    }

    async fn mfa_disable(&self, subject: &str, now: SystemTime) -> Result<bool, StoreError> {
        self.postgres.mfa_disable(subject, now).await
    }
}
