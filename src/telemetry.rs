//! Logs, traces and metrics. Logs go to stderr as text or JSON lines. Traces are exported over
//! OTLP/gRPC only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and cost nothing otherwise. Metrics
//! are kept in a Prometheus recorder that the ops listener renders at `/metrics`.
//!
//! The API server's [`RpcLayer`] gives every call a span (continuing the caller's W3C trace
//! context), a request counter and a latency histogram; the domain code adds its outcome to the
//! current span and counts it here. Nothing here ever records a token, a secret or a claim.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Whether spans are exported. Without an exporter the per-call and per-store-call spans are
/// not made at all: with only the log layer they would cost a formatting of their fields on
/// every call and show nowhere.
static EXPORTING: AtomicBool = AtomicBool::new(false);

pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Keeps the trace exporter alive; flushes it when dropped.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Sets up logging and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, trace export. `level`
/// overrides `RUST_LOG`; without either, `info`. Call inside the tokio runtime.
pub fn init(format: LogFormat, level: Option<&str>) -> anyhow::Result<Telemetry> {
    use std::io::IsTerminal;
    let filter = match level {
        Some(level) => EnvFilter::try_new(level)?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let tracer = otlp_tracer()?;
    EXPORTING.store(tracer.is_some(), Ordering::Relaxed);
    let otel = tracer
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("auth-sidecar")));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(no_aws_debug))
        .with(otel);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => registry
            .with(
                fmt.fmt_fields(escaped_fields())
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .try_init()?,
        LogFormat::Json => registry
            .with(fmt.json().flatten_event(true).with_current_span(false))
            .try_init()?,
    }
    Ok(Telemetry { tracer })
}

/// Whether an event or span may be recorded at all, whatever the filter asks: the AWS SDK's
/// crates log the credentials they resolve (an access key id, a session's expiry) at debug
/// and trace, so nothing of theirs below info is kept.
fn no_aws_debug(meta: &tracing::Metadata<'_>) -> bool {
    !(meta.target().starts_with("aws_") && *meta.level() > tracing::Level::INFO)
}

/// The text formatter's fields, `name=value` apart from the message, with every control
/// character escaped: a caller's string (a subject, a key) holding a newline or a terminal
/// escape cannot start a forged line or drive the operator's terminal. (JSON escapes them.)
fn escaped_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync {
    use std::fmt::Write;
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        if field.name() != "message" {
            write!(w, "{field}=")?;
        }
        let mut text = String::new();
        write!(text, "{value:?}")?;
        w.write_str(&escape_control(&text))
    })
    .delimited(" ")
}

