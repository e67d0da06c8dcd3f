//! Why a backend is down, said at once, and TLS to the backends as clusters run it. A Redis
//! that refuses connections, a wrong password and a certificate the sidecar does not trust
//! are each named in the log within 3 s of the start, on `/healthz` and by `check-config`;
//! a Redis behind a private CA that asks for a client certificate, and a PostgreSQL with
//! `sslmode=verify-full`, serve. Every server and certificate is the test's own.

mod support;

use std::time::{Duration, Instant, SystemTime};

use support::backends::{PostgresServer, RedisServer, free_port};
use support::tls::Pki;
use support::{Sidecar, SidecarBuilder, http_get};

/// How soon the reason must be in the log, from the moment the process is started.
const SOON: Duration = Duration::from_secs(3);

/// Starts `node`, whose backend cannot be used, and checks that the reason (each of
/// `reason`) is said at once, everywhere an operator looks; and that `hidden` is nowhere.
fn assert_named(node: SidecarBuilder, reason: &[&str], hidden: &str) {
    let started = Instant::now();
    let spawned = SystemTime::now();
    let sidecar = node.clone().start();
    let logs = || sidecar.logs().join("\n");
    let start_line = loop {
        // The line that ended `start` may still be on its way to the log.
        match sidecar.logs().into_iter().find(|l| l.contains(" api=")) {
            Some(line) => break line,
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    assert!(
        start_line.contains("not yet serving") && start_line.contains("health=NOT_SERVING"),
        "{start_line}"
    );
    loop {
        let said = sidecar.logs().into_iter().find(|l| {
            l.contains("WARN") && l.contains("backend down") && reason.iter().all(|r| l.contains(r))
        });
        if let Some(line) = said {
            // By the line's own time: `start` returns only after the start line, which
            // comes after up to 2 s of waiting for the backend.
            let stamp = line.split_whitespace().next().unwrap();
            let at = humantime::parse_rfc3339_weak(stamp).expect("a timestamp");
            let took = at.duration_since(spawned).unwrap_or_default();
            eprintln!("said {took:?} after the process was started: {line}");
            assert!(took < SOON, "said only after {took:?}: {line}");
            break;
        }
        assert!(
            started.elapsed() < SOON,
            "{reason:?} not said within {SOON:?}:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let health = http_get(sidecar.ops, "/healthz");
    assert_eq!(health.status, 503, "{}", health.body);
    assert!(
        reason.iter().all(|r| health.body.contains(r)),
        "{}",
        health.body
    );
    let (code, out) = node.check_config();
    eprintln!("{out}");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with('✗')
            && l.contains("backends answer")
            && reason.iter().all(|r| l.contains(r))),
        "{out}"
    );
    for text in [logs(), health.body, out] {
        assert!(!text.contains(hidden), "{hidden} shows in:\n{text}");
    }
}

#[test]
fn a_refused_connection_is_named_at_once() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let node = Sidecar::builder()
        .args(["--storage", "redis"])
        .env("REDIS_URL", url);
    assert_named(node, &["Connection refused"], "no secret here");
}

#[test]
fn a_wrong_redis_password_is_named_at_once() {
    let server = RedisServer::start();
    server.cli(&["CONFIG", "SET", "requirepass", "the-right-password-4f1c"]);
    let url = format!("redis://:not-the-password-77e2@127.0.0.1:{}", server.port);
    let node = Sidecar::builder()
        .args(["--storage", "redis"])
        .env("REDIS_URL", url);
    assert_named(
        node,
        &["Password authentication failed"],
        "not-the-password-77e2",
    );
}

#[test]
fn an_untrusted_redis_certificate_is_named_at_once() {
    let pki = Pki::new();
    let server = RedisServer::with_tls(&pki);
    // The public roots only: the test CA is not among them.
    let node = Sidecar::builder()
        .args(["--storage", "redis"])
        .env("REDIS_URL", format!("rediss://localhost:{}", server.port));
    assert_named(
        node,
        &["invalid peer certificate", "UnknownIssuer"],
        "PRIVATE KEY",
    );
}

#[test]
fn a_redis_that_wants_a_client_certificate_says_so() {
    let pki = Pki::new();
    let server = RedisServer::with_tls(&pki);
    let node = Sidecar::builder()
        .args(["--storage", "redis"])
        .env("REDIS_URL", format!("rediss://localhost:{}", server.port))
        .env("AUTH_REDIS_CA_FILE", pki.path("ca.crt").to_str().unwrap());
    // Redis closes the handshake: rustls reads it as the server's alert or a reset.
    let sidecar = node.start();
    let deadline = Instant::now() + SOON;
    while !sidecar
        .logs()
        .iter()
        .any(|l| l.contains("backend down") && l.contains("connect:"))
    {
        assert!(Instant::now() < deadline, "{}", sidecar.logs().join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn redis_behind_a_private_ca_with_a_client_certificate_serves() {
    let pki = Pki::new();
    let server = RedisServer::with_tls(&pki);
    let path = |name: &str| pki.path(name).to_str().unwrap().to_owned();
    let node = Sidecar::builder()
        .args(["--storage", "redis"])
        .env("REDIS_URL", format!("rediss://localhost:{}", server.port))
        .env("AUTH_REDIS_CA_FILE", path("ca.crt"))
        .env("AUTH_REDIS_CLIENT_CERT", path("client.crt"))
        .env("AUTH_REDIS_CLIENT_KEY", path("client.key"));
    let sidecar = node.clone().start();
    sidecar.wait_ops_status(200, Duration::from_secs(10));
    let mut client = sidecar.client().await;
    let issued = client.issue("tls-user").await;
    client.assert_valid(&issued.token).await;
    let (code, out) = node.check_config();
    eprintln!("{out}");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with('✓')
            && l.contains("redis TLS")
            && l.contains("AUTH_REDIS_CA_FILE, client certificate")),
        "{out}"
    );
    let key = String::from_utf8(pki.read("client.key")).unwrap();
    let body = key.lines().nth(1).unwrap();
    assert!(
        !sidecar.logs().join("\n").contains(body),
        "the client key in the log"
    );
}

#[tokio::test]
async fn postgres_with_verify_full_serves_and_a_stranger_ca_is_named() {
    let pki = Pki::new();
    let (cert, key) = (pki.read("server.crt"), pki.read("server.key"));
    let server = PostgresServer::start_with(|dir| {
        std::fs::write(dir.join("server.crt"), &cert).unwrap();
        std::fs::write(dir.join("server.key"), &key).unwrap();
        vec![
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", dir.join("server.crt").display()),
            format!("ssl_key_file={}", dir.join("server.key").display()),
        ]
    });
    let url = |ca: &std::path::Path| {
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            server.port,
            ca.display()
        )
    };
    let node = Sidecar::builder()
        .args(["--storage", "postgres"])
        .env("DATABASE_URL", url(&pki.path("ca.crt")));
    let sidecar = node.clone().start();
    sidecar.wait_ops_status(200, Duration::from_secs(15));
    let mut client = sidecar.client().await;
    let issued = client.issue("pg-tls-user").await;
    client.assert_valid(&issued.token).await;
    // The sidecar's connections are encrypted: the server says so of each.
    let encrypted = support::backends::psql_on(
        &format!("postgres://postgres@127.0.0.1:{}/postgres", server.port),
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'auth-sidecar' AND s.ssl",
    );
    assert_ne!(encrypted, "0", "no encrypted connection of the sidecar");
    let (code, out) = node.check_config();
    eprintln!("{out}");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with('✓')
            && l.contains("postgres TLS")
            && l.contains("sslmode=verify-full")),
        "{out}"
    );

    let stranger = Sidecar::builder()
        .args(["--storage", "postgres"])
        .env("DATABASE_URL", url(&pki.stranger_ca()));
    assert_named(stranger, &["UnknownIssuer"], "PRIVATE KEY");
}
