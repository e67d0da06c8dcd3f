//! What forward-auth costs behind NGINX, and what the HTTP path costs the sidecar against
//! ext_authz, in one run, with h2load (Debian `nghttp2-client`) as the load generator:
//!
//! - `nginx alone`: NGINX proxying to an app (another NGINX answering 200), no auth;
//! - `nginx auth_request`: `examples/nginx/nginx.conf` unchanged but for ports, the same app,
//!   every request checked by the sidecar over a kept-alive HTTP/1.1 connection;
//! - `forward-auth h2`, `ext_authz h2`: the sidecar alone, `/v1/authz` and Envoy's
//!   `Authorization/Check` for the same valid token over h2c at the same concurrency;
//! - `health Check`: grpc.health.v1 Check, the no-op baseline of the sidecar's throughput.
//!
//! The sidecar (memory storage, one worker thread) is pinned to core 0; NGINX and h2load to
//! core 1. Scenarios run in alternating rounds; the figures are medians, with the sidecar's and
//! NGINX's CPU time per request from /proc.
//!
//! `cargo bench --bench proxy -- [--seconds S] [--rounds R] [--connections C]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use prost::Message;
use support::{Sidecar, cpu_time};

struct Options {
    seconds: u64,
    rounds: usize,
    connections: usize,
}

fn options() -> Options {
    let mut o = Options {
        seconds: 5,
        rounds: 3,
        connections: 32,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--seconds" => o.seconds = value().parse().unwrap(),
            "--rounds" => o.rounds = value().parse().unwrap(),
            "--connections" => o.connections = value().parse().unwrap(),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    o
}

/// An NGINX in the foreground, pinned to core 1, killed when dropped.
struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// `conf` is the whole nginx.conf; `includes` are files copied beside it.
    fn start(conf: &str, includes: &[&str], port: u16) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        for name in includes {
            let from = format!("{}/examples/nginx/{name}", env!("CARGO_MANIFEST_DIR"));
            std::fs::copy(from, dir.path().join(name)).unwrap();
        }
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let global = format!(
            "daemon off; pid {0}/nginx.pid; error_log {0}/error.log;",
            dir.path().display()
        );
        let child = Command::new("taskset")
            .args(["-c", "1", "nginx", "-p"])
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .args(["-g", &global])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx is installed (apt-get install nginx)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, _dir: dir }
    }

    /// CPU time of the master and its workers.
    fn cpu(&self) -> Duration {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.child.id()))
                .unwrap_or_default();
        children
            .split_whitespace()
            .filter_map(|pid| cpu_time(pid.parse().ok()?))
            .chain(cpu_time(self.child.id()))
            .sum()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One h2load run: requests that succeeded, and requests per second.
fn h2load(seconds: u64, args: &[&str]) -> (u64, f64) {
    let out = Command::new("taskset")
        .args(["-c", "1", "h2load", "-D", &seconds.to_string()])
        .args(args)
        .output()
        .expect("h2load is installed (apt-get install nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    let number_before = |marker: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.contains(marker))
            .unwrap_or_else(|| {
                panic!("no `{marker}` in h2load's output:\n{text}");
            });
        let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        let at = words.iter().position(|w| marker.starts_with(*w)).unwrap();
        words[at - 1].parse().unwrap()
    };
    let ok = number_before("2xx") as u64;
    let failed = number_before("failed") as u64 + number_before("errored") as u64;
    assert!(ok > 0 && failed == 0, "requests failed:\n{text}");
    assert_eq!(
        number_before("4xx") as u64 + number_before("5xx") as u64,
        0,
        "{text}"
    );
    (ok, number_before("req/s"))
}

