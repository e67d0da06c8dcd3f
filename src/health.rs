//! Health composed from parts: whether every backend answered its last ping, and whether the
//! process is shutting down. They feed grpc.health.v1 and `GET /healthz`: service "",
//! `authsidecar.v1.TokenService` and `readiness` are SERVING while every part is well;
//! `liveness` is SERVING while the process answers at all, so that a backend outage never
//! makes Kubernetes restart the pod. Probes only read this state; the backend checker is the
//! one that talks to the backends.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health as HealthRpc, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use crate::grpc::TokenApi;
use crate::pb::token_service_server::TokenServiceServer;
use crate::store::Store;

/// How long the start waits for the backends to answer before serving anyway (NOT_SERVING).
const STARTUP_WAIT: Duration = Duration::from_secs(2);

/// The service for liveness probes: SERVING whenever the process can answer.
pub const LIVENESS: &str = "liveness";

/// The service names that report readiness: backends answer and the process is not leaving.
pub const READINESS: [&str; 3] = [
    "",
    <TokenServiceServer<TokenApi> as NamedService>::NAME,
    "readiness",
];

#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    backends_up: Arc<AtomicBool>,
    /// Why the backends are down, while they are.
    failure: Arc<Mutex<Failure>>,
    shutting_down: Arc<AtomicBool>,
    /// Whether every live node agrees with this one; counts only with `strict_cluster`.
    cluster_agrees: Arc<AtomicBool>,
    /// Why the active key (in a PKCS#11 token or a KMS) does not sign, while it does not.
    signer_failure: Arc<Mutex<Option<String>>>,
    strict_cluster: bool,
    drained: CancellationToken,
}

/// The backends' failure, as the last pings saw it.
#[derive(Default)]
struct Failure {
    /// The last ping's reason, and since when pings have failed.
    current: Option<(String, Instant)>,
    repeats: Repeats,
}

impl Health {
    /// `drained` is cancelled when the server stops taking calls; open Watch streams end then,
    /// so that they do not hold the drain open until the grace period runs out.
    /// With `strict_cluster`, a disagreement with another live node makes it NOT_SERVING.
    pub async fn new(drained: CancellationToken, strict_cluster: bool) -> Health {
        let health = Health {
            reporter: HealthReporter::new(),
            // Unknown until the first ping has answered.
            backends_up: Arc::new(AtomicBool::new(false)),
            failure: Arc::default(),
            shutting_down: Arc::new(AtomicBool::new(false)),
            cluster_agrees: Arc::new(AtomicBool::new(true)),
            signer_failure: Arc::default(),
            strict_cluster,
            drained,
        };
        health.publish().await;
        health
    }

    /// Whether every part is well: what `/healthz` and the probes report.
    pub fn serving(&self) -> bool {
        self.backends_up.load(Ordering::SeqCst)
            && !self.shutting_down.load(Ordering::SeqCst)
            && self.signer_failure().is_none()
            && (!self.strict_cluster || self.cluster_agrees.load(Ordering::SeqCst))
    }

    /// Records whether every live node agrees with this one (see `cluster`).
    pub async fn set_cluster_agrees(&self, agrees: bool) {
        if self.cluster_agrees.swap(agrees, Ordering::SeqCst) != agrees && self.strict_cluster {
            self.publish().await;
        }
    }

    /// Records whether the active key, signing in a PKCS#11 token or a KMS, signs (a probe's
    /// outcome); logs the changes. A key that does not sign makes the node NOT_SERVING: it
    /// cannot issue.
    pub async fn set_signer(&self, result: Result<(), String>) {
        let changed = {
            let mut failure = self
                .signer_failure
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let was_down = failure.is_some();
            match &result {
                Ok(()) if was_down => tracing::info!("the active signing key signs again: ready"),
                Err(e) if !was_down => {
                    tracing::error!(error = %e, "the active signing key does not sign: not ready");
                }
                _ => {}
            }
            *failure = result.err();
            crate::telemetry::record_signer_up(failure.is_none());
            was_down != failure.is_some()
        };
        if changed {
            self.publish().await;
        }
    }

