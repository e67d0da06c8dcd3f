//! Load generator: keeps N calls in flight over M connections against real sidecar processes
//! for a fixed time, and prints requests/s and p50/p99 latency for grpc.health.v1 Check (the
//! ceiling of a no-op call on this server), and Validate and Issue on every storage backend
//! (memory, and the machine's Redis and PostgreSQL), Validate of a token bound to a session
//! on redis and tiered, and Validate and Issue with every family of signing key (HS256,
//! ES256, EdDSA, RS256) and with an ES256 key in a SoftHSM2 token and in AWS KMS (moto's
//! emulator, from the test venv), in one run. The shared backends run twice, with the revocation view
//! and without it (`--revocation-cache 0`), for a repeated token, 20,000 distinct tokens and a
//! hot denied rate-limit key (redis and postgres); CheckRateLimit on every backend, with rate-limit steps gathered
//! into one round trip (`--store-batch`, the default) and without (`... unbatched`), with
//! each backend's CPU per call beside the sidecar's; Envoy's ext_authz Check (a valid token), ShouldRateLimit and
//! MfaService's VerifyTotp on memory and redis. Scenarios run in alternating rounds, so drift on a shared machine touches
//! all of them alike; the figures are medians over the rounds, and each is given as a ratio to
//! Check.
//!
//! Then, on redis, tiered and postgres: the staleness of the view across nodes under load (two
//! more sidecars on the same storage; revoke on one, time until the other rejects).
//!
//! `cargo bench --bench load -- [--seconds S] [--rounds R] [--concurrency N] [--connections M]`

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use auth_sidecar::keys::{self, Alg};
use auth_sidecar::mfa::totp;
use auth_sidecar::pb;
use auth_sidecar::pb::mfa_service_client::MfaServiceClient;
use auth_sidecar::pb::token_service_client::TokenServiceClient;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use hdrhistogram::Histogram;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SECRET: &str = "benchmark-secret-0123456789abcdefghijkl";

struct Options {
    /// Run only Check and the scenarios whose name contains this (for profiling one of them).
    only: Option<String>,
    seconds: f64,
    rounds: usize,
    concurrency: usize,
    connections: usize,
}

impl Options {
    fn from_args() -> Options {
        let mut o = Options {
            only: None,
            seconds: 3.0,
            rounds: 3,
            concurrency: 32,
            connections: 4,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--only" {
                o.only = Some(it.next().expect("--only needs a scenario").to_owned());
                continue;
            }
            let mut value = || {
                it.next()
                    .expect("flag needs a value")
                    .parse::<f64>()
                    .expect("a number")
            };
            match flag.as_str() {
                "--seconds" => o.seconds = value(),
                "--rounds" => o.rounds = value() as usize,
                "--concurrency" => o.concurrency = value() as usize,
                "--connections" => o.connections = value() as usize,
                "--bench" => {}
                other => panic!("unknown flag {other}"),
            }
        }
        o
    }
}

/// Distinct tokens the cache-miss scenario cycles through: more than the default verify cache
/// (8 MiB) holds, so nearly every call decodes and verifies afresh.
const DISTINCT_TOKENS: usize = 20_000;

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Check,
    Validate,
    /// Validate of a token bound to a session: the store also checks the session.
    ValidateSession,
    ValidateDistinct,
    Issue,
    RateLimit,
    /// CheckRateLimit of one key every caller shares, denied after its first call.
    RateLimitDenied,
    /// Envoy's ext_authz Check of a request as Envoy sends it, with a valid bearer token.
    ExtAuthz,
    /// Envoy's ShouldRateLimit of one descriptor, one key per caller.
    ShouldRateLimit,
    /// MfaService's VerifyTotp of the current code of an enrolled subject, one per caller:
    /// the first call of each 30-second step is accepted, the rest are refused as replays by
    /// the store's atomic step, after the same reads and checks.
    VerifyTotp,
}