/// `text` with every control character escaped (`\n`, `\u{1b}`), for a log line or a
/// terminal.
pub fn escape_control(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether the standard environment asks for trace export.
pub fn tracing_enabled() -> bool {
    let endpoint = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    endpoint && std::env::var("OTEL_SDK_DISABLED").as_deref() != Ok("true")
}

/// The OTLP exporter the standard environment asks for, if any.
fn otlp_tracer() -> anyhow::Result<Option<SdkTracerProvider>> {
    if !tracing_enabled() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by the default resource.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("auth-sidecar");
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    Ok(Some(provider))
}

/// The process-wide metrics recorder, installed at the first call.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ])
            .expect("bucket bounds are not empty")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    "authsidecar_backend_batch_calls".into(),
                ),
                &[
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
                ],
            )
            .expect("bucket bounds are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if a recorder is already set; the handle still renders then.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Drains the recorder's histogram samples into buckets on a schedule. Without it, samples
/// pile up until a scrape renders them: memory grows with every call on a sidecar nobody
/// scrapes. Call inside the runtime.
pub fn spawn_upkeep() {
    let handle = metrics();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            handle.run_upkeep();
            record_memory();
        }
    });
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "authsidecar_rpc_requests_total",
        "RPCs served, by method and gRPC code; the HTTP calls of the API listener (ForwardAuth, \
         OAuthIntrospect, OAuthRevoke) by the gRPC code their HTTP status stands for"
    );
    describe_histogram!("authsidecar_rpc_duration_seconds", "RPC latency, by method");
    describe_counter!(
        "authsidecar_validations_total",
        "Validate, ext_authz, forward-auth and introspection answers, by result (valid, malformed, bad_signature, expired, \
         not_yet_valid, revoked, wrong_audience, wrong_issuer, unknown_key, wrong_kind)"
    );
    describe_counter!(
        "authsidecar_mfa_verifications_total",
        "VerifyTotp and VerifyBackupCode answers, by method (totp, backup_code) and result \
         (valid, wrong_code, replayed, not_enrolled)"
    );
    describe_counter!(
        "authsidecar_rate_limit_decisions_total",
        "CheckRateLimit answers, by policy and decision (allowed, denied)"
    );
    describe_histogram!(
        "authsidecar_backend_duration_seconds",
        "Store call latency, by backend (redis, postgres) and operation"
    );
    describe_histogram!(
        "authsidecar_backend_batch_calls",
        "Calls carried by one round trip to the store, by backend (redis, postgres) and \
         operation (rate_limit); see --store-batch"
    );
    describe_counter!(
        "authsidecar_backend_errors_total",
        "Store calls that failed or timed out, by backend (redis, postgres) and operation"
    );
    describe_gauge!(
        "authsidecar_backend_up",
        "1 while the store answers its pings, by backend (memory, redis, postgres, tiered)"
    );
    for (name, help) in [
        (
            "authsidecar_revocation_cache_hits_total",
            "Token checks the revocation view answered, by backend (redis, postgres)",
        ),
        (
            "authsidecar_revocation_cache_misses_total",
            "Token checks the revocation view sent to the backend, by backend (redis, postgres)",
        ),
        (
            "authsidecar_revocation_cache_invalidations_total",
            "Changes the feed reported, each dropping a key from the revocation view, by backend \
             (redis, postgres)",
        ),
    ] {
        describe_counter!(name, help);
    }
    describe_counter!(
        "authsidecar_revocation_cache_flushes_total",
        "Times the revocation view was emptied, by backend (redis, postgres) and cause \
         (feed_down, backend_flush, proof_gap)"
    );
    describe_gauge!(
        "authsidecar_revocation_cache_feed_up",
        "1 while the revocation view's change feed is proven live, by backend (redis, postgres)"
    );
    describe_gauge!(
        "authsidecar_keys_active",
        "1 for the kid that signs new tokens"
    );
    describe_gauge!(
        "authsidecar_keys_last_reload_timestamp_seconds",
        "When the key set in use was loaded"
    );
    describe_counter!(
        "authsidecar_keys_reload_failures_total",
        "Key set reloads refused (the old set stays in use)"
    );
    describe_gauge!(
        "authsidecar_cluster_disagreements",
        "Live nodes that disagree with this one, by item (keys, policies, issuer, audience, ttl, \
         admin, mfa, oauth, node_id)"
    );
    describe_gauge!(
        "authsidecar_cluster_nodes",
        "Live nodes in the shared registry at the last heartbeat, this one included"
    );
    describe_counter!(
        "authsidecar_oauth_client_failures_total",
        "OAuth client authentications that failed (an unknown client or a wrong secret); see \
         --oauth-client-limit"
    );
    describe_counter!(
        "authsidecar_lockouts_total",
        "Attempts refused by a lockout policy, by policy (admin_login, mfa_verify, oauth_client)"
    );
    describe_gauge!(
        "authsidecar_signer_up",
        "1 while the active signing key signs (for a key in a PKCS#11 token or a KMS, its \
         last signature or probe)"
    );
    describe_counter!(
        "authsidecar_signer_calls_total",
        "Calls to a key source that signs elsewhere, by source (aws-kms) and result (ok, \
         throttled, error); one Issue makes one call, more when a throttled call is retried"
    );
    describe_histogram!(
        "authsidecar_signer_call_duration_seconds",
        "Latency of one call to a key source that signs elsewhere, by source (aws-kms)"
    );
    describe_gauge!(
        "authsidecar_signer_in_flight",
        "Calls to a key source in flight now, by source (aws-kms); at most the key's max_in_flight"
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        "Resident memory of this process, in bytes"
    );
    describe_gauge!(
        "authsidecar_memory_limit_bytes",
        "The container's memory limit (its cgroup's), in bytes; absent without one"
    );
    describe_gauge!(
        "authsidecar_build_info",
        "Version and git commit of this binary"
    );
}

