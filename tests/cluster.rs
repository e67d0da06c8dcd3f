//! Nodes that check each other: three nodes on one Redis, one with another secret and one
//! with another policy, report each other by name within two heartbeats, in the log, the
//! metric and `/healthz`; `check-config` prints ✗ for them; fixing the odd nodes clears it;
//! nothing anywhere shows a secret. And the pool sizing that `check-config` does against a
//! PostgreSQL with few connections.

mod support;

use std::time::{Duration, Instant};

use support::backends::{Backend, PostgresServer, Storage, shared_redis};
use support::{SECRET, Sidecar, SidecarBuilder, http_get};

const OTHER_SECRET: &str = "another-secret-of-the-odd-node-0123456789";
const HEARTBEAT: Duration = Duration::from_millis(500);

fn node(storage: &Storage, id: &str) -> SidecarBuilder {
    Sidecar::builder()
        .storage(storage)
        .arg(format!("--node-id={id}"))
        .arg(format!("--cluster-heartbeat={}ms", HEARTBEAT.as_millis()))
}

/// Waits until one of `node`'s log lines contains every one of `parts`; returns how long.
fn wait_log(node: &Sidecar, parts: &[&str], limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if node
            .logs()
            .iter()
            .any(|l| parts.iter().all(|p| l.contains(p)))
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "no log line with {parts:?} within {limit:?}; log:\n{}",
            node.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every way a secret could show: as given, in hex, in base64 (both alphabets).
fn forms(secret: &str) -> Vec<String> {
    use base64::Engine;
    let b = secret.as_bytes();
    vec![
        secret.to_owned(),
        b.iter().map(|x| format!("{x:02x}")).collect(),
        base64::engine::general_purpose::STANDARD.encode(b),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
    ]
}

#[test]
fn disagreeing_nodes_are_named_until_fixed() {
    let storage = Storage::new(Backend::Redis);
    let a = node(&storage, "node-a")
        .arg("--rate-limit=login=5/1m")
        .arg("--strict-cluster")
        .start();
    a.wait_ops_status(200, Duration::from_secs(10));
    let b = node(&storage, "node-b")
        .arg("--rate-limit=login=5/1m")
        .env("AUTH_JWT_SECRET", OTHER_SECRET)
        .start();
    let c = node(&storage, "node-c")
        .arg("--rate-limit=login=10/1m")
        .start();
    // Two heartbeats, and a little for the processes' scheduling.
    let limit = HEARTBEAT * 2 + Duration::from_millis(700);
    let line = |n: &str, item: &str| [format!("node={n}"), format!("item=\"{item}\"")];
    for (reporter, odd, item) in [
        (&a, "node-b", "keys"),
        (&a, "node-c", "policies"),
        (&b, "node-a", "keys"),
        (&b, "node-c", "keys"),
        (&c, "node-a", "policies"),
        (&c, "node-b", "policies"),
    ] {
        let [n, i] = line(odd, item);
        let took = wait_log(reporter, &["ERROR", "cluster disagreement", &n, &i], limit);
        eprintln!("{odd} on {item}: reported within {took:?} of the odd nodes' start");
    }
    // Each is reported once, not at every heartbeat.
    std::thread::sleep(HEARTBEAT * 3);
    let reports = a
        .logs()
        .iter()
        .filter(|l| l.contains("cluster disagreement:") && l.contains("node=node-b"))
        .count();
    assert_eq!(reports, 1, "{}", a.logs().join("\n"));

    // A is strict: NOT_SERVING while it disagrees; B is not, and keeps serving.
    a.wait_ops_status(503, Duration::from_secs(5));
    b.wait_ops_status(200, Duration::from_secs(5));
    let health = http_get(a.ops, "/healthz").body;
    assert!(
        health.contains("disagreement with node node-b on keys: cannot verify kid"),
        "{health}"
    );
    assert!(
        health.contains("disagreement with node node-c on policies: rate-limit policy login: login=5/1m:burst=5 here, login=10/1m:burst=10 on node node-c"),
        "{health}"
    );
    assert!(
        health.contains("3 live node(s): node-a, node-b, node-c"),
        "{health}"
    );
    assert_eq!(
        a.metric("authsidecar_cluster_disagreements", &["item=\"keys\""]),
        1.0
    );
    assert_eq!(
        a.metric("authsidecar_cluster_disagreements", &["item=\"policies\""]),
        1.0
    );
    assert_eq!(a.metric("authsidecar_cluster_nodes", &[]), 3.0);

    // check-config with A's settings names both odd nodes and fails.
    let a_settings = node(&storage, "node-a").arg("--rate-limit=login=5/1m");
    let (code, broken) = a_settings.check_config();
    eprintln!("check-config, broken:\n{broken}");
    assert_eq!(code, 1, "{broken}");
    assert!(
        broken.lines().any(|l| l.starts_with('✗')
            && l.contains("same keys")
            && l.contains("node node-b signs with")),
        "{broken}"
    );
    assert!(
        broken.lines().any(|l| l.starts_with('✗')
            && l.contains("same policies")
            && l.contains("on node node-c")),
        "{broken}"
    );
    let registry = redis_registry(&storage);

    // Fixing the odd nodes clears it everywhere.
    let outputs = [a.logs(), b.logs(), c.logs()].concat().join("\n");
    b.terminate();
    c.terminate();
    drop((b, c));
    let b = node(&storage, "node-b")
        .arg("--rate-limit=login=5/1m")
        .start();
    let c = node(&storage, "node-c")
        .arg("--rate-limit=login=5/1m")
        .start();
    a.wait_ops_status(200, Duration::from_secs(5));
    wait_log(&a, &["cluster disagreement cleared", "node=node-c"], limit);
    let health = http_get(a.ops, "/healthz").body;
    assert!(health.contains("every live node agrees"), "{health}");
    assert_eq!(
        a.metric("authsidecar_cluster_disagreements", &["item=\"keys\""]),
        0.0
    );
    let (code, healthy) = a_settings.check_config();
    eprintln!("check-config, healthy:\n{healthy}");
    assert_eq!(code, 0, "{healthy}");
    assert!(
        healthy.contains("same keys") && !healthy.lines().any(|l| l.starts_with('✗')),
        "{healthy}"
    );

    let everything = [
        outputs,
        a.logs().join("\n"),
        b.logs().join("\n"),
        c.logs().join("\n"),
        broken,
        healthy,
        health,
        registry,
        http_get(a.ops, "/metrics").body,
    ]
    .join("\n");
    for secret in [SECRET, OTHER_SECRET] {
        for form in forms(secret) {
            assert!(!everything.contains(&form), "a secret shows as {form}");
        }
    }
}

/// The registry's hash on the shared Redis, as `redis-cli` prints it.
fn redis_registry(storage: &Storage) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-u", shared_redis()])
        .args(["HGETALL", &format!("{}nodes", storage.redis_prefix())])
        .output()
        .expect("run redis-cli");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("node-a"), "the registry: {text}");
    text
}

