//! The single-node store: a sharded map, no global lock on the hot path. Expired entries are
//! never returned and are purged by [`MemoryStore::purge_expired`], run from a background task.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::{
    Beat, Family, MfaEnrolled, MfaRecord, Registry, Rotation, Session, StepAccept, Store,
    StoreError, Successor, TokenCheck, from_millis, micros, millis,
};
use crate::clock::Clock;
use crate::rules::gcra::{Decision, Gcra, KeyState, gcra};
use crate::rules::mfa::{self as mfa_rules, MfaState};
use crate::rules::rotation::{self, FamilyState};
use crate::rules::session::{self as session_rules, Cutoff};

pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    revoked: DashMap<String, SystemTime>,
    /// Rate-limit state by (policy, key).
    limits: DashMap<(String, String), KeyState>,
    /// Logout-everywhere cutoffs by subject.
    cutoffs: DashMap<String, Cutoff>,
    sessions: DashMap<String, Session>,
    families: DashMap<String, FamilyState>,
    /// The registry of live nodes: this process alone.
    nodes: DashMap<String, Member>,
    /// Moves whenever a node joins, leaves or changes its digest.
    generation: AtomicU64,
    /// Second factors by subject.
    mfa: DashMap<String, MfaState>,
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>) -> MemoryStore {
        MemoryStore {
            clock,
            revoked: DashMap::new(),
            limits: DashMap::new(),
            cutoffs: DashMap::new(),
            sessions: DashMap::new(),
            nodes: DashMap::new(),
            generation: AtomicU64::new(0),
            families: DashMap::new(),
            mfa: DashMap::new(),
        }
    }
}

/// A live node in the registry.
struct Member {
    until: SystemTime,
    nonce: String,
    digest: String,
    document: String,
}

