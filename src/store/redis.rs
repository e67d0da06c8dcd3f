//! Redis and Redis Cluster: one multiplexed, auto-reconnecting connection per node (a
//! ConnectionManager, or the cluster client's own), keys under a prefix, every key with a TTL.
//! A Redis that is down at start does not stop the sidecar: a background task connects with
//! backoff, and calls fail with UNAVAILABLE until it has.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use tokio::sync::OnceCell;

use super::{
    Family, Rotation, Session, Store, StoreError, Successor, TokenCheck, from_millis, millis,
    session_tag, subject_tag,
};
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

/// Sets a subject's sessions index to expire with its longest-lived member.
const EXPIRE_INDEX: &str = r#"
local function expire_index(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', key, last[2]) end
end
"#;

/// A session: a hash that expires when the session stops being live, and its id in the
/// subject's index scored by its absolute end (which a touch never moves), both under the
/// subject's hash tag. ARGV: id, subject, created, expires, last_seen, idle ('' for none),
/// metadata, live_until, now.
const CREATE_SESSION: &str = r#"
redis.call('HSET', KEYS[1], 's', ARGV[2], 'c', ARGV[3], 'e', ARGV[4], 'l', ARGV[5],
  'i', ARGV[6], 'm', ARGV[7])
redis.call('PEXPIREAT', KEYS[1], ARGV[8])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[9])
expire_index(KEYS[2])
return 1
"#;

/// ARGV: now, new idle deadline ('' to keep it). Returns the session's fields, or nil.
const TOUCH_SESSION: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local f = redis.call('HMGET', KEYS[1], 'e', 'i')
local live = tonumber(f[1])
if f[2] ~= '' then
  local idle = tonumber(f[2])
  if ARGV[2] ~= '' then idle = math.min(tonumber(ARGV[2]), live) end
  redis.call('HSET', KEYS[1], 'i', string.format('%d', idle))
  live = math.min(idle, live)
end
redis.call('HSET', KEYS[1], 'l', ARGV[1])
redis.call('PEXPIREAT', KEYS[1], live)
return redis.call('HGETALL', KEYS[1])
"#;

/// A subject's live sessions, pruning ids whose session is gone. The session keys share the
/// index's hash tag (ARGV[2] is their common prefix), so they live on the same node.
const LIST_SESSIONS: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local fields = redis.call('HGETALL', ARGV[2] .. id)
  if #fields == 0 then
    redis.call('ZREM', KEYS[1], id)
  else
    table.insert(out, id)
    table.insert(out, fields)
  end
end
return out
"#;

/// Logout everywhere: raises the subject's cutoff (never lowers it) and deletes its
/// sessions. KEYS: cutoff, index. ARGV: cutoff_ms, until_ms, session key prefix.
const REVOKE_SUBJECT: &str = r#"
local old = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > old then
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
else
  redis.call('PEXPIREAT', KEYS[1], ARGV[2], 'GT')
end
local n = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  n = n + redis.call('DEL', ARGV[3] .. id)
end
redis.call('DEL', KEYS[2])
return n
"#;

/// Spends a refresh token: the same decision as `rotate_step` in src/store/mod.rs. ARGV:
/// presented, successor refresh id, successor access id, successor issued_at_ms, now,
/// replay_until.
const ROTATE: &str = r#"
local f = redis.call('HMGET', KEYS[1], 'cur', 'prev', 'ru', 'sr', 'sa', 'si', 'rv', 'ex')
if not f[1] or f[7] == '1' then return {'gone'} end
if ARGV[1] == f[1] then
  redis.call('HSET', KEYS[1], 'cur', ARGV[2], 'prev', ARGV[1], 'ru', ARGV[6],
    'sr', ARGV[2], 'sa', ARGV[3], 'si', ARGV[4])
  return {'rotated', f[8]}
end
if f[2] and ARGV[1] == f[2] and tonumber(ARGV[5]) < tonumber(f[3]) then
  return {'replay', f[8], f[4], f[5], f[6]}
end
redis.call('HSET', KEYS[1], 'rv', '1')
return {'reused'}
"#;

/// Sets the tiered completeness marker only if the refill's ticket survived. KEYS: filling,
/// complete. ARGV: ticket, ttl_ms.
const MARK_COMPLETE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
redis.call('DEL', KEYS[1])
return 1
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
    scripts: Arc<Scripts>,
}

