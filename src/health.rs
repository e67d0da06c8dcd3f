//! Health composed from parts: whether every backend answered its last ping, and whether the
//! process is shutting down. They feed grpc.health.v1 and `GET /healthz`: service "",
//! `authsidecar.v1.TokenService` and `readiness` are SERVING while every part is well;
//! `liveness` is SERVING while the process answers at all, so that a backend outage never
//! makes Kubernetes restart the pod. Probes only read this state; the backend checker is the
//! one that talks to the backends.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
    shutting_down: Arc<AtomicBool>,
    drained: CancellationToken,
}

impl Health {
    /// `drained` is cancelled when the server stops taking calls; open Watch streams end then,
    /// so that they do not hold the drain open until the grace period runs out.
    pub async fn new(drained: CancellationToken) -> Health {
        let health = Health {
            reporter: HealthReporter::new(),
            // Unknown until the first ping has answered.
            backends_up: Arc::new(AtomicBool::new(false)),
            shutting_down: Arc::new(AtomicBool::new(false)),
            drained,
        };
        health.publish().await;
        health
    }

    /// Whether every part is well: what `/healthz` and the probes report.
    pub fn serving(&self) -> bool {
        self.backends_up.load(Ordering::SeqCst) && !self.shutting_down.load(Ordering::SeqCst)
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
            health.check_backends(&*store).await;
            if health.backends_up.load(Ordering::SeqCst) || tokio::time::Instant::now() >= deadline
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let while_down = interval.min(Duration::from_millis(250));
        tokio::spawn(async move {
            loop {
                let up = health.backends_up.load(Ordering::SeqCst);
                tokio::time::sleep(if up { interval } else { while_down }).await;
                health.check_backends(&*store).await;
            }
        });
    }

    async fn check_backends(&self, store: &dyn Store) {
        let result = store.ping().await;
        let was_up = self.backends_up.load(Ordering::SeqCst);
        match &result {
            Ok(()) if !was_up => tracing::info!(backend = store.backend(), "backend up"),
            Err(e) if was_up => {
                tracing::warn!(backend = store.backend(), error = %e, "backend down")
            }
            Err(e) => tracing::debug!(backend = store.backend(), error = %e, "backend still down"),
            Ok(()) => {}
        }
        crate::telemetry::record_backend_up(store.backend(), result.is_ok());
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
