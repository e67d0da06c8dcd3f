//! Where state that every node must agree on lives. One trait, one factory; the domain layer
//! computes every lifetime and hands the store absolute instants.

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

/// What every Validate asks the store about a token whose signature and claims passed, in
/// one round trip: is it revoked by id, cut off by a logout of its subject, bound to a
/// session that ended, or of a refresh family that was revoked?
#[derive(Debug, Clone, Copy)]
pub struct TokenCheck<'a> {
    pub token_id: &'a str,
    pub subject: &'a str,
    /// When the token was issued, in milliseconds since the epoch.
    pub issued_at_ms: i64,
    pub session_id: Option<&'a str>,
    pub family_id: Option<&'a str>,
    /// The caller's clock.
    pub now: SystemTime,
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

/// The tokens that replace a spent refresh token, remembered so that a retry within the
/// reuse grace period gets the same ones (same ids and issue time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Successor {
    pub refresh_id: String,
    pub access_id: String,
    pub issued_at_ms: i64,
}

/// What spending a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// It was the family's current token: the successor is current now.
    Rotated { family_ends: SystemTime },
    /// It was the token spent last, presented again within the grace period: here is the
    /// successor it got then.
    Replay {
        successor: Successor,
        family_ends: SystemTime,
    },
    /// It was spent before: the family is revoked now.
    Reused,
    /// The family is revoked, expired or unknown.
    Gone,
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
    async fn rotate(
        &self,
        family_id: &str,
        presented: &str,
        successor: &Successor,
        now: SystemTime,
        replay_until: SystemTime,
    ) -> Result<Rotation, StoreError>;

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

/// A new session id for `subject`: 128 random bits after a short tag derived from the
/// subject, so that Redis keeps a session and its subject's index in one hash slot.
pub fn new_session_id(subject: &str) -> String {
    format!("{}{}", subject_tag(subject), crate::tokens::random_id())
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

/// The one decision of a rotation, made by the memory store and restated by the Redis script
/// and the SQL function. `state` is updated in place.
fn rotate_step(
    state: &mut FamilyState,
    presented: &str,
    successor: &Successor,
    now_ms: i64,
    replay_until_ms: i64,
) -> Rotation {
    if state.revoked || state.expires_ms <= now_ms {
        return Rotation::Gone;
    }
    if presented == state.current {
        state.previous = Some(std::mem::replace(
            &mut state.current,
            successor.refresh_id.clone(),
        ));
        state.successor = Some(successor.clone());
        state.replay_until_ms = replay_until_ms;
        return Rotation::Rotated {
            family_ends: from_millis(state.expires_ms),
        };
    }
    if state.previous.as_deref() == Some(presented)
        && now_ms < state.replay_until_ms
        && let Some(s) = &state.successor
    {
        return Rotation::Replay {
            successor: s.clone(),
            family_ends: from_millis(state.expires_ms),
        };
    }
    state.revoked = true;
    Rotation::Reused
}

/// A family as the memory store keeps it.
#[derive(Debug, Clone)]
struct FamilyState {
    current: String,
    previous: Option<String>,
    replay_until_ms: i64,
    successor: Option<Successor>,
    revoked: bool,
    expires_ms: i64,
}

impl From<&Family> for FamilyState {
    fn from(f: &Family) -> FamilyState {
        FamilyState {
            current: f.current.clone(),
            previous: None,
            replay_until_ms: 0,
            successor: None,
            revoked: false,
            expires_ms: millis(f.expires_at),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn successor(n: u32) -> Successor {
        Successor {
            refresh_id: format!("r{n}"),
            access_id: format!("a{n}"),
            issued_at_ms: n as i64,
        }
    }

    fn family() -> FamilyState {
        FamilyState::from(&Family {
            id: "f".into(),
            subject: "s".into(),
            expires_at: from_millis(10_000),
            current: "r0".into(),
        })
    }

    #[test]
    fn a_refresh_token_rotates_once_then_replays_within_grace_then_revokes() {
        let mut f = family();
        let ends = from_millis(10_000);
        assert_eq!(
            rotate_step(&mut f, "r0", &successor(1), 100, 200),
            Rotation::Rotated { family_ends: ends }
        );
        assert_eq!(f.current, "r1");
        // The spent token again, within grace: the same successor, not a new one.
        assert_eq!(
            rotate_step(&mut f, "r0", &successor(9), 150, 250),
            Rotation::Replay {
                successor: successor(1),
                family_ends: ends
            }
        );
        assert_eq!(f.current, "r1");
        // After the grace period: a reuse, and the family is gone for everyone.
        assert_eq!(
            rotate_step(&mut f, "r0", &successor(9), 200, 300),
            Rotation::Reused
        );
        assert_eq!(
            rotate_step(&mut f, "r1", &successor(2), 201, 301),
            Rotation::Gone
        );
    }

    #[test]
    fn an_older_token_or_an_ended_family_is_never_spent() {
        let mut f = family();
        rotate_step(&mut f, "r0", &successor(1), 100, 100);
        rotate_step(&mut f, "r1", &successor(2), 101, 101);
        // Two generations back is a reuse even within a grace period.
        let mut g = f.clone();
        g.replay_until_ms = i64::MAX;
        assert_eq!(
            rotate_step(&mut g, "r0", &successor(9), 102, 102),
            Rotation::Reused
        );
        assert!(g.revoked);
        assert_eq!(
            rotate_step(&mut f, "r2", &successor(3), 10_000, 10_000),
            Rotation::Gone
        );
    }

    #[test]
    fn a_session_id_carries_its_subjects_tag() {
        let id = new_session_id("alice");
        assert_eq!(id.len(), TAG_LEN + 22);
        assert_eq!(session_tag(&id), Some(subject_tag("alice").as_str()));
        assert_ne!(subject_tag("alice"), subject_tag("bob"));
        assert_eq!(session_tag("abcd"), None);
    }
}
