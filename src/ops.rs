//! The ops listener: what the cluster may see (grpc.health.v1 and `GET /healthz`), on one
//! port that speaks HTTP/1.1 and HTTP/2. The token API is never served here.

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tonic::server::NamedService;

use crate::health::{DrainingHealth, Health};

pub fn router(health: &Health) -> Router {
    let grpc_health = format!(
        "/{}/{{*method}}",
        <tonic_health::pb::health_server::HealthServer<DrainingHealth> as NamedService>::NAME
    );
    Router::new()
        .route("/healthz", get(healthz))
        .with_state(health.clone())
        .route_service(&grpc_health, health.service())
        .fallback(not_found)
}

async fn healthz(State(health): State<Health>) -> (StatusCode, &'static str) {
    if health.serving() {
        (StatusCode::OK, "SERVING\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
    }
}

/// UNIMPLEMENTED for a gRPC call (the token API among them), 404 for anything else.
async fn not_found(request: Request) -> Response {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        tonic::Status::unimplemented("not served on the ops listener").into_http::<Body>()
    } else {
        (StatusCode::NOT_FOUND, "not found\n").into_response()
    }
}
