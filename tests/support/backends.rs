//! Real backends for the tests, none of them the machine's own: each test binary starts one
//! Redis and one PostgreSQL (initdb with trust auth, in a temporary directory) on free ports,
//! which its behaviour suites share, each test under names of its own (a key prefix, a fresh
//! database). Tests that stop, kill or flush a backend start a throwaway server of their own.
//! A six-node Redis Cluster, and a PgBouncer in transaction mode in front of the PostgreSQL,
//! are started once per test binary too.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::now_nanos;

/// The URL of this test binary's shared Redis, started on first use.
pub fn shared_redis() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        kept_alive(|| {
            let server = RedisServer::start();
            (server.url(), server)
        })
    })
}

/// The URL (without a database) of this test binary's shared PostgreSQL, started on first use.
pub fn shared_postgres() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        kept_alive(|| {
            remove_stale_postgres_dirs();
            let server = PostgresServer::start();
            (
                format!("postgres://postgres@127.0.0.1:{}", server.port),
                server,
            )
        })
    })
}

/// The URL (without a database) of a PgBouncer in `pool_mode = transaction` in front of this
/// test binary's shared PostgreSQL, started on first use.
pub fn shared_pgbouncer() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let postgres = shared_postgres().to_owned();
        kept_alive(move || {
            let bouncer = PgBouncer::start(&postgres);
            (bouncer.url(), bouncer)
        })
    })
}

/// Debian's PgBouncer in transaction mode, trusting every user, in a temporary directory.
pub struct PgBouncer {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PgBouncer {
    /// In front of the PostgreSQL at `postgres_url` (without a database), with at most 20
    /// server connections per database and user.
    pub fn start(postgres_url: &str) -> PgBouncer {
        let (uid, gid) = (id("-u"), id("-g"));
        let dir = tempfile::tempdir().unwrap();
        chown(dir.path(), uid, gid);
        let upstream_port = postgres_url.rsplit(':').next().unwrap();
        let port = free_port();
        let ini = dir.path().join("pgbouncer.ini");
        let users = dir.path().join("users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            &ini,
            format!(
                "[databases]\n* = host=127.0.0.1 port={upstream_port}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = trust\nauth_file = {}\n\
                 pool_mode = transaction\nmax_client_conn = 500\ndefault_pool_size = 20\n",
                users.display()
            ),
        )
        .unwrap();
        let child = die_with_parent(
            Command::new(pgbouncer_bin())
                .arg(&ini)
                .uid(uid)
                .gid(gid)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .spawn()
        .expect("spawn pgbouncer");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "pgbouncer did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        PgBouncer {
            port,
            child,
            _dir: dir,
        }
    }
}

impl PgBouncer {
    /// Its URL, without a database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pgbouncer_bin() -> &'static str {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("pgbouncer is installed (scripts/test installs it)")
}

/// Removes the directories of throwaway PostgreSQL servers that are gone: a kept-alive server
/// dies with its test binary, and its `Drop`, which would remove the directory, never runs.
fn remove_stale_postgres_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(PG_DIR_PREFIX));
        let pid = std::fs::read_to_string(path.join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok());
        let running = pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        // A directory without a pid file may be one being made now: leave it unless it is old.
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(3600));
        if ours && !running && (pid.is_some() || old) {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Starts a server from a thread that lives as long as the test binary, so that the server
/// (which dies with the thread that spawned it) serves every test and dies with the binary.
fn kept_alive<T: 'static>(start: impl FnOnce() -> (String, T) + Send + 'static) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (url, server) = start();
        tx.send(url).unwrap();
        let _keep = server;
        loop {
            std::thread::park();
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("shared server started")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    RedisCluster,
    Postgres,
    /// PostgreSQL through PgBouncer in transaction mode; migrations go direct.
    PgBouncer,
    Tiered,
}

/// The storage settings of a group of sidecars that share state; drops its database.
pub struct Storage {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    database: Option<String>,
}

