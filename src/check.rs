//! `auth-sidecar check-config`: the multi-node checklist, checked. Loads the configuration as
//! `serve` does, connects to the backends, reads the registry of live nodes, and prints one
//! row per item: ✓, ⚠ or ✗ with the reason. Nothing is written to the backends: no
//! migration, no registration.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::SystemClock;
use crate::cluster::{self, Local, Node};
use crate::config::{Config, Listen, Storage};
use crate::keys::Keys;
use crate::store::StoreConfig;
use crate::store::{self, Store};

/// How long the backends are given to answer.
const CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Share of the server's connections above which the pool sizing is a warning.
const POOL_WARN_SHARE: f64 = 0.8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mark {
    Pass,
    Warn,
    Fail,
}

impl Mark {
    fn symbol(self) -> &'static str {
        match self {
            Mark::Pass => "✓",
            Mark::Warn => "⚠",
            Mark::Fail => "✗",
        }
    }
}

/// One line of the checklist.
#[derive(Debug, Clone)]
pub struct Row {
    pub mark: Mark,
    pub item: &'static str,
    pub detail: String,
}

fn row(mark: Mark, item: &'static str, detail: impl Into<String>) -> Row {
    Row {
        mark,
        item,
        detail: detail.into(),
    }
}

/// Runs every check of `config`.
pub async fn run(config: &Config) -> Vec<Row> {
    let mut rows = Vec::new();
    let keys = match crate::server::load_keys(config).await {
        Ok(keys) => Some(Arc::new(keys)),
        Err(e) => {
            rows.push(row(Mark::Fail, "signing keys", format!("{e:#}")));
            None
        }
    };
    if let Some(keys) = &keys {
        rows.push(keys_row(config, keys));
    }
    rows.push(mfa_row(config));
    rows.extend(listener_rows(config));
    if config.storage == Storage::Memory {
        rows.push(row(
            Mark::Warn,
            "shared storage",
            "memory: sessions, revocations and rate-limit counts live in this process only; \
             run one replica, or use --storage redis, postgres or tiered",
        ));
        return rows;
    }
    // No migration and no revocation view: this reads, and starts no background work that
    // would outlive it.
    let mut quiet = config.clone();
    quiet.migrate = false;
    quiet.revocation_cache = 0;
    let store_config = match quiet.store() {
        Ok(c) => c,
        Err(e) => {
            rows.push(row(Mark::Fail, "shared storage", e.to_string()));
            return rows;
        }
    };
    let store = match store::open(&store_config, Arc::new(SystemClock)) {
        Ok(s) => s,
        Err(e) => {
            rows.push(row(Mark::Fail, "shared storage", e.to_string()));
            return rows;
        }
    };
    rows.extend(storage_rows(config, &store_config));
    let answered = match wait_for(&*store).await {
        Ok(took) => {
            rows.push(row(
                Mark::Pass,
                "backends answer",
                format!("{} answered in {took:?}", store.backend()),
            ));
            true
        }
        Err(reason) => {
            rows.push(row(Mark::Fail, "backends answer", reason));
            false
        }
    };
    let unmigrated = match &store_config {
        StoreConfig::Postgres(pg) | StoreConfig::Tiered(_, pg) if answered => {
            match store::postgres::schema_applied(pg, CONNECT_WAIT).await {
                Ok(applied) => !applied,
                Err(e) => {
                    rows.push(row(
                        Mark::Fail,
                        "live nodes",
                        format!("cannot read the schema: {}", e.detail),
                    ));
                    return rows;
                }
            }
        }
        _ => false,
    };
    let nodes = if unmigrated {
        // An init container before the first node: nothing to read, and nothing is written.
        rows.push(row(
            Mark::Warn,
            "live nodes",
            "none yet: the schema is not applied yet (the first node applies it at start, or \
             `auth-sidecar migrate` does)",
        ));
        None
    } else if answered {
        match store
            .nodes(config.cluster_heartbeat * cluster::LIVE_HEARTBEATS, None)
            .await
        {
            Ok(entries) => Some(cluster::parse_nodes(entries)),
            Err(e) => {
                rows.push(row(
                    Mark::Fail,
                    "live nodes",
                    format!("cannot read the registry: {}", e.detail),
                ));
                None
            }
        }
    } else {
        None
    };
    if let (Some(nodes), Some(keys)) = (&nodes, &keys) {
        rows.extend(cluster_rows(config, keys, nodes));
    }
    if let (StoreConfig::Redis(redis) | StoreConfig::Tiered(redis, _), Some(nodes)) =
        (&store_config, &nodes)
    {
        rows.push(fleet_row(config, redis, nodes.len().max(1)));
    }
    if let StoreConfig::Postgres(pg) | StoreConfig::Tiered(_, pg) = &store_config {
        let live = nodes.as_ref().map_or(0, Vec::len);
        rows.extend(pool_rows(config, pg, live).await);
    }
    rows
}