/// moto's KMS server (from the test venv, as `tests/interop/python` runs it) on a free port,
/// killed with this process, and an ECC_NIST_P256 signing key in it: its endpoint and key id.
fn kms_emulator() -> (String, String) {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/python/kms_emulator.py"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(python);
    cmd.args([script, "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl only sets the child's parent-death signal.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    std::mem::forget(
        cmd.spawn()
            .expect("the test venv's python runs (scripts/test makes it)"),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto's server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let made = Command::new(python)
        .args([
            "-c",
            &format!(
                "import boto3; print(boto3.client('kms', region_name='eu-west-1', \
                 endpoint_url='{endpoint}', aws_access_key_id='b', aws_secret_access_key='b')\
                 .create_key(KeySpec='ECC_NIST_P256', KeyUsage='SIGN_VERIFY')\
                 ['KeyMetadata']['KeyId'])"
            ),
        ])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let key_id = String::from_utf8(made.stdout).unwrap().trim().to_owned();
    (endpoint, key_id)
}

/// A sidecar measured: a storage backend, the algorithm of its signing key, and whether it
/// exports traces.
struct Target {
    name: &'static str,
    storage: &'static str,
    alg: Alg,
    traced: bool,
    /// Whether the revocation view is on (the default).
    cache: bool,
    /// Where the key signs: a file, a PKCS#11 token (a SoftHSM2 token made for the run) or
    /// AWS KMS (moto's emulator, started for the run).
    source: KeySource,
    /// Whether rate-limit steps are gathered into one round trip (`--store-batch`, the
    /// default) or each goes alone (`--store-batch 0`).
    batch: bool,
}

/// Every backend with an HS256 key, the memory backend with each public-key algorithm, and
/// the memory backend exporting every span to an OTLP collector.
const TARGETS: [Target; 16] = [
    Target::hs256("memory"),
    Target::hs256("redis"),
    Target::hs256("postgres"),
    Target::hs256("tiered"),
    Target::unbatched("redis unbatched", "redis"),
    Target::unbatched("postgres unbatched", "postgres"),
    Target::unbatched("tiered unbatched", "tiered"),
    Target::uncached("redis no view", "redis"),
    Target::uncached("postgres no view", "postgres"),
    Target::uncached("tiered no view", "tiered"),
    Target::keyed("memory ES256", Alg::ES256),
    Target::keyed("memory EdDSA", Alg::EdDSA),
    Target::keyed("memory RS256", Alg::RS256),
    Target {
        name: "memory HSM ES256",
        storage: "memory",
        alg: Alg::ES256,
        traced: false,
        cache: true,
        source: KeySource::Hsm,
        batch: true,
    },
    Target {
        name: "memory KMS ES256",
        storage: "memory",
        alg: Alg::ES256,
        traced: false,
        cache: true,
        source: KeySource::Kms,
        batch: true,
    },
    Target {
        name: "memory traced",
        storage: "memory",
        alg: Alg::HS256,
        traced: true,
        cache: true,
        source: KeySource::File,
        batch: true,
    },
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeySource {
    File,
    Hsm,
    Kms,
}

impl Target {
    const fn hs256(storage: &'static str) -> Target {
        Target {
            name: storage,
            storage,
            alg: Alg::HS256,
            traced: false,
            cache: true,
            source: KeySource::File,
            batch: true,
        }
    }

    const fn uncached(name: &'static str, storage: &'static str) -> Target {
        Target {
            name,
            storage,
            alg: Alg::HS256,
            traced: false,
            cache: false,
            source: KeySource::File,
            batch: true,
        }
    }

    /// CheckRateLimit only, each step its own round trip: the "before" of group commit.
    const fn unbatched(name: &'static str, storage: &'static str) -> Target {
        Target {
            batch: false,
            ..Target::hs256(storage)
        }
        .named(name)
    }

    const fn named(self, name: &'static str) -> Target {
        Target { name, ..self }
    }

    const fn keyed(name: &'static str, alg: Alg) -> Target {
        Target {
            name,
            storage: "memory",
            alg,
            traced: false,
            cache: true,
            source: KeySource::File,
            batch: true,
        }
    }
}

const BENCH_DATABASE: &str = "auth_sidecar_bench";

/// The MFA key of every sidecar measured.
const MFA_KEY: &str = "bench:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A scenario against the sidecar of one backend.
#[derive(Clone, Copy)]
struct Case {
    scenario: Scenario,
    backend: usize,
}

impl Case {
    fn name(self) -> String {
        let backend = TARGETS[self.backend].name;
        match self.scenario {
            Scenario::Check => format!("Check ({backend})"),
            Scenario::Validate => format!("Validate ({backend})"),
            Scenario::ValidateSession => format!("Validate in session ({backend})"),
            Scenario::ValidateDistinct => format!("Validate misses ({backend})"),
            Scenario::Issue => format!("Issue ({backend})"),
            Scenario::RateLimit => format!("CheckRateLimit ({backend})"),
            Scenario::RateLimitDenied => format!("CheckRateLimit denied ({backend})"),
            Scenario::ExtAuthz => format!("ext_authz Check ({backend})"),
            Scenario::ShouldRateLimit => format!("ShouldRateLimit ({backend})"),
            Scenario::VerifyTotp => format!("VerifyTotp ({backend})"),
        }
    }
}

struct Round {
    rps: f64,
    /// CPU time the sidecar process spent per call, user and system.
    server_cpu: Duration,
    /// CPU time the backend spent per call: Redis's own count, or the machine's PostgreSQL
    /// processes'; zero on memory.
    backend_cpu: Duration,
    p50: Duration,
    p99: Duration,
}

fn main() {
    let opts = Options::from_args();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // With two cores or more, the sidecar gets a core of its own (one worker thread, as a
    // sidecar with a one-CPU limit would run) and the load generator the others, so that
    // the figures measure the server rather than the scheduler's interleaving of the two.
    let pinned = cores >= 2;
    prepare_backends();
    let keys_dir = tempfile::tempdir().unwrap();
    let collector = start_collector();
    let sidecars: Vec<(Child, String)> = TARGETS
        .iter()
        .map(|t| start_sidecar(t, keys_dir.path(), &collector, pinned))
        .collect();
    if pinned {
        set_affinity(0, (1..cores).collect());
        // The machine's Redis and PostgreSQL (and the backends PostgreSQL forks later) share
        // the load generator's cores: a backend on the sidecar's core would make its figures
        // those of the two together, as they never are in a pod.
        for server in ["redis-server", "postgres"] {
            for pid in pids(server) {
                set_affinity(pid as libc::pid_t, (1..cores).collect());
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads((cores - 1).max(1))
        .enable_all()
        .build()
        .unwrap();
    // The ceiling first, then every backend's Validate and Issue; the verify cache's miss
    // path (which verifies a signature on every call) on memory, where the store adds
    // nothing to it, for each algorithm.
    let mut cases = vec![Case {
        scenario: Scenario::Check,
        backend: 0,
    }];
    for (backend, target) in TARGETS.iter().enumerate() {
        let name = target.name;
        if !target.batch || ["postgres", "tiered"].contains(&name) {
            cases.push(Case {
                scenario: Scenario::RateLimit,
                backend,
            });
        }
        if !target.batch {
            continue;
        }
        cases.push(Case {
            scenario: Scenario::Validate,
            backend,
        });
        if name == "redis" || name == "tiered" {
            cases.push(Case {
                scenario: Scenario::ValidateSession,
                backend,
            });
        }
        if target.traced {
            continue;
        }
        // The miss path of the verify cache on memory (where the store adds nothing), for
        // each algorithm; on the shared backends, 20,000 tokens the revocation view holds
        // once warm, or, without the view, 20,000 tokens read from the backend.
        if target.storage == "memory" || target.alg == Alg::HS256 {
            cases.push(Case {
                scenario: Scenario::ValidateDistinct,
                backend,
            });
        }
        cases.push(Case {
            scenario: Scenario::Issue,
            backend,
        });
        if name == "memory" || name == "redis" {
            for scenario in [
                Scenario::RateLimit,
                Scenario::ExtAuthz,
                Scenario::ShouldRateLimit,
                Scenario::VerifyTotp,
            ] {
                cases.push(Case { scenario, backend });
            }
        }
        if ["redis", "redis no view", "postgres", "postgres no view"].contains(&name) {
            cases.push(Case {
                scenario: Scenario::RateLimitDenied,
                backend,
            });
        }
    }
    // Check stays in every run: it is the baseline of the ratios.
    cases.retain(|c| {
        c.scenario == Scenario::Check
            || opts
                .only
                .as_ref()
                .is_none_or(|o| c.name().contains(o.as_str()))
    });
    let mut results: Vec<Vec<Round>> = cases.iter().map(|_| Vec::new()).collect();
    runtime.block_on(async {
        let mut channels = Vec::new();
        for (_, api) in &sidecars {
            channels.push(connect_all(api, opts.connections).await);
        }
        // Tokens of each sidecar's own key; many where the miss path is measured.
        let mut tokens = Vec::new();
        // Subjects enrolled in MFA, one per caller, with their secrets.
        let mut enrolled = Vec::new();
        for (backend, c) in channels.iter().enumerate() {
            let misses = cases
                .iter()
                .any(|c| c.backend == backend && c.scenario == Scenario::ValidateDistinct);
            let n = if misses { DISTINCT_TOKENS } else { 1 };
            let mut pool = issue_tokens(&c[0], n).await;
            // The last one is bound to a session, for ValidateSession.
            pool.push(issue_in_session(&c[0]).await);
            tokens.push(Arc::new(pool));
            let verifies = cases
                .iter()
                .any(|c| c.backend == backend && c.scenario == Scenario::VerifyTotp);
            let n = if verifies { opts.concurrency } else { 0 };
            enrolled.push(Arc::new(enroll(&c[0], n).await));
        }
        // Warm up connections, allocator and caches; the distinct tokens each once, so that
        // the shared backends' revocation views hold them ("once warm").
        for &c in &cases {
            if c.scenario == Scenario::ValidateDistinct {
                validate_each(&channels[c.backend], &tokens[c.backend]).await;
            }
        }
        for &c in &cases {
            let warmup = Duration::from_millis(500);
            run(
                c.scenario,
                &channels[c.backend],
                (&tokens[c.backend], &enrolled[c.backend]),
                opts.concurrency,
                warmup,
            )
            .await;
        }
        for _ in 0..opts.rounds {
            for (i, c) in cases.iter().enumerate() {
                let d = Duration::from_secs_f64(opts.seconds);
                let pid = sidecars[c.backend].0.id();
                let storage = TARGETS[c.backend].storage;
                let backend_before = backend_cpu(storage);
                let cpu_before = cpu_time(pid);
                let mut round = run(
                    c.scenario,
                    &channels[c.backend],
                    (&tokens[c.backend], &enrolled[c.backend]),
                    opts.concurrency,
                    d,
                )
                .await;
                let calls = round.rps * d.as_secs_f64();
                round.server_cpu = (cpu_time(pid) - cpu_before).div_f64(calls);
                round.backend_cpu = (backend_cpu(storage) - backend_before).div_f64(calls);
                results[i].push(round);
            }
        }
    });
    // Staleness across nodes: a second sidecar on the storage of each cached target.
    let mut staleness = Vec::new();
    if opts.only.is_none() {
        for storage in ["redis", "tiered", "postgres"] {
            let a = TARGETS
                .iter()
                .position(|t| t.name == storage)
                .expect("a target per storage");
            let (mut b, b_api) = start_sidecar(&TARGETS[a], keys_dir.path(), &collector, false);
            let report = runtime.block_on(measure_staleness(&sidecars[a].1, &b_api));
            staleness.push((storage, report));
            let _ = b.kill();
            let _ = b.wait();
        }
    }
    for (mut child, _) in sidecars {
        let _ = child.kill();
        let _ = child.wait();
    }

    println!(
        "auth-sidecar load: {} rounds x {}s, {} calls in flight over {} connections, {} cores{}",
        opts.rounds,
        opts.seconds,
        opts.concurrency,
        opts.connections,
        cores,
        if pinned {
            ", sidecar pinned to core 0 with 1 worker"
        } else {
            ""
        }
    );
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>9} {:>14} {:>14}",
        "scenario", "req/s", "p50", "p99", "vs Check", "server cpu/call", "backend cpu/call"
    );
    let ceiling = median(results[0].iter().map(|r| r.rps));
    for (c, rounds) in cases.iter().zip(&results) {
        let rps = median(rounds.iter().map(|r| r.rps));
        let p50 = median(rounds.iter().map(|r| r.p50.as_secs_f64() * 1e6));
        let p99 = median(rounds.iter().map(|r| r.p99.as_secs_f64() * 1e6));
        let cpu = median(rounds.iter().map(|r| r.server_cpu.as_secs_f64() * 1e6));
        let backend = median(rounds.iter().map(|r| r.backend_cpu.as_secs_f64() * 1e6));
        println!(
            "{:<36} {:>10.0} {:>8.0}us {:>8.0}us {:>8.2}x {:>12.1}us {:>14.1}us",
            c.name(),
            rps,
            p50,
            p99,
            rps / ceiling,
            cpu,
            backend
        );
    }
    for (storage, (samples, accepted)) in staleness {
        let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
        println!(
            "staleness ({storage}): {} revocations, Revoke OK on node A to first rejection on \
             node B under load: p50 {:?}, p99 {:?}, max {:?}; {accepted} Validates accepted \
             after the OK",
            samples.len(),
            at(0.5),
            at(0.99),
            samples[samples.len() - 1]
        );
    }
}

/// Revocations measured per storage by the staleness run.
const STALENESS_SAMPLES: usize = 2000;

/// Revokes tokens on `a`, each held in `b`'s view, while `b` serves a load of Validates; for
/// each, the time from the Revoke's OK to the sending of the first Validate on `b` that
/// rejects it. Returns the sorted samples and how many Validates accepted a token after its
/// Revoke's OK.
async fn measure_staleness(a: &str, b: &str) -> (Vec<Duration>, u64) {
    let (a, b) = (&connect_all(a, 1).await[0], connect_all(b, 2).await);
    // The feed of a fresh sidecar goes live within milliseconds; give it a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tokens = issue_tokens(a, STALENESS_SAMPLES + 1).await;
    let mut observer = TokenServiceClient::new(b[0].clone());
    for t in tokens.iter().chain(tokens.iter()) {
        validate(&mut observer, t).await;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..16)
        .map(|_| {
            let (mut api, stop) = (TokenServiceClient::new(b[1].clone()), stop.clone());
            let hot = tokens[STALENESS_SAMPLES].clone();
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    validate(&mut api, &hot).await;
                }
            })
        })
        .collect();
    let mut revoker = TokenServiceClient::new(a.clone());
    let mut samples = Vec::with_capacity(STALENESS_SAMPLES);
    let mut accepted = 0;
    for t in &tokens[..STALENESS_SAMPLES] {
        revoker
            .revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::Token(t.clone())),
                reason: "bench".into(),
            })
            .await
            .unwrap();
        let ok = Instant::now();
        loop {
            let sent = Instant::now();
            let answer = validate(&mut observer, t).await;
            if !answer.valid {
                samples.push(sent - ok);
                break;
            }
            accepted += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    samples.sort();
    (samples, accepted)
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

async fn issue_tokens(channel: &Channel, n: usize) -> Vec<String> {
    let mut client = TokenServiceClient::new(channel.clone());
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        let resp = client
            .issue(pb::IssueRequest {
                subject: format!("user-{i}"),
                ..Default::default()
            })
            .await
            .unwrap();
        tokens.push(resp.into_inner().token);
    }
    tokens
}