impl Storage {
    /// Fresh, isolated storage of the given kind on the shared servers.
    pub fn new(backend: Backend) -> Storage {
        let id = format!("t{}", now_nanos());
        let mut s = Storage {
            args: vec!["--storage".into(), format!("{backend:?}").to_lowercase()],
            env: Vec::new(),
            database: None,
        };
        match backend {
            Backend::Memory => {
                s.args = vec!["--storage".into(), "memory".into()];
            }
            Backend::Redis => s.redis(shared_redis(), &id),
            Backend::RedisCluster => {
                s.args = vec!["--storage".into(), "redis".into()];
                s.redis(&cluster().urls, &id);
                s.env.push(("AUTH_REDIS_CLUSTER".into(), "true".into()));
            }
            Backend::Postgres => s.postgres(&id),
            Backend::PgBouncer => {
                s.args = vec!["--storage".into(), "postgres".into()];
                s.postgres(&id);
                let direct = s.database_url();
                s.env.retain(|(k, _)| k != "DATABASE_URL");
                s.env.extend([
                    (
                        "DATABASE_URL".into(),
                        format!("{}/{id}", shared_pgbouncer()),
                    ),
                    ("DATABASE_MIGRATE_URL".into(), direct),
                    ("AUTH_DB_TRANSACTION_POOLING".into(), "true".into()),
                ]);
            }
            Backend::Tiered => {
                s.args = vec!["--storage".into(), "tiered".into()];
                s.redis(shared_redis(), &id);
                s.postgres(&id);
            }
        }
        s
    }

    /// Storage on a throwaway Redis.
    pub fn on_redis(server: &RedisServer) -> Storage {
        let mut s = Storage {
            args: vec!["--storage".into(), "redis".into()],
            env: Vec::new(),
            database: None,
        };
        s.redis(&server.url(), "t:");
        s
    }

    /// Tiered storage on a throwaway Redis in front of the shared PostgreSQL, in a database
    /// of its own.
    pub fn tiered_on(server: &RedisServer) -> Storage {
        let id = format!("t{}", now_nanos());
        let mut s = Storage {
            args: vec!["--storage".into(), "tiered".into()],
            env: Vec::new(),
            database: None,
        };
        s.redis(&server.url(), &id);
        s.postgres(&id);
        s
    }

    /// Storage on a throwaway PostgreSQL.
    pub fn on_postgres(server: &PostgresServer) -> Storage {
        Storage {
            args: vec!["--storage".into(), "postgres".into()],
            env: vec![("DATABASE_URL".into(), server.url())],
            database: None,
        }
    }

    /// Storage on a throwaway PostgreSQL through `bouncer` in transaction mode; migrations go
    /// direct.
    pub fn through_pgbouncer(server: &PostgresServer, bouncer: &PgBouncer) -> Storage {
        Storage {
            args: vec!["--storage".into(), "postgres".into()],
            env: vec![
                ("DATABASE_URL".into(), format!("{}/postgres", bouncer.url())),
                ("DATABASE_MIGRATE_URL".into(), server.url()),
                ("AUTH_DB_TRANSACTION_POOLING".into(), "true".into()),
            ],
            database: None,
        }
    }

    /// The prefix of its Redis keys.
    pub fn redis_prefix(&self) -> String {
        self.args
            .iter()
            .find_map(|a| a.strip_prefix("--redis-prefix="))
            .expect("storage on Redis")
            .to_owned()
    }

    /// The DATABASE_URL its sidecars get.
    pub fn database_url(&self) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == "DATABASE_URL")
            .map(|(_, v)| v.clone())
            .expect("storage with a database")
    }

    /// A link in front of the local server that `setting` (`REDIS_URL`, `DATABASE_URL`) names,
    /// and the setting's URL pointed at the link instead.
    pub fn through_link(&self, setting: &str) -> (SlowLink, String) {
        let url = self
            .env
            .iter()
            .find(|(k, _)| k == setting)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("storage without {setting}"));
        let (head, rest) = url.rsplit_once("127.0.0.1:").expect("a local server");
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let port: u16 = rest[..digits].parse().expect("a port");
        let link = SlowLink::to(port, Duration::ZERO);
        let url = format!("{head}127.0.0.1:{}{}", link.port, &rest[digits..]);
        (link, url)
    }

    fn redis(&mut self, url: &str, prefix: &str) {
        self.env.push(("REDIS_URL".into(), url.into()));
        self.args.push(format!("--redis-prefix={prefix}:"));
    }

    fn postgres(&mut self, name: &str) {
        psql(&format!("CREATE DATABASE {name}"));
        self.env.push((
            "DATABASE_URL".into(),
            format!("{}/{name}", shared_postgres()),
        ));
        self.database = Some(name.to_owned());
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(db) = &self.database {
            psql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
        }
    }
}

/// Runs `sql` on the shared PostgreSQL's `postgres` database.
pub fn psql(sql: &str) -> String {
    psql_on(&format!("{}/postgres", shared_postgres()), sql)
}

