//! Redis and Redis Cluster: one multiplexed, auto-reconnecting connection per node (a
//! ConnectionManager, or the cluster client's own), keys under a prefix, every key with a TTL.
//! A Redis that is down at start does not stop the sidecar: a background task connects with
//! backoff, and calls fail with UNAVAILABLE until it has.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, ClientTlsConfig, Cmd, Pipeline, RedisFuture, Script, TlsCertificates,
    Value,
};
use tokio::sync::OnceCell;

use super::batch::Batcher;
use super::cache::{Denial, Entry, Fact, Lookup, View};
use super::{
    Beat, Facts, Family, MfaEnrolled, MfaRecord, Registry, Rotation, Session, StepAccept, Store,
    StoreError, Successor, TokenCheck, from_millis, micros, millis, session_tag, subject_tag,
};
use crate::rules::gcra::{Decision, Gcra};
use crate::secret::Secret;

const BACKEND: &str = "redis";

/// Where `RedisStore::evidence` keeps the complete marker among the facts it reads: last, so
/// that it is read after the records it vouches for.
const MARKER: usize = 4;

/// Prepended to the scripts that work on sessions and cutoffs.
const SESSION_LIB: &str = include_str!("session_lib.lua");
const REGISTRY_LIB: &str = include_str!("registry_lib.lua");
const GCRA_LIB: &str = include_str!("gcra_lib.lua");

/// Batches that may be in flight at once on the one multiplexed connection, each sent without
/// waiting for the others. Fewer lanes gather more steps per batch and spare Redis more, more
/// lanes keep more of the connection's pipelining: on a 2-core machine with 32 callers on one
/// node, one lane gathered 13 steps a batch and cut Redis's CPU per step by a third but the
/// node's throughput by a tenth; four gathered 4, kept the throughput, and spared Redis less
/// (README, "Batching", has the figures at 512 callers).
const RATE_LANES: usize = 4;

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

/// The settings of a Redis store, built by `config`.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// One URL, or with `cluster` comma-separated seed nodes.
    pub url: Secret,
    /// A replica that carries the revocation view's feed; `None`: the primary does.
    pub feed_url: Option<Secret>,
    pub cluster: bool,
    /// Prefix of every key.
    pub prefix: String,
    /// Longest a call may take.
    pub timeout: Duration,
    /// Memory for the revocation view; 0 for none.
    pub cache: u64,
    /// Most calls of one kind gathered into one round trip while another is in flight (see
    /// `store::batch`); 0 or 1: each call goes alone.
    pub batch: usize,
    pub tls: RedisTls,
}

/// What a rediss:// connection trusts and presents, read from the files at start.
#[derive(Debug, Clone, Default)]
pub struct RedisTls {
    /// PEM certificates of the authorities to trust; `None`: the public roots.
    pub ca: Option<Vec<u8>>,
    /// PEM certificate chain and private key to present.
    pub client: Option<(Vec<u8>, Secret)>,
}

#[derive(Clone)]
pub struct RedisStore {
    conn: Arc<OnceCell<Connection>>,
    /// Why `conn` is not set yet.
    pending: super::Pending,
    prefix: String,
    timeout: Duration,
    scripts: Arc<Scripts>,
    /// The revocation view, kept by a tracking connection (none on a cluster, or when off).
    view: Option<View>,
    cluster: bool,
    /// Gathers rate-limit steps (`store::batch`); `None`: each goes alone.
    rate_steps: Option<Batcher<RateStep, RateAnswer>>,
}

/// One rate-limit step as a batch carries it.
struct RateStep {
    key: String,
    gcra: Gcra,
    cost: u32,
    /// Microseconds since the epoch; `None`: Redis's clock.
    at: Option<i64>,
}

/// allowed, remaining, retry_after_us and reset_after_us, as the scripts answer.
type RateAnswer = (i64, i64, i64, i64);

impl RateStep {
    /// Its key and its five arguments, as rate_limit.lua takes them.
    fn push(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        invocation
            .key(&self.key)
            .arg(self.gcra.interval_us)
            .arg(self.gcra.burst)
            .arg(self.gcra.lockout_us)
            .arg(self.cost)
            .arg(self.at.map(|t| t.to_string()).unwrap_or_default());
    }
}