/// One Validate of `token`, with the sidecar's defaults.
async fn validate(api: &mut TokenServiceClient<Channel>, token: &str) -> pb::ValidateResponse {
    api.validate(pb::ValidateRequest {
        token: token.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// Validates every token once, 32 at a time.
async fn validate_each(channels: &[Channel], tokens: &Arc<Vec<String>>) {
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let mut api = TokenServiceClient::new(channels[i % channels.len()].clone());
            let tokens = tokens.clone();
            tokio::spawn(async move {
                for token in tokens.iter().skip(i).step_by(32) {
                    validate(&mut api, token).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// A token bound to a new session.
async fn issue_in_session(channel: &Channel) -> String {
    let mut client = TokenServiceClient::new(channel.clone());
    let session = client
        .create_session(pb::CreateSessionRequest {
            subject: "bench".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    client
        .issue(pb::IssueRequest {
            subject: "bench".into(),
            session_id: session.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// Subjects enrolled in MFA and their secrets.
type Enrolled = Arc<Vec<(String, Vec<u8>)>>;

/// `n` subjects enrolled in MFA through `channel`.
async fn enroll(channel: &Channel, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut mfa = MfaServiceClient::new(channel.clone());
    let mut enrolled = Vec::with_capacity(n);
    for i in 0..n {
        let subject = format!("mfa-bench-{i}");
        let begun = mfa
            .begin_totp_enrollment(pb::BeginTotpEnrollmentRequest {
                subject: subject.clone(),
                account_label: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let secret = data_encoding::BASE32_NOPAD
            .decode(begun.secret.as_bytes())
            .unwrap();
        mfa.confirm_totp_enrollment(pb::ConfirmTotpEnrollmentRequest {
            subject: subject.clone(),
            code: totp::code(&secret, totp_step()),
        })
        .await
        .unwrap();
        enrolled.push((subject, secret));
    }
    enrolled
}

fn totp_step() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    totp::step_at(now.as_secs())
}

async fn run(
    scenario: Scenario,
    channels: &[Channel],
    (tokens, enrolled): (&Arc<Vec<String>>, &Enrolled),
    concurrency: usize,
    duration: Duration,
) -> Round {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let channel = channels[i % channels.len()].clone();
        let tokens = tokens.clone();
        let enrolled = enrolled.clone();
        tasks.push(tokio::spawn(async move {
            // Each task walks its own stride of the pool; task 0's first token is the hot one.
            let mut next = i;
            let mut hist = Histogram::<u64>::new(3).unwrap();
            let mut health = HealthClient::new(channel.clone());
            let mut authz = tonic::client::Grpc::new(channel.clone());
            let check = Encoded(prost::Message::encode_to_vec(&envoy_check(&tokens[0])).into());
            let mut rls = RateLimitServiceClient::new(channel.clone());
            let mut mfa = MfaServiceClient::new(channel.clone());
            let mut api = TokenServiceClient::new(channel);
            while Instant::now() < deadline {
                let t = Instant::now();
                match scenario {
                    Scenario::Check => {
                        health
                            .check(HealthCheckRequest {
                                service: String::new(),
                            })
                            .await
                            .unwrap();
                    }
                    Scenario::Validate | Scenario::ValidateSession | Scenario::ValidateDistinct => {
                        let token = match scenario {
                            Scenario::Validate => tokens[0].clone(),
                            Scenario::ValidateSession => tokens[tokens.len() - 1].clone(),
                            _ => {
                                next = (next + concurrency) % (tokens.len() - 1);
                                tokens[next].clone()
                            }
                        };
                        assert!(validate(&mut api, &token).await.valid);
                    }
                    Scenario::RateLimitDenied => {
                        let r = api
                            .check_rate_limit(pb::CheckRateLimitRequest {
                                policy: "denied".into(),
                                key: "hot".into(),
                                cost: None,
                            })
                            .await
                            .unwrap();
                        assert!(!r.get_ref().allowed || r.get_ref().remaining == 0);
                    }
                    Scenario::RateLimit => {
                        // Keys of the caller's own, 100 in turn (3,200 in all, each stored
                        // once warm): the step's own cost on many distinct keys, not
                        // contention on one, nor the first insert of each key.
                        next = (next + 1) % 100;
                        let r = api
                            .check_rate_limit(pb::CheckRateLimitRequest {
                                policy: "bench".into(),
                                key: format!("caller-{i}-{next}"),
                                cost: None,
                            })
                            .await
                            .unwrap();
                        assert!(r.get_ref().allowed);
                    }
                    Scenario::ExtAuthz => {
                        authz.ready().await.unwrap();
                        let codec = tonic_prost::ProstCodec::<Encoded, CheckResponse>::default();
                        let path = http::uri::PathAndQuery::from_static(
                            "/envoy.service.auth.v3.Authorization/Check",
                        );
                        let request = tonic::Request::new(check.clone());
                        let resp = authz.unary(request, path, codec).await.unwrap();
                        assert_eq!(resp.get_ref().status.as_ref().unwrap().code, 0);
                    }
                    Scenario::ShouldRateLimit => {
                        let entry = |key: &str, value: String| Entry {
                            key: key.into(),
                            value,
                        };
                        let descriptor = RateLimitDescriptor {
                            entries: vec![
                                entry("policy", "bench".into()),
                                entry("remote_address", format!("10.0.0.{i}")),
                            ],
                            ..Default::default()
                        };
                        rls.should_rate_limit(RateLimitRequest {
                            domain: "bench".into(),
                            descriptors: vec![descriptor],
                            hits_addend: 0,
                        })
                        .await
                        .unwrap();
                    }
                    Scenario::VerifyTotp => {
                        let (subject, secret) = &enrolled[i];
                        let r = mfa
                            .verify_totp(pb::VerifyTotpRequest {
                                subject: subject.clone(),
                                code: totp::code(secret, totp_step()),
                            })
                            .await
                            .unwrap()
                            .into_inner();
                        assert!(r.valid || r.reason() == pb::MfaInvalidReason::Replayed);
                    }
                    Scenario::Issue => {
                        api.issue(pb::IssueRequest {
                            subject: "bench".into(),
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    }
                }
                hist.record(t.elapsed().as_nanos() as u64).unwrap();
            }
            hist
        }));
    }
    let mut total = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        total.add(t.await.unwrap()).unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    Round {
        rps: total.len() as f64 / elapsed,
        server_cpu: Duration::ZERO,
        backend_cpu: Duration::ZERO,
        p50: Duration::from_nanos(total.value_at_quantile(0.5)),
        p99: Duration::from_nanos(total.value_at_quantile(0.99)),
    }
}

/// A message encoded once and sent as its bytes. Envoy encodes its CheckRequest in C++; were
/// the load generator to encode a dozen headers per call, its one core, not the sidecar,
/// would set the rate.
#[derive(Clone, Debug, Default)]
struct Encoded(bytes::Bytes);

impl prost::Message for Encoded {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = bytes::Bytes::new();
    }
}

/// A CheckRequest as Envoy's ext_authz filter sends it for a browser's GET: the peers, the
/// request line and a dozen headers, one of them the bearer token.
fn envoy_check(token: &str) -> CheckRequest {
    use envoy_types::pb::envoy::config::core::v3::{
        Address, SocketAddress, address, socket_address,
    };
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Peer, Request,
    };
    let peer = |ip: &str, port: u32| Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    let headers = [
        (":authority", "app.example.com"),
        (":method", "GET"),
        (":path", "/api/orders?page=2"),
        (":scheme", "https"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        ("accept-language", "en-GB,en;q=0.9"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36",
        ),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "6f1c2a9e-3b7d-4c1e-9a2f-1d2e3f4a5b6c"),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
    ];
    let mut headers: std::collections::HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    headers.insert("authorization".into(), format!("Bearer {token}"));
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("10.0.0.7", 51234)),
            destination: Some(peer("10.0.0.9", 8000)),
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "4217309152773318402".into(),
                    method: "GET".into(),
                    path: "/api/orders?page=2".into(),
                    host: "app.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn connect_all(api: &str, n: usize) -> Vec<Channel> {
    let mut channels = Vec::new();
    for _ in 0..n {
        // One endpoint per connection: a cloned Channel would share one HTTP/2 connection.
        let channel = auth_sidecar::client::endpoint(api)
            .unwrap()
            .connect()
            .await
            .unwrap();
        channels.push(channel);
    }
    channels
}

/// User plus system CPU time of a process so far, from /proc (Linux).
fn cpu_time(pid: u32) -> Duration {
    cpu_time_of(pid).expect("read /proc stat")
}

/// The same, or `None` once the process is gone.
fn cpu_time_of(pid: u32) -> Option<Duration> {
    support::cpu_time(pid)
}

/// CPU time the backend of `storage` has spent so far: Redis's `used_cpu_user` and
/// `used_cpu_sys` from `INFO cpu` (redis, and tiered, whose steps go to Redis), or every
/// process of the machine's PostgreSQL (postgres); zero for memory.
fn backend_cpu(storage: &str) -> Duration {
    match storage {
        "redis" | "tiered" => {
            let out = Command::new("redis-cli")
                .args(["-p", "6379", "INFO", "cpu"])
                .output()
                .expect("redis-cli runs");
            let info = String::from_utf8_lossy(&out.stdout);
            let field = |name: &str| -> f64 {
                info.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
                    .expect("INFO cpu has the field")
            };
            Duration::from_secs_f64(field("used_cpu_user") + field("used_cpu_sys"))
        }
        "postgres" => pids("postgres").into_iter().filter_map(cpu_time_of).sum(),
        _ => Duration::ZERO,
    }
}

/// The processes named `name`, as pgrep finds them.
fn pids(name: &str) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-x", name])
        .output()
        .expect("pgrep runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|pid| pid.trim().parse().ok())
        .collect()
}

/// Binds process `pid` (0: this one) to `cpus`.
fn set_affinity(pid: libc::pid_t, cpus: Vec<usize>) {
    // SAFETY: a zeroed cpu_set_t is an empty set; the calls only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        let rc = libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "sched_setaffinity failed");
    }
}

/// A fresh database for the PostgreSQL-backed sidecars (the machine's shared server).
fn prepare_backends() {
    for sql in [
        format!("DROP DATABASE IF EXISTS {BENCH_DATABASE} WITH (FORCE)"),
        format!("CREATE DATABASE {BENCH_DATABASE}"),
    ] {
        let ok = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qc",
                &sql,
            ])
            .status()
            .expect("run psql")
            .success();
        assert!(ok, "psql {sql} failed");
    }
}

/// An OTLP trace collector that accepts and drops every span, on a thread of its own; returns
/// its endpoint.
fn start_collector() -> String {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    struct Drop;
    #[tonic::async_trait]
    impl TraceService for Drop {
        async fn export(
            &self,
            _: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(Drop))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
    });
    endpoint
}

fn start_sidecar(
    target: &Target,
    keys_root: &std::path::Path,
    collector: &str,
    pinned: bool,
) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_auth-sidecar"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--ops-listen",
        "127.0.0.1:0",
    ])
    .args(["--storage", target.storage, "--redis-prefix", "bench:"])
    .args([
        "--rate-limit",
        "bench=1000000/1s",
        "--rate-limit",
        "denied=1/1h",
    ])
    .args([
        "--revocation-cache",
        if target.cache { "64MiB" } else { "0" },
    ])
    .args(["--store-batch", if target.batch { "64" } else { "0" }])
    .env("REDIS_URL", "redis://127.0.0.1:6379")
    .env(
        "DATABASE_URL",
        format!("postgres://postgres@127.0.0.1:5432/{BENCH_DATABASE}"),
    )
    .args(["--mfa-verify-limit", "1000000/1s"])
    .env("AUTH_MFA_KEY", MFA_KEY)
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if target.traced {
        cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", collector);
    } else {
        cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    }
    if target.source == KeySource::Kms {
        let dir = keys_root.join("kms");
        std::fs::create_dir_all(&dir).unwrap();
        let (endpoint, key_id) = kms_emulator();
        std::fs::write(
            dir.join(keys::MANIFEST),
            format!(
                "[[key]]\nkid = \"bench\"\nalg = \"ES256\"\nsource = \"aws-kms\"\nkey_id = \"{key_id}\"\nregion = \"eu-west-1\"\nendpoint_url = \"{endpoint}\"\nstate = \"active\"\n"
            ),
        )
        .unwrap();
        cmd.envs([
            ("AWS_ACCESS_KEY_ID", "bench"),
            ("AWS_SECRET_ACCESS_KEY", "bench"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ])
        .arg("--keys-dir")
        .arg(dir);
    } else if target.source == KeySource::Hsm {
        let dir = keys_root.join("hsm");
        std::fs::create_dir_all(dir.join("tokens")).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.join("tokens").display()
            ),
        )
        .unwrap();
        let env = [
            ("SOFTHSM2_CONF", conf.display().to_string()),
            ("CRYPTOKI_LIB", "/usr/lib/softhsm/libsofthsm2.so".to_owned()),
            ("PKCS11_PIN", "bench-pin".to_owned()),
        ];
        let init = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", "bench"])
            .args(["--so-pin", "bench-so", "--pin", "bench-pin"])
            .envs(env.clone())
            .output()
            .expect("softhsm2-util (Debian's softhsm2) runs");
        assert!(init.status.success(), "{init:?}");
        let entry = Command::new(env!("CARGO_BIN_EXE_auth-sidecar"))
            .args(["keys", "generate", "--pkcs11", "--alg", target.alg.as_str()])
            .args(["--kid", "bench"])
            .envs(env.clone())
            .output()
            .unwrap();
        assert!(entry.status.success(), "{entry:?}");
        let manifest = String::from_utf8(entry.stdout)
            .unwrap()
            .replace("\"verify\"", "\"active\"");
        std::fs::write(dir.join(keys::MANIFEST), manifest).unwrap();
        cmd.envs(env).arg("--keys-dir").arg(dir);
    } else if target.alg == Alg::HS256 {
        cmd.env("AUTH_JWT_SECRET", SECRET);
    } else {
        let dir = keys_root.join(target.alg.as_str());
        std::fs::create_dir(&dir).unwrap();
        let file = format!("{}.pem", target.alg);
        std::fs::write(dir.join(&file), keys::generate(target.alg).unwrap()).unwrap();
        std::fs::write(
            dir.join(keys::MANIFEST),
            format!(
                "[[key]]\nkid = \"bench\"\nalg = \"{}\"\nfile = \"{file}\"\nstate = \"active\"\n",
                target.alg
            ),
        )
        .unwrap();
        cmd.arg("--keys-dir").arg(dir);
    }
    if pinned {
        cmd.env("TOKIO_WORKER_THREADS", "1");
    }
    // SAFETY: prctl only sets the child's parent-death signal: a panicking run leaves no
    // sidecar behind.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn auth-sidecar");
    if pinned {
        set_affinity(child.id() as libc::pid_t, vec![0]);
    }
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let api = loop {
        let line = lines.next().expect("sidecar exited").unwrap();
        if let Some(rest) = line.split(" serving api=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    // Keep draining the log so the sidecar never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, api)
}