/// Records how many live nodes disagree with this one on `item`.
pub fn record_cluster_disagreements(item: &'static str, count: usize) {
    metrics::gauge!("authsidecar_cluster_disagreements", "item" => item).set(count as f64);
}

pub fn record_cluster_nodes(count: usize) {
    metrics::gauge!("authsidecar_cluster_nodes").set(count as f64);
}

/// Records the build once.
pub fn record_build_info() {
    metrics::gauge!(
        "authsidecar_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "git_commit" => option_env!("AUTH_SIDECAR_GIT_COMMIT").unwrap_or("unknown"),
    )
    .set(1.0);
}

/// Records a Validate answer on the current span and in the counters.
pub fn record_validation(result: &'static str) {
    tracing::Span::current().record("outcome", result);
    metrics::counter!("authsidecar_validations_total", "result" => result).increment(1);
}

/// Counts a failed OAuth client authentication (a wrong or unknown client secret).
pub fn record_oauth_client_failure() {
    tracing::Span::current().record("outcome", "invalid_client");
    metrics::counter!("authsidecar_oauth_client_failures_total").increment(1);
}

/// Counts an attempt refused by a lockout policy: `admin_login`, `mfa_verify` or
/// `oauth_client`.
pub fn record_lockout(policy: &'static str) {
    metrics::counter!("authsidecar_lockouts_total", "policy" => policy).increment(1);
}

/// Records whether the active signing key signs (a PKCS#11 token's probe; a file key always).
pub fn record_signer_up(up: bool) {
    metrics::gauge!("authsidecar_signer_up").set(if up { 1.0 } else { 0.0 });
}

/// Records the process's resident memory and, when the container has one, its memory limit
/// (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`), so that an alert can compare them.
fn record_memory() {
    let resident_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        });
    if let Some(kib) = resident_kib {
        metrics::gauge!("process_resident_memory_bytes").set(kib * 1024.0);
    }
    let limit = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|path| {
        std::fs::read_to_string(path)
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
    })
    // v1 reports "no limit" as a number near 2^63.
    .filter(|limit| *limit < 1e18);
    if let Some(limit) = limit {
        metrics::gauge!("authsidecar_memory_limit_bytes").set(limit);
    }
}

/// Records an MFA code's verdict on the current span and in the counters.
pub fn record_mfa(method: &'static str, result: &'static str) {
    tracing::Span::current().record("outcome", result);
    metrics::counter!("authsidecar_mfa_verifications_total", "method" => method, "result" => result)
        .increment(1);
}

/// Records a rate-limit decision on the current span and in the counters.
pub fn record_rate_limit(policy: &str, allowed: bool) {
    let decision = if allowed { "allowed" } else { "denied" };
    tracing::Span::current().record("outcome", decision);
    metrics::counter!(
        "authsidecar_rate_limit_decisions_total",
        "policy" => policy.to_owned(),
        "decision" => decision,
    )
    .increment(1);
}

/// Records a store call's latency and, when it failed, the error.
pub fn record_backend_call(backend: &'static str, op: &'static str, started: Instant, ok: bool) {
    metrics::histogram!(
        "authsidecar_backend_duration_seconds",
        "backend" => backend,
        "op" => op,
    )
    .record(started.elapsed().as_secs_f64());
    if !ok {
        metrics::counter!("authsidecar_backend_errors_total", "backend" => backend, "op" => op)
            .increment(1);
    }
}

