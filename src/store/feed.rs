//! Change feeds that keep a [`View`] coherent: Redis server-assisted client-side caching
//! (a RESP3 connection with `CLIENT TRACKING ... BCAST`) and PostgreSQL `LISTEN`.
//!
//! Each feed proves itself every [`PROOF_INTERVAL`] with a probe through the same connection
//! as the changes (a PING; a NOTIFY to itself; through a Redis replica, a write to the primary
//! whose invalidation the replica passes on). A backend sends a connection's messages in
//! order, so a probe's answer comes after every change the backend sent before it; the feed
//! applies those first, then lets the view answer until the probe's send time plus
//! [`PROOF_WINDOW`]. A lost connection, a closed channel or an overdue probe makes the view
//! stop answering and empties it; the feed then reconnects with backoff.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::{Duration, Instant};

use redis::{AsyncConnectionConfig, ConnectionAddr, ProtocolVersion, PushInfo, PushKind, Value};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::mpsc;

use super::cache::{FlushCause, PROOF_INTERVAL, PROOF_WINDOW, View};
use super::{FIRST_BACKOFF, MAX_BACKOFF};

/// The name the Redis tracking connection gives itself (`CLIENT LIST` shows it).
pub const REDIS_FEED_NAME: &str = "auth-sidecar-feed";

/// The PostgreSQL channel the tables' triggers notify (see the `change_feed` migration).
pub const POSTGRES_CHANNEL: &str = "auth_sidecar_facts";

/// How many triggers the `change_feed` migration creates.
const FEED_TRIGGERS: i64 = 8;

