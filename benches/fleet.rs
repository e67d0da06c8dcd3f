//! The fleet benchmark: N release sidecars (default settings, the revocation view on) on one
//! throwaway backend, for each N asked, and what they cost it:
//!
//! - idle, over `--idle` seconds: the backend's CPU and the bytes it sends, per node (Redis:
//!   `INFO`; PostgreSQL: the server processes' CPU from /proc), and its client connections
//!   (`pgbouncer`: PostgreSQL through PgBouncer in transaction mode, whose pool of 20 is
//!   what reaches the server; the PgBouncer's own CPU is not counted);
//! - per revocation, at `--rate` a second through one node, less the idle cost of the same
//!   time: backend CPU and bytes; and the time until the last node rejects a revoked token;
//! - the backend's CPU per allowed CheckRateLimit and per Validate that misses the view;
//! - each node's resident memory, idle.
//!
//! With `--replicas R` (Redis), R replicas of the one Redis carry the revocation feed
//! (`--redis-feed-url`, node i on replica i mod R): the figures are then the primary's, and
//! a last column gives the CPU each replica spends per revocation.
//!
//! Kept out of the test command: at N = 100 it holds some 3 GB and takes minutes.
//!
//! `cargo bench --bench fleet -- [--backend redis|postgres|pgbouncer|cluster] [--nodes 1,10,50,100]
//!   [--idle 10] [--revocations 300] [--rate 100] [--replicas 0] [--storm]`
//!
//! With `--throughput S`, the first node's Validate of a token in its view is measured
//! against grpc.health.v1 Check on the same node, S seconds each.
//!
//! With `--storm`, each N ends with a restart of every node at once: the time until all
//! serve, and what the starts cost the backend.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use auth_sidecar::pb;
use support::backends::{PgBouncer, PostgresServer, RedisCluster, RedisServer, Storage, psql_on};

/// The rate-limit policy every node has, generous enough never to deny.
const POLICY: &str = "fleet";

/// How many CheckRateLimit decisions, and how many Validate misses, measure a call's cost.
const CALLS: usize = 1000;
use support::{Client, Sidecar};

struct Options {
    backend: String,
    nodes: Vec<usize>,
    idle: Duration,
    revocations: usize,
    rate: f64,
    replicas: usize,
    /// Also restart every node at once, and measure what the start costs the backend.
    storm: bool,
    /// Also measure the first node's Validate of a token in its view against
    /// grpc.health.v1 Check, for this many seconds each.
    throughput: Option<Duration>,
}

/// What the backend has used and sent so far, and its client connections now.
#[derive(Debug, Clone, Copy)]
struct Usage {
    cpu: Duration,
    bytes_out: Option<u64>,
    connections: u64,
}

enum Backend {
    /// The primary, and the replicas that carry the feed.
    Redis(RedisServer, Vec<RedisServer>),
    /// PostgreSQL, and the PgBouncer in transaction mode the nodes reach it through.
    Postgres(PostgresServer, Option<PgBouncer>),
    /// A Redis Cluster of three masters with a replica each; its figures are the masters'.
    Cluster(RedisCluster),
}

