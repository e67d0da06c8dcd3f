//! A randomized fault test, in the manner of Jepsen: several nodes on one backend, each
//! reaching it through links of its own that inject faults ([`SlowLink`]); a seeded schedule
//! of faults (latency, a slow feed, frozen links, cuts, partitions, node restarts, a paused,
//! flushed or restarted Redis, a restarted PostgreSQL, killed feeds); concurrent workers that
//! record every call with the times it was sent and answered; and a checker of the invariants
//! the README documents:
//!
//! - **Revocation bound and read-your-writes.** Once a revocation (or a session end) is
//!   acknowledged, the node that wrote it never answers `valid` for the token again, and no
//!   node does for a call sent [`VIEW_BOUND`] after the acknowledgement (a node answers from
//!   its view only while its feed is proven live within that bound).
//! - **Nothing revoked that was not.** A token nobody asked to end is never `REVOKED`.
//! - **Limits never exceeded.** No rate-limit key is allowed more than the policy admits;
//!   calls that errored may have counted. On tiered, counters live in Redis only and go with
//!   its data, so a key is judged between two losses.
//! - **One refresh per token.** Every successful refresh of one token returns the same
//!   successor.
//! - **Nothing acknowledged is lost.** After the faults heal, and on tiered again after one
//!   more FLUSHALL, every node rejects every token whose end was acknowledged and accepts
//!   every token nobody asked to end.
//!
//! The schedule is the seed's; the timing of the calls is the machine's, so a seed replays the
//! same faults in the same order, not the same interleaving. `tests/faults.rs` runs it short on
//! every backend, and `benches/soak.rs` long. `AUTH_FAULT_LOGS=dir` keeps the nodes' logs.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use auth_sidecar::pb;
use auth_sidecar::pb::token_service_client::TokenServiceClient;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

use super::backends::{
    Backend, PostgresServer, RedisServer, SlowLink, Storage, cluster, free_port, psql_on,
};
use super::{Sidecar, SidecarBuilder, VIEW_BOUND};

/// The policy the workers count against: 10 per hour, so that a key gets one unit back every
/// six minutes.
const POLICY: &str = "fault=10/1h";
const BURST: u64 = 10;
const EMISSION: Duration = Duration::from_secs(360);

/// What one run is.
#[derive(Debug, Clone)]
pub struct Options {
    pub backend: Backend,
    pub nodes: usize,
    pub duration: Duration,
    pub seed: u64,
    /// The sidecar binary to run, when not this build's (to replay a seed on another build).
    pub binary: Option<PathBuf>,
}

impl Options {
    /// A run on `backend` with the given seed and length, unless `AUTH_FAULT_SEED`,
    /// `AUTH_FAULT_SECONDS` or `AUTH_FAULT_BIN` say otherwise.
    pub fn from_env(backend: Backend, seed: u64, seconds: u64) -> Options {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let number = |name: &str, default: u64| {
            var(name).map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} must be a number"))
            })
        };
        Options {
            backend,
            nodes: if backend == Backend::Memory { 1 } else { 3 },
            duration: Duration::from_secs(number("AUTH_FAULT_SECONDS", seconds)),
            seed: number("AUTH_FAULT_SEED", seed),
            binary: var("AUTH_FAULT_BIN").map(PathBuf::from),
        }
    }
}

/// What a run did and what the checker found.
#[derive(Debug)]
pub struct Report {
    pub options: Options,
    /// Calls made, by kind.
    pub calls: BTreeMap<&'static str, usize>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Each fault, when it began and on which node.
    pub schedule: Vec<String>,
    /// Revocations and session ends acknowledged.
    pub ends: usize,
    pub violations: Vec<String>,
}

impl Report {
    pub fn operations(&self) -> usize {
        self.calls.values().sum()
    }

    /// Panics with the violations and the seed that replays the schedule.
    pub fn assert_clean(&self) {
        assert!(self.violations.is_empty(), "{self}");
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "fault run: {:?}, {} nodes, {:?}, seed {} (replay: AUTH_FAULT_SEED={} AUTH_FAULT_SECONDS={})",
            o.backend,
            o.nodes,
            o.duration,
            o.seed,
            o.seed,
            o.duration.as_secs()
        )?;
        writeln!(
            f,
            "  {} calls {:?}; {} ends acknowledged",
            self.operations(),
            self.calls,
            self.ends
        )?;
        writeln!(f, "  faults {:?}", self.faults)?;
        writeln!(f, "  {} violations", self.violations.len())?;
        for v in self.violations.iter().take(20) {
            writeln!(f, "  ✗ {v}")?;
        }
        if !self.violations.is_empty() {
            writeln!(f, "  the schedule:")?;
            for line in &self.schedule {
                writeln!(f, "  {line}")?;
            }
        }
        Ok(())
    }
}