/// Runs a feed for as long as the process: each session ends in an error, after which the
/// view is emptied and the feed reconnects, waiting 100 ms after the first failure and twice
/// as long after each next one up to 5 s.
fn run_forever<F, Fut>(backend: &'static str, view: View, mut session: F)
where
    F: FnMut(View) -> Fut + Send + 'static,
    Fut: Future<Output = (String, bool)> + Send,
{
    tokio::spawn(async move {
        let mut backoff = FIRST_BACKOFF;
        let mut said = false;
        loop {
            let (why, was_live) = session(view.clone()).await;
            view.lost(&why);
            if was_live {
                backoff = FIRST_BACKOFF;
                said = false;
            }
            // Once per outage at warn (a backend without tracking or triggers says so here),
            // the retries at debug.
            if said {
                tracing::debug!(backend, reason = why, retry_in = ?backoff, "revocation cache feed down");
            } else {
                tracing::warn!(backend, reason = why, retry_in = ?backoff, "revocation cache feed down: Validate reads the backend");
                said = true;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
}

/// Where a Redis feed's invalidations come from, and how it proves itself.
#[derive(Clone)]
pub struct RedisFeed {
    /// The primary, or a replica of it (`--redis-feed-url`).
    pub source: redis::Client,
    /// With a replica: the primary, and the prefix of this feed's probe keys. A PONG from a
    /// replica would prove nothing about how far behind the primary it is, so each probe is
    /// then a write to the primary of a key under the prefix (tracked by this connection
    /// alone), whose invalidation comes through the replica after every change the primary
    /// made before it. Without one, a PING through the tracking connection proves the feed,
    /// since the primary sends a connection's pushes and replies in order.
    pub probes: Option<(redis::Client, String)>,
}

/// How long a replica probe's key lives: past any probe's window, so that its invalidation is
/// the write's and never its expiry's.
const PROBE_KEY_TTL: Duration = Duration::from_secs(30);

/// Starts the Redis feed: invalidations of keys under `prefixes` reach `view`.
pub fn spawn_redis(feed: RedisFeed, prefixes: Vec<String>, timeout: Duration, view: View) {
    run_forever("redis", view, move |view| {
        let (feed, prefixes) = (feed.clone(), prefixes.clone());
        async move {
            let mut was_live = false;
            let why = match redis_session(&feed, &prefixes, timeout, &view, &mut was_live).await {
                Ok(never) => match never {},
                Err(why) => why,
            };
            (why, was_live)
        }
    });
}

type Probe = Pin<Box<dyn Future<Output = redis::RedisResult<()>> + Send>>;

async fn redis_session(
    feed: &RedisFeed,
    prefixes: &[String],
    timeout: Duration,
    view: &View,
    was_live: &mut bool,
) -> Result<std::convert::Infallible, String> {
    let client = &feed.source;
    let probes = match &feed.probes {
        None => None,
        Some((primary, prefix)) => {
            let conn = primary
                .get_multiplexed_async_connection_with_config(
                    &AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout)),
                )
                .await
                .map_err(|e| format!("connect to the primary: {e}"))?;
            Some((prefix.as_str(), conn))
        }
    };
    // What ends the session goes to this loop, and so do the numbers of the replica probes
    // heard of.
    let (ended, mut end) = mpsc::unbounded_channel();
    let (heard, mut hear) = mpsc::unbounded_channel();
    let own = probes.as_ref().map(|(prefix, _)| *prefix);
    let conn = tracking(client, prefixes, own, timeout, view, ended, heard).await?;

    let mut tick = tokio::time::interval(PROOF_INTERVAL);
    match probes {
        None => {
            let mut probe: Option<(Instant, Probe)> = None;
            loop {
                tokio::select! {
                    why = end.recv() => return Err(why.unwrap_or_else(|| "push sender dropped".into())),
                    answer = async { probe.as_mut().expect("guarded").1.as_mut().await }, if probe.is_some() => {
                        let (sent, _) = probe.take().expect("guarded");
                        answer.map_err(|e| format!("probe: {e}"))?;
                        // Every push Redis sent before the answer has been applied.
                        view.proven(sent);
                        *was_live = true;
                    }
                    _ = tick.tick() => match &probe {
                        Some((sent, _)) if sent.elapsed() >= PROOF_WINDOW => {
                            return Err("probe unanswered".into());
                        }
                        Some(_) => {}
                        None => {
                            let mut c = conn.clone();
                            probe = Some((
                                Instant::now(),
                                Box::pin(async move { redis::cmd("PING").query_async::<()>(&mut c).await }),
                            ));
                        }
                    },
                }
            }
        }
        Some((prefix, mut primary)) => {
            // Probes written and not yet heard of through the replica, oldest first.
            let mut sent: VecDeque<(u64, Instant)> = VecDeque::new();
            let mut next = 0u64;
            loop {
                tokio::select! {
                    why = end.recv() => return Err(why.unwrap_or_else(|| "push sender dropped".into())),
                    Some(n) = hear.recv() => {
                        // Every change the primary made before probe n has come through.
                        while let Some(&(m, at)) = sent.front() && m <= n {
                            sent.pop_front();
                            if m == n {
                                view.proven(at);
                                *was_live = true;
                            }
                        }
                    }
                    _ = tick.tick() => {
                        if sent.front().is_some_and(|(_, at)| at.elapsed() >= PROOF_WINDOW) {
                            return Err("probe unanswered through the replica: it lags or \
                                        lost its primary".into());
                        }
                        // Stamped before the write: what the primary acknowledged before
                        // this instant is ordered before the probe.
                        sent.push_back((next, Instant::now()));
                        redis::cmd("SET")
                            .arg(format!("{prefix}{next}"))
                            .arg(1)
                            .arg("PX")
                            .arg(PROBE_KEY_TTL.as_millis() as u64)
                            .query_async::<()>(&mut primary)
                            .await
                            .map_err(|e| format!("probe: {e}"))?;
                        next += 1;
                    }
                }
            }
        }
    }
}

/// A RESP3 connection to `client` that tracks the keys under `prefixes` (and under `own`, a
/// replica feed's probe keys) with `CLIENT TRACKING ON BCAST`. Its pushes are applied to
/// `view` in the connection's own reader, as it reads them: before any reply that follows
/// them (a probe's PONG), and with no task hop before the view drops a key. A lost connection
/// goes to `ended`, and the numbers of the probes under `own` to `heard`.
async fn tracking(
    client: &redis::Client,
    prefixes: &[String],
    own: Option<&str>,
    timeout: Duration,
    view: &View,
    ended: mpsc::UnboundedSender<String>,
    heard: mpsc::UnboundedSender<u64>,
) -> Result<redis::aio::MultiplexedConnection, String> {
    let sink = view.clone();
    let probes = own.map(str::to_owned);
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_push_sender(move |push: PushInfo| {
            if let Err(why) = apply_push(&sink, probes.as_deref(), &heard, push) {
                let _ = ended.send(why);
            }
            Ok::<(), redis::aio::SendError>(())
        });
    let info = client.get_connection_info().clone();
    let resp3 = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let client = redis::Client::open(info.set_redis_settings(resp3)).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(REDIS_FEED_NAME)
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| format!("client setname: {e}"))?;
    let mut tracking = redis::cmd("CLIENT");
    tracking.arg("TRACKING").arg("ON").arg("BCAST");
    for prefix in prefixes.iter().map(String::as_str).chain(own) {
        tracking.arg("PREFIX").arg(prefix);
    }
    tracking
        .query_async::<()>(&mut conn)
        .await
        .map_err(|e| format!("client tracking: {e}"))?;
    Ok(conn)
}

/// Where a cluster's slots are served: (first slot, last slot, master host, master port),
/// sorted.
type Slots = Vec<(i64, i64, String, u16)>;

/// Starts the feed of a Redis Cluster: a tracking connection to every master, found from the
/// first of `seeds` that answers `CLUSTER SLOTS`. Each probe PINGs every master, then asks
/// the first for the slots again: the view is proven only while every master answered and
/// every slot is where the session found it. A failover or a resharding (a slot on another
/// master, a new master) ends the session: the view is emptied, and the feed starts again on
/// the masters of the moment.
pub fn spawn_redis_cluster(
    seeds: Vec<redis::Client>,
    prefixes: Vec<String>,
    timeout: Duration,
    view: View,
) {
    run_forever("redis", view, move |view| {
        let (seeds, prefixes) = (seeds.clone(), prefixes.clone());
        async move {
            let mut was_live = false;
            let why = match cluster_session(&seeds, &prefixes, timeout, &view, &mut was_live).await
            {
                Ok(never) => match never {},
                Err(why) => why,
            };
            (why, was_live)
        }
    });
}

type Round = Pin<Box<dyn Future<Output = Result<Slots, String>> + Send>>;

async fn cluster_session(
    seeds: &[redis::Client],
    prefixes: &[String],
    timeout: Duration,
    view: &View,
    was_live: &mut bool,
) -> Result<std::convert::Infallible, String> {
    let mut found = Err("no seed node".to_owned());
    for seed in seeds {
        found = async {
            let mut conn = seed
                .get_multiplexed_async_connection_with_config(
                    &AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout)),
                )
                .await
                .map_err(|e| format!("connect to a seed: {e}"))?;
            let host = match seed.get_connection_info().addr() {
                ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => host.clone(),
                _ => String::new(),
            };
            slots(&mut conn, &host).await.map(|s| (seed, s))
        }
        .await;
        if found.is_ok() {
            break;
        }
    }
    let (seed, layout) = found?;
    let (ended, mut end) = mpsc::unbounded_channel();
    let (heard, _) = mpsc::unbounded_channel();
    let mut masters: Vec<(String, u16)> = layout.iter().map(|s| (s.2.clone(), s.3)).collect();
    masters.sort();
    masters.dedup();
    let mut conns = Vec::with_capacity(masters.len());
    for (host, port) in &masters {
        let info = seed.get_connection_info().clone();
        let addr = match info.addr().clone() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure,
                tls_params,
            },
            _ => ConnectionAddr::Tcp(host.clone(), *port),
        };
        let client = redis::Client::open(info.set_addr(addr)).map_err(|e| e.to_string())?;
        let conn = tracking(
            &client,
            prefixes,
            None,
            timeout,
            view,
            ended.clone(),
            heard.clone(),
        )
        .await
        .map_err(|e| format!("master {host}:{port}: {e}"))?;
        conns.push(conn);
    }
    let first_host = masters.first().map(|m| m.0.clone()).unwrap_or_default();

    let mut tick = tokio::time::interval(PROOF_INTERVAL);
    let mut round: Option<(Instant, Round)> = None;
    loop {
        tokio::select! {
            why = end.recv() => return Err(why.unwrap_or_else(|| "push sender dropped".into())),
            answer = async { round.as_mut().expect("guarded").1.as_mut().await }, if round.is_some() => {
                let (sent, _) = round.take().expect("guarded");
                if answer? != layout {
                    return Err("the cluster's slots moved (a failover or a resharding)".into());
                }
                // Every push each master sent before its PONG has been applied, and every
                // slot is still on a master this session tracks.
                view.proven(sent);
                *was_live = true;
            }
            _ = tick.tick() => match &round {
                Some((sent, _)) if sent.elapsed() >= PROOF_WINDOW => {
                    return Err("probe unanswered".into());
                }
                Some(_) => {}
                None => {
                    let (mut conns, host) = (conns.clone(), first_host.clone());
                    round = Some((
                        Instant::now(),
                        Box::pin(async move {
                            for c in conns.iter_mut() {
                                redis::cmd("PING")
                                    .query_async::<()>(c)
                                    .await
                                    .map_err(|e| format!("probe: {e}"))?;
                            }
                            slots(&mut conns[0], &host).await
                        }),
                    ));
                }
            },
        }
    }
}

