//! Where state that every node must agree on lives. One trait, one factory; the domain layer
//! computes every lifetime and hands the store absolute instants.

mod batch;
mod cache;
mod feed;
mod memory;
pub mod postgres;
mod redis;
mod tiered;

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::clock::{Clock, from_unix_millis as from_millis, unix_millis as millis};
use crate::rules::gcra::{Decision, Gcra};
pub use crate::rules::mfa::StepAccept;
pub use crate::rules::rotation::{Rotation, Successor};
use crate::rules::session::SessionTimes;

pub use memory::MemoryStore;
pub use postgres::{PostgresConfig, PostgresStore};
pub use redis::{RedisConfig, RedisStore, RedisTls};
pub use tiered::TieredStore;

/// The store's settings, as `config` builds them: each backend its own part, never the whole
/// configuration.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Memory,
    Redis(RedisConfig),
    Postgres(PostgresConfig),
    Tiered(RedisConfig, PostgresConfig),
}

/// A store that could not answer. The detail is for the log, never for the client.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{backend} store unavailable: {detail}")]
pub struct StoreError {
    pub backend: &'static str,
    pub detail: String,
}

/// What every Validate asks the store about a token whose signature and claims passed, in
/// one round trip: is it revoked by id, cut off by a logout of its subject, bound to a
/// session that ended, or of a refresh family that was revoked?
#[derive(Debug, Clone, Copy)]
pub struct TokenCheck<'a> {
    pub token_id: &'a str,
    pub subject: &'a str,
    /// The instant of the login the token descends from, in milliseconds since the epoch:
    /// its own issue for a token from Issue, its family's start for one from Refresh. A logout
    /// revokes the token if this is at or before its cutoff.
    pub issued_at_ms: i64,
    pub session_id: Option<&'a str>,
    pub family_id: Option<&'a str>,
    /// The caller's clock.
    pub now: SystemTime,
    /// The last instant the token could be accepted (its `exp` plus the leeway), in
    /// milliseconds since the epoch: a cached fact about it is useless after that.
    pub accepted_until_ms: i64,
    /// Read the backend, not the revocation view: the caller writes on the strength of the
    /// answer (a refresh rotates), so the view's bound on staleness is not good enough.
    pub fresh: bool,
}

/// What a backend holds about a token, fact by fact, as both shared backends read it (and
/// the revocation view keeps it): instants are milliseconds since the epoch, judged against
/// the caller's clock, so that a kept fact still ends on time.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Facts {
    /// Until when the token id's revocation lives.
    pub revoked: cache::Fact,
    /// The subject's logout cutoff.
    pub cutoff: cache::Fact,
    /// Until when the token's session is live.
    pub session: cache::Fact,
    /// The token's family: -1 when revoked, else until when it lives.
    pub family: cache::Fact,
}

impl Facts {
    /// Positive evidence: revoked by id, cut off by a logout, or of a revoked family.
    pub fn revoke(&self, t: &TokenCheck<'_>) -> bool {
        let now = millis(t.now);
        self.revoked.is_some_and(|until| until > now)
            || self
                .cutoff
                .is_some_and(|c| crate::rules::session::cuts_off(c, t.issued_at_ms))
            || self.family == Some(-1)
    }

    /// Whether the session or family the token names is gone (or was never there).
    pub fn missing(&self, t: &TokenCheck<'_>) -> bool {
        let now = millis(t.now);
        let live = |f: cache::Fact| f.is_some_and(|until| until > now);
        (t.session_id.is_some() && !live(self.session))
            || (t.family_id.is_some() && self.family != Some(-1) && !live(self.family))
    }
}

/// A session shared by every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    pub subject: String,
    pub created_at: SystemTime,
    /// The absolute end.
    pub expires_at: SystemTime,
    pub last_seen_at: SystemTime,
    /// With an idle timeout: the end unless touched before. Never after `expires_at`.
    pub idle_expires_at: Option<SystemTime>,
    pub metadata: BTreeMap<String, String>,
}

impl Session {
    /// When the session stops counting: its idle deadline or its absolute end.
    pub fn live_until(&self) -> SystemTime {
        self.idle_expires_at
            .map_or(self.expires_at, |idle| idle.min(self.expires_at))
    }

    /// The times its atomic steps (`rules::session`) read and write.
    pub fn times(&self) -> SessionTimes {
        SessionTimes {
            expires_ms: millis(self.expires_at),
            last_seen_ms: millis(self.last_seen_at),
            idle_ms: self.idle_expires_at.map(millis),
        }
    }

    /// Takes the times a step computed.
    pub fn set_times(&mut self, t: SessionTimes) {
        self.expires_at = from_millis(t.expires_ms);
        self.last_seen_at = from_millis(t.last_seen_ms);
        self.idle_expires_at = t.idle_ms.map(from_millis);
    }
}