struct Scenario {
    name: &'static str,
    args: Vec<String>,
    nginx: Option<usize>,
    rps: Vec<f64>,
    sidecar_us: Vec<f64>,
    nginx_us: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A gRPC request body: the 5-byte prefix and the message.
fn grpc_body(message: &impl Message) -> Vec<u8> {
    let encoded = message.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
    body.extend_from_slice(&encoded);
    body
}

#[tokio::main]
async fn main() {
    let o = options();
    let node = Sidecar::builder()
        .args(["--log-level", "info", "--admin-listen", "off"])
        .env("TOKIO_WORKER_THREADS", "1")
        .start();
    let pinned = Command::new("taskset")
        .args(["-a", "-cp", "0", &node.pid().to_string()])
        .output()
        .unwrap();
    assert!(pinned.status.success(), "taskset failed");
    let token = node.client().await.issue("bench-user").await.token;
    let bearer = format!("authorization: Bearer {token}");
    let sidecar_port: u16 = node.api.rsplit(':').next().unwrap().parse().unwrap();

    let (app_port, plain_port, auth_port) = (free_port(), free_port(), free_port());
    let app = Nginx::start(
        &format!(
            "events {{}}\nhttp {{ access_log off; server {{ listen 127.0.0.1:{app_port}; \
             location / {{ return 200 \"ok\\n\"; }} }} }}\n"
        ),
        &[],
        app_port,
    );
    let plain = Nginx::start(
        &format!(
            "events {{}}\nhttp {{ access_log off; upstream app {{ server 127.0.0.1:{app_port}; \
             keepalive 16; }} server {{ listen 127.0.0.1:{plain_port}; location / {{ \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://app; \
             }} }} }}\n"
        ),
        &[],
        plain_port,
    );
    let example = std::fs::read_to_string(format!(
        "{}/examples/nginx/nginx.conf",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replace("127.0.0.1:8000", &format!("127.0.0.1:{auth_port}"))
    .replace("127.0.0.1:50051", &format!("127.0.0.1:{sidecar_port}"))
    .replace("127.0.0.1:8080", &format!("127.0.0.1:{app_port}"))
    // The access log is the same for both: off.
    .replace("http {", "http {\n    access_log off;");
    let auth = Nginx::start(
        &example,
        &["auth_sidecar_subrequest", "auth_sidecar_identity"],
        auth_port,
    );
    let nginxes = [&plain, &auth];

    let dir = tempfile::tempdir().unwrap();
    let check = dir.path().join("check.bin");
    std::fs::write(
        &check,
        grpc_body(&CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        path: "/things".into(),
                        headers: [
                            ("authorization".to_owned(), format!("Bearer {token}")),
                            (":path".to_owned(), "/things".to_owned()),
                            ("host".to_owned(), "app.example.com".to_owned()),
                        ]
                        .into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
    )
    .unwrap();
    let health = dir.path().join("health.bin");
    std::fs::write(
        &health,
        grpc_body(&tonic_health::pb::HealthCheckRequest::default()),
    )
    .unwrap();

    let c = o.connections.to_string();
    let streams = (o.connections / 8).max(1).to_string();
    let api = |path: &str| format!("http://127.0.0.1:{sidecar_port}{path}");
    let grpc = |body: &std::path::Path, path: &str| -> Vec<String> {
        [
            "-c",
            "8",
            "-m",
            &streams,
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([body.display().to_string(), api(path)])
        .collect()
    };
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut scenarios = vec![
        Scenario {
            name: "nginx alone",
            args: strings(&[
                "--h1",
                "-c",
                &c,
                &format!("http://127.0.0.1:{plain_port}/things"),
            ]),
            nginx: Some(0),
            rps: vec![],
            sidecar_us: vec![],
            nginx_us: vec![],
        },
        Scenario {
            name: "nginx auth_request",
            args: strings(&[
                "--h1",
                "-c",
                &c,
                "-H",
                &bearer,
                &format!("http://127.0.0.1:{auth_port}/things"),
            ]),
            nginx: Some(1),
            rps: vec![],
            sidecar_us: vec![],
            nginx_us: vec![],
        },
        Scenario {
            name: "forward-auth h2",
            args: strings(&["-c", "8", "-m", &streams, "-H", &bearer, &api("/v1/authz")]),
            nginx: None,
            rps: vec![],
            sidecar_us: vec![],
            nginx_us: vec![],
        },
        Scenario {
            name: "ext_authz h2",
            args: grpc(&check, "/envoy.service.auth.v3.Authorization/Check"),
            nginx: None,
            rps: vec![],
            sidecar_us: vec![],
            nginx_us: vec![],
        },
        Scenario {
            name: "health Check",
            args: grpc(&health, "/grpc.health.v1.Health/Check"),
            nginx: None,
            rps: vec![],
            sidecar_us: vec![],
            nginx_us: vec![],
        },
    ];
    // Warm every path once.
    for s in &scenarios {
        let args: Vec<&str> = s.args.iter().map(String::as_str).collect();
        h2load(1, &args);
    }
    let sidecar_cpu = || cpu_time(node.pid() as u32).expect("the sidecar runs");
    for round in 0..o.rounds {
        for s in scenarios.iter_mut() {
            let args: Vec<&str> = s.args.iter().map(String::as_str).collect();
            let (cpu0, ngx0) = (sidecar_cpu(), s.nginx.map(|n| nginxes[n].cpu()));
            let (ok, rps) = h2load(o.seconds, &args);
            let per = |d: Duration| d.as_secs_f64() * 1e6 / ok as f64;
            s.rps.push(rps);
            s.sidecar_us.push(per(sidecar_cpu() - cpu0));
            if let (Some(n), Some(before)) = (s.nginx, ngx0) {
                s.nginx_us.push(per(nginxes[n].cpu() - before));
            }
            eprintln!("round {round}: {:<20} {rps:>9.0} req/s", s.name);
        }
    }
    let base = median(&scenarios[4].rps);
    let plain_rps = median(&scenarios[0].rps);
    println!(
        "\n{:<20} {:>10} {:>10} {:>12} {:>12}",
        "scenario", "req/s", "ratio", "sidecar µs", "nginx µs"
    );
    for s in &scenarios {
        let rps = median(&s.rps);
        let ratio = if s.nginx.is_some() {
            rps / plain_rps
        } else {
            rps / base
        };
        let nginx = if s.nginx_us.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.1}", median(&s.nginx_us))
        };
        println!(
            "{:<20} {rps:>10.0} {ratio:>9.2}× {:>12.1} {nginx:>12}",
            s.name,
            median(&s.sidecar_us)
        );
    }
    println!(
        "\nratios: nginx rows against `nginx alone`, the others against `health Check`; \
         µs: CPU time per request"
    );
    drop(app);
}