/// The masters' slots as `CLUSTER SLOTS` gives them; an empty host is `host`, the one asked.
async fn slots(conn: &mut redis::aio::MultiplexedConnection, host: &str) -> Result<Slots, String> {
    let reply: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .map_err(|e| format!("cluster slots: {e}"))?;
    let bad = || "cluster slots: an unexpected reply".to_owned();
    let Value::Array(ranges) = reply else {
        return Err(bad());
    };
    let mut out = Slots::new();
    for range in ranges {
        let Value::Array(parts) = range else {
            return Err(bad());
        };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return Err(bad());
        };
        let name = match master.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => return Err(bad()),
        };
        let Some(Value::Int(port)) = master.get(1) else {
            return Err(bad());
        };
        let name = if name.is_empty() || name == "?" {
            host.to_owned()
        } else {
            name
        };
        out.push((
            *first,
            *last,
            name,
            u16::try_from(*port).map_err(|_| bad())?,
        ));
    }
    out.sort();
    if out.is_empty() {
        return Err("cluster slots: no slot is served".into());
    }
    Ok(out)
}

/// Applies one push to the view; the invalidation of a key under `probes` (this session's
/// own replica probes) is not a fact, and its number goes to `heard` instead.
fn apply_push(
    view: &View,
    probes: Option<&str>,
    heard: &mpsc::UnboundedSender<u64>,
    push: PushInfo,
) -> Result<(), String> {
    let key = |value: &Value| -> Option<String> {
        match value {
            Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    };
    let invalidate = |value: &Value| match key(value) {
        Some(name) => match probes.and_then(|p| name.strip_prefix(p)) {
            Some(n) => {
                if let Ok(n) = n.parse() {
                    let _ = heard.send(n);
                }
            }
            None => view.invalidate(&name),
        },
        // Not a key name: say nothing can be trusted.
        None => view.flush(FlushCause::Backend),
    };
    match push.kind {
        PushKind::Invalidate => {
            for item in &push.data {
                match item {
                    // A null invalidation: FLUSHALL, FLUSHDB, or Redis could not say which keys.
                    Value::Nil => view.flush(FlushCause::Backend),
                    Value::Array(keys) => keys.iter().for_each(invalidate),
                    key => invalidate(key),
                }
            }
            Ok(())
        }
        PushKind::Disconnection => Err("disconnected".into()),
        _ => Ok(()),
    }
}

/// Starts the PostgreSQL feed over a connection of its own (`options`): notifications on
/// [`POSTGRES_CHANNEL`] name the fact that changed (`r:`, `c:`, `s:`, `f:` and an id) or say
/// `flush`.
pub fn spawn_postgres(options: PgConnectOptions, timeout: Duration, view: View) {
    run_forever("postgres", view, move |view| {
        let options = options.clone();
        async move {
            let mut was_live = false;
            let why = match postgres_session(options, timeout, &view, &mut was_live).await {
                Ok(never) => match never {},
                Err(e) => e,
            };
            (why, was_live)
        }
    });
}

async fn postgres_session(
    options: PgConnectOptions,
    timeout: Duration,
    view: &View,
    was_live: &mut bool,
) -> Result<std::convert::Infallible, String> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(timeout)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(options.application_name("auth-sidecar feed"));
    let mut listener = PgListener::connect_with(&pool)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    tokio::time::timeout(timeout, listener.listen(POSTGRES_CHANNEL))
        .await
        .map_err(|_| "listen: timed out".to_owned())?
        .map_err(|e| format!("listen: {e}"))?;

    // Without the triggers (a database migrated by an older version, or not yet) no change
    // would be heard of: never go live then.
    let (triggers,): (i64,) = tokio::time::timeout(
        timeout,
        sqlx::query_as(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'auth\\_sidecar\\_feed\\_%'",
        )
        .fetch_one(&mut listener),
    )
    .await
    .map_err(|_| "triggers: timed out".to_owned())?
    .map_err(|e| format!("triggers: {e}"))?;
    if triggers < FEED_TRIGGERS {
        return Err("the change-feed triggers are missing: run the migrations".into());
    }

    // Each probe is a NOTIFY to ourselves, numbered, on a channel of this session's own, so
    // that no other node receives it (on the shared channel every node would receive every
    // node's probes: N² notifications). The notification queue is one for every channel, and
    // delivers in commit order, so a probe still comes after every change before it.
    let mut id = [0u8; 8];
    aws_lc_rs::rand::fill(&mut id).expect("the system random source works");
    let probes = format!("auth_sidecar_probe_{:016x}", u64::from_be_bytes(id));
    tokio::time::timeout(timeout, listener.listen(&probes))
        .await
        .map_err(|_| "listen: timed out".to_owned())?
        .map_err(|e| format!("listen: {e}"))?;
    let beat = "beat:";
    let mut sent: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut next = 0u64;
    let mut tick = tokio::time::interval(PROOF_INTERVAL);
    loop {
        tokio::select! {
            received = listener.try_recv() => {
                let notification = received
                    .map_err(|e| format!("receive: {e}"))?
                    .ok_or("connection lost")?;
                let payload = notification.payload();
                if notification.channel() == probes
                    && let Some(n) = payload.strip_prefix(beat)
                {
                    let n: u64 = n.parse().map_err(|_| "bad probe")?;
                    while let Some(&(m, at)) = sent.front() && m <= n {
                        sent.pop_front();
                        if m == n {
                            view.proven(at);
                            *was_live = true;
                        }
                    }
                } else if payload.starts_with(beat) {
                    // An older version's probe, on the shared channel.
                } else if payload == "flush" {
                    view.flush(FlushCause::Backend);
                } else {
                    view.invalidate(payload);
                }
            }
            _ = tick.tick() => {
                if sent.front().is_some_and(|(_, at)| at.elapsed() >= PROOF_WINDOW) {
                    return Err("probe unanswered".into());
                }
                let payload = format!("{beat}{next}");
                sent.push_back((next, Instant::now()));
                next += 1;
                tokio::time::timeout(
                    timeout,
                    sqlx::query("SELECT pg_notify($1, $2)")
                        .bind(&probes)
                        .bind(payload)
                        .execute(&mut listener),
                )
                .await
                .map_err(|_| "probe: timed out".to_owned())?
                .map_err(|e| format!("probe: {e}"))?;
            }
        }
    }
}