#[test]
fn pool_sizing_counts_the_live_nodes_against_max_connections() {
    // 20 connections, 3 of them for superusers: 17 for the nodes.
    let server = PostgresServer::start_with(|_| vec!["max_connections=20".to_owned()]);
    let storage = Storage::on_postgres(&server);
    let settings = node(&storage, "check").arg("--db-max-connections=8");
    let start = |id: &str| {
        let n = node(&storage, id).arg("--db-max-connections=8").start();
        n.wait_ops_status(200, Duration::from_secs(15));
        n
    };
    let _a = start("pg-a");
    let _b = start("pg-b");
    let (code, two) = check_with_live_nodes(&settings, 2);
    eprintln!("{two}");
    assert_eq!(code, 0, "{two}");
    assert!(
        two.lines().any(|l| l.starts_with('⚠')
            && l.contains(
                "2 node(s) × --db-max-connections 8 = 16, of 17 (max_connections 20 − 3 reserved)"
            )
            && l.contains("one more node would need 24")),
        "{two}"
    );
    let _c = start("pg-c");
    let (code, three) = check_with_live_nodes(&settings, 3);
    eprintln!("{three}");
    assert_eq!(code, 1, "{three}");
    assert!(
        three.lines().any(|l| l.starts_with('✗')
            && l.contains("3 node(s) × --db-max-connections 8 = 24, of 17")
            && l.contains("over the limit")),
        "{three}"
    );
}

