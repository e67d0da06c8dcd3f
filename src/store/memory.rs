//! The single-node store: a sharded map, no global lock on the hot path. Expired entries are
//! never returned and are purged by [`MemoryStore::purge_expired`], run from a background task.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::{Store, StoreError};
use crate::clock::Clock;
use crate::ratelimit::{Decision, Gcra, KeyState, gcra};

pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    revoked: DashMap<String, SystemTime>,
    /// Rate-limit state by (policy, key).
    limits: DashMap<(String, String), KeyState>,
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>) -> MemoryStore {
        MemoryStore {
            clock,
            revoked: DashMap::new(),
            limits: DashMap::new(),
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

    async fn is_revoked(&self, token_id: &str) -> Result<bool, StoreError> {
        let now = self.clock.now();
        Ok(self.revoked.get(token_id).is_some_and(|until| *until > now))
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
        let before = self.revoked.len() + self.limits.len();
        self.revoked.retain(|_, until| *until > now);
        let now = now_us(now);
        self.limits.retain(|_, state| state.expires_us() > now);
        Ok(before.saturating_sub(self.revoked.len() + self.limits.len()))
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
        assert!(store.is_revoked("t1").await.unwrap());
        assert!(!store.is_revoked("t2").await.unwrap());

        clock.advance(Duration::from_secs(61));
        assert!(!store.is_revoked("t1").await.unwrap());
        assert_eq!(store.purge_expired().await.unwrap(), 1);
    }
}