impl Backend {
    fn start(kind: &str, replicas: usize) -> Backend {
        match kind {
            "redis" => {
                let primary = RedisServer::start();
                let port = primary.port.to_string();
                let replicas: Vec<RedisServer> = (0..replicas)
                    .map(|_| {
                        RedisServer::with_args(&[
                            "--replicaof",
                            "127.0.0.1",
                            &port,
                            "--repl-diskless-load",
                            "on-empty-db",
                        ])
                    })
                    .collect();
                for r in &replicas {
                    while !r
                        .cli(&["INFO", "replication"])
                        .contains("master_link_status:up")
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Backend::Redis(primary, replicas)
            }
            "postgres" | "pgbouncer" => {
                let server = PostgresServer::start_with(|_| vec!["max_connections=2000".into()]);
                let bouncer = (kind == "pgbouncer").then(|| {
                    PgBouncer::start(&format!("postgres://postgres@127.0.0.1:{}", server.port))
                });
                Backend::Postgres(server, bouncer)
            }
            "cluster" => Backend::Cluster(RedisCluster::start(3, 1)),
            other => panic!("unknown backend {other} (redis, postgres, pgbouncer, cluster)"),
        }
    }

    fn node(&self, i: usize) -> Sidecar {
        let builder = Sidecar::builder().arg(format!("--rate-limit={POLICY}=1000000/1s"));
        match self {
            Backend::Redis(r, replicas) if !replicas.is_empty() => builder
                .args(["--storage", "redis", "--redis-prefix=fleet:"])
                .env("REDIS_URL", r.url())
                .env("REDIS_FEED_URL", replicas[i % replicas.len()].url()),
            Backend::Redis(r, _) => builder
                .args(["--storage", "redis", "--redis-prefix=fleet:"])
                .env("REDIS_URL", r.url()),
            Backend::Postgres(p, None) => builder
                .args(["--storage", "postgres"])
                .env("DATABASE_URL", p.url()),
            // PgBouncer takes 500 clients: four connections a node at most.
            Backend::Postgres(p, Some(bouncer)) => builder
                .storage(&Storage::through_pgbouncer(p, bouncer))
                .arg("--db-max-connections=4"),
            Backend::Cluster(c) => builder
                .args([
                    "--storage",
                    "redis",
                    "--redis-cluster",
                    "--redis-prefix=fleet:",
                ])
                .env("REDIS_URL", &c.urls),
        }
        .start()
    }

    fn usage(&self) -> Usage {
        match self {
            Backend::Redis(r, _) => redis_usage(&r.cli(&["INFO"])),
            Backend::Cluster(c) => c.ports[..3]
                .iter()
                .map(|p| redis_usage(&RedisCluster::cli(*p, &["INFO"])))
                .fold(
                    Usage {
                        cpu: Duration::ZERO,
                        bytes_out: Some(0),
                        connections: 0,
                    },
                    |sum, u| Usage {
                        cpu: sum.cpu + u.cpu,
                        bytes_out: sum.bytes_out.zip(u.bytes_out).map(|(a, b)| a + b),
                        connections: sum.connections + u.connections,
                    },
                ),
            Backend::Postgres(p, _) => {
                let connections = psql_on(
                    &p.url(),
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
                )
                .parse()
                .unwrap();
                Usage {
                    cpu: process_tree_cpu(p.pid()),
                    bytes_out: None,
                    connections,
                }
            }
        }
    }
}

/// What a Redis has used and sent so far, and its client connections now, from its `INFO`.
fn redis_usage(info: &str) -> Usage {
    let field = |name: &str| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in INFO"))
    };
    Usage {
        cpu: Duration::from_secs_f64(field("used_cpu_sys") + field("used_cpu_user")),
        bytes_out: Some(field("total_net_output_bytes") as u64),
        connections: field("connected_clients") as u64,
    }
}

/// The CPU time the replicas have used so far, all together.
fn replicas_cpu(backend: &Backend) -> Duration {
    match backend {
        Backend::Redis(_, replicas) => replicas
            .iter()
            .map(|r| redis_usage(&r.cli(&["INFO"])).cpu)
            .sum(),
        Backend::Postgres(..) | Backend::Cluster(_) => Duration::ZERO,
    }
}