/// One call to a key source that signs elsewhere: in `authsidecar_signer_in_flight` while it
/// lives, then counted in `authsidecar_signer_calls_total` with its duration, as the result
/// it finished with (`ok`, `throttled`, `error`). A call dropped unfinished, cut off by a
/// deadline, counts as an `error`.
pub struct SignerCall {
    source: &'static str,
    started: Instant,
    result: &'static str,
}

impl SignerCall {
    pub fn start(source: &'static str) -> SignerCall {
        metrics::gauge!("authsidecar_signer_in_flight", "source" => source).increment(1.0);
        SignerCall {
            source,
            started: Instant::now(),
            result: "error",
        }
    }

    pub fn finish(mut self, result: &'static str) {
        self.result = result;
    }
}

impl Drop for SignerCall {
    fn drop(&mut self) {
        let (source, result) = (self.source, self.result);
        metrics::gauge!("authsidecar_signer_in_flight", "source" => source).decrement(1.0);
        metrics::counter!("authsidecar_signer_calls_total", "source" => source, "result" => result)
            .increment(1);
        metrics::histogram!("authsidecar_signer_call_duration_seconds", "source" => source)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// How many calls one round trip to a backend carried (see `store::batch`).
pub fn record_batch(backend: &'static str, op: &'static str, calls: usize) {
    metrics::histogram!("authsidecar_backend_batch_calls", "backend" => backend, "op" => op)
        .record(calls as f64);
}

pub fn record_backend_up(backend: &'static str, up: bool) {
    metrics::gauge!("authsidecar_backend_up", "backend" => backend).set(if up { 1.0 } else { 0.0 });
}

/// Records the key set now in use (after a start or a reload).
pub fn record_keys_loaded(previous_kid: Option<&str>, active_kid: &str) {
    if let Some(previous) = previous_kid.filter(|p| *p != active_kid) {
        metrics::gauge!("authsidecar_keys_active", "kid" => previous.to_owned()).set(0.0);
    }
    metrics::gauge!("authsidecar_keys_active", "kid" => active_kid.to_owned()).set(1.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics::gauge!("authsidecar_keys_last_reload_timestamp_seconds").set(now);
}

pub fn record_keys_reload_failure() {
    metrics::counter!("authsidecar_keys_reload_failures_total").increment(1);
}

/// W3C trace context from gRPC metadata (HTTP/2 headers).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// A tower layer for the API server: a span per call (child of the caller's `traceparent`),
/// the per-method request counter and latency histogram, and a debug line per call.
#[derive(Clone, Default)]
pub struct RpcLayer;

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService { inner }
    }
}

#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        // "/package.Service/Method": a known path names the metric series; anything else (a
        // probe of an unknown path) is counted as "other", so a caller cannot mint series.
        let known = KNOWN_METHODS.iter().find(|(known, _)| *known == path);
        let method: &'static str = known.map_or("other", |(_, label)| label);
        let span = if exporting() {
            let (service, rpc_method) = path.rsplit_once('/').unwrap_or(("", path));
            let service = service.trim_start_matches('/');
            let rpc_method = if known.is_some() { rpc_method } else { "other" };
            let span = tracing::info_span!(
                "rpc",
                otel.name = %format_args!("{service}/{rpc_method}"),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = %service,
                rpc.method = rpc_method,
                rpc.grpc.status_code = tracing::field::Empty,
                outcome = tracing::field::Empty,
            );
            let parent = TraceContextPropagator::new().extract(&HeaderExtractor(request.headers()));
            let _ = span.set_parent(parent);
            span
        } else {
            tracing::Span::none()
        };
        let started = Instant::now();
        // The clone is ready (tower's usual swap), and this one takes the call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let fut = inner.call(request);
        Box::pin(
            async move {
                let result = fut.await;
                // A unary error is a trailers-only response: its status is in the headers. A
                // response without one carries OK in its trailers.
                // An HTTP answer (forward-auth, OAuth) has no gRPC status: its HTTP status
                // says the same, as gRPC maps one to the other.
                let code = match &result {
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .unwrap_or_else(|| http_code(response.status())),
                    Err(_) => tonic::Code::Unknown as i32,
                };
                let code_name = code_name(code);
                tracing::Span::current().record("rpc.grpc.status_code", code);
                let elapsed = started.elapsed();
                metrics::counter!(
                    "authsidecar_rpc_requests_total",
                    "method" => method,
                    "code" => code_name,
                )
                .increment(1);
                metrics::histogram!("authsidecar_rpc_duration_seconds", "method" => method)
                    .record(elapsed.as_secs_f64());
                tracing::debug!(
                    method,
                    code = code_name,
                    elapsed_us = elapsed.as_micros() as u64,
                    "rpc"
                );
                result
            }
            .instrument(span),
        )
    }
}