/// Starts the nodes, runs the workers under the schedule, heals, checks.
pub async fn run(options: Options) -> Report {
    let history = Arc::new(Mutex::new(History::default()));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (healed_tx, healed_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    // Every process of the run (nodes, servers, and those the faults start again) is a child
    // of this thread, whose end is their parent-death signal: it lives until the run is over.
    let keeper = std::thread::spawn({
        let history = history.clone();
        let options = options.clone();
        move || {
            let mut fleet = Fleet::start(&options);
            let started = Instant::now();
            let tiered = (options.backend == Backend::Tiered).then(|| fleet.redis_ports()[0]);
            let _ = started_tx.send((fleet.addrs(), tiered, started));
            let faults = fleet.schedule(&options, started, &history);
            fleet.heal();
            if let Ok(dir) = std::env::var("AUTH_FAULT_LOGS") {
                for (i, node) in fleet.nodes.iter().enumerate() {
                    let logs = node.sidecar.as_ref().map(|s| s.logs()).unwrap_or_default();
                    let _ = std::fs::write(format!("{dir}/node{i}.log"), logs.join("\n"));
                }
            }
            let _ = healed_tx.send(faults);
            let _ = done_rx.recv();
        }
    });
    let Ok((addrs, tiered, started)) = started_rx.await else {
        std::panic::resume_unwind(keeper.join().unwrap_err());
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    let kinds: [fn(Worker) -> _; 5] = [
        |w: Worker| tokio::spawn(w.revoking()),
        |w: Worker| tokio::spawn(w.sessions()),
        |w: Worker| tokio::spawn(w.validating()),
        |w: Worker| tokio::spawn(w.limiting()),
        |w: Worker| tokio::spawn(w.refreshing()),
    ];
    // Two revokers, two session workers, three validators, one limiter, one refresher.
    for (i, kind) in [0, 0, 1, 1, 2, 2, 2, 3, 4].into_iter().enumerate() {
        let worker = Worker {
            nodes: clients(&addrs),
            rng: StdRng::seed_from_u64(options.seed.wrapping_add(1 + i as u64)),
            history: history.clone(),
            stop: stop.clone(),
        };
        workers.push(kinds[kind](worker));
    }
    let healed = healed_rx.await;
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let Ok((faults, schedule)) = healed else {
        std::panic::resume_unwind(keeper.join().unwrap_err());
    };
    final_checks(&addrs, &history).await;
    // What was acknowledged must survive Redis losing everything, too.
    if let Some(port) = tiered {
        let sent = Instant::now();
        tokio::task::spawn_blocking(move || redis_cli(port, &["FLUSHALL"]))
            .await
            .unwrap();
        history.lock().unwrap().record(0, sent, What::Loss);
        final_checks(&addrs, &history).await;
    }
    let history = std::mem::take(&mut *history.lock().unwrap());
    let violations = check(&history, started.elapsed());
    drop(done_tx);
    tokio::task::spawn_blocking(move || keeper.join().unwrap())
        .await
        .unwrap();
    Report {
        options,
        calls: history.calls(),
        faults,
        schedule,
        ends: history.acknowledged_ends(),
        violations,
    }
}

// ---------------------------------------------------------------------------------------
// The nodes and their links.

struct Node {
    builder: SidecarBuilder,
    sidecar: Option<Sidecar>,
    api: String,
    /// The node's links: to Redis, to PostgreSQL, or both (tiered).
    links: Vec<SlowLink>,
}

impl Node {
    fn start(&mut self) {
        self.sidecar = None;
        // The port was just freed: a start may race its release, so try again.
        for _ in 0..50 {
            let sidecar = self.builder.clone().start();
            if sidecar.ops_get("/livez") == 200 {
                self.sidecar = Some(sidecar);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("node on {} did not start again", self.api);
    }

    fn wait_serving(&self) {
        if let Some(s) = &self.sidecar {
            s.wait_ops_status(200, Duration::from_secs(60));
        }
    }
}

/// The nodes, and the backend servers they share (throwaway ones, since faults flush, pause
/// and restart them). Nodes are declared first so that they stop before the servers.
struct Fleet {
    backend: Backend,
    nodes: Vec<Node>,
    redis: Option<RedisServer>,
    postgres: Option<PostgresServer>,
    /// The Redis Cluster's storage (the cluster is this test binary's).
    storage: Option<Storage>,
    cluster_ports: Vec<u16>,
}

impl Fleet {
    fn start(o: &Options) -> Fleet {
        assert!(
            o.backend != Backend::PgBouncer,
            "the fault test runs on PostgreSQL directly"
        );
        let uses_redis = matches!(o.backend, Backend::Redis | Backend::Tiered);
        let uses_postgres = matches!(o.backend, Backend::Postgres | Backend::Tiered);
        let redis = uses_redis.then(RedisServer::start);
        let postgres = uses_postgres.then(PostgresServer::start);
        let storage = (o.backend == Backend::RedisCluster).then(|| Storage::new(o.backend));
        let cluster_ports = storage
            .as_ref()
            .map(|_| {
                cluster()
                    .urls
                    .split(',')
                    .map(|u| u.rsplit(':').next().unwrap().parse().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        let mut nodes = Vec::new();
        for _ in 0..o.nodes {
            let api = format!("127.0.0.1:{}", free_port());
            // Access tokens outlive the run, so that the last checks find none expired.
            let mut builder = Sidecar::builder()
                .listen(api.clone())
                .arg(format!("--rate-limit={POLICY}"))
                .arg(format!("--access-ttl={}s", o.duration.as_secs() + 600));
            if let Some(bin) = &o.binary {
                builder = builder.binary(bin);
            }
            let mut links = Vec::new();
            match o.backend {
                Backend::Memory => builder = builder.args(["--storage", "memory"]),
                Backend::RedisCluster => builder = builder.storage(storage.as_ref().unwrap()),
                _ => {
                    let storage = if o.backend == Backend::Tiered {
                        "tiered"
                    } else if uses_redis {
                        "redis"
                    } else {
                        "postgres"
                    };
                    builder = builder.args(["--storage", storage]);
                    if let Some(r) = &redis {
                        let link = SlowLink::to(r.port, Duration::ZERO);
                        builder = builder
                            .env("REDIS_URL", format!("redis://127.0.0.1:{}", link.port))
                            .arg("--redis-prefix=f:");
                        links.push(link);
                    }
                    if let Some(p) = &postgres {
                        let link = SlowLink::to(p.port, Duration::ZERO);
                        builder = builder.env(
                            "DATABASE_URL",
                            format!("postgres://postgres@127.0.0.1:{}/postgres", link.port),
                        );
                        links.push(link);
                    }
                }
            }
            let mut node = Node {
                builder,
                sidecar: None,
                api,
                links,
            };
            node.start();
            nodes.push(node);
        }
        for node in &nodes {
            node.wait_serving();
        }
        Fleet {
            backend: o.backend,
            nodes,
            redis,
            postgres,
            storage,
            cluster_ports,
        }
    }

    fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.api.clone()).collect()
    }

    /// The kinds of fault this backend can be given.
    fn menu(&self) -> Vec<Fault> {
        use Fault::*;
        // What a node's own links and process can suffer, on every backend it has links to.
        const LINK_FAULTS: [Fault; 6] = [Latency, FeedDelay, Freeze, Cut, Partition, RestartNode];
        match self.backend {
            Backend::Memory => vec![Quiet],
            Backend::PgBouncer => unreachable!("refused at start"),
            Backend::RedisCluster => vec![RestartNode, PauseRedis, KillConnections],
            Backend::Redis => [LINK_FAULTS.as_slice(), &[PauseRedis, KillFeeds]].concat(),
            Backend::Postgres => [LINK_FAULTS.as_slice(), &[KillFeeds, RestartPostgres]].concat(),
            // Weighted towards what endangers tiered most: a flush while links are slow or
            // frozen.
            Backend::Tiered => vec![
                Latency,
                Latency,
                FeedDelay,
                Freeze,
                Freeze,
                Cut,
                Partition,
                RestartNode,
                PauseRedis,
                KillFeeds,
                Flush,
                Flush,
                Flush,
                DoubleFlush,
                RestartRedis,
                RestartPostgres,
            ],
        }
    }

    /// Injects faults until the run's time is up; returns how many of each, and each one.
    fn schedule(
        &mut self,
        o: &Options,
        started: Instant,
        history: &Mutex<History>,
    ) -> (BTreeMap<&'static str, usize>, Vec<String>) {
        let mut rng = StdRng::seed_from_u64(o.seed);
        let menu = self.menu();
        if menu.contains(&Fault::Latency) {
            for node in &self.nodes {
                for link in &node.links {
                    link.set_delay(latency(&mut rng));
                }
            }
        }
        let mut count = BTreeMap::new();
        let mut log = Vec::new();
        while started.elapsed() < o.duration {
            std::thread::sleep(Duration::from_millis(rng.random_range(100..800)));
            let fault = *menu.choose(&mut rng).unwrap();
            *count.entry(fault.name()).or_insert(0) += 1;
            let node = rng.random_range(0..self.nodes.len());
            log.push(format!(
                "{:>7.3}s {} node {node}",
                started.elapsed().as_secs_f64(),
                fault.name()
            ));
            match fault {
                Fault::Freeze | Fault::Partition => {
                    let link = rng.random_range(0..self.nodes[node].links.len());
                    let hold = Duration::from_millis(rng.random_range(200..3000));
                    let set = |fleet: &Fleet, on: bool| {
                        let l = &fleet.nodes[node].links[link];
                        match (fault, on) {
                            (Fault::Freeze, true) => l.freeze(),
                            (Fault::Freeze, false) => l.thaw(),
                            (_, on) => l.partition(on),
                        }
                    };
                    set(self, true);
                    let before =
                        Duration::from_millis(rng.random_range(0..hold.as_millis() as u64));
                    std::thread::sleep(before);
                    // Half the time, a second fault while this one holds.
                    if rng.random_bool(0.5) {
                        let inner = if self.backend == Backend::Tiered && rng.random_bool(0.5) {
                            Fault::Flush
                        } else {
                            *menu.choose(&mut rng).unwrap()
                        };
                        if inner.is_instant() {
                            *count.entry(inner.name()).or_insert(0) += 1;
                            let other = rng.random_range(0..self.nodes.len());
                            log.push(format!(
                                "{:>7.3}s   within it: {} node {other}",
                                started.elapsed().as_secs_f64(),
                                inner.name()
                            ));
                            self.instant(inner, other, &mut rng, history);
                        }
                    }
                    std::thread::sleep(hold - before);
                    set(self, false);
                }
                f => self.instant(f, node, &mut rng, history),
            }
        }
        (count, log)
    }

    /// A fault that takes effect at once (latency stays until the next latency fault).
    fn instant(&mut self, fault: Fault, node: usize, rng: &mut StdRng, history: &Mutex<History>) {
        let links = &self.nodes[node].links;
        match fault {
            Fault::Quiet | Fault::Freeze | Fault::Partition => {}
            Fault::Latency => {
                let link = links.choose(rng).unwrap();
                link.set_delay(latency(rng));
            }
            Fault::FeedDelay => {
                let link = links.choose(rng).unwrap();
                let ms = if rng.random_bool(0.33) {
                    0
                } else {
                    rng.random_range(1..400)
                };
                link.set_feed_delay(Duration::from_millis(ms));
            }
            Fault::Cut => links.choose(rng).unwrap().cut(),
            Fault::RestartNode => self.nodes[node].start(),
            Fault::PauseRedis => {
                let ms = rng.random_range(50..900).to_string();
                if let Some(port) = self.redis_ports().choose(rng) {
                    redis_cli(*port, &["CLIENT", "PAUSE", &ms, "ALL"]);
                }
            }
            Fault::KillFeeds => {
                if let Some(r) = &self.redis {
                    for id in client_ids(r.port, "name=auth-sidecar-feed") {
                        redis_cli(r.port, &["CLIENT", "KILL", "ID", &id]);
                    }
                }
                if let Some(p) = &self.postgres {
                    psql_on(
                        &p.url(),
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                         WHERE application_name = 'auth-sidecar feed'",
                    );
                }
            }
            Fault::KillConnections => {
                let port = *self.cluster_ports.choose(rng).unwrap();
                redis_cli(port, &["CLIENT", "KILL", "TYPE", "normal"]);
            }
            Fault::Flush => self.lose_redis(history, |r| {
                r.cli(&["FLUSHALL"]);
            }),
            Fault::DoubleFlush => {
                let gap = Duration::from_millis(rng.random_range(20..400));
                self.lose_redis(history, |r| {
                    r.cli(&["FLUSHALL"]);
                });
                std::thread::sleep(gap);
                self.lose_redis(history, |r| {
                    r.cli(&["FLUSHALL"]);
                });
            }
            Fault::RestartRedis => self.lose_redis(history, |r| {
                r.kill();
                r.restart();
            }),
            Fault::RestartPostgres => {
                let p = self.postgres.as_mut().unwrap();
                p.kill();
                p.restart();
            }
        }
    }

    /// Runs `lose` on the Redis, recording that its data went.
    fn lose_redis(&mut self, history: &Mutex<History>, lose: impl FnOnce(&mut RedisServer)) {
        let sent = Instant::now();
        lose(self.redis.as_mut().unwrap());
        history.lock().unwrap().record(0, sent, What::Loss);
    }

    fn redis_ports(&self) -> Vec<u16> {
        match &self.redis {
            Some(r) => vec![r.port],
            None => self.cluster_ports.clone(),
        }
    }

    /// Ends every fault; waits until every node serves.
    fn heal(&mut self) {
        for node in &self.nodes {
            for link in &node.links {
                link.thaw();
                link.partition(false);
                link.set_delay(Duration::ZERO);
            }
        }
        for port in self.redis_ports() {
            redis_cli(port, &["CLIENT", "UNPAUSE"]);
        }
        for node in &self.nodes {
            node.wait_serving();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Nothing (memory has no backend to break).
    Quiet,
    /// Every chunk on one of a node's links held up to 20 ms (a few mostly), until the next
    /// latency fault on it. Every link starts with such a delay.
    Latency,
    /// What a node's change feed receives held up to 400 ms.
    FeedDelay,
    /// A link that carries nothing for up to 3 s, its connections left open.
    Freeze,
    /// A link's connections closed.
    Cut,
    /// A link that closes every connection for up to 3 s.
    Partition,
    /// A node killed (SIGKILL) and started again.
    RestartNode,
    /// `CLIENT PAUSE … ALL` for up to 0.9 s.
    PauseRedis,
    /// The feeds' connections killed on the backend's side.
    KillFeeds,
    /// Every client connection of a cluster master killed.
    KillConnections,
    Flush,
    /// Two FLUSHALLs up to 0.4 s apart.
    DoubleFlush,
    /// Redis killed and started again, empty.
    RestartRedis,
    /// PostgreSQL killed and started again (it keeps what it committed).
    RestartPostgres,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Quiet => "quiet",
            Fault::Latency => "latency",
            Fault::FeedDelay => "feed_delay",
            Fault::Freeze => "freeze",
            Fault::Cut => "cut",
            Fault::Partition => "partition",
            Fault::RestartNode => "restart_node",
            Fault::PauseRedis => "pause_redis",
            Fault::KillFeeds => "kill_feeds",
            Fault::KillConnections => "kill_connections",
            Fault::Flush => "flushall",
            Fault::DoubleFlush => "double_flushall",
            Fault::RestartRedis => "restart_redis",
            Fault::RestartPostgres => "restart_postgres",
        }
    }

    /// Whether it can happen inside another fault's hold.
    fn is_instant(self) -> bool {
        !matches!(self, Fault::Freeze | Fault::Partition | Fault::Quiet)
    }
}

/// A one-way delay: none a fifth of the time, a few milliseconds mostly, up to 20 ms.
fn latency(rng: &mut StdRng) -> Duration {
    let us = match rng.random_range(0..10) {
        0 | 1 => 0,
        2..=7 => rng.random_range(200..5_000),
        _ => rng.random_range(5_000..20_000),
    };
    Duration::from_micros(us)
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The ids of the Redis clients whose `CLIENT LIST` line contains `needle`.
fn client_ids(port: u16, needle: &str) -> Vec<String> {
    redis_cli(port, &["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| Some(l.split_whitespace().next()?.strip_prefix("id=")?.to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The history.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    Valid,
    Rejected(pb::InvalidReason),
    Failed(tonic::Code),
}

#[derive(Debug, Clone)]
enum What {
    /// Revoke of a token, or DeleteSession of the one session a token is bound to.
    End {
        token: usize,
        ok: bool,
    },
    Validate {
        token: usize,
        answer: Answer,
        last: bool,
    },
    Check {
        key: u64,
        allowed: Option<bool>,
    },
    Refresh {
        family: usize,
        step: usize,
        successor: Option<String>,
    },
    /// Other calls, counted only.
    Other(&'static str),
    /// Redis lost its data (a FLUSHALL or a restart).
    Loss,
}

#[derive(Debug, Clone)]
struct Event {
    node: usize,
    sent: Instant,
    answered: Instant,
    what: What,
}

#[derive(Default)]
struct History {
    /// Tokens the workers validate.
    tokens: Vec<String>,
    /// Whether each is bound to a session (which is ended rather than the token revoked).
    bound: Vec<bool>,
    /// Tokens whose end was asked for, the newest last.
    ended: Vec<usize>,
    /// Whether each token's end was asked for.
    asked: Vec<bool>,
    events: Vec<Event>,
}

impl History {
    fn record(&mut self, node: usize, sent: Instant, what: What) {
        self.events.push(Event {
            node,
            sent,
            answered: Instant::now(),
            what,
        });
    }

    fn add_token(&mut self, token: String, bound: bool) -> usize {
        self.tokens.push(token);
        self.bound.push(bound);
        self.asked.push(false);
        self.tokens.len() - 1
    }

    /// Marks `token` as one whose end is asked for, before the call is sent.
    fn ending(&mut self, token: usize) {
        self.asked[token] = true;
        self.ended.push(token);
    }

    fn calls(&self) -> BTreeMap<&'static str, usize> {
        let mut calls = BTreeMap::new();
        for e in &self.events {
            let kind = match e.what {
                What::End { .. } => "end",
                What::Validate { .. } => "validate",
                What::Check { .. } => "check_rate_limit",
                What::Refresh { .. } => "refresh",
                What::Other(kind) => kind,
                What::Loss => continue,
            };
            *calls.entry(kind).or_insert(0) += 1;
        }
        calls
    }

    fn acknowledged_ends(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e.what, What::End { ok: true, .. }))
            .count()
    }
}

// ---------------------------------------------------------------------------------------
// The workers.

/// One client per node, each on a connection of its own that reconnects after a restart.
fn clients(addrs: &[String]) -> Vec<TokenServiceClient<Channel>> {
    addrs
        .iter()
        .map(|a| {
            let channel = auth_sidecar::client::endpoint(a)
                .unwrap()
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(10))
                .connect_lazy();
            TokenServiceClient::new(channel)
        })
        .collect()
}

struct Worker {
    nodes: Vec<TokenServiceClient<Channel>>,
    rng: StdRng,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn running(&self) -> bool {
        !self.stop.load(Ordering::SeqCst)
    }

    fn node(&mut self) -> usize {
        self.rng.random_range(0..self.nodes.len())
    }

    fn record(&self, node: usize, sent: Instant, what: What) {
        self.history.lock().unwrap().record(node, sent, what);
    }

    async fn issue(&mut self, node: usize, req: pb::IssueRequest) -> Option<pb::IssueResponse> {
        let sent = Instant::now();
        let answer = self.nodes[node].issue(req).await;
        self.record(node, sent, What::Other("issue"));
        answer.ok().map(|r| r.into_inner())
    }

    async fn validate(&mut self, node: usize, token: usize) -> Answer {
        let text = self.history.lock().unwrap().tokens[token].clone();
        let sent = Instant::now();
        let answer = ask(&mut self.nodes[node], text).await;
        self.record(
            node,
            sent,
            What::Validate {
                token,
                answer,
                last: false,
            },
        );
        answer
    }

    /// Issues tokens, validates each once (so that views hold it), and revokes it.
    async fn revoking(mut self) {
        let mut n = 0u64;
        while self.running() {
            n += 1;
            let node = self.node();
            let subject = format!("r{}-{n}", self.rng.random::<u32>());
            let Some(issued) = self.issue(node, subject_only(&subject)).await else {
                continue;
            };
            let token = self
                .history
                .lock()
                .unwrap()
                .add_token(issued.token.clone(), false);
            let node = self.node();
            self.validate(node, token).await;
            // A third of the tokens stay live.
            if self.rng.random_bool(0.33) {
                continue;
            }
            let node = self.node();
            self.history.lock().unwrap().ending(token);
            let sent = Instant::now();
            let ok = self.nodes[node]
                .revoke(pb::RevokeRequest {
                    target: Some(pb::revoke_request::Target::Token(issued.token)),
                    reason: "fault test".into(),
                })
                .await
                .is_ok();
            self.record(node, sent, What::End { token, ok });
        }
    }

    /// Creates sessions with a token bound to each, touches them, and ends most of them.
    async fn sessions(mut self) {
        let mut n = 0u64;
        while self.running() {
            n += 1;
            let node = self.node();
            let sent = Instant::now();
            let created = self.nodes[node]
                .create_session(pb::CreateSessionRequest {
                    subject: format!("s{}-{n}", self.rng.random::<u32>()),
                    ..Default::default()
                })
                .await;
            self.record(node, sent, What::Other("create_session"));
            let Some(session) = created.ok().and_then(|r| r.into_inner().session) else {
                continue;
            };
            let Some(issued) = self
                .issue(
                    node,
                    pb::IssueRequest {
                        subject: session.subject.clone(),
                        session_id: session.id.clone(),
                        ..Default::default()
                    },
                )
                .await
            else {
                continue;
            };
            let token = self.history.lock().unwrap().add_token(issued.token, true);
            for _ in 0..self.rng.random_range(1..=3) {
                let node = self.node();
                self.validate(node, token).await;
                let node = self.node();
                let sent = Instant::now();
                let _ = self.nodes[node]
                    .touch_session(pb::TouchSessionRequest {
                        session_id: session.id.clone(),
                    })
                    .await;
                self.record(node, sent, What::Other("touch_session"));
            }
            if self.rng.random_bool(0.3) {
                continue;
            }
            let node = self.node();
            self.history.lock().unwrap().ending(token);
            let sent = Instant::now();
            let ok = self.nodes[node]
                .delete_session(pb::DeleteSessionRequest {
                    session_id: session.id,
                })
                .await
                .is_ok();
            self.record(node, sent, What::End { token, ok });
        }
    }

    /// Validates tokens: mostly ones ended lately (where a stale answer would show), some
    /// live ones, some of any age.
    async fn validating(mut self) {
        while self.running() {
            let token = {
                let h = self.history.lock().unwrap();
                let recent = |n: usize| &h.ended[h.ended.len().saturating_sub(n)..];
                let roll = self.rng.random_range(0..100);
                if roll < 40 && !h.ended.is_empty() {
                    recent(50).choose(&mut self.rng).copied()
                } else if roll < 70 && !h.ended.is_empty() {
                    recent(500).choose(&mut self.rng).copied()
                } else if roll < 85 && !h.tokens.is_empty() {
                    // A live one: most tokens are ended, so a few draws find one.
                    (0..8)
                        .map(|_| self.rng.random_range(0..h.tokens.len()))
                        .find(|t| !h.asked[*t])
                } else {
                    (!h.tokens.is_empty()).then(|| self.rng.random_range(0..h.tokens.len()))
                }
            };
            let Some(token) = token else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let node = self.node();
            self.validate(node, token).await;
        }
    }

    /// Checks rate limits, a new key every 30 calls or so.
    async fn limiting(mut self) {
        let mut key = 0u64;
        while self.running() {
            if self.rng.random_range(0..30) == 0 {
                key += 1;
            }
            let node = self.node();
            let sent = Instant::now();
            let allowed = self.nodes[node]
                .check_rate_limit(pb::CheckRateLimitRequest {
                    policy: "fault".into(),
                    key: format!("k{key}"),
                    cost: None,
                })
                .await
                .ok()
                .map(|r| r.into_inner().allowed);
            self.record(node, sent, What::Check { key, allowed });
        }
    }

    /// Refreshes a family a few steps, each step's token from up to three nodes at once.
    async fn refreshing(mut self) {
        let mut family = 0;
        while self.running() {
            family += 1;
            let node = self.node();
            let subject = format!("f{}-{family}", self.rng.random::<u32>());
            let issued = self
                .issue(
                    node,
                    pb::IssueRequest {
                        subject,
                        kind: pb::TokenKind::Refresh as i32,
                        ..Default::default()
                    },
                )
                .await;
            let Some(mut token) = issued.map(|i| i.token) else {
                continue;
            };
            for step in 0..4 {
                let tries = self.rng.random_range(1..=3);
                let calls = (0..tries).map(|_| {
                    let node = self.node();
                    let mut client = self.nodes[node].clone();
                    let token = token.clone();
                    async move {
                        let sent = Instant::now();
                        let answer = client
                            .refresh(pb::RefreshRequest {
                                refresh_token: token,
                            })
                            .await;
                        (node, sent, answer.ok().and_then(|r| r.into_inner().refresh))
                    }
                });
                let answers = join_all(calls.collect()).await;
                let mut next = None;
                for (node, sent, successor) in answers {
                    let id = successor.as_ref().map(|s| s.token_id.clone());
                    self.record(
                        node,
                        sent,
                        What::Refresh {
                            family,
                            step,
                            successor: id,
                        },
                    );
                    next = next.or(successor.map(|s| s.token));
                }
                match next {
                    Some(t) => token = t,
                    None => break,
                }
            }
        }
    }
}

/// Validates `token` on `client`'s node.
async fn ask(client: &mut TokenServiceClient<Channel>, token: String) -> Answer {
    let req = pb::ValidateRequest {
        token,
        ..Default::default()
    };
    match client.validate(req).await {
        Ok(r) if r.get_ref().valid => Answer::Valid,
        Ok(r) => Answer::Rejected(r.get_ref().reason()),
        Err(status) => Answer::Failed(status.code()),
    }
}

fn subject_only(subject: &str) -> pb::IssueRequest {
    pb::IssueRequest {
        subject: subject.into(),
        ..Default::default()
    }
}

/// Runs the futures concurrently, each on a task of its own; their outputs in order.
async fn join_all<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for h in handles {
        outputs.push(h.await.expect("a task of the fault run"));
    }
    outputs
}

/// After the faults: every token, on every node, once more (a failed call retried), recorded
/// as the last word.
async fn final_checks(addrs: &[String], history: &Mutex<History>) {
    let tokens: Vec<(usize, String)> = {
        let h = history.lock().unwrap();
        h.tokens.iter().cloned().enumerate().collect()
    };
    tokio::time::sleep(VIEW_BOUND + Duration::from_millis(100)).await;
    let tokens = Arc::new(tokens);
    let mut tasks = Vec::new();
    // Four callers per node, each on a quarter of the tokens.
    for (node, client) in clients(addrs).into_iter().enumerate() {
        for part in 0..4 {
            let tokens = tokens.clone();
            let client = client.clone();
            tasks.push(async move {
                let mut client = client;
                let mut events = Vec::new();
                for (token, text) in tokens.iter().skip(part).step_by(4) {
                    let mut tries = 0;
                    loop {
                        let sent = Instant::now();
                        let answer = ask(&mut client, text.clone()).await;
                        tries += 1;
                        if matches!(answer, Answer::Failed(_)) && tries < 20 {
                            tokio::time::sleep(Duration::from_millis(250)).await;
                            continue;
                        }
                        events.push(Event {
                            node,
                            sent,
                            answered: Instant::now(),
                            what: What::Validate {
                                token: *token,
                                answer,
                                last: true,
                            },
                        });
                        break;
                    }
                }
                events
            });
        }
    }
    for events in join_all(tasks).await {
        history.lock().unwrap().events.extend(events);
    }
}

// ---------------------------------------------------------------------------------------
// The checker.

/// Every violation of the invariants in `h`, a run of `length`.
fn check(h: &History, length: Duration) -> Vec<String> {
    let mut violations = Vec::new();
    let ms = |d: Duration| d.as_millis();

    // When each token's end was first asked for, and first acknowledged (and where).
    let mut asked: HashMap<usize, Instant> = HashMap::new();
    let mut acknowledged: HashMap<usize, (Instant, usize)> = HashMap::new();
    for e in &h.events {
        if let What::End { token, ok } = e.what {
            let first = asked.entry(token).or_insert(e.sent);
            *first = (*first).min(e.sent);
            if ok {
                let ack = acknowledged.entry(token).or_insert((e.answered, e.node));
                if e.answered < ack.0 {
                    *ack = (e.answered, e.node);
                }
            }
        }
    }

    for e in &h.events {
        let What::Validate {
            token: id,
            answer,
            last,
        } = e.what
        else {
            continue;
        };
        let when = if last {
            "after the faults healed, "
        } else {
            ""
        };
        let token = if h.bound[id] {
            format!("the session of token {id}")
        } else {
            format!("token {id}")
        };
        match answer {
            Answer::Valid => {
                let Some(&(at, writer)) = acknowledged.get(&id) else {
                    continue;
                };
                if e.sent < at {
                    continue;
                }
                let after = e.sent - at;
                if e.node == writer {
                    violations.push(format!(
                        "{when}node {} answered valid for {token} {} ms after its own \
                         end of it was acknowledged",
                        e.node,
                        ms(after)
                    ));
                } else if after >= VIEW_BOUND {
                    violations.push(format!(
                        "{when}node {} answered valid for {token} {} ms after node \
                         {writer} acknowledged its end (bound {} ms)",
                        e.node,
                        ms(after),
                        ms(VIEW_BOUND)
                    ));
                }
            }
            Answer::Rejected(pb::InvalidReason::Revoked) => {
                if asked.get(&id).is_none_or(|&t| e.answered < t) {
                    violations.push(format!(
                        "{when}node {} answered REVOKED for {token}, whose end nobody \
                         had asked for",
                        e.node
                    ));
                }
            }
            Answer::Rejected(reason) => violations.push(format!(
                "{when}node {} rejected {token} as {reason:?}",
                e.node
            )),
            Answer::Failed(code) if last => violations.push(format!(
                "after the faults healed, node {} could not validate {token}: {code:?}",
                e.node
            )),
            Answer::Failed(_) => {}
        }
    }

    // Rate limits: between two losses of Redis's data (tiered), the calls that surely fell
    // inside may not have been allowed more than the policy admits over the run.
    let losses: Vec<(Instant, Instant)> = h
        .events
        .iter()
        .filter(|e| matches!(e.what, What::Loss))
        .map(|e| (e.sent, e.answered))
        .collect();
    let most = BURST + length.as_secs().div_ceil(EMISSION.as_secs());
    let mut allowed: BTreeMap<(u64, usize), u64> = BTreeMap::new();
    for e in &h.events {
        if let What::Check {
            key,
            allowed: Some(true),
        } = e.what
        {
            // The epoch: how many losses surely came before; skipped when one may overlap.
            let before = losses.iter().filter(|l| l.1 <= e.sent).count();
            let overlaps = losses.iter().any(|l| l.1 > e.sent && l.0 < e.answered);
            if !overlaps {
                *allowed.entry((key, before)).or_insert(0) += 1;
            }
        }
    }
    for ((key, epoch), n) in allowed {
        if n > most {
            violations.push(format!(
                "rate-limit key k{key} allowed {n} times (epoch {epoch}), more than {most}"
            ));
        }
    }

    // One refresh per token: every success for one step of a family names one successor.
    let mut successors: BTreeMap<(usize, usize), Vec<&str>> = BTreeMap::new();
    for e in &h.events {
        if let What::Refresh {
            family,
            step,
            successor: Some(ref id),
        } = e.what
        {
            successors.entry((family, step)).or_default().push(id);
        }
    }
    for ((family, step), mut ids) in successors {
        ids.sort();
        ids.dedup();
        if ids.len() > 1 {
            violations.push(format!(
                "refresh family {family} step {step}: one token refreshed into {} successors",
                ids.len()
            ));
        }
    }
    violations
}