struct Scripts {
    revoke: Script,
    rate_limit: Script,
    create_session: Script,
    touch_session: Script,
    list_sessions: Script,
    revoke_subject: Script,
    rotate: Script,
    mark_complete: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let with_index = |body: &str| Script::new(&format!("{EXPIRE_INDEX}{body}"));
        Scripts {
            revoke: Script::new(REVOKE),
            rate_limit: Script::new(RATE_LIMIT),
            create_session: with_index(CREATE_SESSION),
            touch_session: Script::new(TOUCH_SESSION),
            list_sessions: Script::new(LIST_SESSIONS),
            revoke_subject: Script::new(REVOKE_SUBJECT),
            rotate: Script::new(ROTATE),
            mark_complete: Script::new(MARK_COMPLETE),
        }
    }
}

/// What Redis knows about a token, in one round trip: `revoked` is positive evidence (an id
/// revocation, a cutoff after its issue); `missing` says its session or family is absent,
/// which means gone unless Redis may be incomplete (tiered); `complete` is the tiered marker.
pub(super) struct Evidence {
    pub revoked: bool,
    pub missing: bool,
    pub complete: bool,
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
            scripts: Arc::new(Scripts::new()),
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

    /// A logout-everywhere cutoff. Under the subject's hash tag, with its sessions.
    fn cutoff_key(&self, subject: &str) -> String {
        format!(
            "{}cutoff:{{{}}}:{subject}",
            self.prefix,
            subject_tag(subject)
        )
    }

    /// The prefix of every session key of the subject whose tag is `tag`.
    fn session_prefix(&self, tag: &str) -> String {
        format!("{}session:{{{tag}}}:", self.prefix)
    }

    /// A session's key, if `id` is a session id this sidecar made.
    fn session_key(&self, id: &str) -> Option<String> {
        session_tag(id).map(|tag| format!("{}{id}", self.session_prefix(tag)))
    }

    /// The index of a subject's session ids.
    fn sessions_key(&self, subject: &str) -> String {
        format!(
            "{}sessions:{{{}}}:{subject}",
            self.prefix,
            subject_tag(subject)
        )
    }

    fn family_key(&self, id: &str) -> String {
        format!("{}family:{id}", self.prefix)
    }

    /// Marks that Redis holds every live record that PostgreSQL holds (tiered storage).
    fn complete_key(&self) -> String {
        format!("{}tier:{{marker}}:complete", self.prefix)
    }