/// Runs `sql` on the database at `url`; its output, unaligned and without headers.
pub fn psql_on(url: &str, sql: &str) -> String {
    let out = Command::new(pg_bin().join("psql"))
        .args([url, "-qtAc", sql])
        .output()
        .expect("run psql (PostgreSQL client)");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The first port of the kernel's range for client sockets.
fn first_ephemeral_port() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A port nobody listens on now, below the kernel's range of ephemeral ports: a server the
/// tests stop and start again on its port must not find it taken by a client socket that the
/// kernel gave that port while the server was down (a socket connecting to the free port can
/// even connect to itself, and then hears its own words as the server's answer).
pub fn free_port() -> u16 {
    loop {
        let port = rand::random_range(10_000..first_ephemeral_port().max(10_001));
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Kills the child if the thread that spawned it dies, so no server outlives a crashed test.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; it only sets this process's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// Waits until `redis-cli -p port ping` answers PONG.
fn wait_redis(port: u16) {
    assert!(
        redis_answers(port, Duration::from_secs(10)),
        "redis on port {port} did not start"
    );
}

/// Whether a Redis on `port` answers PING within `limit`.
fn redis_answers(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .output()
            .expect("run redis-cli");
        if String::from_utf8_lossy(&out.stdout).trim() == "PONG" {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A throwaway Redis: no persistence, on a free port, killed when dropped.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::with_args(&[])
    }

    /// A Redis on a port chosen beforehand.
    pub fn on_port(port: u16) -> RedisServer {
        let mut server = RedisServer {
            port,
            child: None,
            extra: Vec::new(),
        };
        server.restart();
        server
    }

    pub fn with_args(extra: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.restart();
        server
    }

    /// A Redis that speaks TLS only, with the certificate and key of `pki`'s server, and that
    /// asks clients for a certificate signed by `pki`'s CA (Redis's default).
    pub fn with_tls(pki: &super::tls::Pki) -> RedisServer {
        let port = free_port();
        let path = |name: &str| pki.path(name).to_str().unwrap().to_owned();
        let child = die_with_parent(
            Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--tls-cert-file", &path("server.crt")])
                .args(["--tls-key-file", &path("server.key")])
                .args(["--tls-ca-cert-file", &path("ca.crt")])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .spawn()
        .expect("spawn redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "TLS redis on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer {
            port,
            child: Some(child),
            extra: Vec::new(),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port (empty: it keeps nothing on disk).
    pub fn restart(&mut self) {
        let child = die_with_parent(
            Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(&self.extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .spawn()
        .expect("spawn redis-server");
        self.child = Some(child);
        wait_redis(self.port);
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of three masters and three replicas, shared by a test binary.
pub struct Cluster {
    pub urls: String,
}

/// Starts the cluster on first use: three masters with a replica each. Its servers are
/// spawned from a thread that lives as long as the test binary, so they die with it.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let cluster = RedisCluster::start(3, 1);
            tx.send(cluster.urls.clone()).unwrap();
            // Keep the servers' parent thread, and their directory, alive.
            let _keep = cluster;
            loop {
                std::thread::park();
            }
        });
        Cluster {
            urls: rx
                .recv_timeout(Duration::from_secs(60))
                .expect("cluster started"),
        }
    })
}

/// A Redis Cluster of a test's own, killed when dropped (or when the thread that started it
/// ends).
pub struct RedisCluster {
    /// The masters' URLs, comma-separated.
    pub urls: String,
    /// Every node's port, the masters first.
    pub ports: Vec<u16>,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl RedisCluster {
    /// `masters` masters with `replicas` replicas each.
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = RedisCluster {
            urls: String::new(),
            ports: Vec::new(),
            dir,
            children: Vec::new(),
        };
        for _ in 0..masters * (1 + replicas) {
            cluster.spawn_node();
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        wait_cluster_ok(&cluster.ports);
        cluster.urls = cluster.ports[..masters]
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        cluster
    }

    /// Starts one more cluster-enabled node, not yet in the cluster; returns its port.
    pub fn spawn_node(&mut self) -> u16 {
        loop {
            // A node also listens on its cluster bus, at port + 10000: both must be free. A
            // start that loses a race for either tries another port.
            let port = free_port();
            let bus = port
                .checked_add(10_000)
                .filter(|b| *b < first_ephemeral_port());
            if bus.is_none_or(|b| TcpListener::bind(("127.0.0.1", b)).is_err()) {
                continue;
            }
            let node_dir = self.dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut child = die_with_parent(
                Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args([
                        "--cluster-enabled",
                        "yes",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ])
                    .arg("--dir")
                    .arg(&node_dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
            .spawn()
            .expect("spawn redis-server");
            if redis_answers(port, Duration::from_secs(10)) {
                self.ports.push(port);
                self.children.push(child);
                return port;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the node on `port` (SIGKILL), as a crash would.
    pub fn kill(&mut self, port: u16) {
        let i = self
            .ports
            .iter()
            .position(|p| *p == port)
            .expect("a node of this cluster");
        let _ = self.children[i].kill();
        let _ = self.children[i].wait();
    }

    /// `redis-cli -p port args…`, its output trimmed.
    pub fn cli(port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_cluster_ok(ports: &[u16]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let all_ok = ports.iter().all(|p| {
            let out = Command::new("redis-cli")
                .args(["-p", &p.to_string(), "cluster", "info"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok")
        });
        if all_ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("redis cluster did not reach cluster_state:ok");
}

const PG_DIR_PREFIX: &str = "auth-sidecar-pg-";

/// A throwaway PostgreSQL in a temporary directory, run as the `postgres` user.
pub struct PostgresServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    uid: u32,
    gid: u32,
    /// `-c` settings.
    settings: Vec<String>,
}

impl PostgresServer {
    pub fn start() -> PostgresServer {
        PostgresServer::start_with(|_| Vec::new())
    }

    /// A server with `-c` settings that `prepare` returns; it may first write files (a
    /// certificate and key) into the server's directory, which it is given, and which the
    /// `postgres` user then owns, readable by it only.
    pub fn start_with(prepare: impl FnOnce(&Path) -> Vec<String>) -> PostgresServer {
        let uid = id("-u");
        let gid = id("-g");
        let dir = std::env::temp_dir().join(format!("{PG_DIR_PREFIX}{}", now_nanos()));
        std::fs::create_dir_all(&dir).unwrap();
        chown(&dir, uid, gid);
        let out = Command::new(pg_bin().join("initdb"))
            .args([
                "-D",
                dir.join("data").to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ])
            .uid(uid)
            .gid(gid)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Throwaway servers: no fsync (a killed server still keeps every commit, which the
        // OS holds; only a machine crash would lose it), so that disk stalls on a busy CI
        // machine do not turn into statement timeouts; and room for the many nodes a test
        // binary runs at once (each with its pool, its LISTEN feed, its heartbeat). A test's
        // own settings come after, and win.
        let mut settings = vec!["fsync=off".to_owned(), "max_connections=300".to_owned()];
        settings.extend(prepare(&dir));
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                chown(&path, uid, gid);
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
            }
        }
        let mut server = PostgresServer {
            port: free_port(),
            dir,
            child: None,
            uid,
            gid,
            settings,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn restart(&mut self) {
        let child = die_with_parent(
            Command::new(pg_bin().join("postgres"))
                .args(["-D", self.dir.join("data").to_str().unwrap()])
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-c",
                    "listen_addresses=127.0.0.1",
                ])
                .args(["-k", self.dir.to_str().unwrap()])
                .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
                .uid(self.uid)
                .gid(self.gid)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .spawn()
        .expect("spawn postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = Command::new(pg_bin().join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("a running server").id()
    }

    /// SIGKILL to the postmaster, as a crash would; its backends follow.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // Wait for the backends to go, so the port and shared memory are free again.
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The newest installed PostgreSQL's binaries (Debian keeps them per major version).
pub fn pg_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed under /usr/lib/postgresql")
        .filter_map(|e| {
            let e = e.ok()?;
            Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL version is installed").1
}

fn id(flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .expect("id postgres");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the postgres user exists")
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
}

/// A TCP proxy to a local port that holds every chunk it forwards for a delay: a slow link
/// to a backend, for one node only. It can also freeze: forward nothing, in either direction,
/// yet keep every connection open, as a link that silently stops carrying packets does. Or
/// it delays only what the backend sends a sidecar's change feed (the connection that names
/// itself `auth-sidecar-feed` to Redis, `auth-sidecar feed` to PostgreSQL). It can cut every
/// open connection, and refuse new ones (a partition). The delays can change at any time.
/// Runs until the test binary exits.
pub struct SlowLink {
    pub port: u16,
    state: Arc<LinkState>,
}

struct LinkState {
    frozen: AtomicBool,
    refusing: AtomicBool,
    /// Microseconds each chunk is held: on an ordinary connection, and what a feed receives.
    delay: AtomicU64,
    feed_delay: AtomicU64,
    losing: Mutex<Option<Vec<u8>>>,
    /// Bumped to close every open connection.
    cuts: tokio::sync::watch::Sender<u64>,
}

impl SlowLink {
    /// Stops forwarding, leaving the connections open.
    pub fn freeze(&self) {
        self.state.frozen.store(true, Ordering::SeqCst);
    }

    /// Forwards again what it held while frozen, in order.
    pub fn thaw(&self) {
        self.state.frozen.store(false, Ordering::SeqCst);
    }

    /// Loses the backend's next answer that contains `marker` (the outcome of a write, say):
    /// the connection that carried it closes instead, as a link that drops after the backend
    /// committed. Once.
    pub fn lose_answer_with(&self, marker: &[u8]) {
        *self.state.losing.lock().unwrap() = Some(marker.to_vec());
    }

    /// Holds every chunk for `delay` from now on (what the feed receives too, unless
    /// [`SlowLink::set_feed_delay`] says otherwise after this).
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay.store(micros(delay), Ordering::SeqCst);
        self.state.feed_delay.store(micros(delay), Ordering::SeqCst);
    }

    /// Holds what the backend sends a change feed for `delay` from now on.
    pub fn set_feed_delay(&self, delay: Duration) {
        self.state.feed_delay.store(micros(delay), Ordering::SeqCst);
    }

    /// Closes every open connection, as a reset link does; new ones go through.
    pub fn cut(&self) {
        self.state.cuts.send_modify(|n| *n += 1);
    }

    /// While on, closes every open connection and every new one at once.
    pub fn partition(&self, on: bool) {
        self.state.refusing.store(on, Ordering::SeqCst);
        if on {
            self.cut();
        }
    }

    pub fn to(upstream: u16, delay: Duration) -> SlowLink {
        SlowLink::with(upstream, delay, delay)
    }

    /// A fast link, but what the backend sends the change feed arrives `delay` late.
    pub fn slow_feed(upstream: u16, delay: Duration) -> SlowLink {
        SlowLink::with(upstream, Duration::ZERO, delay)
    }

    fn with(upstream: u16, delay: Duration, feed_delay: Duration) -> SlowLink {
        let state = Arc::new(LinkState {
            frozen: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            delay: AtomicU64::new(micros(delay)),
            feed_delay: AtomicU64::new(micros(feed_delay)),
            losing: Mutex::new(None),
            cuts: tokio::sync::watch::Sender::new(0),
        });
        let shared = state.clone();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (client, _) = listener.accept().await.unwrap();
                    if shared.refusing.load(Ordering::SeqCst) {
                        continue;
                    }
                    let state = shared.clone();
                    tokio::spawn(async move {
                        let Ok(server) =
                            tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                        else {
                            return;
                        };
                        // While the backend is down its port is free, and the kernel may pick
                        // it as this socket's own port: a socket connected to itself, which
                        // echoes what it is sent. Nothing listens, so that is a refusal.
                        if server.local_addr().is_ok_and(|a| a.port() == upstream) {
                            return;
                        }
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let feed = Arc::new(AtomicBool::new(false));
                        let up = Copy {
                            state: state.clone(),
                            feed: feed.clone(),
                            upstream: true,
                        };
                        let down = Copy {
                            state,
                            feed,
                            upstream: false,
                        };
                        tokio::join!(up.run(cr, sw), down.run(sr, cw));
                    });
                }
            });
        });
        SlowLink { port, state }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One direction of a [`SlowLink`] connection.
struct Copy {
    state: Arc<LinkState>,
    /// Whether this connection is a sidecar's change feed.
    feed: Arc<AtomicBool>,
    /// Client to server: watches for the feed's name. Server to client: may lose an answer.
    upstream: bool,
}

impl Copy {
    async fn run(
        self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut cuts = self.state.cuts.subscribe();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = tokio::select! {
                read = from.read(&mut buf) => match read {
                    Ok(n @ 1..) => n,
                    _ => break,
                },
                _ = cuts.changed() => break,
            };
            // The Redis feed's client name, or the PostgreSQL feed's application_name.
            let named = |name: &[u8]| buf[..n].windows(name.len()).any(|w| w == name);
            if self.upstream && (named(b"auth-sidecar-feed") || named(b"auth-sidecar feed")) {
                self.feed.store(true, Ordering::SeqCst);
            }
            let delay = if !self.upstream && self.feed.load(Ordering::SeqCst) {
                &self.state.feed_delay
            } else {
                &self.state.delay
            };
            let held = async {
                tokio::time::sleep(Duration::from_micros(delay.load(Ordering::SeqCst))).await;
                while self.state.frozen.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::select! {
                () = held => {}
                _ = cuts.changed() => break,
            }
            if !self.upstream {
                let mut marker = self.state.losing.lock().unwrap();
                if marker
                    .as_ref()
                    .is_some_and(|m| buf[..n].windows(m.len()).any(|w| w == m.as_slice()))
                {
                    *marker = None;
                    break;
                }
            }
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }
}
