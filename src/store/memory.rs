//! The single-node store: a sharded map, no global lock on the hot path. Expired entries are
//! never returned and are purged by [`MemoryStore::purge_expired`], run from a background task.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::{
    Family, FamilyState, Rotation, Session, Store, StoreError, Successor, TokenCheck, millis,
    rotate_step,
};
use crate::clock::Clock;
use crate::ratelimit::{Decision, Gcra, KeyState, gcra};

pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    revoked: DashMap<String, SystemTime>,
    /// Rate-limit state by (policy, key).
    limits: DashMap<(String, String), KeyState>,
    /// Logout-everywhere cutoffs by subject: (cutoff, until).
    cutoffs: DashMap<String, (SystemTime, SystemTime)>,
    sessions: DashMap<String, Session>,
    families: DashMap<String, FamilyState>,
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>) -> MemoryStore {
        MemoryStore {
            clock,
            revoked: DashMap::new(),
            limits: DashMap::new(),
            cutoffs: DashMap::new(),
            sessions: DashMap::new(),
            families: DashMap::new(),
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn revoke(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError> {
        let now = self.clock.now();
        Ok(match self.revoked.entry(token_id.to_owned()) {
            Entry::Occupied(mut e) => {
                let live = *e.get() > now;
                if *e.get() < until {
                    e.insert(until);
                }
                !live
            }
            Entry::Vacant(e) => {
                e.insert(until);
                true
            }
        })
    }

    async fn is_revoked(&self, t: &TokenCheck<'_>) -> Result<bool, StoreError> {
        let now = t.now;
        let by_id = self
            .revoked
            .get(t.token_id)
            .is_some_and(|until| *until > now);
        let cut_off = self.cutoffs.get(t.subject).is_some_and(|c| {
            let (cutoff, until) = *c;
            until > now && millis(cutoff) > t.issued_at_ms
        });
        let session_gone = t
            .session_id
            .is_some_and(|id| self.sessions.get(id).is_none_or(|s| s.live_until() <= now));
        let family_gone = t.family_id.is_some_and(|id| {
            self.families
                .get(id)
                .is_none_or(|f| f.revoked || f.expires_ms <= millis(now))
        });
        Ok(by_id || cut_off || session_gone || family_gone)
    }

    async fn revoke_subject(
        &self,
        subject: &str,
        cutoff: SystemTime,
        until: SystemTime,
    ) -> Result<u32, StoreError> {
        self.cutoffs
            .entry(subject.to_owned())
            .and_modify(|(c, u)| {
                *c = (*c).max(cutoff);
                *u = (*u).max(until);
            })
            .or_insert((cutoff, until));
        let before = self.sessions.len();
        self.sessions.retain(|_, s| s.subject != subject);
        Ok(before.saturating_sub(self.sessions.len()) as u32)
    }

    async fn create_session(&self, session: &Session) -> Result<(), StoreError> {
        self.sessions.insert(session.id.clone(), session.clone());
        Ok(())
    }

    async fn get_session(&self, id: &str, now: SystemTime) -> Result<Option<Session>, StoreError> {
        Ok(self
            .sessions
            .get(id)
            .filter(|s| s.live_until() > now)
            .map(|s| s.clone()))
    }

    async fn touch_session(
        &self,
        id: &str,
        now: SystemTime,
        idle_until: Option<SystemTime>,
    ) -> Result<Option<Session>, StoreError> {
        let Some(mut s) = self.sessions.get_mut(id).filter(|s| s.live_until() > now) else {
            return Ok(None);
        };
        s.last_seen_at = now;
        if s.idle_expires_at.is_some() {
            s.idle_expires_at = idle_until.map(|t| t.min(s.expires_at));
        }
        Ok(Some(s.clone()))
    }

    async fn delete_session(&self, id: &str, now: SystemTime) -> Result<bool, StoreError> {
        Ok(self
            .sessions
            .remove(id)
            .is_some_and(|(_, s)| s.live_until() > now))
    }

    async fn list_sessions(
        &self,
        subject: &str,
        now: SystemTime,
    ) -> Result<Vec<Session>, StoreError> {
        // A scan: the memory store serves one node, and listing is not on a hot path.
        let mut list: Vec<Session> = self
            .sessions
            .iter()
            .filter(|s| s.subject == subject && s.live_until() > now)
            .map(|s| s.clone())
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(list)
    }

    async fn create_family(&self, family: &Family) -> Result<(), StoreError> {
        self.families
            .insert(family.id.clone(), FamilyState::from(family));
        Ok(())
    }

    async fn rotate(
        &self,
        family_id: &str,
        presented: &str,
        successor: &Successor,
        now: SystemTime,
        replay_until: SystemTime,
    ) -> Result<Rotation, StoreError> {
        // The entry holds its shard's lock: the step is atomic for this family.
        let Some(mut state) = self.families.get_mut(family_id) else {
            return Ok(Rotation::Gone);
        };
        Ok(rotate_step(
            &mut state,
            presented,
            successor,
            millis(now),
            millis(replay_until),
        ))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn rate_limit(
        &self,
        policy: &str,
        key: &str,
        p: Gcra,
        cost: u32,
    ) -> Result<Decision, StoreError> {
        let now = now_us(self.clock.now());
        let id = (policy.to_owned(), key.to_owned());
        // The entry holds its shard's lock: the step is atomic for this key.
        Ok(match self.limits.entry(id) {
            Entry::Occupied(mut e) => {
                let (decision, new) = gcra(*e.get(), now, p, cost as i64);
                if let Some(new) = new {
                    e.insert(new);
                }
                decision
            }
            Entry::Vacant(e) => {
                let (decision, new) = gcra(KeyState::default(), now, p, cost as i64);
                if let Some(new) = new {
                    e.insert(new);
                }
                decision
            }
        })
    }

    async fn reset_rate_limit(&self, policy: &str, key: &str) -> Result<(), StoreError> {
        self.limits.remove(&(policy.to_owned(), key.to_owned()));
        Ok(())
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        // `retain` locks one shard at a time, so callers on other shards are not held up.
        let now = self.clock.now();
        let count = || {
            self.revoked.len()
                + self.limits.len()
                + self.cutoffs.len()
                + self.sessions.len()
                + self.families.len()
        };
        let before = count();
        self.revoked.retain(|_, until| *until > now);
        self.cutoffs.retain(|_, (_, until)| *until > now);
        self.sessions.retain(|_, s| s.live_until() > now);
        self.families.retain(|_, f| f.expires_ms > millis(now));
        let now = now_us(now);
        self.limits.retain(|_, state| state.expires_us() > now);
        Ok(before.saturating_sub(count()))
    }
}

fn now_us(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;

    #[tokio::test]
    async fn revocation_lasts_until_its_instant_and_is_idempotent() {
        let clock = ManualClock::at_unix(1_000_000);
        let store = MemoryStore::new(Arc::new(clock.clone()));
        let until = clock.now() + Duration::from_secs(60);
        assert!(store.revoke("t1", until).await.unwrap());
        assert!(!store.revoke("t1", until).await.unwrap());
        let check = |id, now| TokenCheck {
            token_id: id,
            subject: "s",
            issued_at_ms: 0,
            session_id: None,
            family_id: None,
            now,
        };
        assert!(store.is_revoked(&check("t1", clock.now())).await.unwrap());
        assert!(!store.is_revoked(&check("t2", clock.now())).await.unwrap());

        clock.advance(Duration::from_secs(61));
        assert!(!store.is_revoked(&check("t1", clock.now())).await.unwrap());
        assert_eq!(store.purge_expired().await.unwrap(), 1);
    }
}
