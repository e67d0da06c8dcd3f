//! Shared test helpers: start real sidecar processes on free ports, connect real gRPC clients,
//! and forge tokens for the negative cases.

#![allow(dead_code)] // each test binary uses its own part of this module

pub mod backends;
pub mod faults;
pub mod hsm;
pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use auth_sidecar::pb;
use auth_sidecar::pb::token_service_client::TokenServiceClient;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

/// The signing secret every test sidecar shares unless a test says otherwise.
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// Sidecar nodes sharing one storage; the nodes stop before the storage is dropped.
pub struct Deployment {
    pub nodes: Vec<Sidecar>,
    pub storage: backends::Storage,
}

impl Deployment {
    /// `n` nodes on fresh storage of `backend`, each with `args`.
    pub fn start(backend: backends::Backend, n: usize, args: &[&str]) -> Deployment {
        Deployment::on(backends::Storage::new(backend), n, args)
    }

    /// `n` nodes on the given storage, each SERVING before this returns.
    pub fn on(storage: backends::Storage, n: usize, args: &[&str]) -> Deployment {
        let nodes: Vec<Sidecar> = (0..n)
            .map(|_| {
                args.iter()
                    .fold(Sidecar::builder().storage(&storage), |b, a| b.arg(*a))
                    .start()
            })
            .collect();
        for node in &nodes {
            node.wait_ops_status(200, Duration::from_secs(15));
        }
        Deployment { nodes, storage }
    }
}

impl std::ops::Deref for Deployment {
    type Target = Sidecar;
    fn deref(&self) -> &Sidecar {
        &self.nodes[0]
    }
}

/// A sidecar process, stopped when dropped.
pub struct Sidecar {
    child: Child,
    /// The token API address as a client dials it: HOST:PORT or unix:/path.
    pub api: String,
    pub ops: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

#[derive(Clone)]
pub struct SidecarBuilder {
    binary: std::path::PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    listen: String,
}

impl SidecarBuilder {
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        let arg = arg.into();
        match arg.strip_prefix("--listen=") {
            Some(listen) => self.listen = listen.to_owned(),
            None => self.args.push(arg),
        }
        self
    }

    pub fn args<A: Into<String>>(self, args: impl IntoIterator<Item = A>) -> Self {
        args.into_iter().fold(self, |b, a| b.arg(a))
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Uses `storage`'s backend settings.
    pub fn storage(mut self, storage: &backends::Storage) -> Self {
        self.args.extend(storage.args.iter().cloned());
        self.env.extend(storage.env.iter().cloned());
        self
    }

    /// Signs with the keys of `dir` rather than the shared test secret.
    pub fn keys_dir(mut self, dir: &std::path::Path) -> Self {
        self.env.retain(|(key, _)| key != "AUTH_JWT_SECRET");
        self.args.push(format!("--keys-dir={}", dir.display()));
        self
    }

    /// Runs `binary` rather than this build's.
    pub fn binary(mut self, binary: &std::path::Path) -> Self {
        self.binary = binary.to_owned();
        self
    }

    pub fn listen(mut self, listen: impl Into<String>) -> Self {
        self.listen = listen.into();
        self
    }

    /// The binary's `subcommand` with these settings, and no AUTH_ variable of the test's
    /// own environment.
    fn command(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg(subcommand)
            .arg("--listen")
            .arg(&self.listen)
            .arg("--ops-listen")
            .arg("127.0.0.1:0")
            .args(&self.args)
            .stdin(Stdio::null());
        for (key, _) in std::env::vars() {
            if key.starts_with("AUTH_") {
                cmd.env_remove(key);
            }
        }
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        cmd
    }

    /// Runs `auth-sidecar check-config` with these settings: its exit code and its output
    /// (stdout, then stderr).
    pub fn check_config(&self) -> (i32, String) {
        let out = self
            .command("check-config")
            .output()
            .expect("run auth-sidecar check-config");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// Starts the process and waits until it logs the addresses it serves on (serving or,
    /// with a backend down, not yet).
    pub fn start(self) -> Sidecar {
        let mut cmd = self.command("serve");
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Debug for the sidecar's own lines, so that the scan at drop covers them too.
            .env("RUST_LOG", "info,auth_sidecar=debug");
        // SAFETY: prctl only sets this child's parent-death signal.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn auth-sidecar");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let text = line.contains(" api=") && line.contains(" ops=");
                let ready = text || line.contains(r#""ops":""#);
                // Kept before it is announced, so that `logs()` holds the start line once
                // `start` returns.
                sink.lock().unwrap().push(line.clone());
                if ready {
                    let _ = ready_tx.send(line);
                }
            }
        });
        let line = match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "sidecar did not start; its log:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Sidecar {
            child,
            api: field(&line, "api"),
            ops: field(&line, "ops").parse().expect("ops address"),
            logs,
        }
    }
}

