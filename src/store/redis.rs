//! Redis and Redis Cluster: one multiplexed, auto-reconnecting connection per node (a
//! ConnectionManager, or the cluster client's own), keys under a prefix, every key with a TTL.
//! A Redis that is down at start does not stop the sidecar: a background task connects with
//! backoff, and calls fail with UNAVAILABLE until it has.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use tokio::sync::OnceCell;

use super::{Store, StoreError};
use crate::config::Config;
use crate::ratelimit::{Decision, Gcra};

const BACKEND: &str = "redis";

/// Records a revocation until an absolute instant, extending an existing record's lifetime
/// but never shortening it. Returns 1 when the token was not revoked before.
const REVOKE: &str = r#"
if redis.call('SET', KEYS[1], '1', 'NX', 'PXAT', ARGV[1]) then
  return 1
end
redis.call('PEXPIREAT', KEYS[1], ARGV[1], 'GT')
return 0
"#;

/// One GCRA step on the server's clock (`TIME`), the same arithmetic as `gcra` in
/// src/ratelimit.rs. One hash per (policy, key) holds `tat` and `lock` (microseconds), so a
/// step touches one key and works on Redis Cluster. ARGV: interval_us, burst, lockout_us,
/// cost. Returns {allowed, remaining, retry_after_us, reset_after_us}.
const RATE_LIMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local lockout, cost = tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tat', 'lock')
local tat = tonumber(state[1]) or 0
local lock = tonumber(state[2]) or 0
local capacity = burst * interval
local function remaining(at)
  return math.max(0, math.min(burst, math.floor((now + capacity - at) / interval)))
end
local function expire_at(us)
  redis.call('PEXPIREAT', KEYS[1], math.ceil(us / 1000) + 1)
end
if lock > now then
  return {0, 0, lock - now, math.max(tat, lock) - now}
end
if tat < now then tat = now end
local new_tat = tat + math.max(cost, 1) * interval
local allow_at = new_tat - capacity
if now < allow_at then
  if lockout > 0 and cost > 0 then
    local until_us = now + lockout
    redis.call('HSET', KEYS[1], 'lock', string.format('%d', until_us))
    expire_at(math.max(tat, until_us))
    return {0, remaining(tat), lockout, math.max(tat, until_us) - now}
  end
  return {0, remaining(tat), allow_at - now, tat - now}
end
if cost == 0 then
  return {1, remaining(tat), 0, tat - now}
end
redis.call('HSET', KEYS[1], 'tat', string.format('%d', new_tat), 'lock', '0')
expire_at(new_tat)
return {1, remaining(new_tat), 0, new_tat - now}
"#;

/// A connection to one Redis or to a cluster; cloning shares it.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Clone)]
pub struct RedisStore {
    conn: Arc<OnceCell<Connection>>,
    prefix: String,
    timeout: Duration,
    revoke: Arc<Script>,
    rate_limit: Arc<Script>,
}

impl RedisStore {
    /// Starts connecting in the background; returns at once.
    pub fn open(config: &Config) -> Result<RedisStore, StoreError> {
        let url = config
            .redis_url
            .as_ref()
            .map(|u| u.expose_str().to_owned())
            .ok_or_else(|| unavailable("no REDIS_URL"))?;
        let timeout = config.backend_timeout;
        let connect = Connector {
            urls: url.split(',').map(|u| u.trim().to_owned()).collect(),
            cluster: config.redis_cluster,
            timeout,
        };
        // Parse now, so that a malformed URL is reported at start rather than retried forever.
        connect.validate()?;
        let store = RedisStore {
            conn: Arc::new(OnceCell::new()),
            prefix: config.redis_prefix.clone(),
            timeout,
            revoke: Arc::new(Script::new(REVOKE)),
            rate_limit: Arc::new(Script::new(RATE_LIMIT)),
        };
        let cell = store.conn.clone();
        let connect = Arc::new(connect);
        super::retry_in_background(
            BACKEND,
            "connect",
            move || {
                let connect = connect.clone();
                async move { connect.connect().await }
            },
            move |conn| {
                let _ = cell.set(conn);
            },
        );
        Ok(store)
    }

    /// The key of a revoked token id. Every key name is made here.
    fn revoked_key(&self, token_id: &str) -> String {
        format!("{}revoked:{token_id}", self.prefix)
    }

    /// The key of one (policy, key) rate-limit state. The two parts are length-prefixed, so
    /// no policy and key pair can name another's state.
    fn rate_key(&self, policy: &str, key: &str) -> String {
        format!("{}rl:{}:{policy}:{key}", self.prefix, policy.len())
    }

    /// Marks that Redis holds every live revocation that PostgreSQL holds (tiered storage).
    fn complete_key(&self) -> String {
        format!("{}tier:complete", self.prefix)
    }