    /// Why the active key does not sign, if it does not.
    pub fn signer_failure(&self) -> Option<String> {
        self.signer_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Why the backends are down, if they are: the last failed ping's reason, in the
    /// backend's own words, and for how long pings have failed.
    pub fn backend_failure(&self) -> Option<(String, Duration)> {
        let failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        let (reason, since) = failure.current.as_ref()?;
        Some((reason.clone(), since.elapsed()))
    }

    /// One line for `/healthz` about the backends.
    pub fn backend_detail(&self) -> String {
        match self.backend_failure() {
            None if self.backends_up.load(Ordering::SeqCst) => "backends: up".to_owned(),
            None => "backends: not checked yet".to_owned(),
            Some((reason, down)) => format!(
                "backends: down for {}: {reason}",
                humantime::format_duration(Duration::from_secs(down.as_secs()))
            ),
        }
    }

    /// Records the outcome of a round of backend pings; logs changes.
    pub async fn set_backends_up(&self, up: bool) {
        if self.backends_up.swap(up, Ordering::SeqCst) != up {
            self.publish().await;
        }
    }

    /// Pings the store now, then every `interval` (more often while it is down, so that
    /// readiness returns soon after the backend does), for as long as the process runs. The
    /// first round is done when this returns, so the state is known before anything is served.
    pub async fn watch_backends(&self, store: Arc<dyn Store>, interval: Duration) {
        let health = self.clone();
        // A normal start (connecting, migrating) takes milliseconds: give it a moment, so the
        // sidecar comes up SERVING; a backend that is really down does not hold the start up.
        let deadline = tokio::time::Instant::now() + STARTUP_WAIT;
        loop {
            let last = tokio::time::Instant::now() >= deadline;
            health.check_backends(&*store, last).await;
            if health.backends_up.load(Ordering::SeqCst) || last {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let while_down = interval.min(Duration::from_millis(250));
        tokio::spawn(async move {
            loop {
                let up = health.backends_up.load(Ordering::SeqCst);
                tokio::time::sleep(if up { interval } else { while_down }).await;
                health.check_backends(&*store, true).await;
            }
        });
    }

    /// Pings the store and records the outcome. A failure is logged at WARN, with the
    /// backend's reason, when it is the first or its reason changed (then once a minute, with
    /// a count; see [`Repeats`]); one that only says the first attempt to connect is under
    /// way, only once the start has `waited` for it.
    async fn check_backends(&self, store: &dyn Store, waited: bool) {
        let result = store.ping().await;
        let backend = store.backend();
        {
            let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
            match &result {
                Ok(()) => {
                    let failures = failure.repeats.succeeded();
                    if failure.current.take().is_some() || failures > 0 {
                        tracing::info!(backend, failed_checks = failures, "backend up");
                    }
                }
                Err(e) => {
                    let since = failure
                        .current
                        .as_ref()
                        .map_or_else(Instant::now, |(_, since)| *since);
                    failure.current = Some((e.detail.clone(), since));
                    let log = waited || !e.detail.ends_with(crate::store::FIRST_ATTEMPT);
                    if log && let Some((count, before)) = failure.repeats.failed(&e.detail) {
                        tracing::warn!(
                            backend,
                            error = %e.detail,
                            count,
                            previous_reason_count = before,
                            "backend down"
                        );
                    }
                }
            }
        }
        crate::telemetry::record_backend_up(backend, result.is_ok());
        self.set_backends_up(result.is_ok()).await;
    }

    /// Reports NOT_SERVING from now on: the process is leaving.
    pub async fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.publish().await;
    }

    async fn publish(&self) {
        let status = if self.serving() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in READINESS {
            self.reporter.set_service_status(name, status).await;
        }
        self.reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
    }

    /// The grpc.health.v1 service, for the API and the ops listener alike. A health request
    /// names a service and nothing more: anything larger than [`MAX_REQUEST`] is refused
    /// before it is buffered.
    pub fn service(&self) -> HealthServer<DrainingHealth> {
        HealthServer::new(DrainingHealth {
            inner: HealthService::from_health_reporter(self.reporter.clone()),
            drained: self.drained.clone(),
        })
        .max_decoding_message_size(MAX_REQUEST)
    }
}

/// Logs a failure that repeats without flooding the log: the first failure and each change of
/// reason at once, at WARN, with how many times the reason before it occurred; the same reason
/// again only once a minute, with its count.
#[derive(Default)]
struct Repeats {
    last: Option<(String, u64, std::time::Instant)>,
}

/// How often a failure that keeps its reason is logged again.
const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl Repeats {
    /// Records a failure; returns what to log, if anything: the reason, how many times in a
    /// row it has now occurred, and how many times the previous reason did (0 if none).
    fn failed(&mut self, reason: &str) -> Option<(u64, u64)> {
        let now = std::time::Instant::now();
        match &mut self.last {
            Some((last, count, logged)) if last == reason => {
                *count += 1;
                (now.duration_since(*logged) >= REPEAT_LOG_INTERVAL).then(|| {
                    *logged = now;
                    (*count, 0)
                })
            }
            previous => {
                let before = previous.as_ref().map_or(0, |(_, count, _)| *count);
                *previous = Some((reason.to_owned(), 1, now));
                Some((1, before))
            }
        }
    }

    /// Records a success; returns how many failures in a row it ends (0 if none).
    fn succeeded(&mut self) -> u64 {
        self.last.take().map_or(0, |(_, count, _)| count)
    }
}

/// Largest grpc.health.v1 request decoded, in bytes.
pub const MAX_REQUEST: usize = 1024;

/// tonic-health's service, with Watch streams that end when the server drains.
pub struct DrainingHealth {
    inner: HealthService,
    drained: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl HealthRpc for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stream = self.inner.watch(request).await?.into_inner();
        let drained = self.drained.clone().cancelled_owned();
        Ok(Response::new(Box::pin(stream.take_until(drained))))
    }
}