/// Exit status of `check-config`: 0 when no row fails.
pub fn exit_code(rows: &[Row]) -> u8 {
    u8::from(rows.iter().any(|r| r.mark == Mark::Fail))
}

/// The checklist as a table, then a count.
pub fn render(rows: &[Row]) -> String {
    let width = rows
        .iter()
        .map(|r| r.item.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for r in rows {
        let _ = writeln!(
            out,
            "{}  {:width$}  {}",
            r.mark.symbol(),
            r.item,
            crate::telemetry::escape_control(&r.detail)
        );
    }
    let count = |m| rows.iter().filter(|r| r.mark == m).count();
    let _ = writeln!(
        out,
        "\n{} ✓  {} ⚠  {} ✗",
        count(Mark::Pass),
        count(Mark::Warn),
        count(Mark::Fail)
    );
    out
}

fn keys_row(config: &Config, keys: &Keys) -> Row {
    let set = keys.current();
    let elsewhere: Vec<String> = set
        .keys()
        .filter_map(|k| Some(format!("{} in {}", k.kid(), k.source()?)))
        .collect();
    let summary = if elsewhere.is_empty() {
        set.summary()
    } else {
        format!("{}; {}", set.summary(), elsewhere.join("; "))
    };
    match (&config.keys_dir, &config.jwt_secret) {
        (Some(dir), _) => row(
            Mark::Pass,
            "signing keys",
            format!("AUTH_KEYS_DIR {}: {summary}", dir.display()),
        ),
        (None, Some(_)) => row(
            Mark::Pass,
            "signing keys",
            format!("AUTH_JWT_SECRET: {summary}"),
        ),
        (None, None) => row(
            Mark::Warn,
            "signing keys",
            "a random key made at start: its tokens validate on this process only",
        ),
    }
}

/// Whether MFA is on, and with which keys (never the keys themselves). Off is not a fault:
/// an app may not use MFA.
fn mfa_row(config: &Config) -> Row {
    use crate::config::MfaKeys;
    match &config.mfa.keys {
        MfaKeys::Given(text) => match crate::mfa::seal::Sealer::parse(text.expose_str()) {
            Ok(sealer) => {
                let kids: Vec<&str> = sealer.kids().collect();
                row(
                    Mark::Pass,
                    "mfa",
                    format!(
                        "on: seals under key {}{}",
                        kids[0],
                        if kids.len() > 1 {
                            format!(", opens {}", kids.join(", "))
                        } else {
                            String::new()
                        }
                    ),
                )
            }
            Err(e) => row(Mark::Fail, "mfa", e),
        },
        MfaKeys::Ephemeral => row(
            Mark::Pass,
            "mfa",
            "on, with a random key made at start (memory storage)",
        ),
        MfaKeys::Off(reason) => row(Mark::Pass, "mfa", reason.clone()),
    }
}

fn listener_rows(config: &Config) -> Vec<Row> {
    let api = match &config.listen {
        Listen::Unix(path) => row(
            Mark::Pass,
            "token API",
            format!("unix:{}, for the pod only", path.display()),
        ),
        Listen::Tcp(addr) if addr.ip().is_loopback() => {
            row(Mark::Pass, "token API", format!("{addr}, for the pod only"))
        }
        Listen::Tcp(addr) => row(
            Mark::Warn,
            "token API",
            format!(
                "{addr}: reachable from outside the pod; anyone who reaches it can issue tokens"
            ),
        ),
    };
    let probes = if config.ops_listen.ip().is_loopback() {
        row(
            Mark::Warn,
            "probes",
            format!(
                "ops listener on {}: the kubelet probes the pod's address and cannot reach it",
                config.ops_listen
            ),
        )
    } else {
        row(
            Mark::Pass,
            "probes",
            format!(
                "/health, /healthz, /readyz, /livez and grpc.health.v1 on {}",
                config.ops_listen
            ),
        )
    };
    vec![api, probes]
}

fn storage_rows(config: &Config, store: &StoreConfig) -> Vec<Row> {
    let endpoints = store::endpoints(store);
    let list: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{} at {}", e.backend, e.address))
        .collect();
    let mut rows = vec![
        row(
            Mark::Pass,
            "shared storage",
            format!(
                "{:?}: sessions and revocations in {}",
                config.storage,
                list.join(", ")
            )
            .to_lowercase(),
        ),
        row(
            Mark::Pass,
            "rate limiting",
            format!(
                "{} polic{} counted in the shared store, once for all nodes",
                config.rate_limits.len(),
                if config.rate_limits.len() == 1 {
                    "y"
                } else {
                    "ies"
                }
            ),
        ),
    ];
    for e in &endpoints {
        let (mark, detail) = match (e.local, e.encrypted, e.verified) {
            (_, true, true) => (Mark::Pass, e.tls.clone()),
            (true, _, _) => (Mark::Pass, format!("{} (this host)", e.tls)),
            (false, true, false) => (
                Mark::Warn,
                format!("{}: encrypted but the server is not authenticated", e.tls),
            ),
            (false, false, _) => (
                Mark::Warn,
                format!("{}: traffic to {} is not encrypted", e.tls, e.address),
            ),
        };
        rows.push(Row {
            mark,
            item: if e.backend == "redis" {
                "redis TLS"
            } else {
                "postgres TLS"
            },
            detail,
        });
    }
    rows
}

/// Pings until the store answers or [`CONNECT_WAIT`] passes; the last reason otherwise.
async fn wait_for(store: &dyn Store) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < CONNECT_WAIT {
        let ping = Instant::now();
        match store.ping().await {
            Ok(()) => return Ok(ping.elapsed()),
            // The reason stays the same twice in a row: the backend's own answer, not the
            // first attempt still under way.
            Err(e) if e.detail == last && !last.ends_with(store::FIRST_ATTEMPT) => break,
            Err(e) => last = e.detail,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}

fn cluster_rows(config: &Config, keys: &Keys, nodes: &[Node]) -> Vec<Row> {
    let now = std::time::SystemTime::now();
    let mut rows = Vec::new();
    if nodes.is_empty() {
        rows.push(row(
            Mark::Warn,
            "live nodes",
            "none yet: no node on this storage has registered (a first node, or one older than the registry)",
        ));
        return rows;
    }
    let listed: Vec<String> = nodes.iter().map(|n| n.describe(now)).collect();
    rows.push(row(
        Mark::Pass,
        "live nodes",
        format!("{}: {}", nodes.len(), listed.join(", ")),
    ));
    let versions: std::collections::BTreeSet<&str> = nodes
        .iter()
        .filter_map(|n| n.document.as_ref().map(|d| d.version.as_str()))
        .collect();
    if versions.len() > 1 {
        rows.push(row(
            Mark::Warn,
            "versions",
            format!(
                "several versions run: {} (normal during a rollout)",
                versions.into_iter().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let set = keys.current();
    let local = Local::new(config);
    let mine = local.document(&set);
    // This configuration is not a node: no id of its own to skip.
    let found = cluster::disagreements("", &local, &mine, &set, nodes);
    for (item, label) in [
        ("keys", "same keys"),
        ("policies", "same policies"),
        ("issuer", "same issuer"),
        ("audience", "same audience"),
        ("ttl", "same lifetimes"),
        ("admin", "same admin login"),
    ] {
        let here: Vec<_> = found.iter().filter(|d| d.item == item).collect();
        if here.is_empty() {
            rows.push(row(
                Mark::Pass,
                label,
                format!("as on every live node ({})", nodes.len()),
            ));
        }
        for d in here {
            rows.push(row(Mark::Fail, label, d.detail.clone()));
        }
    }
    rows
}

/// What a fleet of `live` nodes costs its Redis, by the model in README's "Sizing a fleet"
/// (constants from `cargo bench --bench fleet`), and a warning where one Redis would spend
/// more than half a core on it.
fn fleet_row(config: &Config, redis: &crate::store::RedisConfig, live: usize) -> Row {
    let n = live as f64;
    let beats = n / config.cluster_heartbeat.as_secs_f64().max(0.1);
    let idle = n * match redis.feed_url {
        Some(_) => model::IDLE_CPU_PER_NODE_REPLICA_FEED,
        None => model::IDLE_CPU_PER_NODE,
    };
    let mut detail = format!(
        "{live} live node(s): {beats:.0} heartbeat(s) a second; idle, about {:.1} % of a Redis \
         core",
        idle * 100.0
    );
    let mut saturates = idle > 0.5;
    if redis.cache > 0 && !redis.cluster {
        let per_revocation = match &redis.feed_url {
            Some(_) => model::REVOCATION_WRITE,
            None => model::REVOCATION_WRITE + n * model::PUSH_PER_NODE,
        };
        let load = per_revocation * model::REVOCATIONS_PER_SECOND;
        saturates |= load > 0.5;
        detail.push_str(&format!(
            "; each revocation costs the primary about {:.0} µs ({:.1} % of its core at {:.0} \
             revocations a second)",
            per_revocation * 1e6,
            load * 100.0,
            model::REVOCATIONS_PER_SECOND,
        ));
        match &redis.feed_url {
            Some(_) => detail.push_str(&format!(
                ", and each replica that carries the feed {:.1} µs per node that follows it",
                model::PUSH_PER_NODE * 1e6
            )),
            None if saturates => detail.push_str(
                "; put the revocation feed on replicas (--redis-feed-url), about one for each \
                 200 nodes",
            ),
            None => {}
        }
    }
    if saturates {
        row(Mark::Warn, "fleet", detail)
    } else {
        row(Mark::Pass, "fleet", detail)
    }
}

/// The cost model's constants, measured with `cargo bench --bench fleet` on one Redis 7.0
/// (see README's "Sizing a fleet"), the higher of the runs: CPU seconds (a second).
mod model {
    /// Idle, a second: a node's heartbeats and feed probes (PINGs).
    pub const IDLE_CPU_PER_NODE: f64 = 0.000_32;
    /// Idle, a second, with the feed on a replica: the probes are writes to the primary.
    pub const IDLE_CPU_PER_NODE_REPLICA_FEED: f64 = 0.000_6;
    /// A revocation's write, with no node following the feed.
    pub const REVOCATION_WRITE: f64 = 0.000_150;
    /// The invalidation a revocation pushes to each node that follows the feed.
    pub const PUSH_PER_NODE: f64 = 0.000_017;
    /// The revocation rate the check assumes.
    pub const REVOCATIONS_PER_SECOND: f64 = 100.0;
}

async fn pool_rows(config: &Config, pg: &crate::store::PostgresConfig, live: usize) -> Vec<Row> {
    let per_node = i64::from(config.db_max_connections);
    let pooled = config.db_transaction_pooling;
    if pooled && config.database_migrate_url.is_none() {
        return vec![row(
            Mark::Warn,
            "database connections",
            format!(
                "{per_node} per node through a transaction pooler; without \
                 DATABASE_MIGRATE_URL the server's max_connections cannot be read (the \
                 revocation view reads the change log through the pooler)"
            ),
        )];
    }
    let (max, reserved) = match store::postgres::server_limits(pg, CONNECT_WAIT).await {
        Ok(limits) => limits,
        Err(e) => {
            return vec![row(
                Mark::Fail,
                "database connections",
                format!("cannot read the server's max_connections: {}", e.detail),
            )];
        }
    };
    let available = max - reserved;
    if pooled {
        return vec![row(
            Mark::Pass,
            "database connections",
            format!(
                "through a transaction pooler: {live} node(s) × {per_node} go to the pooler; \
                 size its pool under the server's {available} (max_connections {max} − \
                 {reserved} reserved); migrations use DATABASE_MIGRATE_URL, and the revocation \
                 view reads the change log through the pooler"
            ),
        )];
    }
    let nodes = live.max(1) as i64;
    let need = nodes * per_node;
    let numbers = format!(
        "{nodes} node(s) × --db-max-connections {per_node} = {need}, of {available} \
         (max_connections {max} − {reserved} reserved)"
    );
    let advice = "lower --db-max-connections, or put PgBouncer in transaction mode in front \
                  (--db-transaction-pooling)";
    if need > available {
        vec![row(
            Mark::Fail,
            "database connections",
            format!("{numbers}: over the limit; {advice}"),
        )]
    } else if (need + per_node) as f64 > available as f64 * POOL_WARN_SHARE {
        vec![row(
            Mark::Warn,
            "database connections",
            format!(
                "{numbers}: one more node would need {}, over {}% of them; {advice}",
                need + per_node,
                (POOL_WARN_SHARE * 100.0) as u32
            ),
        )]
    } else {
        vec![row(Mark::Pass, "database connections", numbers)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::store::RedisConfig;

    fn redis(feed: Option<&str>) -> RedisConfig {
        RedisConfig {
            url: Secret::from("redis://127.0.0.1:6379"),
            feed_url: feed.map(Secret::from),
            cluster: false,
            prefix: "authsidecar:".into(),
            timeout: Duration::from_secs(1),
            cache: 1 << 20,
            batch: 0,
            tls: Default::default(),
        }
    }

    #[test]
    fn the_fleet_row_warns_where_one_redis_would_saturate_and_names_the_fix() {
        let config = Config::defaults();
        let small = fleet_row(&config, &redis(None), 50);
        assert_eq!(small.mark, Mark::Pass, "{}", small.detail);
        assert!(
            small.detail.starts_with("50 live node(s)"),
            "{}",
            small.detail
        );

        let large = fleet_row(&config, &redis(None), 1000);
        assert_eq!(large.mark, Mark::Warn, "{}", large.detail);
        assert!(
            large.detail.contains("--redis-feed-url"),
            "{}",
            large.detail
        );

        // On replicas, a revocation costs the primary the same at any size.
        let fed = |n| fleet_row(&config, &redis(Some("redis://replica:6379")), n).detail;
        let cost = |d: String| {
            d.split("costs the primary about ")
                .nth(1)
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            cost(fed(10)).split(' ').next(),
            cost(fed(1000)).split(' ').next()
        );
        assert_eq!(
            fleet_row(&config, &redis(Some("redis://r:6379")), 1000).mark,
            Mark::Warn,
            "the probes of 1,000 nodes are more than half a core"
        );
    }
}