struct Scripts {
    revoke: Script,
    rate_limit: Script,
    rate_limit_many: Script,
    put_session: Script,
    touch_session: Script,
    end_session: Script,
    list_sessions: Script,
    logout: Script,
    put_cutoff: Script,
    put_family: Script,
    rotate: Script,
    mark_complete: Script,
    heartbeat: Script,
    read_registry: Script,
    leave: Script,
    mfa: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let with_lib = |body: &str| Script::new(&format!("{SESSION_LIB}{body}"));
        let registry = |body: &str| Script::new(&format!("{REGISTRY_LIB}{body}"));
        let gcra = |body: &str| Script::new(&format!("{GCRA_LIB}{body}"));
        Scripts {
            revoke: Script::new(include_str!("revoke.lua")),
            rate_limit: gcra(include_str!("rate_limit.lua")),
            rate_limit_many: gcra(include_str!("rate_limit_many.lua")),
            put_session: with_lib(include_str!("session_put.lua")),
            touch_session: with_lib(include_str!("session_touch.lua")),
            end_session: with_lib(include_str!("session_end.lua")),
            list_sessions: Script::new(include_str!("list_sessions.lua")),
            logout: with_lib(include_str!("logout.lua")),
            put_cutoff: with_lib(include_str!("cutoff_put.lua")),
            put_family: Script::new(include_str!("family_put.lua")),
            rotate: Script::new(include_str!("rotate.lua")),
            mark_complete: Script::new(include_str!("mark_complete.lua")),
            heartbeat: registry(include_str!("heartbeat.lua")),
            read_registry: registry(include_str!("registry_read.lua")),
            leave: registry(include_str!("registry_leave.lua")),
            mfa: Script::new(include_str!("mfa.lua")),
        }
    }
}

/// How one fact of a token is read, and what its reply means as a [`Fact`] (see [`Facts`]).
#[derive(Clone, Copy)]
enum Read {
    /// `GET` of a number (a cutoff).
    Number,
    /// `HMGET rv ex` of a family: -1 when revoked, else its end.
    Family,
    /// `PTTL`, as an instant on the caller's clock: until when the key lives (a session, the
    /// tiered marker); `None` when absent, `i64::MAX` for no end. Unlike `EXISTS`, the answer
    /// can be kept: a kept deadline still ends on time though Redis may delete the expired
    /// key later. (`PTTL` rather than `PEXPIRETIME`, which needs Redis 7.)
    Deadline,
}

impl Read {
    fn command(self, key: &str) -> Cmd {
        let mut cmd = redis::cmd(match self {
            Read::Number => "GET",
            Read::Family => "HMGET",
            Read::Deadline => "PTTL",
        });
        cmd.arg(key);
        if let Read::Family = self {
            cmd.arg("rv").arg("ex");
        }
        cmd
    }