/// The gRPC code an HTTP status stands for, as the `code` label of an HTTP call; a gRPC call
/// always carries its own.
fn http_code(status: http::StatusCode) -> i32 {
    use tonic::Code;
    let code = match status.as_u16() {
        200..=299 => Code::Ok,
        400 | 405 | 413 | 415 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        429 | 431 => Code::ResourceExhausted,
        503 => Code::Unavailable,
        _ => Code::Internal,
    };
    code as i32
}

/// A gRPC status code's name, as the `code` label.
fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "Ok",
        "Cancelled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i).copied())
        .unwrap_or("Unknown")
}

/// The API listener's methods by path, and the `method` label each takes: the only values it
/// takes, besides `other`.
const KNOWN_METHODS: [(&str, &str); 29] = [
    ("/v1/authz", "ForwardAuth"),
    ("/oauth2/introspect", "OAuthIntrospect"),
    ("/oauth2/revoke", "OAuthRevoke"),
    ("/authsidecar.v1.TokenService/Issue", "Issue"),
    ("/authsidecar.v1.TokenService/Validate", "Validate"),
    ("/authsidecar.v1.TokenService/Revoke", "Revoke"),
    (
        "/authsidecar.v1.TokenService/CheckRateLimit",
        "CheckRateLimit",
    ),
    (
        "/authsidecar.v1.TokenService/ResetRateLimit",
        "ResetRateLimit",
    ),
    ("/authsidecar.v1.TokenService/GetJwks", "GetJwks"),
    ("/authsidecar.v1.TokenService/Refresh", "Refresh"),
    (
        "/authsidecar.v1.TokenService/CreateSession",
        "CreateSession",
    ),
    ("/authsidecar.v1.TokenService/GetSession", "GetSession"),
    ("/authsidecar.v1.TokenService/TouchSession", "TouchSession"),
    (
        "/authsidecar.v1.TokenService/DeleteSession",
        "DeleteSession",
    ),
    ("/authsidecar.v1.TokenService/ListSessions", "ListSessions"),
    (
        "/authsidecar.v1.MfaService/BeginTotpEnrollment",
        "BeginTotpEnrollment",
    ),
    (
        "/authsidecar.v1.MfaService/ConfirmTotpEnrollment",
        "ConfirmTotpEnrollment",
    ),
    ("/authsidecar.v1.MfaService/VerifyTotp", "VerifyTotp"),
    (
        "/authsidecar.v1.MfaService/VerifyBackupCode",
        "VerifyBackupCode",
    ),
    ("/authsidecar.v1.MfaService/GetMfaStatus", "GetMfaStatus"),
    ("/authsidecar.v1.MfaService/DisableMfa", "DisableMfa"),
    (
        "/authsidecar.v1.MfaService/RegenerateBackupCodes",
        "RegenerateBackupCodes",
    ),
    ("/grpc.health.v1.Health/Check", "Check"),
    ("/grpc.health.v1.Health/Watch", "Watch"),
    ("/grpc.health.v1.Health/List", "List"),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "ServerReflectionInfo",
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "ServerReflectionInfo",
    ),
    (
        "/envoy.service.auth.v3.Authorization/Check",
        "ExtAuthzCheck",
    ),
    (
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
        "ShouldRateLimit",
    ),
];