/// Up to how many rows of the change log one read takes; a read that fills it empties the
/// view rather than trust what it could not read.
const LOG_ROWS: usize = 10_000;

/// Starts the PostgreSQL feed that reads the change log (the `change_log` migration) through
/// `pool`, for nodes behind a transaction pooler, which gives no session to LISTEN on. Each
/// read, every [`PROOF_INTERVAL`], is one statement: the horizon of its snapshot (the oldest
/// transaction still running) and the facts changed by transactions at or after the previous
/// read's horizon. Every change committed before a read was sent is in it (or in an earlier
/// one), so the read proves the view up to its send time; changes read twice are invalidated
/// twice, which is harmless. The server's connections stay those of the pool, and each node
/// costs it four small reads a second, however many nodes there are.
pub fn spawn_postgres_log(pool: PgPool, timeout: Duration, view: View) {
    run_forever("postgres", view, move |view| {
        let pool = pool.clone();
        async move {
            let mut was_live = false;
            let why = match log_session(&pool, timeout, &view, &mut was_live).await {
                Ok(never) => match never {},
                Err(e) => e,
            };
            (why, was_live)
        }
    });
}

async fn log_session(
    pool: &PgPool,
    timeout: Duration,
    view: &View,
    was_live: &mut bool,
) -> Result<std::convert::Infallible, String> {
    // A node that starts, or starts again, begins at the horizon with an empty view: nothing
    // it holds can be older than what it reads.
    let mut horizon: Option<u64> = None;
    let mut tick = tokio::time::interval(PROOF_INTERVAL);
    loop {
        tick.tick().await;
        let sent = Instant::now();
        let (next, facts) = tokio::time::timeout(timeout, read_log(pool, horizon))
            .await
            .map_err(|_| "change log: timed out".to_owned())?
            .map_err(|e| format!("change log: {e}"))?;
        if facts.len() >= LOG_ROWS {
            view.flush(FlushCause::Backend);
        } else {
            for fact in &facts {
                if fact == "flush" {
                    view.flush(FlushCause::Backend);
                } else {
                    view.invalidate(fact);
                }
            }
        }
        horizon = Some(next);
        view.proven(sent);
        *was_live = true;
    }
}

/// One read of the change log: the snapshot's horizon, and the facts of the transactions at
/// or after `from` (none on a first read). One statement in the simple protocol, so that a
/// pooler in transaction mode cannot split it, and one snapshot for both.
async fn read_log(pool: &PgPool, from: Option<u64>) -> Result<(u64, Vec<String>), sqlx::Error> {
    use sqlx::Row;
    let facts = match from {
        // The numbers are ours, formatted: nothing from outside goes into the text.
        Some(from) => format!(
            "ARRAY(SELECT fact FROM change_log WHERE xid >= '{from}'::xid8 ORDER BY xid \
             LIMIT {LOG_ROWS})"
        ),
        None => "ARRAY[]::text[]".to_owned(),
    };
    let sql = format!("SELECT pg_snapshot_xmin(pg_current_snapshot())::text, {facts}");
    let row = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await?;
    let horizon: String = row.try_get(0)?;
    let horizon = horizon
        .parse()
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok((horizon, row.try_get(1)?))
}