    fn fact(self, value: &Value, now_ms: i64) -> Result<Fact, redis::ParsingError> {
        Ok(match self {
            Read::Number => redis::from_redis_value_ref(value)?,
            Read::Family => match redis::from_redis_value_ref(value)? {
                (Some(1), _) => Some(-1),
                (_, ends) => ends,
            },
            Read::Deadline => match redis::from_redis_value_ref::<i64>(value)? {
                -2 => None,
                -1 => Some(i64::MAX),
                left => Some(now_ms.saturating_add(left)),
            },
        })
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
    pub fn open(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        let timeout = config.timeout;
        let connect = Connector {
            urls: config
                .url
                .expose_str()
                .split(',')
                .map(|u| u.trim().to_owned())
                .collect(),
            cluster: config.cluster,
            timeout,
            tls: config.tls.clone(),
        };
        // Parse now, so that a malformed URL is reported at start rather than retried forever.
        connect.validate()?;
        let mut store = RedisStore {
            conn: Arc::new(OnceCell::new()),
            pending: super::Pending::default(),
            prefix: config.prefix.clone(),
            timeout,
            scripts: Arc::new(Scripts::new()),
            view: None,
            cluster: config.cluster,
            rate_steps: (config.batch > 1)
                .then(|| Batcher::new(BACKEND, "rate_limit", config.batch, RATE_LANES)),
        };
        if config.cache > 0 && config.cluster {
            let view = View::new(BACKEND, config.cache);
            let seeds = connect
                .urls
                .iter()
                .map(|url| connect.client(url))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| unavailable(format!("invalid REDIS_URL: {:?}", e.kind())))?;
            super::feed::spawn_redis_cluster(
                seeds,
                store.tracked_prefixes(),
                timeout,
                view.clone(),
            );
            store.view = Some(view);
        } else if config.cache > 0 {
            let view = View::new(BACKEND, config.cache);
            let primary = connect
                .client(&connect.urls[0])
                .map_err(|e| unavailable(format!("invalid REDIS_URL: {:?}", e.kind())))?;
            let feed = match &config.feed_url {
                Some(url) => super::feed::RedisFeed {
                    source: connect.client(url.expose_str()).map_err(|e| {
                        unavailable(format!("invalid REDIS_FEED_URL: {:?}", e.kind()))
                    })?,
                    probes: Some((
                        primary,
                        format!("{}feedprobe:{}:", store.prefix, crate::ids::random_id()),
                    )),
                },
                None => super::feed::RedisFeed {
                    source: primary,
                    probes: None,
                },
            };
            super::feed::spawn_redis(feed, store.tracked_prefixes(), timeout, view.clone());
            store.view = Some(view);
        }
        let cell = store.conn.clone();
        let connect = Arc::new(connect);
        super::retry_in_background(
            BACKEND,
            "connect",
            store.pending.clone(),
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

    /// The key prefixes whose changes the revocation view hears of: the facts a Validate reads
    /// and the rate-limit reset markers. Not the rate-limit states, which change at every
    /// counted call.
    fn tracked_prefixes(&self) -> Vec<String> {
        [
            "revoked:", "cutoff:", "session:", "family:", "tier:", "rlreset:",
        ]
        .iter()
        .map(|p| format!("{}{p}", self.prefix))
        .collect()
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

    /// Written at every reset of a rate-limit state, so that the nodes holding a denial of
    /// it hear of the reset; the revocation view keeps denials under this name.
    fn reset_key(&self, policy: &str, key: &str) -> String {
        format!("{}rlreset:{}:{policy}:{key}", self.prefix, policy.len())
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

    /// The tombstone an ended session leaves, under the same hash tag as the session.
    fn tombstone_prefix(&self, tag: &str) -> String {
        format!("{}ended:{{{tag}}}:", self.prefix)
    }

    fn tombstone_key(&self, id: &str) -> Option<String> {
        session_tag(id).map(|tag| format!("{}{id}", self.tombstone_prefix(tag)))
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

    /// The registry of live nodes (see `registry_lib.lua`): the hash older versions read, and
    /// beside it the parts keyed by its name as a hash tag, so that one script reads and
    /// writes all of them on a cluster too.
    fn registry_keys(&self) -> [String; 5] {
        let nodes = format!("{}nodes", self.prefix);
        let part = |name: &str| format!("{{{nodes}}}:{name}");
        let (live, marks, digests, generation) = (
            part("live"),
            part("marks"),
            part("digests"),
            part("generation"),
        );
        [nodes, live, marks, digests, generation]
    }

    /// A subject's second factor: one hash, under the subject's hash tag.
    fn mfa_key(&self, subject: &str) -> String {
        format!("{}mfa:{{{}}}:{subject}", self.prefix, subject_tag(subject))
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
            .ok_or_else(|| unavailable(self.pending.refusal("not connected")))?;
        super::bounded(BACKEND, op, self.timeout, f(conn)).await
    }

    /// Runs a script that writes `key`, then drops this node's view of the key, so that a
    /// Validate on this node after the write returns sees the write without waiting for the
    /// feed to bring its invalidation. (A read under way keeps out: its placeholder goes too.)
    async fn invoke_writing<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        key: &str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let result = self.invoke(op, invocation).await;
        self.forget(key);
        result
    }

    fn forget(&self, key: &str) {
        if let Some(view) = &self.view {
            view.forget(key);
        }
    }

    /// The steps of a batch, in the order given, in one script call; on a cluster one call per
    /// hash slot, side by side (a script's keys must share a slot), each slot's steps still
    /// in the order given. A call that fails fails each of its steps.
    async fn rate_limit_many(&self, steps: Vec<RateStep>) -> Vec<Result<RateAnswer, StoreError>> {
        let slots: Vec<Vec<usize>> = if self.cluster {
            let mut by_slot: HashMap<redis::cluster_routing::Slot, Vec<usize>> = HashMap::new();
            for (i, step) in steps.iter().enumerate() {
                by_slot
                    .entry(redis::cluster_routing::Slot::for_key(&step.key))
                    .or_default()
                    .push(i);
            }
            by_slot.into_values().collect()
        } else {
            vec![(0..steps.len()).collect()]
        };
        let calls = slots.into_iter().map(|group| {
            // A step alone takes the single step's script, which costs Redis less.
            let script = match group.len() {
                1 => &self.scripts.rate_limit,
                _ => &self.scripts.rate_limit_many,
            };
            let mut invocation = script.prepare_invoke();
            for &i in &group {
                steps[i].push(&mut invocation);
            }
            async move {
                let answer: Result<Vec<i64>, _> = self.invoke("rate_limit", invocation).await;
                (group, answer)
            }
        });
        let mut answers: Vec<Result<RateAnswer, StoreError>> = (0..steps.len())
            .map(|_| Err(unavailable("rate_limit: no answer for this step")))
            .collect();
        for (group, answer) in futures_util::future::join_all(calls).await {
            match answer {
                Ok(values) if values.len() == 4 * group.len() => {
                    for (i, v) in group.into_iter().zip(values.chunks_exact(4)) {
                        answers[i] = if v[0] == -1 {
                            Err(unavailable("rate_limit: a step's key holds another type"))
                        } else {
                            Ok((v[0], v[1], v[2], v[3]))
                        };
                    }
                }
                Ok(values) => {
                    let e = unavailable(format!(
                        "rate_limit: {} numbers for {} steps",
                        values.len(),
                        group.len()
                    ));
                    group.into_iter().for_each(|i| answers[i] = Err(e.clone()));
                }
                Err(e) => group.into_iter().for_each(|i| answers[i] = Err(e.clone())),
            }
        }
        answers
    }

    /// Runs one script invocation, bounded by the backend timeout.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.call(
            op,
            |mut c| async move { invocation.invoke_async(&mut c).await },
        )
        .await
    }

    /// Everything Redis knows about a token: from the revocation view where it holds the
    /// facts, otherwise in one round trip. The commands go out together rather than as one
    /// pipeline, because in a cluster their keys live in different slots; the multiplexed
    /// connection sends them without waiting in between.
    pub(super) async fn evidence(
        &self,
        t: &TokenCheck<'_>,
        with_marker: bool,
    ) -> Result<Evidence, StoreError> {
        let session_key = t.session_id.and_then(|id| self.session_key(id));
        let wanted = [
            Some((self.revoked_key(t.token_id), Read::Deadline)),
            Some((self.cutoff_key(t.subject), Read::Number)),
            session_key.map(|k| (k, Read::Deadline)),
            t.family_id.map(|id| (self.family_key(id), Read::Family)),
            with_marker.then(|| (self.complete_key(), Read::Deadline)),
        ];
        let mut facts: [Fact; 5] = [None; 5];
        // A session id this sidecar did not make is read as absent.
        let now_ms = millis(t.now);
        let mut reads = Vec::new();
        for (i, (key, read)) in wanted
            .into_iter()
            .enumerate()
            .filter_map(|(i, w)| Some((i, w?)))
        {
            match self
                .view
                .as_ref()
                .filter(|_| !t.fresh)
                .map(|v| v.lookup(&key, now_ms))
            {
                Some(Lookup::Hit(entry)) => facts[i] = entry.fact,
                Some(Lookup::Miss(ticket)) => reads.push((i, key, read, Some(ticket))),
                Some(Lookup::Bypass) | None => reads.push((i, key, read, None)),
            }
        }
        // The marker vouches for the records it is read with, so it is never older than they
        // are: when a record goes to Redis, the marker is read there too, after it (a FLUSHALL
        // between the two then shows as a missing marker), even if the view holds one.
        if with_marker
            && reads.first().is_some_and(|(i, ..)| *i < MARKER)
            && reads.last().is_none_or(|(i, ..)| *i != MARKER)
        {
            facts[MARKER] = None;
            reads.push((MARKER, self.complete_key(), Read::Deadline, None));
        }
        if !reads.is_empty() {
            let read = self
                .call("check", |c| {
                    futures_util::future::try_join_all(reads.iter().map(|(_, key, read, _)| {
                        let mut c = c.clone();
                        let cmd = read.command(key);
                        async move { cmd.query_async::<Value>(&mut c).await }
                    }))
                })
                .await;
            let values = match read {
                Ok(values) => values,
                Err(e) => {
                    for (_, key, _, ticket) in reads {
                        if let (Some(view), Some(ticket)) = (&self.view, ticket) {
                            view.abandon(&key, ticket);
                        }
                    }
                    return Err(e);
                }
            };
            for ((i, key, read, ticket), value) in reads.into_iter().zip(values) {
                let fact = read
                    .fact(&value, now_ms)
                    .map_err(|e| unavailable(format!("check: {e}")))?;
                if let (Some(view), Some(ticket)) = (&self.view, ticket) {
                    view.fill(&key, ticket, Entry::fact(fact, t.accepted_until_ms));
                }
                facts[i] = fact;
            }
        }
        let [revoked, cutoff, session, family, marker] = facts;
        let facts = Facts {
            revoked,
            cutoff,
            session,
            family,
        };
        Ok(Evidence {
            revoked: facts.revoke(t),
            missing: facts.missing(t),
            complete: marker.is_some_and(|until| until > now_ms),
        })
    }

    /// Writes a session as it is (a create, and the tiered mirror of a touch or a refill):
    /// never over a newer state, never over its tombstone.
    pub(super) async fn put_session(&self, s: &Session, now: SystemTime) -> Result<(), StoreError> {
        let (key, tombstone) = self
            .session_key(&s.id)
            .zip(self.tombstone_key(&s.id))
            .ok_or_else(|| unavailable("not a session id of this sidecar"))?;
        let index = self.sessions_key(&s.subject);
        let metadata = serde_json::to_string(&s.metadata).expect("a map serializes");
        let idle = s
            .idle_expires_at
            .map(|t| millis(t).to_string())
            .unwrap_or_default();
        let mut invocation = self.scripts.put_session.prepare_invoke();
        invocation
            .key(&key)
            .key(index)
            .key(tombstone)
            .arg(&s.id)
            .arg(&s.subject)
            .arg(millis(s.created_at))
            .arg(millis(s.expires_at))
            .arg(millis(s.last_seen_at))
            .arg(idle)
            .arg(metadata)
            .arg(millis(now));
        self.invoke_writing::<i64>("put_session", &key, invocation)
            .await
            .map(drop)
    }

    /// Ends a session, leaving a tombstone until its absolute end (`ends` when Redis may not
    /// hold the session). Whether it was live.
    pub(super) async fn end_session(
        &self,
        id: &str,
        now: SystemTime,
        ends: Option<SystemTime>,
    ) -> Result<bool, StoreError> {
        let Some((key, tombstone)) = self.session_key(id).zip(self.tombstone_key(id)) else {
            return Ok(false);
        };
        let mut invocation = self.scripts.end_session.prepare_invoke();
        invocation
            .key(&key)
            .key(tombstone)
            .arg(millis(now))
            .arg(ends.map(|t| millis(t).to_string()).unwrap_or_default());
        self.invoke_writing::<i64>("end_session", &key, invocation)
            .await
            .map(|n| n == 1)
    }

    /// Logout everywhere: raises the cutoff and ends the subject's sessions, those Redis
    /// indexes and those of `also` (id, absolute end), each with a tombstone. How many live
    /// sessions it ended.
    pub(super) async fn logout(
        &self,
        subject: &str,
        cutoff: SystemTime,
        until: SystemTime,
        now: SystemTime,
        also: &[(String, SystemTime)],
    ) -> Result<u32, StoreError> {
        let tag = subject_tag(subject);
        let cutoff_key = self.cutoff_key(subject);
        let mut invocation = self.scripts.logout.prepare_invoke();
        invocation
            .key(&cutoff_key)
            .key(self.sessions_key(subject))
            .arg(millis(cutoff))
            .arg(millis(until))
            .arg(self.session_prefix(&tag))
            .arg(self.tombstone_prefix(&tag))
            .arg(millis(now));
        // Only ids of this subject's tag share the slot the script runs on.
        for (id, ends) in also.iter().filter(|(id, _)| session_tag(id) == Some(&tag)) {
            invocation.arg(id).arg(millis(*ends));
        }
        // The cutoff revokes every token of the subject that its ended sessions carried.
        self.invoke_writing("logout", &cutoff_key, invocation).await
    }

    /// Writes a family's state as PostgreSQL holds it (tiered): a revoked family stays revoked.
    pub(super) async fn put_family(&self, f: &Family, revoked: bool) -> Result<(), StoreError> {
        let key = self.family_key(&f.id);
        let mut invocation = self.scripts.put_family.prepare_invoke();
        invocation
            .key(&key)
            .arg(&f.subject)
            .arg(&f.current)
            .arg(if revoked { "1" } else { "0" })
            .arg(millis(f.expires_at));
        self.invoke_writing::<i64>("put_family", &key, invocation)
            .await
            .map(drop)
    }

    /// Copies a cutoff (tiered refill): it only rises.
    pub(super) async fn put_cutoff(
        &self,
        subject: &str,
        cutoff: SystemTime,
        until: SystemTime,
    ) -> Result<(), StoreError> {
        let key = self.cutoff_key(subject);
        let mut invocation = self.scripts.put_cutoff.prepare_invoke();
        invocation.key(&key).arg(millis(cutoff)).arg(millis(until));
        self.invoke_writing::<i64>("put_cutoff", &key, invocation)
            .await
            .map(drop)
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

    /// Stops Redis vouching for completeness (tiered): deletes the complete marker and any
    /// refill's ticket, in one command (they share a hash tag), so that reads go to PostgreSQL
    /// until a refill that starts after this has run.
    pub(super) async fn void_marker(&self) -> Result<(), StoreError> {
        let (filling, complete) = (self.filling_key(), self.complete_key());
        let voided = self
            .call("void_marker", |mut c| async move {
                redis::cmd("DEL")
                    .arg(complete)
                    .arg(filling)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
        self.forget(&self.complete_key());
        voided
    }

    /// Notes that a refill starts; returns its ticket for [`RedisStore::mark_complete`].
    pub(super) async fn begin_refill(&self, ttl: Duration) -> Result<String, StoreError> {
        let key = self.filling_key();
        let ticket = crate::ids::random_id();
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
        let mut invocation = self.scripts.mark_complete.prepare_invoke();
        invocation
            .key(self.filling_key())
            .key(self.complete_key())
            .arg(ticket)
            .arg(ttl.as_millis() as u64);
        let marked = self.invoke("mark_complete", invocation).await;
        self.forget(&self.complete_key());
        marked
    }
}

#[async_trait]
impl Store for RedisStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn revoke(&self, token_id: &str, until: SystemTime) -> Result<bool, StoreError> {
        let key = self.revoked_key(token_id);
        let mut invocation = self.scripts.revoke.prepare_invoke();
        invocation.key(&key).arg(millis(until));
        self.invoke_writing::<i64>("revoke", &key, invocation)
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
        self.logout(subject, cutoff, until, cutoff, &[]).await
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
        let idle = idle_until
            .map(|t| millis(t).to_string())
            .unwrap_or_default();
        let mut invocation = self.scripts.touch_session.prepare_invoke();
        invocation.key(&key).arg(millis(now)).arg(idle);
        let fields: Option<HashMap<String, String>> = self
            .invoke_writing("touch_session", &key, invocation)
            .await?;
        Ok(fields.and_then(|f| session_from(id, f)))
    }

    async fn delete_session(&self, id: &str, now: SystemTime) -> Result<bool, StoreError> {
        // The index entry goes when the subject's sessions are next listed.
        self.end_session(id, now, None).await
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
        presented_revoked: bool,
        successor: &Successor,
        now: SystemTime,
        replay_until: SystemTime,
    ) -> Result<Rotation, StoreError> {
        let key = self.family_key(family_id);
        let mut invocation = self.scripts.rotate.prepare_invoke();
        invocation
            .key(&key)
            .arg(presented)
            .arg(&successor.refresh_id)
            .arg(&successor.access_id)
            .arg(successor.issued_at_ms)
            .arg(millis(now))
            .arg(millis(replay_until))
            .arg(u8::from(presented_revoked));
        let answer: Vec<String> = self.invoke_writing("rotate", &key, invocation).await?;
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

    async fn heartbeat(&self, me: Beat<'_>, ttl: Duration) -> Result<Registry, StoreError> {
        let mut invocation = self.scripts.heartbeat.prepare_invoke();
        for key in self.registry_keys() {
            invocation.key(key);
        }
        invocation
            .arg(me.id)
            .arg(me.nonce)
            .arg(me.digest)
            .arg(me.document)
            .arg(ttl.as_millis().max(1) as u64)
            .arg(Registry::LISTED);
        type Reply = (usize, usize, u64, u8, Vec<String>, Vec<(String, usize)>);
        let (live, undigested, generation, taken, mut ids, mut digests): Reply =
            self.invoke("heartbeat", invocation).await?;
        ids.sort();
        digests.sort();
        Ok(Registry {
            live,
            digests,
            generation,
            undigested,
            taken: taken == 1,
            ids,
        })
    }

    async fn nodes(
        &self,
        ttl: Duration,
        unlike: Option<&str>,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut invocation = self.scripts.read_registry.prepare_invoke();
        for key in self.registry_keys() {
            invocation.key(key);
        }
        invocation
            .arg(ttl.as_millis().max(1) as u64)
            .arg(unlike.unwrap_or_default())
            .arg(if unlike.is_some() { "1" } else { "0" });
        let flat: Vec<String> = self.invoke("nodes", invocation).await?;
        Ok(flat
            .chunks_exact(2)
            .map(|pair| (pair[0].clone(), pair[1].clone()))
            .collect())
    }

    async fn leave(&self, node: &str) -> Result<(), StoreError> {
        let mut invocation = self.scripts.leave.prepare_invoke();
        for key in self.registry_keys() {
            invocation.key(key);
        }
        invocation.arg(node);
        self.invoke::<()>("leave", invocation).await
    }

    async fn mfa_begin(
        &self,
        subject: &str,
        sealed: &str,
        until: SystemTime,
    ) -> Result<(), StoreError> {
        let mut invocation = self.scripts.mfa.key(self.mfa_key(subject));
        invocation.arg("begin").arg(sealed).arg(millis(until));
        self.invoke::<i64>("mfa_begin", invocation)
            .await
            .map(|_| ())
    }

    async fn mfa_get(&self, subject: &str, now: SystemTime) -> Result<MfaRecord, StoreError> {
        let key = self.mfa_key(subject);
        let fields: HashMap<String, String> = self
            .call("mfa_get", |mut c| async move {
                redis::cmd("HGETALL").arg(key).query_async(&mut c).await
            })
            .await?;
        let number = |name: &str| fields.get(name).and_then(|v| v.parse::<i64>().ok());
        let pending = match (fields.get("p"), number("pu")) {
            (Some(p), Some(until)) if until > millis(now) => Some((p.clone(), from_millis(until))),
            _ => None,
        };
        let enrolled = fields.get("s").map(|secret| MfaEnrolled {
            secret: secret.clone(),
            enrolled_at: from_millis(number("e").unwrap_or(0)),
            last_step: number("l").unwrap_or(0),
            backup_codes: fields
                .get("b")
                .map_or(0, |b| b.split_whitespace().count() as u32),
        });
        Ok(MfaRecord { pending, enrolled })
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
        let mut invocation = self.scripts.mfa.key(self.mfa_key(subject));
        invocation
            .arg("confirm")
            .arg(sealed)
            .arg(millis(now))
            .arg(step)
            .arg(backup.join(" "))
            .arg(reseal.unwrap_or_default());
        Ok(self.invoke::<i64>("mfa_confirm", invocation).await? == 1)
    }

    async fn mfa_accept(
        &self,
        subject: &str,
        sealed: &str,
        step: i64,
        reseal: Option<&str>,
    ) -> Result<StepAccept, StoreError> {
        let mut invocation = self.scripts.mfa.key(self.mfa_key(subject));
        invocation
            .arg("accept")
            .arg(sealed)
            .arg(step)
            .arg(reseal.unwrap_or_default());
        Ok(match self.invoke::<i64>("mfa_accept", invocation).await? {
            2 => StepAccept::Accepted,
            1 => StepAccept::Replayed,
            _ => StepAccept::NotEnrolled,
        })
    }

    async fn mfa_spend_backup(
        &self,
        subject: &str,
        candidates: &[String],
    ) -> Result<Option<u32>, StoreError> {
        let mut invocation = self.scripts.mfa.key(self.mfa_key(subject));
        invocation.arg("spend").arg(candidates);
        let left = self.invoke::<i64>("mfa_spend_backup", invocation).await?;
        Ok(u32::try_from(left).ok())
    }

    async fn mfa_set_backup(&self, subject: &str, backup: &[String]) -> Result<bool, StoreError> {
        let mut invocation = self.scripts.mfa.key(self.mfa_key(subject));
        invocation.arg("backup").arg(backup.join(" "));
        Ok(self.invoke::<i64>("mfa_set_backup", invocation).await? == 1)
    }

    async fn mfa_disable(&self, subject: &str, now: SystemTime) -> Result<bool, StoreError> {
        let mut invocation = self.scripts.mfa.key(self.mfa_key(subject));
        invocation.arg("disable").arg(millis(now));
        Ok(self.invoke::<i64>("mfa_disable", invocation).await? == 1)
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
        at: Option<SystemTime>,
    ) -> Result<Decision, StoreError> {
        let step = RateStep {
            key: self.rate_key(policy, key),
            gcra: p,
            cost,
            at: at.map(micros),
        };
        let answer = async {
            let answer = match &self.rate_steps {
                Some(batcher) => {
                    let lane = || {
                        let store = self.clone();
                        move |steps| {
                            let store = store.clone();
                            async move { store.rate_limit_many(steps).await }
                        }
                    };
                    batcher.submit(step, self.timeout, lane).await
                }
                None => {
                    let mut invocation = self.scripts.rate_limit.prepare_invoke();
                    step.push(&mut invocation);
                    self.invoke("rate_limit", invocation).await
                }
            };
            answer.map(|(allowed, remaining, retry_us, reset_us)| {
                (allowed == 1, remaining, retry_us, reset_us)
            })
        };
        let denials = self.view.as_ref().filter(|_| at.is_none());
        Denial::through(denials, &self.reset_key(policy, key), p, cost, answer).await
    }

    async fn reset_rate_limit(&self, policy: &str, key: &str) -> Result<(), StoreError> {
        let (state, marker) = (self.rate_key(policy, key), self.reset_key(policy, key));
        self.forget(&marker);
        let reset = self
            .call("del", |mut c| async move {
                redis::cmd("DEL")
                    .arg(state)
                    .query_async::<()>(&mut c)
                    .await?;
                // After the state is gone: a node that hears of the marker and asks again finds
                // the full allowance. The marker's own value does not matter; its write does.
                redis::cmd("SET")
                    .arg(marker)
                    .arg(1)
                    .arg("PX")
                    .arg(1000)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
        self.forget(&self.reset_key(policy, key));
        reset
    }

    async fn purge_expired(&self) -> Result<usize, StoreError> {
        Ok(0) // every key carries its own TTL
    }
}

struct Connector {
    urls: Vec<String>,
    cluster: bool,
    timeout: Duration,
    tls: RedisTls,
}

impl Connector {
    fn validate(&self) -> Result<(), StoreError> {
        for url in &self.urls {
            self.client(url).map_err(|e| match e.kind() {
                redis::ErrorKind::Io => unavailable(format!("the TLS files: {e}")),
                kind => unavailable(format!("invalid REDIS_URL: {kind:?}")),
            })?;
        }
        if !self.cluster && self.urls.len() != 1 {
            return Err(unavailable("several REDIS_URLs need --redis-cluster"));
        }
        Ok(())
    }

    /// The TLS files as the client takes them, if any was given.
    fn certificates(&self) -> Option<TlsCertificates> {
        (self.tls.ca.is_some() || self.tls.client.is_some()).then(|| TlsCertificates {
            client_tls: self.tls.client.as_ref().map(|(cert, key)| ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.expose().to_vec(),
            }),
            root_cert: self.tls.ca.clone(),
        })
    }

    /// A client of one node, with the TLS files.
    fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        match self.certificates() {
            Some(certificates) => redis::Client::build_with_tls(url, certificates),
            None => redis::Client::open(url),
        }
    }

    async fn connect(&self) -> redis::RedisResult<Connection> {
        if self.cluster {
            let mut builder = ClusterClientBuilder::new(self.urls.clone())
                .connection_timeout(self.timeout)
                .response_timeout(self.timeout);
            if let Some(certificates) = self.certificates() {
                builder = builder.certs(certificates);
            }
            let client = builder.build()?;
            Ok(Connection::Cluster(client.get_async_connection().await?))
        } else {
            let client = self.client(&self.urls[0])?;
            // One plain attempt first: the manager retries a first connection several times
            // with backoff before it reports anything, which hid the reason (a refused
            // connection, a wrong password, an untrusted certificate) for seconds.
            let probe = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.timeout))
                .set_response_timeout(Some(self.timeout));
            drop(
                client
                    .get_multiplexed_async_connection_with_config(&probe)
                    .await?,
            );
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

/// Each node the settings name, with how TLS is set up (see [`super::Endpoint`]).
pub(super) fn endpoints(config: &RedisConfig) -> Vec<super::Endpoint> {
    let tls = match (&config.tls.ca, &config.tls.client) {
        (None, None) => "rediss://, public roots",
        (Some(_), None) => "rediss://, AUTH_REDIS_CA_FILE",
        (None, Some(_)) => "rediss://, public roots, client certificate",
        (Some(_), Some(_)) => "rediss://, AUTH_REDIS_CA_FILE, client certificate",
    };
    config
        .url
        .expose_str()
        .split(',')
        .filter_map(|url| redis::Client::open(url.trim()).ok())
        .map(|client| {
            let addr = client.get_connection_info().addr().clone();
            let (host, encrypted, verified) = match &addr {
                redis::ConnectionAddr::Tcp(host, _) => (host.clone(), false, false),
                redis::ConnectionAddr::TcpTls { host, insecure, .. } => {
                    (host.clone(), true, !insecure)
                }
                redis::ConnectionAddr::Unix(path) => (path.display().to_string(), false, false),
                other => (other.to_string(), false, false),
            };
            super::Endpoint {
                backend: BACKEND,
                address: addr.to_string(),
                local: super::is_local(&host),
                encrypted,
                verified,
                tls: match (encrypted, verified) {
                    (false, _) => "none (redis://)".to_owned(),
                    (true, false) => "rediss:// without certificate checks (#insecure)".to_owned(),
                    (true, true) => tls.to_owned(),
                },
            }
        })
        .collect()
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
