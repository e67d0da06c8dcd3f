//! Sessions shared by every node: the rules (ids, lifetimes, metadata limits), apart from gRPC
//! and from the store. A token issued with a session's id is valid only while it lives.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::{Clock, from_unix_millis, unix_millis};
use crate::config::Config;
use crate::store::{self, Session, Store};
use crate::tokens::Error;

/// Most metadata entries a session may carry, and most bytes of keys and values together.
pub const MAX_METADATA_ENTRIES: usize = 32;
pub const MAX_METADATA_BYTES: usize = 4096;

pub struct Sessions {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    idle_timeout: Option<Duration>,
}

impl Sessions {
    pub fn new(config: &Config, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Sessions {
        Sessions {
            store,
            clock,
            ttl: config.session_ttl,
            idle_timeout: config.session_idle_timeout,
        }
    }

    /// Now, to the millisecond: what every backend keeps, so an answer reads the same from
    /// whichever node and backend gives it.
    fn now(&self) -> SystemTime {
        from_unix_millis(unix_millis(self.clock.now()))
    }

    pub async fn create(
        &self,
        subject: String,
        ttl: Option<Duration>,
        metadata: BTreeMap<String, String>,
    ) -> Result<Session, Error> {
        let ttl = ttl.unwrap_or(self.ttl);
        if ttl < Duration::from_secs(1) || ttl > self.ttl {
            return Err(Error::invalid(
                "ttl",
                format!(
                    "must be from 1s to the configured session TTL {}",
                    humantime::format_duration(self.ttl)
                ),
            ));
        }
        let bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if metadata.len() > MAX_METADATA_ENTRIES || bytes > MAX_METADATA_BYTES {
            return Err(Error::invalid(
                "metadata",
                format!(
                    "at most {MAX_METADATA_ENTRIES} entries and {MAX_METADATA_BYTES} bytes in all"
                ),
            ));
        }
        let now = self.now();
        let expires_at = now + ttl;
        let session = Session {
            id: store::new_session_id(&subject),
            subject,
            created_at: now,
            expires_at,
            last_seen_at: now,
            idle_expires_at: self.idle_timeout.map(|idle| (now + idle).min(expires_at)),
            metadata,
        };
        self.store.create_session(&session).await?;
        Ok(session)
    }

    pub async fn get(&self, id: &str) -> Result<Session, Error> {
        self.store
            .get_session(id, self.clock.now())
            .await?
            .ok_or_else(|| not_found(id))
    }

    pub async fn touch(&self, id: &str) -> Result<Session, Error> {
        let now = self.now();
        let idle_until = self.idle_timeout.map(|idle| now + idle);
        self.store
            .touch_session(id, now, idle_until)
            .await?
            .ok_or_else(|| not_found(id))
    }

    pub async fn delete(&self, id: &str) -> Result<bool, Error> {
        Ok(self.store.delete_session(id, self.clock.now()).await?)
    }

    pub async fn list(&self, subject: &str) -> Result<Vec<Session>, Error> {
        Ok(self.store.list_sessions(subject, self.clock.now()).await?)
    }
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("session_id: no live session `{id}`"))
}
