//! Health composed from parts. Today the one part is the shutdown signal; each part feeds the
//! same answer to grpc.health.v1 (service "" and `authsidecar.v1.TokenService`) and to
//! `GET /healthz`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// The service names whose status this sidecar reports.
pub const SERVICES: [&str; 2] = ["", <TokenServiceServer<TokenApi> as NamedService>::NAME];

#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    shutting_down: Arc<AtomicBool>,
    drained: CancellationToken,
}

impl Health {
    /// `drained` is cancelled when the server stops taking calls; open Watch streams end then,
    /// so that they do not hold the drain open until the grace period runs out.
    pub async fn new(drained: CancellationToken) -> Health {
        let health = Health {
            reporter: HealthReporter::new(),
            shutting_down: Arc::new(AtomicBool::new(false)),
            drained,
        };
        health.publish().await;
        health
    }

    /// Whether every part is well: what `/healthz` and the probes report.
    pub fn serving(&self) -> bool {
        !self.shutting_down.load(Ordering::SeqCst)
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
        for name in SERVICES {
            self.reporter.set_service_status(name, status).await;
        }
    }

    /// The grpc.health.v1 service, for the API and the ops listener alike.
    pub fn service(&self) -> HealthServer<DrainingHealth> {
        HealthServer::new(DrainingHealth {
            inner: HealthService::from_health_reporter(self.reporter.clone()),
            drained: self.drained.clone(),
        })
    }
}

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