/// A refresh-token family: the refresh tokens that replaced one another since a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub id: String,
    pub subject: String,
    /// The absolute end of the chain; no token of the family outlives it.
    pub expires_at: SystemTime,
    /// The one refresh token id of the family that may be spent now.
    pub current: String,
}

/// A subject's second factor as a store keeps it. The store never sees a secret in clear:
/// `mfa` seals each one (bound to its subject) before handing it over, and backup codes come
/// as keyed hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MfaRecord {
    /// A pending enrollment, live at the time asked: its sealed secret and its end.
    pub pending: Option<(String, SystemTime)>,
    pub enrolled: Option<MfaEnrolled>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MfaEnrolled {
    /// The sealed secret.
    pub secret: String,
    pub enrolled_at: SystemTime,
    /// The last TOTP time step accepted: none at or before it is accepted again.
    pub last_step: i64,
    pub backup_codes: u32,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short backend name for logs and metrics.
    fn backend(&self) -> &'static str;

    /// Records that `token_id` is revoked until `until`, after which the token would be
    /// rejected as expired anyway. Returns whether it was not revoked before. Returns only
    /// once the record is stored.
    async fn revoke(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError>;

    /// Whether the token is revoked in any of the ways [`TokenCheck`] lists.
    async fn is_revoked(&self, token: &TokenCheck<'_>) -> Result<bool, StoreError>;

    /// Logout everywhere: tokens of `subject` issued before `cutoff` are revoked (the record
    /// lives until `until`, when they have all expired), and its sessions are deleted.
    /// Returns how many sessions were.
    async fn revoke_subject(
        &self,
        subject: &str,
        cutoff: SystemTime,
        until: SystemTime,
    ) -> Result<u32, StoreError>;

    async fn create_session(&self, session: &Session) -> Result<(), StoreError>;

    /// A session that is still live at `now`.
    async fn get_session(&self, id: &str, now: SystemTime) -> Result<Option<Session>, StoreError>;

    /// Moves `last_seen_at` to `now` and, for a session with an idle deadline, the deadline
    /// to `idle_until` (capped at the session's end). `None` when the session is not live.
    async fn touch_session(
        &self,
        id: &str,
        now: SystemTime,
        idle_until: Option<SystemTime>,
    ) -> Result<Option<Session>, StoreError>;

    /// Whether a live session was deleted.
    async fn delete_session(&self, id: &str, now: SystemTime) -> Result<bool, StoreError>;

    /// The live sessions of `subject`, oldest first.
    async fn list_sessions(
        &self,
        subject: &str,
        now: SystemTime,
    ) -> Result<Vec<Session>, StoreError>;

    async fn create_family(&self, family: &Family) -> Result<(), StoreError>;

    /// Spends refresh token `presented` of family `family_id`, atomically: of two calls with
    /// the same token, on any nodes, one rotates and the other replays or revokes.
    /// `replay_until` is how long the spent token may still be retried for its successor.
    /// `presented_revoked`: the token was revoked (by id), so it never rotates or replays,
    /// and a spent one presented again revokes the family (`rules::rotation::step`).
    async fn rotate(
        &self,
        family_id: &str,
        presented: &str,
        presented_revoked: bool,
        successor: &Successor,
        now: SystemTime,
        replay_until: SystemTime,
    ) -> Result<Rotation, StoreError>;

    /// Whether the backend answers. Never writes, never scans.
    async fn ping(&self) -> Result<(), StoreError>;

    /// One rate-limit step for `key` under `policy`, atomic in the backend. `at: None` runs
    /// it on the backend's clock, as serving does (so the nodes' clocks do not matter);
    /// `Some` at that instant, as the conformance traces do.
    async fn rate_limit(
        &self,
        policy: &str,
        key: &str,
        gcra: Gcra,
        cost: u32,
        at: Option<SystemTime>,
    ) -> Result<Decision, StoreError>;

    /// Forgets `key` under `policy`: full allowance, no lockout.
    async fn reset_rate_limit(&self, policy: &str, key: &str) -> Result<(), StoreError>;

    /// Drops records whose lifetime has passed, in bounded batches; returns how many. Runs
    /// from a background task, never on a request or probe path.
    async fn purge_expired(&self) -> Result<usize, StoreError>;

    /// The registry of live nodes (see `cluster`): records `me` as live for `ttl` on the
    /// backend's clock, drops the nodes whose time has passed, and summarizes the live ones
    /// at a cost that does not grow with their number (see [`Registry`]). A node whose
    /// deadline lies further than `ttl` ahead is not live (no heartbeat wrote it), and is
    /// dropped.
    async fn heartbeat(&self, me: Beat<'_>, ttl: Duration) -> Result<Registry, StoreError>;

    /// Every live node's id and document, `me` included; with `unlike`, only those whose
    /// digest is not `unlike` or that have none (a node of an older version, an entry written
    /// by hand). Reads the whole registry: for `check-config` (`None`, which writes
    /// nothing), and for a heartbeat that found a digest other than its own (which may drop
    /// what is no longer live).
    async fn nodes(
        &self,
        ttl: Duration,
        unlike: Option<&str>,
    ) -> Result<Vec<(String, String)>, StoreError>;

    /// Takes `node` out of the registry: it is stopping.
    async fn leave(&self, node: &str) -> Result<(), StoreError>;

    /// Records a pending MFA enrollment of `subject`, its sealed secret, until `until`;
    /// replaces a pending one and leaves an enrolled secret in force.
    async fn mfa_begin(
        &self,
        subject: &str,
        sealed: &str,
        until: SystemTime,
    ) -> Result<(), StoreError>;

    /// What is kept for `subject`; a pending enrollment ended by `now` is not returned.
    async fn mfa_get(&self, subject: &str, now: SystemTime) -> Result<MfaRecord, StoreError>;

    /// Confirms the pending enrollment, atomically: only when it holds `sealed` and is live at
    /// `now` does that secret become the enrolled one, with time step `step` accepted and
    /// `backup` as its backup code hashes, and the pending one go. Of two confirms of one
    /// enrollment, on any nodes, one returns true. The enrolled secret is `reseal` when given
    /// (the same secret sealed under the current MFA key), as in `mfa_accept`.
    async fn mfa_confirm(
        &self,
        subject: &str,
        sealed: &str,
        reseal: Option<&str>,
        step: i64,
        backup: &[String],
        now: SystemTime,
    ) -> Result<bool, StoreError>;

    /// Accepts TOTP time step `step` of the enrolled secret `sealed`, atomically: only when
    /// it is later than every step accepted before. Of two calls with one step, on any nodes,
    /// one is accepted. An accepted step also stores `reseal`, when given, as the secret.
    async fn mfa_accept(
        &self,
        subject: &str,
        sealed: &str,
        step: i64,
        reseal: Option<&str>,
    ) -> Result<StepAccept, StoreError>;

    /// Spends a backup code of an enrolled subject, atomically: removes whichever of
    /// `candidates` (one code's hashes, one per MFA key) it holds. How many are left, or
    /// `None` when it held none of them. Of two calls with one code, one spends it.
    async fn mfa_spend_backup(
        &self,
        subject: &str,
        candidates: &[String],
    ) -> Result<Option<u32>, StoreError>;

    /// Replaces an enrolled subject's backup code hashes; false when none is enrolled.
    async fn mfa_set_backup(&self, subject: &str, backup: &[String]) -> Result<bool, StoreError>;

    /// Forgets everything of `subject`'s second factor; whether an enrolled secret or an
    /// enrollment pending at `now` was there.
    async fn mfa_disable(&self, subject: &str, now: SystemTime) -> Result<bool, StoreError>;
}

/// A new session id for `subject`: 128 random bits after a short tag derived from the
/// subject, so that Redis keeps a session and its subject's index in one hash slot.
pub fn new_session_id(subject: &str) -> String {
    format!("{}{}", subject_tag(subject), crate::ids::random_id())
}

/// Characters of a session id that are its subject's tag.
const TAG_LEN: usize = 4;

/// Three bytes of SHA-256 of the subject, base64url: 4 characters, 16 million slots' worth.
fn subject_tag(subject: &str) -> String {
    use base64::Engine;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, subject.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest.as_ref()[..3])
}

/// The subject tag a session id carries, if it is one of ours.
fn session_tag(id: &str) -> Option<&str> {
    id.get(..TAG_LEN).filter(|_| id.len() > TAG_LEN)
}

/// First and longest wait between attempts of [`retry_in_background`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How a call refused before the first attempt to connect has ended says so.
pub const FIRST_ATTEMPT: &str = "the first attempt is under way";

/// Why a backend's background attempt (connecting, migrating) has not succeeded yet: its last
/// failure, in the backend's own words, so that a call refused meanwhile, and the health
/// checker, say why rather than "not connected yet".
#[derive(Clone, Default)]
pub(crate) struct Pending(Arc<std::sync::Mutex<Option<String>>>);

impl Pending {
    /// The error of a call refused because the attempt has not succeeded yet.
    fn refusal(&self, what: &str) -> String {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(reason) => format!("{what}: {reason}"),
            None => format!("{what} yet: {FIRST_ATTEMPT}"),
        }
    }

    fn set(&self, reason: Option<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }
}

/// Runs `attempt` in a background task until it succeeds (connecting, migrating), waiting
/// 100 ms after the first failure and twice as long after each next one, up to 5 s; then
/// hands the result to `done`. A backend that is down at start thus never stops the sidecar.
/// The last failure's reason is kept in `pending`, which the calls refused meanwhile give.
fn retry_in_background<T, E, F, Fut>(
    backend: &'static str,
    what: &'static str,
    pending: Pending,
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
                    pending.set(None);
                    tracing::info!(backend, "{what}: done");
                    return done(value);
                }
                Err(e) => {
                    // The health checker logs the reason, from the pings it refuses.
                    tracing::debug!(backend, error = %e, retry_in = ?backoff, "{what}: failed");
                    pending.set(Some(format!("{what}: {e}")));
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
    use tracing::Instrument;
    let started = std::time::Instant::now();
    let span = if crate::telemetry::exporting() {
        tracing::info_span!("store", otel.name = op, otel.kind = "client", backend, op)
    } else {
        tracing::Span::none()
    };
    let result = tokio::time::timeout(timeout, call).instrument(span).await;
    crate::telemetry::record_backend_call(backend, op, started, matches!(result, Ok(Ok(_))));
    match result {
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
pub fn open(config: &StoreConfig, clock: Arc<dyn Clock>) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match config {
        StoreConfig::Memory => Arc::new(MemoryStore::new(clock)),
        StoreConfig::Redis(redis) => Arc::new(RedisStore::open(redis)?),
        StoreConfig::Postgres(postgres) => Arc::new(PostgresStore::open(postgres, clock)?),
        StoreConfig::Tiered(redis, postgres) => Arc::new(TieredStore::new(
            RedisStore::open(redis)?,
            PostgresStore::open(postgres, clock)?,
        )),
    })
}

/// What a node publishes at each heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct Beat<'a> {
    pub id: &'a str,
    /// Random for each process: tells that another process wrote under the same id.
    pub nonce: &'a str,
    /// The digest of what every node must agree on: equal digests agree.
    pub digest: &'a str,
    /// The whole document, read only by a node whose digest differs.
    pub document: &'a str,
}