    /// Runs one call against the connection, bounded by the backend timeout.
    async fn call<T, F>(
        &self,
        op: &'static str,
        f: impl FnOnce(Connection) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self
            .conn
            .get()
            .cloned()
            .ok_or_else(|| unavailable("not connected yet"))?;
        super::bounded(BACKEND, op, self.timeout, f(conn)).await
    }

    /// Whether `token_id` is revoked, and whether Redis is known to hold every revocation:
    /// one round trip.
    pub(super) async fn revoked_and_complete(
        &self,
        token_id: &str,
    ) -> Result<(bool, bool), StoreError> {
        let key = self.revoked_key(token_id);
        let complete = self.complete_key();
        self.call("exists", |mut c| async move {
            // Two commands rather than one pipeline: in a cluster the keys live in different
            // slots. The connection sends both without waiting in between.
            let mut other = c.clone();
            let mut revoked = redis::cmd("EXISTS");
            revoked.arg(&key);
            let mut marker = redis::cmd("EXISTS");
            marker.arg(&complete);
            let (a, b) = tokio::join!(
                revoked.query_async::<bool>(&mut c),
                marker.query_async::<bool>(&mut other),
            );
            Ok((a?, b?))
        })
        .await
    }

    /// Stores many revocations, a chunk of calls in flight at a time (tiered refill).
    pub(super) async fn revoke_all(
        &self,
        records: &[(String, SystemTime)],
    ) -> Result<(), StoreError> {
        for chunk in records.chunks(64) {
            let mut calls = Vec::with_capacity(chunk.len());
            for (token_id, until) in chunk {
                calls.push(self.revoke(token_id, *until));
            }
            for result in futures_util::future::join_all(calls).await {
                result?;
            }
        }
        Ok(())
    }

    /// Marks Redis complete for `ttl`.
    pub(super) async fn mark_complete(&self, ttl: Duration) -> Result<(), StoreError> {
        let key = self.complete_key();
        self.call("set", |mut c| async move {
            redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }
}

#[async_trait]
impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn revoke(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError> {
        let key = self.revoked_key(token_id);
        let at = unix_millis(until);
        let script = self.revoke.clone();
        self.call("revoke", |mut c| async move {
            script.key(key).arg(at).invoke_async::<i64>(&mut c).await
        })
        .await
        .map(|n| n == 1)
    }

    async fn is_revoked(&self, token_id: &str) -> Result<bool, StoreError> {
        let key = self.revoked_key(token_id);
        self.call("exists", |mut c| async move {
            redis::cmd("EXISTS")
                .arg(key)
                .query_async::<bool>(&mut c)
                .await
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call("ping", |mut c| async move {
            redis::cmd("PING").query_async::<()>(&mut c).await
        })
        .await
    }

    async fn rate_limit(
        &self,
        policy: &str,
        key: &str,
        p: Gcra,
        cost: u32,
    ) -> Result<Decision, StoreError> {
        let redis_key = self.rate_key(policy, key);
        let script = self.rate_limit.clone();
        let (allowed, remaining, retry_us, reset_us): (i64, i64, i64, i64) = self
            .call("rate_limit", |mut c| async move {
                script
                    .key(redis_key)
                    .arg(p.interval_us)
                    .arg(p.burst)
                    .arg(p.lockout_us)
                    .arg(cost)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(Decision::from_micros(
            allowed == 1,
            p,
            remaining,
            retry_us,
            reset_us,
        ))
    }

    async fn reset_rate_limit(&self, policy: &str, key: &str) -> Result<(), StoreError> {
        let redis_key = self.rate_key(policy, key);
        self.call("del", |mut c| async move {
            redis::cmd("DEL")
                .arg(redis_key)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        Ok(0) // every key carries its own TTL
    }
}

struct Connector {
    urls: Vec<String>,
    cluster: bool,
    timeout: Duration,
}

impl Connector {
    fn validate(&self) -> Result<(), StoreError> {
        for url in &self.urls {
            redis::Client::open(url.as_str())
                .map_err(|e| unavailable(format!("invalid REDIS_URL: {:?}", e.kind())))?;
        }
        if !self.cluster && self.urls.len() != 1 {
            return Err(unavailable("several REDIS_URLs need --redis-cluster"));
        }
        Ok(())
    }

    async fn connect(&self) -> redis::RedisResult<Connection> {
        if self.cluster {
            let client = ClusterClientBuilder::new(self.urls.clone())
                .connection_timeout(self.timeout)
                .response_timeout(self.timeout)
                .build()?;
            Ok(Connection::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(self.urls[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(Some(self.timeout))
                .set_max_delay(super::MAX_BACKOFF);
            Ok(Connection::Single(
                ConnectionManager::new_with_config(client, config).await?,
            ))
        }
    }
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn unavailable(detail: impl Into<String>) -> StoreError {
    StoreError {
        backend: BACKEND,
        detail: detail.into(),
    }
}