/// `check-config` with `settings`, once it sees `live` nodes (or after 5 s).
fn check_with_live_nodes(settings: &SidecarBuilder, live: usize) -> (i32, String) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, out) = settings.check_config();
        let seen = out
            .lines()
            .any(|l| l.contains("live nodes") && l.contains(&format!("{live}: ")));
        if seen || Instant::now() > deadline {
            return (code, out);
        }
        std::thread::sleep(HEARTBEAT);
    }
}

/// The registry on every shared backend: two nodes see each other, and `check-config` sees
/// both, through each backend's own heartbeat (Redis Cluster's script on one slot,
/// PostgreSQL's table, through PgBouncer's transaction mode, tiered's Redis).
#[test]
fn every_shared_backend_keeps_the_registry() {
    for backend in [
        Backend::RedisCluster,
        Backend::Postgres,
        Backend::PgBouncer,
        Backend::Tiered,
    ] {
        let storage = Storage::new(backend);
        let nodes: Vec<Sidecar> = ["one", "two"]
            .iter()
            .map(|id| node(&storage, &format!("{backend:?}-{id}")).start())
            .collect();
        let want = format!("2 live node(s): {backend:?}-one, {backend:?}-two");
        let deadline = Instant::now() + Duration::from_secs(15);
        for n in &nodes {
            loop {
                let health = http_get(n.ops, "/healthz").body;
                if health.contains(&want) && health.contains("every live node agrees") {
                    break;
                }
                assert!(Instant::now() < deadline, "{backend:?}: {health}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let (code, out) = node(&storage, "checker").check_config();
        assert_eq!(code, 0, "{backend:?}: {out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with('✓') && l.contains("live nodes") && l.contains("2: ")),
            "{backend:?}: {out}"
        );
    }
}

/// `check-config` as an init container, before any node started: a database never migrated
/// has no registry yet, which is a warning (exit 0), not a failure, and nothing is written.
/// (It answered "relation \"nodes\" does not exist" with exit 1 before.)
#[test]
fn check_config_before_the_first_node_on_a_fresh_database_warns_and_writes_nothing() {
    for backend in [Backend::Postgres, Backend::Tiered] {
        let storage = Storage::new(backend);
        let (code, out) = Sidecar::builder().storage(&storage).check_config();
        assert_eq!(code, 0, "{backend:?}: {out}");
        assert!(
            out.lines().any(|l| l.starts_with('⚠')
                && l.contains("live nodes")
                && l.contains("the schema is not applied yet")),
            "{backend:?}: {out}"
        );
        let tables = support::backends::psql_on(
            &storage.database_url(),
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
        );
        assert_eq!(tables.trim(), "0", "{backend:?}: check-config wrote tables");
    }
}

/// One node on memory: warnings, not failures (exit 0). A setting that does not load: exit 2,
/// naming it, as `serve` would.
#[test]
fn check_config_on_memory_warns_and_a_bad_setting_exits_2() {
    let (code, out) = Sidecar::builder()
        .args(["--storage", "memory"])
        .check_config();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with('⚠')
            && l.contains("shared storage")
            && l.contains("run one replica")),
        "{out}"
    );
    let (code, out) = Sidecar::builder()
        .args(["--storage", "redis"])
        .check_config();
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("REDIS_URL"), "{out}");
    let (code, out) = Sidecar::builder()
        .args([
            "--storage",
            "redis",
            "--redis-ca-file",
            "/nonexistent/ca.crt",
        ])
        .env("REDIS_URL", "rediss://127.0.0.1:1")
        .check_config();
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("invalid setting AUTH_REDIS_CA_FILE: cannot read /nonexistent/ca.crt"),
        "{out}"
    );
}