    /// Marks a refill under way; a loss of data during it takes this key too. Same hash tag
    /// as the complete marker, so one script sees both.
    fn filling_key(&self) -> String {
        format!("{}tier:{{marker}}:filling", self.prefix)
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

    /// Everything Redis knows about a token: one round trip. The commands go out together
    /// rather than as one pipeline, because in a cluster their keys live in different slots;
    /// the multiplexed connection sends them without waiting in between.
    pub(super) async fn evidence(
        &self,
        t: &TokenCheck<'_>,
        with_marker: bool,
    ) -> Result<Evidence, StoreError> {
        let mut revoked = redis::cmd("EXISTS");
        revoked.arg(self.revoked_key(t.token_id));
        let mut cutoff = redis::cmd("GET");
        cutoff.arg(self.cutoff_key(t.subject));
        // A session id this sidecar did not make names no session: it is missing.
        let session = t.session_id.map(|id| {
            self.session_key(id).map(|key| {
                let mut cmd = redis::cmd("EXISTS");
                cmd.arg(key);
                cmd
            })
        });
        let family = t.family_id.map(|id| {
            let mut cmd = redis::cmd("HGET");
            cmd.arg(self.family_key(id)).arg("rv");
            cmd
        });
        let marker = with_marker.then(|| {
            let mut cmd = redis::cmd("EXISTS");
            cmd.arg(self.complete_key());
            cmd
        });
        let issued_at_ms = t.issued_at_ms;
        self.call("check", |c| async move {
            let (mut a, mut b, mut d, mut e, mut m) =
                (c.clone(), c.clone(), c.clone(), c.clone(), c);
            let (revoked, cutoff, session, family, marker) = tokio::join!(
                revoked.query_async::<bool>(&mut a),
                cutoff.query_async::<Option<i64>>(&mut b),
                async {
                    match &session {
                        None => Ok(true),
                        Some(None) => Ok(false),
                        Some(Some(cmd)) => cmd.query_async::<bool>(&mut d).await,
                    }
                },
                async {
                    match &family {
                        None => Ok(Some("0".to_owned())),
                        Some(cmd) => cmd.query_async::<Option<String>>(&mut e).await,
                    }
                },
                async {
                    match &marker {
                        None => Ok(false),
                        Some(cmd) => cmd.query_async::<bool>(&mut m).await,
                    }
                },
            );
            let family = family?;
            Ok(Evidence {
                revoked: revoked?
                    || cutoff?.is_some_and(|c| c > issued_at_ms)
                    || family.as_deref() == Some("1"),
                missing: !session? || family.is_none(),
                complete: marker?,
            })
        })
        .await
    }

    /// Writes a session as it is (create, and the tiered mirror of a touch or a refill).
    pub(super) async fn put_session(
        &self,
        session: &Session,
        now: SystemTime,
    ) -> Result<(), StoreError> {
        let key = self
            .session_key(&session.id)
            .ok_or_else(|| unavailable("not a session id of this sidecar"))?;
        let index = self.sessions_key(&session.subject);
        let metadata = serde_json::to_string(&session.metadata).expect("a map serializes");
        let idle = session
            .idle_expires_at
            .map(|t| millis(t).to_string())
            .unwrap_or_default();
        let script = self.scripts.create_session.clone();
        let s = session.clone();
        self.call("create_session", |mut c| async move {
            script
                .key(key)
                .key(index)
                .arg(&s.id)
                .arg(&s.subject)
                .arg(millis(s.created_at))
                .arg(millis(s.expires_at))
                .arg(millis(s.last_seen_at))
                .arg(idle)
                .arg(metadata)
                .arg(millis(s.live_until()))
                .arg(millis(now))
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .map(drop)
    }

    /// Writes a family's rotation state as PostgreSQL holds it (tiered).
    pub(super) async fn put_family(
        &self,
        family: &Family,
        revoked: bool,
    ) -> Result<(), StoreError> {
        let key = self.family_key(&family.id);
        let f = family.clone();
        self.call("create_family", |mut c| async move {
            redis::pipe()
                .atomic()
                .cmd("HSET")
                .arg(&key)
                .arg("sub")
                .arg(&f.subject)
                .arg("cur")
                .arg(&f.current)
                .arg("rv")
                .arg(if revoked { "1" } else { "0" })
                .arg("ex")
                .arg(millis(f.expires_at))
                .ignore()
                .cmd("PEXPIREAT")
                .arg(&key)
                .arg(millis(f.expires_at))
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Records a cutoff without touching sessions (tiered refill).
    pub(super) async fn put_cutoff(
        &self,
        subject: &str,
        cutoff: SystemTime,
        until: SystemTime,
    ) -> Result<(), StoreError> {
        let key = self.cutoff_key(subject);
        self.call("set", |mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(millis(cutoff))
                .arg("PXAT")
                .arg(millis(until))
                .query_async::<()>(&mut c)
                .await
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

    /// Notes that a refill starts; returns its ticket for [`RedisStore::mark_complete`].
    pub(super) async fn begin_refill(&self, ttl: Duration) -> Result<String, StoreError> {
        let key = self.filling_key();
        let ticket = crate::tokens::random_id();
        let value = ticket.clone();
        self.call("set", |mut c| async move {
            redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async::<()>(&mut c)
                .await
        })
        .await?;
        Ok(ticket)
    }

    /// Marks Redis complete for `ttl`, unless Redis lost data since the refill of `ticket`
    /// began (its ticket is gone then): returns whether it did.
    pub(super) async fn mark_complete(
        &self,
        ticket: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (filling, complete) = (self.filling_key(), self.complete_key());
        let script = self.scripts.mark_complete.clone();
        let ticket = ticket.to_owned();
        self.call("mark_complete", |mut c| async move {
            script
                .key(filling)
                .key(complete)
                .arg(ticket)
                .arg(ttl.as_millis() as u64)
                .invoke_async::<bool>(&mut c)
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
        let script = self.scripts.revoke.clone();
        self.call("revoke", |mut c| async move {
            script.key(key).arg(at).invoke_async::<i64>(&mut c).await
        })
        .await
        .map(|n| n == 1)
    }

    async fn is_revoked(&self, t: &TokenCheck<'_>) -> Result<bool, StoreError> {
        let e = self.evidence(t, false).await?;
        Ok(e.revoked || e.missing)
    }

    async fn revoke_subject(
        &self,
        subject: &str,
        cutoff: SystemTime,
        until: SystemTime,
    ) -> Result<u32, StoreError> {
        let (key, index) = (self.cutoff_key(subject), self.sessions_key(subject));
        let prefix = self.session_prefix(&subject_tag(subject));
        let script = self.scripts.revoke_subject.clone();
        self.call("revoke_subject", |mut c| async move {
            script
                .key(key)
                .key(index)
                .arg(millis(cutoff))
                .arg(millis(until))
                .arg(prefix)
                .invoke_async::<u32>(&mut c)
                .await
        })
        .await
    }

    async fn create_session(&self, session: &Session) -> Result<(), StoreError> {
        self.put_session(session, session.created_at).await
    }

    async fn get_session(&self, id: &str, now: SystemTime) -> Result<Option<Session>, StoreError> {
        let Some(key) = self.session_key(id) else {
            return Ok(None);
        };
        let fields: HashMap<String, String> = self
            .call("get_session", |mut c| async move {
                redis::cmd("HGETALL").arg(key).query_async(&mut c).await
            })
            .await?;
        Ok(session_from(id, fields).filter(|s| s.live_until() > now))
    }

    async fn touch_session(
        &self,
        id: &str,
        now: SystemTime,
        idle_until: Option<SystemTime>,
    ) -> Result<Option<Session>, StoreError> {
        let Some(key) = self.session_key(id) else {
            return Ok(None);
        };
        let script = self.scripts.touch_session.clone();
        let idle = idle_until
            .map(|t| millis(t).to_string())
            .unwrap_or_default();
        let fields: Option<HashMap<String, String>> = self
            .call("touch_session", |mut c| async move {
                script
                    .key(key)
                    .arg(millis(now))
                    .arg(idle)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(fields.and_then(|f| session_from(id, f)))
    }

    async fn delete_session(&self, id: &str, _now: SystemTime) -> Result<bool, StoreError> {
        // The index entry goes when the subject's sessions are next listed.
        let Some(key) = self.session_key(id) else {
            return Ok(false);
        };
        self.call("del", |mut c| async move {
            redis::cmd("DEL").arg(key).query_async::<bool>(&mut c).await
        })
        .await
    }

    async fn list_sessions(
        &self,
        subject: &str,
        now: SystemTime,
    ) -> Result<Vec<Session>, StoreError> {
        let index = self.sessions_key(subject);
        let prefix = self.session_prefix(&subject_tag(subject));
        let script = self.scripts.list_sessions.clone();
        let items: Vec<(String, HashMap<String, String>)> = self
            .call("list_sessions", |mut c| async move {
                let flat: Vec<redis::Value> = script
                    .key(index)
                    .arg(millis(now))
                    .arg(prefix)
                    .invoke_async(&mut c)
                    .await?;
                flat.chunks(2)
                    .map(|pair| {
                        Ok((
                            redis::from_redis_value_ref(&pair[0])?,
                            redis::from_redis_value_ref(&pair[1])?,
                        ))
                    })
                    .collect()
            })
            .await?;
        let mut list: Vec<Session> = items
            .into_iter()
            .filter_map(|(id, fields)| session_from(&id, fields))
            .filter(|s| s.live_until() > now)
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(list)
    }

    async fn create_family(&self, family: &Family) -> Result<(), StoreError> {
        self.put_family(family, false).await
    }

    async fn rotate(
        &self,
        family_id: &str,
        presented: &str,
        successor: &Successor,
        now: SystemTime,
        replay_until: SystemTime,
    ) -> Result<Rotation, StoreError> {
        let key = self.family_key(family_id);
        let script = self.scripts.rotate.clone();
        let (presented, s) = (presented.to_owned(), successor.clone());
        let answer: Vec<String> = self
            .call("rotate", |mut c| async move {
                script
                    .key(key)
                    .arg(presented)
                    .arg(&s.refresh_id)
                    .arg(&s.access_id)
                    .arg(s.issued_at_ms)
                    .arg(millis(now))
                    .arg(millis(replay_until))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let ends = |i: usize| from_millis(answer[i].parse().unwrap_or(0));
        Ok(match answer.first().map(String::as_str) {
            Some("rotated") if answer.len() == 2 => Rotation::Rotated {
                family_ends: ends(1),
            },
            Some("replay") if answer.len() == 5 => Rotation::Replay {
                successor: Successor {
                    refresh_id: answer[2].clone(),
                    access_id: answer[3].clone(),
                    issued_at_ms: answer[4].parse().unwrap_or(0),
                },
                family_ends: ends(1),
            },
            Some("reused") => Rotation::Reused,
            _ => Rotation::Gone,
        })
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
        let script = self.scripts.rate_limit.clone();
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

/// A session from its hash's fields; `None` for an absent or damaged one.
fn session_from(id: &str, f: HashMap<String, String>) -> Option<Session> {
    let time = |name: &str| f.get(name)?.parse::<i64>().ok().map(from_millis);
    Some(Session {
        id: id.to_owned(),
        subject: f.get("s")?.clone(),
        created_at: time("c")?,
        expires_at: time("e")?,
        last_seen_at: time("l")?,
        idle_expires_at: time("i"),
        metadata: serde_json::from_str(f.get("m")?).ok()?,
    })
}

fn unavailable(detail: impl Into<String>) -> StoreError {
    StoreError {
        backend: BACKEND,
        detail: detail.into(),
    }
}