/// The CPU time of `root` and its children, from /proc (the postmaster and its backends).
fn process_tree_cpu(root: u32) -> Duration {
    let ticks = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ... utime stime: fields after the closing parenthesis.
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let pid: u32 = head.split(' ').next().unwrap().parse().unwrap_or(0);
        let f: Vec<&str> = rest.split(' ').collect();
        let ppid: u32 = f[1].parse().unwrap_or(0);
        if pid == root || ppid == root {
            let utime: f64 = f[11].parse().unwrap_or(0.0);
            let stime: f64 = f[12].parse().unwrap_or(0.0);
            total += (utime + stime) / ticks;
        }
    }
    Duration::from_secs_f64(total)
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn options() -> Options {
    let mut o = Options {
        backend: "redis".into(),
        nodes: vec![1, 10, 50, 100],
        idle: Duration::from_secs(10),
        revocations: 300,
        rate: 100.0,
        replicas: 0,
        storm: false,
        throughput: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--backend" => o.backend = value(),
            "--nodes" => o.nodes = value().split(',').map(|n| n.parse().unwrap()).collect(),
            "--idle" => o.idle = Duration::from_secs(value().parse().unwrap()),
            "--revocations" => o.revocations = value().parse().unwrap(),
            "--rate" => o.rate = value().parse().unwrap(),
            "--replicas" => o.replicas = value().parse().unwrap(),
            "--storm" => o.storm = true,
            "--throughput" => o.throughput = Some(Duration::from_secs(value().parse().unwrap())),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

fn main() {
    let o = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "backend {}: idle over {:?}; {} revocations at {}/s through one node; {} feed replicas",
        o.backend, o.idle, o.revocations, o.rate, o.replicas
    );
    println!(
        "| N | connections | idle CPU per node | idle bytes/s per node | CPU per revocation | bytes per revocation | last node rejects (p50 / max) | node RSS (median) | each replica's CPU per revocation | CPU per CheckRateLimit | CPU per Validate miss |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &o.nodes {
        let backend = Backend::start(&o.backend, o.replicas);
        let nodes: Vec<Sidecar> = (0..n).map(|i| backend.node(i)).collect();
        for node in &nodes {
            node.wait_ops_status(200, Duration::from_secs(60));
        }
        // Let the heartbeats and feeds settle.
        std::thread::sleep(Duration::from_secs(3));
        let (before, replicas_before) = (backend.usage(), replicas_cpu(&backend));
        std::thread::sleep(o.idle);
        let (after, replicas_after) = (backend.usage(), replicas_cpu(&backend));
        let replicas_idle = (replicas_after - replicas_before).as_secs_f64() / o.idle.as_secs_f64();
        let idle_cpu = after.cpu.saturating_sub(before.cpu).as_secs_f64() / o.idle.as_secs_f64();
        let idle_bytes = after
            .bytes_out
            .zip(before.bytes_out)
            .map(|(a, b)| (a - b) as f64 / o.idle.as_secs_f64());
        let mut rss: Vec<u64> = nodes.iter().map(|s| rss_kib(s.pid())).collect();
        rss.sort();

        let (elapsed, spent, replicas_spent, staleness) =
            runtime.block_on(revoke(&o, &backend, &nodes));
        let replicas_spent = replicas_spent.as_secs_f64();
        let replica_per = (o.replicas > 0).then(|| {
            (replicas_spent - replicas_idle * elapsed.as_secs_f64()).max(0.0)
                / o.revocations as f64
                / o.replicas as f64
        });
        let cpu_per = (spent.cpu.as_secs_f64() - idle_cpu * elapsed.as_secs_f64()).max(0.0)
            / o.revocations as f64;
        let bytes_per = spent.bytes_out.map(|b| {
            (b as f64 - idle_bytes.unwrap() * elapsed.as_secs_f64()).max(0.0) / o.revocations as f64
        });
        let (limit_per, miss_per) = runtime.block_on(calls(&backend, &nodes[0], idle_cpu));
        let p50 = staleness[staleness.len() / 2];
        let max = staleness[staleness.len() - 1];
        println!(
            "| {n} | {} | {:.3} % | {} | {:.0} µs | {} | {:.1} / {:.1} ms | {:.1} MB | {} | {:.0} µs | {:.0} µs |",
            after.connections,
            idle_cpu * 100.0 / n as f64,
            idle_bytes.map_or("–".into(), |b| format!("{:.0}", b / n as f64)),
            cpu_per * 1e6,
            bytes_per.map_or("–".into(), |b| format!("{b:.0}")),
            p50.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            rss[rss.len() / 2] as f64 / 1024.0,
            replica_per.map_or("–".into(), |c| format!("{:.0} µs", c * 1e6)),
            limit_per * 1e6,
            miss_per * 1e6,
        );
        if let Some(seconds) = o.throughput {
            runtime.block_on(throughput(&nodes[0], seconds));
        }
        if o.storm {
            storm(&backend, nodes);
        }
        drop(backend);
    }
}

/// A rollout at its worst: every node stopped, then all started again as fast as this
/// process can spawn them. Prints how long until every node serves, the backend's CPU over
/// that time and the 3 s after, per node, and the most client connections seen.
fn storm(backend: &Backend, nodes: Vec<Sidecar>) {
    let n = nodes.len();
    drop(nodes);
    std::thread::sleep(Duration::from_secs(1));
    let (before, started) = (backend.usage(), Instant::now());
    let nodes: Vec<Sidecar> = (0..n).map(|i| backend.node(i)).collect();
    let mut peak = 0;
    for node in &nodes {
        node.wait_ops_status(200, Duration::from_secs(60));
        peak = peak.max(backend.usage().connections);
    }
    let serving = started.elapsed();
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle {
        peak = peak.max(backend.usage().connections);
        std::thread::sleep(Duration::from_millis(200));
    }
    let cpu = backend.usage().cpu.saturating_sub(before.cpu);
    println!(
        "restart of all {n} at once: every node serving after {:.1} s; backend CPU {:.0} ms \
         over {:.1} s ({:.2} ms per node); at most {peak} client connections",
        serving.as_secs_f64(),
        cpu.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64(),
        cpu.as_secs_f64() * 1e3 / n as f64,
    );
}

/// Revokes `o.revocations` tokens through the first node at `o.rate` a second: how long it
/// took and what the backend (and its replicas, together) spent meanwhile; then, for a sample of tokens, how long after
/// the Revoke's answer the last node rejected it.
async fn revoke(
    o: &Options,
    backend: &Backend,
    nodes: &[Sidecar],
) -> (Duration, Usage, Duration, Vec<Duration>) {
    let mut writer = nodes[0].client().await;
    let mut tokens = Vec::new();
    for i in 0..o.revocations {
        tokens.push(writer.issue(&format!("fleet-{i}")).await.token);
    }
    let (before, replicas_before) = (backend.usage(), replicas_cpu(backend));
    let started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / o.rate);
    for (i, token) in tokens.iter().enumerate() {
        tokio::time::sleep_until((started + gap * i as u32).into()).await;
        writer
            .revoke(pb::revoke_request::Target::Token(token.clone()))
            .await
            .expect("revoke");
    }
    let elapsed = started.elapsed();
    let (after, replicas_after) = (backend.usage(), replicas_cpu(backend));
    let spent = Usage {
        cpu: after.cpu.saturating_sub(before.cpu),
        bytes_out: after.bytes_out.zip(before.bytes_out).map(|(a, b)| a - b),
        connections: after.connections,
    };

    // Staleness: a token every node has validated (so every view holds it as valid), revoked
    // through the first node; each node is polled until it rejects.
    let mut readers: Vec<Client> = Vec::new();
    for node in nodes {
        readers.push(node.client().await);
    }
    let mut staleness = Vec::new();
    for i in 0..20 {
        let token = writer.issue(&format!("stale-{i}")).await.token;
        for r in readers.iter_mut() {
            r.assert_valid(&token).await;
        }
        writer
            .revoke(pb::revoke_request::Target::Token(token.clone()))
            .await
            .expect("revoke");
        let acked = Instant::now();
        let polls = readers.iter().map(|r| {
            let mut r = r.clone();
            let token = token.clone();
            tokio::spawn(async move {
                while r.validate(&token).await.expect("validate").valid {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                acked.elapsed()
            })
        });
        let mut last = Duration::ZERO;
        for p in polls.collect::<Vec<_>>() {
            last = last.max(p.await.unwrap());
        }
        staleness.push(last);
    }
    staleness.sort();
    (elapsed, spent, replicas_after - replicas_before, staleness)
}

/// The backend's CPU per allowed CheckRateLimit (distinct keys) and per Validate that misses
/// the view (a token the node has not seen), less the idle cost (`idle_cpu`, a share of a
/// core) of the same time: `CALLS` of each, one at a time, through `node`.
async fn calls(backend: &Backend, node: &Sidecar, idle_cpu: f64) -> (f64, f64) {
    let mut client = node.client().await;
    let mut api = client.0.clone();
    let cost = |before: Usage, started: Instant| {
        let spent = backend.usage().cpu.saturating_sub(before.cpu).as_secs_f64();
        (spent - idle_cpu * started.elapsed().as_secs_f64()).max(0.0) / CALLS as f64
    };
    let (before, started) = (backend.usage(), Instant::now());
    for i in 0..CALLS {
        let answer = api
            .check_rate_limit(pb::CheckRateLimitRequest {
                policy: POLICY.into(),
                key: format!("key-{i}"),
                cost: Some(1),
            })
            .await
            .expect("check rate limit")
            .into_inner();
        assert!(answer.allowed);
    }
    let limit = cost(before, started);

    let mut tokens = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        tokens.push(client.issue(&format!("miss-{i}")).await.token);
    }
    let (before, started) = (backend.usage(), Instant::now());
    for token in &tokens {
        client.assert_valid(token).await;
    }
    (limit, cost(before, started))
}