/// The live nodes as one heartbeat sees them: a summary whose size does not grow with their
/// number (while they agree), so that a heartbeat costs the backend the same at any fleet
/// size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    /// Live nodes, the caller included.
    pub live: usize,
    /// How many live nodes publish each digest: one entry while every node agrees.
    pub digests: Vec<(String, usize)>,
    /// Changes whenever a node joins, leaves or changes its digest: a node whose digest
    /// differs reads the documents again only when this moves.
    pub generation: u64,
    /// Live entries without a digest (nodes of an older version, entries written by hand):
    /// while there are any, every heartbeat reads the documents.
    pub undigested: usize,
    /// Another process wrote under the caller's id since its last heartbeat.
    pub taken: bool,
    /// The live nodes' ids, when there are at most [`Registry::LISTED`] of them.
    pub ids: Vec<String>,
}

impl Registry {
    /// Up to how many live nodes a heartbeat lists by id.
    pub const LISTED: usize = 16;
}

/// Where a backend is, and how it is reached, without any credential: what `check-config`
/// shows.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub backend: &'static str,
    /// `host:port`, or a socket path.
    pub address: String,
    /// Whether the address is this host (loopback or a Unix socket).
    pub local: bool,
    /// Whether traffic is encrypted, and whether the server's certificate is checked.
    pub encrypted: bool,
    pub verified: bool,
    /// How TLS is set up, in the settings' words.
    pub tls: String,
}

/// The endpoints the store's settings name.
pub fn endpoints(config: &StoreConfig) -> Vec<Endpoint> {
    match config {
        StoreConfig::Memory => Vec::new(),
        StoreConfig::Redis(r) => redis::endpoints(r),
        StoreConfig::Postgres(p) => postgres::endpoints(p),
        StoreConfig::Tiered(r, p) => {
            let mut all = redis::endpoints(r);
            all.extend(postgres::endpoints(p));
            all
        }
    }
}

/// Whether `host` names this host.
fn is_local(host: &str) -> bool {
    host == "localhost"
        || host.starts_with('/')
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Microseconds since the epoch: how the rate-limit steps count time.
fn micros(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_id_carries_its_subjects_tag() {
        let id = new_session_id("alice");
        assert_eq!(id.len(), TAG_LEN + 22);
        assert_eq!(session_tag(&id), Some(subject_tag("alice").as_str()));
        assert_ne!(subject_tag("alice"), subject_tag("bob"));
        assert_eq!(session_tag("abcd"), None);
    }
}