/// The value of `name=` in a text log line, or of `name` in a JSON one.
fn field(line: &str, name: &str) -> String {
    if line.starts_with('{') {
        let value: Value = serde_json::from_str(line).expect("a JSON log line");
        return value[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .to_owned();
    }
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
        .to_owned()
}

impl Sidecar {
    /// A sidecar on a free loopback port with the shared test secret.
    pub fn builder() -> SidecarBuilder {
        SidecarBuilder {
            binary: env!("CARGO_BIN_EXE_auth-sidecar").into(),
            args: Vec::new(),
            env: vec![("AUTH_JWT_SECRET".into(), SECRET.into())],
            listen: "127.0.0.1:0".into(),
        }
    }

    pub fn start() -> Sidecar {
        Sidecar::builder().start()
    }

    pub async fn channel(&self) -> Channel {
        connect(&self.api).await
    }

    pub async fn client(&self) -> Client {
        Client(TokenServiceClient::new(self.channel().await))
    }

    pub async fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }

    pub async fn ops_health(&self) -> HealthClient<Channel> {
        HealthClient::new(connect(&self.ops.to_string()).await)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM, as Kubernetes does.
    pub fn terminate(&self) {
        // SAFETY: kill(2) with a pid we own.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit. Async, so that this test's own client connections keep
    /// being polled: a graceful HTTP/2 shutdown waits for the client to answer its PING.
    pub async fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar did not exit within {limit:?}; its log:\n{}",
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the process wrote to stderr so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Polls `/healthz` until it answers `status`.
    pub fn wait_ops_status(&self, status: u16, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.ops_get("/healthz") != status {
            assert!(
                Instant::now() < deadline,
                "/healthz did not answer {status} within {limit:?}; log:\n{}",
                self.logs().join("\n")
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `GET path` over HTTP/1.1 on the ops listener; returns the status code.
    /// The sum of a Prometheus series on /metrics over every label set that contains each
    /// of `labels` (`name="value"` pieces); 0 when there is none.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        http_get(self.ops, "/metrics")
            .body
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                    && labels.iter().all(|label| l.contains(label))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// How many times this node's revocation view was emptied by its backend (FLUSHALL).
    pub fn view_flushes(&self) -> f64 {
        self.metric(
            "authsidecar_revocation_cache_flushes_total",
            &["cause=\"backend_flush\""],
        )
    }

    /// Waits until this node's revocation view has heard of a FLUSHALL made after it counted
    /// `before` flushes: until then it may answer from what it held, within its bound.
    pub fn wait_view_flushed(&self, before: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.view_flushes() <= before {
            assert!(
                Instant::now() < deadline,
                "the view never heard of the flush"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn ops_get(&self, path: &str) -> u16 {
        http_get_status(self.ops, path)
    }
}

impl Drop for Sidecar {
    /// Stops the process, then scans everything it wrote: no token, no test secret and no
    /// key material may appear in a log, in any test.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            return;
        }
        for line in self.logs.lock().unwrap().iter() {
            assert!(
                !line.contains(SECRET),
                "the signing secret in a log line: {line}"
            );
            assert!(
                !line.contains("PRIVATE KEY"),
                "key material in a log line: {line}"
            );
            if let Some(jwt) = find_jwt(line) {
                panic!("a token in a log line: {jwt} in {line}");
            }
        }
    }
}

/// A JWT-shaped word in `text`: three non-empty base64url segments, the first a JSON object
/// (`eyJ`).
pub fn find_jwt(text: &str) -> Option<&str> {
    let b64 = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .find(|word| {
            let parts: Vec<&str> = word.split('.').collect();
            parts.len() == 3 && parts[0].starts_with("eyJ") && parts.iter().all(|p| b64(p))
        })
}

pub async fn connect(addr: &str) -> Channel {
    auth_sidecar::client::endpoint(addr)
        .expect("endpoint")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

pub fn http_get_status(addr: SocketAddr, path: &str) -> u16 {
    http_get(addr, path).status
}

/// An HTTP/1.1 response: status, header lines (names lower-cased) and body.
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_get_as(addr, path, "localhost")
}

/// A GET whose `Host` header is `host`.
pub fn http_get_as(addr: SocketAddr, path: &str, host: &str) -> HttpResponse {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    http_raw(tcp(addr), request.as_bytes())
}

/// A connection whose reads and writes give up after 5 s, so that a server that hangs fails
/// the test rather than stalls it.
pub fn tcp(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

/// Sends `request` (an HTTP/1.1 request, `Connection: close`) and reads the whole answer. The
/// request may be cut short by the server answering first (a body too large): the answer is
/// read all the same.
pub fn http_raw<S: Read + Write>(mut stream: S, request: &[u8]) -> HttpResponse {
    let _ = stream.write_all(request);
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split_whitespace().nth(1));
    HttpResponse {
        status: status
            .expect("status line")
            .parse()
            .expect("numeric status"),
        headers: lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_owned()))
            .collect(),
        body: body.to_owned(),
    }
}

/// User plus system CPU time of a process so far, from /proc (Linux); `None` once it is gone.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().ok()? + fields[12].parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// How long after a write on one node another node may still answer from its revocation
/// view: the feed's proof window (`store::cache::PROOF_WINDOW`). In practice the view hears
/// of the write one push after it, well under a millisecond here.
pub const VIEW_BOUND: Duration = Duration::from_secs(1);

/// A TokenService client with one helper per call the tests make.
#[derive(Clone)]
pub struct Client(pub TokenServiceClient<Channel>);

impl Client {
    pub async fn issue(&mut self, subject: &str) -> pb::IssueResponse {
        self.issue_with(pb::IssueRequest {
            subject: subject.into(),
            ..Default::default()
        })
        .await
        .expect("issue")
    }

    pub async fn issue_with(
        &mut self,
        req: pb::IssueRequest,
    ) -> Result<pb::IssueResponse, tonic::Status> {
        self.0.issue(req).await.map(|r| r.into_inner())
    }

    pub async fn validate(&mut self, token: &str) -> Result<pb::ValidateResponse, tonic::Status> {
        self.validate_with(pb::ValidateRequest {
            token: token.into(),
            ..Default::default()
        })
        .await
    }

    pub async fn validate_with(
        &mut self,
        req: pb::ValidateRequest,
    ) -> Result<pb::ValidateResponse, tonic::Status> {
        self.0.validate(req).await.map(|r| r.into_inner())
    }

    /// Asserts that `token` is valid and returns the answer.
    pub async fn assert_valid(&mut self, token: &str) -> pb::ValidateResponse {
        let resp = self.validate(token).await.expect("validate");
        assert!(resp.valid, "rejected: {:?}", resp.reason());
        resp
    }

    /// Asserts that `token` is rejected for `reason`, with no claims in the answer.
    pub async fn assert_rejected(&mut self, token: &str, reason: pb::InvalidReason) {
        let resp = self.validate(token).await.expect("validate");
        assert!(!resp.valid, "accepted, expected {reason:?}");
        assert_eq!(resp.reason(), reason);
        assert!(
            resp.claims.is_none() && resp.subject.is_empty(),
            "claims leaked: {resp:?}"
        );
    }

    /// Asserts that `token`, revoked through another node, is rejected here for `reason`
    /// within [`VIEW_BOUND`]: this node's revocation view may not have heard of it yet.
    pub async fn assert_rejected_soon(&mut self, token: &str, reason: pb::InvalidReason) {
        // Judged by when each call was sent: on a loaded machine an answer may come late.
        let start = Instant::now();
        loop {
            let sent = start.elapsed();
            if !self.validate(token).await.expect("validate").valid {
                break;
            }
            assert!(
                sent < VIEW_BOUND,
                "accepted for longer than the view's bound, expected {reason:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.assert_rejected(token, reason).await;
    }

    pub async fn revoke(
        &mut self,
        target: pb::revoke_request::Target,
    ) -> Result<pb::RevokeResponse, tonic::Status> {
        self.0
            .revoke(pb::RevokeRequest {
                target: Some(target),
                reason: "test".into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// A new session of `subject` with the configured lifetime.
    pub async fn create_session(&mut self, subject: &str) -> pb::Session {
        self.0
            .create_session(pb::CreateSessionRequest {
                subject: subject.into(),
                ..Default::default()
            })
            .await
            .expect("create session")
            .into_inner()
            .session
            .expect("a session")
    }

    /// A new refresh token (a new family) of `subject`.
    pub async fn issue_refresh(&mut self, subject: &str) -> String {
        self.issue_with(pb::IssueRequest {
            subject: subject.into(),
            kind: pb::TokenKind::Refresh as i32,
            ..Default::default()
        })
        .await
        .expect("issue a refresh token")
        .token
    }

    pub async fn refresh(&mut self, token: &str) -> Result<pb::RefreshResponse, tonic::Status> {
        self.0
            .refresh(pb::RefreshRequest {
                refresh_token: token.into(),
            })
            .await
            .map(|r| r.into_inner())
    }
}

/// Asserts a call failed with `code` and a message that names `field`.
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    field: &str,
) {
    let status = result.expect_err("the call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(field),
        "message {:?} does not name {field}",
        status.message()
    );
}

/// Nanoseconds since the epoch: unique enough to name a temporary file.
pub fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The decoded header and claims of a token.
pub fn parts(token: &str) -> (Map<String, Value>, Map<String, Value>) {
    let mut segs = token.split('.');
    let mut next = || -> Map<String, Value> {
        let bytes = URL_SAFE_NO_PAD.decode(segs.next().unwrap()).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    };
    (next(), next())
}

/// Re-signs `token` after `edit` changes its header and claims: HMAC with `secret` under the
/// header's `alg` when it is an HS algorithm, an empty signature otherwise.
pub fn forge(
    token: &str,
    secret: &str,
    edit: impl FnOnce(&mut Map<String, Value>, &mut Map<String, Value>),
) -> String {
    let (mut header, mut claims) = parts(token);
    edit(&mut header, &mut claims);
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap())
    );
    let signature = match header["alg"].as_str().unwrap_or("") {
        alg @ ("HS256" | "HS384" | "HS512") => {
            let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap();
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, alg.parse().unwrap()).unwrap()
        }
        "RS256" => {
            // What a confused verifier would accept: HMAC under the secret.
            let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap();
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
                .unwrap()
        }
        _ => String::new(),
    };
    format!("{message}.{signature}")
}

/// Sets one claim.
pub fn with_claim(
    name: &str,
    value: Value,
) -> impl FnOnce(&mut Map<String, Value>, &mut Map<String, Value>) {
    let name = name.to_owned();
    move |_, claims| {
        claims.insert(name, value);
    }
}

pub fn struct_of(value: Value) -> prost_types::Struct {
    let Value::Object(map) = value else {
        panic!("not an object")
    };
    auth_sidecar::grpc::json_to_struct(map)
}

/// The sidecar's JWKS and active key id, through GetJwks.
pub async fn jwks(client: &mut Client) -> pb::GetJwksResponse {
    client
        .0
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// The token verified by jsonwebtoken against the JWKS: a second, independent verifier. It
/// decodes into a struct with whole-second `u64` times, as a Rust app would, right after
/// issue: a NumericDate with a fraction fails to decode there.
pub fn verify_with_jwks(token: &str, jwks_json: &str) -> Value {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)] // read by serde, as an app's claims struct would be
    struct Typed {
        sub: String,
        iat: u64,
        exp: u64,
        auth_ms: u64,
    }
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(jwks_json).unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    let jwk = set
        .find(header.kid.as_deref().unwrap())
        .expect("kid in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_issuer(&["auth-sidecar"]);
    jsonwebtoken::decode::<Typed>(token, &key, &validation)
        .unwrap_or_else(|e| panic!("{:?} into u64 times: {e}", header.alg));
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .unwrap_or_else(|e| panic!("{:?}: {e}", header.alg))
        .claims
}

/// Polls `done` every 20 ms until it holds, for at most 10 s.
pub async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, mut done: F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