/// Validate of one token that `node` holds in its view, against grpc.health.v1 Check on the
/// same node: 64 calls in flight over 4 connections for `seconds` each, Check first; prints
/// both rates and their ratio.
async fn throughput(node: &Sidecar, seconds: Duration) {
    use tonic_health::pb::HealthCheckRequest;
    let mut client = node.client().await;
    let token = client.issue("throughput").await.token;
    client.assert_valid(&token).await;
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(node.channel().await);
    }
    let rate = async |validate: bool| {
        let until = Instant::now() + seconds;
        let mut callers = Vec::new();
        for i in 0..64 {
            let channel = channels[i % channels.len()].clone();
            let token = token.clone();
            callers.push(tokio::spawn(async move {
                let mut api = pb::token_service_client::TokenServiceClient::new(channel.clone());
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                let mut n = 0u64;
                while Instant::now() < until {
                    if validate {
                        let answer = api
                            .validate(pb::ValidateRequest {
                                token: token.clone(),
                                ..Default::default()
                            })
                            .await
                            .expect("validate")
                            .into_inner();
                        assert!(answer.valid);
                    } else {
                        health
                            .check(HealthCheckRequest::default())
                            .await
                            .expect("check");
                    }
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for c in callers {
            total += c.await.unwrap();
        }
        total as f64 / seconds.as_secs_f64()
    };
    let check = rate(false).await;
    let validate = rate(true).await;
    println!(
        "first node: Check {check:.0}/s, Validate (from the view) {validate:.0}/s: {:.2}× Check",
        validate / check
    );
}