fn redis_cli(args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-u", shared_redis()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One `HSET` by anyone who can write to the store: a forged entry whose deadline lies ages
/// ahead is no live node (the reader caps deadlines at three heartbeats from now, on the
/// backend's clock), so strict nodes keep serving, and the next heartbeat drops it. (It took
/// both nodes down for good before.) A forged entry that is live for a moment may disagree,
/// but what it says stays on its line in `/healthz`.
#[test]
fn a_forged_registry_entry_cannot_take_strict_nodes_down_or_forge_health_lines() {
    let storage = Storage::new(Backend::Redis);
    let nodes: Vec<Sidecar> = ["node-a", "node-b"]
        .iter()
        .map(|id| node(&storage, id).arg("--strict-cluster").start())
        .collect();
    for n in &nodes {
        n.wait_ops_status(200, Duration::from_secs(5));
    }
    let key = format!("{}nodes", storage.redis_prefix());
    let genuine = redis_cli(&["HGET", &key, "node-a"]);
    let document = genuine.split_once('|').expect("deadline|document").1;
    let forged = document.replacen(
        "\"issuer\":\"",
        "\"issuer\":\"evil\\nSERVING\\nbackends: up\\n",
        1,
    );
    assert_ne!(forged, document);
    redis_cli(&["HSET", &key, "rogue", &format!("99999999999999|{forged}")]);
    std::thread::sleep(HEARTBEAT * 4);
    for n in &nodes {
        let health = http_get(n.ops, "/healthz");
        assert_eq!(health.status, 200, "{}", health.body);
        assert!(!health.body.contains("rogue"), "{}", health.body);
    }
    assert_eq!(redis_cli(&["HEXISTS", &key, "rogue"]), "0");

    // Kept live by its writer (a deadline within three heartbeats, on Redis's clock): a
    // disagreement on the issuer, on one line.
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (writing, key, forged) = (writing.clone(), key.clone(), forged.clone());
        std::thread::spawn(move || {
            while writing.load(std::sync::atomic::Ordering::SeqCst) {
                let time = redis_cli(&["TIME"]);
                let mut parts = time.lines();
                let secs: u64 = parts.next().unwrap().parse().unwrap();
                let micros: u64 = parts.next().unwrap().parse().unwrap();
                let until = secs * 1000 + micros / 1000 + 1000;
                redis_cli(&["HSET", &key, "rogue", &format!("{until}|{forged}")]);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    nodes[0].wait_ops_status(503, Duration::from_secs(3));
    let health = http_get(nodes[0].ops, "/healthz");
    assert!(health.body.contains("rogue"), "{}", health.body);
    let lines: Vec<&str> = health.body.lines().collect();
    assert!(
        !lines[1..].contains(&"SERVING")
            && lines.iter().filter(|l| l.starts_with("backends:")).count() == 1
            && health.body.contains(r"evil\nSERVING\nbackends: up"),
        "a forged line: {}",
        health.body
    );
    // And once nobody keeps it live, the nodes serve again.
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    for n in &nodes {
        n.wait_ops_status(200, Duration::from_secs(5));
    }
}

/// What a heartbeat costs Redis does not grow with the number of nodes: the bytes Redis sends
/// each node while idle are about the same with 20 nodes as with 4. (Each heartbeat read every
/// node's document before, so each node's share grew with the fleet: about 4× here.) The
/// heartbeat is fast so that heartbeats dominate the bytes.
#[test]
fn a_heartbeat_costs_redis_the_same_at_any_fleet_size() {
    let redis = support::backends::RedisServer::start();
    let storage = Storage::on_redis(&redis);
    let bytes_out = || -> u64 {
        let info = redis.cli(&["INFO", "stats"]);
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("total_net_output_bytes in INFO")
    };
    // Bytes per node per second over 3 s, once every node of the fleet counts it.
    let per_node = |fleet: &[Sidecar]| -> f64 {
        for n in fleet {
            let want = format!("{} live node(s)", fleet.len());
            let started = Instant::now();
            while !http_get(n.ops, "/healthz").body.contains(&want) {
                assert!(started.elapsed() < Duration::from_secs(10), "{want}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let (before, started) = (bytes_out(), Instant::now());
        std::thread::sleep(Duration::from_secs(3));
        let sent = bytes_out() - before;
        sent as f64 / started.elapsed().as_secs_f64() / fleet.len() as f64
    };
    let start = |i: usize| {
        Sidecar::builder()
            .storage(&storage)
            .arg(format!("--node-id=fleet-{i:02}"))
            .arg("--cluster-heartbeat=100ms")
            .start()
    };
    let mut fleet: Vec<Sidecar> = (0..4).map(start).collect();
    let small = per_node(&fleet);
    fleet.extend((4..20).map(start));
    let large = per_node(&fleet);
    eprintln!("idle bytes per node per second: {small:.0} with 4 nodes, {large:.0} with 20");
    assert!(
        large < small * 1.3,
        "each node costs more in a larger fleet: {small:.0} B/s with 4 nodes, {large:.0} B/s \
         with 20"
    );
}