impl MemoryStore {
    /// Drops the nodes that are not live at `now` (a deadline further than `ttl` ahead was
    /// not written by a heartbeat).
    fn drop_dead(&self, now: SystemTime, ttl: Duration) {
        let before = self.nodes.len();
        self.nodes
            .retain(|_, m| m.until > now && m.until <= now + ttl);
        if self.nodes.len() != before {
            self.generation.fetch_add(1, Ordering::Relaxed);
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
        let now_ms = millis(now);
        let cut_off = self.cutoffs.get(t.subject).is_some_and(|c| {
            c.until_ms > now_ms && session_rules::cuts_off(c.cutoff_ms, t.issued_at_ms)
        });
        let session_gone = t
            .session_id
            .is_some_and(|id| self.sessions.get(id).is_none_or(|s| s.live_until() <= now));
        let family_gone = t
            .family_id
            .is_some_and(|id| self.families.get(id).is_none_or(|f| !f.is_live(now_ms)));
        Ok(by_id || cut_off || session_gone || family_gone)
    }

    async fn revoke_subject(
        &self,
        subject: &str,
        cutoff: SystemTime,
        until: SystemTime,
    ) -> Result<u32, StoreError> {
        let new = Cutoff {
            cutoff_ms: millis(cutoff),
            until_ms: millis(until),
        };
        self.cutoffs
            .entry(subject.to_owned())
            .and_modify(|old| *old = session_rules::raise(Some(*old), new))
            .or_insert(new);
        let mut ended = Vec::new();
        self.sessions.retain(|_, s| {
            let gone = s.subject == subject;
            if gone {
                ended.push(s.times());
            }
            !gone
        });
        Ok(session_rules::ended_by_logout(ended, millis(cutoff)))
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
        let Some(mut s) = self.sessions.get_mut(id) else {
            return Ok(None);
        };
        let Some(times) = session_rules::touch(s.times(), millis(now), idle_until.map(millis))
        else {
            return Ok(None);
        };
        s.set_times(times);
        Ok(Some(s.clone()))
    }

    async fn delete_session(&self, id: &str, now: SystemTime) -> Result<bool, StoreError> {
        let removed = self.sessions.remove(id).map(|(_, s)| s.times());
        Ok(session_rules::end(removed, millis(now)))
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
        self.families.insert(
            family.id.clone(),
            FamilyState::new(family.current.clone(), millis(family.expires_at)),
        );
        Ok(())
    }

    async fn rotate(
        &self,
        family_id: &str,
        presented: &str,
        presented_revoked: bool,
        successor: &Successor,
        now: SystemTime,
        replay_until: SystemTime,
    ) -> Result<Rotation, StoreError> {
        // The entry holds its shard's lock: the step is atomic for this family.
        let Some(mut state) = self.families.get_mut(family_id) else {
            return Ok(Rotation::Gone);
        };
        Ok(rotation::step(
            &mut state,
            presented,
            presented_revoked,
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
        at: Option<SystemTime>,
    ) -> Result<Decision, StoreError> {
        let now = micros(at.unwrap_or_else(|| self.clock.now()));
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

    async fn heartbeat(&self, me: Beat<'_>, ttl: Duration) -> Result<Registry, StoreError> {
        let now = self.clock.now();
        self.drop_dead(now, ttl);
        let member = Member {
            until: now + ttl,
            nonce: me.nonce.to_owned(),
            digest: me.digest.to_owned(),
            document: me.document.to_owned(),
        };
        let before = self.nodes.insert(me.id.to_owned(), member);
        if before.as_ref().is_none_or(|b| b.digest != me.digest) {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        let mut digests: BTreeMap<String, usize> = BTreeMap::new();
        let mut ids = Vec::new();
        for m in self.nodes.iter() {
            *digests.entry(m.digest.clone()).or_default() += 1;
            ids.push(m.key().clone());
        }
        ids.sort();
        if ids.len() > Registry::LISTED {
            ids.clear();
        }
        Ok(Registry {
            live: self.nodes.len(),
            digests: digests.into_iter().collect(),
            generation: self.generation.load(Ordering::Relaxed),
            undigested: 0,
            taken: before.is_some_and(|b| b.nonce != me.nonce),
            ids,
        })
    }

    async fn nodes(
        &self,
        ttl: Duration,
        unlike: Option<&str>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let now = self.clock.now();
        if unlike.is_some() {
            self.drop_dead(now, ttl);
        }
        Ok(self
            .nodes
            .iter()
            .filter(|m| m.until > now && m.until <= now + ttl)
            .filter(|m| unlike != Some(m.digest.as_str()))
            .map(|m| (m.key().clone(), m.document.clone()))
            .collect())
    }

    async fn leave(&self, node: &str) -> Result<(), StoreError> {
        if self.nodes.remove(node).is_some() {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn mfa_begin(
        &self,
        subject: &str,
        sealed: &str,
        until: SystemTime,
    ) -> Result<(), StoreError> {
        let mut state = self.mfa.entry(subject.to_owned()).or_default();
        mfa_rules::begin(&mut state, sealed, millis(until));
        Ok(())
    }

    async fn mfa_get(&self, subject: &str, now: SystemTime) -> Result<MfaRecord, StoreError> {
        let Some(state) = self.mfa.get(subject) else {
            return Ok(MfaRecord::default());
        };
        Ok(MfaRecord {
            pending: state
                .pending_at(millis(now))
                .map(|(p, until)| (p.clone(), from_millis(*until))),
            enrolled: state.enrolled.as_ref().map(|e| MfaEnrolled {
                secret: e.secret.clone(),
                enrolled_at: from_millis(e.enrolled_ms),
                last_step: e.last_step,
                backup_codes: e.backup.len() as u32,
            }),
        })
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
        Ok(self.mfa.get_mut(subject).is_some_and(|mut state| {
            mfa_rules::confirm(&mut state, sealed, reseal, step, backup, millis(now))
        }))
    }

    async fn mfa_accept(
        &self,
        subject: &str,
        sealed: &str,
        step: i64,
        reseal: Option<&str>,
    ) -> Result<StepAccept, StoreError> {
        Ok(match self.mfa.get_mut(subject) {
            Some(mut state) => mfa_rules::accept(&mut state, sealed, step, reseal),
            None => StepAccept::NotEnrolled,
        })
    }

    async fn mfa_spend_backup(
        &self,
        subject: &str,
        candidates: &[String],
    ) -> Result<Option<u32>, StoreError> {
        Ok(self
            .mfa
            .get_mut(subject)
            .and_then(|mut state| mfa_rules::spend(&mut state, candidates)))
    }

    async fn mfa_set_backup(&self, subject: &str, backup: &[String]) -> Result<bool, StoreError> {
        Ok(self
            .mfa
            .get_mut(subject)
            .is_some_and(|mut state| mfa_rules::set_backup(&mut state, backup)))
    }

    async fn mfa_disable(&self, subject: &str, now: SystemTime) -> Result<bool, StoreError> {
        Ok(self
            .mfa
            .remove(subject)
            .is_some_and(|(_, mut state)| mfa_rules::disable(&mut state, millis(now))))
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
                + self.mfa.len()
        };
        let before = count();
        self.revoked.retain(|_, until| *until > now);
        let now_ms = millis(now);
        self.cutoffs.retain(|_, c| c.until_ms > now_ms);
        self.sessions.retain(|_, s| s.live_until() > now);
        self.families.retain(|_, f| f.expires_ms > now_ms);
        self.mfa.retain(|_, m| m.is_live(now_ms));
        let now = micros(now);
        self.limits.retain(|_, state| state.expires_us() > now);
        Ok(before.saturating_sub(count()))
    }
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
            accepted_until_ms: i64::MAX,
            fresh: false,
        };
        assert!(store.is_revoked(&check("t1", clock.now())).await.unwrap());
        assert!(!store.is_revoked(&check("t2", clock.now())).await.unwrap());

        clock.advance(Duration::from_secs(61));
        assert!(!store.is_revoked(&check("t1", clock.now())).await.unwrap());
        assert_eq!(store.purge_expired().await.unwrap(), 1);
    }
}
